//! StateSnapshots: an agent saved whole, and put back.
//!
//! `bbx-snapshot` owns snapshots of agents and guarantees:
//! - **One moment.** A snapshot holds every component's export of the agent
//!   (state, context, ...) read in one view of the store, at one journal
//!   position, taken while the agent's ops go on; with them its workspace
//!   files, its quota limits and its record.
//! - **Content-addressed and incremental.** Each part is a stream cut into
//!   content-defined chunks ([`chunk`]), named by BLAKE3 and stored with zstd in
//!   packs ([`pack`]): a snapshot writes only chunks no store has, so a small
//!   change to a large agent writes little. A manifest names each part's chunks.
//! - **Listed only when whole.** `snapshot.create` writes chunks and manifest to
//!   a quorum of stores before its catalog entry commits with its op's
//!   completion ([`catalog`], [`ops`]).
//! - **Restores are atomic** and never roll back what only goes forward: every
//!   component's part is imported in one store group with the op's completion;
//!   spend, budgets, quota limits, idempotency records and the audit log are
//!   not part of an agent's export and stay as they are.
//! - **Point-in-time recovery** ([`pitr`]): the latest snapshot before a moment
//!   plus the journal's history of store writes up to it, inside a window.
//! - **Replicated and checked** ([`repo`]): each snapshot goes to every
//!   configured store ([`store`]: local directories, Redis) with a write
//!   quorum; every chunk read is checked against its hash, read from another
//!   store when missing or damaged, and repaired where it failed.
//! - **Bounded writer** ([`writer`]): chunking runs beside the uploads with at
//!   most a few packs in memory.
//! - **Retention and garbage collection** ([`gc`]) that a snapshot being taken
//!   cannot lose its chunks to.

pub mod catalog;
pub mod chunk;
mod diff;
mod endpoints;
mod files;
pub mod gc;
pub mod manifest;
pub mod ops;
pub mod pack;
pub mod pitr;
pub mod repo;
pub mod s3;
mod service;
pub mod store;
mod swaps;
mod triggers;
mod views;
pub mod writer;

use bbx_component::{Component, Context, Endpoint, OpKind, Prepared, Submission, Verdict};
use bbx_core::config::{SnapshotStoreConfig, SnapshotsConfig};
use bbx_core::op::Completion;
use bbx_core::{Error, Result};
use bbx_store::KeyspaceDef;
use repo::Repository;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use store::SnapshotStore;

/// StateSnapshots, registered with the kernel as the `snapshot` component.
#[derive(Clone)]
pub struct Snapshots(Arc<Inner>);

pub struct Inner {
    config: SnapshotsConfig,
    /// The default store's directory.
    default_dir: PathBuf,
    journal_dir: PathBuf,
    /// Where the agents' workspaces are (and restores stage theirs).
    workspaces: PathBuf,
    ctx: OnceLock<Context>,
    repo: tokio::sync::OnceCell<Arc<Repository>>,
    /// Held shared by each snapshot being written, exclusive by garbage collection.
    collection: Arc<tokio::sync::RwLock<()>>,
    /// Agents changed since their last automatic snapshot.
    changes: parking_lot::Mutex<triggers::Changes>,
    /// Told once the component has started.
    started: tokio::sync::Notify,
    /// Snapshots are built one at a time: with each paced, what they take of
    /// the cores and the disk stays bounded however many are asked for.
    builds: Arc<tokio::sync::Semaphore>,
}

impl std::ops::Deref for Snapshots {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub const KEYSPACES: &[KeyspaceDef] = &[catalog::SNAPSHOTS, catalog::SNAPSHOT_OWNERS, swaps::SNAPSHOT_SWAPS];

impl Snapshots {
    /// Snapshots kept as `config` says (in `data_dir/snapshots` by default),
    /// recovering to a time from the journal in `journal_dir`, of agents whose
    /// workspaces are in `workspaces`.
    pub fn new(config: &SnapshotsConfig, data_dir: &Path, journal_dir: &Path, workspaces: &Path) -> Self {
        Self(Arc::new(Inner {
            config: config.clone(),
            default_dir: data_dir.join("snapshots"),
            journal_dir: journal_dir.to_owned(),
            workspaces: workspaces.to_owned(),
            ctx: OnceLock::new(),
            repo: tokio::sync::OnceCell::new(),
            collection: Arc::new(tokio::sync::RwLock::new(())),
            changes: Default::default(),
            started: tokio::sync::Notify::new(),
            builds: Arc::new(tokio::sync::Semaphore::new(1)),
        }))
    }

    pub(crate) fn context(&self) -> Result<&Context> {
        self.ctx
            .get()
            .ok_or_else(|| Error::unavailable("snapshots have not started"))
    }

    /// The context once the component has started: the ring recovers ops
    /// (a snapshot a crash cut short) before the components start.
    pub(crate) async fn started(&self) -> Result<&Context> {
        loop {
            let started = self.started.notified();
            if let Ok(ctx) = self.context() {
                return Ok(ctx);
            }
            if tokio::time::timeout(std::time::Duration::from_secs(60), started)
                .await
                .is_err()
            {
                return self.context();
            }
        }
    }

    pub(crate) fn collection_lock(&self) -> Arc<tokio::sync::RwLock<()>> {
        self.collection.clone()
    }

    pub(crate) fn chunk_settings(&self) -> writer::ChunkSettings {
        writer::ChunkSettings {
            avg_bytes: self.config.chunk_bytes,
            zstd_level: self.config.zstd_level,
            bytes_per_sec: u64::from(self.config.max_mb_per_sec) * 1_000_000,
        }
    }

