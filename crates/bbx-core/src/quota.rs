//! Quotas and tool settings: the wire types of AgentQuotas and of what an agent's
//! tools may do.
//!
//! Quotas form a hierarchy, tenant -> (optional named group) -> agent: each node has
//! its own limits, and an op must fit every node on its path, so a child can never
//! exceed its parent. A limit that is unset on a node is simply not checked there.
//! An agent joins a group through its own quota's `group`.

use crate::ids::AgentId;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A node of the hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    Tenant(String),
    /// A named group of a tenant's agents.
    Group {
        tenant: String,
        name: String,
    },
    Agent(AgentId),
}

impl std::str::FromStr for Node {
    type Err = crate::Error;

    /// `tenant/NAME`, `group/TENANT/NAME` or `agent/ID`.
    fn from_str(text: &str) -> crate::Result<Self> {
        let unknown = || {
            crate::Error::invalid_field(
                "node",
                format!("{text:?} is not a quota node; write tenant/NAME, group/TENANT/NAME or agent/ID"),
            )
        };
        match text.split_once('/') {
            Some(("tenant", name)) => {
                crate::validate::tenant(name)?;
                Ok(Self::Tenant(name.to_owned()))
            }
            Some(("group", rest)) => {
                let (tenant, name) = rest.split_once('/').ok_or_else(unknown)?;
                crate::validate::tenant(tenant)?;
                validate_group(name)?;
                Ok(Self::Group {
                    tenant: tenant.to_owned(),
                    name: name.to_owned(),
                })
            }
            Some(("agent", id)) => Ok(Self::Agent(id.parse()?)),
            _ => Err(unknown()),
        }
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tenant(name) => write!(f, "tenant/{name}"),
            Self::Group { tenant, name } => write!(f, "group/{tenant}/{name}"),
            Self::Agent(id) => write!(f, "agent/{id}"),
        }
    }
}

/// A group's name follows the rules of tenant names.
pub fn validate_group(name: &str) -> crate::Result<()> {
    crate::validate::tenant(name).map_err(|_| {
        crate::Error::invalid_field(
            "group",
            format!("{name:?} is not a group name (lowercase letters, digits, - and _)"),
        )
    })
}

/// What happens when a rate limit is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaAction {
    /// Refuse the op at once: 429 `quota_exceeded`, naming the limit.
    #[default]
    Reject,
    /// Hold the submission until the limit allows it (up to `max_delay_ms`).
    Throttle,
    /// Accept the op at once, and start it when the limit allows (up to
    /// `max_delay_ms` later), in the order ops were queued.
    Queue,
    /// Let the op through, and publish a `quota.exceeded` event and metric.
    Notify,
}

/// The limits of one node (a tenant or an agent). Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Ops submitted per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Tool ops (`tool.*`, `llm.*`) submitted per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls_per_minute: Option<u32>,
    /// LLM tokens (prompt and completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_tokens_per_minute: Option<u64>,
    /// Spend per UTC day, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_day_usd: Option<f64>,
    /// Spend per UTC calendar month, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_month_usd: Option<f64>,
    /// Ops in flight (accepted and not yet completed) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_ops: Option<u32>,
    /// Memory of one tool process tree, in bytes; it is killed at the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU of one tool process tree, in percent of one core (200 = two cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
    /// Processes and threads of one tool process tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// The GPUs (NVML indexes) a tool process may use; empty means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_devices: Option<Vec<u32>>,
    /// GPU memory of one tool process on each of its GPUs (through CUDA MPS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    /// On an agent's node: the group of its tenant it belongs to, whose limits bind
    /// it too. Changed only while the agent has nothing in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What a rate limit does when reached (default `reject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<QuotaAction>,
    /// How long `throttle` may hold a submission before it is refused after all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
}

impl QuotaLimits {
    /// These limits with every field that `update` sets replaced by it.
    #[must_use]
    pub fn merged(&self, update: &QuotaLimits) -> QuotaLimits {
        QuotaLimits {
            requests_per_second: update.requests_per_second.or(self.requests_per_second),
            tool_calls_per_minute: update.tool_calls_per_minute.or(self.tool_calls_per_minute),
            llm_tokens_per_minute: update.llm_tokens_per_minute.or(self.llm_tokens_per_minute),
            cost_per_day_usd: update.cost_per_day_usd.or(self.cost_per_day_usd),
            cost_per_month_usd: update.cost_per_month_usd.or(self.cost_per_month_usd),
            concurrent_ops: update.concurrent_ops.or(self.concurrent_ops),
            memory_bytes: update.memory_bytes.or(self.memory_bytes),
            cpu_percent: update.cpu_percent.or(self.cpu_percent),
            pids: update.pids.or(self.pids),
            gpu_devices: update.gpu_devices.clone().or_else(|| self.gpu_devices.clone()),
            gpu_memory_bytes: update.gpu_memory_bytes.or(self.gpu_memory_bytes),
            group: update.group.clone().or_else(|| self.group.clone()),
            action: update.action.or(self.action),
            max_delay_ms: update.max_delay_ms.or(self.max_delay_ms),
        }
    }

