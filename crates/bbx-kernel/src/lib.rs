//! The BBX kernel: agents as kernel objects and their durable state.
//!
//! `bbx-kernel` owns the objects the rest of BBX acts on and the one place they are
//! written. An agent is a record (id, name, tenant, labels, status, creation time)
//! plus a state store of versioned JSON values; both live in an embedded fjall
//! database in the data directory, and every write reaches disk through the group
//! committer in [`store`] before it is acknowledged. The kernel also owns the API
//! keys that admit callers ([`auth`]): on first start it mints an administrator key,
//! keeps only its digest, and writes the key to `DATA_DIR/admin.key` (mode 0600).
//!
//! The kernel also runs the AgentRing (`ring`): ops submitted in batches, journaled
//! with group commit before they are acknowledged, scheduled by priority with aging
//! and per-agent fairness, executed through per-target circuit breakers, and
//! completed with their effect in one atomic store write, so that recovery runs an op
//! exactly when it had not happened.
//!
//! Every operation takes the [`Caller`] that the front end authenticated, so
//! tenant confinement is enforced here, once, not in each front end. [`Session`]
//! binds a caller to the kernel and implements [`bbx_core::AgentApi`].

pub mod auth;
mod completions;
mod quota;
mod ring;
mod shm;
mod store;

pub use auth::Caller;
pub use bbx_store::{JournalMetrics, StoreMetrics};
pub use completions::CompletionQueue;
pub use ring::{KINDS, RingMetrics};

use auth::{KeyRing, StoredKey};
use bbx_core::api::prelude::*;
use bbx_core::config::KernelConfig;
use bbx_core::model::{
    Agent, AgentPage, AgentStatus, ApiKeyInfo, CreateAgent, CreateApiKey, CreatedApiKey, DEFAULT_TENANT, ListAgents,
    ListState, SetState, StateEntry, StatePage, Status, StorageStatus, page_limit,
};
use bbx_core::op::{
    BreakerInfo, Completion, OpInfo, ResetBreakers, Resolution, RingStats, SubmitBatch, Submitted, WalStatus,
};
use bbx_core::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, ErrorCode, KeyId, OpId, Result, validate};
use chrono::Utc;
use fjall::Readable;
use ring::Ring;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::io::Write as _;
use std::ops::Bound;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use std::time::Instant;
use store::{Applied, Store, Write, decode_agent, decode_state, storage_error};
use tokio_util::task::TaskTracker;

/// Agents one page of `list_agents` reads at most, matching its filter or not.
pub const LIST_SCAN_BUDGET: usize = 10_000;

/// Name of the file, inside the data directory, that holds the first admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// The AgentRing's journal, inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// Agents' workspaces (one directory each), inside the data directory.
pub const WORKSPACES_DIR: &str = "workspaces";
/// The cgroup subtree, below the kernel's own, that tool runs' groups are made in;
/// each data directory gets its own below it (see [`cgroup_scope`]).
const CGROUP_SCOPE: &str = "bbx";

/// The cgroup scope of the kernel on `data_dir`: its own, so that the runs a dead
/// kernel left behind can be swept at the next start without touching another
/// kernel's. The data directory's lock makes the scope one kernel's at a time.
fn cgroup_scope(data_dir: &Path) -> String {
    use sha2::Digest as _;
    let canonical = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("{CGROUP_SCOPE}/{}", hex::encode(&digest[..8]))
}

pub struct Kernel {
    config: KernelConfig,
    store: Arc<Store>,
    journal_metrics: JournalMetrics,
    ring: Arc<Ring>,
    /// Background tasks (purges, expiry, the ring's), awaited at shutdown.
    tasks: TaskTracker,
    keys: KeyRing,
    started: Instant,
    closing: AtomicBool,
    shm_sessions: Arc<shm::Sessions>,
    tenants: TenantCache,
    quotas: Arc<bbx_quota::Quotas>,
    /// Serializes quota updates (read, merge, store).
    quota_updates: tokio::sync::Mutex<()>,
    tools: Arc<bbx_tools::Tools>,
}

/// The tenant of each agent an op or a state call named lately, so that the hot
/// paths check an agent without decoding its record. An agent never changes
/// tenant; a deletion removes its entry.
#[derive(Default)]
struct TenantCache {
    tenants: parking_lot::RwLock<HashMap<AgentId, Arc<str>>>,
    /// Bumped by every deletion: a lookup that raced one does not insert what it read.
    deletions: std::sync::atomic::AtomicU64,
}

/// Agents the cache remembers before it starts over.
const TENANT_CACHE_AGENTS: usize = 65_536;

/// What opening a kernel produced.
pub struct Opened {
    pub kernel: Arc<Kernel>,
    /// Set when this start minted the administrator key: where it was written.
    pub admin_key_written: Option<PathBuf>,
}

