//! The API keys service: the administrator's first key, and keys an administrator
//! mints and revokes, durable in the `api_keys` keyspace.

use crate::{Action, Caller, KeyRing, Role, StoredKey, mint};
use bbx_core::model::{ApiKeyInfo, CreateApiKey, CreatedApiKey};
use bbx_core::{Error, ErrorCode, KeyId, Result, validate};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::Utc;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The longest a key may be made to last: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 24 * 3600;

/// Name of the file, inside the data directory, that holds the first admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// key id (16 bytes) -> [`StoredKey`] as JSON. Its id is what redo records carry:
/// never change it.
pub const API_KEYS: KeyspaceDef = KeyspaceDef {
    id: 3,
    name: "api_keys",
};

/// Stores keys' records, in one group.
#[derive(Debug)]
struct PutKeys(Vec<StoredKey>);

impl Staged for PutKeys {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        for key in &self.0 {
            let json = serde_json::to_vec(key).map_err(|e| Error::internal(e.to_string()))?;
            tx.put(API_KEYS, key.info.id.as_bytes().to_vec(), json);
        }
        Ok(Applied::Done)
    }
}

/// The longest a rotated key keeps working beside its successor: 30 days.
const MAX_GRACE_SECS: u64 = 30 * 24 * 3600;
/// How long it does unless asked otherwise: a day.
const DEFAULT_GRACE_SECS: u64 = 24 * 3600;

/// The keys a kernel admits callers with.
pub struct Keys {
    ring: KeyRing,
    store: Arc<Store>,
    data_dir: PathBuf,
}

impl Keys {
    /// Loads the stored keys.
    pub fn load(store: Arc<Store>, data_dir: &Path) -> Result<Self> {
        let ring = KeyRing::default();
        for item in store.keyspace(API_KEYS).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load API keys", e))?;
            let stored: StoredKey = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("stored API key is unreadable: {e}")))?;
            ring.insert(stored);
        }
        Ok(Self {
            ring,
            store,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Authenticates a bearer token.
    pub fn verify(&self, token: &str) -> Result<Caller> {
        self.ring.verify(token)
    }

    /// Whether the credential behind `caller` still works: not expired, and if it
    /// is a key, not revoked (a long-lived session checks this, since it
    /// authenticated only once).
    pub fn still_valid(&self, caller: &Caller) -> bool {
        let current = caller.expires_at.is_none_or(|at| at > Utc::now());
        current && (self.ring.get(&caller.key_id).is_none() || self.ring.is_active(&caller.key_id))
    }

    /// Mints the administrator key if there is no key at all; where it was written.
    pub async fn mint_first_admin_key(&self) -> Result<Option<PathBuf>> {
        if self.ring.is_empty() {
            self.mint_admin_key().await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Mints an administrator key into `DATA_DIR/admin.key`. The file is written
    /// (and synced) before the record is committed: a crash in between leaves no
    /// key, and the next start simply mints another, instead of a key nobody can
    /// read. Existing keys stay as they are.
    pub async fn mint_admin_key(&self) -> Result<PathBuf> {
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            name: "admin".into(),
            tenant: None,
            created_at: Utc::now(),
            revoked_at: None,
            stored_role: Some(Role::Admin),
            identity: Some("admin".into()),
            agent: None,
            expires_at: None,
            last_used_at: None,
            kinds: None,
        };
        let (token, stored) = mint(info);
        let path = self.data_dir.join(ADMIN_KEY_FILE);
        write_secret_file(&path, &token)
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
        self.put(stored).await?;
        Ok(path)
    }

    async fn put(&self, stored: StoredKey) -> Result<()> {
        self.put_all(vec![stored]).await
    }

    async fn put_all(&self, stored: Vec<StoredKey>) -> Result<()> {
        self.store.write(PutKeys(stored.clone())).await?;
        for key in stored {
            self.ring.insert(key);
        }
        Ok(())
    }

    /// Rotates a key: a new key with its tenant, role, agent, identity and name,
    /// while the old one keeps working for `grace_secs` (a day unless asked, 30 days
    /// at most) so that its clients can switch, then expires. Both change in one
    /// write.
    pub async fn rotate(&self, caller: &Caller, id: &KeyId, grace_secs: Option<u64>) -> Result<CreatedApiKey> {
        let mut old = self.managed(caller, id)?;
        if old.info.revoked_at.is_some() {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("API key {id} is revoked"),
            ));
        }
        let grace = grace_secs.unwrap_or(DEFAULT_GRACE_SECS);
        if grace > MAX_GRACE_SECS {
            return Err(Error::invalid_field(
                "grace_secs",
                format!("grace_secs is at most {MAX_GRACE_SECS} (30 days)"),
            ));
        }
        let now = Utc::now();
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            created_at: now,
            last_used_at: None,
            ..old.info.clone()
        };
        let switch_by = now + chrono::Duration::seconds(grace as i64);
        old.info.expires_at = Some(old.info.expires_at.map_or(switch_by, |at| at.min(switch_by)));
        let (key, stored) = mint(info.clone());
        self.put_all(vec![stored, old]).await?;
        Ok(CreatedApiKey { key, info })
    }

    /// A key the caller manages: 404 for another tenant's, 403 for an
    /// administrator's unless the caller is one.
    fn managed(&self, caller: &Caller, id: &KeyId) -> Result<StoredKey> {
        caller.may(Action::ManageKeys)?;
        let stored = self.ring.get(id).ok_or_else(|| Error::not_found("API key", id))?;
        caller.check_owner(stored.info.tenant.as_deref().unwrap_or_default(), "API key", id)?;
        if stored.info.tenant.is_none() {
            caller.require_admin("manage administrator keys")?;
        }
        Ok(stored)
    }

    /// Makes a key, as [`grant`] allows (the agent's tenant is the kernel's to
    /// check).
    pub async fn create(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
        caller.may(Action::ManageKeys)?;
        validate::name("name", &req.name)?;
        if let Some(identity) = &req.identity {
            validate::name("identity", identity)?;
        }
        let (tenant, role) = grant(caller, req.tenant, req.role, req.agent)?;
        let kinds = caller.grant_kinds(req.kinds)?;
        let expires_at = match req.ttl_secs {
            None => None,
            Some(secs @ 1..=MAX_TTL_SECS) => Some(Utc::now() + chrono::Duration::seconds(secs as i64)),
            Some(_) => {
                return Err(Error::invalid_field(
                    "ttl_secs",
                    format!("ttl_secs is 1 to {MAX_TTL_SECS} (ten years)"),
                ));
            }
        };
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            identity: Some(req.identity.unwrap_or_else(|| req.name.clone())),
            name: req.name,
            tenant,
            created_at: Utc::now(),
            revoked_at: None,
            stored_role: Some(role),
            agent: req.agent,
            expires_at,
            last_used_at: None,
            kinds,
        };
        let (key, stored) = mint(info.clone());
        self.put(stored).await?;
        Ok(CreatedApiKey { key, info })
    }

    /// The keys the caller manages: its tenant's, or all for an administrator.
    pub fn list(&self, caller: &Caller) -> Result<Vec<ApiKeyInfo>> {
        caller.may(Action::ManageKeys)?;
        Ok(self.ring.list(caller.tenant.as_deref()))
    }

    /// Revokes a key; revoking a revoked key is a no-op that returns it unchanged.
    /// The last administrator key cannot be revoked.
    pub async fn revoke(&self, caller: &Caller, id: &KeyId) -> Result<ApiKeyInfo> {
        let mut stored = self.managed(caller, id)?;
        if stored.info.revoked_at.is_none() && stored.info.tenant.is_none() && self.ring.active_admins() == 1 {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "this is the last administrator key; create another before revoking it",
            ));
        }
        if stored.info.revoked_at.is_none() {
            stored.info.revoked_at = Some(Utc::now());
            self.put(stored.clone()).await?;
        }
        Ok(stored.info)
    }
}

