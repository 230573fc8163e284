//! The `snapshot.*` ops. Each is an effect that commits with its op's
//! completion, after the work that must not hold up the store's committer
//! ran on a task of its own ([`EffectOp::ready`]):
//!
//! - `snapshot.create` writes the snapshot's chunks and manifest in `ready`;
//!   its catalog entry commits with the completion, so a snapshot cut short by
//!   a crash is never listed (recovery takes it again, its chunks mostly there);
//! - `snapshot.restore` and `snapshot.pitr` read the snapshot (and replay the
//!   journal's history) and stage the workspace's files in `ready`; the import
//!   of every component's part commits with the completion, in one group, with
//!   the record of the workspace swap that follows it ([`crate::swaps`]). Ops before it have
//!   completed on the data it replaces; ops after it see the restored data;
//!   none sees half of each;
//! - `snapshot.delete` unlists the snapshot; its chunks go at the next
//!   garbage collection.

use crate::Snapshots;
use crate::catalog::{self, Summary};
use crate::files;
use crate::service::Restorable;
use bbx_component::{EffectOp, OpKind, Pending, Prepared, Staging, parse_args};
use bbx_core::op::Effects;
use bbx_core::{AgentId, Error, Result};
use bbx_store::GroupTx;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

pub const CREATE: &str = "snapshot.create";
pub const RESTORE: &str = "snapshot.restore";
pub const PITR: &str = "snapshot.pitr";
pub const DELETE: &str = "snapshot.delete";

pub const KINDS: &[OpKind] = &[
    OpKind {
        name: CREATE,
        effects: Effects::Kernel,
    },
    OpKind {
        name: RESTORE,
        effects: Effects::Kernel,
    },
    OpKind {
        name: PITR,
        effects: Effects::Kernel,
    },
    OpKind {
        name: DELETE,
        effects: Effects::Kernel,
    },
];

const TRIGGERS: &[&str] = &["manual", "schedule", "every_ops", "policy"];

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// What takes it: manual (the default), schedule, every_ops or policy.
    #[serde(default)]
    pub trigger: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArgs {
    /// The snapshot's id.
    pub snapshot: Uuid,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PitrArgs {
    /// The moment to recover to (RFC 3339), inside the recovery window.
    pub at: DateTime<Utc>,
}

pub fn args_schema(kind: &str) -> Option<Value> {
    let schema = match kind {
        CREATE => schemars::schema_for!(CreateArgs),
        RESTORE | DELETE => schemars::schema_for!(SnapshotArgs),
        PITR => schemars::schema_for!(PitrArgs),
        _ => return None,
    };
    serde_json::to_value(schema).ok()
}

pub fn prepare(snapshots: &Snapshots, kind: &str, args: &Value) -> Result<Prepared> {
    let op: Arc<dyn EffectOp> = match kind {
        CREATE => {
            let args: CreateArgs = parse_args(kind, args)?;
            let trigger = args.trigger.unwrap_or_else(|| "manual".to_owned());
            if !TRIGGERS.contains(&trigger.as_str()) {
                return Err(Error::invalid_field(
                    "trigger",
                    format!("trigger must be one of {}", TRIGGERS.join(", ")),
                ));
            }
            Arc::new(Create {
                snapshots: snapshots.clone(),
                id: Uuid::now_v7(),
                trigger,
                built: Default::default(),
            })
        }
        RESTORE => {
            let args: SnapshotArgs = parse_args(kind, args)?;
            Arc::new(Restore::new(snapshots, Source::Snapshot(args.snapshot)))
        }
        PITR => {
            let args: PitrArgs = parse_args(kind, args)?;
            Arc::new(Restore::new(snapshots, Source::At(args.at)))
        }
        DELETE => {
            let args: SnapshotArgs = parse_args(kind, args)?;
            Arc::new(Delete {
                snapshot: args.snapshot,
            })
        }
        _ => return Err(Error::invalid_field("kind", format!("no snapshot op is named {kind}"))),
    };
    Ok(Prepared::Effect(op))
}

type Built = Arc<parking_lot::Mutex<Option<(Summary, tokio::sync::OwnedRwLockReadGuard<()>)>>>;

struct Create {
    snapshots: Snapshots,
    id: Uuid,
    trigger: String,
    /// The snapshot as written, and the hold that keeps garbage collection
    /// off its chunks until it is listed (or the op is dropped).
    built: Built,
}

impl std::fmt::Debug for Create {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Create").field("id", &self.id).finish()
    }
}

