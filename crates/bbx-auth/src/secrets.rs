//! Secrets: values operators keep in the kernel (API keys of outside services,
//! passwords) so that agents can use them without ever holding them.
//!
//! A secret belongs to a tenant, is encrypted at rest (AES-256-GCM under a key in
//! `DATA_DIR/secrets.key`, mode 0600, with its tenant and name as associated data,
//! so a ciphertext moved to another slot does not open), and is bound to the hosts
//! it may be sent to. A tool op names it (`{"$secret": "github_token"}`) and the
//! executor asks for its value ([`Secrets::reveal`]) only at the moment of the
//! call and only for a bound host. Values are write-only: listing shows names,
//! hosts and times, never a value.

use crate::{Action, Caller};
use bbx_core::{Error, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// tenant, NUL, name -> [`StoredSecret`] as JSON. Its id is what redo records
/// carry: never change it.
pub const SECRETS: KeyspaceDef = KeyspaceDef {
    id: 14,
    name: "secrets",
};

/// The file holding the key secrets are encrypted with, in the data directory.
pub const SECRETS_KEY_FILE: &str = "secrets.key";
/// The largest secret value, in bytes.
const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The most hosts one secret may be bound to.
const MAX_HOSTS: usize = 64;

/// A secret as listed: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SecretInfo {
    pub name: String,
    pub tenant: String,
    /// The hosts it may be sent to: a name (`api.github.com`), an address, or
    /// `*.example.com` for the names under example.com.
    pub hosts: Vec<String>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSecret {
    info: SecretInfo,
    nonce: [u8; 12],
    sealed: Vec<u8>,
}

fn slot(tenant: &str, name: &str) -> Vec<u8> {
    [tenant.as_bytes(), &[0], name.as_bytes()].concat()
}

#[derive(Debug)]
enum Change {
    Put(StoredSecret),
    Delete { tenant: String, name: String },
}

impl Staged for Change {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        match self {
            Self::Put(stored) => {
                let json = serde_json::to_vec(stored).map_err(|e| Error::internal(e.to_string()))?;
                tx.put(SECRETS, slot(&stored.info.tenant, &stored.info.name), json);
            }
            Self::Delete { tenant, name } => tx.remove(SECRETS, slot(tenant, name)),
        }
        Ok(Applied::Done)
    }
}

/// The tenants' secrets.
pub struct Secrets {
    store: Arc<Store>,
    key: aws_lc_rs::aead::LessSafeKey,
    /// Serializes changes: a version is read, then written.
    changing: tokio::sync::Mutex<()>,
}

/// What setting a secret asks for.
#[derive(Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    pub name: String,
    /// The value; never shown again.
    pub value: String,
    /// The tenant [default: the caller's].
    #[serde(default)]
    pub tenant: Option<String>,
    /// The hosts it may be sent to, as a list or comma-separated; kept as they
    /// were if not given when replacing a secret.
    #[serde(default, deserialize_with = "hosts")]
    pub hosts: Option<Vec<String>>,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecret")
            .field("name", &self.name)
            .field("value", &"[redacted]")
            .field("tenant", &self.tenant)
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// A list of hosts, or one string of them separated by commas (lower-cased).
fn hosts<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Hosts {
        List(Vec<String>),
        Text(String),
    }
    Ok(Option::<Hosts>::deserialize(d)?.map(|hosts| {
        let hosts = match hosts {
            Hosts::List(list) => list,
            Hosts::Text(text) => text.split(',').map(|h| h.trim().to_owned()).collect(),
        };
        hosts
            .into_iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.to_ascii_lowercase())
            .collect()
    }))
}

