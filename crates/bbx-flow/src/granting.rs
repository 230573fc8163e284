//! Giving and revoking grants: by one who may act for the owner, or by an
//! agent through its `share` right (see [`crate::access`] for what a shared
//! grant may do and how long it stands).

use crate::access::{self, Grant, Grantee, Region, Right};
use crate::{Change, Flow};
use bbx_auth::{Action, AuditKind, Caller};
use bbx_component::Context;
use bbx_core::model::Agent;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::Store;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantReq {
    /// The owner of the region.
    agent: String,
    /// The agent given the rights (of the same tenant), or `label:KEY=VALUE`:
    /// every agent of the tenant with that label, now or later.
    grantee: String,
    /// `state`, `memory`, `context` or `topic` [default: state].
    #[serde(default)]
    region: Region,
    /// State keys, or names of the owner's topics, starting with it [default:
    /// all]; memory and context are granted whole.
    #[serde(default)]
    prefix: String,
    /// Of `read`, `write` and `share` (grant these on to others) [default: read].
    #[serde(default)]
    rights: Option<Vec<Right>>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeReq {
    agent: String,
    grantee: String,
    #[serde(default)]
    region: Region,
    #[serde(default)]
    prefix: String,
}

/// A sharer's labels, for [`access::after_change`]: none for an agent that
/// is gone; a store that cannot be read takes nothing back.
fn labels_in(store: &Store) -> impl Fn(&AgentId) -> Result<BTreeMap<String, String>> + '_ {
    move |agent| match bbx_agents::stored_agent(store, agent) {
        Ok(record) => Ok(record.labels),
        Err(e) if e.code == ErrorCode::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

impl Flow {
    /// The stored grants, less what a crash left standing without cause (the
    /// grants of an agent that is gone, shared ones without backing), which
    /// go, durably.
    pub(crate) fn load_grants(&self, ctx: &Context) -> Result<()> {
        let mut by_owner: BTreeMap<AgentId, Vec<Grant>> = BTreeMap::new();
        for item in ctx.store.keyspace(access::FLOW_GRANTS).iter() {
            let (_, value) = item
                .into_inner()
                .map_err(|e| bbx_store::storage_error("load grants", e))?;
            let grant: Grant = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a stored grant is unreadable: {e}")))?;
            by_owner.entry(grant.owner).or_default().push(grant);
        }
        let exists = |agent: &AgentId| match bbx_agents::stored_agent(&ctx.store, agent) {
            Ok(_) => Ok(true),
            Err(e) if e.code == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        let mut gone = Vec::new();
        for (owner, grants) in by_owner {
            if !exists(&owner)? {
                gone.extend(grants);
                continue;
            }
            let mut held = Vec::with_capacity(grants.len());
            for grant in grants {
                match &grant.grantee {
                    Grantee::Agent(agent) if !exists(agent)? => gone.push(grant),
                    _ => held.push(grant),
                }
            }
            let (stand, unbacked) = access::after_change(held, None, None, labels_in(&ctx.store))?;
            gone.extend(unbacked);
            self.0.grants.set(owner, stand);
        }
        if !gone.is_empty() {
            let remove = gone.iter().map(Grant::key).collect();
            ctx.write_later(
                Change::Grants { put: None, remove },
                "the removal of grants without cause",
            );
        }
        Ok(())
    }

    /// Forgets the grants a deleted agent gives and is given, and takes back
    /// what it shared (and what was shared from that), in one write, under
    /// the lock every change of grants takes. What is held goes first: a
    /// write that fails leaves fewer grants in force, never more (the next
    /// start removes what the store kept).
    pub(crate) async fn forget_grants(&self, agent: AgentId) -> Result<()> {
        let _changing = self.0.changing.lock().await;
        let ctx = self.ctx()?;
        let owners = self.0.grants.shared_from(&agent);
        let mut remove = self.0.grants.forget_agent(&agent);
        for owner in owners {
            let given = self.0.grants.given_by(&owner);
            let (stand, gone) = access::after_change(given, None, None, labels_in(&ctx.store))?;
            self.0.grants.set(owner, stand);
            let tenant = bbx_agents::stored_agent(&ctx.store, &owner)
                .map(|a| a.tenant)
                .unwrap_or_default();
            self.audit_cascade(None, &tenant, &gone);
            remove.extend(gone.iter().map(Grant::key));
        }
        if !remove.is_empty() {
            ctx.store.write(Change::Grants { put: None, remove }).await?;
        }
        Ok(())
    }

    /// The grantee: an agent of the owner's tenant other than the owner, or a
    /// group (which only ever takes in agents of the owner's tenant).
    fn grantee(&self, owner: &Agent, grantee: &str) -> Result<Grantee> {
        let grantee: Grantee = grantee.parse()?;
        if let Grantee::Agent(agent) = grantee {
            let record = bbx_agents::stored_agent(&self.ctx()?.store, &agent)?;
            if record.tenant != owner.tenant {
                return Err(Error::not_found("agent", agent));
            }
            if agent == owner.id {
                return Err(Error::invalid_field(
                    "grantee",
                    "an agent's own data is its own already",
                ));
            }
        }
        Ok(grantee)
    }

    /// Who gives `rights` over the owner's region at `prefix`: `None` for one
    /// that may act for the owner; the agent a key is confined to where that
    /// agent holds `share` and each of the rights there.
    fn giver(&self, caller: &Caller, owner: &Agent, at: (Region, &str), rights: &[Right]) -> Result<Option<AgentId>> {
        caller.check_owner(&owner.tenant, "agent", owner.id)?;
        let Err(refused) = caller.check_agent(&owner.id) else {
            return Ok(None);
        };
        let Some(sharer) = caller.agent else {
            return Err(refused);
        };
        let labels = bbx_agents::stored_agent(&self.ctx()?.store, &sharer)?.labels;
        let holds = |right: &Right| self.0.grants.allows(&owner.id, (&sharer, &labels), at, *right);
        if holds(&Right::Share) && rights.iter().all(holds) {
            return Ok(Some(sharer));
        }
        Err(refused)
    }

    pub(crate) async fn grant(&self, caller: &Caller, req: GrantReq) -> Result<Grant> {
        caller.may(Action::Act)?;
        let id: AgentId = req.agent.parse()?;
        let owner = bbx_agents::stored_agent(&self.ctx()?.store, &id)?;
        if !req.prefix.is_empty() {
            match req.region {
                Region::State => bbx_core::validate::state_key(&req.prefix)?,
                Region::Topic => bbx_core::validate::name("prefix", &req.prefix)?,
                Region::Memory | Region::Context => {
                    return Err(Error::invalid_field(
                        "prefix",
                        format!("a grant over the {} is whole: it takes no prefix", req.region.name()),
                    ));
                }
            }
        }
        let mut rights = req.rights.unwrap_or_else(|| vec![Right::Read]);
        rights.sort_by_key(|r| *r as u8);
        rights.dedup();
        if rights.is_empty() {
            return Err(Error::invalid_field("rights", "a grant gives read, write or share"));
        }
        // What the giver holds is read under the lock, so that a revoke
        // cannot land between the check and the write.
        let _changing = self.0.changing.lock().await;
        // The owner may have gone while the lock was waited for.
        bbx_agents::stored_agent(&self.ctx()?.store, &id)?;
        let shared_by = self.giver(caller, &owner, (req.region, &req.prefix), &rights)?;
        let grant = Grant {
            owner: owner.id,
            grantee: self.grantee(&owner, &req.grantee)?,
            region: req.region,
            prefix: req.prefix,
            rights,
            shared_by,
            by: format!("key {}", caller.key_id),
            at: Utc::now(),
        };
        self.0.grants.check_room(&grant)?;
        self.change_grants(caller, &owner, Some(grant.clone()), None).await?;
        let what = format!(
            "grant {} {:?} over agent {}'s {} {:?}",
            grant.grantee,
            grant.rights,
            owner.id,
            grant.region.name(),
            grant.prefix
        );
        let why = grant
            .shared_by
            .map_or_else(|| "granted".to_owned(), |sharer| format!("shared by agent {sharer}"));
        self.audit(Some(caller), &owner.tenant, what, why, AuditKind::FlowDecision);
        Ok(grant)
    }

    /// Revokes the grant, if there is one (revoking is idempotent: a grant that
    /// went with its grantee is revoked already), with what was shared from it.
    /// One that may act for the owner revokes any; a sharer the grants it gave.
    pub(crate) async fn revoke(&self, caller: &Caller, req: RevokeReq) -> Result<Value> {
        caller.may(Action::Act)?;
        let id: AgentId = req.agent.parse()?;
        let owner = bbx_agents::stored_agent(&self.ctx()?.store, &id)?;
        caller.check_owner(&owner.tenant, "agent", owner.id)?;
        let grantee: Grantee = req.grantee.parse()?;
        let key = Grant {
            owner: owner.id,
            grantee: grantee.clone(),
            region: req.region,
            prefix: req.prefix.clone(),
            rights: Vec::new(),
            shared_by: None,
            by: String::new(),
            at: Utc::now(),
        }
        .key();
        let _changing = self.0.changing.lock().await;
        let held = self.0.grants.given_by(&owner.id).into_iter().find(|g| g.key() == key);
        if let Err(refused) = caller.check_agent(&owner.id) {
            // A sharer revokes what it gave; one it gave that went already
            // (taken back with the sharer's own right) is revoked already.
            let given = self.0.grants.given_by(&owner.id);
            let its_own = match (&held, caller.agent) {
                (Some(grant), Some(agent)) => grant.shared_by == Some(agent),
                (None, Some(agent)) => given
                    .iter()
                    .any(|g| g.grantee == Grantee::Agent(agent) && g.rights.contains(&Right::Share)),
                (_, None) => false,
            };
            if !its_own {
                return Err(refused);
            }
        }
        let mut cascaded = Vec::new();
        if held.is_some() {
            cascaded = self.change_grants(caller, &owner, None, Some(key)).await?;
            let what = format!(
                "revoke {grantee}'s grant over agent {}'s {} {:?}",
                owner.id,
                req.region.name(),
                req.prefix
            );
            self.audit(
                Some(caller),
                &owner.tenant,
                what,
                "revoked".into(),
                AuditKind::FlowDecision,
            );
        }
        Ok(json!({ "revoked": held, "cascaded": cascaded }))
    }

    /// Writes the owner's grants with `put` in place and the grant at `remove`
    /// gone, less those left without backing, which are audited: returns
    /// those (the one at `remove` aside). The caller holds `changing`.
    async fn change_grants(
        &self,
        caller: &Caller,
        owner: &Agent,
        put: Option<Grant>,
        remove: Option<Vec<u8>>,
    ) -> Result<Vec<Grant>> {
        let ctx = self.ctx()?;
        let given = self.0.grants.given_by(&owner.id);
        let (stand, mut gone) = access::after_change(given, put.clone(), remove.as_deref(), labels_in(&ctx.store))?;
        if let Some(put) = &put
            && gone.iter().any(|g| g.key() == put.key())
        {
            return Err(Error::new(
                ErrorCode::PolicyDenied,
                format!(
                    "agent {} no longer holds what it would share",
                    put.shared_by.map_or_else(String::new, |a| a.to_string())
                ),
            ));
        }
        let keys = gone.iter().map(Grant::key).collect();
        ctx.store.write(Change::Grants { put, remove: keys }).await?;
        self.0.grants.set(owner.id, stand);
        gone.retain(|g| Some(g.key()) != remove);
        self.audit_cascade(Some(caller), &owner.tenant, &gone);
        Ok(gone)
    }

    /// Audits grants taken back because their sharer no longer holds them.
    pub(crate) fn audit_cascade(&self, caller: Option<&Caller>, tenant: &str, gone: &[Grant]) {
        for grant in gone {
            let what = format!(
                "revoke {}'s grant over agent {}'s {} {:?}",
                grant.grantee,
                grant.owner,
                grant.region.name(),
                grant.prefix
            );
            let why = format!(
                "agent {} that shared it no longer holds it",
                grant.shared_by.map_or_else(String::new, |a| a.to_string())
            );
            self.audit(caller, tenant, what, why, AuditKind::FlowDecision);
        }
    }
}
