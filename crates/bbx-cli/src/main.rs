//! The `bbx` command: the kernel daemon (`bbx serve`), MCP over stdio (`bbx mcp`),
//! and a client of a running kernel for everything else.

mod bench;
mod bench_auth;
mod bench_bus;
mod bench_bus_redis;
mod bench_context;
mod bench_context_sim;
mod bench_context_trace;
mod bench_flow;
mod bench_goals;
mod bench_memory;
mod bench_memory_data;
mod bench_memory_http;
mod bench_ring;
mod bench_snapshot;
mod bench_tools;
mod bus;
mod cli;
mod context;
mod endpoint;
mod flow;
mod goals;
mod memory;
mod output;
mod quotas;
mod ring;
mod snapshots;

use anyhow::{Context, Result, bail};
use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::config::{ConfigLayer, KernelConfig, default_data_dir};
use bbx_core::model::{CreateAgent, CreateApiKey, ListAgents, ListState, SetState};
use bbx_core::validate;
use clap::{CommandFactory, Parser};
use cli::{
    AgentCommand, AuthCommand, BenchCommand, Cli, Command, ConfigCommand, EnforcedQuotasCommand, EnhancedFlowCommand,
    EnhancedRingCommand, KeyCommand, QuotasCommand, RingCommand, ServeArgs, StateCommand, V2Command,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

pub const DEFAULT_URL: &str = "http://127.0.0.1:7878";

/// mimalloc's per-thread free lists: the ring allocates and frees small records on
/// every op, from several threads, where glibc's allocator spent a sixth of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc.h,
/// the same in its v2 and v3; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // mimalloc gives free memory back to the OS after a delay (1 s), but one
    // timer covers all that was freed since it started, so memory freed just
    // before it fires goes too, and each reuse then faults zeroed pages back in:
    // 2-3 thousand page faults a second under `bench ring`'s durable phase, 6 %
    // of the CPU spent zeroing pages. Ten seconds makes those rounds rare; an idle
    // kernel still shrinks. A delay set in the environment is left as it is.
    if ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .all(|name| std::env::var_os(name).is_none())
    {
        // SAFETY: sets one of mimalloc's options, before any thread is started.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
    let cli = Cli::parse();
    // A load generator shares the machine with the kernel it measures: one thread
    // is enough to drive it, and more would preempt the kernel's own threads.
    let runtime = match &cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// One line on stderr, whatever went wrong.
fn fail(error: &anyhow::Error) -> ExitCode {
    let line = match error.downcast_ref::<bbx_core::Error>() {
        Some(e) => format!("{} [{}]", e.message, e.code.as_str()),
        None => format!("{error:#}"),
    };
    eprintln!("error: {}", line.replace(['\n', '\r'], " "));
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Serve(args) => serve(&cli, args).await,
        Command::Config(ConfigCommand::Show(args)) => {
            let config = resolve_config(&cli, args)?;
            if cli.json {
                output::json(&config);
            } else {
                print!("{}", config.to_toml());
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "bbx", &mut std::io::stdout());
            Ok(())
        }
        Command::Mcp => mcp(&cli).await,
        Command::Bench(BenchCommand::Api(args)) => bench::api(&cli, args).await,
        Command::Bench(BenchCommand::Ring(args)) => bench_ring::ring(&cli, args).await,
        Command::Bench(BenchCommand::Tools(args)) => bench_tools::tools(&cli, args).await,
        Command::Bench(BenchCommand::Auth(args)) => bench_auth::auth(&cli, args).await,
        Command::Bench(BenchCommand::Flow(args)) => bench_flow::flow(&cli, args).await,
        Command::Bench(BenchCommand::Bus(args)) => bench_bus::bus(&cli, args).await,
        Command::Bench(BenchCommand::Memory(args)) => bench_memory::memory(&cli, args).await,
        Command::Bench(BenchCommand::Context(args)) => bench_context::context(&cli, args).await,
        Command::Bench(BenchCommand::Goals(args)) => bench_goals::goals(&cli, args).await,
        Command::Bench(BenchCommand::Snapshot(args)) => bench_snapshot::snapshot(&cli, args).await,
        Command::Status | Command::V2(V2Command::Status) => {
            let status = client(&cli)?.status().await?;
            if cli.json {
                output::json(&status);
            } else {
                println!("BBX kernel {} at {}", status.version, status.listen);
                println!("  uptime    {}s", status.uptime_secs);
                println!("  agents    {}", status.agents);
                if let Some(data_dir) = &status.data_dir {
                    println!("  data dir  {data_dir}");
                }
                if let Some(storage) = &status.storage {
                    println!(
                        "  storage   {} on disk {} bytes, {} writes in {} syncs",
                        storage.engine, storage.disk_bytes, storage.writes_committed, storage.syncs
                    );
                }
            }
            Ok(())
        }
        Command::Agent(command) => agent(&cli, command).await,
        Command::State(command) => state(&cli, command).await,
        Command::Key(command) => key(&cli, command).await,
        Command::Auth(command) | Command::V2(V2Command::Auth(command)) => auth(&cli, command).await,
        Command::Ring(command) => ring::run(&cli, command).await,
        Command::Flow(command) => flow::run(&cli, command).await,
        Command::Bus(command) => bus::run(&cli, command).await,
        Command::V2(V2Command::MessageBus(command)) => bus::report(&cli, command).await,
        Command::Memory(command) => memory::run(&cli, command).await,
        Command::V2(V2Command::SemanticMemory(command)) => memory::report(&cli, command).await,
        Command::Models(command) => memory::models(&cli, command).await,
        Command::Context(command) => context::run(&cli, command).await,
        Command::Goals(command) => goals::run(&cli, command).await,
        Command::V2(V2Command::Goals(command)) => goals::report(&cli, command).await,
        Command::Snapshot(command) => snapshots::run(&cli, command).await,
        Command::V2(V2Command::DistributedSnapshots(command)) => snapshots::report(&cli, command).await,
        Command::V2(V2Command::EnhancedContext(command)) => context::report(&cli, command).await,
        Command::V2(V2Command::EnhancedFlow(command)) => {
            let verb = match command {
                EnhancedFlowCommand::Stats => "stats",
                EnhancedFlowCommand::Anomalies => "anomalies",
                EnhancedFlowCommand::Policies => "policies",
            };
            endpoint::run(&cli, &["flow".to_owned(), verb.to_owned()]).await
        }
        Command::Endpoint(words) => endpoint::run(&cli, words).await,
        Command::V2(V2Command::EnhancedRing(command)) => {
            let command = match command {
                EnhancedRingCommand::Stats => RingCommand::Stats,
                EnhancedRingCommand::WalStatus => RingCommand::WalStatus,
                EnhancedRingCommand::CircuitBreaker(args) => RingCommand::CircuitBreaker(cli::BreakerArgs {
                    reset: args.reset,
                    target: args.target.clone(),
                    tenant: args.tenant.clone(),
                }),
            };
            ring::run(&cli, &command).await
        }
        Command::Journal(command) => ring::journal(&cli, command),
        Command::Quotas(command) => quotas::run(&cli, command).await,
        Command::V2(V2Command::EnforcedQuotas(command)) => {
            let command = match command {
                EnforcedQuotasCommand::Stats => QuotasCommand::Stats,
                EnforcedQuotasCommand::GpuStatus => QuotasCommand::GpuStatus,
                EnforcedQuotasCommand::CgroupStatus { group } => QuotasCommand::CgroupStatus { group: group.clone() },
            };
            quotas::run(&cli, &command).await
        }
    }
}

pub(crate) fn resolve_config(cli: &Cli, args: &ServeArgs) -> Result<KernelConfig> {
    let file = match &args.config {
        Some(path) => ConfigLayer::load(path)?,
        None => ConfigLayer::default(),
    };
    let overrides = ConfigLayer {
        listen: args.listen,
        data_dir: cli.data_dir.clone(),
        max_body_bytes: args.max_body_bytes,
        commit_max_batch: args.commit_max_batch,
        log: args.log.clone(),
        ring: None,
        tools: None,
        auth: None,
        flow: None,
        bus: None,
        memory: None,
        context: None,
        goals: None,
        snapshots: None,
    };
    Ok(KernelConfig::resolve(file, overrides)?)
}

async fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let config = resolve_config(cli, args)?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("invalid log filter")?)
        .init();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let data_dir = config.data_dir.clone();
    let opened = bbx_kernel::Kernel::open(config).await?;
    if let Some(path) = &opened.admin_key_written {
        eprintln!("bbx: created the admin API key; it is in {}", path.display());
    }
    eprintln!(
        "bbx: kernel listening on http://{address} (data in {})",
        data_dir.display()
    );
    bbx_server::serve(opened.kernel, listener, shutdown_signal()).await?;
    eprintln!("bbx: stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested; finishing requests in flight");
}

