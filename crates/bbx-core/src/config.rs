//! The kernel's configuration.
//!
//! Three layers, later ones winning: a TOML file, `BBX_*` environment variables, and
//! command-line flags. The CLI folds environment and flags into one
//! [`ConfigLayer`] (clap reads both, flags first), so this module only merges
//! two layers and the defaults. Unknown keys in the file are errors: a misspelled
//! setting must not silently fall back to a default.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod bus;
mod context;
mod goals;
mod memory;
mod objects;
mod snapshots;
pub use bus::{BusConfig, MAX_PARTITIONS, TopicDefaults};
pub use context::{ContextConfig, TierBudgets};
pub use goals::GoalsConfig;
pub use memory::{ForgetSchedule, IndexSettings, MemoryConfig, NearDuplicate, Quantization, RemoteEmbedder};
pub use objects::S3Bucket;
pub use snapshots::{RetentionConfig, SnapshotStoreConfig, SnapshotsConfig};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_COMMIT_MAX_BATCH: usize = 4096;
pub const MAX_COMMIT_MAX_BATCH: usize = 65_536;
/// The storage engine reports every flush at info; that is noise to an operator.
pub const DEFAULT_LOG: &str = "info,fjall=warn,lsm_tree=warn";

/// The effective configuration of a kernel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelConfig {
    /// Address of the HTTP API, MCP endpoint and metrics. Loopback by default.
    pub listen: SocketAddr,
    /// Where all state lives.
    pub data_dir: PathBuf,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most writes that share one fdatasync.
    pub commit_max_batch: usize,
    /// tracing filter, e.g. "info" or "bbx_kernel=debug".
    pub log: String,
    /// The AgentRing's queues, limits and breakers (`[ring]` in the file).
    pub ring: RingConfig,
    /// How tools run (`[tools]` in the file).
    pub tools: ToolsConfig,
    /// Outside identity providers (`[auth]` in the file).
    pub auth: AuthConfig,
    /// FlowIntegrity (`[flow]` in the file).
    pub flow: FlowConfig,
    /// The MessageBus (`[bus]` in the file).
    pub bus: BusConfig,
    /// SemanticMemory (`[memory]` in the file).
    pub memory: MemoryConfig,
    /// ContextTiering (`[context]` in the file).
    pub context: ContextConfig,
    /// GoalEngine (`[goals]` in the file).
    pub goals: GoalsConfig,
    /// StateSnapshots (`[snapshots]` in the file).
    pub snapshots: SnapshotsConfig,
}

/// FlowIntegrity's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// Anomaly detection (`[flow.anomaly]`).
    pub anomaly: AnomalyConfig,
}

/// Anomaly detection: a baseline of each agent's behaviour, and an Isolation
/// Forest that scores each op against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    pub enabled: bool,
    /// The most recent ops a model learns from [default: 512].
    pub window: usize,
    /// Ops an agent runs before anything is decided of it [default: 200].
    pub min_observations: usize,
    /// New ops after which a model is trained again [default: 256].
    pub retrain_every: usize,
    /// What an anomalous op gets: `warn`, `require_approval` or `quarantine`
    /// [default: warn].
    pub action: String,
    /// The score (0-1) from which an op is anomalous; without it each model sets
    /// its own, just above what its window scores.
    pub threshold: Option<f32>,
    /// An agent's ops a second the detector learns from and scores at most when
    /// anomalies are only warned of; past it, they go unobserved and are counted
    /// [default: 1000].
    pub max_ops_per_sec: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 512,
            min_observations: 200,
            retrain_every: 256,
            action: "warn".to_owned(),
            threshold: None,
            max_ops_per_sec: 1000,
        }
    }
}

