//! API keys: the administrator's first key, and keys an administrator mints and
//! revokes.

use super::*;

impl Kernel {
    /// Mints the administrator key. The file is written (and synced) before the
    /// record is committed: a crash in between leaves no key, and the next start
    /// simply mints another, instead of a key nobody can read.
    pub(crate) async fn mint_admin_key(&self) -> Result<PathBuf> {
        let info = ApiKeyInfo {
            id: KeyId::generate(),
            name: "admin".into(),
            tenant: None,
            created_at: Utc::now(),
            revoked_at: None,
        };
        let (token, stored) = auth::mint(info);
        let path = self.config.data_dir.join(ADMIN_KEY_FILE);
        write_secret_file(&path, &token)
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
        self.store.write(Write::PutKey(stored.clone())).await?;
        self.keys.insert(stored);
        Ok(path)
    }

    /// Mints a new administrator key into `DATA_DIR/admin.key`, for an operator who
    /// lost the old one. Run offline (`bbx key reset-admin`): the data directory's lock
    /// refuses it while a kernel is serving. Existing keys stay as they are.
    pub async fn reset_admin_key(&self) -> Result<PathBuf> {
        self.mint_admin_key().await
    }

    pub async fn create_key(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
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
        let (key, stored) = auth::mint(info.clone());
        self.store.write(Write::PutKey(stored.clone())).await?;
        self.keys.insert(stored);
        Ok(CreatedApiKey { key, info })
    }

    pub fn list_keys(&self, caller: &Caller) -> Result<Vec<ApiKeyInfo>> {
        caller.require_admin("list API keys")?;
        Ok(self.keys.list())
    }

    /// Revokes a key; revoking a revoked key is a no-op that returns it unchanged.
    pub async fn revoke_key(&self, caller: &Caller, id: &KeyId) -> Result<ApiKeyInfo> {
        caller.require_admin("revoke API keys")?;
        let mut stored = self.keys.get(id).ok_or_else(|| Error::not_found("API key", id))?;
        if stored.info.revoked_at.is_none() && stored.info.tenant.is_none() && self.keys.active_admins() == 1 {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "this is the last administrator key; create another before revoking it",
            ));
        }
        if stored.info.revoked_at.is_none() {
            stored.info.revoked_at = Some(Utc::now());
            self.store.write(Write::PutKey(stored.clone())).await?;
            self.keys.insert(stored.clone());
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
