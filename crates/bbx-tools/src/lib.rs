//! The executors of tool ops: how an agent acts on the world outside the kernel.
//!
//! This crate owns what each tool does and what it may not do:
//! - [`file`] (`tool.file`) reads and writes inside the agent's workspace; every path
//!   is opened with `openat2(RESOLVE_BENEATH)`, so neither `..` nor a symlink can
//!   lead out, and the check cannot race a rename.
//! - [`shell`] (`tool.shell`) runs a program without a shell (unless asked), as an
//!   unprivileged user, in a control group with the agent's process limits, in
//!   namespaces that show it only its workspace and the system's read-only files,
//!   and kills its whole process tree when it ends, times out or is cancelled.
//! - [`http`] (`tool.http`) makes one HTTP request, refusing private, loopback,
//!   link-local and metadata addresses unless the agent allows them; the check runs
//!   on every address a name resolves to, redirects included, so DNS cannot be used
//!   to get around it.
//! - [`mcp`] (`tool.mcp`) calls a tool of another MCP server, over stdio or
//!   streamable HTTP.
//! - [`llm`] (`llm.chat`) asks an OpenAI-compatible endpoint for a chat completion
//!   and prices its token usage.
//!
//! Arguments are parsed into a [`Call`] when the op is submitted, so a bad call is
//! refused before it is journaled. The ring decides when a call runs and what a
//! crash in the middle means (`in_doubt`); this crate only runs it.

pub mod component;
pub mod file;
pub mod http;
pub mod llm;
pub mod mcp;
pub mod net;
pub mod shell;

pub use bbx_core::quota::Spend;
use bbx_core::quota::{ProcessLimits, ToolSettings};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_quota::cgroup::Driver;
pub use component::ToolKinds;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A parsed tool call.
#[derive(Debug, Clone)]
pub enum Call {
    Http(http::HttpCall),
    Shell(shell::ShellCall),
    File(file::FileCall),
    Mcp(mcp::McpCall),
    Llm(llm::LlmCall),
}

impl Call {
    /// Parses a tool op's arguments; `None` if `kind` is not a tool.
    pub fn parse(kind: &str, args: &Value) -> Option<Result<Self>> {
        let call = match kind {
            "tool.http" => parse_args(kind, args).and_then(http::HttpCall::checked).map(Self::Http),
            "tool.shell" => parse_args(kind, args)
                .and_then(shell::ShellCall::checked)
                .map(Self::Shell),
            "tool.file" => parse_args(kind, args).and_then(file::FileCall::checked).map(Self::File),
            "tool.mcp" => parse_args(kind, args).and_then(mcp::McpCall::checked).map(Self::Mcp),
            "llm.chat" => parse_args(kind, args).and_then(llm::LlmCall::checked).map(Self::Llm),
            _ => return None,
        };
        Some(call)
    }

    /// The remote host (and port) a call talks to, for its circuit breaker.
    pub fn remote_host(&self) -> Option<String> {
        match self {
            Self::Http(call) => {
                let url = reqwest::Url::parse(&call.url).ok()?;
                let host = url.host_str()?;
                Some(match url.port_or_known_default() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                })
            }
            Self::Shell(_) | Self::File(_) | Self::Mcp(_) | Self::Llm(_) => None,
        }
    }

    /// Whether running the call can change the world outside the kernel: such an op
    /// is marked started in the journal before it runs, and is `in_doubt` if the
    /// kernel stops while it runs. Reading files changes nothing.
    pub fn has_external_effects(&self) -> bool {
        match self {
            Self::File(call) => !call.is_read_only(),
            // A model call is billed by its provider: a crash may have cost money.
            Self::Http(_) | Self::Shell(_) | Self::Mcp(_) | Self::Llm(_) => true,
        }
    }
}

fn parse_args<T: for<'de> Deserialize<'de>>(kind: &str, args: &Value) -> Result<T> {
    T::deserialize(args)
        .map_err(|e| Error::invalid_field("args", format!("the arguments of {kind} are not valid: {e}")))
}