impl AnomalyConfig {
    pub fn validate(&self) -> Result<()> {
        if !(64..=65_536).contains(&self.window) {
            return Err(Error::invalid_field(
                "flow.anomaly.window",
                "flow.anomaly.window must be 64-65536",
            ));
        }
        if self.min_observations < 32 || self.min_observations > self.window {
            return Err(Error::invalid_field(
                "flow.anomaly.min_observations",
                "flow.anomaly.min_observations must be at least 32 and at most the window",
            ));
        }
        if self.retrain_every == 0 {
            return Err(Error::invalid_field(
                "flow.anomaly.retrain_every",
                "flow.anomaly.retrain_every must be at least 1",
            ));
        }
        if !["warn", "require_approval", "quarantine"].contains(&self.action.as_str()) {
            return Err(Error::invalid_field(
                "flow.anomaly.action",
                "flow.anomaly.action must be warn, require_approval or quarantine",
            ));
        }
        if self.max_ops_per_sec == 0 {
            return Err(Error::invalid_field(
                "flow.anomaly.max_ops_per_sec",
                "flow.anomaly.max_ops_per_sec must be at least 1",
            ));
        }
        if self.threshold.is_some_and(|t| !(t > 0.0 && t < 1.0)) {
            return Err(Error::invalid_field(
                "flow.anomaly.threshold",
                "flow.anomaly.threshold must be between 0 and 1",
            ));
        }
        Ok(())
    }
}

/// Who besides the kernel's own keys and tokens may authenticate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// OpenID Connect issuers whose access tokens are accepted (`[[auth.oidc]]`).
    pub oidc: Vec<OidcIssuer>,
}

/// An OpenID Connect issuer: its tokens' signatures are checked against the keys
/// its discovery document publishes, and their claims map to a tenant and a role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuer {
    /// The issuer's URL, exactly as its tokens' `iss` and its discovery document say.
    pub issuer: String,
    /// What a token's `aud` must include.
    pub audience: String,
    /// Every token of this issuer acts in this tenant...
    #[serde(default)]
    pub tenant: Option<String>,
    /// ...or in the tenant this claim names [default: `tenant`].
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim holding the caller's roles: a string array, or a space-separated
    /// string such as `scope` [default: `roles`].
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The issuer's role names -> BBX roles; without it, a role claim's values are
    /// BBX role names. The most privileged role mapped wins; `admin` is never given.
    #[serde(default)]
    pub role_map: std::collections::BTreeMap<String, crate::model::Role>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds [default: 60].
    #[serde(default = "default_oidc_leeway")]
    pub leeway_secs: u64,
    /// The least time between two fetches of the issuer's keys on an unknown
    /// `kid`, in seconds [default: 10].
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_secs: u64,
}

impl OidcIssuer {
    fn validate(&self) -> Result<()> {
        let field = |what: &str| format!("auth.oidc[{}].{what}", self.issuer);
        if !(self.issuer.starts_with("https://") || is_loopback_http(&self.issuer)) {
            return Err(Error::invalid_field(
                "auth.oidc.issuer",
                format!(
                    "{:?} is not an https URL (plain http only to this machine: its keys could be swapped on the way)",
                    self.issuer
                ),
            ));
        }
        if self.audience.is_empty() {
            return Err(Error::invalid_field(&field("audience"), "an issuer needs an audience"));
        }
        if let Some(tenant) = &self.tenant {
            crate::validate::tenant(tenant)?;
        }
        if self.role_map.values().any(|role| *role == crate::model::Role::Admin) {
            return Err(Error::invalid_field(
                &field("role_map"),
                "an outside issuer cannot make administrators of every tenant; map to tenant_admin",
            ));
        }
        Ok(())
    }
}

/// Whether `url` is plain http to this machine (`127.0.0.0/8`, `[::1]`, `localhost`).
pub fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
    host == "localhost" || host == "[::1]" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

fn default_tenant_claim() -> String {
    "tenant".to_owned()
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

fn default_oidc_leeway() -> u64 {
    60
}

fn default_jwks_min_refetch() -> u64 {
    10
}

/// How tool processes run. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// The uid `tool.shell` programs run as when the kernel is root (never 0).
    pub run_as_uid: u32,
    pub run_as_gid: u32,
    /// Let `tool.shell` run programs unconfined, as the kernel's own user, when the
    /// kernel is not root and cannot sandbox them. Off: such runs are refused.
    pub unsandboxed_shell: bool,
    /// OpenAI-compatible endpoints for `llm.chat` (`[tools.llm]`).
    pub llm: LlmConfig,
    /// MCP servers any agent's `tool.mcp` may call (`[tools.mcp.NAME]`), on top of
    /// the streamable HTTP ones an agent lists in its own tool settings.
    pub mcp: std::collections::BTreeMap<String, McpServer>,
}