    /// The process limits of a tool run under both `self` (the child) and `parent`:
    /// the tighter of each.
    #[must_use]
    pub fn process_limits(&self, parent: &QuotaLimits) -> ProcessLimits {
        self.own_process_limits().within(parent)
    }

    fn own_process_limits(&self) -> ProcessLimits {
        ProcessLimits {
            memory_bytes: self.memory_bytes,
            cpu_percent: self.cpu_percent,
            pids: self.pids,
            gpu_devices: self.gpu_devices.clone(),
            gpu_memory_bytes: self.gpu_memory_bytes,
        }
    }

    /// Checks that every limit is in range; one error naming the first that is not.
    pub fn validate(&self) -> crate::Result<()> {
        let positive = [
            ("requests_per_second", self.requests_per_second.map(u64::from)),
            ("tool_calls_per_minute", self.tool_calls_per_minute.map(u64::from)),
            ("llm_tokens_per_minute", self.llm_tokens_per_minute),
            ("concurrent_ops", self.concurrent_ops.map(u64::from)),
            ("cpu_percent", self.cpu_percent.map(u64::from)),
            ("pids", self.pids.map(u64::from)),
        ];
        for (field, value) in positive {
            if value == Some(0) {
                return Err(crate::Error::invalid_field(
                    field,
                    format!("{field} must be at least 1"),
                ));
            }
        }
        for (field, usd) in [
            ("cost_per_day_usd", self.cost_per_day_usd),
            ("cost_per_month_usd", self.cost_per_month_usd),
        ] {
            if usd.is_some_and(|u| !(0.0..=MAX_BUDGET_USD).contains(&u)) {
                return Err(crate::Error::invalid_field(
                    field,
                    format!("{field} must be 0 to {MAX_BUDGET_USD}"),
                ));
            }
        }
        if let Some(group) = &self.group {
            validate_group(group)?;
        }
        if self.memory_bytes.is_some_and(|m| m < MIN_MEMORY_BYTES) {
            return Err(crate::Error::invalid_field(
                "memory_bytes",
                format!("memory_bytes must be at least {MIN_MEMORY_BYTES} (1 MiB)"),
            ));
        }
        if self.max_delay_ms.is_some_and(|d| d > MAX_THROTTLE_MS) {
            return Err(crate::Error::invalid_field(
                "max_delay_ms",
                format!("max_delay_ms is at most {MAX_THROTTLE_MS}"),
            ));
        }
        Ok(())
    }
}

/// The largest budget, in USD (micro-dollars must fit in a u64 many times over).
pub const MAX_BUDGET_USD: f64 = 1e9;

/// USD as micro-dollars, the unit budgets are counted in (exact integer sums).
pub fn usd_to_micros(usd: f64) -> u64 {
    (usd * 1e6).round() as u64
}

/// What an op can use, or used, of a budget: micro-dollars and LLM tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub micros: u64,
    pub tokens: u64,
}

/// Spend reserved on an op's path before it runs, in the budget windows it was
/// reserved in; journaled with the op's start, so a crash cannot lose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub micros: u64,
    pub tokens: u64,
    /// The nodes it was reserved on (`tenant/..`, `group/..`, `agent/..`), whose
    /// spend the op's charge adds to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The UTC day (`2026-11-24`) and month (`2026-11`) charged.
    pub day: String,
    pub month: String,
}

/// Below this a process cannot even start.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// The longest a throttled submission is held.
pub const MAX_THROTTLE_MS: u64 = 60_000;

/// The limits a tool's process tree runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct ProcessLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_devices: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
}

impl ProcessLimits {
    /// These limits, narrowed by an ancestor's: the tighter of each.
    #[must_use]
    pub fn within(self, ancestor: &QuotaLimits) -> ProcessLimits {
        fn min<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        // A child's GPUs are those of its own list that its ancestor also allows.
        let gpu_devices = match (self.gpu_devices, &ancestor.gpu_devices) {
            (Some(own), Some(allowed)) => Some(own.into_iter().filter(|d| allowed.contains(d)).collect()),
            (own, allowed) => own.or_else(|| allowed.clone()),
        };
        ProcessLimits {
            memory_bytes: min(self.memory_bytes, ancestor.memory_bytes),
            cpu_percent: min(self.cpu_percent, ancestor.cpu_percent),
            pids: min(self.pids, ancestor.pids),
            gpu_devices,
            gpu_memory_bytes: min(self.gpu_memory_bytes, ancestor.gpu_memory_bytes),
        }
    }
}

