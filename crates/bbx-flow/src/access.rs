//! Memory access control: an agent's regions (its state keys, its memory
//! namespace, its context) are its own unless it grants them. A grant gives
//! another agent of the same tenant, or a group of them (every agent carrying
//! a label), `read`, `write` and/or `share` (granting on what it holds) over
//! one region of the owner: state keys under a prefix, or the whole memory
//! namespace or context. An op that names another agent (`state.*`:
//! `"agent": OWNER`; `memory.search|get|add`, `context.get|assemble|put`:
//! `"owner": OWNER`) is refused with `policy_denied` (and audited) unless a
//! grant covers its region, key and right. Grants are stored, and go with
//! either agent.

use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::KeyspaceDef;
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// owner, grantee, prefix -> [`Grant`] as JSON. Its id is what redo records
/// carry: never change it.
pub const FLOW_GRANTS: KeyspaceDef = KeyspaceDef {
    id: 18,
    name: "flow_grants",
};

/// Grants one owner gives at most.
pub const MAX_GRANTS_PER_OWNER: usize = 256;

pub use bbx_component::access::{Region, Right};

/// Marks a grant's key: none for state, whose keys predate regions.
fn key_mark(region: Region) -> Option<u8> {
    match region {
        Region::State => None,
        Region::Memory => Some(1),
        Region::Context => Some(2),
        Region::Topic => Some(3),
    }
}

/// Whom a grant is given to: one agent, or a group: every agent of the owner's
/// tenant whose labels hold `key=value`, now or later (`label:team=ml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    Agent(AgentId),
    Labelled { key: String, value: String },
}

/// How a group is written.
const LABEL_PREFIX: &str = "label:";

impl Grantee {
    /// Whether the agent `id`, with `labels`, is this grantee or in this group.
    pub fn includes(&self, id: &AgentId, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Agent(agent) => agent == id,
            Self::Labelled { key, value } => labels.get(key) == Some(value),
        }
    }
}

impl std::str::FromStr for Grantee {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let Some(label) = text.strip_prefix(LABEL_PREFIX) else {
            return Ok(Self::Agent(text.parse()?));
        };
        let Some((key, value)) = label.split_once('=').filter(|(k, v)| !k.is_empty() && !v.is_empty()) else {
            return Err(Error::invalid_field(
                "grantee",
                "a group is written label:KEY=VALUE (every agent with that label)",
            ));
        };
        bbx_core::validate::name("grantee", key)?;
        bbx_core::validate::name("grantee", value)?;
        Ok(Self::Labelled {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Grantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(agent) => write!(f, "{agent}"),
            Self::Labelled { key, value } => write!(f, "{LABEL_PREFIX}{key}={value}"),
        }
    }
}

impl Serialize for Grantee {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Grantee {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: Error| serde::de::Error::custom(e.message))
    }
}

/// Rights over an owner's region (state keys under `prefix`), given to
/// `grantee`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Grant {
    pub owner: AgentId,
    /// An agent id, or `label:KEY=VALUE` for every agent of the owner's tenant
    /// with that label.
    #[schemars(with = "String")]
    pub grantee: Grantee,
    #[serde(default)]
    pub region: Region,
    /// State keys starting with it (empty: every key; always empty for the
    /// other regions).
    pub prefix: String,
    pub rights: Vec<Right>,
    pub by: String,
    pub at: DateTime<Utc>,
}

impl Grant {
    pub fn key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(48 + self.prefix.len());
        key.extend_from_slice(self.owner.as_bytes());
        match &self.grantee {
            Grantee::Agent(agent) => key.extend_from_slice(agent.as_bytes()),
            // No agent id is all zeros (ids carry a version), so a group's key
            // cannot be an agent's.
            Grantee::Labelled { key: name, value } => {
                key.extend_from_slice(&[0; 16]);
                key.extend_from_slice(name.as_bytes());
                key.push(b'=');
                key.extend_from_slice(value.as_bytes());
                key.push(0);
            }
        }
        // No prefix starts with 0xFF (a prefix is UTF-8): a region's mark
        // cannot be a state prefix.
        if let Some(mark) = key_mark(self.region) {
            key.extend_from_slice(&[0xFF, mark]);
        }
        key.extend_from_slice(self.prefix.as_bytes());
        key
    }
}

/// The grants in force, by owner.
#[derive(Default)]
pub struct Grants {
    by_owner: parking_lot::RwLock<FxHashMap<AgentId, Vec<Grant>>>,
}