/// An MCP server the operator configured: a command run over stdio, or a
/// streamable HTTP URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServer {
    /// Program and arguments, started for each call and spoken to over stdio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Variables set for the command (it inherits no others).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// A streamable HTTP endpoint instead of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The endpoints `llm.chat` may call and what their models cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Endpoints by name, e.g. `local = { base_url = "http://127.0.0.1:11434/v1" }`.
    pub endpoints: std::collections::BTreeMap<String, LlmEndpoint>,
    /// USD per million tokens, by model name.
    pub prices: std::collections::BTreeMap<String, ModelPrice>,
    /// `max_tokens` of a call that gives none.
    pub default_max_tokens: u32,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            endpoints: Default::default(),
            prices: Default::default(),
            default_max_tokens: 1024,
        }
    }
}

/// One OpenAI-compatible API (Ollama, vLLM, llama.cpp server, a hosted one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmEndpoint {
    /// Up to and including the version, e.g. "https://api.openai.com/v1".
    pub base_url: String,
    /// The environment variable holding its API key, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

/// What a model costs, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Default for ToolsConfig {
    /// `nobody:nogroup`.
    fn default() -> Self {
        Self {
            run_as_uid: 65534,
            run_as_gid: 65534,
            unsandboxed_shell: false,
            llm: LlmConfig::default(),
            mcp: Default::default(),
        }
    }
}

/// Settings of the AgentRing. Every field has a default, so a file may give any subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Ops accepted and not yet started; a full queue answers 429.
    pub submission_capacity: usize,
    /// Of those, the most one agent may hold.
    pub agent_capacity: usize,
    /// Completions waiting to be made durable; when full, no new op starts.
    pub completion_capacity: usize,
    /// Ops running at once.
    pub max_running: usize,
    /// How long a waiting op takes to gain one priority level.
    pub aging_ms: u64,
    /// Refuse `LOW` ops once the submission queue is this full (0.0-1.0); unset keeps them.
    pub shed_low_above: Option<f64>,
    /// Timeout of an attempt when the op gives none.
    pub default_timeout_ms: u64,
    /// Largest `args` of one op, as JSON.
    pub max_args_bytes: usize,
    /// Most ops in one submission.
    pub max_batch: usize,
    /// How long completions and idempotency keys are kept after an op completes;
    /// at least [`RingConfig::MIN_RETENTION_SECS`], so that a client's retry
    /// within a reasonable time always finds its key.
    pub retention_secs: u64,
    /// Consecutive failures that open a target's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before a trial.
    pub breaker_open_ms: u64,
    /// Trial calls let through by a half-open breaker.
    pub breaker_trials: u32,
    /// Size at which a journal segment rolls over.
    pub journal_segment_bytes: u64,
    /// How long the journal keeps records that recovery no longer replays, as
    /// history: the store's redo records that a point-in-time recovery replays.
    /// Counted from a segment's last write; 0 (the default) keeps none. Apart
    /// from op replay and from `retention_secs`.
    pub journal_history_secs: u64,
    /// The most bytes of journal history kept: the oldest segments go first.
    pub journal_history_bytes: u64,
    /// Completions of ops without effects kept in memory for reaping: the newest
    /// this many at least, twice this many at most. Kept small on purpose: each
    /// one is a few hundred bytes, and a table larger than the CPU caches makes
    /// every new completion a cache miss (`inproc` ran 17 % slower with 65 536).
    pub recent_completions: usize,
    /// Seconds between passes that copy the journal records of long-running ops
    /// forward, so that one op running for hours does not pin everything journaled
    /// after it.
    pub journal_copy_forward_secs: u64,
    /// Nice value the journal's writer thread asks for, -20 to 0 (0, the default,
    /// leaves it as the process has it). On busy cores each of its wakeups (every
    /// `fdatasync`) otherwise waits for a core: a lower value acknowledges sooner
    /// (group syncs at p99 0.17–0.27 ms against 0.26–1.1 ms on 2 saturated cores), but in
    /// smaller groups, so more syncs share the same CPU; on a kernel confined to one
    /// core that lengthened the single-op tail (see docs/bench/ring.md). Applied only
    /// where the process may raise a thread's priority (`CAP_SYS_NICE`, or
    /// `RLIMIT_NICE`); `bbx ring wal-status` shows what is in force.
    pub journal_nice: i32,
    /// Nice value of the store's committer thread, 0 to 19 (default 10: a lower
    /// priority). The committer applies each group of store writes in one run of
    /// tens of microseconds, and on busy cores the journal thread, woken by every
    /// `fdatasync`, waited behind it more than behind anything else; at a lower
    /// weight it yields the core sooner and takes larger groups instead. Lowering a
    /// thread's priority needs no privilege (docs/bench/ring.md has the runs).
    pub committer_nice: i32,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            submission_capacity: 8192,
            agent_capacity: 2048,
            completion_capacity: 8192,
            max_running: 256,
            aging_ms: 100,
            shed_low_above: None,
            default_timeout_ms: 30_000,
            max_args_bytes: 64 * 1024,
            max_batch: 4096,
            retention_secs: 24 * 3600,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
            breaker_trials: 1,
            journal_segment_bytes: 64 << 20,
            journal_history_secs: 0,
            journal_history_bytes: 8 << 30,
            recent_completions: 8192,
            journal_copy_forward_secs: 10,
            journal_nice: 0,
            committer_nice: 10,
        }
    }
}

