//! Request and response types of the kernel's API.
//!
//! These are the wire types of the HTTP API, the arguments and results of the MCP
//! tools and the Rust client, all at once: one definition, so the three cannot drift.
//! Requests reject unknown fields, so a misspelled field is an error, not a no-op.

use crate::ids::{AgentId, KeyId};
use crate::quota::ToolSettings;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_PAGE_LIMIT: usize = 100;
pub const MAX_PAGE_LIMIT: usize = 1000;

/// What an agent is doing. An agent with no work in flight is `idle`: only data on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Idle,
}

/// An agent: a kernel object with its own durable state store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    pub status: AgentStatus,
    pub created_at: DateTime<Utc>,
    /// What the agent's tools may do beyond the safe defaults.
    #[serde(default, skip_serializing_if = "ToolSettings::is_default")]
    pub tools: ToolSettings,
}

/// Create an agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    /// A human-readable name, 1-256 bytes, e.g. "research-assistant". Need not be unique.
    pub name: String,
    /// The tenant that owns the agent (lowercase letters, digits, - and _). Defaults to
    /// "default", or to the caller's own tenant for a tenant-scoped key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Free-form key/value labels used to filter agent listings, e.g. {"team": "ml"}.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// What the agent's tools may do beyond the safe defaults, e.g.
    /// {"allow_networks": ["127.0.0.0/8"]} to let `tool.http` reach loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolSettings>,
}

/// Filter and page through agents.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAgents {
    /// Only agents of this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only agents carrying this label, written key=value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Page size, 1-1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The next_cursor of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One page of agents, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct AgentPage {
    pub agents: Vec<Agent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A value in an agent's state store. `version` starts at 1 and grows by one with
/// every write, so it can be used for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct StateEntry {
    pub key: String,
    #[schema(value_type = Object)]
    pub value: Value,
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    /// What the op that wrote it was labelled (`tainted`, and `tainted_by:OP`
    /// for each source of its untrusted content).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Write a state value, optionally only if its current version is `if_version`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetState {
    /// Any JSON value.
    #[schema(value_type = Object)]
    pub value: Value,
    /// Compare-and-swap: write only if the key's current version equals this; 0 means
    /// "only if the key does not exist". Omit to write unconditionally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
}

/// Delete precondition, as a query string.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, JsonSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteState {
    /// Delete only if the key's current version equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
}

/// List an agent's state keys by prefix.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, JsonSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListState {
    /// Only keys starting with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Page size, 1-1000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The next_cursor of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One page of state entries in key order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct StatePage {
    pub entries: Vec<StateEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The kernel at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct Status {
    pub version: String,
    pub uptime_secs: u64,
    /// Agents the caller can see: all of them for an administrator, its own
    /// tenant's for a tenant key.
    pub agents: u64,
    pub listen: String,
    /// Host details, shown to administrators only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct StorageStatus {
    pub engine: String,
    pub disk_bytes: u64,
    /// Writes acknowledged since start; each was on disk before its acknowledgement.
    pub writes_committed: u64,
    /// Store groups made durable since start, each one journal append (and one
    /// share of a journal fdatasync); writes / syncs is the group-commit factor.
    pub syncs: u64,
}

/// Create an API key. A key with a tenant may act only on that tenant's agents and
/// cannot manage keys; a key without one is an administrator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Default: `admin` for a key of no tenant, `operator` for a tenant's (what a
    /// tenant's key could do before roles: everything but managing keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Who the key is for (a user or a service), for the audit; default: its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Confines the key to one agent of its tenant (required for the `agent` role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    /// The key stops working this many seconds after it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Confines the key to submitting ops of these kinds (`tool.http`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
}

/// What a credential may do. Each role is confined to its tenant but `admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, in every tenant.
    Admin,
    /// Everything in its tenant, its keys included.
    TenantAdmin,
    /// Agents, their state and ops, quotas and held ops of its tenant; not keys.
    Operator,
    /// One agent's own ops and state.
    Agent,
    /// Reads only.
    Reader,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Self::Admin,
        Self::TenantAdmin,
        Self::Operator,
        Self::Agent,
        Self::Reader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::TenantAdmin => "tenant_admin",
            Self::Operator => "operator",
            Self::Agent => "agent",
            Self::Reader => "reader",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == s.replace('-', "_"))
            .ok_or_else(|| {
                let roles: Vec<&str> = Self::ALL.iter().map(|r| r.as_str()).collect();
                crate::Error::invalid_field(
                    "role",
                    format!("unknown role {s:?}; the roles are {}", roles.join(", ")),
                )
            })
    }
}

/// What the kernel keeps about an API key: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct ApiKeyInfo {
    pub id: KeyId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Absent in keys made before roles: see [`ApiKeyInfo::role`].
    #[serde(default, rename = "role", skip_serializing_if = "Option::is_none")]
    pub stored_role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The op kinds it may submit, if it is confined to some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// When it last authenticated a request (since the kernel started, or as of
    /// its last change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKeyInfo {
    /// The key's role: as made, or for a key made before roles, `admin` without a
    /// tenant and `operator` with one (what such keys could do).
    pub fn role(&self) -> Role {
        self.stored_role.unwrap_or(if self.tenant.is_none() {
            Role::Admin
        } else {
            Role::Operator
        })
    }
}

/// A newly created key: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, JsonSchema)]
pub struct CreatedApiKey {
    pub key: String,
    pub info: ApiKeyInfo,
}

/// Clamp a requested page size into [1, MAX_PAGE_LIMIT].
pub fn page_limit(requested: Option<usize>) -> crate::Result<usize> {
    match requested {
        None => Ok(DEFAULT_PAGE_LIMIT),
        Some(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(crate::Error::invalid_field(
            "limit",
            format!("limit must be 1-{MAX_PAGE_LIMIT}, got {n}"),
        )),
    }
}

/// An endpoint a component offers (`GET /v1/endpoints`): one description, served as
/// an HTTP route, an MCP tool and a CLI command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct EndpointInfo {
    /// `component.verb`: the MCP tool `component_verb`, the CLI command
    /// `bbx component verb`.
    pub name: String,
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: String,
    /// Under the server's root, with `{field}` segments filled from the input.
    pub path: String,
    pub description: String,
    /// JSON Schema of the input: an object of the path's fields and the body's.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// It answers with a stream of events (server-sent events over HTTP; its
    /// input then comes from the path and the query string), not one value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streams: bool,
}