impl Kernel {
    /// Opens (or creates) the data directory and everything in it.
    pub async fn open(config: KernelConfig) -> Result<Opened> {
        create_private_dir(&config.data_dir)?;
        // The database's lock first: a second kernel on this directory is refused
        // before it can touch the journal (whose recovery truncates a torn tail).
        let db = bbx_store::open_database(&config.data_dir.join("db"))?;
        // One journal behind both the ring and the store: read before the store is,
        // since the store replays its own records from it.
        let segment_bytes = config.ring.journal_segment_bytes;
        let (journal, recovery) = bbx_journal::Journal::open(
            &config.data_dir.join(JOURNAL_DIR),
            bbx_journal::JournalOptions {
                segment_bytes,
                ..Default::default()
            },
        )
        .map_err(|e| Error::unavailable(e.to_string()))?;
        if let Some(tail) = &recovery.truncated_tail {
            tracing::warn!(segment = %tail.segment.display(), offset = tail.offset, bytes = tail.bytes,
                reason = %tail.reason, "truncated a torn write at the end of the journal");
        }
        let ring_metrics = ring::RingMetrics::new();
        let journal_metrics = JournalMetrics::default();
        let journal = bbx_store::JournalWriter::start(
            journal,
            recovery.records.iter().map(|r| r.lsn).collect(),
            journal_metrics.clone(),
            config.ring.journal_nice,
        )?;
        let store = Arc::new(Store::open(
            db,
            &store::KEYSPACES,
            journal.clone(),
            &recovery.records,
            bbx_store::StoreOptions {
                commit_max_batch: config.commit_max_batch,
                max_record: bbx_journal::max_payload(segment_bytes),
                committer_nice: config.ring.committer_nice,
            },
        )?);
        let keys = KeyRing::default();
        for item in store.keyspace(store::API_KEYS).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load API keys", e))?;
            let stored: StoredKey = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("stored API key is unreadable: {e}")))?;
            keys.insert(stored);
        }
        let tasks = TaskTracker::new();
        let quotas = Arc::new(quota::load(&store)?);
        let tools = Arc::new(bbx_tools::Tools::new(
            bbx_tools::ToolsConfig {
                workspaces: config.data_dir.join(WORKSPACES_DIR),
                run_as: (config.tools.run_as_uid, config.tools.run_as_gid),
                unsandboxed_shell: config.tools.unsandboxed_shell,
                llm: config.tools.llm.clone(),
                mcp: config.tools.mcp.clone(),
            },
            bbx_quota::cgroup::detect(&cgroup_scope(&config.data_dir)),
        )?);
        let ring = Ring::open(
            config.ring.clone(),
            store.clone(),
            journal,
            ring_metrics,
            recovery.records,
            tasks.clone(),
            tools.clone(),
            quotas.clone(),
        )
        .await?;
        spawn_store_checkpoints(&tasks, store.clone(), ring.stopping());
        let kernel = Arc::new(Self {
            config,
            store,
            journal_metrics,
            ring,
            tasks,
            keys,
            started: Instant::now(),
            closing: AtomicBool::new(false),
            shm_sessions: Arc::default(),
            tenants: TenantCache::default(),
            quotas,
            quota_updates: tokio::sync::Mutex::new(()),
            tools,
        });
        spawn_expiry(&kernel.tasks, Arc::downgrade(&kernel), kernel.ring.stopping());
        // Deletions a crash interrupted finish removing their agents' state.
        for agent in store::pending_purges(&kernel.store)? {
            spawn_purge(&kernel.tasks, kernel.store.clone(), agent);
        }
        let admin_key_written = if kernel.keys.is_empty() {
            Some(kernel.mint_admin_key().await?)
        } else {
            None
        };
        Ok(Opened {
            kernel,
            admin_key_written,
        })
    }

    /// Mints the administrator key. The file is written (and synced) before the
    /// record is committed: a crash in between leaves no key, and the next start
    /// simply mints another, instead of a key nobody can read.
    async fn mint_admin_key(&self) -> Result<PathBuf> {
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            name: "admin".into(),
            tenant: None,
            created_at: Utc::now(),
            revoked_at: None,
        };
        let (token, stored) = auth::mint(info);
        let path = self.config.data_dir.join(ADMIN_KEY_FILE);
        write_secret_file(&path, &token)
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
        self.store.write(Write::PutKey(stored.clone())).await?;
        self.keys.insert(stored);
        Ok(path)
    }

    /// Mints a new administrator key into `DATA_DIR/admin.key`, for an operator who
    /// lost the old one. Run offline (`bbx key reset-admin`): the data directory's lock
    /// refuses it while a kernel is serving. Existing keys stay as they are.
    pub async fn reset_admin_key(&self) -> Result<PathBuf> {
        self.mint_admin_key().await
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    pub fn metrics(&self) -> &StoreMetrics {
        self.store.metrics()
    }

    pub fn journal_metrics(&self) -> &JournalMetrics {
        &self.journal_metrics
    }

    pub fn ring_metrics(&self) -> &RingMetrics {
        self.ring.metrics()
    }

    /// Ready to serve: open, not closing, storage healthy.
    pub fn is_ready(&self) -> bool {
        !self.closing.load(Ordering::Acquire) && !self.store.has_failed() && !self.ring.is_poisoned()
    }

    /// Commits everything queued, then refuses further writes.
    /// Returns once every background task has let go of the store, so the data
    /// directory can be opened again at once.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        self.ring.close().await;
        self.store.close().await;
        self.tasks.close();
        self.tasks.wait().await;
        self.tools.cgroup_driver().close();
    }

    pub fn authenticate(&self, token: &str) -> Result<Caller> {
        self.keys.verify(token)
    }

    pub fn session(self: &Arc<Self>, caller: Caller) -> Session {
        Session {
            kernel: self.clone(),
            caller,
        }
    }

    /// The agent's tenant, once the agent is known to exist and the caller may see it.
    fn agent_tenant(&self, caller: &Caller, id: &AgentId) -> Result<Arc<str>> {
        if let Some(tenant) = self.tenants.tenants.read().get(id) {
            caller.check_owner(tenant, "agent", id)?;
            return Ok(tenant.clone());
        }
        let deletions = self.tenants.deletions.load(Ordering::Acquire);
        let tenant: Arc<str> = self.load_agent(caller, id)?.tenant.into();
        let mut tenants = self.tenants.tenants.write();
        if self.tenants.deletions.load(Ordering::Acquire) == deletions {
            if tenants.len() >= TENANT_CACHE_AGENTS {
                tenants.clear();
            }
            tenants.insert(*id, tenant.clone());
        }
        Ok(tenant)
    }

    fn load_agent(&self, caller: &Caller, id: &AgentId) -> Result<Agent> {
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(store::AGENTS), id.as_bytes())
            .map_err(|e| storage_error("read", e))?;
        let agent = decode_agent(&bytes.ok_or_else(|| Error::not_found("agent", id))?)?;
        caller.check_owner(&agent.tenant, "agent", id)?;
        Ok(agent)
    }

    pub async fn create_agent(&self, caller: &Caller, req: CreateAgent) -> Result<Agent> {
        validate::name("name", &req.name)?;
        let tenant = match (req.tenant, &caller.tenant) {
            (Some(tenant), _) => tenant,
            (None, Some(own)) => own.clone(),
            (None, None) => DEFAULT_TENANT.to_owned(),
        };
        validate::tenant(&tenant)?;
        caller.check_tenant(&tenant)?;
        let labels = req.labels.unwrap_or_default();
        validate::labels(&labels)?;
        let tools = req.tools.unwrap_or_default();
        bbx_tools::net::validate_settings(&tools)?;
        if !tools.allow_networks.is_empty() || !tools.env_allow.is_empty() {
            // Private networks (the metadata service among them) and the kernel's own
            // environment (where endpoint keys live) are the operator's to open.
            caller.require_admin("let an agent's tools reach private networks or the kernel's environment")?;
        }
        let agent = Agent {
            id: AgentId::generate(),
            name: req.name,
            tenant,
            labels,
            status: AgentStatus::Idle,
            created_at: Utc::now(),
            tools,
        };
        self.store.write(Write::CreateAgent(agent.clone())).await?;
        Ok(agent)
    }

    pub fn get_agent(&self, caller: &Caller, id: &AgentId) -> Result<Agent> {
        self.load_agent(caller, id)
    }

    pub async fn delete_agent(&self, caller: &Caller, id: &AgentId) -> Result<()> {
        self.load_agent(caller, id)?;
        self.store.write(Write::DeleteAgent(*id)).await?;
        self.tenants.deletions.fetch_add(1, Ordering::AcqRel);
        self.tenants.tenants.write().remove(id);
        spawn_purge(&self.tasks, self.store.clone(), *id);
        self.quotas.remove(&bbx_quota::Node::Agent(*id));
        // A workspace may hold many files: removed on a blocking thread.
        let (tools, agent) = (self.tools.clone(), *id);
        self.tasks.spawn_blocking(move || tools.remove_workspace(&agent));
        self.store
            .write(Write::PutQuota {
                node: bbx_quota::Node::Agent(*id).to_string(),
                limits: None,
            })
            .await?;
        Ok(())
    }

    /// Forgets the completions (and idempotency keys) of ops that completed more
    /// than `ring.retention_secs` before `now`, in bounded groups; returns how many.
    /// Never one whose records the journal would still replay (see
    /// [`bbx_store::JournalWriter::replay_horizon`]): recovery would run it again.
    /// An op in doubt is kept until an operator settles it. The kernel runs this
    /// every ten minutes; `now` is a parameter so that tests can run it later.
    pub async fn expire_completions(&self, now: chrono::DateTime<Utc>) -> Result<usize> {
        let retention = chrono::Duration::seconds(self.config.ring.retention_secs as i64);
        let before = (now - retention).min(self.ring.replay_horizon());
        let mut expired = 0;
        loop {
            let step = Write::ExpireOps {
                before,
                max: EXPIRY_STEP,
            };
            let step: store::Expired = self.store.write(step).await?.into_output()?;
            expired += step.count;
            if !step.more {
                return Ok(expired);
            }
        }
    }

    /// Deleted agents whose state is still being removed in the background.
    pub fn pending_purges(&self) -> Result<usize> {
        Ok(store::pending_purges(&self.store)?.len())
    }

    pub fn list_agents(&self, caller: &Caller, req: ListAgents) -> Result<AgentPage> {
        let limit = page_limit(req.limit)?;
        let view = self.store.view();
        let tenant = match (req.tenant, &caller.tenant) {
            (Some(tenant), _) => {
                caller.check_tenant(&tenant)?;
                Some(tenant)
            }
            (None, own) => own.clone(),
        };
        let label = req.label.as_deref().map(validate::label_selector).transpose()?;
        let after: Option<AgentId> = req
            .cursor
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|_: Error| Error::invalid_field("cursor", "cursor is not one this API returned"))?;

        let ids: Box<dyn Iterator<Item = Result<AgentId>>> = match &tenant {
            Some(tenant) => {
                validate::tenant(tenant)?;
                let start = match &after {
                    Some(id) => Bound::Excluded(store::tenant_index_key(tenant, id)),
                    None => Bound::Included(format!("{tenant}\0").into_bytes()),
                };
                let end = Bound::Excluded(format!("{tenant}\u{1}").into_bytes());
                Box::new(
                    view.range(self.store.keyspace(store::TENANTS), (start, end))
                        .map(|item| {
                            let key = item.key().map_err(|e| storage_error("scan agents", e))?;
                            let id: [u8; 16] = key[key.len() - 16..].try_into().expect("index keys end in an id");
                            Ok(AgentId::from_bytes(id))
                        }),
                )
            }
            None => {
                let start = match &after {
                    Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
                    None => Bound::Unbounded,
                };
                Box::new(
                    view.range(self.store.keyspace(store::AGENTS), (start, Bound::<Vec<u8>>::Unbounded))
                        .map(|item| {
                            let key = item.key().map_err(|e| storage_error("scan agents", e))?;
                            Ok(AgentId::from_bytes(
                                key.as_ref()
                                    .try_into()
                                    .map_err(|_| Error::internal("corrupt agent key"))?,
                            ))
                        }),
                )
            }
        };

        let mut agents = Vec::with_capacity(limit.min(128) + 1);
        // A label that few agents carry must not make one request read them all:
        // past the budget the page ends early, and its cursor resumes the scan.
        let mut budget = LIST_SCAN_BUDGET;
        let mut last_read = None;
        let mut out_of_budget = false;
        for id in ids {
            let id = id?;
            if budget == 0 {
                out_of_budget = true;
                break;
            }
            budget -= 1;
            last_read = Some(id);
            let Some(bytes) = view
                .get(self.store.keyspace(store::AGENTS), id.as_bytes())
                .map_err(|e| storage_error("read", e))?
            else {
                continue;
            };
            let agent = decode_agent(&bytes)?;
            if let Some((key, value)) = &label
                && agent.labels.get(key) != Some(value)
            {
                continue;
            }
            agents.push(agent);
            if agents.len() > limit {
                break;
            }
        }
        let next_cursor = if agents.len() > limit {
            agents.truncate(limit);
            Some(agents[limit - 1].id.to_string())
        } else {
            // The cursor names the last agent read, matching or not.
            last_read.filter(|_| out_of_budget).map(|id| id.to_string())
        };
        Ok(AgentPage { agents, next_cursor })
    }

    pub fn state_get(&self, caller: &Caller, agent: &AgentId, key: &str) -> Result<StateEntry> {
        validate::state_key(key)?;
        self.agent_tenant(caller, agent)?;
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(store::STATE), store::state_key(agent, key))
            .map_err(|e| storage_error("read", e))?;
        let entry = match bytes {
            Some(bytes) => decode_entry(key.to_owned(), &bytes)?,
            None => None,
        };
        entry.ok_or_else(|| Error::not_found("state key", key))
    }

    pub async fn state_set(&self, caller: &Caller, agent: &AgentId, key: String, req: SetState) -> Result<StateEntry> {
        validate::state_key(&key)?;
        let json = serde_json::to_vec(&req.value).map_err(|e| Error::invalid_field("value", e.to_string()))?;
        if json.len() > self.config.max_body_bytes {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the value is {} bytes; the limit is {}",
                    json.len(),
                    self.config.max_body_bytes
                ),
            ));
        }
        self.agent_tenant(caller, agent)?;
        let at = Utc::now();
        let write = Write::SetState {
            agent: *agent,
            key: key.clone(),
            value: json,
            if_version: req.if_version,
            at,
        };
        match self.store.write(write).await? {
            Applied::Version(version) => Ok(StateEntry {
                key,
                value: req.value,
                version,
                updated_at: at,
            }),
            _ => Err(Error::internal("state write reported no version")),
        }
    }

    pub async fn state_delete(
        &self,
        caller: &Caller,
        agent: &AgentId,
        key: String,
        if_version: Option<u64>,
    ) -> Result<()> {
        validate::state_key(&key)?;
        self.agent_tenant(caller, agent)?;
        self.store
            .write(Write::DeleteState {
                agent: *agent,
                key,
                if_version,
                at: Utc::now(),
            })
            .await
            .map(drop)
    }

    pub fn state_list(&self, caller: &Caller, agent: &AgentId, req: ListState) -> Result<StatePage> {
        let limit = page_limit(req.limit)?;
        self.agent_tenant(caller, agent)?;
        let prefix = store::state_key(agent, req.prefix.as_deref().unwrap_or(""));
        let start = match req.cursor.as_deref() {
            Some(cursor) => {
                // A cursor is the last key of a page of this listing, so it lies
                // inside the prefix; anything else would silently end the listing.
                let after = hex::decode(cursor)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .filter(|after| after.starts_with(req.prefix.as_deref().unwrap_or("")))
                    .ok_or_else(|| Error::invalid_field("cursor", "cursor is not one this listing returned"))?;
                Bound::Excluded(store::state_key(agent, &after))
            }
            None => Bound::Included(prefix.clone()),
        };
        // Deleted keys leave tombstones, which a page skips; bounding the keys one page
        // may examine keeps a request cheap however many keys were deleted. A page cut
        // short this way still carries a cursor.
        let max_scan = limit.saturating_mul(4).max(1024);
        let mut entries = Vec::with_capacity(limit.min(128) + 1);
        let mut last_scanned = None;
        let mut scanned = 0;
        for item in self
            .store
            .view()
            .range(self.store.keyspace(store::STATE), (start, Bound::<Vec<u8>>::Unbounded))
        {
            let (raw_key, value) = item.into_inner().map_err(|e| storage_error("scan state", e))?;
            if !raw_key.starts_with(&prefix) {
                last_scanned = None;
                break;
            }
            let key = String::from_utf8(raw_key[16..].to_vec()).map_err(|_| Error::internal("corrupt state key"))?;
            if let Some(entry) = decode_entry(key.clone(), &value)? {
                entries.push(entry);
            }
            if entries.len() > limit {
                break;
            }
            scanned += 1;
            last_scanned = Some(key);
            if scanned >= max_scan {
                break;
            }
        }
        let next_cursor = if entries.len() > limit {
            entries.truncate(limit);
            Some(hex::encode(entries[limit - 1].key.as_bytes()))
        } else if scanned >= max_scan {
            last_scanned.map(|key| hex::encode(key.as_bytes()))
        } else {
            None
        };
        Ok(StatePage { entries, next_cursor })
    }

    pub fn status(&self, caller: &Caller) -> Result<Status> {
        let (agents, host) = match &caller.tenant {
            None => (store::agent_count(&self.store)?, true),
            Some(tenant) => {
                let mut count = 0;
                for item in self
                    .store
                    .view()
                    .prefix(self.store.keyspace(store::TENANTS), format!("{tenant}\0"))
                {
                    item.key().map_err(|e| storage_error("count agents", e))?;
                    count += 1;
                }
                (count, false)
            }
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            agents,
            listen: self.config.listen.to_string(),
            data_dir: host.then(|| self.config.data_dir.display().to_string()),
            storage: host.then(|| StorageStatus {
                engine: "fjall".into(),
                disk_bytes: self.store.database().disk_space().unwrap_or(0),
                writes_committed: self.store.metrics().writes.get(),
                syncs: self.store.metrics().syncs.get(),
            }),
        })
    }

    /// Submits a batch of ops; answers once every op with effects is journaled.
    pub async fn submit(&self, caller: &Caller, batch: SubmitBatch) -> Result<Submitted> {
        self.submit_and_start(caller, batch, None).await
    }

    /// Submits a batch as [`Kernel::submit`] does, and hands each op's completion
    /// to `queue` (a deduplicated op's too, at once if it is done).
    pub async fn submit_to(&self, caller: &Caller, batch: SubmitBatch, queue: &CompletionQueue) -> Result<Submitted> {
        self.submit_and_start(caller, batch, Some(queue.sink())).await
    }

    async fn submit_and_start(
        &self,
        caller: &Caller,
        batch: SubmitBatch,
        reaper: Option<&ring::Sink>,
    ) -> Result<Submitted> {
        let submitted = self.submit_with(caller, batch, reaper).await?;
        // The submitting task starts the next batch itself: inline ops (`noop`,
        // `state.get`) complete here, without waking the dispatcher task and the
        // thread it sleeps on; what is left for it, it is woken for.
        self.ring.dispatch_once();
        Ok(submitted)
    }

    /// Checks and submits a batch, handing its completions to `reaper` if given;
    /// the caller then starts the next batch of ops with [`Ring::dispatch_once`].
    async fn submit_with(&self, caller: &Caller, batch: SubmitBatch, reaper: Option<&ring::Sink>) -> Result<Submitted> {
        // Fx hashing: agent ids are ids the kernel made (UUIDv7), not the caller's
        // choice, and SipHash per op showed in the ring's profile.
        let mut known: FxHashMap<AgentId, Arc<str>> = FxHashMap::default();
        // Each op's tenant, beside the ops rather than paired with them: moving every
        // op (some 300 bytes) into a new list was a measurable share of `inproc`.
        let mut tenants = Vec::with_capacity(batch.ops.len());
        for (index, op) in batch.ops.iter().enumerate() {
            let tenant = match known.get(&op.agent) {
                Some(tenant) => tenant.clone(),
                None => {
                    let tenant = self
                        .agent_tenant(caller, &op.agent)
                        .map_err(|e| bbx_ring::batch::at_op(index, e))?;
                    known.insert(op.agent, tenant.clone());
                    tenant
                }
            };
            tenants.push(tenant);
        }
        let start_after = self.check_rates(&batch.ops, &tenants).await?;
        self.ring
            .submit(
                caller,
                batch.ops,
                tenants,
                batch.wait_ms.map(Duration::from_millis),
                start_after,
                reaper,
            )
            .await
    }

    pub fn op(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        self.ring.info(caller, id)
    }

    /// Waits up to `timeout` for an op to complete.
    pub async fn wait_op(&self, caller: &Caller, id: &OpId, timeout: Duration) -> Result<OpInfo> {
        self.ring.wait(caller, id, timeout).await
    }

    pub async fn cancel_op(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        self.ring.cancel(caller, id).await
    }

    /// Settles an op left in doubt by a crash.
    pub async fn resolve_op(&self, caller: &Caller, id: &OpId, resolution: Resolution) -> Result<OpInfo> {
        self.ring.resolve(caller, id, resolution).await
    }

    /// Completions as they happen, for event streams; filter by [`Caller::sees`].
    pub fn completions(&self) -> tokio::sync::broadcast::Receiver<Arc<Completion>> {
        self.ring.subscribe()
    }

    /// The ring's figures; its breakers are the caller's tenant's (all, for an
    /// administrator).
    pub fn ring_stats(&self, caller: &Caller) -> RingStats {
        RingStats {
            shm_sessions: self.shm_sessions.count() as u64,
            ..self.ring.stats(caller)
        }
    }

    pub async fn wal_status(&self, caller: &Caller) -> Result<WalStatus> {
        caller.require_admin("read the journal's status")?;
        let status = self.ring.wal_status().await?;
        Ok(WalStatus {
            committer_nice: self.store.committer_nice(),
            ..status
        })
    }

    pub fn breakers(&self, caller: &Caller) -> Vec<BreakerInfo> {
        self.ring.breakers(caller)
    }

    pub fn reset_breakers(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<BreakerInfo>> {
        caller.require_admin("reset circuit breakers")?;
        self.ring.reset_breakers(caller, tenant, target)
    }

    pub async fn create_key(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
        caller.require_admin("create API keys")?;
        validate::name("name", &req.name)?;
        if let Some(tenant) = &req.tenant {
            validate::tenant(tenant)?;
        }
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            name: req.name,
            tenant: req.tenant,
            created_at: Utc::now(),
            revoked_at: None,
        };
        let (key, stored) = auth::mint(info.clone());
        self.store.write(Write::PutKey(stored.clone())).await?;
        self.keys.insert(stored);
        Ok(CreatedApiKey { key, info })
    }

    pub fn list_keys(&self, caller: &Caller) -> Result<Vec<ApiKeyInfo>> {
        caller.require_admin("list API keys")?;
        Ok(self.keys.list())
    }

    /// Revokes a key; revoking a revoked key is a no-op that returns it unchanged.
    pub async fn revoke_key(&self, caller: &Caller, id: &KeyId) -> Result<ApiKeyInfo> {
        caller.require_admin("revoke API keys")?;
        let mut stored = self.keys.get(id).ok_or_else(|| Error::not_found("API key", id))?;
        if stored.info.revoked_at.is_none() && stored.info.tenant.is_none() && self.keys.active_admins() == 1 {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "this is the last administrator key; create another before revoking it",
            ));
        }
        if stored.info.revoked_at.is_none() {
            stored.info.revoked_at = Some(Utc::now());
            self.store.write(Write::PutKey(stored.clone())).await?;
            self.keys.insert(stored.clone());
        }
        Ok(stored.info)
    }
}

