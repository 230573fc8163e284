//! The write path, without an LLM: `memory.add` splits a long text into chunks,
//! embeds them off the committer (the effect's `ready` step, which also looks
//! for near duplicates), then stages each chunk in the op's own write: an exact
//! duplicate (same normalized text) or a near one (cosine at or above
//! `memory.near_duplicate`, when set to merge) is merged into the memory it
//! repeats; a memory about a subject supersedes the one that held for it (which
//! stays, with `valid_to` set, for searches "as of" a past time).

use crate::Memories;
use crate::record::{Memory, MemoryId, encode_vector, hash_key, memory_key, subject_key, text_hash};
use crate::{MEMORY_HASHES, MEMORY_ITEMS, MEMORY_SUBJECTS, MEMORY_VECTORS};
use bbx_component::{EffectOp, Pending, Staging};
use bbx_core::config::NearDuplicate;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::GroupTx;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::sync::{Arc, OnceLock};

/// The longest subject, in bytes.
const MAX_SUBJECT_BYTES: usize = 512;
/// The most metadata one memory carries, as JSON bytes.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// `memory.add`'s args.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    /// What to remember. A text longer than `memory.max_text_bytes` is split
    /// into chunks (one memory each) or refused, by configuration.
    pub text: String,
    /// Searchable with a search's `filter`.
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    /// What it is about: it supersedes the memory that held for this subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// Memories it supersedes, by id.
    #[serde(default)]
    pub supersedes: Option<Vec<MemoryId>>,
    /// From when it holds [default: now].
    #[serde(default)]
    pub valid_from: Option<DateTime<Utc>>,
    /// What a near duplicate does [default: `memory.on_near_duplicate`].
    #[serde(default)]
    pub on_near_duplicate: Option<NearDuplicate>,
    /// Its vector, already embedded by the model in use (named in `model`),
    /// instead of embedding `text`.
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    #[serde(default)]
    pub model: Option<String>,
    /// Another agent's memory to add it to, where that agent granted this
    /// one write over it (FlowIntegrity).
    #[serde(default)]
    pub owner: Option<AgentId>,
}

/// A checked `memory.add`.
#[derive(Debug)]
pub struct Add {
    memories: Memories,
    chunks: Vec<String>,
    metadata: Map<String, Value>,
    subject: Option<String>,
    supersedes: Vec<MemoryId>,
    valid_from: Option<DateTime<Utc>>,
    near: NearDuplicate,
    given: Option<Vec<f32>>,
    owner: Option<AgentId>,
    /// What the ready step found, per chunk.
    ready: Arc<OnceLock<Vec<Embedded>>>,
}

#[derive(Debug, Clone)]
struct Embedded {
    vector: Vec<f32>,
    /// A memory it nearly repeats, and how nearly.
    near: Option<(MemoryId, f32)>,
}

impl std::fmt::Debug for Memories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memories")
    }
}

impl Add {
    pub fn new(memories: &Memories, args: AddArgs) -> Result<Self> {
        let config = &memories.0.config;
        if args.text.trim().is_empty() {
            return Err(Error::invalid_field("text", "the text is empty"));
        }
        if args.text.len() > config.max_add_bytes {
            return Err(Error::invalid_field(
                "text",
                format!(
                    "the text is {} bytes; one add takes at most {}",
                    args.text.len(),
                    config.max_add_bytes
                ),
            ));
        }
        let chunks = if args.text.len() <= config.max_text_bytes {
            vec![args.text]
        } else if config.chunk_long_text && args.vector.is_none() {
            chunk(&args.text, config.chunk_bytes)
        } else {
            return Err(Error::invalid_field(
                "text",
                format!(
                    "the text is {} bytes; a memory holds at most {} (memory.max_text_bytes){}",
                    args.text.len(),
                    config.max_text_bytes,
                    if args.vector.is_some() {
                        " when its vector is given"
                    } else {
                        ""
                    }
                ),
            ));
        };
        if let Some(subject) = &args.subject
            && (subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES)
        {
            return Err(Error::invalid_field(
                "subject",
                format!("a subject is from 1 to {MAX_SUBJECT_BYTES} bytes"),
            ));
        }
        let metadata = args.metadata.unwrap_or_default();
        if serde_json::to_vec(&metadata).map_or(0, |m| m.len()) > MAX_METADATA_BYTES {
            return Err(Error::invalid_field(
                "metadata",
                format!("metadata is at most {MAX_METADATA_BYTES} bytes of JSON"),
            ));
        }
        let given = match (args.vector, args.model) {
            (None, None) => None,
            (Some(vector), Some(model)) => Some(memories.given_vector(vector, &model)?),
            _ => {
                return Err(Error::invalid_field(
                    "vector",
                    "a vector needs its model, and a model its vector",
                ));
            }
        };
        Ok(Self {
            memories: memories.clone(),
            chunks,
            metadata,
            subject: args.subject,
            supersedes: args.supersedes.unwrap_or_default(),
            valid_from: args.valid_from,
            near: args.on_near_duplicate.unwrap_or(config.on_near_duplicate),
            given,
            owner: args.owner,
            ready: Arc::default(),
        })
    }
}

