//! `tool.mcp`: one tool call on another MCP server, through the official Rust SDK's
//! client.
//!
//! A server is found by name: first among the agent's own (`tools.mcp_servers`,
//! streamable HTTP URLs reached through the same guarded client as `tool.http`, so
//! an agent cannot point one at a private address it may not reach), then among
//! the operator's (`[tools.mcp.NAME]`, a command spoken to over stdio or a URL).
//! Each call opens a session, makes the one call and closes it; a command is
//! started for the call and killed when it ends or the op is dropped. The op's
//! idempotency key travels in the request's `_meta` as `idempotencyKey`.
//!
//! The arguments are checked against the `inputSchema` the server advertises
//! for the tool (its `tools/list`, fetched in the call's session and kept for
//! [`SCHEMAS_KEPT`]): arguments that fail it are refused with
//! `invalid_argument` naming where and why, and the tool is not called. Schemas
//! are compiled without resolving remote references: a server cannot make the
//! kernel fetch anything.

use crate::Context;
use crate::http::{Clients, check_literal};
use crate::net::AddressPolicy;
use bbx_core::config::McpServer;
use bbx_core::{Error, ErrorCode, Result};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, JsonObject, RequestMetaObject};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

/// The `_meta` key the op's idempotency key is sent under.
pub const IDEMPOTENCY_META_KEY: &str = "idempotencyKey";

/// How long a server's advertised input schemas are used before they are
/// fetched again.
pub const SCHEMAS_KEPT: Duration = Duration::from_secs(300);
/// Servers whose schemas are kept at most.
const SERVERS_KEPT: usize = 1024;

/// One server's tools: each tool's compiled input schema (`None`: it
/// advertised none, or one that does not compile, which checks nothing).
type ToolSchemas = std::collections::HashMap<String, Option<std::sync::Arc<jsonschema::Validator>>>;

/// The input schemas MCP servers advertise, by server (its URL or command).
#[derive(Default)]
pub struct Schemas {
    kept: parking_lot::Mutex<std::collections::HashMap<String, (std::time::Instant, std::sync::Arc<ToolSchemas>)>>,
}

impl Schemas {
    fn get(&self, server: &str) -> Option<std::sync::Arc<ToolSchemas>> {
        let kept = self.kept.lock();
        let (at, tools) = kept.get(server)?;
        (at.elapsed() < SCHEMAS_KEPT).then(|| tools.clone())
    }

    fn put(&self, server: String, tools: std::sync::Arc<ToolSchemas>) {
        let mut kept = self.kept.lock();
        if kept.len() >= SERVERS_KEPT {
            kept.retain(|_, (at, _)| at.elapsed() < SCHEMAS_KEPT);
        }
        if kept.len() < SERVERS_KEPT {
            kept.insert(server, (std::time::Instant::now(), tools));
        }
    }
}

/// Compiles a tool's advertised input schema, resolving no remote reference.
fn compile(schema: &JsonObject) -> Option<std::sync::Arc<jsonschema::Validator>> {
    let schema = Value::Object(schema.clone());
    jsonschema::options()
        .with_retriever(NoRetrieval)
        .build(&schema)
        .ok()
        .map(std::sync::Arc::new)
}

/// Refuses every remote reference in a server's schema.
struct NoRetrieval;

impl jsonschema::Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("{uri} is not fetched: MCP input schemas are checked as given").into())
    }
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpCall {
    /// The server's name, in the agent's `mcp_servers` or the kernel's `[tools.mcp]`.
    pub server: String,
    /// The tool to call.
    pub tool: String,
    /// Its arguments (a JSON object).
    #[serde(default)]
    pub arguments: Option<JsonObject>,
    /// Time allowed for the call, session set-up included (the op's own timeout
    /// still applies).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Where a named server is, and whether the agent named it (its address rules
/// apply) or the operator did.
enum Target<'a> {
    Command(&'a McpServer),
    Url(&'a str, Chosen),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chosen {
    ByAgent,
    ByOperator,
}

impl McpCall {
    pub(crate) fn checked(self) -> Result<Self> {
        if self.server.is_empty() || self.tool.is_empty() {
            return Err(Error::invalid_field("args.server", "server and tool must not be empty"));
        }
        if self.timeout_ms == Some(0) {
            return Err(Error::invalid_field("args.timeout_ms", "timeout_ms must be at least 1"));
        }
        Ok(self)
    }

    fn target<'a>(&self, ctx: &'a Context, operator: &'a BTreeMap<String, McpServer>) -> Result<Target<'a>> {
        if let Some(url) = ctx.settings.mcp_servers.get(&self.server) {
            return Ok(Target::Url(url, Chosen::ByAgent));
        }
        match operator.get(&self.server) {
            Some(server) => match &server.url {
                Some(url) => Ok(Target::Url(url, Chosen::ByOperator)),
                None => Ok(Target::Command(server)),
            },
            None => Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "no MCP server {:?} is configured for this agent or the kernel",
                    self.server
                ),
            )),
        }
    }

    pub(crate) async fn run(
        &self,
        ctx: &Context,
        operator: &BTreeMap<String, McpServer>,
        (clients, schemas): (&Clients, &Schemas),
    ) -> Result<Value> {
        let mut params = CallToolRequestParams::new(self.tool.clone());
        params.arguments = self.arguments.clone();
        if let Some(key) = &ctx.idempotency_key {
            let mut meta = JsonObject::new();
            meta.insert(IDEMPOTENCY_META_KEY.to_owned(), Value::String(key.clone()));
            params.meta = Some(RequestMetaObject::from(meta));
        }
        let call = async {
            let target = self.target(ctx, operator)?;
            let known = Known {
                server: target.identity(),
                schemas,
            };
            match target {
                Target::Url(url, chosen) => {
                    let policy = match chosen {
                        Chosen::ByAgent => AddressPolicy::new(&ctx.settings)?,
                        Chosen::ByOperator => AddressPolicy::unrestricted(),
                    };
                    let parsed = reqwest::Url::parse(url)
                        .map_err(|e| Error::invalid_field("mcp_servers", format!("{url:?} is not a URL: {e}")))?;
                    check_literal(&policy, &parsed)?;
                    let http = clients.client(&policy)?;
                    let transport = StreamableHttpClientTransport::with_client(
                        http,
                        StreamableHttpClientTransportConfig::with_uri(url),
                    );
                    call_over(transport, params, &self.server, &known).await
                }
                Target::Command(server) => {
                    let (program, args) = server.command.split_first().expect("checked: a command is not empty");
                    let mut child = tokio::process::Command::new(program)
                        .args(args)
                        .env_clear()
                        .envs(&server.env)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .process_group(0)
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| {
                            Error::unavailable(format!("cannot start MCP server {:?} ({program}): {e}", self.server))
                        })?;
                    let io = (child.stdout.take().expect("piped"), child.stdin.take().expect("piped"));
                    // Whatever the server started (wrappers such as npx or uvx do) goes
                    // with it: the call ran in a process group of its own.
                    let group = ProcessGroup(child.id().map_or(0, |p| p as i32));
                    let answer = call_over(io, params, &self.server, &known).await;
                    drop(group);
                    let _ = child.kill().await;
                    answer
                }
            }
        };
        match self.timeout_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), call)
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorCode::Timeout,
                        format!("MCP server {:?} did not answer within {ms} ms", self.server),
                    )
                })?,
            None => call.await,
        }
    }
}

