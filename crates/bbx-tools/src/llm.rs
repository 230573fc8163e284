//! `llm.chat`: one chat completion from an OpenAI-compatible endpoint (Ollama, vLLM,
//! llama.cpp server, a hosted API), streamed or not, with its token usage and cost.
//!
//! The protocol is one POST of `/chat/completions` and, when streaming, server-sent
//! events of deltas; written on the workspace's reqwest rather than an SDK crate
//! (the ones that fit pull a second HTTP stack). The cost of a call is priced from
//! the configured table in micro-dollars, rounded up, so that budget sums are exact
//! integers and never under-charge.
//!
//! Before a call runs the ring reserves its most possible cost ([`LlmCall::max_usage`]):
//! every prompt token is at least one byte, and the completion is at most
//! `max_tokens`, so the reservation is a true upper bound.

use crate::Context;
use bbx_core::config::{LlmConfig, LlmEndpoint, ModelPrice};
use bbx_core::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// Tokens a chat format adds around each message, beyond its text.
const MESSAGE_OVERHEAD_TOKENS: u64 = 8;
/// What a context's window is reserved at, per token of its budget: its bytes
/// (a window's tokens are counted by the kernel's tokenizer, a provider's may
/// cut finer, but never below a byte) and its messages' framing. A window
/// whose bytes and framing pass it is refused before it is sent.
const WINDOW_RESERVE_PER_TOKEN: u64 = 16;
const MAX_MAX_TOKENS: u32 = 1_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmCall {
    /// A configured endpoint; may be left out when exactly one is configured.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub model: String,
    /// The messages; after the agent's assembled context when `context` is
    /// given (the new turn, say).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Take the agent's context, assembled under a token budget (prefix-stable,
    /// so a provider's prompt cache keeps serving it), as the first messages.
    #[serde(default)]
    pub context: Option<WindowArgs>,
    /// Most tokens to generate (default: the kernel's `default_max_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Read the answer as it is generated (server-sent events).
    #[serde(default)]
    pub stream: bool,
    /// Time allowed for the request (the op's own timeout still applies).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Constrains the answer, as the OpenAI API does: `{"type": "json_object"}`,
    /// or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`
    /// (Ollama, vLLM and llama.cpp's server honour it); passed on as given.
    #[serde(default)]
    pub response_format: Option<serde_json::Map<String, Value>>,
}

/// An assembled context as a call's first messages.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowArgs {
    /// The most tokens the context may take.
    pub budget: u32,
}

/// Tokens a call uses (or at most may use).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the provider served from its prompt cache, where its API
    /// says (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u64>,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Micro-dollars, rounded up; 0 for a model without a price.
    pub fn cost_micros(&self, price: Option<&ModelPrice>) -> u64 {
        let Some(price) = price else { return 0 };
        // USD per million tokens is micro-dollars per token.
        let micros =
            self.prompt_tokens as f64 * price.input_per_mtok + self.completion_tokens as f64 * price.output_per_mtok;
        micros.ceil() as u64
    }
}

impl LlmCall {
    pub(crate) fn checked(self) -> Result<Self> {
        if self.model.is_empty() {
            return Err(Error::invalid_field("args.model", "model must not be empty"));
        }
        if self.messages.is_empty() && self.context.is_none() {
            return Err(Error::invalid_field(
                "args.messages",
                "a chat needs at least one message, or a context",
            ));
        }
        if self.context.as_ref().is_some_and(|c| c.budget == 0) {
            return Err(Error::invalid_field("args.context.budget", "must be at least 1 token"));
        }
        for (i, message) in self.messages.iter().enumerate() {
            if !matches!(
                message.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(Error::invalid_field(
                    "args.messages",
                    format!(
                        "message {i} has role {:?}; use system, user, assistant, tool or developer",
                        message.role
                    ),
                ));
            }
        }
        if self.max_tokens.is_some_and(|m| m == 0 || m > MAX_MAX_TOKENS) {
            return Err(Error::invalid_field(
                "args.max_tokens",
                format!("max_tokens must be 1 to {MAX_MAX_TOKENS}"),
            ));
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(Error::invalid_field("args.temperature", "temperature must be 0 to 2"));
        }
        if self.timeout_ms == Some(0) {
            return Err(Error::invalid_field("args.timeout_ms", "timeout_ms must be at least 1"));
        }
        if let Some(format) = &self.response_format
            && !matches!(
                format.get("type").and_then(Value::as_str),
                Some("text" | "json_object" | "json_schema")
            )
        {
            return Err(Error::invalid_field(
                "args.response_format",
                "response_format.type must be text, json_object or json_schema",
            ));
        }
        Ok(self)
    }

    fn max_tokens(&self, config: &LlmConfig) -> u32 {
        self.max_tokens.unwrap_or(config.default_max_tokens)
    }