/// The API key: --api-key / BBX_API_KEY, else the admin key in the data directory.
pub(crate) fn api_key(cli: &Cli) -> Result<String> {
    if let Some(key) = &cli.api_key {
        return Ok(key.clone());
    }
    let path: PathBuf = cli
        .data_dir
        .clone()
        .unwrap_or_else(default_data_dir)
        .join(bbx_kernel::ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(key.trim().to_owned()),
        Err(e) => bail!(
            "no API key: pass --api-key or BBX_API_KEY, or run where {} is readable ({e})",
            path.display()
        ),
    }
}

pub(crate) fn client(cli: &Cli) -> Result<Client> {
    Ok(Client::new(cli.url.as_deref().unwrap_or(DEFAULT_URL), &api_key(cli)?)?)
}

async fn mcp(cli: &Cli) -> Result<()> {
    use rmcp::ServiceExt;
    let client = client(cli)?;
    // Fail now, in one line, rather than hand the MCP client a server that cannot work.
    client.status().await?;
    let endpoints = client.endpoints().await?;
    let server = bbx_server::mcp::McpServer::with_endpoints(bbx_server::mcp::FixedApi(client), &endpoints);
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .context("MCP handshake over stdio failed")?;
    running.waiting().await.context("MCP server task failed")?;
    Ok(())
}

