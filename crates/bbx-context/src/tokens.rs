//! Token counts with a real tokenizer: tiktoken's o200k or cl100k (the
//! encodings of OpenAI's models), or a Hugging Face `tokenizer.json` for a
//! local model, as `[context] tokenizer` says.

use bbx_core::{Error, Result};
use std::sync::Arc;

/// Counts the tokens of a text as one model would.
#[derive(Clone)]
pub struct TokenCounter(Arc<Inner>);

enum Inner {
    /// Made on first use: loading the ranks takes a while, and a kernel
    /// that never counts should not start slower.
    Tiktoken(fn() -> &'static tiktoken_rs::CoreBPE),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCounter")
    }
}

impl TokenCounter {
    /// `o200k`, `cl100k`, or the path of a `tokenizer.json`.
    pub fn new(name: &str) -> Result<Self> {
        let inner = match name {
            "o200k" | "o200k_base" => Inner::Tiktoken(tiktoken_rs::o200k_base_singleton),
            "cl100k" | "cl100k_base" => Inner::Tiktoken(tiktoken_rs::cl100k_base_singleton),
            path => Inner::HuggingFace(Box::new(tokenizers::Tokenizer::from_file(path).map_err(|e| {
                Error::invalid_field(
                    "context.tokenizer",
                    format!("context.tokenizer is o200k, cl100k or a tokenizer.json; {path} could not be loaded: {e}"),
                )
            })?)),
        };
        Ok(Self(Arc::new(inner)))
    }

    /// The tokens `text` takes.
    pub fn count(&self, text: &str) -> u32 {
        let n = match &*self.0 {
            Inner::Tiktoken(bpe) => bpe().encode_ordinary(text).len(),
            // A text the tokenizer fails on is counted by bytes: an
            // overestimate keeps a window under its budget.
            Inner::HuggingFace(tokenizer) => tokenizer
                .encode_fast(text, false)
                .map_or(text.len(), |encoding| encoding.len()),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_as_tiktoken_does() {
        let o200k = TokenCounter::new("o200k").unwrap();
        // tiktoken (Python) gives 4 for "hello world, friends" under both.
        assert_eq!(o200k.count("hello world, friends"), 4);
        assert_eq!(TokenCounter::new("cl100k").unwrap().count("hello world, friends"), 4);
        assert_eq!(o200k.count(""), 0);
        assert!(TokenCounter::new("/nonexistent/tokenizer.json").is_err());
    }
}