impl Secrets {
    /// Opens the secrets, making the encryption key on first start.
    pub fn open(store: Arc<Store>, data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(SECRETS_KEY_FILE);
        let bytes = match std::fs::read_to_string(&path) {
            Ok(text) => {
                hex::decode(text.trim()).map_err(|_| Error::internal(format!("{} is not a hex key", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut bytes).map_err(|_| Error::internal("no randomness for a key"))?;
                crate::keys::write_secret_file(&path, &hex::encode(&bytes))
                    .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
                bytes
            }
            Err(e) => return Err(Error::internal(format!("cannot read {}: {e}", path.display()))),
        };
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &bytes)
            .map_err(|_| Error::internal(format!("{} does not hold a 256-bit key", path.display())))?;
        Ok(Self {
            store,
            key: aws_lc_rs::aead::LessSafeKey::new(unbound),
            changing: Default::default(),
        })
    }

    /// The tenant a caller acts on: the one it names, which must be its own, or
    /// its own; an administrator names one.
    fn tenant(caller: &Caller, named: Option<String>) -> Result<String> {
        let tenant = named
            .or_else(|| caller.tenant.clone())
            .ok_or_else(|| Error::invalid_field("tenant", "an administrator names the tenant"))?;
        bbx_core::validate::tenant(&tenant)?;
        caller.check_tenant(&tenant)?;
        Ok(tenant)
    }

    fn load(&self, tenant: &str, name: &str) -> Result<Option<StoredSecret>> {
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(SECRETS), slot(tenant, name))
            .map_err(|e| storage_error("read", e))?;
        bytes
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| Error::internal(format!("a stored secret is unreadable: {e}")))
            })
            .transpose()
    }

    /// Adds or replaces a secret.
    pub async fn set(&self, caller: &Caller, req: SetSecret) -> Result<SecretInfo> {
        caller.may(Action::Operate)?;
        let tenant = Self::tenant(caller, req.tenant)?;
        bbx_core::validate::name("name", &req.name)?;
        if req.value.is_empty() || req.value.len() > MAX_VALUE_BYTES {
            return Err(Error::invalid_field(
                "value",
                format!("a secret is 1 to {MAX_VALUE_BYTES} bytes"),
            ));
        }
        if let Some(hosts) = &req.hosts {
            check_hosts(hosts)?;
        }
        let _changing = self.changing.lock().await;
        let old = self.load(&tenant, &req.name)?;
        let now = Utc::now();
        let info = SecretInfo {
            name: req.name,
            tenant,
            hosts: req
                .hosts
                .or_else(|| old.as_ref().map(|o| o.info.hosts.clone()))
                .unwrap_or_default(),
            version: old.as_ref().map_or(1, |o| o.info.version + 1),
            created_at: old.as_ref().map_or(now, |o| o.info.created_at),
            updated_at: now,
        };
        let stored = self.seal(info, req.value)?;
        let info = stored.info.clone();
        self.store.write(Change::Put(stored)).await?;
        Ok(info)
    }

    /// Binds a secret to `hosts` (in place of those it had).
    pub async fn bind(
        &self,
        caller: &Caller,
        tenant: Option<String>,
        name: &str,
        hosts: Vec<String>,
    ) -> Result<SecretInfo> {
        caller.may(Action::Operate)?;
        let tenant = Self::tenant(caller, tenant)?;
        check_hosts(&hosts)?;
        let hosts: Vec<String> = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        let _changing = self.changing.lock().await;
        let mut stored = self
            .load(&tenant, name)?
            .ok_or_else(|| Error::not_found("secret", name))?;
        stored.info.hosts = hosts;
        stored.info.updated_at = Utc::now();
        let info = stored.info.clone();
        self.store.write(Change::Put(stored)).await?;
        Ok(info)
    }

    pub async fn delete(&self, caller: &Caller, tenant: Option<String>, name: &str) -> Result<SecretInfo> {
        caller.may(Action::Operate)?;
        let tenant = Self::tenant(caller, tenant)?;
        let _changing = self.changing.lock().await;
        let stored = self
            .load(&tenant, name)?
            .ok_or_else(|| Error::not_found("secret", name))?;
        self.store
            .write(Change::Delete {
                tenant,
                name: name.to_owned(),
            })
            .await?;
        Ok(stored.info)
    }

    /// The secrets of a tenant, without their values.
    pub fn list(&self, caller: &Caller, tenant: Option<String>) -> Result<Vec<SecretInfo>> {
        caller.may(Action::Operate)?;
        let tenant = Self::tenant(caller, tenant)?;
        let prefix = slot(&tenant, "");
        let mut out = Vec::new();
        for item in self.store.view().prefix(self.store.keyspace(SECRETS), &prefix) {
            let (_, value) = item.into_inner().map_err(|e| storage_error("read", e))?;
            let stored: StoredSecret = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a stored secret is unreadable: {e}")))?;
            out.push(stored.info);
        }
        Ok(out)
    }

    /// The value of the secret `name` of `tenant`, for a call to `host`: refused
    /// (403) unless the secret is bound to that host.
    pub fn reveal(&self, tenant: &str, name: &str, host: &str) -> Result<String> {
        let stored = self
            .load(tenant, name)?
            .ok_or_else(|| Error::not_found("secret", name))?;
        if !stored.info.hosts.iter().any(|bound| host_matches(bound, host)) {
            return Err(Error::permission_denied(format!(
                "the secret {name} is not bound to the host {host}"
            )));
        }
        self.open_sealed(stored)
    }

    fn seal(&self, info: SecretInfo, value: String) -> Result<StoredSecret> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| Error::internal("no randomness for a nonce"))?;
        let mut sealed = value.into_bytes();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot(&info.tenant, &info.name)),
                &mut sealed,
            )
            .map_err(|_| Error::internal("cannot encrypt the secret"))?;
        Ok(StoredSecret { info, nonce, sealed })
    }

    fn open_sealed(&self, mut stored: StoredSecret) -> Result<String> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let aad = slot(&stored.info.tenant, &stored.info.name);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(stored.nonce),
                Aad::from(aad),
                &mut stored.sealed,
            )
            .map_err(|_| Error::internal(format!("the secret {} does not decrypt", stored.info.name)))?;
        String::from_utf8(plain.to_vec()).map_err(|_| Error::internal("a secret is not UTF-8"))
    }
}