impl Grants {
    pub fn load(&self, grants: Vec<Grant>) {
        let mut by_owner = self.by_owner.write();
        for grant in grants {
            by_owner.entry(grant.owner).or_default().push(grant);
        }
    }

    /// Whether the agent `id`, with `labels`, may use `right` on `owner`'s
    /// `region` at `key` (a state key; empty for the other regions).
    pub fn allows(
        &self,
        owner: &AgentId,
        (id, labels): (&AgentId, &BTreeMap<String, String>),
        (region, key): (Region, &str),
        right: Right,
    ) -> bool {
        self.by_owner.read().get(owner).is_some_and(|grants| {
            grants.iter().any(|g| {
                g.region == region
                    && g.grantee.includes(id, labels)
                    && key.starts_with(&g.prefix)
                    && g.rights.contains(&right)
            })
        })
    }

    /// Replaces the grant of the same owner, grantee and prefix; refused past
    /// [`MAX_GRANTS_PER_OWNER`].
    pub fn check_room(&self, grant: &Grant) -> Result<()> {
        let by_owner = self.by_owner.read();
        let held = by_owner.get(&grant.owner).map_or(0, Vec::len);
        let replacing = by_owner
            .get(&grant.owner)
            .is_some_and(|g| g.iter().any(|g| g.key() == grant.key()));
        if held >= MAX_GRANTS_PER_OWNER && !replacing {
            return Err(Error::new(
                ErrorCode::ResourceExhausted,
                format!("agent {} gives {MAX_GRANTS_PER_OWNER} grants already", grant.owner),
            ));
        }
        Ok(())
    }

    pub fn put(&self, grant: Grant) {
        let mut by_owner = self.by_owner.write();
        let grants = by_owner.entry(grant.owner).or_default();
        grants.retain(|g| g.key() != grant.key());
        grants.push(grant);
    }

    pub fn remove(&self, key: &[u8]) -> Option<Grant> {
        let mut by_owner = self.by_owner.write();
        let owner = AgentId::from_bytes(key.get(..16)?.try_into().ok()?);
        let grants = by_owner.get_mut(&owner)?;
        let at = grants.iter().position(|g| g.key() == key)?;
        Some(grants.remove(at))
    }

    /// The grants `agent` gives and is given.
    pub fn of(&self, agent: &AgentId) -> Vec<Grant> {
        let by_owner = self.by_owner.read();
        by_owner
            .values()
            .flatten()
            .filter(|g| g.owner == *agent || g.grantee == Grantee::Agent(*agent))
            .cloned()
            .collect()
    }

    /// Forgets every grant `agent` gives or is given; returns their keys.
    pub fn forget_agent(&self, agent: &AgentId) -> Vec<Vec<u8>> {
        let mut by_owner = self.by_owner.write();
        let mut keys: Vec<Vec<u8>> = by_owner
            .remove(agent)
            .unwrap_or_default()
            .iter()
            .map(Grant::key)
            .collect();
        for grants in by_owner.values_mut() {
            grants.retain(|g| {
                let keep = g.grantee != Grantee::Agent(*agent);
                if !keep {
                    keys.push(g.key());
                }
                keep
            });
        }
        keys
    }
}

