//! The BBX kernel: agents as kernel objects and their durable state.
//!
//! `bbx-kernel` owns the objects the rest of BBX acts on. An agent is a record (id,
//! name, tenant, labels, status, creation time) plus a state store of versioned JSON
//! values; both are [`bbx_agents`]', stored through [`bbx_store`], whose group
//! committer journals every write before it is acknowledged. The kernel confines
//! them to tenants and lists them; its own writes (keys, quotas, completions) are
//! its `store::Write`. The kernel also owns the API keys that admit callers
//! ([`auth`]): on first start it mints an administrator key, keeps only its digest,
//! and writes the key to `DATA_DIR/admin.key` (mode 0600).
//!
//! The kernel also runs the AgentRing (`ring`): ops submitted in batches, journaled
//! with group commit before they are acknowledged, scheduled by priority with aging
//! and per-agent fairness, executed through per-tenant, per-target circuit breakers,
//! and completed with their effect in one atomic store group, so that recovery runs
//! an op exactly when it had not happened.
//!
//! Every operation takes the [`Caller`] that the front end authenticated, so
//! tenant confinement is enforced here, once, not in each front end: another
//! tenant's object is answered exactly as a missing one ([`Caller::check_owner`]).
//! [`Session`] binds a caller to the kernel and implements the API traits of
//! [`bbx_core::api`].

mod agents;
mod auth;
mod completions;
mod endpoints;
mod host;
mod journal_check;
mod ops;
mod quota;
mod session;
mod shm;

pub use auth::{CreateToken, CreatedToken, TokenCheck};
pub use bbx_auth::{ADMIN_KEY_FILE, Access, Action, AuditEvent, AuditKind, AuditQuery, Caller, Role};
pub use bbx_ring::RingMetrics;
pub use bbx_store::{JournalMetrics, StoreMetrics};
pub use completions::CompletionQueue;
pub use journal_check::{JournalCheck, JournalProblem, repair_journal, verify_journal};
pub use session::Session;

use bbx_agents::{decode_agent, decode_state};
use bbx_core::api::prelude::*;
use bbx_core::config::KernelConfig;
use bbx_core::model::{
    Agent, AgentPage, AgentStatus, CreateAgent, DEFAULT_TENANT, ListAgents, ListState, SetState, StateEntry, StatePage,
    Status, StorageStatus, page_limit,
};
use bbx_core::op::{
    BreakerInfo, Completion, OpInfo, ResetBreakers, Resolution, RingStats, SubmitBatch, Submitted, WalStatus,
};
use bbx_core::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result, validate};
use bbx_ring::runtime::{self as ring, Ring};
use bbx_store::{Applied, Store, storage_error};
use chrono::Utc;
use fjall::Readable;
use host::KernelHandle;
use ops::spawn_store_checkpoints;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::ops::Bound;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use std::time::Instant;
use tokio_util::task::TaskTracker;

/// Agents one page of `list_agents` reads at most, matching its filter or not.
pub const LIST_SCAN_BUDGET: usize = 10_000;

