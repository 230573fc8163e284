//! Auth: who is calling, and the API keys that say so.
//!
//! Every entry point (HTTP, MCP, shared memory, the CLI through HTTP) turns a
//! credential into a [`Caller`] once, here, and every kernel operation takes it:
//! tenant confinement is enforced in one place, not in each front end. The rule
//! for every entry point: a bad or missing credential is 401; an action the
//! caller's role forbids in its own tenant is 403 ([`Caller::check_tenant`],
//! [`Caller::require_admin`]); an object of another tenant is 404, answered
//! exactly as one that does not exist ([`Caller::check_owner`]).
//!
//! API keys ([`keys`]) are minted once, stored only as a SHA-256 digest (in the
//! `api_keys` keyspace, through the store's group commit) and checked in constant
//! time; on first start the kernel mints an administrator key into
//! `DATA_DIR/admin.key` (mode 0600).

pub mod keyring;
pub mod keys;

pub use keyring::{KeyRing, StoredKey, mint};
pub use keys::{ADMIN_KEY_FILE, API_KEYS, Keys};

use bbx_core::{Error, KeyId, Result};

/// Who is calling: the key that authenticated the request and the tenant it is
/// confined to (`None` for an administrator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: KeyId,
    pub tenant: Option<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.tenant.is_none()
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
        let caller = Caller {
            key_id: KeyId::generate(),
            tenant: Some("a".into()),
        };
        assert!(caller.check_tenant("a").is_ok());
        assert_eq!(
            caller.check_tenant("b").unwrap_err().code,
            bbx_core::ErrorCode::PermissionDenied
        );
        assert!(caller.require_admin("x").is_err());
    }

    #[test]
    fn another_tenants_object_reads_as_missing() {
        let caller = Caller {
            key_id: KeyId::generate(),
            tenant: Some("b".into()),
        };
        let id = KeyId::generate();
        let foreign = caller.check_owner("acme", "agent", id).unwrap_err();
        let missing = Error::not_found("agent", id);
        assert_eq!(foreign.code, bbx_core::ErrorCode::NotFound);
        assert_eq!((foreign.message, foreign.details), (missing.message, missing.details));
        assert!(caller.check_owner("b", "agent", id).is_ok());
        let admin = Caller {
            key_id: KeyId::generate(),
            tenant: None,
        };
        assert!(admin.check_owner("acme", "agent", id).is_ok());
        assert!(!caller.check_tenant("acme").unwrap_err().message.contains("acme"));
    }
}