    /// The most tokens the call can use: its prompt's bytes (no token is shorter
    /// than a byte) plus each message's framing, a context's budget with the
    /// framing of as many messages as it has tokens, and `max_tokens` of
    /// completion.
    pub fn max_usage(&self, config: &LlmConfig) -> Usage {
        let prompt: u64 = self
            .messages
            .iter()
            .map(|m| (m.role.len() + m.content.len()) as u64 + MESSAGE_OVERHEAD_TOKENS)
            .sum();
        let window = self
            .context
            .as_ref()
            .map_or(0, |c| u64::from(c.budget) * WINDOW_RESERVE_PER_TOKEN);
        Usage {
            prompt_tokens: prompt + window,
            completion_tokens: u64::from(self.max_tokens(config)),
            cached_tokens: None,
        }
    }

    fn endpoint<'c>(&self, config: &'c LlmConfig) -> Result<&'c LlmEndpoint> {
        match &self.endpoint {
            Some(name) => config.endpoints.get(name).ok_or_else(|| {
                Error::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "no LLM endpoint {name:?} is configured; the endpoints are: {}",
                        config.endpoints.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            }),
            None if config.endpoints.len() == 1 => Ok(config.endpoints.values().next().expect("one endpoint")),
            None => Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "name an endpoint: {} are configured (in [tools.llm.endpoints])",
                    config.endpoints.len()
                ),
            )),
        }
    }

    /// The window of the agent's context, then the call's own messages.
    async fn messages(
        &self,
        ctx: &Context,
        windows: Option<&std::sync::Arc<dyn bbx_component::ContextWindows>>,
    ) -> Result<Vec<Message>> {
        let Some(context) = &self.context else {
            return Ok(self.messages.clone());
        };
        let windows = windows.cloned().ok_or_else(|| {
            Error::new(
                ErrorCode::FailedPrecondition,
                "this kernel keeps no agent context to assemble",
            )
        })?;
        let (agent, budget) = (ctx.agent, context.budget);
        let mut messages: Vec<Message> = tokio::task::spawn_blocking(move || windows.window(&agent, budget))
            .await
            .map_err(|e| Error::internal(format!("assembling the context failed: {e}")))??
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        let most: u64 = messages
            .iter()
            .map(|m| (m.role.len() + m.content.len()) as u64 + MESSAGE_OVERHEAD_TOKENS)
            .sum();
        if most > u64::from(budget) * WINDOW_RESERVE_PER_TOKEN {
            return Err(Error::invalid_field(
                "args.context.budget",
                format!(
                    "the window's {most} bytes and framing pass what a budget of {budget} tokens reserved; give a larger budget"
                ),
            ));
        }
        messages.extend(self.messages.iter().cloned());
        Ok(messages)
    }

    pub(crate) async fn run(
        &self,
        http: &reqwest::Client,
        config: &LlmConfig,
        ctx: &Context,
        windows: Option<&std::sync::Arc<dyn bbx_component::ContextWindows>>,
    ) -> Result<Value> {
        let endpoint = self.endpoint(config)?;
        let url = format!("{}/chat/completions", endpoint.base_url.trim_end_matches('/'));
        let messages = self.messages(ctx, windows).await?;
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens(config),
            "stream": self.stream,
        });
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(format) = &self.response_format {
            body["response_format"] = Value::Object(format.clone());
        }
        if self.stream {
            body["stream_options"] = json!({ "include_usage": true });
        }
        let mut request = http.post(&url).json(&body);
        if let Some(var) = &endpoint.api_key_env
            && let Ok(key) = std::env::var(var)
        {
            request = request.bearer_auth(key);
        }
        if let Some(key) = &ctx.idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(ms) = self.timeout_ms {
            request = request.timeout(Duration::from_millis(ms));
        }
        let response = request.send().await.map_err(|e| transport_error(&url, &e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(status_error(status.as_u16(), &text));
        }
        let answer = if self.stream {
            read_stream(response, &url).await?
        } else {
            let value: Value = response.json().await.map_err(|e| transport_error(&url, &e))?;
            Answer::from_completion(&value)?
        };
        let price = config.prices.get(&self.model);
        // A server that reports no usage is charged the most the call could cost.
        let (usage, estimated) = match answer.usage {
            Some(usage) => (usage, false),
            None => (self.max_usage(config), true),
        };
        let cost_micros = usage.cost_micros(price);
        let mut reported = json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total(),
            "estimated": estimated,
        });
        if let Some(cached) = usage.cached_tokens {
            reported["cached_tokens"] = json!(cached);
        }
        Ok(json!({
            "content": answer.content,
            "finish_reason": answer.finish_reason,
            "model": answer.model.unwrap_or_else(|| self.model.clone()),
            "usage": reported,
            "cost_micros": cost_micros,
            "cost_usd": cost_micros as f64 / 1e6,
            "priced": price.is_some(),
        }))
    }
}

