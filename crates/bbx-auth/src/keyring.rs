//! API keys: minted once, stored only as a SHA-256 digest, checked in constant time.
//!
//! A key reads `bbx_<key id, 32 hex>_<secret, 64 hex>`. The id part finds the record
//! without scanning; the 256-bit secret is random, so a fast digest is enough (a slow
//! password hash buys nothing against a key that cannot be guessed). Records live in
//! the `api_keys` keyspace and in an in-memory map that every request reads.

use crate::Caller;
use bbx_core::model::ApiKeyInfo;
use bbx_core::{Error, KeyId, Result};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use subtle::ConstantTimeEq;

const PREFIX: &str = "bbx_";

/// A key as stored: its public description and the digest of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredKey {
    pub info: ApiKeyInfo,
    pub secret_sha256: String,
}

/// Mints a new key for `info`; returns the secret token and the record to store.
pub fn mint(info: ApiKeyInfo) -> (String, StoredKey) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    let token = format!("{PREFIX}{}_{secret}", hex::encode(info.id.as_bytes()));
    let stored = StoredKey {
        secret_sha256: digest(&secret),
        info,
    };
    (token, stored)
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits a token into key id and secret, or says why it cannot be a key.
fn parse(token: &str) -> Option<(KeyId, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(id, &mut bytes).ok()?;
    (secret.len() == 64).then_some((KeyId::from_bytes(bytes), secret))
}

/// The keys the kernel knows, by id.
#[derive(Default)]
pub struct KeyRing {
    keys: parking_lot::RwLock<HashMap<KeyId, StoredKey>>,
    /// When each key last authenticated a request.
    last_used: parking_lot::Mutex<HashMap<KeyId, chrono::DateTime<chrono::Utc>>>,
}

impl KeyRing {
    /// Adds or replaces a key; one stored before roles gets the role it had.
    pub fn insert(&self, mut key: StoredKey) {
        key.info.stored_role = Some(key.info.role());
        self.keys.write().insert(key.info.id, key);
    }

    pub fn get(&self, id: &KeyId) -> Option<StoredKey> {
        let mut key = self.keys.read().get(id).cloned()?;
        key.info.last_used_at = self.last_used.lock().get(id).copied().or(key.info.last_used_at);
        Some(key)
    }

    /// The keys of `tenant`, or every key for `None`.
    pub fn list(&self, tenant: Option<&str>) -> Vec<ApiKeyInfo> {
        let mut all: Vec<ApiKeyInfo> = self
            .keys
            .read()
            .values()
            .filter(|k| tenant.is_none() || k.info.tenant.as_deref() == tenant)
            .map(|k| k.info.clone())
            .collect();
        let last_used = self.last_used.lock();
        for info in &mut all {
            info.last_used_at = last_used.get(&info.id).copied().or(info.last_used_at);
        }
        all.sort_by_key(|k| k.id);
        all
    }

    /// Administrator keys that are not revoked.
    pub fn active_admins(&self) -> usize {
        self.keys
            .read()
            .values()
            .filter(|k| k.info.tenant.is_none() && k.info.revoked_at.is_none())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.read().is_empty()
    }

    /// Whether the key exists and is not revoked: a long-lived session (shared
    /// memory) checks this, since it authenticated only once.
    pub fn is_active(&self, id: &KeyId) -> bool {
        self.keys.read().get(id).is_some_and(|k| k.info.revoked_at.is_none())
    }

    /// Authenticates a bearer token.
    pub fn verify(&self, token: &str) -> Result<Caller> {
        let invalid = || Error::unauthenticated("invalid", "the API key is not valid");
        let (id, secret) = parse(token).ok_or_else(invalid)?;
        let keys = self.keys.read();
        let stored = keys.get(&id).ok_or_else(invalid)?;
        let presented = digest(secret);
        if !bool::from(presented.as_bytes().ct_eq(stored.secret_sha256.as_bytes())) {
            return Err(invalid());
        }
        if stored.info.revoked_at.is_some() {
            return Err(Error::unauthenticated("revoked", "the API key has been revoked"));
        }
        let now = chrono::Utc::now();
        if stored.info.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::unauthenticated("expired", "the API key has expired"));
        }
        self.last_used.lock().insert(id, now);
        Ok(Caller {
            key_id: id,
            tenant: stored.info.tenant.clone(),
            role: stored.info.role(),
            agent: stored.info.agent,
            expires_at: stored.info.expires_at,
            source: None,
            kinds: stored.info.kinds.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(tenant: Option<&str>) -> ApiKeyInfo {
        ApiKeyInfo {
            id: KeyId::generate(),
            name: "t".into(),
            tenant: tenant.map(Into::into),
            created_at: chrono::Utc::now(),
            revoked_at: None,
            stored_role: None,
            identity: None,
            agent: None,
            expires_at: None,
            last_used_at: None,
            kinds: None,
        }
    }

    #[test]
    fn minted_keys_verify_and_tampered_ones_do_not() {
        let ring = KeyRing::default();
        let (token, stored) = mint(info(Some("acme")));
        ring.insert(stored.clone());
        let caller = ring.verify(&token).unwrap();
        assert_eq!(caller.tenant.as_deref(), Some("acme"));
        assert_eq!(
            caller.role,
            bbx_core::model::Role::Operator,
            "a key made before roles keeps what it could do"
        );
        assert!(!stored.secret_sha256.contains(&token[token.len() - 64..]));

        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(
            ring.verify(&tampered).unwrap_err().details.unwrap()["reason"],
            "invalid"
        );
        for junk in ["", "bbx_", "Bearer x", "bbx_zz_zz", &token[..token.len() - 1]] {
            assert!(ring.verify(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn expired_keys_are_refused_with_their_reason() {
        let ring = KeyRing::default();
        let (token, mut stored) = mint(info(Some("acme")));
        stored.info.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        ring.insert(stored);
        assert_eq!(ring.verify(&token).unwrap_err().details.unwrap()["reason"], "expired");
    }

    #[test]
    fn revoked_keys_are_refused_with_their_reason() {
        let ring = KeyRing::default();
        let (token, mut stored) = mint(info(None));
        stored.info.revoked_at = Some(chrono::Utc::now());
        ring.insert(stored);
        assert_eq!(ring.verify(&token).unwrap_err().details.unwrap()["reason"], "revoked");
    }
}