/// Where a tool finds the value of a secret an op names (`{"$secret": NAME}`).
pub trait SecretSource: Send + Sync {
    /// The value of the secret `name` of `tenant`, for a call to `host`; refused
    /// unless the secret is bound to that host.
    fn reveal(&self, tenant: &str, name: &str, host: &str) -> Result<String>;
}

/// Who a call runs for, and under what.
#[derive(Debug, Clone)]
pub struct Context {
    pub op_id: OpId,
    pub agent: AgentId,
    pub tenant: String,
    /// Passed on to the tool (`Idempotency-Key` of `tool.http`).
    pub idempotency_key: Option<String>,
    pub settings: ToolSettings,
    pub limits: ProcessLimits,
}

/// How tools run on this host.
#[derive(Debug, Clone)]
pub struct ToolsConfig {
    /// Where each agent's workspace directory is made.
    pub workspaces: PathBuf,
    /// The uid and gid programs run as when the kernel is root.
    pub run_as: (u32, u32),
    /// Run programs unconfined when the kernel cannot sandbox them (not root).
    pub unsandboxed_shell: bool,
    /// The endpoints and prices of `llm.chat`.
    pub llm: bbx_core::config::LlmConfig,
    /// The MCP servers the operator configured for every agent.
    pub mcp: std::collections::BTreeMap<String, bbx_core::config::McpServer>,
}

/// The tools of one kernel.
pub struct Tools {
    config: ToolsConfig,
    cgroups: Box<dyn Driver>,
    http: http::Clients,
    /// The input schemas MCP servers advertise for their tools.
    mcp_schemas: mcp::Schemas,
    /// For the operator's configured LLM endpoints, which the agent's address
    /// policy does not govern (the agent cannot name them).
    llm_http: reqwest::Client,
    /// Whether programs run in namespaces of their own (needs root).
    isolate: bool,
    mount_point: PathBuf,
    /// The secrets ops may name, where the kernel keeps them.
    secrets: Option<std::sync::Arc<dyn SecretSource>>,
    /// Agents' contexts, for an `llm.chat` that takes one: set once the
    /// component that keeps them exists.
    windows: std::sync::OnceLock<std::sync::Arc<dyn bbx_component::ContextWindows>>,
    /// Who uses each workspace, and when a snapshot reads it.
    gate: std::sync::Arc<bbx_component::workspace_gate::WorkspaceGate>,
}

