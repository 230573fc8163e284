//! `context.assemble` for an agent: its items as candidates, the previous
//! window kept as prefix, summaries of what is evicted, and the window's
//! content gathered from the tiers.

use crate::CONTEXT_AGENTS;
use crate::assemble::{self, Candidate, Part, Settings};
use crate::codec;
use crate::contexts::{Contexts, read_block};
use crate::item::{ItemId, Role, agent_key};
use crate::state::{AgentContext, Resident};
use crate::summary::summarize;
use bbx_core::{AgentId, Error, Result};
use bbx_store::{Applied, GroupTx, Staged};
use serde_json::{Value, json};
use std::sync::Arc;

/// An agent's last window, kept so the next one can share its prefix after a
/// restart. Written off the op's path: losing it costs one cache miss.
#[derive(Debug)]
struct SaveAssembly(AgentId, Vec<u8>);

impl Staged for SaveAssembly {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.put(
            CONTEXT_AGENTS,
            agent_key(&self.0, crate::contexts::ASSEMBLY),
            self.1.clone(),
        );
        Ok(Applied::Done)
    }
}

impl Contexts {
    fn content_of(&self, agent: &AgentId, resident: &Resident, id: ItemId) -> Result<Arc<str>> {
        match resident {
            Resident::Hot(content) => Ok(content.clone()),
            Resident::Warm(block) => Ok(codec::decode(block)?.into()),
            Resident::None => {
                let block = read_block(self.store()?, agent, id)?
                    .ok_or_else(|| Error::internal(format!("context item {id} has no block")))?;
                Ok(codec::decode(&block)?.into())
            }
        }
    }

    fn summary(&self, agent: &AgentId, ctx: &AgentContext, parts: &[Part], cap: u32) -> Result<Part> {
        let mut covers = Vec::new();
        let mut texts: Vec<Arc<str>> = Vec::new();
        for part in parts {
            match part {
                Part::Item(id) => {
                    let Some(entry) = ctx.items.get(id) else { continue };
                    covers.push(*id);
                    texts.push(self.content_of(agent, &entry.resident, *id)?);
                }
                Part::Summary {
                    covers: inner, text, ..
                } => {
                    covers.extend_from_slice(inner);
                    texts.push(text.as_str().into());
                }
            }
        }
        covers.sort_unstable();
        let header = format!(
            "[Summary of {} earlier items, {}-{}]",
            covers.len(),
            covers.first().unwrap_or(&0),
            covers.last().unwrap_or(&0)
        );
        let refs: Vec<&str> = texts.iter().map(|t| &**t).collect();
        let text = summarize(&header, &refs, cap, self.counter());
        let tokens = self.counter().count(&text);
        Ok(Part::Summary { covers, text, tokens })
    }

    /// A window of the agent's context under `budget` tokens.
    pub fn assemble(&self, agent: AgentId, budget: u32) -> Result<Value> {
        let settings = Settings {
            compact_to: self.0.config.compact_to,
            summary_tokens: self.0.config.summary_tokens as u32,
        };
        let (plan, parts) = self.with(agent, |ctx| -> Result<_> {
            let candidates: Vec<Candidate> = ctx
                .items
                .values()
                .map(|e| Candidate {
                    id: e.record.id,
                    tokens: e.record.tokens,
                    head: e.record.pinned || e.record.role == Some(Role::System),
                })
                .collect();
            let plan = assemble::plan(
                &candidates,
                ctx.last_assembly.as_ref(),
                budget,
                settings,
                |parts, cap| self.summary(&agent, ctx, parts, cap),
                |ids| self.scores(ctx, ids),
            )?;
            let parts: Vec<(Part, Option<(crate::item::Record, Resident)>)> = plan
                .assembly
                .head
                .iter()
                .map(|id| Part::Item(*id))
                .chain(plan.assembly.body.iter().cloned())
                .map(|part| {
                    let found = match &part {
                        Part::Item(id) => ctx.items.get(id).map(|e| (e.record.clone(), e.resident.clone())),
                        Part::Summary { .. } => None,
                    };
                    (part, found)
                })
                .collect();
            ctx.last_assembly = Some(plan.assembly.clone());
            Ok((plan, parts))
        })??;
        if let (Ok(ctx), Ok(saved)) = (self.context(), serde_json::to_vec(&plan.assembly)) {
            ctx.write_later(SaveAssembly(agent, saved), "an agent's last context window");
        }
        let mut items = Vec::with_capacity(parts.len());
        for (part, found) in parts {
            items.push(match (part, found) {
                (Part::Item(id), Some((record, resident))) => json!({
                    "id": id, "kind": record.kind, "role": record.role, "tokens": record.tokens,
                    "content": &*self.content_of(&agent, &resident, id)?,
                }),
                (Part::Summary { covers, text, tokens }, _) => json!({
                    "kind": "summary", "role": "system", "tokens": tokens, "content": text,
                    "summarizes": { "items": covers.len(), "from": covers.first(), "to": covers.last() },
                }),
                (Part::Item(id), None) => {
                    return Err(Error::internal(format!("context item {id} went during assembly")));
                }
            });
        }
        Ok(json!({
            "items": items,
            "tokens": plan.tokens,
            "budget": budget,
            "prefix_items": plan.prefix_parts,
            "prefix_tokens": plan.prefix_tokens,
            "compacted": plan.compacted,
        }))
    }
}
