//! The command tree. Every command but `serve`, `config` and `completions` is a
//! client of a running kernel: no state lives in the CLI process.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "bbx", version, about = "BBX, an operating system for AI agents")]
pub struct Cli {
    /// URL of the kernel to talk to [default: http://127.0.0.1:7878].
    #[arg(long, global = true, env = "BBX_URL")]
    pub url: Option<String>,
    /// API key; by default the admin key in the data directory is used.
    #[arg(long, global = true, env = "BBX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Data directory: where `serve` keeps state, and where clients find admin.key.
    #[arg(long, global = true, env = "BBX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the kernel: HTTP API, MCP at /mcp, metrics.
    Serve(ServeArgs),
    /// Serve MCP over stdio, backed by the kernel at --url.
    Mcp,
    /// Show the kernel's status.
    Status,
    /// Create, list, inspect and delete agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Read and write an agent's durable state.
    #[command(subcommand)]
    State(StateCommand),
    /// Submit ops to the AgentRing and reap their completions.
    #[command(subcommand)]
    Ring(RingCommand),
    /// Set and read the quotas of agents and tenants; the host's cgroups and GPUs.
    #[command(subcommand)]
    Quotas(QuotasCommand),
    /// Check or repair the AgentRing's journal (offline).
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Manage API keys (administrators, and tenant administrators for their tenant).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Credentials and what they may do.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// FlowIntegrity: the policies every op passes, taint, quarantine.
    #[command(subcommand)]
    Flow(FlowCommand),
    /// The MessageBus: topics, consumer groups, acks, dead letters.
    #[command(subcommand)]
    Bus(crate::bus::BusCommand),
    /// SemanticMemory: what agents remember, searched by meaning and by words.
    #[command(subcommand)]
    Memory(crate::memory::MemoryCommand),
    /// ContextTiering: an agent's context in tiers, assembled under a budget.
    #[command(subcommand)]
    Context(crate::context::ContextCommand),
    /// GoalEngine: run workflows (DAGs of ops), see and steer their runs.
    #[command(subcommand)]
    Goals(crate::goals::GoalsCommand),
    /// StateSnapshots: save an agent whole, restore, fork, diff, recover to a time.
    #[command(subcommand)]
    Snapshot(crate::snapshots::SnapshotCommand),
    /// Models run in process: fetch them into the data directory.
    #[command(subcommand)]
    Models(crate::memory::ModelsCommand),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Measure BBX.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The reference design's command paths, as aliases.
    #[command(subcommand)]
    V2(V2Command),
    /// `COMPONENT VERB ...`: an endpoint a component declares (`GET /v1/endpoints`
    /// lists them).
    #[command(external_subcommand)]
    Endpoint(Vec<String>),
}