/// The entry a stored value holds, or `None` for a deleted key's tombstone.
/// State keys removed per committer group when purging a deleted agent.
const PURGE_STEP: usize = 1024;

/// Removes a deleted agent's state in bounded steps, each its own group, so that
/// other writers interleave. Stops early if the kernel shuts down; the durable purge
/// marker makes the next start resume it.
fn spawn_purge(tasks: &TaskTracker, store: Arc<Store>, agent: AgentId) {
    tasks.spawn(async move {
        loop {
            match store
                .write(Write::PurgeState {
                    agent,
                    max_keys: PURGE_STEP,
                })
                .await
            {
                Ok(Applied::More) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::info!(%agent, error = %e, "purge of a deleted agent's state paused until the next start");
                    break;
                }
            }
        }
    });
}

/// How often completions past their retention are swept.
const EXPIRY_EVERY: Duration = Duration::from_secs(600);
/// Completions removed per committer group when sweeping.
const EXPIRY_STEP: usize = 1024;

/// Nudges the store once a second, so that it makes fjall durable (and lets the
/// journal drop its redo records) even when no write comes to trigger it.
fn spawn_store_checkpoints(tasks: &TaskTracker, store: Arc<Store>, stopping: tokio_util::sync::CancellationToken) {
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                _ = ticks.tick() => store.checkpoint(),
            }
        }
    });
}

