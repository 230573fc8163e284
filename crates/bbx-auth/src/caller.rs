//! Who is calling, and what its role lets it do.

use bbx_core::model::Role;
use bbx_core::{AgentId, Error, KeyId, Result};

/// Who is calling: the key that authenticated the request, the tenant it is
/// confined to (`None` for an administrator), its role, and the agent it is
/// confined to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id, or the token's (`jti`).
    pub key_id: KeyId,
    pub tenant: Option<String>,
    pub role: Role,
    pub agent: Option<AgentId>,
    /// When the credential stops working, if it does.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The client's address, where the transport knows it.
    pub source: Option<String>,
    /// The op kinds it may submit, if it is confined to some.
    pub kinds: Option<Vec<String>>,
}

/// What an action needs of a caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reading agents, state, ops, quotas, figures.
    Read,
    /// Submitting ops and writing state (its own agent's, for a key confined to one).
    Act,
    /// Creating and deleting agents, setting quotas, cancelling, resolving and
    /// deciding ops.
    Operate,
    /// Managing the tenant's keys.
    ManageKeys,
}

impl Action {
    /// Its name in policies' input (`action.class`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Act => "act",
            Self::Operate => "operate",
            Self::ManageKeys => "manage_keys",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Act => "submit ops or write state",
            Self::Operate => "manage agents, quotas and ops",
            Self::ManageKeys => "manage keys",
        }
    }
}

/// The rules in force, as `auth.rules` shows them: for each role, the actions it
/// may take in its own tenant (every tenant for `admin`).
pub fn rules() -> serde_json::Value {
    let actions = [Action::Read, Action::Act, Action::Operate, Action::ManageKeys];
    let roles: Vec<serde_json::Value> = Role::ALL
        .iter()
        .map(|role| {
            let caller = Caller::of_tenant(KeyId::generate(), "t", *role);
            let allowed: Vec<&str> = actions
                .iter()
                .filter(|action| caller.may(**action).is_ok())
                .map(|action| action.describe())
                .collect();
            serde_json::json!({ "role": role.as_str(), "may": allowed })
        })
        .collect();
    serde_json::json!({
        "source": "built-in roles",
        "roles": roles,
        "tenants": "every role but admin acts in its own tenant only; another tenant's objects are answered as missing (404)",
        "agents": "a credential confined to an agent acts on that agent only (403 for another of its tenant)",
    })
}

impl Caller {
    /// An administrator: every tenant, every action.
    pub fn admin(key_id: KeyId) -> Self {
        Self {
            key_id,
            tenant: None,
            role: Role::Admin,
            agent: None,
            expires_at: None,
            source: None,
            kinds: None,
        }
    }

    /// A caller of `tenant` with `role`.
    pub fn of_tenant(key_id: KeyId, tenant: impl Into<String>, role: Role) -> Self {
        Self {
            key_id,
            tenant: Some(tenant.into()),
            role,
            agent: None,
            expires_at: None,
            source: None,
            kinds: None,
        }
    }

    /// The agent itself, as the kernel acts for it (an automatic snapshot, a
    /// summary of its context): confined to the agent, in its tenant, billed
    /// and checked as the agent's own ops are. Its key id is the agent's id.
    pub fn of_agent(agent: AgentId, tenant: impl Into<String>) -> Self {
        let mut caller = Self::of_tenant(KeyId::from_bytes(*agent.as_bytes()), tenant, Role::Agent);
        caller.agent = Some(agent);
        caller
    }

    pub fn is_admin(&self) -> bool {
        self.tenant.is_none() && self.role == Role::Admin
    }