    /// The stores, connected on first use (a store that is down then is
    /// read around, and its writes fail until it is back).
    pub async fn repo(&self) -> Result<Arc<Repository>> {
        self.repo
            .get_or_try_init(|| async {
                let mut stores: Vec<Box<dyn SnapshotStore>> = Vec::new();
                if self.config.stores.is_empty() {
                    stores.push(Box::new(Arc::new(store::LocalDir::new(&self.default_dir))));
                }
                for configured in &self.config.stores {
                    stores.push(match configured {
                        SnapshotStoreConfig::Local { path } => Box::new(Arc::new(store::LocalDir::new(path))),
                        SnapshotStoreConfig::Redis { url, prefix } => Box::new(store::RedisStore::new(url, prefix)?),
                        SnapshotStoreConfig::S3(bucket) => {
                            Box::new(bbx_objects::S3Store::new(bucket, "bbx-snapshots", "snapshots.stores")?)
                        }
                    });
                }
                let quorum = self.config.quorum(stores.len());
                Ok(Arc::new(Repository::new(stores, quorum)))
            })
            .await
            .cloned()
    }

    /// Applies retention to the agent's snapshots (one was just listed), in
    /// the background.
    fn retain_later(&self, agent: bbx_core::AgentId) {
        let Ok(ctx) = self.context() else { return };
        if self.config.retention.keeps_all() {
            return;
        }
        let me = self.clone();
        ctx.tasks.spawn(async move {
            match me.apply_retention(&agent).await {
                Ok(0) => {}
                Ok(_) => me.collect_later(),
                Err(e) => tracing::warn!(error = %e, %agent, "snapshot retention failed"),
            }
        });
    }

    /// Removes what no listed snapshot needs, in the background.
    fn collect_later(&self) {
        let Ok(ctx) = self.context() else { return };
        let me = self.clone();
        ctx.tasks.spawn(async move {
            match me.collect_garbage().await {
                Ok(collected) => tracing::debug!(?collected, "snapshot garbage collected"),
                Err(e) => tracing::warn!(error = %e, "snapshot garbage collection failed"),
            }
        });
    }
}

impl Component for Snapshots {
    fn name(&self) -> &'static str {
        "snapshot"
    }

    fn kinds(&self) -> &'static [OpKind] {
        ops::KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        ops::args_schema(kind)
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        ops::prepare(self, kind, args)
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        KEYSPACES
    }

    fn checks_ops(&self) -> bool {
        true
    }

    /// Restoring a snapshot reads its agent's data: the caller must be one
    /// who may read that agent (its tenant, its confinement, the policies),
    /// and only a listed snapshot is restored. An op a flow policy labelled
    /// [`bbx_component::SNAPSHOT_BEFORE`] has its agent snapshotted first.
    fn check(&self, submission: &Submission<'_>, labels: &mut Vec<String>) -> Result<Verdict> {
        if submission.op.kind == ops::RESTORE
            && let Some(id) = submission.op.args.get("snapshot").and_then(Value::as_str)
            && let Ok(id) = uuid::Uuid::parse_str(id)
        {
            let ctx = self.context()?;
            let summary = catalog::get(&ctx.store, &id)?.ok_or_else(|| Error::not_found("snapshot", id))?;
            ctx.submitter
                .may_read(submission.caller, &summary.agent, ops::RESTORE)
                .map_err(|_| Error::not_found("snapshot", id))?;
        }
        if labels.iter().any(|label| label == bbx_component::SNAPSHOT_BEFORE) {
            self.snapshot_before(submission.op.agent)?;
        }
        Ok(Verdict::Allow)
    }

    fn observes(&self) -> bool {
        true
    }

    fn completed(&self, completion: &Arc<Completion>) {
        if completion.kind == ops::CREATE {
            self.changes.lock().taken(&completion.agent);
        }
        if completion.status != bbx_core::op::CompletionStatus::Ok {
            return;
        }
        self.count_change(completion);
        let Ok(ctx) = self.context() else { return };
        match completion.kind.as_ref() {
            ops::RESTORE | ops::PITR => {
                self.finish_swap(&completion.agent, &completion.op_id);
                let parts = ctx
                    .agents
                    .parts()
                    .into_iter()
                    .map(|p| (p.to_owned(), Vec::new()))
                    .collect();
                ctx.agents.imported(&bbx_component::AgentData {
                    agent: completion.agent,
                    parts,
                });
            }
            ops::CREATE => self.retain_later(completion.agent),
            ops::DELETE => self.collect_later(),
            _ => {}
        }
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        *self.changes.lock() = triggers::Changes::new(&ctx.kinds);
        let _ = self.ctx.set(ctx.clone());
        // Swaps of committed restores a crash left undone, then (listed before
        // any restore can start: they wait for this start) what restores a
        // crash cut short left behind.
        self.swap_all(&ctx.store, &[]);
        files::remove_leftovers(&self.workspaces);
        self.started.notify_waiters();
        self.schedule();
        Ok(())
    }

    fn agent_deleted(&self, ctx: &Context, agent: bbx_core::AgentId) {
        self.changes.lock().forget(&agent);
        let Ok(listed) = catalog::list(&ctx.store, &agent) else {
            return;
        };
        if listed.is_empty() {
            return;
        }
        let me = self.clone();
        let store = ctx.store.clone();
        ctx.tasks.spawn(async move {
            let unlist = catalog::Unlist(listed.iter().map(|s| (s.agent, s.id)).collect());
            match store.write(unlist).await {
                Ok(_) => me.collect_later(),
                Err(e) => tracing::warn!(error = %e, %agent, "a deleted agent's snapshots stay listed"),
            }
        });
    }

    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        endpoints::endpoints(self)
    }
}
