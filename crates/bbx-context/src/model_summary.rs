//! Summaries written by a model (`context.summary_model`): the evicted span
//! goes through `llm.chat` as an op of the agent itself, so it is metered
//! against the agent's budget, checked by FlowIntegrity and journaled like any
//! other call. Only the agent's own assembly asks (its op, its `llm.chat`), so
//! nobody else spends for it. Its idempotency key is the span's content, the
//! model and the room, so a window assembled again within the ring's
//! retention does not pay twice (and a failure stays that span's answer for
//! as long: it is summarized extractively).

use crate::Contexts;
use crate::summary::summarize;
use bbx_auth::Caller;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use serde_json::json;
use std::hash::Hasher;
use std::time::Duration;

const INSTRUCTIONS: &str = "You compress the earlier part of an AI agent's working context so that the agent can go on \
without it. Write a faithful, dense summary of the items below, in their order. Keep every identifier, number, name, \
path, URL, decision, result and open task exactly as written. Add nothing that is not in the items. Answer with the \
summary only.";

/// A summary shorter than this has no room to say anything.
const MIN_ROOM_TOKENS: u32 = 16;

impl Contexts {
    /// A summary of `texts` by `model`, `header` first, in at most `cap`
    /// tokens. Waits for the model: call it off the runtime's workers (every
    /// assembly runs on a blocking thread).
    pub(crate) fn model_summary(
        &self,
        agent: &AgentId,
        header: &str,
        texts: &[&str],
        cap: u32,
        model: &str,
    ) -> Result<(String, u32)> {
        let config = &self.0.config;
        let counter = self.counter();
        let room = cap
            .checked_sub(counter.count(header) + 1)
            .filter(|room| *room >= MIN_ROOM_TOKENS)
            .ok_or_else(|| Error::invalid_field("budget", "the window leaves a summary no room"))?;
        // No token is shorter than a byte: text within the limit in bytes is
        // within it in tokens without counting.
        let bytes: usize = texts.iter().map(|t| t.len() + 2).sum();
        let input = if bytes <= config.summary_input_tokens {
            texts.join("\n\n")
        } else {
            summarize("", texts, config.summary_input_tokens as u32, counter)
        };
        let key = format!("context-summary:{:016x}", span_key(model, cap, &input));
        let args = json!({
            "endpoint": config.summary_endpoint,
            "model": model,
            "messages": [
                { "role": "system", "content": INSTRUCTIONS },
                { "role": "user", "content": input },
            ],
            "max_tokens": room,
            "temperature": 0,
            "timeout_ms": config.summary_timeout_ms,
        });
        let op = SubmitOp {
            idempotency_key: Some(key),
            timeout_ms: Some(config.summary_timeout_ms + 5_000),
            ..SubmitOp::new(*agent, "llm.chat", args)
        };
        let ctx = self.context()?;
        let caller = Caller::of_agent(*agent, ctx.agents.agent(agent)?.tenant);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::internal("a model summary needs the kernel's runtime"))?;
        let wait = Duration::from_millis(config.summary_timeout_ms + 10_000);
        let answer = runtime.block_on(bbx_component::run_op(&*ctx.submitter, &caller, op, wait))?;
        if answer["finish_reason"] == "length" {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!("model {model}'s summary was cut off at its {room} tokens"),
            ));
        }
        let content = answer["content"].as_str().unwrap_or_default().trim();
        if content.is_empty() {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!("model {model} gave an empty summary"),
            ));
        }
        let text = format!("{header}\n{content}");
        let tokens = counter.count(&text);
        if tokens > cap {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!("model {model}'s summary has {tokens} tokens, more than the {cap} it was given"),
            ));
        }
        Ok((text, tokens))
    }
}

/// What names one summary request: the same span, model and room give the
/// same key (FxHash has no random seed).
fn span_key(model: &str, cap: u32, input: &str) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(model.as_bytes());
    hasher.write_u32(cap);
    hasher.write(input.as_bytes());
    hasher.finish()
}