/// Kernel settings; each flag also reads a BBX_* variable, and both beat the file.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "BBX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7878].
    #[arg(long, env = "BBX_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Largest request body in bytes [default: 1048576].
    #[arg(long, env = "BBX_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Most writes sharing one fdatasync [default: 4096].
    #[arg(long, env = "BBX_COMMIT_MAX_BATCH")]
    pub commit_max_batch: Option<usize>,
    /// Log filter, e.g. "info" or "bbx_kernel=debug" [default: info].
    #[arg(long, env = "BBX_LOG")]
    pub log: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an agent.
    Create {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        /// A label as key=value; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// A private, loopback or link-local network its tool.http may reach
        /// (a CIDR, e.g. 127.0.0.0/8); repeat for more.
        #[arg(long = "allow-network", value_name = "CIDR")]
        allow_networks: Vec<String>,
        /// A variable of the kernel's environment passed on to its tool.shell programs; repeat for more.
        #[arg(long = "env-allow", value_name = "NAME")]
        env_allow: Vec<String>,
        /// Run its tool.shell programs with no network.
        #[arg(long)]
        no_network: bool,
        /// A streamable HTTP MCP server its tool.mcp may call, as NAME=URL; repeat for more.
        #[arg(long = "mcp-server", value_name = "NAME=URL")]
        mcp_servers: Vec<String>,
    },
    /// List agents, oldest first.
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Only agents with this label (key=value).
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursors and list every page.
        #[arg(long, conflicts_with = "cursor")]
        all: bool,
    },
    /// Show one agent.
    Get { id: String },
    /// Delete an agent and all its state.
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Read a value.
    Get { agent: String, key: String },
    /// Write a JSON value (acknowledged once on disk).
    Set {
        agent: String,
        key: String,
        /// The value, as JSON: '{"a":1}', '"text"', '42'; `-` reads it from stdin.
        value: String,
        /// Compare-and-swap: write only if the key is at this version (0 = absent).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete a value.
    Delete {
        agent: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// List values by key prefix.
    List {
        agent: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create an API key; its secret is printed once.
    Create {
        name: String,
        /// Confine the key to one tenant's agents.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List API keys.
    List,
    /// Revoke an API key.
    Revoke { id: String },
    /// Offline, with the kernel stopped: mint a new admin key into DATA_DIR/admin.key.
    ResetAdmin,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the configuration `bbx serve` would run with.
    Show(ServeArgs),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// State set/get over HTTP with concurrent clients, cold start, and an fdatasync
    /// reference on the same disk. Without --url it starts its own kernel.
    Api(BenchApiArgs),
    /// The AgentRing: in-process, durable, HTTP batch and single, against an
    /// fdatasync ceiling measured in the same run. Starts its own kernels.
    Ring(BenchRingArgs),
    /// AgentQuotas and the tools: a quota check, tool.shell running `true`, and
    /// tool.http, each next to a reference measured in the same run.
    Tools(BenchToolsArgs),
    /// Auth in process: an API key, a token on first use and cached, next to a
    /// SHA-256 measured in the same run. Starts its own kernel.
    Auth(BenchAuthArgs),
    /// FlowIntegrity's check in process: 20 rules, an unconcerned kind, taint
    /// labelling against 10,000 fingerprints.
    Flow(BenchFlowArgs),
    /// The MessageBus: batched publish next to an fdatasync loop at the same bytes
    /// per sync, unbatched publish from many publishers, and publish-to-delivery
    /// latency over loopback HTTP at a fixed rate. Starts its own kernels.
    Bus(BenchBusArgs),
    /// SemanticMemory in process: embedding throughput, add (durable) next to an
    /// fdatasync loop, vector and hybrid search with recall against exact search,
    /// WordNet retrieval quality; and BBX next to a Chroma server over HTTP.
    Memory(BenchMemoryArgs),
    /// ContextTiering in process: get from each tier, with and without the
    /// migrator busy; assembly over a long context; the importance model
    /// against LRU, LFU and a formula on generated agent sessions; windows
    /// that keep their prefix against cutting the oldest turns; and what
    /// idle agents cost in memory.
    Context(BenchContextArgs),
    /// The GoalEngine in process: what a step costs over its bare op, 1,000
    /// independent and 1,000 chained noop steps, 8 parallel sleeps.
    Goals(BenchGoalsArgs),
    /// StateSnapshots in process: an incremental snapshot of a 100 MB agent
    /// after 1 % of its keys changed, a full restore, point-in-time recovery,
    /// and the ring's durable throughput while snapshots run.
    Snapshot(BenchSnapshotArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BenchSnapshotArgs {
    /// State keys of the agent.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Bytes of each key's value.
    #[arg(long, default_value_t = 10_000)]
    pub value_bytes: usize,
    /// Per cent of the keys rewritten before the incremental snapshot.
    #[arg(long, default_value_t = 1.0)]
    pub changed_percent: f64,
    /// Runs of each measurement (the median is reported, with the range).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also restore the same agent from this S3 endpoint (an S3-compatible
    /// server, e.g. SeaweedFS on loopback), bucket --s3-bucket.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    #[arg(long, default_value = "bbx")]
    pub s3_bucket: String,
    /// Where the scratch kernel goes [default: the system's temporary directory].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchGoalsArgs {
    /// Steps of the chained and of the independent noop workflows.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Runs of each workflow (the median is reported, with the range).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Where the scratch kernel goes [default: the system's temporary directory].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchContextArgs {
    /// Items of the agent whose gets are measured.
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// Items of the agent whose windows are assembled.
    #[arg(long, default_value_t = 10_000)]
    pub assemble_items: usize,
    /// The window's budget, in tokens.
    #[arg(long, default_value_t = 128_000)]
    pub budget: u32,
    /// Agents for the memory phase (each with --items-per-agent items); 0
    /// leaves the phase out.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    #[arg(long, default_value_t = 1000)]
    pub items_per_agent: usize,
    /// Generated sessions the importance model learns from, and is measured on.
    #[arg(long, default_value_t = 30)]
    pub train_sessions: usize,
    #[arg(long, default_value_t = 10)]
    pub test_sessions: usize,
    /// Turns per generated session.
    #[arg(long, default_value_t = 200)]
    pub turns: usize,
    /// Where scratch kernels go [default: the system's temporary directory].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchMemoryArgs {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Memories to load: WordNet's glosses (up to 117,659) unless --synthetic.
    #[arg(long, default_value_t = 100_000)]
    pub memories: usize,
    /// Queries (WordNet's usage examples, or synthetic vectors).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Synthetic clustered vectors instead of WordNet (for 1M).
    #[arg(long)]
    pub synthetic: bool,
    /// Concurrent clients in the HTTP comparison.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Candidates the graph considers per search (`memory.index.expansion_search`).
    #[arg(long, default_value_t = bbx_core::config::IndexSettings::default().expansion_search)]
    pub expansion_search: usize,
    /// The `chroma` command [default: $BBX_CHROMA, else `chroma` on PATH].
    #[arg(long)]
    pub chroma: Option<PathBuf>,
    /// Where scratch kernels go [default: the system's temporary directory].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchBusArgs {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Messages per batch in the batched phase.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent publishers in the unbatched phase.
    #[arg(long, default_value_t = 256)]
    pub publishers: usize,
    /// Messages a second in the delivery phase.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Consumers of the group in the delivery phase.
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Do not pin the delivery phase's kernel and load generator to separate cores.
    #[arg(long)]
    pub no_isolate: bool,
    /// Directory for the scratch kernels [default: a temp dir].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchAuthArgs {
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Directory for the scratch kernel [default: a temp dir].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchFlowArgs {
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

#[derive(Args, Debug, Clone)]
pub struct BenchToolsArgs {
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Directory for the scratch kernel [default: a temp dir].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchRingArgs {
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// In-process submitters in the inproc scenario, each a task of its own. On a
    /// 2-core machine one is fastest: two take turns at the ring's one lock and
    /// pass each other's ops between cores (docs/ring.md has the figures).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub inproc_submitters: u16,
    /// Concurrent in-process submitters in the durable scenario.
    #[arg(long, default_value_t = 1024)]
    pub durable_submitters: usize,
    /// `ring.journal_nice` for the in-process kernel (inproc and durable), -20 to
    /// 0, instead of the default; applied where this process may raise a thread's
    /// priority. The report echoes what was in force.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=0))]
    pub journal_nice: Option<i32>,
    /// `ring.committer_nice` for the in-process kernel (inproc and durable), 0 to
    /// 19, instead of the default.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub committer_nice: Option<i32>,
    /// Concurrent HTTP connections in http_batch (16 × 100 ops in flight stay within
    /// one agent's share of the queue, so the scenario measures the path, not waits
    /// for room).
    #[arg(long, default_value_t = 16)]
    pub http_clients: usize,
    /// Concurrent HTTP connections in http_single, whose target is a latency: a
    /// moderate load, not a saturating one whose queueing would be all it measured.
    #[arg(long, default_value_t = 8)]
    pub http_single_clients: usize,
    /// Let the HTTP kernel and the load generator share all CPUs.
    #[arg(long)]
    pub no_isolate: bool,
    /// Directory for the scratch kernels [default: a temp dir].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
    /// Load `bbx bench flow`'s 20 flow rules (on the tool kinds) into the
    /// in-process kernel first, to compare the ring with and without them.
    #[arg(long)]
    pub flow_rules: bool,
    /// Turn FlowIntegrity's anomaly detection off in the in-process kernel (it is
    /// on by default, and scores every op once the agent has a model).
    #[arg(long)]
    pub no_anomaly: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchApiArgs {
    /// Concurrent clients writing.
    #[arg(long, default_value_t = 256)]
    pub set_clients: usize,
    /// Total rate of the fixed-rate set phase, spread over the writers.
    #[arg(long, default_value_t = 10_000.0)]
    pub set_rate: f64,
    /// Concurrent clients reading at full speed.
    #[arg(long, default_value_t = 64)]
    pub get_clients: usize,
    /// Rate of the fixed-rate get phase [default: half the measured maximum].
    #[arg(long)]
    pub get_rate: Option<f64>,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Cold starts to time (each on a fresh data directory).
    #[arg(long, default_value_t = 5)]
    pub cold_starts: usize,
    /// Let the scratch kernel and the load generator share all CPUs instead of giving
    /// each its own core (the default when this bench starts the kernel itself).
    #[arg(long)]
    pub no_isolate: bool,
    /// Directory for the scratch kernel and the fdatasync reference [default: a temp dir].
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum RingCommand {
    /// Submit one op; prints its op id once it is durable.
    Submit(SubmitArgs),
    /// Wait for an op's completion and print it; fails if it is not done in time.
    Wait {
        op_id: String,
        /// How long to wait, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Show an op: where it is, and its completion once done.
    Get { op_id: String },
    /// Cancel an op that has not completed.
    Cancel { op_id: String },
    /// Settle an op left in_doubt by a crash: ok, failed, or retry (run it again).
    Resolve {
        op_id: String,
        #[arg(long = "as", value_name = "ok|failed|retry", value_parser = parse_resolution)]
        resolution: bbx_core::op::Resolution,
    },
    /// Queue depths, throughput, latency by priority, retries, breakers.
    Stats,
    /// The journal: segments, size, synced and checkpoint positions, sync latency.
    WalStatus,
    /// Show circuit breakers, or close them with --reset.
    CircuitBreaker(BreakerArgs),
    /// `VERB ...`: an endpoint of the ring (`approve OP_ID`, `deny OP_ID --reason WHY`).
    #[command(external_subcommand)]
    Endpoint(Vec<String>),
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    pub agent: String,
    /// The executor: noop, sleep, state.get, state.set, state.incr, state.delete,
    /// tool.http, tool.shell, tool.file.
    pub kind: String,
    /// Its arguments as JSON, e.g. '{"key":"n","by":1}' [default: {}].
    pub args: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// LOW, NORMAL, HIGH or REALTIME.
    #[arg(long, default_value = "NORMAL", value_parser = parse_priority)]
    pub priority: bbx_core::op::Priority,
    /// Time allowed for one attempt.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Further attempts after a timeout or transient failure.
    #[arg(long)]
    pub retries: Option<u32>,
    /// First wait before a retry; it doubles each time.
    #[arg(long, requires = "retries")]
    pub backoff_ms: Option<u64>,
    /// An op that must complete with ok first; repeat for more.
    #[arg(long = "depends-on", value_name = "OP_ID")]
    pub depends_on: Vec<String>,
    /// With --step, derives the idempotency key.
    #[arg(long)]
    pub run_id: Option<String>,
    #[arg(long)]
    pub step: Option<u64>,
    /// If the queue is full, wait this long for room instead of failing.
    #[arg(long)]
    pub wait_for_room_ms: Option<u64>,
    /// Also wait for the completion and print it.
    #[arg(long)]
    pub wait: bool,
}

fn parse_resolution(text: &str) -> Result<bbx_core::op::Resolution, String> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_lowercase()))
        .map_err(|_| format!("{text:?} is not a resolution; use ok, failed or retry"))
}

fn parse_action(text: &str) -> Result<bbx_core::quota::QuotaAction, String> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_lowercase()))
        .map_err(|_| format!("{text:?} is not an action; use reject, throttle, queue or notify"))
}

#[derive(Subcommand, Debug)]
pub enum QuotasCommand {
    /// Set limits of an agent (or, with --tenant, of a tenant); those not given stay.
    Set(QuotaSetArgs),
    /// Show an agent's limits, its tenant's, and its usage.
    Get {
        /// The agent's id; with --tenant the tenant's name; or a node written out
        /// (tenant/NAME, group/TENANT/NAME, agent/ID).
        target: String,
        /// TARGET names a tenant.
        #[arg(long)]
        tenant: bool,
    },
    /// Every agent and tenant with limits or ops in flight.
    List,
    /// Alias of list: limits and usage of every node.
    Stats,
    /// The host's NVIDIA GPUs through NVML, or why there are none.
    GpuStatus,
    /// How tool processes are confined: the cgroup driver, its groups; with GROUP, that group only.
    CgroupStatus { group: Option<String> },
}

#[derive(Args, Debug)]
pub struct QuotaSetArgs {
    /// The agent's id; with --tenant the tenant's name; or a node written out
    /// (tenant/NAME, group/TENANT/NAME, agent/ID).
    pub target: String,
    /// TARGET names a tenant.
    #[arg(long)]
    pub tenant: bool,
    /// Put the agent in this group of its tenant (the agent must be idle).
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub requests_per_second: Option<u32>,
    #[arg(long)]
    pub tool_calls_per_minute: Option<u32>,
    /// LLM tokens (prompt and completion) per minute.
    #[arg(long)]
    pub llm_tokens_per_minute: Option<u64>,
    /// Spend per UTC day, in USD.
    #[arg(long)]
    pub cost_per_day_usd: Option<f64>,
    /// Spend per UTC month, in USD.
    #[arg(long)]
    pub cost_per_month_usd: Option<f64>,
    #[arg(long)]
    pub concurrent_ops: Option<u32>,
    /// Memory of one tool process tree; it is killed at the limit.
    #[arg(long)]
    pub memory_bytes: Option<u64>,
    /// CPU of one tool process tree, in percent of one core.
    #[arg(long)]
    pub cpu_percent: Option<u32>,
    /// Processes of one tool process tree.
    #[arg(long)]
    pub pids: Option<u32>,
    /// The GPUs (NVML indexes, comma-separated) tool processes may use; "" for none.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub gpu_devices: Option<Vec<u32>>,
    /// GPU memory of one tool process on each of its GPUs (CUDA MPS).
    #[arg(long)]
    pub gpu_memory_bytes: Option<u64>,
    /// What a rate limit does when reached: reject, throttle, queue or notify.
    #[arg(long, value_parser = parse_action)]
    pub action: Option<bbx_core::quota::QuotaAction>,
    /// How long throttle may hold a submission.
    #[arg(long)]
    pub max_delay_ms: Option<u64>,
}

fn parse_priority(text: &str) -> Result<bbx_core::op::Priority, String> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_uppercase()))
        .map_err(|_| format!("{text:?} is not a priority; use LOW, NORMAL, HIGH or REALTIME"))
}

#[derive(Args, Debug)]
pub struct BreakerArgs {
    /// Close the breakers (all, or the --target one).
    #[arg(long)]
    pub reset: bool,
    /// One target, e.g. an executor name.
    #[arg(long, requires = "reset")]
    pub target: Option<String>,
    /// One tenant's breakers (each tenant has its own).
    #[arg(long, requires = "reset")]
    pub tenant: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// Check every record of the journal in --data-dir; changes nothing.
    Verify,
    /// With the kernel stopped: cut the journal at its first bad record.
    Repair,
}

#[derive(Subcommand, Debug)]
pub enum V2Command {
    /// Alias of `bbx status`.
    Status,
    /// Aliases of `bbx ring stats|wal-status|circuit-breaker`.
    #[command(subcommand)]
    EnhancedRing(EnhancedRingCommand),
    /// Aliases of `bbx quotas stats|gpu-status|cgroup-status`.
    #[command(subcommand)]
    EnforcedQuotas(EnforcedQuotasCommand),
    /// Alias of `bbx auth`.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Aliases of `bbx flow stats|anomalies|policies`.
    #[command(subcommand)]
    EnhancedFlow(EnhancedFlowCommand),
    /// Aliases of `bbx bus stats|publish|dlq`.
    #[command(subcommand)]
    MessageBus(crate::bus::MessageBusCommand),
    /// `bbx v2 semantic-memory stats|search|add|forget`.
    #[command(subcommand)]
    SemanticMemory(crate::memory::SemanticMemoryCommand),
    /// `bbx v2 enhanced-context stats|prefetch-hint KEY|ml-score KEY`.
    #[command(subcommand)]
    EnhancedContext(crate::context::EnhancedContextCommand),
    /// `bbx v2 goals status [RUN_ID]|list`.
    #[command(subcommand)]
    Goals(crate::goals::V2GoalsCommand),
    /// `bbx v2 distributed-snapshots stats|list-replicas|pitr TIMESTAMP -a AGENT`.
    #[command(subcommand)]
    DistributedSnapshots(crate::snapshots::V2SnapshotsCommand),
}

#[derive(Subcommand, Debug)]
pub enum EnhancedFlowCommand {
    Stats,
    Anomalies,
    Policies,
}

#[derive(Subcommand, Debug)]
pub enum FlowCommand {
    /// The flow policies in force (the global ones and your tenant's).
    Policies {
        #[command(subcommand)]
        action: Option<PoliciesAction>,
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// `VERB ...`: an endpoint of flow (`stats`, `anomalies`, `test`, `explain OP`,
    /// `audit`, `approve OP`, `deny OP --reason WHY`, `quarantine`, `release`,
    /// `declassify`).
    #[command(external_subcommand)]
    Endpoint(Vec<String>),
}

#[derive(Subcommand, Debug)]
pub enum PoliciesAction {
    /// Load the policy in FILE (Rego, package bbx.flow) as NAME; or, FILE being a
    /// directory, the bundle NAME of its .rego files (loaded, versioned and
    /// removed as one; each module a policy NAME/MODULE evaluated on its own).
    Add {
        name: String,
        file: PathBuf,
        /// The tenant whose ops it decides [default: yours; every tenant's for an
        /// administrator].
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove the policy NAME, or the bundle NAME whole.
    Remove {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Issue a short-lived access token for IDENTITY (it lives 1 to 86400 seconds,
    /// 900 by default); prints it.
    CreateToken {
        identity: String,
        #[command(flatten)]
        grant: Grant,
    },
    /// Check a token: prints whether it is valid, and its claims; exits non-zero if not.
    Verify { token: String },
    /// Create an API key for IDENTITY (a user or a service); its secret is printed once.
    CreateApiKey {
        identity: String,
        /// The key's name [default: IDENTITY].
        #[arg(short, long)]
        name: Option<String>,
        #[command(flatten)]
        grant: Grant,
    },
    /// `VERB ...`: an endpoint of auth (`rules`: what each role may do).
    #[command(external_subcommand)]
    Endpoint(Vec<String>),
}

/// What a new credential may do.
#[derive(Args, Debug)]
pub struct Grant {
    /// The tenant it belongs to [default: the caller's; none for an admin credential].
    #[arg(long)]
    pub tenant: Option<String>,
    /// admin, tenant_admin, operator, agent or reader.
    #[arg(long)]
    pub role: Option<String>,
    /// Confine it to this agent of its tenant (required for the agent role).
    #[arg(long)]
    pub agent: Option<String>,
    /// It stops working this many seconds from now.
    #[arg(long)]
    pub ttl: Option<u64>,
    /// Confine it to submitting ops of these kinds (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Option<Vec<String>>,
}

impl Grant {
    /// The role and agent, checked.
    pub fn parsed(&self) -> bbx_core::Result<(Option<bbx_core::model::Role>, Option<bbx_core::AgentId>)> {
        let role = self.role.as_deref().map(str::parse).transpose()?;
        let agent = self.agent.as_deref().map(str::parse).transpose()?;
        Ok((role, agent))
    }
}

#[derive(Subcommand, Debug)]
pub enum EnforcedQuotasCommand {
    Stats,
    GpuStatus,
    CgroupStatus { group: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum EnhancedRingCommand {
    Stats,
    WalStatus,
    CircuitBreaker(BreakerArgs),
}
