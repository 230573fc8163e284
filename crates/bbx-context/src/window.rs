//! `context.assemble` for an agent: its items as candidates, the previous
//! window kept as prefix, summaries of what is evicted, and the window's
//! content gathered from the tiers.

use crate::CONTEXT_AGENTS;
use crate::assemble::{self, Assembly, Candidate, Part, Settings};
use crate::codec;
use crate::contexts::Contexts;
use crate::item::{ItemId, Record, Role, agent_key};
use crate::state::{AgentContext, Resident};
use crate::summary::summarize;
use bbx_core::{AgentId, Error, Result};
use bbx_store::{Applied, GroupTx, Staged};
use rustc_hash::FxHashSet;
use serde_json::{Value, json};
use std::sync::Arc;

/// An agent's last window, kept so the next one can share its prefix after a
/// restart. Written off the op's path: losing it costs one cache miss.
#[derive(Debug)]
struct SaveAssembly {
    agent: AgentId,
    /// The import count of the copy it was assembled from.
    epoch: u64,
    window: Vec<u8>,
}

impl Staged for SaveAssembly {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        // Not for an agent whose context was deleted, or imported, meanwhile.
        let exists = tx
            .read(CONTEXT_AGENTS, &agent_key(&self.agent, crate::contexts::SEQUENCE))?
            .is_some();
        let epoch = crate::item::counter(tx.read(CONTEXT_AGENTS, &agent_key(&self.agent, crate::contexts::EPOCH))?);
        if exists && epoch == self.epoch {
            tx.put(
                CONTEXT_AGENTS,
                agent_key(&self.agent, crate::contexts::ASSEMBLY),
                self.window.clone(),
            );
        }
        Ok(Applied::Done)
    }
}

impl Contexts {
    /// The contents of items found under the agent's lock, read outside it:
    /// from memory, the disk, and the bucket (its blocks fetched together).
    fn contents(&self, agent: &AgentId, residents: &[(ItemId, Resident)]) -> Vec<Result<Arc<str>>> {
        let mut stored = Vec::new();
        let mut slots: Vec<Result<Option<usize>>> = Vec::with_capacity(residents.len());
        for (id, resident) in residents {
            slots.push(match resident {
                Resident::Hot(_) | Resident::Warm(_) => Ok(None),
                Resident::None => match self.stored_block(agent, *id) {
                    Ok(Some(block)) => {
                        stored.push(block);
                        Ok(Some(stored.len() - 1))
                    }
                    Ok(None) => Err(Error::internal(format!("context item {id} has no block"))),
                    Err(e) => Err(e),
                },
            });
        }
        let mut resolved: Vec<Option<Result<Vec<u8>>>> =
            self.resolve_all(agent, stored).into_iter().map(Some).collect();
        residents
            .iter()
            .zip(slots)
            .map(|((_, resident), slot)| match (resident, slot?) {
                (Resident::Hot(content), _) => Ok(content.clone()),
                (Resident::Warm(block), _) => Ok(codec::decode(block)?.into()),
                (Resident::None, Some(at)) => {
                    let block = resolved
                        .get_mut(at)
                        .and_then(Option::take)
                        .unwrap_or_else(|| Err(Error::internal("a block was not read")))?;
                    Ok(codec::decode(&block)?.into())
                }
                (Resident::None, None) => Err(Error::internal("a block was not read")),
            })
            .collect()
    }

    /// A summary of `parts` in at most `cap` tokens, from contents gathered
    /// under the agent's lock ([`Evicted`]), computed outside it: by the
    /// configured model where `by_model`, or extractively (also when the model
    /// fails). An item that cannot be read (its bucket down) is left out, and
    /// counted.
    fn summary(&self, agent: &AgentId, evicted: &Evicted, by_model: bool) -> Result<Summarized> {
        let items: Vec<(ItemId, Resident)> = evicted
            .sources
            .iter()
            .filter_map(|source| match source {
                Source::Item(id, resident) => Some((*id, resident.clone())),
                Source::Summary(_) => None,
            })
            .collect();
        let mut read = self.contents(agent, &items).into_iter();
        let mut texts: Vec<Arc<str>> = Vec::with_capacity(evicted.sources.len());
        let mut unreadable = 0;
        for source in &evicted.sources {
            match source {
                Source::Item(id, _) => match read.next().unwrap_or_else(|| Err(Error::internal("unread"))) {
                    Ok(text) => texts.push(text),
                    Err(e) => {
                        tracing::warn!(%agent, id, error = %e, "an evicted context item could not be read for its summary");
                        unreadable += 1;
                    }
                },
                Source::Summary(text) => texts.push(text.as_str().into()),
            }
        }
        let left_out = if unreadable > 0 {
            format!(", {unreadable} unreadable left out")
        } else {
            String::new()
        };
        let header = format!(
            "[Summary of {} earlier items, {}-{}{left_out}]",
            evicted.covers.len(),
            evicted.covers.first().unwrap_or(&0),
            evicted.covers.last().unwrap_or(&0)
        );
        let refs: Vec<&str> = texts.iter().map(|t| &**t).collect();
        let mut model_error = None;
        if let Some(model) = self.0.config.summary_model.as_ref().filter(|_| by_model) {
            match self.model_summary(agent, &header, &refs, evicted.cap, model) {
                Ok((text, tokens)) => {
                    return Ok(Summarized {
                        text,
                        tokens,
                        by: model.clone(),
                        model_error,
                    });
                }
                Err(e) => {
                    tracing::warn!(%agent, model, error = %e, "the summary model failed; the window takes an extractive summary");
                    model_error = Some(e.message);
                }
            }
        }
        let text = summarize(&header, &refs, evicted.cap, self.counter());
        let tokens = self.counter().count(&text);
        Ok(Summarized {
            text,
            tokens,
            by: "extractive".to_owned(),
            model_error,
        })
    }

