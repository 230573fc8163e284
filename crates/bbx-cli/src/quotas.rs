//! `bbx quotas ...`: the quotas of agents and tenants, and how the host confines
//! tool processes.

use crate::cli::{Cli, QuotaSetArgs, QuotasCommand};
use crate::{client, output};
use anyhow::{Result, bail};
use bbx_core::api::prelude::*;
use bbx_core::quota::{Node, QuotaLimits};

pub async fn run(cli: &Cli, command: &QuotasCommand) -> Result<()> {
    let api = client(cli)?;
    match command {
        QuotasCommand::Set(args) => {
            let update = limits(args);
            if update == QuotaLimits::default() {
                bail!("give at least one limit to set, e.g. --memory-bytes 268435456");
            }
            let info = api.set_quota(node(&args.target, args.tenant)?, update).await?;
            if cli.json {
                output::json(&info);
            } else {
                output::quotas(std::slice::from_ref(&info));
            }
        }
        QuotasCommand::Get { target, tenant } => {
            let info = api.quota(node(target, *tenant)?).await?;
            if cli.json {
                output::json(&info);
            } else {
                output::quotas(std::slice::from_ref(&info));
            }
        }
        QuotasCommand::List | QuotasCommand::Stats => {
            let infos = api.list_quotas().await?;
            if cli.json {
                output::json(&infos);
            } else {
                output::quotas(&infos);
            }
        }
        QuotasCommand::GpuStatus => {
            let status = api.gpu_status().await?;
            if cli.json {
                output::json(&status);
            } else {
                output::gpus(&status);
            }
        }
        QuotasCommand::CgroupStatus { group } => {
            let mut status = api.cgroup_status().await?;
            if let Some(group) = group {
                if !status.groups.contains(group) {
                    bail!("no cgroup {group:?} (groups now: {})", status.groups.join(", "));
                }
                status.groups.retain(|g| g == group);
            }
            if cli.json {
                output::json(&status);
            } else {
                output::cgroups(&status);
            }
        }
    }
    Ok(())
}

fn node(target: &str, tenant: bool) -> Result<Node> {
    if target.contains('/') {
        return Ok(target.parse()?);
    }
    let kind = if tenant { "tenant" } else { "agent" };
    Ok(format!("{kind}/{target}").parse()?)
}

fn limits(args: &QuotaSetArgs) -> QuotaLimits {
    QuotaLimits {
        requests_per_second: args.requests_per_second,
        tool_calls_per_minute: args.tool_calls_per_minute,
        llm_tokens_per_minute: args.llm_tokens_per_minute,
        cost_per_day_usd: args.cost_per_day_usd,
        cost_per_month_usd: args.cost_per_month_usd,
        concurrent_ops: args.concurrent_ops,
        memory_bytes: args.memory_bytes,
        cpu_percent: args.cpu_percent,
        pids: args.pids,
        group: args.group.clone(),
        gpu_devices: args.gpu_devices.clone(),
        gpu_memory_bytes: args.gpu_memory_bytes,
        action: args.action,
        max_delay_ms: args.max_delay_ms,
    }
}
