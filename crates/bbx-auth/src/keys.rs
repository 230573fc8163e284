//! The API keys service: the administrator's first key, and keys an administrator
//! mints and revokes, durable in the `api_keys` keyspace.

use crate::{Caller, KeyRing, StoredKey, mint};
use bbx_core::model::{ApiKeyInfo, CreateApiKey, CreatedApiKey};
use bbx_core::{Error, ErrorCode, KeyId, Result, validate};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::Utc;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the file, inside the data directory, that holds the first admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// key id (16 bytes) -> [`StoredKey`] as JSON. Its id is what redo records carry:
/// never change it.
pub const API_KEYS: KeyspaceDef = KeyspaceDef {
    id: 3,
    name: "api_keys",
};

/// Stores a key's record.
#[derive(Debug)]
struct PutKey(StoredKey);

impl Staged for PutKey {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let json = serde_json::to_vec(&self.0).map_err(|e| Error::internal(e.to_string()))?;
        tx.put(API_KEYS, self.0.info.id.as_bytes().to_vec(), json);
        Ok(Applied::Done)
    }
}

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

    /// See [`KeyRing::is_active`].
    pub fn is_active(&self, id: &KeyId) -> bool {
        self.ring.is_active(id)
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
        };
        let (token, stored) = mint(info);
        let path = self.data_dir.join(ADMIN_KEY_FILE);
        write_secret_file(&path, &token)
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
        self.put(stored).await?;
        Ok(path)
    }

    async fn put(&self, stored: StoredKey) -> Result<()> {
        self.store.write(PutKey(stored.clone())).await?;
        self.ring.insert(stored);
        Ok(())
    }

    pub async fn create(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
        caller.require_admin("create API keys")?;
        validate::name("name", &req.name)?;
        if let Some(tenant) = &req.tenant {
            validate::tenant(tenant)?;
        }
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            name: req.name,
            tenant: req.tenant,
            created_at: Utc::now(),
            revoked_at: None,
        };
        let (key, stored) = mint(info.clone());
        self.put(stored).await?;
        Ok(CreatedApiKey { key, info })
    }

    pub fn list(&self, caller: &Caller) -> Result<Vec<ApiKeyInfo>> {
        caller.require_admin("list API keys")?;
        Ok(self.ring.list())
    }

    /// Revokes a key; revoking a revoked key is a no-op that returns it unchanged.
    /// The last administrator key cannot be revoked.
    pub async fn revoke(&self, caller: &Caller, id: &KeyId) -> Result<ApiKeyInfo> {
        caller.require_admin("revoke API keys")?;
        let mut stored = self.ring.get(id).ok_or_else(|| Error::not_found("API key", id))?;
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

/// Writes `secret` to `path` with mode 0600: temp file, fsync, rename, fsync dir.
fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
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