/// Splits `text` into chunks of about `size` bytes, each ending at a sentence
/// end, a line end or a space where one is in its last half.
pub fn chunk(text: &str, size: usize) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.len() <= size {
            chunks.push(rest.to_owned());
            break;
        }
        let mut cut = size;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let window = &rest[..cut];
        let half = cut / 2;
        let end = [". ", "! ", "? ", "\n"]
            .iter()
            .filter_map(|p| window.rfind(p).map(|at| at + p.len()))
            .filter(|at| *at > half)
            .max()
            .or_else(|| window.rfind(char::is_whitespace).filter(|at| *at > half))
            .unwrap_or(cut)
            .max(1);
        let mut end = end;
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        chunks.push(rest[..end].trim().to_owned());
        rest = rest[end..].trim_start();
    }
    chunks.retain(|c| !c.is_empty());
    chunks
}

impl EffectOp for Add {
    fn ready(&self, agent: AgentId) -> Option<Pending<'static, ()>> {
        if self.ready.get().is_some() {
            return None;
        }
        let agent = self.owner.unwrap_or(agent);
        let memories = self.memories.clone();
        let chunks = self.chunks.clone();
        let given = self.given.clone();
        let near = self.near;
        let cell = self.ready.clone();
        Some(Box::pin(async move {
            // A recovered add runs before the index is built: it waits for it.
            memories.started().await;
            let vectors = match given {
                Some(vector) => vec![vector],
                None => memories.0.embedder.embed(chunks).await?,
            };
            let mut embedded = Vec::with_capacity(vectors.len());
            for vector in vectors {
                let near = match near {
                    NearDuplicate::Keep => None,
                    NearDuplicate::Merge => memories
                        .nearest(agent, &vector, 1, None)
                        .await?
                        .into_iter()
                        .find(|m| m.similarity >= memories.0.config.near_duplicate)
                        .map(|m| (m.id, m.similarity)),
                };
                embedded.push(Embedded { vector, near });
            }
            let _ = cell.set(embedded);
            Ok(())
        }))
    }

    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let embedded = self
            .ready
            .get()
            .ok_or_else(|| Error::internal("memory.add was staged before it was embedded"))?;
        let agent = self.owner.as_ref().unwrap_or(staging.agent);
        let model = self.memories.0.embedder.model().to_owned();
        let valid_from = self.valid_from.unwrap_or(staging.at);
        tx.all_or_nothing(|tx| {
            let mut outcomes = Vec::with_capacity(self.chunks.len());
            let mut superseded = Vec::new();
            let count = self.chunks.len() as u32;
            for (index, (text, embedded)) in self.chunks.iter().zip(embedded).enumerate() {
                let hash = text_hash(text);
                let exact = valid_memory(tx, agent, tx.read(MEMORY_HASHES, &hash_key(agent, &hash))?)?;
                let near = match (&exact, embedded.near) {
                    (None, Some((near, similarity))) => {
                        valid_memory(tx, agent, Some(near.0.to_be_bytes().to_vec()))?.map(|memory| (memory, similarity))
                    }
                    _ => None,
                };
                let merged = exact
                    .map(|memory| (memory, "duplicate", None))
                    .or(near.map(|(memory, similarity)| (memory, "near_duplicate", Some(similarity))));
                let id = match &merged {
                    Some((into, _, _)) => into.id,
                    None => self.new_id(tx, agent)?,
                };
                if index == 0 {
                    superseded = self.supersede(tx, agent, id, valid_from)?;
                }
                // The first chunk carries the subject, merged or new.
                let subject = self.subject.clone().filter(|_| index == 0);
                if let Some((mut into, how, similarity)) = merged {
                    into.merged += 1;
                    into.subject = into.subject.or(subject);
                    tx.put(MEMORY_ITEMS, memory_key(agent, id), into.encode());
                    let mut outcome = json!({ "id": id, "merged": how });
                    if let Some(similarity) = similarity {
                        outcome["similarity"] = json!(similarity);
                    }
                    outcomes.push(outcome);
                    continue;
                }
                let memory = Memory {
                    id,
                    text: text.clone(),
                    model: model.clone(),
                    hash: hash.clone(),
                    metadata: self.metadata.clone(),
                    subject,
                    created: staging.at,
                    valid_from,
                    valid_to: None,
                    superseded_by: None,
                    merged: 0,
                    chunk: (count > 1).then_some((index as u32, count)),
                    labels: staging.labels.to_vec(),
                };
                tx.put(MEMORY_ITEMS, memory_key(agent, id), memory.encode());
                tx.put(MEMORY_VECTORS, memory_key(agent, id), encode_vector(&embedded.vector));
                tx.put(MEMORY_HASHES, hash_key(agent, &hash), id.0.to_be_bytes().to_vec());
                outcomes.push(json!({ "id": id, "merged": null }));
            }
            let first = outcomes.first().cloned().unwrap_or(Value::Null);
            let mut result = json!({
                "id": first["id"],
                "merged": first["merged"],
                "memories": outcomes,
                "superseded": superseded,
                "model": model,
            });
            if let Some(similarity) = first.get("similarity") {
                result["similarity"] = similarity.clone();
            }
            if let Some(owner) = self.owner {
                result["agent"] = json!(owner);
            }
            Ok(result)
        })
    }
}

