//! COLD in object storage (`[context.cold_objects]`, an S3 bucket): a block
//! that moves to COLD is put in the bucket first, and the store keeps a stub
//! in its place ([`codec::remote_stub`]: the block's checksum and the
//! object's name), written in the same write as the item's record, so the
//! move is all or nothing and the local disk holds none of COLD's bytes.
//!
//! Reads fetch the object and check it against the stub's checksum: an
//! object that is missing or differs is an error, never data. An export
//! (snapshots, forks) carries the fetched blocks, so it does not depend on
//! the bucket; deleting an item or an agent removes its objects.

use crate::Contexts;
use crate::codec;
use crate::item::ItemId;
use bbx_core::{AgentId, Error, Result};
use bbx_objects::S3Store;
use std::sync::Arc;

/// What a bucket's objects go under when the configuration names no prefix.
pub(crate) const DEFAULT_PREFIX: &str = "bbx-context";

impl Contexts {
    fn objects(&self, name: &str) -> Result<&Arc<S3Store>> {
        self.0.cold_objects.as_ref().ok_or_else(|| {
            Error::unavailable(format!(
                "a COLD context block is in object storage ({name}), and [context.cold_objects] is not configured"
            ))
        })
    }

    /// Waits for `work` on the kernel's runtime, from any thread: a blocking
    /// one, a worker (which steps aside meanwhile), or one of the kernel's own.
    fn wait_for<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let runtime = self
            .0
            .runtime
            .get()
            .ok_or_else(|| Error::unavailable("the context component has not started"))?;
        tokio::task::block_in_place(|| runtime.block_on(work))
    }

    /// `block` as stored, or, for a stub, the block it stands for, fetched
    /// and checked.
    pub(crate) fn resolve(&self, block: Vec<u8>) -> Result<Vec<u8>> {
        let Some(name) = codec::remote_name(&block) else {
            return Ok(block);
        };
        let objects = self.objects(name)?;
        let fetched = self.wait_for(objects.get(name))?.ok_or_else(|| {
            Error::internal(format!(
                "the COLD block {name} is missing from {}; it is not served",
                objects.describe()
            ))
        })?;
        if codec::remote_name(&fetched).is_some() || codec::content_crc(&fetched) != codec::content_crc(&block) {
            return Err(Error::internal(format!(
                "the COLD block {name} in {} is not the one stored; it is not served",
                objects.describe()
            )));
        }
        Ok(fetched.to_vec())
    }

    /// Whether COLD blocks go to object storage.
    pub(crate) fn offloads(&self) -> bool {
        self.0.cold_objects.is_some()
    }

    /// Puts a COLD `block` of the agent's item in the bucket; the stub the
    /// store keeps instead.
    pub(crate) async fn offload(&self, agent: &AgentId, id: ItemId, block: &[u8]) -> Result<Vec<u8>> {
        let Some(objects) = &self.0.cold_objects else {
            return Ok(block.to_vec());
        };
        // A name of its own each time: an import may bring another item
        // under the same id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "{agent}/{id}-{:08x}-{nanos:x}",
            codec::content_crc(block).unwrap_or_default()
        );
        objects.put(&name, bytes::Bytes::copy_from_slice(block)).await?;
        Ok(codec::remote_stub(block, &name))
    }

    /// Removes the objects of the agent's items `ids` (all its items for
    /// `None`), on a task.
    pub(crate) fn remove_objects(&self, agent: AgentId, ids: Option<Vec<ItemId>>) {
        let (Some(objects), Ok(ctx)) = (self.0.cold_objects.clone(), self.context()) else {
            return;
        };
        ctx.tasks.spawn(async move {
            let starts: Vec<String> = match ids {
                Some(ids) => ids.iter().map(|id| format!("{id}-")).collect(),
                None => vec![String::new()],
            };
            for start in starts {
                let removed = async {
                    for (name, _) in objects.list(&agent.to_string(), &start).await? {
                        objects.delete(&name).await?;
                    }
                    Ok::<_, Error>(())
                };
                if let Err(e) = removed.await {
                    tracing::warn!(%agent, error = %e, "COLD context objects could not be removed");
                }
            }
        });
    }
}