/// The region and right a kind needs when its op names another agent.
/// (Topics are the bus's to check: it asks [`bbx_component::access::RegionAccess`]
/// for its ops and endpoints alike.)
pub fn right_of(kind: &str) -> Option<(Region, Right)> {
    Some(match kind {
        "state.get" => (Region::State, Right::Read),
        "state.set" | "state.incr" | "state.delete" => (Region::State, Right::Write),
        "memory.search" | "memory.get" => (Region::Memory, Right::Read),
        "memory.add" => (Region::Memory, Right::Write),
        "context.get" | "context.assemble" => (Region::Context, Right::Read),
        "context.put" => (Region::Context, Right::Write),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(owner: AgentId, grantee: AgentId, prefix: &str, rights: Vec<Right>) -> Grant {
        Grant {
            owner,
            grantee: Grantee::Agent(grantee),
            region: Region::State,
            prefix: prefix.into(),
            rights,
            by: "test".into(),
            at: Utc::now(),
        }
    }

    #[test]
    fn a_grant_covers_its_prefix_right_and_grantee_only() {
        let grants = Grants::default();
        let none = BTreeMap::new();
        let (a, b, c) = (AgentId::generate(), AgentId::generate(), AgentId::generate());
        grants.put(grant(a, b, "shared/", vec![Right::Read]));
        assert!(grants.allows(&a, (&b, &none), (Region::State, "shared/x"), Right::Read));
        assert!(!grants.allows(&a, (&b, &none), (Region::State, "shared/x"), Right::Write));
        assert!(!grants.allows(&a, (&b, &none), (Region::State, "private"), Right::Read));
        assert!(!grants.allows(&a, (&c, &none), (Region::State, "shared/x"), Right::Read));
        assert!(
            !grants.allows(&b, (&a, &none), (Region::State, "shared/x"), Right::Read),
            "grants are not mutual"
        );
        grants.put(grant(a, b, "shared/", vec![Right::Read, Right::Write]));
        assert!(
            grants.allows(&a, (&b, &none), (Region::State, "shared/x"), Right::Write),
            "a grant is replaced"
        );
        assert_eq!(grants.of(&a).len(), 1);
        let key = grant(a, b, "shared/", vec![]).key();
        assert!(grants.remove(&key).is_some());
        assert!(!grants.allows(&a, (&b, &none), (Region::State, "shared/x"), Right::Read));
        grants.put(grant(a, b, "", vec![Right::Read]));
        grants.put(grant(c, a, "", vec![Right::Read]));
        assert_eq!(grants.forget_agent(&a).len(), 2);
        assert!(grants.of(&c).is_empty());
    }

    #[test]
    fn a_group_grant_covers_every_agent_with_the_label_now_and_later() {
        let grants = Grants::default();
        let (owner, member, other) = (AgentId::generate(), AgentId::generate(), AgentId::generate());
        let group: Grantee = "label:team=ml".parse().unwrap();
        assert_eq!(group.to_string(), "label:team=ml");
        let mut given = grant(owner, member, "shared/", vec![Right::Read]);
        given.grantee = group.clone();
        grants.put(given.clone());
        let ml = BTreeMap::from([("team".to_owned(), "ml".to_owned())]);
        let ops = BTreeMap::from([("team".to_owned(), "ops".to_owned())]);
        assert!(grants.allows(&owner, (&member, &ml), (Region::State, "shared/x"), Right::Read));
        assert!(grants.allows(&owner, (&other, &ml), (Region::State, "shared/x"), Right::Read));
        assert!(!grants.allows(&owner, (&other, &ops), (Region::State, "shared/x"), Right::Read));
        assert!(!grants.allows(
            &owner,
            (&other, &BTreeMap::new()),
            (Region::State, "shared/x"),
            Right::Read
        ));
        assert_ne!(given.key(), grant(owner, member, "shared/", vec![]).key());
        let stored = serde_json::to_value(&given).unwrap();
        assert_eq!(stored["grantee"], "label:team=ml");
        assert_eq!(serde_json::from_value::<Grant>(stored).unwrap(), given);
        for bad in ["label:", "label:team", "label:=ml", "label:team=", "nobody"] {
            assert!(bad.parse::<Grantee>().is_err(), "{bad} was accepted");
        }
        assert!(grants.remove(&given.key()).is_some());
        assert!(!grants.allows(&owner, (&member, &ml), (Region::State, "shared/x"), Right::Read));
    }

    #[test]
    fn a_grant_covers_its_region_only() {
        let grants = Grants::default();
        let none = BTreeMap::new();
        let (a, b) = (AgentId::generate(), AgentId::generate());
        let mut memory = grant(a, b, "", vec![Right::Read]);
        memory.region = Region::Memory;
        grants.put(memory.clone());
        assert!(grants.allows(&a, (&b, &none), (Region::Memory, ""), Right::Read));
        assert!(!grants.allows(&a, (&b, &none), (Region::Context, ""), Right::Read));
        assert!(!grants.allows(&a, (&b, &none), (Region::State, "k"), Right::Read));
        let state = grant(a, b, "", vec![Right::Read]);
        assert_ne!(memory.key(), state.key(), "one grant per region");
        grants.put(state);
        assert_eq!(grants.of(&a).len(), 2);
        let stored: Grant = serde_json::from_value(serde_json::json!({
            "owner": a, "grantee": b.to_string(), "prefix": "p/", "rights": ["read"], "by": "old", "at": Utc::now(),
        }))
        .unwrap();
        assert_eq!(
            stored.region,
            Region::State,
            "grants stored before regions are over state"
        );
        assert_eq!(right_of("memory.search"), Some((Region::Memory, Right::Read)));
        assert_eq!(right_of("context.put"), Some((Region::Context, Right::Write)));
        assert_eq!(right_of("tool.http"), None);
    }
}