impl RingConfig {
    /// The shortest `ring.retention_secs` allowed.
    pub const MIN_RETENTION_SECS: u64 = 60;
    /// The longest: ten years.
    pub const MAX_RETENTION_SECS: u64 = 10 * 366 * 24 * 3600;

    fn validate(&self) -> Result<()> {
        if !(Self::MIN_RETENTION_SECS..=Self::MAX_RETENTION_SECS).contains(&self.retention_secs) {
            return Err(Error::invalid_field(
                "ring.retention_secs",
                format!(
                    "ring.retention_secs must be {} (a minute) to {} (ten years)",
                    Self::MIN_RETENTION_SECS,
                    Self::MAX_RETENTION_SECS
                ),
            ));
        }
        if self.journal_history_secs > Self::MAX_RETENTION_SECS {
            return Err(Error::invalid_field(
                "ring.journal_history_secs",
                format!(
                    "ring.journal_history_secs is at most {} (ten years)",
                    Self::MAX_RETENTION_SECS
                ),
            ));
        }
        let positive = [
            ("ring.submission_capacity", self.submission_capacity),
            ("ring.agent_capacity", self.agent_capacity),
            ("ring.completion_capacity", self.completion_capacity),
            ("ring.max_running", self.max_running),
            ("ring.max_batch", self.max_batch),
            ("ring.max_args_bytes", self.max_args_bytes),
            ("ring.breaker_failures", self.breaker_failures as usize),
            ("ring.breaker_trials", self.breaker_trials as usize),
            (
                "ring.journal_copy_forward_secs",
                self.journal_copy_forward_secs as usize,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::invalid_field(field, format!("{field} must be at least 1")));
            }
        }
        if self.shed_low_above.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
            return Err(Error::invalid_field(
                "ring.shed_low_above",
                "ring.shed_low_above must be between 0.0 and 1.0",
            ));
        }
        if self.default_timeout_ms == 0 {
            return Err(Error::invalid_field(
                "ring.default_timeout_ms",
                "ring.default_timeout_ms must be at least 1",
            ));
        }
        if !(-20..=0).contains(&self.journal_nice) {
            return Err(Error::invalid_field(
                "ring.journal_nice",
                "ring.journal_nice must be between -20 and 0",
            ));
        }
        if !(0..=19).contains(&self.committer_nice) {
            return Err(Error::invalid_field(
                "ring.committer_nice",
                "ring.committer_nice must be between 0 and 19",
            ));
        }
        if self.journal_segment_bytes < 4096 {
            return Err(Error::invalid_field(
                "ring.journal_segment_bytes",
                "ring.journal_segment_bytes must be at least 4096",
            ));
        }
        Ok(())
    }
}