/// The AgentRing's journal, inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// Agents' workspaces (one directory each), inside the data directory.
pub const WORKSPACES_DIR: &str = "workspaces";
/// The cgroup subtree, below the kernel's own, that tool runs' groups are made in;
/// each data directory gets its own below it (see [`cgroup_scope`]).
const CGROUP_SCOPE: &str = "bbx";
/// Notices (run steps, flow decisions) the event stream holds for a reader
/// that falls behind, before it is told how many it missed.
const NOTICES_BUFFERED: usize = 4096;

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
    keys: bbx_auth::Keys,
    tokens: bbx_auth::Tokens,
    /// Custom authorization policies, beyond the built-in roles.
    policies: bbx_auth::Policies,
    /// Outside OpenID Connect issuers whose tokens are accepted.
    oidc: bbx_auth::oidc::Oidc,
    /// The tenants' secrets, which tool ops name.
    secrets: Arc<bbx_auth::secrets::Secrets>,
    throttle: bbx_auth::Throttle,
    started: Instant,
    closing: AtomicBool,
    shm_sessions: Arc<shm::Sessions>,
    tenants: TenantCache,
    quotas: Arc<bbx_quota::Quotas>,
    /// Serializes quota updates (read, merge, store).
    quota_updates: tokio::sync::Mutex<()>,
    tools: Arc<bbx_tools::Tools>,
    components: Arc<bbx_component::Components>,
    /// What components act with outside of an op.
    context: bbx_component::Context,
    /// Set once the components have started.
    endpoints: std::sync::OnceLock<Vec<bbx_component::Endpoint>>,
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
        Self::open_with(config, Vec::new()).await
    }

    /// Opens the kernel with `extra` components registered after its own (an
    /// embedder's, or a test's).
    pub async fn open_with(config: KernelConfig, extra: Vec<Arc<dyn bbx_component::Component>>) -> Result<Opened> {
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
                // Point-in-time recovery replays the store writes of its window.
                history: Duration::from_secs(config.ring.journal_history_secs.max(config.snapshots.pitr_window_secs)),
                history_bytes: config.ring.journal_history_bytes,
                ..Default::default()
            },
        )
        .map_err(|e| Error::unavailable(e.to_string()))?;
        if let Some(tail) = &recovery.truncated_tail {
            tracing::warn!(segment = %tail.segment.display(), offset = tail.offset, bytes = tail.bytes,
                reason = %tail.reason, "truncated a torn write at the end of the journal");
        }
        let next_lsn = journal.status().next_lsn;
        let ring_metrics = RingMetrics::new();
        let journal_metrics = JournalMetrics::default();
        let journal = bbx_store::JournalWriter::start(
            journal,
            recovery.records.iter().map(|r| r.lsn).collect(),
            journal_metrics.clone(),
            config.ring.journal_nice,
        )?;
        let store = Arc::new(Store::open(
            db,
            &all_keyspaces(&extra),
            journal.clone(),
            &recovery.records,
            bbx_store::StoreOptions {
                commit_max_batch: config.commit_max_batch,
                max_record: bbx_journal::max_payload(segment_bytes),
                committer_nice: config.ring.committer_nice,
                next_lsn,
            },
        )?);
        let keys = bbx_auth::Keys::load(store.clone(), &config.data_dir)?;
        let tokens = bbx_auth::Tokens::open(store.clone()).await?;
        let policies = bbx_auth::Policies::open(store.clone())?;
        let oidc = bbx_auth::oidc::Oidc::new(&config.auth.oidc)?;
        let tasks = TaskTracker::new();
        let secrets = Arc::new(bbx_auth::secrets::Secrets::open(store.clone(), &config.data_dir)?);
        let quotas = Arc::new(bbx_quota::stored::load(&store)?);
        let tools = Arc::new(
            bbx_tools::Tools::new(
                bbx_tools::ToolsConfig {
                    workspaces: config.data_dir.join(WORKSPACES_DIR),
                    run_as: (config.tools.run_as_uid, config.tools.run_as_gid),
                    unsandboxed_shell: config.tools.unsandboxed_shell,
                    llm: config.tools.llm.clone(),
                    mcp: config.tools.mcp.clone(),
                },
                bbx_quota::cgroup::detect(&cgroup_scope(&config.data_dir)),
            )?
            .with_secrets(Arc::new(auth::SecretsForTools {
                secrets: secrets.clone(),
                store: store.clone(),
                tasks: tasks.clone(),
            })),
        );
        let mut components = components(&tools, &quotas, &config)?;
        for component in extra {
            components.register(component)?;
        }
        let components = Arc::new(components);
        let ring = Ring::open(
            config.ring.clone(),
            store.clone(),
            journal,
            ring_metrics,
            recovery.records,
            tasks.clone(),
            ring::Services {
                quotas: quotas.clone(),
                components: components.clone(),
            },
        )
        .await?;
        spawn_store_checkpoints(&tasks, store.clone(), ring.stopping());
        let kernel = Arc::new_cyclic(|kernel: &std::sync::Weak<Self>| Self {
            context: bbx_component::Context {
                store: store.clone(),
                tasks: tasks.clone(),
                stopping: ring.stopping(),
                submitter: Arc::new(KernelHandle(kernel.clone())),
                agents: Arc::new(KernelHandle(kernel.clone())),
                kinds: Arc::new(op_kinds(&components)),
                notices: tokio::sync::broadcast::channel(NOTICES_BUFFERED).0,
            },
            components,
            endpoints: std::sync::OnceLock::new(),
            config,
            store,
            journal_metrics,
            ring,
            tasks,
            keys,
            tokens,
            policies,
            oidc,
            secrets,
            throttle: bbx_auth::Throttle::default(),
            started: Instant::now(),
            closing: AtomicBool::new(false),
            shm_sessions: Arc::default(),
            tenants: TenantCache::default(),
            quotas,
            quota_updates: tokio::sync::Mutex::new(()),
            tools,
        });
        kernel.components.start(&kernel.context)?;
        let _ = kernel.endpoints.set(kernel.collect_endpoints()?);
        let admin_key_written = kernel.keys.mint_first_admin_key().await?;
        Ok(Opened {
            kernel,
            admin_key_written,
        })
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    pub fn metrics(&self) -> &StoreMetrics {
        self.store.metrics()
    }

    /// The component of type `T`, as itself: a benchmark or an embedder
    /// calling it in process.
    pub fn component<T: bbx_component::Component>(&self) -> Option<Arc<T>> {
        self.components.typed::<T>()
    }

    pub fn journal_metrics(&self) -> &JournalMetrics {
        &self.journal_metrics
    }

    pub fn ring_metrics(&self) -> &RingMetrics {
        self.ring.metrics()
    }

    /// Registers the components' metrics (flow decisions, say).
    pub fn register_component_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.components.register_metrics(registry);
    }

    /// Ready to serve: open, not closing, storage healthy.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why the kernel is not ready to serve, if it is not, as a public probe
    /// may say it: shutting down, a panic, or storage that failed (and whether
    /// the data directory's disk is full, the usual cause). The failure itself,
    /// with its paths, is in the log.
    pub fn not_ready(&self) -> Option<String> {
        if self.closing.load(Ordering::Acquire) {
            return Some("the kernel is shutting down".to_owned());
        }
        if self.store.failure().is_none() {
            return self
                .ring
                .is_poisoned()
                .then(|| "the ring panicked while changing its state; see the kernel's log".to_owned());
        }
        let full = rustix::fs::statvfs(&self.config.data_dir).is_ok_and(|fs| fs.f_bavail == 0);
        Some(match full {
            true => "storage failed: no space is left on the data directory's disk; make room and restart the kernel (nothing acknowledged is lost); the kernel's log has the details".to_owned(),
            false => "storage failed; restart the kernel (nothing acknowledged is lost); the kernel's log has the details".to_owned(),
        })
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

    pub fn session(self: &Arc<Self>, caller: Caller) -> Session {
        Session {
            kernel: self.clone(),
            caller,
        }
    }
}

