//! The snapshots API. What changes an agent (create, restore, recover to a
//! time, delete) is an op submitted through the whole pipeline as the caller;
//! what reads answers from the catalog and the stores once the kernel says
//! the caller may read the snapshot's agent. Served as `snapshots.*` (HTTP
//! under `/v1/snapshots`, MCP `snapshots_*`, CLI `bbx snapshot VERB`) and under
//! the report's names, `distributed_snapshots.create|list|restore|pitr`.

use crate::catalog::{self, Summary};
use crate::{Snapshots, diff, ops, views};
use bbx_auth::{Action, Caller};
use bbx_component::Endpoint;
use bbx_core::model::CreateAgent;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, Result};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(300);

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    agent: AgentId,
    /// manual (the default), schedule, every_ops or policy.
    #[serde(default)]
    trigger: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AgentReq {
    agent: AgentId,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SnapshotReq {
    snapshot: Uuid,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DiffReq {
    snapshot: Uuid,
    /// The later snapshot.
    to: Uuid,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    snapshot: Uuid,
    /// The agent to restore into: the snapshot's own when left out, else
    /// another agent of the same tenant.
    #[serde(default)]
    agent: Option<AgentId>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ForkReq {
    snapshot: Uuid,
    /// The new agent's name.
    name: String,
    /// The new agent's labels: the snapshot's agent's when left out.
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PitrReq {
    agent: AgentId,
    /// The moment to recover to (RFC 3339, e.g. 2026-12-07T21:00:00Z).
    at: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Nothing {}

impl Snapshots {
    async fn run_op(&self, caller: &Caller, op: SubmitOp) -> Result<Value> {
        bbx_component::run_op(&*self.context()?.submitter, caller, op, WAIT).await
    }

    /// The snapshot, if the caller may read its agent (else `not_found`, as
    /// for one that does not exist).
    fn readable(&self, caller: &Caller, id: &Uuid, operation: &str) -> Result<Summary> {
        let ctx = self.context()?;
        let summary = catalog::get(&ctx.store, id)?.ok_or_else(|| Error::not_found("snapshot", id))?;
        ctx.submitter
            .may_read(caller, &summary.agent, operation)
            .map_err(|_| Error::not_found("snapshot", id))?;
        Ok(summary)
    }

    async fn create(&self, caller: &Caller, req: CreateReq) -> Result<Value> {
        let op = SubmitOp {
            idempotency_key: req.idempotency_key,
            ..SubmitOp::new(req.agent, ops::CREATE, json!({ "trigger": req.trigger }))
        };
        self.run_op(caller, op).await
    }

    fn list(&self, caller: &Caller, agent: &AgentId, operation: &str) -> Result<Value> {
        let ctx = self.context()?;
        ctx.submitter.may_read(caller, agent, operation)?;
        let snapshots: Vec<Value> = catalog::list(&ctx.store, agent)?.iter().map(views::summary).collect();
        Ok(json!({ "snapshots": snapshots }))
    }

    async fn show(&self, caller: &Caller, id: &Uuid) -> Result<Value> {
        let summary = self.readable(caller, id, "snapshots.show")?;
        let manifest = self.manifest(id).await?;
        let mut view = views::summary(&summary);
        view["agent_record"] = manifest.agent_record;
        view["quota"] = serde_json::to_value(&manifest.quota).unwrap_or_default();
        view["parts"] = manifest
            .parts
            .iter()
            .map(|p| (p.name.clone(), json!({ "records": p.records, "bytes": p.bytes })))
            .collect::<serde_json::Map<_, _>>()
            .into();
        Ok(view)
    }

    async fn diff(&self, caller: &Caller, req: DiffReq) -> Result<Value> {
        self.readable(caller, &req.snapshot, "snapshots.diff")?;
        self.readable(caller, &req.to, "snapshots.diff")?;
        let from = self.read_parts(&self.manifest(&req.snapshot).await?).await?;
        let to = self.read_parts(&self.manifest(&req.to).await?).await?;
        let mut answer = diff::diff(&from, &to);
        answer["from"] = json!(req.snapshot);
        answer["to"] = json!(req.to);
        Ok(answer)
    }

    async fn restore(&self, caller: &Caller, req: RestoreReq) -> Result<Value> {
        caller.may(Action::Act)?;
        let summary = self.readable(caller, &req.snapshot, ops::RESTORE)?;
        let agent = req.agent.unwrap_or(summary.agent);
        self.run_op(
            caller,
            SubmitOp::new(agent, ops::RESTORE, json!({ "snapshot": req.snapshot })),
        )
        .await
    }

    /// A new agent of the snapshot's tenant, with its quota limits, restored
    /// from it.
    async fn fork(&self, caller: &Caller, req: ForkReq) -> Result<Value> {
        caller.may(Action::Operate)?;
        let summary = self.readable(caller, &req.snapshot, "snapshots.fork")?;
        let manifest = self.manifest(&req.snapshot).await?;
        let host = self.context()?.agents.clone();
        let original: bbx_core::model::Agent = serde_json::from_value(manifest.agent_record.clone()).map_err(|e| {
            crate::chunk::corrupt(&format!(
                "the agent record in snapshot {} does not parse: {e}",
                req.snapshot
            ))
        })?;
        let forked = host
            .create_agent(
                caller,
                CreateAgent {
                    name: req.name,
                    tenant: Some(summary.tenant.clone()),
                    labels: Some(req.labels.unwrap_or(original.labels)),
                    tools: Some(original.tools),
                },
            )
            .await?;
        let filled = async {
            if manifest.quota != Default::default() {
                host.set_quota_limits(caller, forked.id, manifest.quota.clone()).await?;
            }
            let restore = SubmitOp::new(forked.id, ops::RESTORE, json!({ "snapshot": req.snapshot }));
            self.run_op(caller, restore).await
        };
        let restored = match filled.await {
            Ok(restored) => restored,
            // Still running: the fork may yet complete, and its op says how it ended.
            Err(e) if e.code == bbx_core::ErrorCode::Timeout => return Err(e),
            Err(e) => {
                // No half-made fork stays behind.
                if let Err(left) = host.delete_agent(caller, forked.id).await {
                    tracing::warn!(agent = %forked.id, error = %left, "a fork that failed could not be removed");
                }
                return Err(e);
            }
        };
        let mut answer = serde_json::to_value(&forked).map_err(|e| Error::internal(e.to_string()))?;
        answer["forked_from"] = json!(req.snapshot);
        answer["restored"] = restored;
        Ok(answer)
    }

    async fn pitr(&self, caller: &Caller, req: PitrReq) -> Result<Value> {
        let at = DateTime::parse_from_rfc3339(&req.at)
            .map_err(|_| {
                Error::invalid_field(
                    "at",
                    format!(
                        "at must be an RFC 3339 time like 2026-12-07T21:00:00Z, not {:?}",
                        req.at
                    ),
                )
            })?
            .with_timezone(&Utc);
        self.run_op(caller, SubmitOp::new(req.agent, ops::PITR, json!({ "at": at })))
            .await
    }

    async fn delete(&self, caller: &Caller, id: &Uuid) -> Result<Value> {
        caller.may(Action::Act)?;
        let summary = self.readable(caller, id, ops::DELETE)?;
        self.run_op(
            caller,
            SubmitOp::new(summary.agent, ops::DELETE, json!({ "snapshot": id })),
        )
        .await
    }

    /// Reads every chunk of the snapshot from the stores, checking each.
    async fn verify(&self, caller: &Caller, id: &Uuid) -> Result<Value> {
        self.readable(caller, id, "snapshots.verify")?;
        let manifest = self.manifest(id).await?;
        let parts = self.read_parts(&manifest).await?;
        let records: usize = parts.values().map(|p| p.len()).sum();
        Ok(
            json!({ "snapshot": id, "ok": true, "parts": manifest.parts.len(), "records": records, "bytes": manifest.stats.bytes }),
        )
    }

    async fn stats(&self, caller: &Caller) -> Result<Value> {
        caller.require_admin("read the snapshot stores' totals")?;
        let ctx = self.context()?;
        let listed = catalog::all_ids(&ctx.store)?.len();
        let repo = self.repo().await?;
        let stores = repo.states().await;
        let journal = journal_bytes(&self.journal_dir);
        Ok(json!({
            "snapshots": listed,
            "stores": stores,
            "write_quorum": repo.quorum,
            "pitr_window_secs": self.config.pitr_window_secs,
            "journal_bytes": journal,
            "chunk_bytes": self.config.chunk_bytes,
        }))
    }

    async fn replicas(&self, caller: &Caller) -> Result<Value> {
        caller.require_admin("read the snapshot stores")?;
        let ctx = self.context()?;
        let listed = catalog::all_ids(&ctx.store)?.len();
        let repo = self.repo().await?;
        let replicas: Vec<Value> = repo
            .states()
            .await
            .into_iter()
            .map(|state| {
                let lag = listed.saturating_sub(state.manifests);
                let mut view = serde_json::to_value(&state).unwrap_or_default();
                view["lag_snapshots"] = json!(lag);
                view
            })
            .collect();
        Ok(json!({ "replicas": replicas, "write_quorum": repo.quorum, "snapshots": listed }))
    }

    async fn collect(&self, caller: &Caller) -> Result<Value> {
        caller.require_admin("collect snapshot garbage")?;
        serde_json::to_value(self.collect_garbage().await?).map_err(|e| Error::internal(e.to_string()))
    }
}

/// The journal's size on disk, its history included.
fn journal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn endpoints(snapshots: &Snapshots) -> Vec<Endpoint> {
    const CREATE: &str = "Snapshot an agent now: its state, context, workspace files, quota limits and record at one journal position, as content-addressed chunks (only chunks no store has are written). Answers with the snapshot's id and bytes_written.";
    const LIST: &str = "An agent's complete snapshots, oldest first, with their sizes and what took them.";
    const RESTORE: &str = "Restore a snapshot into its agent (or another agent of the same tenant), atomically: ops before it completed on the old data, ops after it see the restored data. Spend, budgets and idempotency records stay as they are.";
    const PITR: &str = "Recover an agent to a moment inside the recovery window: the latest snapshot before it plus the journal's store writes up to it.";
    let create = |name, path| {
        Endpoint::serving(
            snapshots,
            name,
            ("POST", path),
            CREATE,
            |s: Snapshots, caller, req: CreateReq| async move { s.create(&caller, req).await },
        )
    };
    let list = |name: &'static str, path| {
        Endpoint::serving(
            snapshots,
            name,
            ("GET", path),
            LIST,
            move |s: Snapshots, caller, req: AgentReq| async move { s.list(&caller, &req.agent, name) },
        )
    };
    let restore = |name, path| {
        Endpoint::serving(
            snapshots,
            name,
            ("POST", path),
            RESTORE,
            |s: Snapshots, caller, req: RestoreReq| async move { s.restore(&caller, req).await },
        )
    };
    let pitr = |name, path| {
        Endpoint::serving(
            snapshots,
            name,
            ("POST", path),
            PITR,
            |s: Snapshots, caller, req: PitrReq| async move { s.pitr(&caller, req).await },
        )
    };
    vec![
        create("snapshots.create", "/v1/snapshots"),
        list("snapshots.list", "/v1/snapshots"),
        Endpoint::serving(
            snapshots,
            "snapshots.show",
            ("GET", "/v1/snapshots/{snapshot}"),
            "One snapshot: its summary, the agent record and quota limits it holds, and each part's records and bytes.",
            |s: Snapshots, caller, req: SnapshotReq| async move { s.show(&caller, &req.snapshot).await },
        ),
        Endpoint::serving(
            snapshots,
            "snapshots.diff",
            ("GET", "/v1/snapshots/{snapshot}/diff"),
            "What changed from one snapshot to a later one (to): state keys, workspace files and other records added, changed and removed.",
            |s: Snapshots, caller, req: DiffReq| async move { s.diff(&caller, req).await },
        ),
        restore("snapshots.restore", "/v1/snapshots/{snapshot}/restore"),
        Endpoint::serving(
            snapshots,
            "snapshots.fork",
            ("POST", "/v1/snapshots/{snapshot}/fork"),
            "Fork a snapshot: a new agent of its tenant (named as asked, with its labels, tool settings and quota limits) whose data is the snapshot's, for what-if runs.",
            |s: Snapshots, caller, req: ForkReq| async move { s.fork(&caller, req).await },
        ),
        pitr("snapshots.pitr", "/v1/snapshots/pitr"),
        Endpoint::serving(
            snapshots,
            "snapshots.delete",
            ("DELETE", "/v1/snapshots/{snapshot}"),
            "Delete a snapshot: it is unlisted at once, and chunks no other snapshot needs are removed by the next garbage collection.",
            |s: Snapshots, caller, req: SnapshotReq| async move { s.delete(&caller, &req.snapshot).await },
        ),
        Endpoint::serving(
            snapshots,
            "snapshots.verify",
            ("POST", "/v1/snapshots/{snapshot}/verify"),
            "Read every chunk of a snapshot and check it against its hash; a chunk missing or damaged in one store is read from another and repaired.",
            |s: Snapshots, caller, req: SnapshotReq| async move { s.verify(&caller, &req.snapshot).await },
        ),
        Endpoint::serving(
            snapshots,
            "snapshots.stats",
            ("GET", "/v1/snapshots/stats"),
            "Totals of the snapshot stores (an administrator's): snapshots listed, each store's packs and bytes, the write quorum and the recovery window.",
            |s: Snapshots, caller, _: Nothing| async move { s.stats(&caller).await },
        ),
        Endpoint::serving(
            snapshots,
            "snapshots.replicas",
            ("GET", "/v1/snapshots/replicas"),
            "Each snapshot store's state (an administrator's): reachable or not, packs, bytes, manifests and how many listed snapshots it lacks.",
            |s: Snapshots, caller, _: Nothing| async move { s.replicas(&caller).await },
        ),
        Endpoint::serving(
            snapshots,
            "snapshots.gc",
            ("POST", "/v1/snapshots/gc"),
            "Collect snapshot garbage now (an administrator's): manifests of unlisted snapshots and chunks no listed snapshot needs.",
            |s: Snapshots, caller, _: Nothing| async move { s.collect(&caller).await },
        ),
        create("distributed_snapshots.create", "/v1/distributed-snapshots"),
        list("distributed_snapshots.list", "/v1/distributed-snapshots"),
        restore(
            "distributed_snapshots.restore",
            "/v1/distributed-snapshots/{snapshot}/restore",
        ),
        pitr("distributed_snapshots.pitr", "/v1/distributed-snapshots/pitr"),
    ]
}