/// What a completion said, streamed or not.
#[derive(Default)]
struct Answer {
    content: String,
    finish_reason: Option<String>,
    model: Option<String>,
    usage: Option<Usage>,
}

fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage")?;
    Some(Usage {
        prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
        completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        cached_tokens: usage
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64),
    })
}

impl Answer {
    fn from_completion(value: &Value) -> Result<Self> {
        let choice = value
            .pointer("/choices/0")
            .ok_or_else(|| malformed("the response has no choices"))?;
        Ok(Self {
            content: choice
                .pointer("/message/content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            finish_reason: choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned),
            model: value.get("model").and_then(Value::as_str).map(str::to_owned),
            usage: usage_of(value),
        })
    }

    fn add_chunk(&mut self, chunk: &Value) {
        if let Some(delta) = chunk.pointer("/choices/0/delta/content").and_then(Value::as_str) {
            self.content.push_str(delta);
        }
        if let Some(reason) = chunk.pointer("/choices/0/finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
        }
        if self.model.is_none() {
            self.model = chunk.get("model").and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(usage) = usage_of(chunk) {
            self.usage = Some(usage);
        }
    }
}

/// Reads server-sent events (`data: {chunk}` lines, ended by `data: [DONE]`).
async fn read_stream(mut response: reqwest::Response, url: &str) -> Result<Answer> {
    let mut answer = Answer::default();
    let mut pending = Vec::new();
    while let Some(bytes) = response.chunk().await.map_err(|e| transport_error(url, &e))? {
        pending.extend_from_slice(&bytes);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(answer);
            }
            let chunk: Value =
                serde_json::from_str(data).map_err(|e| malformed(&format!("a streamed chunk is not JSON: {e}")))?;
            if let Some(error) = chunk.get("error") {
                return Err(Error::new(
                    ErrorCode::ToolFailed,
                    format!("the model failed mid-stream: {error}"),
                ));
            }
            answer.add_chunk(&chunk);
        }
    }
    Err(Error::unavailable(format!(
        "the stream from {url} ended without [DONE]"
    )))
}

fn malformed(what: &str) -> Error {
    Error::new(
        ErrorCode::ToolFailed,
        format!("the LLM endpoint answered badly: {what}"),
    )
}

/// Rate limits and server errors are transient (the ring may retry them); other
/// refusals are the call's own failure.
fn status_error(status: u16, body: &str) -> Error {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(500).collect());
    let code = if status == 429 || status >= 500 {
        ErrorCode::Unavailable
    } else {
        ErrorCode::ToolFailed
    };
    Error::new(code, format!("the LLM endpoint answered {status}: {message}"))
        .with_details(json!({ "http_status": status }))
}

fn transport_error(url: &str, error: &reqwest::Error) -> Error {
    if error.is_timeout() {
        return Error::new(ErrorCode::Timeout, format!("the request to {url} timed out"));
    }
    Error::unavailable(format!("the request to {url} failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(value: Value) -> Result<LlmCall> {
        serde_json::from_value::<LlmCall>(value)
            .map_err(|e| Error::invalid_field("args", e.to_string()))
            .and_then(LlmCall::checked)
    }

    #[test]
    fn calls_are_checked_and_bounded() {
        let ok =
            call(json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10})).unwrap();
        let config = LlmConfig::default();
        let max = ok.max_usage(&config);
        assert_eq!(max.completion_tokens, 10);
        assert_eq!(
            max.prompt_tokens,
            ("user".len() + "hello".len()) as u64 + MESSAGE_OVERHEAD_TOKENS
        );
        assert!(call(json!({"model": "m", "messages": []})).is_err());
        assert!(call(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]})).is_err());
        assert!(call(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0})).is_err());
        assert!(call(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3})).is_err());
    }

    #[test]
    fn costs_are_exact_micro_dollars_rounded_up() {
        let price = ModelPrice {
            input_per_mtok: 0.15,
            output_per_mtok: 0.6,
        };
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: None,
        };
        assert_eq!(usage.cost_micros(Some(&price)), 450);
        let odd = Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
            cached_tokens: None,
        };
        assert_eq!(
            odd.cost_micros(Some(&price)),
            1,
            "a fraction of a micro-dollar rounds up"
        );
        assert_eq!(usage.cost_micros(None), 0);
    }

    #[test]
    fn streamed_chunks_add_up() {
        let mut answer = Answer::default();
        answer.add_chunk(&json!({"model": "m", "choices": [{"delta": {"content": "Hel"}}]}));
        answer.add_chunk(&json!({"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}));
        answer.add_chunk(&json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}));
        assert_eq!(answer.content, "Hello");
        assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
        assert_eq!(answer.usage.unwrap().total(), 5);
    }
}