/// One layer of settings, every key optional: the TOML file is one layer, flags and
/// environment together are another.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    pub commit_max_batch: Option<usize>,
    pub log: Option<String>,
    pub ring: Option<RingConfig>,
    pub tools: Option<ToolsConfig>,
    pub auth: Option<AuthConfig>,
    pub flow: Option<FlowConfig>,
    pub bus: Option<BusConfig>,
    pub memory: Option<MemoryConfig>,
    pub context: Option<ContextConfig>,
    pub goals: Option<GoalsConfig>,
    pub snapshots: Option<SnapshotsConfig>,
}

impl ConfigLayer {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid_field("config", format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::invalid_field("config", format!("{}: {}", path.display(), e.message)))
    }

    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid_field("config", e.message().to_owned()))
    }
}

impl KernelConfig {
    /// Settings from `over` where given, else from `file`, else the defaults.
    pub fn resolve(file: ConfigLayer, over: ConfigLayer) -> Result<Self> {
        let config = Self {
            listen: over
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default listen address parses")),
            data_dir: over.data_dir.or(file.data_dir).unwrap_or_else(default_data_dir),
            max_body_bytes: over
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(DEFAULT_MAX_BODY_BYTES),
            commit_max_batch: over
                .commit_max_batch
                .or(file.commit_max_batch)
                .unwrap_or(DEFAULT_COMMIT_MAX_BATCH),
            log: over.log.or(file.log).unwrap_or_else(|| DEFAULT_LOG.to_owned()),
            ring: over.ring.or(file.ring).unwrap_or_default(),
            tools: over.tools.or(file.tools).unwrap_or_default(),
            auth: over.auth.or(file.auth).unwrap_or_default(),
            flow: over.flow.or(file.flow).unwrap_or_default(),
            bus: over.bus.or(file.bus).unwrap_or_default(),
            memory: over.memory.or(file.memory).unwrap_or_default(),
            context: over.context.or(file.context).unwrap_or_default(),
            goals: over.goals.or(file.goals).unwrap_or_default(),
            snapshots: over.snapshots.or(file.snapshots).unwrap_or_default(),
        };
        let config = Self {
            data_dir: std::path::absolute(&config.data_dir).map_err(|e| {
                Error::invalid_field("data_dir", format!("cannot resolve {}: {e}", config.data_dir.display()))
            })?,
            // A message is published in one request body: the smaller limit wins.
            bus: BusConfig {
                max_message_bytes: config.bus.max_message_bytes.min(config.max_body_bytes),
                ..config.bus.clone()
            },
            ..config
        };
        if config.max_body_bytes < 1024 {
            return Err(Error::invalid_field(
                "max_body_bytes",
                "max_body_bytes must be at least 1024",
            ));
        }
        if !(1..=MAX_COMMIT_MAX_BATCH).contains(&config.commit_max_batch) {
            return Err(Error::invalid_field(
                "commit_max_batch",
                format!("commit_max_batch must be 1-{MAX_COMMIT_MAX_BATCH}"),
            ));
        }
        config.ring.validate()?;
        config.flow.anomaly.validate()?;
        config.bus.validate()?;
        config.memory.validate()?;
        config.context.validate()?;
        config.goals.validate()?;
        config.snapshots.validate()?;
        for issuer in &config.auth.oidc {
            issuer.validate()?;
        }
        // Any one stored value (bounded by a request body) must fit in a journal
        // record with room to spare, or the store could not journal it.
        if config.ring.journal_segment_bytes < 4 * config.max_body_bytes as u64 {
            return Err(Error::invalid_field(
                "ring.journal_segment_bytes",
                "ring.journal_segment_bytes must be at least 4 × max_body_bytes",
            ));
        }
        for (name, endpoint) in &config.tools.llm.endpoints {
            if !(endpoint.base_url.starts_with("http://") || endpoint.base_url.starts_with("https://")) {
                return Err(Error::invalid_field(
                    "tools.llm.endpoints",
                    format!("endpoint {name:?} needs an http:// or https:// base_url"),
                ));
            }
        }
        for (name, server) in &config.tools.mcp {
            if server.command.is_empty() == server.url.is_none() {
                return Err(Error::invalid_field(
                    "tools.mcp",
                    format!("MCP server {name:?} needs exactly one of command and url"),
                ));
            }
        }
        for (model, price) in &config.tools.llm.prices {
            let valid = |p: f64| p.is_finite() && p >= 0.0;
            if !valid(price.input_per_mtok) || !valid(price.output_per_mtok) {
                return Err(Error::invalid_field(
                    "tools.llm.prices",
                    format!("the price of {model:?} must be finite and not negative"),
                ));
            }
        }
        if config.tools.run_as_uid == 0 || config.tools.run_as_gid == 0 {
            return Err(Error::invalid_field(
                "tools.run_as_uid",
                "tool programs must not run as root: set tools.run_as_uid and run_as_gid above 0",
            ));
        }
        Ok(config)
    }