/// Kills a process group when dropped (the call ended, or its op was dropped).
struct ProcessGroup(i32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
}

impl Target<'_> {
    /// What the server's schemas are kept under: where it is, not its name
    /// (agents name their own servers).
    fn identity(&self) -> String {
        match self {
            Self::Url(url, _) => format!("url {url}"),
            Self::Command(server) => format!("command {:?}", server.command),
        }
    }
}

/// A server's kept schemas, and where to keep them.
struct Known<'a> {
    server: String,
    schemas: &'a Schemas,
}

/// The arguments checked against the tool's advertised input schema (fetched
/// in `session` unless kept).
async fn check_arguments(
    session: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    params: &CallToolRequestParams,
    server: &str,
    known: &Known<'_>,
) -> Result<()> {
    let tools = match known.schemas.get(&known.server) {
        Some(tools) => tools,
        None => {
            let listed = session
                .list_all_tools()
                .await
                .map_err(|e| Error::unavailable(format!("MCP server {server:?} did not list its tools: {e}")))?;
            let tools: ToolSchemas = listed
                .iter()
                .map(|tool| (tool.name.to_string(), compile(&tool.input_schema)))
                .collect();
            let tools = std::sync::Arc::new(tools);
            known.schemas.put(known.server.clone(), tools.clone());
            tools
        }
    };
    let Some(schema) = tools.get(params.name.as_ref()) else {
        return Err(Error::invalid_field(
            "args.tool",
            format!("MCP server {server:?} has no tool {:?}", params.name),
        ));
    };
    let arguments = Value::Object(params.arguments.clone().unwrap_or_default());
    if let Some(error) = schema.as_ref().and_then(|s| s.iter_errors(&arguments).next()) {
        let at = error.instance_path().to_string();
        let at = if at.is_empty() { "/".to_owned() } else { at };
        return Err(Error::invalid_field(
            "args.arguments",
            format!(
                "the arguments of {:?} on {server:?} do not match its input schema at {at}: {error}",
                params.name
            ),
        ));
    }
    Ok(())
}

/// Opens a client session over `transport`, checks the arguments, makes the
/// call, and closes it.
async fn call_over<T, E, A>(
    transport: T,
    params: CallToolRequestParams,
    server: &str,
    known: &Known<'_>,
) -> Result<Value>
where
    T: rmcp::transport::IntoTransport<rmcp::RoleClient, E, A>,
    E: std::error::Error + Send + Sync + 'static,
{
    let unreachable = |e: &dyn std::fmt::Display| Error::unavailable(format!("MCP server {server:?}: {e}"));
    let session = ().serve(transport).await.map_err(|e| unreachable(&e))?;
    if let Err(e) = check_arguments(&session, &params, server, known).await {
        let _ = session.cancel().await;
        return Err(e);
    }
    let answer = session.call_tool(params).await;
    let _ = session.cancel().await;
    let result = answer.map_err(|e| match e {
        rmcp::ServiceError::McpError(error) => Error::new(
            ErrorCode::ToolFailed,
            format!("MCP server {server:?} refused the call: {}", error.message),
        )
        .with_details(json!({ "mcp_code": error.code.0 })),
        other => unreachable(&other),
    })?;
    let content = serde_json::to_value(&result.content).unwrap_or(Value::Null);
    let out = json!({
        "content": content,
        "structured_content": result.structured_content,
    });
    if result.is_error == Some(true) {
        return Err(Error::new(
            ErrorCode::ToolFailed,
            format!("the MCP tool on {server:?} reported an error"),
        )
        .with_details(out));
    }
    Ok(out)
}