async fn agent(cli: &Cli, command: &AgentCommand) -> Result<()> {
    let api = client(cli)?;
    match command {
        AgentCommand::Create {
            name,
            tenant,
            labels,
            allow_networks,
            env_allow,
            no_network,
            mcp_servers,
        } => {
            let labels = labels
                .iter()
                .map(|l| validate::label_selector(l))
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            let req = CreateAgent {
                name: name.clone(),
                tenant: tenant.clone(),
                labels: Some(labels),
                tools: Some(bbx_core::quota::ToolSettings {
                    allow_networks: allow_networks.clone(),
                    env_allow: env_allow.clone(),
                    no_network: *no_network,
                    mcp_servers: mcp_servers
                        .iter()
                        .map(|s| {
                            s.split_once('=')
                                .map(|(name, url)| (name.to_owned(), url.to_owned()))
                                .ok_or_else(|| anyhow::anyhow!("--mcp-server takes NAME=URL, got {s:?}"))
                        })
                        .collect::<Result<_>>()?,
                }),
            };
            let agent = api.create_agent(req).await?;
            if cli.json {
                output::json(&agent)
            } else {
                output::agent(&agent)
            }
        }
        AgentCommand::List {
            tenant,
            label,
            limit,
            cursor,
            all,
        } => {
            let mut req = ListAgents {
                tenant: tenant.clone(),
                label: label.clone(),
                limit: *limit,
                cursor: cursor.clone(),
            };
            let mut page = api.list_agents(req.clone()).await?;
            while *all && page.next_cursor.is_some() {
                req.cursor = page.next_cursor.take();
                let next = api.list_agents(req.clone()).await?;
                page.agents.extend(next.agents);
                page.next_cursor = next.next_cursor;
            }
            if cli.json {
                output::json(&page)
            } else {
                output::agents(&page.agents, page.next_cursor.as_deref())
            }
        }
        AgentCommand::Get { id } => {
            let agent = api.get_agent(id.parse()?).await?;
            if cli.json {
                output::json(&agent)
            } else {
                output::agent(&agent)
            }
        }
        AgentCommand::Delete { id } => {
            api.delete_agent(id.parse()?).await?;
            if cli.json {
                output::json(&serde_json::json!({ "deleted": id }))
            } else {
                println!("deleted agent {id}")
            }
        }
    }
    Ok(())
}

async fn state(cli: &Cli, command: &StateCommand) -> Result<()> {
    let api = client(cli)?;
    match command {
        StateCommand::Get { agent, key } => {
            let entry = api.state_get(agent.parse()?, key.clone()).await?;
            if cli.json {
                output::json(&entry)
            } else {
                println!("{}", serde_json::to_string_pretty(&entry.value)?)
            }
        }
        StateCommand::Set {
            agent,
            key,
            value,
            if_version,
        } => {
            let value = if value == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read the value from stdin")?
            } else {
                value.clone()
            };
            let value = serde_json::from_str(&value).map_err(|e| {
                bbx_core::Error::invalid_field(
                    "value",
                    format!("the value must be JSON (quote strings: '\"text\"'): {e}"),
                )
            })?;
            let entry = api
                .state_set(
                    agent.parse()?,
                    key.clone(),
                    SetState {
                        value,
                        if_version: *if_version,
                    },
                )
                .await?;
            if cli.json {
                output::json(&entry)
            } else {
                println!("{} = version {}", entry.key, entry.version)
            }
        }
        StateCommand::Delete { agent, key, if_version } => {
            api.state_delete(agent.parse()?, key.clone(), *if_version).await?;
            if cli.json {
                output::json(&serde_json::json!({ "deleted": key }))
            } else {
                println!("deleted {key}")
            }
        }
        StateCommand::List {
            agent,
            prefix,
            limit,
            cursor,
        } => {
            let req = ListState {
                prefix: prefix.clone(),
                limit: *limit,
                cursor: cursor.clone(),
            };
            let page = api.state_list(agent.parse()?, req).await?;
            if cli.json {
                output::json(&page)
            } else {
                output::entries(&page.entries, page.next_cursor.as_deref())
            }
        }
    }
    Ok(())
}

