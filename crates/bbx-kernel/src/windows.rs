//! `llm.chat`'s way to an agent's context: ContextTiering's window, as chat
//! messages.

use bbx_core::{AgentId, Result};
use bbx_tools::llm::{Message, WindowSource};
use std::sync::Arc;

pub(crate) struct ContextWindows(pub Arc<bbx_context::Contexts>);

impl WindowSource for ContextWindows {
    fn window(&self, agent: &AgentId, budget: u32) -> Result<Vec<Message>> {
        let window = self.0.assemble(*agent, budget)?;
        Ok(window["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| Message {
                role: chat_role(item["kind"].as_str(), item["role"].as_str()).to_owned(),
                content: item["content"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }
}

/// A summary speaks as the system; a tool's result, which a chat API only
/// takes as an answer to a call it made, as the user; an item without a role
/// too.
fn chat_role(kind: Option<&str>, role: Option<&str>) -> &'static str {
    match (kind, role) {
        (Some("summary"), _) | (_, Some("system")) => "system",
        (_, Some("assistant")) => "assistant",
        _ => "user",
    }
}