/// Forgets completions and idempotency keys past their retention, now and every
/// ten minutes (see [`Kernel::expire_completions`]).
fn spawn_expiry(tasks: &TaskTracker, kernel: std::sync::Weak<Kernel>, stopping: tokio_util::sync::CancellationToken) {
    tasks.spawn(async move {
        while !stopping.is_cancelled() {
            let Some(live) = kernel.upgrade() else { return };
            if let Err(e) = live.expire_completions(Utc::now()).await {
                tracing::warn!(error = %e, "expiring old completions failed; trying again later");
            }
            drop(live);
            tokio::select! {
                () = stopping.cancelled() => {}
                () = tokio::time::sleep(EXPIRY_EVERY) => {}
            }
        }
    });
}

fn decode_entry(key: String, bytes: &[u8]) -> Result<Option<StateEntry>> {
    let stored = decode_state(bytes)?;
    if stored.is_tombstone() {
        return Ok(None);
    }
    let value =
        serde_json::from_slice(stored.json).map_err(|e| Error::internal(format!("stored value is unreadable: {e}")))?;
    Ok(Some(StateEntry {
        key,
        value,
        version: stored.version,
        updated_at: stored.updated_at,
    }))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("cannot create data directory {}: {e}", dir.display())))?;
    if !existed {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::internal(format!("cannot restrict data directory {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Writes `secret` to `path` with mode 0600: temp file, fsync, rename, fsync dir.
fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What `bbx journal verify` and `bbx journal repair` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalCheck {
    pub directory: PathBuf,
    pub segments: usize,
    pub records: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    pub checkpoint_lsn: u64,
    /// The first bad record, if any.
    pub problem: Option<JournalProblem>,
    /// Whether this run changed the journal.
    pub repaired: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalProblem {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// A torn last write, which the kernel cuts off by itself when it starts.
    pub torn_tail: bool,
    /// Bytes from the bad record to the end: what a repair drops.
    pub bytes_after: u64,
}

/// Checks the journal of a data directory record by record; changes nothing, and is
/// safe while a kernel runs.
pub fn verify_journal(data_dir: &Path) -> Result<JournalCheck> {
    let dir = data_dir.join(JOURNAL_DIR);
    let report = bbx_journal::verify(&dir).map_err(|e| Error::unavailable(e.to_string()))?;
    Ok(journal_check(dir, report, false))
}

/// Truncates the journal at its first bad record so the kernel starts again. The
/// ops in the dropped records are lost, which is why this is an operator's decision
/// and never automatic. Refused while a kernel holds the data directory.
pub fn repair_journal(data_dir: &Path) -> Result<JournalCheck> {
    let _lock = bbx_store::open_database(&data_dir.join("db"))?;
    let dir = data_dir.join(JOURNAL_DIR);
    let report = bbx_journal::repair(&dir).map_err(|e| Error::unavailable(e.to_string()))?;
    let repaired = report.problem.is_some();
    Ok(journal_check(dir, report, repaired))
}

fn journal_check(directory: PathBuf, report: bbx_journal::VerifyReport, repaired: bool) -> JournalCheck {
    JournalCheck {
        directory,
        segments: report.segments,
        records: report.records,
        first_lsn: report.first_lsn,
        last_lsn: report.last_lsn,
        checkpoint_lsn: report.checkpoint_lsn,
        problem: report.problem.map(|p| JournalProblem {
            segment: p.segment,
            offset: p.offset,
            reason: p.reason,
            torn_tail: p.torn_tail,
            bytes_after: p.bytes_after,
        }),
        repaired,
    }
}

/// The kernel as seen by one authenticated caller.
#[derive(Clone)]
pub struct Session {
    kernel: Arc<Kernel>,
    caller: Caller,
}

impl Session {
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// See [`Kernel::submit_to`].
    pub async fn submit_to(&self, batch: SubmitBatch, queue: &CompletionQueue) -> Result<Submitted> {
        self.kernel.submit_to(&self.caller, batch, queue).await
    }
}

impl AgentsApi for Session {
    async fn create_agent(&self, req: CreateAgent) -> Result<Agent> {
        self.kernel.create_agent(&self.caller, req).await
    }
    async fn list_agents(&self, req: ListAgents) -> Result<AgentPage> {
        self.kernel.list_agents(&self.caller, req)
    }
    async fn get_agent(&self, id: AgentId) -> Result<Agent> {
        self.kernel.get_agent(&self.caller, &id)
    }
    async fn delete_agent(&self, id: AgentId) -> Result<()> {
        self.kernel.delete_agent(&self.caller, &id).await
    }
    async fn state_get(&self, agent: AgentId, key: String) -> Result<StateEntry> {
        self.kernel.state_get(&self.caller, &agent, &key)
    }
    async fn state_set(&self, agent: AgentId, key: String, req: SetState) -> Result<StateEntry> {
        self.kernel.state_set(&self.caller, &agent, key, req).await
    }
    async fn state_delete(&self, agent: AgentId, key: String, if_version: Option<u64>) -> Result<()> {
        self.kernel.state_delete(&self.caller, &agent, key, if_version).await
    }
    async fn state_list(&self, agent: AgentId, req: ListState) -> Result<StatePage> {
        self.kernel.state_list(&self.caller, &agent, req)
    }
    async fn status(&self) -> Result<Status> {
        self.kernel.status(&self.caller)
    }
}

impl RingApi for Session {
    async fn submit_ops(&self, batch: SubmitBatch) -> Result<Submitted> {
        self.kernel.submit(&self.caller, batch).await
    }
    async fn get_op(&self, id: OpId) -> Result<OpInfo> {
        self.kernel.op(&self.caller, &id)
    }
    async fn wait_op(&self, id: OpId, timeout: Duration) -> Result<OpInfo> {
        self.kernel.wait_op(&self.caller, &id, timeout).await
    }
    async fn cancel_op(&self, id: OpId) -> Result<OpInfo> {
        self.kernel.cancel_op(&self.caller, &id).await
    }
    async fn ring_stats(&self) -> Result<RingStats> {
        Ok(self.kernel.ring_stats(&self.caller))
    }
    async fn resolve_op(&self, id: OpId, resolution: Resolution) -> Result<OpInfo> {
        self.kernel.resolve_op(&self.caller, &id, resolution).await
    }
    async fn wal_status(&self) -> Result<WalStatus> {
        self.kernel.wal_status(&self.caller).await
    }
    async fn breakers(&self) -> Result<Vec<BreakerInfo>> {
        Ok(self.kernel.breakers(&self.caller))
    }
    async fn reset_breakers(&self, req: ResetBreakers) -> Result<Vec<BreakerInfo>> {
        self.kernel
            .reset_breakers(&self.caller, req.tenant.as_deref(), req.target.as_deref())
    }
}

impl QuotaApi for Session {
    async fn quota(&self, node: Node) -> Result<QuotaInfo> {
        self.kernel.quota(&self.caller, &node)
    }
    async fn set_quota(&self, node: Node, update: QuotaLimits) -> Result<QuotaInfo> {
        self.kernel.set_quota(&self.caller, &node, update).await
    }
    async fn list_quotas(&self) -> Result<Vec<QuotaInfo>> {
        self.kernel.list_quotas(&self.caller)
    }
    async fn cgroup_status(&self) -> Result<CgroupStatus> {
        self.kernel.cgroup_status(&self.caller)
    }
    async fn gpu_status(&self) -> Result<GpuStatus> {
        self.kernel.gpu_status(&self.caller).await
    }
}