    /// The effective configuration as TOML, for `bbx config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("KernelConfig always serializes")
    }
}

/// `$XDG_DATA_HOME/bbx`, else `~/.local/share/bbx`, else `./bbx-data`: the same place
/// for the daemon and for a CLI that looks for the admin key, whatever the cwd.
pub fn default_data_dir() -> PathBuf {
    let non_empty = |var| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = non_empty("XDG_DATA_HOME") {
        xdg.join("bbx")
    } else if let Some(home) = non_empty("HOME") {
        home.join(".local/share/bbx")
    } else {
        PathBuf::from("bbx-data")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_beat_file_beats_default() {
        let file = ConfigLayer::parse("listen = \"127.0.0.1:9000\"\nmax_body_bytes = 4096\n").unwrap();
        let over = ConfigLayer {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..Default::default()
        };
        let config = KernelConfig::resolve(file, over).unwrap();
        assert_eq!(config.listen.port(), 9100);
        assert_eq!(config.max_body_bytes, 4096);
        assert_eq!(config.commit_max_batch, DEFAULT_COMMIT_MAX_BATCH);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(ConfigLayer::parse("lisen = \"127.0.0.1:1\"").is_err());
        assert!(ConfigLayer::parse("listen = \"not an address\"").is_err());
        let tiny = ConfigLayer {
            max_body_bytes: Some(10),
            ..Default::default()
        };
        assert!(KernelConfig::resolve(tiny, ConfigLayer::default()).is_err());
        let no_workers = ConfigLayer::parse("[ring]\nmax_running = 0\n").unwrap();
        assert!(KernelConfig::resolve(no_workers, ConfigLayer::default()).is_err());
        assert!(ConfigLayer::parse("[ring]\nmax_runing = 3\n").is_err());
        for (field, nice) in [
            ("journal_nice", "1"),
            ("journal_nice", "-21"),
            ("committer_nice", "-1"),
            ("committer_nice", "20"),
        ] {
            let layer = ConfigLayer::parse(&format!("[ring]\n{field} = {nice}\n")).unwrap();
            let refused = KernelConfig::resolve(layer, ConfigLayer::default()).unwrap_err();
            assert!(refused.to_string().contains(&format!("ring.{field}")), "{refused}");
        }
    }

    #[test]
    fn a_ring_table_may_give_any_subset() {
        let file = ConfigLayer::parse("[ring]\nmax_running = 3\n").unwrap();
        let config = KernelConfig::resolve(file, ConfigLayer::default()).unwrap();
        assert_eq!(config.ring.max_running, 3);
        assert_eq!(
            config.ring.submission_capacity,
            RingConfig::default().submission_capacity
        );
    }

    #[test]
    fn default_listens_on_loopback() {
        let config = KernelConfig::resolve(ConfigLayer::default(), ConfigLayer::default()).unwrap();
        assert!(config.listen.ip().is_loopback());
        assert!(KernelConfig::resolve(ConfigLayer::parse(&config.to_toml()).unwrap(), ConfigLayer::default()).is_ok());
    }
}
