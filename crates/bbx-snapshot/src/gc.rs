//! Retention and garbage collection.
//!
//! Retention unlists an agent's snapshots that its rules no longer keep.
//! Collection then removes, from every store, manifests no listed snapshot
//! has and packs none of whose chunks a kept manifest needs, and rewrites a
//! pack most of whose bytes are garbage with only its live chunks.
//!
//! Safe against snapshots being taken: collection holds the lock that every
//! snapshot holds (shared) from its first chunk until it is listed, and a
//! manifest or pack younger than [`GRACE`] is never removed, so one listed
//! just before collection read the catalog keeps what it needs.

use crate::Snapshots;
use crate::catalog::{self, Summary};
use crate::chunk::{ChunkId, ChunkRef};
use crate::pack::{Location, PackBuilder};
use crate::repo::manifest_name;
use bbx_core::config::RetentionConfig;
use bbx_core::{AgentId, Result};
use chrono::{DateTime, Datelike, Timelike, Utc};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// What is younger than this is never collected.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Which hour, day or week a time falls in.
type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32);

/// A pack's live chunks, their bytes, and all its bytes.
type PackUse<'a> = (Vec<(&'a ChunkId, &'a Location)>, u64, u64);

/// The snapshots (newest first) that the rules keep.
pub fn kept(rules: &RetentionConfig, snapshots: &[Summary]) -> HashSet<Uuid> {
    if rules.keeps_all() {
        return snapshots.iter().map(|s| s.id).collect();
    }
    let mut newest: Vec<&Summary> = snapshots.iter().collect();
    newest.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    let mut keep: HashSet<Uuid> = newest.iter().take(rules.last as usize).map(|s| s.id).collect();
    let buckets: [(u32, Bucket); 3] = [
        (rules.hourly, |t| (t.year(), t.ordinal(), t.hour())),
        (rules.daily, |t| (t.year(), t.ordinal(), 0)),
        (rules.weekly, |t| (t.iso_week().year(), t.iso_week().week(), 0)),
    ];
    for (count, bucket) in buckets {
        let mut seen = HashSet::new();
        for snapshot in &newest {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket(&snapshot.created_at)) {
                keep.insert(snapshot.id);
            }
        }
    }
    keep
}

/// The snapshot ids an object name was made with (UUIDv7), and its age.
fn age(name: &str) -> Option<std::time::Duration> {
    let stem = name.rsplit('/').next()?.split('.').next()?;
    let id = Uuid::parse_str(stem).ok()?;
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    let made = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
    std::time::SystemTime::now().duration_since(made).ok()
}

fn young(name: &str) -> bool {
    age(name).is_none_or(|age| age < GRACE)
}

/// What one collection did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Collected {
    pub manifests_removed: usize,
    pub packs_removed: usize,
    pub packs_rewritten: usize,
    pub bytes_freed: u64,
}

impl Snapshots {
    /// Unlists what retention no longer keeps of the agent's snapshots.
    pub(crate) async fn apply_retention(&self, agent: &AgentId) -> Result<usize> {
        let ctx = self.context()?;
        let snapshots = catalog::list(&ctx.store, agent)?;
        let keep = kept(&self.config.retention, &snapshots);
        let dropped: Vec<(AgentId, Uuid)> = snapshots
            .iter()
            .filter(|s| !keep.contains(&s.id))
            .map(|s| (s.agent, s.id))
            .collect();
        if dropped.is_empty() {
            return Ok(0);
        }
        let count = dropped.len();
        ctx.store.write(catalog::Unlist(dropped)).await?;
        Ok(count)
    }

    /// Removes what no listed snapshot needs from every store.
    pub async fn collect_garbage(&self) -> Result<Collected> {
        let lock = self.collection_lock();
        let _exclusive = lock.write().await;
        let repo = self.repo().await?;
        let collected = self.sweep(&repo).await;
        // Whatever it removed before stopping, the indexes no longer say
        // where: a writer that trusted them would skip chunks that are gone.
        repo.forget_indexes().await;
        collected
    }

