//! COLD in object storage (`[context.cold_objects]`, an S3 bucket): a block
//! that moves to COLD is put in the bucket first, and the store keeps a stub
//! in its place ([`codec::remote_stub`]: the block's checksum and the
//! object's name), written in the same write as the item's record, so the
//! move is all or nothing and the local disk holds none of COLD's bytes.
//!
//! Reads fetch the object (many at once, concurrently) and check it is the
//! agent's and carries the stub's content checksum: an object that is
//! missing or differs is an error, never data, and the block's own checksum
//! is checked again when it is decoded. An export (snapshots, forks) carries
//! the fetched blocks, so it does not depend on the bucket. A deleted item's
//! object, and one a demotion replaced, are removed as chores
//! ([`crate::chores`]); a deleted agent's, on a task.

use crate::Contexts;
use crate::codec;
use crate::item::ItemId;
use bbx_core::{AgentId, Error, Result};
use bbx_objects::S3Store;
use std::sync::Arc;

/// What a bucket's objects go under when the configuration names no prefix.
pub(crate) const DEFAULT_PREFIX: &str = "bbx-context";

/// Blocks fetched from the bucket at once.
const FETCHES_AT_ONCE: usize = 16;

impl Contexts {
    fn objects(&self, name: &str) -> Result<&Arc<S3Store>> {
        self.0.cold_objects.as_ref().ok_or_else(|| {
            Error::unavailable(format!(
                "a COLD context block is in object storage ({name}), and [context.cold_objects] is not configured"
            ))
        })
    }

    /// Waits for `work` on the kernel's runtime, from a thread that may
    /// block: a blocking one, one of the kernel's own, or a worker of the
    /// multi-threaded runtime (which steps aside meanwhile).
    fn wait_for<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let runtime = self
            .0
            .runtime
            .get()
            .ok_or_else(|| Error::unavailable("the context component has not started"))?;
        if let Ok(here) = tokio::runtime::Handle::try_current()
            && here.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            return Err(Error::unavailable(
                "reading from object storage needs the multi-threaded runtime",
            ));
        }
        tokio::task::block_in_place(|| runtime.block_on(work))
    }

    /// The agent's `block` as stored, or, for a stub, the block it stands
    /// for, fetched and checked.
    pub(crate) fn resolve(&self, agent: &AgentId, block: Vec<u8>) -> Result<Vec<u8>> {
        self.resolve_all(agent, vec![block])
            .pop()
            .unwrap_or_else(|| Err(Error::internal("no block")))
    }

    /// [`Self::resolve`] for many blocks, the stubs fetched concurrently.
    pub(crate) fn resolve_all(&self, agent: &AgentId, blocks: Vec<Vec<u8>>) -> Vec<Result<Vec<u8>>> {
        use futures::StreamExt;
        if blocks.iter().all(|b| codec::remote_name(b).is_none()) {
            return blocks.into_iter().map(Ok).collect();
        }
        let count = blocks.len();
        let fetches = blocks.into_iter().map(|block| async move {
            match codec::remote_name(&block) {
                None => Ok(block),
                Some(name) => self.fetch(agent, name, &block).await,
            }
        });
        let fetched = self.wait_for(async {
            Ok(futures::stream::iter(fetches)
                .buffered(FETCHES_AT_ONCE)
                .collect::<Vec<_>>()
                .await)
        });
        match fetched {
            Ok(all) => all,
            // Every block is answered: none could be fetched.
            Err(e) => (0..count).map(|_| Err(Error::new(e.code, e.message.clone()))).collect(),
        }
    }

    async fn fetch(&self, agent: &AgentId, name: &str, stub: &[u8]) -> Result<Vec<u8>> {
        let objects = self.objects(name)?;
        if !name.starts_with(&format!("{agent}/")) {
            return Err(Error::internal(format!(
                "a COLD block of agent {agent} names another's object ({name}); it is not served"
            )));
        }
        let fetched = objects.get(name).await?.ok_or_else(|| {
            Error::internal(format!(
                "the COLD block {name} is missing from {}; it is not served",
                objects.describe()
            ))
        })?;
        if codec::remote_name(&fetched).is_some() || codec::content_crc(&fetched) != codec::content_crc(stub) {
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

    /// Removes one of the agent's objects (a chore).
    pub(crate) async fn remove_object(&self, agent: &AgentId, name: &str) -> Result<()> {
        let Some(objects) = &self.0.cold_objects else {
            return Err(Error::invalid_field(
                "context.cold_objects",
                format!("object {name} stays: no bucket is configured"),
            ));
        };
        if !name.starts_with(&format!("{agent}/")) {
            return Err(Error::invalid_field("object", format!("{name} is not agent {agent}'s")));
        }
        objects.delete(name).await
    }

    /// Removes a deleted agent's objects, on a task (what a crash or an
    /// outage leaves stays in the bucket).
    pub(crate) fn remove_agent_objects(&self, agent: AgentId) {
        let (Some(objects), Ok(ctx)) = (self.0.cold_objects.clone(), self.context()) else {
            return;
        };
        ctx.tasks.spawn(async move {
            let removed = async {
                for (name, _) in objects.list(&agent.to_string(), "").await? {
                    objects.delete(&name).await?;
                }
                Ok::<_, Error>(())
            };
            if let Err(e) = removed.await {
                tracing::warn!(%agent, error = %e, "a deleted agent's COLD objects could not be removed");
            }
        });
    }
}