/// Host patterns: a name or address, or `*.` and a name for the names under it.
fn check_hosts(hosts: &[String]) -> Result<()> {
    if hosts.len() > MAX_HOSTS {
        return Err(Error::invalid_field("hosts", format!("at most {MAX_HOSTS} hosts")));
    }
    for host in hosts {
        let name = host.strip_prefix("*.").unwrap_or(host);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !valid {
            return Err(Error::invalid_field(
                "hosts",
                format!("{host:?} is not a host name or address"),
            ));
        }
    }
    Ok(())
}

/// Whether `host` (a URL's host) is `bound`, or under it for `*.name`.
fn host_matches(bound: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host = host.as_str();
    match bound.strip_prefix("*.") {
        Some(parent) => host
            .strip_suffix(parent)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => bound.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_exactly_or_below_a_wildcard() {
        assert!(host_matches("api.github.com", "api.github.com"));
        assert!(host_matches("api.github.com", "API.github.com"));
        assert!(!host_matches("api.github.com", "api.github.com.evil.example"));
        assert!(!host_matches("api.github.com", "evil.example"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "evilexample.com"));
        assert!(host_matches("127.0.0.1", "127.0.0.1"));
    }

    #[test]
    fn host_patterns_are_checked() {
        assert!(check_hosts(&["api.github.com".into(), "*.example.com".into(), "[::1]".into()]).is_ok());
        for bad in ["", "*.", "a b", "a/b", "evil.example/x"] {
            assert!(check_hosts(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_may_be_a_list_or_comma_separated() {
        let list: SetSecret =
            serde_json::from_value(serde_json::json!({"name": "a", "value": "v", "hosts": ["x", "y"]})).unwrap();
        let text: SetSecret =
            serde_json::from_value(serde_json::json!({"name": "a", "value": "v", "hosts": "x, y"})).unwrap();
        assert_eq!(list.hosts, text.hosts);
        let none: SetSecret = serde_json::from_value(serde_json::json!({"name": "a", "value": "v"})).unwrap();
        assert_eq!(none.hosts, None);
    }
}
