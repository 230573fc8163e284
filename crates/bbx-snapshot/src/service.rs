//! Taking a snapshot, and reading one back as what a restore imports.

use crate::catalog::Summary;
use crate::manifest::{self, FILES, Manifest, PartRef};
use crate::pitr::{self, Parts};
use crate::repo::{Repository, manifest_name};
use crate::writer::{self, PartData};
use crate::{Snapshots, files};
use bbx_component::{AgentData, Exported};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use uuid::Uuid;

/// What a snapshot is of: the store's view, its journal position, the
/// workspace's capture (announced), and when it was fixed.
pub(crate) struct Moment {
    view: Arc<fjall::Snapshot>,
    position: bbx_journal::Lsn,
    capture: bbx_component::workspace_gate::WorkspaceCapture,
    created_at: chrono::DateTime<Utc>,
}

/// An agent's data as a restore puts it back.
pub struct Restorable {
    pub data: AgentData,
    /// The workspace's files, if the snapshot holds them.
    pub files: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Snapshots {
    /// Fixes the moment a snapshot of the agent is of, now: the store's view
    /// and its journal position, and a capture of its workspace announced
    /// (its file ops that begin after this wait until the files are read).
    pub(crate) fn moment(&self, agent: &AgentId) -> Result<Moment> {
        let ctx = self.context()?;
        let capture = ctx.agents.capture_workspace(agent)?;
        let (view, position) = ctx.store.view_at();
        Ok(Moment {
            view,
            position,
            capture,
            // After the view: a recovery to a moment before this never takes
            // this snapshot as its base, so it never starts from writes after
            // that moment.
            created_at: Utc::now(),
        })
    }

    /// Takes a snapshot of the agent, of the moment its turn comes.
    pub(crate) async fn build(&self, agent: AgentId, id: Uuid, trigger: &str) -> Result<Summary> {
        let turn = self.turn().await?;
        let moment = self.moment(&agent)?;
        let (summary, _) = self.build_at(agent, id, trigger, moment, Some(turn)).await?;
        Ok(summary)
    }

    /// Waits until no other snapshot is being built.
    pub(crate) async fn turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.builds
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::unavailable("snapshots are shutting down"))
    }

    /// Takes a snapshot of the agent at `moment` (writes its chunks and
    /// manifest to a quorum of stores) and answers what the catalog will list.
    /// The agent's data is read first; its chunks are written in its `turn`.
    /// Without one, it waits for its turn after reading (so a capture
    /// announced is not held while other agents' snapshots are written), and
    /// takes the hold that keeps garbage collection off its chunks, which it
    /// answers with: the caller keeps it until the snapshot is listed.
    pub(crate) async fn build_at(
        &self,
        agent: AgentId,
        id: Uuid,
        trigger: &str,
        moment: Moment,
        turn: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Summary, Option<tokio::sync::OwnedRwLockReadGuard<()>>)> {
        let ctx = self.context()?;
        let host = ctx.agents.clone();
        let repo = self.repo().await?;
        let record = host.agent(&agent)?;
        let Moment {
            view,
            position,
            capture,
            created_at,
        } = moment;
        let workspace = host.workspace(&agent)?;
        // The files are read once the file ops that began before the moment end.
        capture.quiet().await;
        let data = {
            let host = host.clone();
            writer::in_background("bbx-snapshot-read", move |_| {
                let data = host.export(&view, &agent)?;
                let files = files::capture(&workspace)?;
                drop(capture);
                Ok((data, files))
            })
            .await?
        };
        let (data, files) = data;
        let mut parts: Vec<PartData> = data
            .parts
            .into_iter()
            .map(|(name, records)| {
                let mut records: Vec<(Vec<u8>, Vec<u8>)> = records.into_iter().map(|r| (r.key, r.value)).collect();
                records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                PartData { name, records }
            })
            .collect();
        parts.push(PartData {
            name: FILES.to_owned(),
            records: files,
        });
        let (_turn, hold) = match turn {
            Some(turn) => (turn, None),
            None => {
                let hold = self.collection_lock().read_owned().await;
                (self.turn().await?, Some(hold))
            }
        };
        let written = writer::write_parts(&repo, parts, self.chunk_settings()).await?;
        let mut manifest = Manifest {
            format: manifest::FORMAT,
            id,
            agent,
            tenant: record.tenant.clone(),
            created_at,
            position,
            trigger: trigger.to_owned(),
            agent_record: serde_json::to_value(&record).map_err(|e| Error::internal(e.to_string()))?,
            quota: host.quota_limits(&agent),
            parts: written.parts,
            components: Some(host.parts().into_iter().map(str::to_owned).collect()),
            stats: written.stats,
        };
        let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::internal(e.to_string()))?;
        manifest.stats.bytes_written += bytes.len() as u64;
        let stored = repo
            .put_everywhere(&written.stores, &manifest_name(&id), bytes.into())
            .await?;
        let summary = Summary {
            id,
            agent,
            tenant: record.tenant,
            created_at,
            position,
            trigger: manifest.trigger,
            bytes: manifest.stats.bytes,
            bytes_written: manifest.stats.bytes_written,
            chunks: manifest.stats.chunks,
            new_chunks: manifest.stats.new_chunks,
            parts: manifest.parts.iter().map(|p| (p.name.clone(), p.records)).collect(),
            stores: stored.len(),
        };
        Ok((summary, hold))
    }

    /// A snapshot's manifest, from the first store whose copy is whole.
    pub(crate) async fn manifest(&self, id: &Uuid) -> Result<Manifest> {
        let repo = self.repo().await?;
        let parse = |bytes: &[u8]| -> Result<Manifest> {
            let manifest: Manifest = serde_json::from_slice(bytes)
                .map_err(|e| crate::chunk::corrupt(&format!("the manifest of snapshot {id} does not parse: {e}")))?;
            if manifest.id != *id || manifest.format != manifest::FORMAT {
                return Err(crate::chunk::corrupt(&format!(
                    "the manifest of snapshot {id} is not its own"
                )));
            }
            Ok(manifest)
        };
        repo.get_checked(&manifest_name(id), parse)
            .await?
            .ok_or_else(|| crate::chunk::corrupt(&format!("snapshot {id} has no manifest in any store")))
    }

    /// Every part's records, by part name.
    pub(crate) async fn read_parts(&self, manifest: &Manifest) -> Result<Parts> {
        // Garbage collection moves chunks between packs: not while they are read.
        let lock = self.collection_lock();
        let _reading = lock.read().await;
        let repo = self.repo().await?;
        let mut parts = Parts::new();
        for part in &manifest.parts {
            parts.insert(part.name.clone(), read(&repo, part).await?.into_iter().collect());
        }
        Ok(parts)
    }

    /// What restoring snapshot `id` into `agent` of `tenant` puts back.
    pub(crate) async fn restorable(&self, id: &Uuid, agent: AgentId, tenant: &str) -> Result<Restorable> {
        if crate::catalog::get(&self.context()?.store, id)?.is_none() {
            return Err(Error::not_found("snapshot", id));
        }
        let manifest = self.manifest(id).await?;
        check_tenant(&manifest, tenant)?;
        let parts = self.read_parts(&manifest).await?;
        Ok(self.as_restorable(agent, parts, |name| manifest.holds(name)))
    }

    /// What the agent held at `at`: the latest snapshot before it, or nothing
    /// for an agent younger than the journal's history, with the history
    /// replayed onto it up to `at`.
    pub(crate) async fn at_time(&self, agent: AgentId, at: DateTime<Utc>) -> Result<Restorable> {
        let ctx = self.context()?;
        let now = Utc::now();
        let window = chrono::Duration::seconds(self.config.pitr_window_secs as i64);
        if self.config.pitr_window_secs == 0 {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "point-in-time recovery is off (snapshots.pitr_window_secs = 0)",
            ));
        }
        if at > now || at < now - window {
            return Err(Error::invalid_field(
                "at",
                format!(
                    "{} is outside the point-in-time recovery window: {} to {} ({} s, snapshots.pitr_window_secs)",
                    at.to_rfc3339(),
                    (now - window).to_rfc3339(),
                    now.to_rfc3339(),
                    self.config.pitr_window_secs
                ),
            ));
        }
        let base = crate::catalog::list(&ctx.store, &agent)?
            .into_iter()
            .filter(|s| s.created_at <= at)
            .max_by_key(|s| s.created_at);
        let (parts, position, base_manifest) = match &base {
            Some(snapshot) => {
                let manifest = self.manifest(&snapshot.id).await?;
                (self.read_parts(&manifest).await?, snapshot.position, Some(manifest))
            }
            None => {
                if at < ctx.agents.agent(&agent)?.created_at {
                    return Err(Error::invalid_field(
                        "at",
                        format!("agent {agent} did not exist at {}", at.to_rfc3339()),
                    ));
                }
                (Parts::new(), 0, None)
            }
        };
        let host = ctx.agents.clone();
        let journal = self.journal_dir.clone();
        let (mut parts, replayed) = tokio::task::spawn_blocking(move || {
            let mut parts = parts;
            let replayed = pitr::replay(host.as_ref(), &agent, &mut parts, &journal, position, at)?;
            Ok::<_, Error>((parts, replayed))
        })
        .await
        .map_err(|e| Error::internal(format!("replaying the journal's history failed: {e}")))??;
        match &base {
            // Records from the snapshot's position on must all be there.
            Some(snapshot) if replayed.first_lsn.is_some_and(|first| first > snapshot.position) => {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "the journal no longer holds the history after snapshot {} (ring.journal_history_bytes reached?); restore that snapshot instead",
                        snapshot.id
                    ),
                ));
            }
            // Without a snapshot, the history must reach back to the agent's creation.
            None if replayed
                .oldest
                .is_none_or(|oldest| oldest > ctx.agents.agent(&agent).map(|a| a.created_at).unwrap_or(at)) =>
            {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "agent {agent} has no snapshot before {} and is older than the journal's history; take snapshots to recover it to a time",
                        at.to_rfc3339()
                    ),
                ));
            }
            _ => {}
        }
        // The journal holds no file writes: the workspace stays as it is.
        parts.remove(FILES);
        // A component the base snapshot does not hold is left as it is: the
        // writes replayed since are not the whole of its data.
        let holds = |name: &str| base_manifest.as_ref().is_none_or(|m| m.holds(name));
        let mut restorable = self.as_restorable(agent, parts, holds);
        restorable.files = None;
        Ok(restorable)
    }

    /// The parts as an import: every component the snapshot `holds` gets its
    /// part, empty if it has none (its data then goes, as it was not there);
    /// the others are left as they are.
    fn as_restorable(&self, agent: AgentId, mut parts: Parts, holds: impl Fn(&str) -> bool) -> Restorable {
        let files = parts.remove(FILES).map(|records| records.into_iter().collect());
        let names = self.context().map(|ctx| ctx.agents.parts()).unwrap_or_default();
        let named = names
            .into_iter()
            .filter(|name| holds(name))
            .map(|name| {
                let records = parts.remove(name).unwrap_or_default();
                let records = records
                    .into_iter()
                    .map(|(key, value)| Exported { key, value })
                    .collect();
                (name.to_owned(), records)
            })
            .collect();
        Restorable {
            data: AgentData { agent, parts: named },
            files,
        }
    }
}

fn check_tenant(manifest: &Manifest, tenant: &str) -> Result<()> {
    if manifest.tenant != tenant {
        return Err(Error::permission_denied(format!(
            "snapshot {} belongs to another tenant: a snapshot is restored only into an agent of its own tenant",
            manifest.id
        )));
    }
    Ok(())
}

async fn read(repo: &Arc<Repository>, part: &PartRef) -> Result<manifest::Records> {
    writer::read_part(repo, part).await
}
