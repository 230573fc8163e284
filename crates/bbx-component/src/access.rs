//! Agents' regions, as the kernel's components share them: which of an
//! agent's data another agent may use, and how a component that serves a
//! region asks. The grants themselves are FlowIntegrity's; a component that
//! keeps a region of its own (the bus's owned topics) is handed a
//! [`RegionAccess`] when the kernel wires them.

use bbx_core::{AgentId, Result};
use serde::{Deserialize, Serialize};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Right {
    Read,
    Write,
    /// Grant others, of the owner's tenant, the rights held over the region.
    Share,
}

/// Which of an agent's data a grant is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    /// State keys under the grant's prefix.
    #[default]
    State,
    /// The whole memory namespace (SemanticMemory).
    Memory,
    /// The whole context (ContextTiering).
    Context,
    /// The agent's topics (those made with it as their owner) whose names
    /// start with the grant's prefix.
    Topic,
}

impl Region {
    pub fn name(self) -> &'static str {
        match self {
            Region::State => "state",
            Region::Memory => "memory",
            Region::Context => "context",
            Region::Topic => "topics",
        }
    }
}

/// Asked by a component serving a region of its own: may `agent` use `right`
/// on `owner`'s `region` at `key`?
pub trait RegionAccess: Send + Sync {
    /// `Ok` where the owner granted it (the owner itself always may); else
    /// `policy_denied`, audited. `tenant` is the one both agents are in.
    fn check(&self, tenant: &str, owner: &AgentId, agent: &AgentId, at: (Region, &str), right: Right) -> Result<()>;
}