    /// A window of the agent's context under `budget` tokens. The window is
    /// planned under the agent's lock; what must be read from disk (contents,
    /// and the items a summary covers) is read after. `by_model`: the agent
    /// itself asks (its own op, its `llm.chat`), so a compaction may have the
    /// configured model summarize, on the agent's budget, and wait for it:
    /// call it on a blocking thread.
    pub fn assemble(&self, agent: AgentId, budget: u32, asker: Asker) -> Result<Value> {
        let by_model = asker == Asker::Agent;
        let settings = Settings {
            compact_to: self.0.config.compact_to,
            summary_tokens: self.0.config.summary_tokens as u32,
        };
        let (mut plan, parts, evicted) = self.with(agent, |ctx| -> Result<_> {
            let candidates: Vec<Candidate> = ctx
                .items
                .values()
                .map(|e| Candidate {
                    id: e.record.id,
                    tokens: e.record.tokens,
                    head: e.record.pinned || e.record.role == Some(Role::System),
                })
                .collect();
            let mut evicted: Option<Evicted> = None;
            let plan = assemble::plan(
                &candidates,
                ctx.last_assembly.as_ref(),
                budget,
                settings,
                |parts, cap| Ok(evicted.insert(Evicted::of(ctx, parts, cap)).placeholder()),
                |ids| self.scores(ctx, ids),
            )?;
            let parts: Vec<(Part, Option<(Record, Resident)>)> = plan
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
            Ok((plan, parts, evicted))
        })??;
        let summary = evicted
            .map(|e| self.summary(&agent, &e, by_model).map(|done| (e.cap, done)))
            .transpose()?;
        if let Some((cap, summarized)) = &summary {
            let (cap, tokens) = (*cap, summarized.tokens);
            fill_summary(&mut plan.assembly, &summarized.text, tokens, cap);
            plan.tokens = plan.tokens - u64::from(cap) + if tokens <= cap { u64::from(tokens) } else { 0 };
        }
        // Only the agent and those who act for it set the window the next one
        // keeps as its prefix; a grantee's read leaves it as it was.
        let (appended, epoch) = self.with(agent, |ctx| {
            if asker == Asker::Grantee {
                return (true, ctx.epoch);
            }
            // A window that is the previous one with items appended need not be
            // saved: after a restart the saved one, with what followed it,
            // gives it again.
            let appended = ctx.last_assembly.as_ref().is_some_and(|before| {
                before.head == plan.assembly.head && plan.prefix_parts == before.head.len() + before.body.len()
            });
            ctx.last_assembly = Some(plan.assembly.clone());
            (appended, ctx.epoch)
        })?;
        if !appended && let (Ok(ctx), Ok(window)) = (self.context(), serde_json::to_vec(&plan.assembly)) {
            let save = SaveAssembly { agent, epoch, window };
            ctx.write_later(save, "an agent's last context window");
        }
        // The window's items are read together (those in the bucket fetched
        // at once); one that cannot be read fails the window, naming it.
        let residents: Vec<(ItemId, Resident)> = parts
            .iter()
            .filter_map(|(part, found)| match (part, found) {
                (Part::Item(id), Some((_, resident))) => Some((*id, resident.clone())),
                _ => None,
            })
            .collect();
        let contents = self.contents(&agent, &residents);
        // A pinned or system item is in every window: one read from disk or
        // the bucket is kept HOT, so the next window does not read it again
        // (a grantee's read changes nothing).
        if asker != Asker::Grantee {
            let head: FxHashSet<ItemId> = plan.assembly.head.iter().copied().collect();
            for ((id, resident), content) in residents.iter().zip(&contents) {
                if let (Resident::None, Ok(content), true) = (resident, content, head.contains(id)) {
                    self.promote(agent, *id, content.clone(), false);
                }
            }
        }
        let mut contents = contents.into_iter();
        let mut items = Vec::with_capacity(parts.len());
        let mut summaries = plan.assembly.body.iter().filter_map(|p| match p {
            Part::Summary { covers, text, tokens } => Some((covers, text, tokens)),
            Part::Item(_) => None,
        });
        for (part, found) in parts {
            items.push(match (part, found) {
                (Part::Item(id), Some((record, _))) => {
                    let content = contents
                        .next()
                        .unwrap_or_else(|| Err(Error::internal("a window item was not read")))
                        .map_err(|e| Error::new(e.code, format!("context item {id}: {}", e.message)))?;
                    let mut item = json!({
                        "id": id, "kind": record.kind, "role": record.role, "tokens": record.tokens,
                        "content": &*content,
                    });
                    if !record.labels.is_empty() {
                        item["labels"] = json!(record.labels);
                    }
                    item
                }
                (Part::Summary { .. }, _) => {
                    // The placeholder's text is filled in order; a dropped one is skipped.
                    let Some((covers, text, tokens)) = summaries.next() else {
                        continue;
                    };
                    json!({
                        "kind": "summary", "role": "system", "tokens": tokens, "content": text,
                        "summarizes": { "items": covers.len(), "from": covers.first(), "to": covers.last() },
                    })
                }
                (Part::Item(id), None) => {
                    return Err(Error::internal(format!("context item {id} went during assembly")));
                }
            });
        }
        let mut answer = json!({
            "items": items,
            "tokens": plan.tokens,
            "budget": budget,
            "prefix_items": plan.prefix_parts,
            "prefix_tokens": plan.prefix_tokens,
            "compacted": plan.compacted,
        });
        if let Some((_, summarized)) = summary {
            answer["summary_by"] = json!(summarized.by);
            if let Some(error) = summarized.model_error {
                answer["summary_error"] = json!(error);
            }
        }
        Ok(answer)
    }
}