/// A node's limits and what it uses now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct QuotaInfo {
    /// `tenant/NAME` or `agent/ID`.
    pub node: String,
    pub limits: QuotaLimits,
    /// Its tenant's limits, which also apply (absent for a tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<QuotaLimits>,
    /// For an agent in a group: the group's limits, which also apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<QuotaLimits>,
    pub usage: QuotaUsage,
}

/// What a node uses now, against its limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct QuotaUsage {
    pub concurrent_ops: u64,
    /// Ops refused or throttled by one of this node's limits since the kernel started.
    pub rejected: u64,
    pub throttled: u64,
    /// Submissions past 80 % of a rate limit since the kernel started.
    pub warnings: u64,
    /// Spent and reserved (by ops running now) in the current UTC day and month, in USD.
    pub spent_today_usd: f64,
    pub spent_this_month_usd: f64,
    pub reserved_usd: f64,
}

/// What an agent's tools may do beyond the safe defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolSettings {
    /// Networks `tool.http` may reach although they are private, loopback or
    /// link-local, as CIDRs ("127.0.0.0/8", "::1/128", "10.1.0.0/16").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_networks: Vec<String>,
    /// Environment variables of the kernel passed on to `tool.shell` programs
    /// (besides the fixed PATH, HOME, LANG).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_allow: Vec<String>,
    /// Run `tool.shell` programs in a network namespace of their own (no network).
    #[serde(default)]
    pub no_network: bool,
    /// MCP servers its `tool.mcp` may call, by name: streamable HTTP URLs, reached
    /// under the same address rules as `tool.http`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mcp_servers: std::collections::BTreeMap<String, String>,
}

/// How tool processes are confined on this host (`bbx quotas cgroup-status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct CgroupStatus {
    /// "cgroup v2", "cgroup v1" or "rlimits".
    pub driver: String,
    /// Where each run's group is made, one directory per controller.
    pub roots: Vec<String>,
    /// Runs' groups that exist now, by name (`op-ID`).
    pub groups: Vec<String>,
    /// Programs run in mount namespaces that show only their workspace.
    pub isolated: bool,
    /// The uid programs run as, when the kernel is root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_uid: Option<u32>,
}

/// The GPUs a quota can hand out (`bbx quotas gpu-status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct GpuStatus {
    /// False when NVML cannot be loaded or sees no device; `reason` says why.
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    pub devices: Vec<GpuDevice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub utilization_percent: u32,
}

impl ToolSettings {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_never_gets_more_than_its_parent() {
        let tenant = QuotaLimits {
            memory_bytes: Some(64 << 20),
            pids: Some(10),
            ..Default::default()
        };
        let agent = QuotaLimits {
            memory_bytes: Some(128 << 20),
            cpu_percent: Some(50),
            ..Default::default()
        };
        let limits = agent.process_limits(&tenant);
        assert_eq!(limits.memory_bytes, Some(64 << 20));
        let gpus = QuotaLimits {
            gpu_devices: Some(vec![0, 1, 2]),
            ..Default::default()
        }
        .process_limits(&QuotaLimits {
            gpu_devices: Some(vec![1, 2, 3]),
            ..Default::default()
        });
        assert_eq!(gpus.gpu_devices, Some(vec![1, 2]), "only GPUs the parent allows");
        assert_eq!(limits.pids, Some(10));
        assert_eq!(limits.cpu_percent, Some(50));
    }

    #[test]
    fn merging_keeps_what_the_update_leaves_out() {
        let old = QuotaLimits {
            pids: Some(5),
            memory_bytes: Some(8 << 20),
            ..Default::default()
        };
        let new = old.merged(&QuotaLimits {
            pids: Some(7),
            ..Default::default()
        });
        assert_eq!(new.pids, Some(7));
        assert_eq!(new.memory_bytes, Some(8 << 20));
    }

    #[test]
    fn limits_out_of_range_are_refused() {
        let zero = QuotaLimits {
            pids: Some(0),
            ..Default::default()
        };
        assert!(zero.validate().unwrap_err().message.contains("pids"));
        let tiny = QuotaLimits {
            memory_bytes: Some(1000),
            ..Default::default()
        };
        assert!(tiny.validate().is_err());
        assert!(QuotaLimits::default().validate().is_ok());
    }
}