async fn auth(cli: &Cli, command: &AuthCommand) -> Result<()> {
    match command {
        AuthCommand::Endpoint(words) => {
            let words: Vec<String> = std::iter::once("auth".to_owned())
                .chain(words.iter().cloned())
                .collect();
            return endpoint::run(cli, &words).await;
        }
        AuthCommand::CreateToken { identity, grant } => {
            let (role, agent) = grant.parsed()?;
            let input = serde_json::json!({
                "identity": identity,
                "tenant": grant.tenant,
                "role": role,
                "agent": agent,
                "ttl_secs": grant.ttl,
                "kinds": grant.kinds,
            });
            let created = client(cli)?.call_endpoint("auth.create_token", input).await?;
            if cli.json {
                output::json(&created);
            } else {
                println!("{}", created["token"].as_str().unwrap_or_default());
            }
        }
        AuthCommand::Verify { token } => {
            let input = serde_json::json!({ "token": token });
            let checked = client(cli)?.call_endpoint("auth.verify", input).await?;
            if cli.json {
                output::json(&checked);
            } else {
                println!("{}", if checked["valid"] == true { "valid" } else { "not valid" });
            }
            if checked["valid"] != true {
                let why = checked["error"]["message"].as_str().unwrap_or("the token is not valid");
                anyhow::bail!("{why}");
            }
        }
        AuthCommand::CreateApiKey { identity, name, grant } => {
            let (role, agent) = grant.parsed()?;
            let req = CreateApiKey {
                name: name.clone().unwrap_or_else(|| identity.clone()),
                tenant: grant.tenant.clone(),
                role,
                identity: Some(identity.clone()),
                agent,
                ttl_secs: grant.ttl,
                kinds: grant.kinds.clone(),
            };
            let created = client(cli)?.create_key(&req).await?;
            if cli.json {
                // The key's fields beside its secret: `id` is the OAuth client id.
                let mut printed = serde_json::to_value(&created.info)?;
                printed["key"] = serde_json::Value::String(created.key);
                output::json(&printed);
            } else {
                println!("{}", created.key);
                eprintln!("key id {}: store the key now, it is not shown again", created.info.id);
            }
        }
    }
    Ok(())
}

async fn key(cli: &Cli, command: &KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Create { name, tenant } => {
            let req = CreateApiKey {
                name: name.clone(),
                tenant: tenant.clone(),
                ..Default::default()
            };
            let created = client(cli)?.create_key(&req).await?;
            if cli.json {
                output::json(&created)
            } else {
                println!("{}", created.key);
                eprintln!("(key {} shown once; store it now)", created.info.id);
            }
        }
        KeyCommand::List => {
            let keys = client(cli)?.list_keys().await?;
            if cli.json {
                output::json(&keys)
            } else {
                output::keys(&keys)
            }
        }
        KeyCommand::Revoke { id } => {
            let info = client(cli)?.revoke_key(id.parse()?).await?;
            if cli.json {
                output::json(&info)
            } else {
                println!("revoked key {}", info.id)
            }
        }
        KeyCommand::ResetAdmin => {
            // Offline: opening the data directory fails while a kernel holds it.
            let opened = bbx_kernel::Kernel::open(resolve_config(cli, &ServeArgs::default())?).await?;
            let path = match opened.admin_key_written {
                Some(path) => path,
                None => opened.kernel.reset_admin_key().await?,
            };
            opened.kernel.shutdown().await;
            if cli.json {
                output::json(&serde_json::json!({ "admin_key_file": path }))
            } else {
                println!("a new admin API key is in {}", path.display())
            }
        }
    }
    Ok(())
}