/// Every keyspace the store opens: the ring's, the kernel's components' and
/// `extra`'s.
fn all_keyspaces(extra: &[Arc<dyn bbx_component::Component>]) -> Vec<bbx_store::KeyspaceDef> {
    let mut all = bbx_agents::KEYSPACES.to_vec();
    all.extend([
        bbx_auth::API_KEYS,
        bbx_auth::SIGNING_KEYS,
        bbx_auth::REVOKED_TOKENS,
        bbx_auth::AUDIT,
        bbx_auth::AUTH_POLICIES,
        bbx_auth::secrets::SECRETS,
    ]);
    all.extend(bbx_ring::runtime::store::KEYSPACES);
    all.extend(bbx_quota::stored::KEYSPACES);
    all.extend(bbx_flow::KEYSPACES);
    all.extend(bbx_bus::KEYSPACES);
    all.extend(bbx_memory::KEYSPACES);
    all.extend(bbx_context::KEYSPACES);
    all.extend(bbx_goal::KEYSPACES);
    all.extend(bbx_snapshot::KEYSPACES);
    all.extend(extra.iter().flat_map(|component| component.keyspaces().iter().copied()));
    all
}

/// The components whose op kinds the ring serves: one line each.
fn components(
    tools: &Arc<bbx_tools::Tools>,
    quotas: &Arc<bbx_quota::Quotas>,
    config: &KernelConfig,
) -> Result<bbx_component::Components> {
    let mut components = bbx_component::Components::default();
    components.register(Arc::new(bbx_component::builtin::Builtin))?;
    components.register(Arc::new(bbx_agents::StateOps))?;
    components.register(Arc::new(bbx_tools::ToolKinds::new(tools.clone(), quotas.clone())))?;
    let flow = Arc::new(bbx_flow::Flow::new(&config.flow));
    components.register(flow.clone())?;
    let bus = Arc::new(bbx_bus::Bus::new(&config.bus));
    bus.set_access(flow);
    components.register(bus)?;
    let memories = Arc::new(bbx_memory::Memories::new(&config.memory, &config.data_dir)?);
    components.register(memories.clone())?;
    let contexts = Arc::new(bbx_context::Contexts::new(&config.context)?);
    tools.set_windows(contexts.clone());
    contexts.set_memory(memories);
    components.register(contexts)?;
    components.register(Arc::new(bbx_goal::Goals::new(&config.goals, &config.tools.llm)))?;
    components.register(Arc::new(bbx_snapshot::Snapshots::new(
        &config.snapshots,
        &config.data_dir,
        &config.data_dir.join(JOURNAL_DIR),
        &config.data_dir.join(WORKSPACES_DIR),
    )))?;
    Ok(components)
}

/// Every op kind the ring serves: its own `noop`, then the components'.
fn op_kinds(components: &bbx_component::Components) -> Vec<(bbx_component::OpKind, Option<serde_json::Value>)> {
    let noop = bbx_component::OpKind {
        name: "noop",
        effects: bbx_core::op::Effects::None,
    };
    let mut kinds = vec![(noop, None)];
    kinds.extend(components.kinds());
    kinds
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
