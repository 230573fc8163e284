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
//!
//! A grant given through `share` records its sharer and stands only while
//! the sharer holds what it gave through grants that stand themselves, traced
//! back to the owner's own: revoking a sharer's right takes back what it shared,
//! and what was shared from that, as SQL's `REVOKE ... CASCADE` does (a cycle
//! of sharers does not hold itself up). A sharer replaces and revokes only the
//! grants it gave, and has room for [`MAX_SHARED_PER_SHARER`] of them on one
//! owner; sharers together fill at most half the owner's room.

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

/// Grants sharers give over one owner's regions at most, all together: the
/// owner always has room for grants of its own.
pub const MAX_SHARED_PER_OWNER: usize = MAX_GRANTS_PER_OWNER / 2;

/// Grants one sharer gives over one owner's regions at most.
pub const MAX_SHARED_PER_SHARER: usize = 16;

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
    /// The agent that gave it with its `share` right; none where one acting
    /// for the owner gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_by: Option<AgentId>,
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

    /// The grants `owner` gives.
    pub fn given_by(&self, owner: &AgentId) -> Vec<Grant> {
        self.by_owner.read().get(owner).cloned().unwrap_or_default()
    }

    /// Whether `grant` may be put (replacing the grant of the same owner,
    /// grantee, region and prefix): refused past the owner's room, and, for
    /// a sharer, past its room or over a grant it did not give.
    pub fn check_room(&self, grant: &Grant) -> Result<()> {
        let by_owner = self.by_owner.read();
        let held = by_owner.get(&grant.owner).map(Vec::as_slice).unwrap_or_default();
        let key = grant.key();
        let replaced = held.iter().find(|g| g.key() == key);
        let others = || held.iter().filter(|g| g.key() != key);
        let full = |what: String| Err(Error::new(ErrorCode::ResourceExhausted, what));
        if others().count() >= MAX_GRANTS_PER_OWNER {
            return full(format!(
                "agent {} gives {MAX_GRANTS_PER_OWNER} grants already",
                grant.owner
            ));
        }
        let Some(sharer) = grant.shared_by else {
            return Ok(());
        };
        if let Some(replaced) = replaced.filter(|g| g.shared_by != Some(sharer)) {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{} holds a grant over agent {}'s {} given by {}: a sharer replaces only the grants it gave",
                    grant.grantee,
                    grant.owner,
                    grant.region.name(),
                    replaced
                        .shared_by
                        .map_or_else(|| "its owner".to_owned(), |a| format!("agent {a}"))
                ),
            ));
        }
        if others().filter(|g| g.shared_by.is_some()).count() >= MAX_SHARED_PER_OWNER {
            return full(format!(
                "agents sharing agent {}'s regions give {MAX_SHARED_PER_OWNER} grants already",
                grant.owner
            ));
        }
        if others().filter(|g| g.shared_by == Some(sharer)).count() >= MAX_SHARED_PER_SHARER {
            return full(format!(
                "agent {sharer} shares agent {}'s regions with {MAX_SHARED_PER_SHARER} grants already",
                grant.owner
            ));
        }
        Ok(())
    }

    /// Puts `owner`'s grants as [`after_change`] planned them.
    pub fn set(&self, owner: AgentId, grants: Vec<Grant>) {
        let mut by_owner = self.by_owner.write();
        if grants.is_empty() {
            by_owner.remove(&owner);
        } else {
            by_owner.insert(owner, grants);
        }
    }

    #[cfg(test)]
    pub fn put(&self, grant: Grant) {
        let mut by_owner = self.by_owner.write();
        let grants = by_owner.entry(grant.owner).or_default();
        grants.retain(|g| g.key() != grant.key());
        grants.push(grant);
    }

    #[cfg(test)]
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

    /// The owners of grants that `agent` shared.
    pub fn shared_from(&self, agent: &AgentId) -> Vec<AgentId> {
        let by_owner = self.by_owner.read();
        by_owner
            .iter()
            .filter(|(_, grants)| grants.iter().any(|g| g.shared_by == Some(*agent)))
            .map(|(owner, _)| *owner)
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

/// An owner's grants after `put` replaces its namesake and the grant at
/// `remove` goes, less every shared grant left without backing (see the
/// crate's docs): the grants that stand, and those that go (a replaced grant
/// is neither).
pub fn after_change(
    mut grants: Vec<Grant>,
    put: Option<Grant>,
    remove: Option<&[u8]>,
    labels_of: impl Fn(&AgentId) -> Result<BTreeMap<String, String>>,
) -> Result<(Vec<Grant>, Vec<Grant>)> {
    let mut gone = Vec::new();
    if let Some(at) = remove.and_then(|key| grants.iter().position(|g| g.key() == key)) {
        gone.push(grants.remove(at));
    }
    if let Some(put) = put {
        let key = put.key();
        grants.retain(|g| g.key() != key);
        grants.push(put);
    }
    let backed = backed(&grants, labels_of)?;
    let (stand, unbacked): (Vec<_>, Vec<_>) = grants.into_iter().zip(backed).partition(|(_, backed)| *backed);
    gone.extend(unbacked.into_iter().map(|(g, _)| g));
    Ok((stand.into_iter().map(|(g, _)| g).collect(), gone))
}

/// Which of one owner's grants stand: the owner's own, then, until none is
/// added, each shared one whose sharer holds `share` and each right it gave
/// over its region and prefix through grants that stand.
fn backed(grants: &[Grant], labels_of: impl Fn(&AgentId) -> Result<BTreeMap<String, String>>) -> Result<Vec<bool>> {
    let mut labels: FxHashMap<AgentId, BTreeMap<String, String>> = FxHashMap::default();
    for sharer in grants.iter().filter_map(|g| g.shared_by) {
        if let std::collections::hash_map::Entry::Vacant(entry) = labels.entry(sharer) {
            entry.insert(labels_of(&sharer)?);
        }
    }
    let mut backed: Vec<bool> = grants.iter().map(|g| g.shared_by.is_none()).collect();
    loop {
        let mut grew = false;
        for (at, grant) in grants.iter().enumerate() {
            let Some(sharer) = grant.shared_by.filter(|_| !backed[at]) else {
                continue;
            };
            let holds = |right: &Right| {
                grants.iter().zip(&backed).any(|(held, &stands)| {
                    stands
                        && held.region == grant.region
                        && held.grantee.includes(&sharer, &labels[&sharer])
                        && grant.prefix.starts_with(&held.prefix)
                        && held.rights.contains(right)
                })
            };
            if holds(&Right::Share) && grant.rights.iter().all(holds) {
                backed[at] = true;
                grew = true;
            }
        }
        if !grew {
            return Ok(backed);
        }
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
            shared_by: None,
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

    fn shared(owner: AgentId, sharer: AgentId, grantee: AgentId, rights: Vec<Right>) -> Grant {
        Grant {
            shared_by: Some(sharer),
            ..grant(owner, grantee, "", rights)
        }
    }

    #[test]
    fn revoking_a_sharer_takes_back_what_it_shared_and_a_cycle_does_not_hold_itself_up() {
        let (owner, b, c, d) = (
            AgentId::generate(),
            AgentId::generate(),
            AgentId::generate(),
            AgentId::generate(),
        );
        let no_labels = |_: &AgentId| Ok(BTreeMap::new());
        let at = |g: Grant, prefix: &str| Grant {
            prefix: prefix.into(),
            ..g
        };
        let to_b = grant(owner, b, "", vec![Right::Read, Right::Share]);
        let b_to_c = shared(owner, b, c, vec![Right::Read, Right::Share]);
        // One key per owner, grantee, region and prefix: c gives b and d back
        // what they hold, under prefixes of their own.
        let c_to_b = at(shared(owner, c, b, vec![Right::Read, Right::Share]), "x/");
        let c_to_d = at(shared(owner, c, d, vec![Right::Read]), "y/");
        let direct_d = grant(owner, d, "", vec![Right::Read]);
        let all = vec![
            to_b.clone(),
            b_to_c.clone(),
            c_to_b.clone(),
            c_to_d.clone(),
            direct_d.clone(),
        ];
        let keys: std::collections::HashSet<Vec<u8>> = all.iter().map(Grant::key).collect();
        assert_eq!(keys.len(), all.len(), "grants as Grants holds them");
        let (stand, gone) = after_change(all.clone(), None, None, no_labels).unwrap();
        assert_eq!((stand.len(), gone.len()), (5, 0), "every share is backed");

        let (stand, gone) = after_change(all, None, Some(&to_b.key()), no_labels).unwrap();
        assert_eq!(stand, vec![direct_d.clone()], "the owner's own grants stand");
        assert_eq!(gone.len(), 4, "b's, then c's shares go, the cycle with them");
        assert!(gone.contains(&c_to_d) && gone.contains(&c_to_b));

        let more_than_held = shared(owner, b, c, vec![Right::Write]);
        let (_, gone) = after_change(vec![to_b.clone()], Some(more_than_held.clone()), None, no_labels).unwrap();
        assert_eq!(gone, vec![more_than_held], "a sharer gives only what it holds");
        let wider = at(shared(owner, b, c, vec![Right::Read]), "");
        let (_, gone) = after_change(vec![at(to_b.clone(), "p/")], Some(wider.clone()), None, no_labels).unwrap();
        assert_eq!(gone, vec![wider], "nor over more keys than it holds");

        let to_group = Grant {
            grantee: "label:team=ml".parse().unwrap(),
            ..grant(owner, b, "", vec![Right::Read, Right::Share])
        };
        let ml = |_: &AgentId| Ok(BTreeMap::from([("team".to_owned(), "ml".to_owned())]));
        let (_, gone) = after_change(vec![to_group.clone(), b_to_c.clone()], None, None, ml).unwrap();
        assert!(gone.is_empty(), "a group member shares what the group holds");
        let (_, gone) = after_change(vec![to_group.clone(), b_to_c.clone()], None, None, no_labels).unwrap();
        assert_eq!(gone, vec![b_to_c.clone()], "not once it is out of the group");
        let unreadable = |_: &AgentId| Err(Error::unavailable("the store failed"));
        assert!(
            after_change(vec![to_group, b_to_c], None, None, unreadable).is_err(),
            "a sharer whose labels cannot be read takes nothing back"
        );
    }

    #[test]
    fn a_sharer_replaces_only_its_own_grants_and_has_a_room_of_its_own() {
        let grants = Grants::default();
        let (owner, sharer, other) = (AgentId::generate(), AgentId::generate(), AgentId::generate());
        grants.put(grant(owner, other, "", vec![Right::Read, Right::Write]));
        let over_owners = shared(owner, sharer, other, vec![Right::Read]);
        let refused = grants.check_room(&over_owners).unwrap_err();
        assert_eq!(refused.code, ErrorCode::FailedPrecondition);
        assert!(refused.message.contains("given by its owner"), "{}", refused.message);

        for _ in 0..MAX_SHARED_PER_SHARER {
            let given = shared(owner, sharer, AgentId::generate(), vec![Right::Read]);
            grants.check_room(&given).unwrap();
            grants.put(given);
        }
        let past = shared(owner, sharer, AgentId::generate(), vec![Right::Read]);
        assert_eq!(grants.check_room(&past).unwrap_err().code, ErrorCode::ResourceExhausted);
        let its_own = grants
            .given_by(&owner)
            .into_iter()
            .find(|g| g.shared_by == Some(sharer))
            .unwrap();
        grants
            .check_room(&its_own)
            .expect("a sharer replaces a grant it gave, at its room");
        assert!(
            grants
                .check_room(&grant(owner, AgentId::generate(), "", vec![Right::Read]))
                .is_ok(),
            "the owner has room of its own"
        );
        for n in 0..MAX_SHARED_PER_OWNER / MAX_SHARED_PER_SHARER {
            let another = AgentId::generate();
            for _ in 0..MAX_SHARED_PER_SHARER {
                let given = shared(owner, another, AgentId::generate(), vec![Right::Read]);
                if grants.check_room(&given).is_err() {
                    assert_eq!(
                        n,
                        MAX_SHARED_PER_OWNER / MAX_SHARED_PER_SHARER - 1,
                        "sharers fill half the room"
                    );
                    return;
                }
                grants.put(given);
            }
        }
        panic!("sharers filled more than half the owner's room");
    }
}
