//! The audit log: every failed authentication, every denial and every credential
//! change, durable in the store, newest last, queryable with filters. An event
//! names who (the credential's id or subject, its tenant), what, when, from where
//! and why; never a secret.

use crate::Caller;
use bbx_core::{Error, KeyId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use serde::{Deserialize, Serialize};

/// event id (16 bytes, time-ordered) -> [`AuditEvent`] as JSON. Its id is what redo
/// records carry: never change it.
pub const AUDIT: KeyspaceDef = KeyspaceDef { id: 11, name: "audit" };

/// The most events one query returns.
pub const MAX_EVENTS: usize = 1000;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A credential was missing, malformed, unknown, revoked or expired.
    AuthenticationFailed,
    /// A caller was refused an action its role does not allow (403).
    Denied,
    CredentialCreated,
    CredentialRevoked,
    TokenIssued,
    /// An authorization policy was set or removed.
    PolicyChanged,
    /// A secret was set, bound to hosts or deleted (never its value).
    SecretChanged,
    /// FlowIntegrity decided an op other than `allow`, or an operator quarantined,
    /// released or declassified.
    FlowDecision,
}

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditEvent {
    pub id: KeyId,
    pub at: DateTime<Utc>,
    pub kind: AuditKind,
    /// The credential acting (a key's id, a token's `jti`), if one was recognized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What was attempted or done: an HTTP method and path, or the credential made.
    pub what: String,
    pub why: String,
    /// The client's address, where the transport knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, caller: Option<&Caller>, what: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            id: KeyId::generate(),
            at: Utc::now(),
            kind,
            principal: caller.map(|c| c.key_id.to_string()),
            tenant: caller.and_then(|c| c.tenant.clone()),
            what: what.into(),
            why: why.into(),
            source: None,
        }
    }

    pub fn from(mut self, source: Option<String>) -> Self {
        self.source = source;
        self
    }
}

/// Records an event.
#[derive(Debug)]
pub struct Record(pub AuditEvent);

impl Staged for Record {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let json = serde_json::to_vec(&self.0).map_err(|e| Error::internal(e.to_string()))?;
        tx.put(AUDIT, self.0.id.as_bytes().to_vec(), json);
        Ok(Applied::Done)
    }
}

/// What to look for in the log.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    pub kind: Option<AuditKind>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// Events at or after this moment.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// The newest this many (default and most: 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Events the caller may see (an administrator every tenant's, a tenant
/// administrator its own tenant's), matching `query`, oldest first.
pub fn query(store: &Store, caller: &Caller, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
    caller.may(crate::Action::ManageKeys)?;
    if let Some(tenant) = &query.tenant {
        caller.check_tenant(tenant)?;
    }
    let tenant = query.tenant.as_deref().or(caller.tenant.as_deref());
    let limit = query.limit.unwrap_or(MAX_EVENTS).clamp(1, MAX_EVENTS);
    let start = query
        .since
        .map(|since| {
            KeyId::lowest_at(since.timestamp_millis().max(0) as u64)
                .as_bytes()
                .to_vec()
        })
        .unwrap_or_default();
    let mut events = Vec::new();
    for item in store.view().range(store.keyspace(AUDIT), start..).rev() {
        let (_, value) = item.into_inner().map_err(|e| storage_error("read the audit log", e))?;
        let event: AuditEvent = serde_json::from_slice(&value)
            .map_err(|e| Error::internal(format!("an audit event is unreadable: {e}")))?;
        if query.kind.is_some_and(|kind| kind != event.kind)
            || tenant.is_some_and(|t| event.tenant.as_deref() != Some(t))
        {
            continue;
        }
        events.push(event);
        if events.len() == limit {
            break;
        }
    }
    events.reverse();
    Ok(events)
}