impl Tools {
    /// Tools whose workspaces live under `config.workspaces`; programs run in
    /// namespaces of their own when the kernel is root.
    pub fn new(config: ToolsConfig, cgroups: Box<dyn Driver>) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // Runs a kernel that died left behind are killed before they do more.
        cgroups.sweep();
        let mount_point = shell::mount_point(&config.workspaces);
        std::fs::create_dir_all(&mount_point).map_err(|e| {
            Error::internal(format!(
                "cannot make the workspaces in {}: {e}",
                config.workspaces.display()
            ))
        })?;
        Ok(Self {
            config,
            cgroups,
            http: http::Clients::default(),
            mcp_schemas: mcp::Schemas::default(),
            llm_http: reqwest::Client::builder()
                .build()
                .map_err(|e| Error::internal(format!("cannot build an HTTP client: {e}")))?,
            isolate: root,
            mount_point,
            secrets: None,
            windows: std::sync::OnceLock::new(),
            gate: Default::default(),
        })
    }

    /// Lets ops name the secrets `source` keeps.
    pub fn with_secrets(self, source: std::sync::Arc<dyn SecretSource>) -> Self {
        Self {
            secrets: Some(source),
            ..self
        }
    }

    /// Lets `llm.chat` take an agent's context from `source`; a second call
    /// changes nothing.
    pub fn set_windows(&self, source: std::sync::Arc<dyn bbx_component::ContextWindows>) {
        let _ = self.windows.set(source);
    }

    /// Who uses each workspace: file and program ops enter it; a snapshot
    /// announces its capture.
    pub fn workspace_gate(&self) -> &std::sync::Arc<bbx_component::workspace_gate::WorkspaceGate> {
        &self.gate
    }

    /// The agent's workspace, made on first use (owned by the uid its programs run as).
    pub fn workspace(&self, agent: &AgentId) -> Result<PathBuf> {
        let dir = self.config.workspaces.join(agent.to_string());
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(format!("cannot make the workspace {}: {e}", dir.display())))?;
            if self.isolate {
                let (uid, gid) = self.config.run_as;
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                    .map_err(|e| Error::internal(format!("cannot hand the workspace to uid {uid}: {e}")))?;
            }
        }
        Ok(dir)
    }

    /// Removes a deleted agent's workspace.
    pub fn remove_workspace(&self, agent: &AgentId) {
        let dir = self.config.workspaces.join(agent.to_string());
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "a deleted agent's workspace was not removed");
        }
    }

    /// Runs a call. Dropping the future stops it (a program's whole tree is
    /// killed). File and program calls use the agent's workspace: they wait
    /// while a snapshot reads it, and it waits for them (a file call until its
    /// thread is done, even if the op was cancelled).
    pub async fn run(&self, call: &Call, ctx: &Context) -> Result<Value> {
        match call {
            Call::Http(call) => self.http.run(call, ctx, self.secrets.as_deref()).await,
            Call::Llm(call) => {
                call.run(&self.llm_http, &self.config.llm, ctx, self.windows.get())
                    .await
            }
            Call::Mcp(call) => call.run(ctx, &self.config.mcp, (&self.http, &self.mcp_schemas)).await,
            Call::File(call) => {
                let workspace = self.workspace(&ctx.agent)?;
                let call = call.clone();
                let using = self.gate.enter(ctx.agent).await;
                tokio::task::spawn_blocking(move || {
                    let _using = using;
                    call.run(&workspace)
                })
                .await
                .map_err(|e| Error::internal(format!("a file call failed: {e}")))?
            }
            Call::Shell(call) => {
                if !self.isolate && !self.config.unsandboxed_shell {
                    return Err(Error::new(
                        ErrorCode::FailedPrecondition,
                        "tool.shell needs the kernel to run as root to sandbox its programs; an operator who \
                         accepts unconfined programs running as the kernel's own user sets \
                         tools.unsandboxed_shell = true",
                    ));
                }
                let workspace = self.workspace(&ctx.agent)?;
                let _using = self.gate.enter(ctx.agent).await;
                let sandbox = shell::Sandbox {
                    cgroups: self.cgroups.as_ref(),
                    run_as: self.isolate.then_some(self.config.run_as),
                    isolate: self.isolate,
                    workspace: &workspace,
                    mount_point: &self.mount_point,
                };
                call.run(ctx, &sandbox).await
            }
        }
    }

    /// The most a call can spend, which the ring reserves before it runs it.
    pub fn max_spend(&self, call: &Call) -> Spend {
        match call {
            Call::Llm(call) => {
                let usage = call.max_usage(&self.config.llm);
                Spend {
                    micros: usage.cost_micros(self.config.llm.prices.get(&call.model)),
                    tokens: usage.total(),
                }
            }
            Call::Http(_) | Call::Shell(_) | Call::File(_) | Call::Mcp(_) => Spend::default(),
        }
    }

    /// What a finished call spent, from its result.
    pub fn spent(result: &Value) -> Spend {
        Spend {
            micros: result.get("cost_micros").and_then(Value::as_u64).unwrap_or(0),
            tokens: result
                .pointer("/usage/total_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }

    /// How tool processes are confined on this host.
    pub fn cgroup_driver(&self) -> &dyn Driver {
        self.cgroups.as_ref()
    }

    pub fn isolates(&self) -> bool {
        self.isolate
    }

    pub fn workspaces(&self) -> &Path {
        &self.config.workspaces
    }
}