    async fn sweep(&self, repo: &crate::repo::Repository) -> Result<Collected> {
        let ctx = self.context()?;
        let listed: HashSet<Uuid> = catalog::all_ids(&ctx.store)?.into_iter().collect();
        let mut collected = Collected::default();
        // Manifests to keep: the listed ones, and any too young to judge.
        let mut live_manifests: HashSet<String> = listed.iter().map(manifest_name).collect();
        for replica in &repo.replicas {
            let Ok(manifests) = replica.store.list("manifests/").await else {
                continue;
            };
            for (name, size) in manifests {
                if live_manifests.contains(&name) {
                    continue;
                }
                if young(&name) {
                    live_manifests.insert(name);
                } else if replica.store.delete(&name).await.is_ok() {
                    collected.manifests_removed += 1;
                    collected.bytes_freed += size;
                }
            }
        }
        let mut live: HashSet<ChunkId> = HashSet::new();
        for name in &live_manifests {
            let Some(id) = name
                .strip_prefix("manifests/")
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| Uuid::parse_str(n).ok())
            else {
                continue;
            };
            let manifest = match self.manifest(&id).await {
                Ok(manifest) => manifest,
                // A listed snapshot whose manifest cannot be read keeps
                // everything: collecting could lose what it needs.
                Err(e) if listed.contains(&id) => return Err(e),
                Err(_) => continue,
            };
            for part in &manifest.parts {
                live.extend(part.list.iter().map(|r| r.id));
                let list = repo.read_chunks(&part.list).await?.concat();
                live.extend(ChunkRef::decode_list(&list)?.into_iter().map(|r| r.id));
            }
        }
        for (replica, index) in repo.indexes().await.into_iter().enumerate() {
            let Some(index) = index else { continue };
            let mut packs: HashMap<&str, PackUse<'_>> = HashMap::new();
            for (id, location) in index.iter() {
                let entry = packs.entry(&location.pack).or_default();
                entry.2 += location.stored as u64;
                if live.contains(id) {
                    entry.0.push((id, location));
                    entry.1 += location.stored as u64;
                }
            }
            let store = &repo.replicas[replica].store;
            for (pack, (live_chunks, live_bytes, all_bytes)) in packs {
                if young(pack) || live_bytes * 2 >= all_bytes {
                    continue;
                }
                if !live_chunks.is_empty() {
                    let mut builder = PackBuilder::default();
                    for (id, location) in &live_chunks {
                        let range = location.offset..location.offset + location.stored as u64;
                        let Some(stored) = store.get_range(pack, range).await? else {
                            continue;
                        };
                        let reference = ChunkRef {
                            id: **id,
                            len: location.len,
                        };
                        builder.add(reference, &stored);
                    }
                    repo.put_pack(replica, &builder.seal()).await?;
                    collected.packs_rewritten += 1;
                } else {
                    collected.packs_removed += 1;
                }
                store.delete(pack).await?;
                collected.bytes_freed += all_bytes - live_bytes;
            }
        }
        Ok(collected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hours_ago: i64) -> Summary {
        Summary {
            id: Uuid::new_v4(),
            agent: AgentId::generate(),
            tenant: "t".into(),
            created_at: DateTime::from_timestamp(1_765_000_000 - hours_ago * 3600, 0).unwrap(),
            position: 0,
            trigger: "manual".into(),
            bytes: 0,
            bytes_written: 0,
            chunks: 0,
            new_chunks: 0,
            parts: vec![],
            stores: 1,
        }
    }

    #[test]
    fn retention_keeps_the_last_and_one_per_bucket() {
        let snapshots: Vec<Summary> = [0, 0, 1, 1, 2, 30, 50, 200].into_iter().map(at).collect();
        assert_eq!(kept(&RetentionConfig::default(), &snapshots).len(), 8);
        let last_two = kept(
            &RetentionConfig {
                last: 2,
                ..Default::default()
            },
            &snapshots,
        );
        assert_eq!(last_two.len(), 2);
        let hourly = kept(
            &RetentionConfig {
                hourly: 3,
                ..Default::default()
            },
            &snapshots,
        );
        assert_eq!(hourly.len(), 3);
        let daily = kept(
            &RetentionConfig {
                daily: 30,
                ..Default::default()
            },
            &snapshots,
        );
        // Each distinct day among the snapshots once.
        let days: HashSet<_> = snapshots.iter().map(|s| s.created_at.date_naive()).collect();
        assert_eq!(daily.len(), days.len());
    }

    #[test]
    fn objects_named_now_are_young_and_old_ones_are_not() {
        assert!(young(&format!("packs/{}.pack", Uuid::now_v7().simple())));
        let old = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 1_600_000_000, 0));
        assert!(!young(&format!("manifests/{}.json", old.simple())));
        assert!(young("packs/not-a-uuid.pack"));
    }
}
