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
    /// Manage API keys (administrators only).
    #[command(subcommand)]
    Key(KeyCommand),
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
pub enum V2Command {
    /// Alias of `bbx status`.
    Status,
}