impl EffectOp for Create {
    fn ready(&self, agent: AgentId) -> Option<Pending<'static, ()>> {
        let (snapshots, id, trigger, built) = (
            self.snapshots.clone(),
            self.id,
            self.trigger.clone(),
            self.built.clone(),
        );
        Some(Box::pin(async move {
            // A hold of an earlier attempt goes first: waiting for a second one
            // behind a waiting collection would never end.
            drop(built.lock().take());
            snapshots.started().await?;
            let hold = snapshots.collection_lock().read_owned().await;
            let summary = snapshots.build(agent, id, &trigger).await?;
            *built.lock() = Some((summary, hold));
            Ok(())
        }))
    }

    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let built = self.built.lock();
        let (summary, _) = built
            .as_ref()
            .ok_or_else(|| Error::internal("a snapshot was staged before it was written"))?;
        if summary.agent != *staging.agent {
            return Err(Error::internal("a snapshot was staged for another agent"));
        }
        catalog::stage_put(tx, summary)?;
        Ok(crate::views::summary(summary))
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Snapshot(Uuid),
    At(DateTime<Utc>),
}

/// A restore read and staged, waiting to commit.
struct Staged {
    import: Box<dyn bbx_store::Staged>,
    /// The workspace and where its files were staged.
    files: Option<(PathBuf, PathBuf, usize)>,
    counts: Vec<(String, usize)>,
    /// Its swap is recorded in a group: the staged files are the swap's now.
    handed_over: bool,
}

/// A restore that never committed leaves no staged copy of the workspace.
impl Drop for Staged {
    fn drop(&mut self) {
        if let Some((_, staging, _)) = &self.files
            && !self.handed_over
            && staging.exists()
        {
            let _ = std::fs::remove_dir_all(staging);
        }
    }
}

struct Restore {
    snapshots: Snapshots,
    source: Source,
    staged: Arc<parking_lot::Mutex<Option<Staged>>>,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore").field("source", &self.source).finish()
    }
}

impl Restore {
    fn new(snapshots: &Snapshots, source: Source) -> Self {
        Self {
            snapshots: snapshots.clone(),
            source,
            staged: Default::default(),
        }
    }
}

impl EffectOp for Restore {
    fn ready(&self, agent: AgentId) -> Option<Pending<'static, ()>> {
        let (snapshots, source, staged) = (self.snapshots.clone(), self.source, self.staged.clone());
        Some(Box::pin(async move {
            let host = snapshots.started().await?.agents.clone();
            let tenant = host.agent(&agent)?.tenant;
            let Restorable { data, files } = match source {
                Source::Snapshot(id) => snapshots.restorable(&id, agent, &tenant).await?,
                Source::At(at) => snapshots.at_time(agent, at).await?,
            };
            let files = match files {
                Some(records) => {
                    let workspace = host.workspace(&agent)?;
                    let staging = files::staging_dir(&workspace, &Uuid::new_v4().simple().to_string());
                    let count = records.len();
                    let (w, s) = (workspace.clone(), staging.clone());
                    tokio::task::spawn_blocking(move || files::stage(&w, &s, &records))
                        .await
                        .map_err(|e| Error::internal(format!("staging a workspace failed: {e}")))??;
                    Some((workspace, staging, count))
                }
                None => None,
            };
            let counts = data
                .parts
                .iter()
                .map(|(name, records)| (name.clone(), records.len()))
                .collect();
            let import = host.import(data)?;
            // An earlier attempt's staged files go as it is dropped.
            drop(staged.lock().replace(Staged {
                import,
                files,
                counts,
                handed_over: false,
            }));
            Ok(())
        }))
    }

    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut staged = self.staged.lock();
        let restore = staged
            .as_mut()
            .ok_or_else(|| Error::internal("a restore was staged before it was read"))?;
        // The files are swapped in once this group is durable (see `swaps`).
        let files = tx.all_or_nothing(|tx| {
            restore.import.stage(tx)?;
            match &restore.files {
                Some((workspace, staging_dir, count)) => {
                    let swap = crate::swaps::Swap {
                        workspace: workspace.clone(),
                        staging: staging_dir.clone(),
                    };
                    crate::swaps::stage(tx, staging.agent, &staging.op_id, &swap)?;
                    Ok(json!(count))
                }
                None => Ok(Value::Null),
            }
        })?;
        restore.handed_over = restore.files.is_some();
        let parts: serde_json::Map<String, Value> = restore
            .counts
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(name, count)| (name.clone(), json!(count)))
            .collect();
        let mut result = json!({ "agent": staging.agent, "parts": parts, "files": files });
        match self.source {
            Source::Snapshot(id) => result["snapshot"] = json!(id),
            Source::At(at) => result["at"] = json!(at),
        }
        Ok(result)
    }
}

#[derive(Debug)]
struct Delete {
    snapshot: Uuid,
}

impl EffectOp for Delete {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut key = staging.agent.as_bytes().to_vec();
        key.extend_from_slice(self.snapshot.as_bytes());
        if tx.read(catalog::SNAPSHOTS, &key)?.is_none() {
            return Err(Error::not_found("snapshot", self.snapshot));
        }
        catalog::stage_remove(tx, staging.agent, &self.snapshot);
        Ok(json!({ "deleted": self.snapshot }))
    }
}