impl bbx_component::ContextWindows for Contexts {
    /// The window as chat messages: a summary and system items speak as the
    /// system, assistant items as the assistant; a tool's result, which a chat
    /// API takes only as the answer to a call it made, and an item without a
    /// role, as the user.
    fn window(&self, agent: &AgentId, budget: u32) -> Result<Vec<bbx_component::ChatMessage>> {
        // llm.chat of the agent itself: its window may be summarized by a model.
        let window = self.assemble(*agent, budget, Asker::Agent)?;
        Ok(window["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                let role = match (item["kind"].as_str(), item["role"].as_str()) {
                    (Some("summary"), _) | (_, Some("system")) => "system",
                    (_, Some("assistant")) => "assistant",
                    _ => "user",
                };
                bbx_component::ChatMessage {
                    role: role.to_owned(),
                    content: item["content"].as_str().unwrap_or_default().to_owned(),
                }
            })
            .collect())
    }
}

/// Who asks for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// The agent itself (its op, its `llm.chat`, a key confined to it): a
    /// compaction may have the configured model summarize, on its budget.
    Agent,
    /// A credential acting for the agent's tenant: the window is kept as the
    /// next one's prefix, its summaries extractive.
    Operator,
    /// Another agent, by grant: a read that changes nothing the agent keeps.
    Grantee,
}

/// A compaction's summary, and what wrote it.
struct Summarized {
    text: String,
    tokens: u32,
    /// The model, or `extractive`.
    by: String,
    /// Why the model's summary was not taken.
    model_error: Option<String>,
}

/// Where a summarized part's text comes from.
enum Source {
    Item(ItemId, Resident),
    Summary(String),
}

/// The parts a compaction evicted, as found under the agent's lock.
struct Evicted {
    covers: Vec<ItemId>,
    sources: Vec<Source>,
    cap: u32,
}

impl Evicted {
    fn of(ctx: &AgentContext, parts: &[Part], cap: u32) -> Self {
        let mut covers = Vec::new();
        let mut sources = Vec::new();
        for part in parts {
            match part {
                Part::Item(id) => {
                    let Some(entry) = ctx.items.get(id) else { continue };
                    covers.push(*id);
                    sources.push(Source::Item(*id, entry.resident.clone()));
                }
                Part::Summary {
                    covers: inner, text, ..
                } => {
                    covers.extend_from_slice(inner);
                    sources.push(Source::Summary(text.clone()));
                }
            }
        }
        covers.sort_unstable();
        Self { covers, sources, cap }
    }

    /// The summary's place in the window, its size reserved, until its text
    /// is known.
    fn placeholder(&self) -> Part {
        Part::Summary {
            covers: self.covers.clone(),
            text: String::new(),
            tokens: self.cap,
        }
    }
}

/// Puts the summary's text in its placeholder, or takes the placeholder out if
/// the text came out larger than was reserved.
fn fill_summary(assembly: &mut Assembly, text: &str, tokens: u32, cap: u32) {
    let placeholder = assembly
        .body
        .iter()
        .position(|p| matches!(p, Part::Summary { text, .. } if text.is_empty()));
    let Some(at) = placeholder else { return };
    if tokens > cap {
        assembly.body.remove(at);
    } else if let Part::Summary {
        text: slot,
        tokens: size,
        ..
    } = &mut assembly.body[at]
    {
        *slot = text.to_owned();
        *size = tokens;
    }
}
