//! Workspace swaps that restores committed. A restore stages the snapshot's
//! files beside the workspace, and records the swap in the store group that
//! imports the agent's data; the files are swapped in once that group is
//! durable (when the op's completion is seen), and a swap a crash left
//! undone is done when the kernel starts. So the files never change for a
//! restore that did not commit, and one that committed always gets them.

use crate::{Snapshots, files};
use bbx_core::{AgentId, Error, OpId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// agent (16) + op (16) → [`Swap`] as JSON.
pub const SNAPSHOT_SWAPS: KeyspaceDef = KeyspaceDef {
    id: 45,
    name: "snapshot_swaps",
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Swap {
    pub workspace: PathBuf,
    pub staging: PathBuf,
}

fn key(agent: &AgentId, op: &OpId) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.extend_from_slice(op.as_bytes());
    key
}

/// Records the swap in the restore's group.
pub fn stage(tx: &mut GroupTx<'_>, agent: &AgentId, op: &OpId, swap: &Swap) -> Result<()> {
    let value = serde_json::to_vec(swap).map_err(|e| Error::internal(e.to_string()))?;
    tx.put(SNAPSHOT_SWAPS, key(agent, op), value);
    Ok(())
}

/// The swap is done.
#[derive(Debug)]
struct Done(Vec<u8>);

impl Staged for Done {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.remove(SNAPSHOT_SWAPS, self.0.clone());
        Ok(Applied::Done)
    }
}

fn pending(store: &Store, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Swap)>> {
    store
        .view()
        .prefix(store.keyspace(SNAPSHOT_SWAPS), prefix)
        .map(|kv| {
            let (key, value) = kv.into_inner().map_err(|e| storage_error("read swaps", e))?;
            let swap = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a workspace swap record is damaged: {e}")))?;
            Ok((key.to_vec(), swap))
        })
        .collect()
}

impl Snapshots {
    /// Swaps in the files of a restore whose op committed.
    pub(crate) fn finish_swap(&self, agent: &AgentId, op: &OpId) {
        let Ok(ctx) = self.context() else { return };
        self.swap_all(&ctx.store, &key(agent, op));
    }

    /// Every swap recorded under `prefix`, done, and its record removed.
    pub(crate) fn swap_all(&self, store: &std::sync::Arc<Store>, prefix: &[u8]) {
        let swaps = match pending(store, prefix) {
            Ok(swaps) => swaps,
            Err(e) => return tracing::error!(error = %e, "workspace swaps cannot be read"),
        };
        for (key, swap) in swaps {
            // Gone only if it was swapped in before a crash took the record's removal.
            if swap.staging.exists()
                && let Err(e) = files::swap(&swap.workspace, &swap.staging)
            {
                tracing::error!(error = %e, workspace = %swap.workspace.display(), "a restored workspace could not be swapped in; the next start tries again");
                continue;
            }
            let store = store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.write(Done(key)).await {
                    tracing::warn!(error = %e, "a done workspace swap stays recorded (swapped again at the next start, harmlessly)");
                }
            });
        }
    }
}