    /// Whether the caller's role allows `action` (in its own tenant); 403 if not.
    pub fn may(&self, action: Action) -> Result<()> {
        let allowed = match self.role {
            Role::Admin | Role::TenantAdmin => true,
            Role::Operator => action != Action::ManageKeys,
            Role::Agent => matches!(action, Action::Read | Action::Act),
            Role::Reader => action == Action::Read,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::permission_denied(format!(
                "a key with the role {} may not {}",
                self.role.as_str(),
                action.describe()
            )))
        }
    }

    /// For a key confined to one agent: that agent only. Another agent of its
    /// tenant is 403 (an action its role forbids), one of another tenant is found
    /// missing before this is asked.
    pub fn check_agent(&self, agent: &AgentId) -> Result<()> {
        match self.agent {
            Some(own) if own != *agent => Err(Error::permission_denied(
                "this key is confined to another agent of its tenant",
            )),
            _ => Ok(()),
        }
    }

    /// For a credential confined to some op kinds: those only (403 for another).
    pub fn check_kind(&self, kind: &str) -> Result<()> {
        match &self.kinds {
            Some(kinds) if !kinds.iter().any(|k| k == kind) => Err(Error::permission_denied(format!(
                "this credential may submit only ops of the kinds {}",
                kinds.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// The kinds a credential this caller makes may be confined to: `asked`, which
    /// must stay within the caller's own if it is confined.
    pub fn grant_kinds(&self, asked: Option<Vec<String>>) -> Result<Option<Vec<String>>> {
        if let Some(kinds) = &asked {
            if kinds.is_empty() || kinds.len() > 64 {
                return Err(Error::invalid_field("kinds", "name 1 to 64 op kinds"));
            }
            for kind in kinds {
                bbx_core::validate::name("kinds", kind)?;
            }
        }
        match (&self.kinds, asked) {
            (None, asked) => Ok(asked),
            (Some(own), Some(asked)) if asked.iter().all(|k| own.contains(k)) => Ok(Some(asked)),
            (Some(own), _) => Err(Error::permission_denied(format!(
                "a credential confined to the kinds {} makes only credentials confined within them",
                own.join(", ")
            ))),
        }
    }

    /// Whether objects of `tenant` exist for this caller at all.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|own| own == tenant)
    }

    /// May this caller act on a tenant it named itself (creating an agent there,
    /// listing it, setting its quotas)? The name is the caller's own, so refusing
    /// with 403 tells it nothing it did not know.
    pub fn check_tenant(&self, tenant: &str) -> Result<()> {
        match &self.tenant {
            Some(own) if own != tenant => Err(Error::permission_denied(format!(
                "this key belongs to tenant {own:?} and may not act on another tenant"
            ))),
            _ => Ok(()),
        }
    }

    /// The rule for an object the caller named by id (an agent, an op): one of
    /// another tenant is answered exactly as one that does not exist (404, the same
    /// message), so that ids reveal neither objects nor tenants across tenants.
    pub fn check_owner(&self, tenant: &str, kind: &str, id: impl std::fmt::Display) -> Result<()> {
        if self.sees(tenant) {
            Ok(())
        } else {
            Err(Error::not_found(kind, id))
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::permission_denied(format!(
                "only an administrator key may {what}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_keys_stay_in_their_tenant() {
        let caller = Caller::of_tenant(KeyId::generate(), "a", Role::TenantAdmin);
        assert!(caller.check_tenant("a").is_ok());
        assert_eq!(
            caller.check_tenant("b").unwrap_err().code,
            bbx_core::ErrorCode::PermissionDenied
        );
        assert!(caller.require_admin("x").is_err());
    }

    #[test]
    fn another_tenants_object_reads_as_missing() {
        let caller = Caller::of_tenant(KeyId::generate(), "b", Role::TenantAdmin);
        let id = KeyId::generate();
        let foreign = caller.check_owner("acme", "agent", id).unwrap_err();
        let missing = Error::not_found("agent", id);
        assert_eq!(foreign.code, bbx_core::ErrorCode::NotFound);
        assert_eq!((foreign.message, foreign.details), (missing.message, missing.details));
        assert!(caller.check_owner("b", "agent", id).is_ok());
        let admin = Caller::admin(KeyId::generate());
        assert!(admin.check_owner("acme", "agent", id).is_ok());
        assert!(!caller.check_tenant("acme").unwrap_err().message.contains("acme"));
    }

    #[test]
    fn roles_allow_what_they_name_and_agents_stay_confined() {
        use Action::*;
        let expected = [
            (Role::Admin, [true, true, true, true]),
            (Role::TenantAdmin, [true, true, true, true]),
            (Role::Operator, [true, true, true, false]),
            (Role::Agent, [true, true, false, false]),
            (Role::Reader, [true, false, false, false]),
        ];
        for (role, allowed) in expected {
            let caller = Caller::of_tenant(KeyId::generate(), "a", role);
            for (action, allowed) in [Read, Act, Operate, ManageKeys].into_iter().zip(allowed) {
                let decided = caller.may(action);
                assert_eq!(decided.is_ok(), allowed, "{role:?} {action:?}");
                if let Err(e) = decided {
                    assert_eq!(e.code, bbx_core::ErrorCode::PermissionDenied);
                    assert!(e.message.contains(role.as_str()), "{}", e.message);
                }
            }
        }
        let own = bbx_core::AgentId::generate();
        let confined = Caller {
            agent: Some(own),
            ..Caller::of_tenant(KeyId::generate(), "a", Role::Agent)
        };
        assert!(confined.check_agent(&own).is_ok());
        let other = confined.check_agent(&bbx_core::AgentId::generate()).unwrap_err();
        assert_eq!(other.code, bbx_core::ErrorCode::PermissionDenied);
        assert!(Caller::admin(KeyId::generate()).check_agent(&own).is_ok());
    }
}