/// What a new credential (a key or a token) made by `caller` may be: its tenant
/// (the caller's own unless it names one) and its role (`admin` without a tenant,
/// `operator` with one, unless it names one). An administrator grants anything; a
/// tenant administrator grants within its tenant, short of `admin`. `admin` goes
/// with no tenant, every other role with one, and `agent` with an agent.
pub fn grant(
    caller: &Caller,
    tenant: Option<String>,
    role: Option<Role>,
    agent: Option<bbx_core::AgentId>,
) -> Result<(Option<String>, Role)> {
    caller.may(Action::ManageKeys)?;
    let tenant = tenant.or_else(|| caller.tenant.clone());
    if let Some(tenant) = &tenant {
        validate::tenant(tenant)?;
    }
    let role = role.unwrap_or(if tenant.is_none() { Role::Admin } else { Role::Operator });
    match (&tenant, role) {
        (None, Role::Admin) => caller.require_admin("grant the administrator role")?,
        (None, _) => {
            return Err(Error::invalid_field(
                "tenant",
                format!("a {} credential needs a tenant", role.as_str()),
            ));
        }
        (Some(_), Role::Admin) => return Err(Error::invalid_field("role", "an admin credential belongs to no tenant")),
        (Some(tenant), _) => caller.check_tenant(tenant)?,
    }
    if role == Role::Agent && agent.is_none() {
        return Err(Error::invalid_field("agent", "an agent credential names its agent"));
    }
    Ok((tenant, role))
}

/// Writes `secret` to `path` with mode 0600: temp file, fsync, rename, fsync dir.
pub(crate) fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
