//! StateSnapshots' settings (`[snapshots]`): where snapshots are kept, how
//! many copies must land, the point-in-time recovery window and retention.

use serde::{Deserialize, Serialize};

/// `[snapshots]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// Where snapshots go, each a full copy (replication). Empty (the default):
    /// one local directory, `snapshots/` in the data directory.
    pub stores: Vec<SnapshotStoreConfig>,
    /// Copies a snapshot must reach before it counts [default: a majority of
    /// `stores`].
    pub write_quorum: Option<usize>,
    /// How far back a point-in-time recovery reaches, in seconds: the journal
    /// keeps its store writes this long [default: 86400; 0 turns it off].
    pub pitr_window_secs: u64,
    /// Snapshot each agent after this many of its ops with effects [default: 0, off].
    pub every_ops: u64,
    /// Snapshot each agent that changed, this often, in seconds [default: 0, off].
    pub every_secs: u64,
    /// What retention keeps of each agent's snapshots (the rest is deleted).
    pub retention: RetentionConfig,
    /// Target size of a chunk, in bytes (content-defined: chunks are a quarter
    /// of it to four times it) [default: 8192].
    pub chunk_bytes: u32,
    /// zstd level of chunks [default: 3].
    pub zstd_level: i32,
    /// The most a snapshot reads and chunks per second, in MB, so that it
    /// leaves the cores and the disk to the agents' ops [default: 200; 0: no limit].
    pub max_mb_per_sec: u32,
}

/// One place snapshots are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SnapshotStoreConfig {
    /// A directory on a local file system.
    Local { path: std::path::PathBuf },
    /// A Redis server: `url` like `redis://127.0.0.1:6379/0`, keys under `prefix`.
    Redis {
        url: String,
        #[serde(default = "default_prefix")]
        prefix: String,
    },
    /// An S3 bucket (objects under `prefix/`, by default `bbx-snapshots/`).
    S3(super::S3Bucket),
}

fn default_prefix() -> String {
    "bbx:snapshots".to_owned()
}

/// Which snapshots of an agent retention keeps: the newest `last`, and the
/// newest of each of the last `hourly` hours, `daily` days and `weekly` weeks.
/// All zero (the default) keeps every snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
}

impl RetentionConfig {
    pub fn keeps_all(&self) -> bool {
        self == &Self::default()
    }
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            stores: Vec::new(),
            write_quorum: None,
            pitr_window_secs: 86_400,
            every_ops: 0,
            every_secs: 0,
            retention: RetentionConfig::default(),
            chunk_bytes: 8192,
            zstd_level: 3,
            max_mb_per_sec: 200,
        }
    }
}

impl SnapshotsConfig {
    /// The write quorum in force for `stores` copies.
    pub fn quorum(&self, stores: usize) -> usize {
        self.write_quorum.unwrap_or(stores / 2 + 1)
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |field: &str, why: &str| Err(crate::Error::invalid_field(field, format!("snapshots.{field} {why}")));
        let stores = self.stores.len().max(1);
        if self.write_quorum.is_some_and(|quorum| quorum == 0 || quorum > stores) {
            return bad("write_quorum", "must be from 1 to the number of stores");
        }
        if self.stores.len() > 16 {
            return bad("stores", "may name at most 16 stores");
        }
        if !(1024..=1 << 20).contains(&self.chunk_bytes) || !self.chunk_bytes.is_power_of_two() {
            return bad("chunk_bytes", "must be a power of two from 1024 to 1048576");
        }
        if !(1..=19).contains(&self.zstd_level) {
            return bad("zstd_level", "must be 1 to 19");
        }
        if self.pitr_window_secs > 366 * 86_400 {
            return bad("pitr_window_secs", "must be at most a year (31622400)");
        }
        if self.every_secs != 0 && self.every_secs < 60 {
            return bad("every_secs", "must be 0 (off) or at least 60");
        }
        Ok(())
    }
}