impl Add {
    /// A random id no memory has: not the agent's (in the group) nor any other
    /// agent's (in the catalog, where ids must be unique across agents).
    fn new_id(&self, tx: &GroupTx<'_>, agent: &AgentId) -> Result<MemoryId> {
        loop {
            let id = MemoryId::random();
            let taken = self.memories.0.catalog.read().entries.contains_key(&id.0)
                || tx.read(MEMORY_ITEMS, &memory_key(agent, id))?.is_some();
            if !taken {
                return Ok(id);
            }
        }
    }

    /// Ends the validity of what `by` supersedes: the memories named in
    /// `supersedes` (each must be valid) and the one that held for the subject;
    /// `by` becomes the subject's holder. Returns the superseded ids.
    fn supersede(
        &self,
        tx: &mut GroupTx<'_>,
        agent: &AgentId,
        by: MemoryId,
        valid_from: DateTime<Utc>,
    ) -> Result<Vec<MemoryId>> {
        let mut olds = Vec::new();
        for old in &self.supersedes {
            match valid_memory(tx, agent, Some(old.0.to_be_bytes().to_vec()))? {
                Some(memory) => olds.push(memory),
                None => {
                    return Err(Error::new(
                        ErrorCode::NotFound,
                        format!("memory {old} is not a valid memory of the agent: it cannot be superseded"),
                    ));
                }
            }
        }
        if let Some(subject) = &self.subject {
            let holder = tx.read(MEMORY_SUBJECTS, &subject_key(agent, subject))?;
            if let Some(memory) = valid_memory(tx, agent, holder)?
                && !olds.iter().any(|o| o.id == memory.id)
            {
                olds.push(memory);
            }
        }
        olds.retain(|old| old.id != by);
        let mut superseded = Vec::with_capacity(olds.len());
        for mut old in olds {
            let hash_points_here =
                tx.read(MEMORY_HASHES, &hash_key(agent, &old.hash))? == Some(old.id.0.to_be_bytes().to_vec());
            if hash_points_here {
                tx.remove(MEMORY_HASHES, hash_key(agent, &old.hash));
            }
            old.valid_to = Some(valid_from.max(old.valid_from));
            old.superseded_by = Some(by);
            tx.put(MEMORY_ITEMS, memory_key(agent, old.id), old.encode());
            superseded.push(old.id);
        }
        if let Some(subject) = &self.subject {
            tx.put(
                MEMORY_SUBJECTS,
                subject_key(agent, subject),
                by.0.to_be_bytes().to_vec(),
            );
        }
        Ok(superseded)
    }
}

/// The agent's memory with the id in `id_bytes`, if it exists and is valid.
fn valid_memory(tx: &GroupTx<'_>, agent: &AgentId, id_bytes: Option<Vec<u8>>) -> Result<Option<Memory>> {
    let Some(id) = id_bytes.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
        return Ok(None);
    };
    let Some(bytes) = tx.read(MEMORY_ITEMS, &memory_key(agent, MemoryId(id)))? else {
        return Ok(None);
    };
    let memory = Memory::decode(&bytes)?;
    Ok(memory.valid_to.is_none().then_some(memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_end_at_sentences_where_they_can() {
        let text = "One sentence here. Another sentence there. A third one follows now.";
        let chunks = chunk(text, 30);
        assert_eq!(chunks[0], "One sentence here.");
        assert!(chunks.iter().all(|c| c.len() <= 30));
    }

    proptest! {
        #[test]
        fn chunks_keep_every_word_and_fit(text in "\\PC{0,400}", size in 8usize..64) {
            let chunks = chunk(&text, size);
            let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>().join("");
            prop_assert_eq!(words(&chunks.join(" ")), words(&text));
            for c in &chunks {
                // A chunk may pass the size only to finish a character.
                prop_assert!(c.len() <= size + 3, "{} > {}", c.len(), size);
            }
        }
    }
}
