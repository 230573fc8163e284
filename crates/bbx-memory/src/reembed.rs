//! Re-embedding after a change of model: memories embedded by another model are
//! kept out of vector search (vectors of two models are never compared) and
//! embedded again in the background, a batch at a time; each is written only
//! if it still exists and still holds the old model's vector.

use crate::Memories;
use crate::record::{Memory, MemoryId, encode_vector, memory_key};
use crate::{MEMORY_ITEMS, MEMORY_VECTORS};
use bbx_core::{AgentId, Result};
use bbx_store::{Applied, GroupTx, Staged};
use std::time::Duration;

/// Memories embedded again per batch.
const BATCH: usize = 64;

/// New vectors for memories, each written if the memory is as it was read.
#[derive(Debug)]
struct Reembedded {
    model: String,
    memories: Vec<(AgentId, Memory, Vec<f32>)>,
}

impl Staged for Reembedded {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.all_or_nothing(|tx| {
            for (agent, read, vector) in &self.memories {
                let key = memory_key(agent, read.id);
                let Some(bytes) = tx.read(MEMORY_ITEMS, &key)? else {
                    continue;
                };
                let mut now = Memory::decode(&bytes)?;
                if now.model != read.model {
                    continue;
                }
                now.model = self.model.clone();
                tx.put(MEMORY_ITEMS, key.clone(), now.encode());
                tx.put(MEMORY_VECTORS, key, encode_vector(vector));
            }
            Ok(Applied::Done)
        })
    }
}

impl Memories {
    /// Embeds every memory of another model again, until none is left or the
    /// kernel stops; a failure (the model missing, say) is retried a minute on.
    pub(crate) async fn reembed_all(&self) {
        loop {
            match self.reembed_batch().await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "memories of another model could not be embedded again; retrying in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }

    /// One batch; how many memories it embedded.
    async fn reembed_batch(&self) -> Result<usize> {
        let stale: Vec<(AgentId, MemoryId)> = {
            let catalog = self.0.catalog.read();
            catalog
                .entries
                .iter()
                .filter(|(_, e)| !e.current_model)
                .take(BATCH)
                .map(|(id, e)| (e.agent, MemoryId(*id)))
                .collect()
        };
        if stale.is_empty() {
            return Ok(0);
        }
        let mut memories = Vec::with_capacity(stale.len());
        for (agent, id) in &stale {
            if let Some(memory) = self.read(agent, *id)? {
                memories.push((*agent, memory));
            }
        }
        let texts = memories.iter().map(|(_, m)| m.text.clone()).collect();
        let vectors = self.0.embedder.embed(texts).await?;
        let write = Reembedded {
            model: self.0.embedder.model().to_owned(),
            memories: memories
                .into_iter()
                .zip(vectors)
                .map(|((agent, memory), vector)| (agent, memory, vector))
                .collect(),
        };
        self.store()?.write(write).await?;
        // The catalog from what the store now holds: re-embedded, or gone since.
        for (agent, id) in &stale {
            match self.read(agent, *id)? {
                Some(_) => self.learn(*agent, *id)?,
                None => self.unlearn(&[*id])?,
            }
        }
        Ok(stale.len())
    }
}
