//! The kernel's side of Auth: credentials turned into callers, keys and tokens
//! issued and revoked, custom authorization policies, and the audit log they all
//! write to. What each is lives in [`bbx_auth`]; here it meets the store and the
//! kernel's agents.

use crate::Kernel;
use bbx_auth::Role;
use bbx_auth::secrets::{SecretInfo, SetSecret};
use bbx_auth::{Access, Action, AuditEvent, AuditKind, AuditQuery, Caller};
use bbx_core::model::{ApiKeyInfo, CreateApiKey, CreatedApiKey};
use bbx_core::{AgentId, Error, ErrorCode, KeyId, Result};
use bbx_store::Store;
use chrono::Utc;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// A token's life unless asked otherwise: fifteen minutes.
const DEFAULT_TOKEN_TTL_SECS: u64 = 900;

/// What `create_token` asks for.
#[derive(Debug, Clone, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who the token is for: its `sub`.
    pub identity: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub agent: Option<AgentId>,
    /// Seconds it lives: 1 to a day [default: 900].
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Confines it to submitting ops of these kinds.
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
}

/// A token, and what it says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub claims: bbx_auth::Claims,
}

/// Whether a token checks, and its claims or why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenCheck {
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<bbx_auth::Claims>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

impl Kernel {
    /// Mints a new administrator key into `DATA_DIR/admin.key`, for an operator who
    /// lost the old one. Run offline (`bbx key reset-admin`): the data directory's lock
    /// refuses it while a kernel is serving.
    pub async fn reset_admin_key(&self) -> Result<PathBuf> {
        self.keys.mint_admin_key().await
    }

    /// See [`bbx_auth::Keys::create`]; a key confined to an agent must name one of
    /// its tenant that the caller sees.
    pub async fn create_key(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
        let tenant = req.tenant.as_deref().or(caller.tenant.as_deref());
        self.authorize(caller, &Access::new("key.create", Some(Action::ManageKeys), tenant))?;
        let created = self.make_key(caller, req).await?;
        let info = &created.info;
        let what = format!(
            "api key {} ({}) for {}",
            info.id,
            info.role().as_str(),
            info.identity.as_deref().unwrap_or(&info.name)
        );
        let mut event = AuditEvent::new(AuditKind::CredentialCreated, Some(caller), what, "created");
        event.tenant = info.tenant.clone();
        self.audit(event);
        Ok(created)
    }

    async fn make_key(&self, caller: &Caller, req: CreateApiKey) -> Result<CreatedApiKey> {
        if let Some(agent) = &req.agent {
            let tenant = self.agent_tenant(caller, agent)?;
            let named = req.tenant.as_deref().or(caller.tenant.as_deref());
            if named != Some(&*tenant) {
                return Err(Error::invalid_field("agent", "the agent is not of the key's tenant"));
            }
        }
        self.keys.create(caller, req).await
    }

    pub fn list_keys(&self, caller: &Caller) -> Result<Vec<ApiKeyInfo>> {
        let access = Access::new("key.list", Some(Action::ManageKeys), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        self.keys.list(caller)
    }

    /// See [`bbx_auth::Keys::rotate`].
    pub async fn rotate_key(&self, caller: &Caller, id: &KeyId, grace_secs: Option<u64>) -> Result<CreatedApiKey> {
        let access = Access::new("key.rotate", Some(Action::ManageKeys), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        let rotated = self.keys.rotate(caller, id, grace_secs).await?;
        let what = format!("api key {id}, succeeded by {}", rotated.info.id);
        let mut event = AuditEvent::new(AuditKind::CredentialCreated, Some(caller), what, "rotated");
        event.tenant = rotated.info.tenant.clone();
        self.audit(event);
        Ok(rotated)
    }

    pub async fn revoke_key(&self, caller: &Caller, id: &KeyId) -> Result<ApiKeyInfo> {
        let access = Access::new("key.revoke", Some(Action::ManageKeys), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        let revoked = self.keys.revoke(caller, id).await?;
        let mut event = AuditEvent::new(
            AuditKind::CredentialRevoked,
            Some(caller),
            format!("api key {id}"),
            "revoked",
        );
        event.tenant = revoked.tenant.clone();
        self.audit(event);
        Ok(revoked)
    }

    /// The caller a bearer credential makes: an API key (`bbx_...`), an access
    /// token the kernel signed, or one of a configured OIDC issuer (with the keys
    /// fetched so far; [`Self::authenticate_from`] fetches them).
    pub fn authenticate(&self, token: &str) -> Result<Caller> {
        if token.starts_with("bbx_") {
            return self.keys.verify(token);
        }
        if token.len() > bbx_auth::tokens::MAX_TOKEN_BYTES {
            return Err(Error::unauthenticated(
                "invalid",
                format!("the token is larger than {} bytes", bbx_auth::tokens::MAX_TOKEN_BYTES),
            ));
        }
        // The kernel's own first: a token it verified before costs a lookup.
        let own = match self.tokens.verify(token) {
            Ok(claims) => return claims.caller(),
            Err(e) => e,
        };
        if let Some(checked) = self.oidc.verify(token) {
            return checked;
        }
        match bbx_auth::oidc::claimed_issuer(token) {
            Some(iss) if iss != bbx_auth::tokens::ISSUER => {
                let shown: String = iss.chars().take(100).collect();
                Err(Error::unauthenticated(
                    "invalid",
                    format!("the token's issuer {shown:?} is not one this kernel trusts"),
                ))
            }
            _ => Err(own),
        }
    }

    /// [`Self::authenticate`] for a client at `source`, within the limits on failed
    /// authentications ([`bbx_auth::Throttle`]), auditing a failure. An OIDC
    /// issuer's keys are fetched first if the token needs keys not yet fetched.
    pub async fn authenticate_from(&self, token: &str, source: Option<String>) -> Result<Caller> {
        if !self.oidc.is_empty() && token.len() <= bbx_auth::tokens::MAX_TOKEN_BYTES {
            self.oidc.refresh_for(token).await;
        }
        let checked = self
            .throttle
            .authenticate(token, source.as_deref(), || self.authenticate(token));
        let checked = checked.map(|caller| Caller {
            source: source.clone(),
            ..caller
        });
        checked.inspect_err(|e| {
            // A refusal for being past the limit is not written down: an attacker
            // would otherwise turn each refused request into a store write. The
            // failures that led to it were.
            if e.code != ErrorCode::ResourceExhausted {
                let event = AuditEvent::new(AuditKind::AuthenticationFailed, None, "authenticate", &e.message);
                self.audit(event.from(source));
            }
        })
    }

    /// Whether the custom authorization policies allow `access` (the built-in
    /// roles and tenants were decided before); with none loaded, one lock read.
    pub fn authorize(&self, caller: &Caller, access: &bbx_auth::Access<'_>) -> Result<()> {
        self.policies.decide(caller, access)
    }

    /// [`Self::authorize`] on an agent, whose labels the policies see, loaded
    /// only when there are policies to see them.
    pub(crate) fn authorize_on_agent(
        &self,
        caller: &Caller,
        access: bbx_auth::Access<'_>,
        agent: &AgentId,
    ) -> Result<()> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let record = self.load_agent(caller, agent)?;
        self.policies.decide(caller, &access.on(&record))
    }

    /// Whether the custom policies in force run on regorus's VM (else its
    /// interpreter).
    pub fn policies_on_vm(&self) -> bool {
        self.policies.on_vm()
    }

    /// [`Self::authorize`] on the op `id`: its agent (and labels) and its kind.
    pub(crate) fn authorize_op(
        &self,
        caller: &Caller,
        operation: &str,
        action: Action,
        id: &bbx_core::OpId,
    ) -> Result<()> {
        if self.policies.is_empty() {
            return Ok(());
        }
        let op = self.ring.info(caller, id)?;
        self.authorize_on_agent(
            caller,
            Access::new(operation, Some(action), None).op_kind(&op.kind),
            &op.agent,
        )
    }

    /// Adds or replaces a custom authorization policy (administrators).
    pub async fn put_policy(&self, caller: &Caller, name: &str, source: String) -> Result<bbx_auth::StoredPolicy> {
        let stored = self.policies.put(caller, name, source).await?;
        let what = format!("authorization policy {name} (version {})", stored.version);
        self.audit(AuditEvent::new(AuditKind::PolicyChanged, Some(caller), what, "set"));
        Ok(stored)
    }

    /// Removes a custom authorization policy (administrators).
    pub async fn delete_policy(&self, caller: &Caller, name: &str) -> Result<bbx_auth::StoredPolicy> {
        let removed = self.policies.delete(caller, name).await?;
        let what = format!("authorization policy {name}");
        self.audit(AuditEvent::new(AuditKind::PolicyChanged, Some(caller), what, "removed"));
        Ok(removed)
    }

    /// The rules in force: the built-in roles and the custom policies.
    pub fn auth_rules(&self, caller: &Caller) -> Result<serde_json::Value> {
        caller.may(Action::Read)?;
        let mut rules = bbx_auth::rules();
        let policies = self.policies.list();
        // Policies are the operators' to read; others see their names.
        let shown: Vec<serde_json::Value> = policies
            .iter()
            .map(|p| {
                let mut shown = serde_json::json!({ "name": p.name, "version": p.version, "updated_at": p.updated_at });
                if caller.is_admin() {
                    shown["source"] = p.source.clone().into();
                }
                shown
            })
            .collect();
        rules["policies"] = shown.into();
        Ok(rules)
    }

    /// Records an audit event durably, off the caller's path.
    pub fn audit(&self, event: AuditEvent) {
        bbx_component::write_later(
            &self.store,
            &self.tasks,
            bbx_auth::audit::Record(event),
            "an audit event",
        );
    }

    /// See [`bbx_auth::secrets::Secrets::set`]; audited without its value.
    pub async fn set_secret(&self, caller: &Caller, req: SetSecret) -> Result<SecretInfo> {
        let info = self.secrets.set(caller, req).await?;
        self.audit_secret(caller, &info, "set");
        Ok(info)
    }

    pub async fn bind_secret(
        &self,
        caller: &Caller,
        tenant: Option<String>,
        name: &str,
        hosts: Vec<String>,
    ) -> Result<SecretInfo> {
        let info = self.secrets.bind(caller, tenant, name, hosts).await?;
        self.audit_secret(caller, &info, &format!("bound to {}", info.hosts.join(", ")));
        Ok(info)
    }

    pub async fn delete_secret(&self, caller: &Caller, tenant: Option<String>, name: &str) -> Result<SecretInfo> {
        let info = self.secrets.delete(caller, tenant, name).await?;
        self.audit_secret(caller, &info, "deleted");
        Ok(info)
    }

    pub fn list_secrets(&self, caller: &Caller, tenant: Option<String>) -> Result<Vec<SecretInfo>> {
        self.secrets.list(caller, tenant)
    }

    fn audit_secret(&self, caller: &Caller, info: &SecretInfo, why: &str) {
        let what = format!("secret {} (version {})", info.name, info.version);
        let mut event = AuditEvent::new(AuditKind::SecretChanged, Some(caller), what, why);
        event.tenant = Some(info.tenant.clone());
        self.audit(event);
    }

    /// The audit log's events the caller may see (administrators: all; tenant
    /// administrators: their tenant's).
    pub fn audit_events(&self, caller: &Caller, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        bbx_auth::audit::query(&self.store, caller, query)
    }

    /// The public keys the kernel's tokens are signed with, as a JWKS.
    pub fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        self.tokens.jwks()
    }

    /// Issues an access token for `identity`, as [`bbx_auth::grant`] allows.
    pub fn create_token(&self, caller: &Caller, req: CreateToken) -> Result<CreatedToken> {
        bbx_core::validate::name("identity", &req.identity)?;
        let (tenant, role) = bbx_auth::grant(caller, req.tenant, req.role, req.agent)?;
        if let Some(agent) = &req.agent
            && tenant.as_deref() != Some(&*self.agent_tenant(caller, agent)?)
        {
            return Err(Error::invalid_field("agent", "the agent is not of the token's tenant"));
        }
        let confined = Caller {
            agent: req.agent,
            kinds: caller.grant_kinds(req.kinds)?,
            ..match tenant {
                Some(tenant) => Caller::of_tenant(KeyId::generate(), tenant, role),
                None => Caller::admin(KeyId::generate()),
            }
        };
        let ttl = req.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
        let (token, claims) = self.tokens.issue(&req.identity, &confined, ttl)?;
        let what = format!("token {} for {} ({})", claims.jti, claims.sub, confined.role.as_str());
        let mut event = AuditEvent::new(AuditKind::TokenIssued, Some(caller), what, "issued");
        event.tenant = claims.tenant.clone();
        self.audit(event);
        Ok(CreatedToken { token, claims })
    }

    /// The client-credentials grant: an access token for the API key whose id is
    /// `client_id` and whole text is `secret`, with the key's tenant, role and agent.
    pub fn token_for_key(&self, client_id: &str, secret: &str) -> Result<CreatedToken> {
        let caller = self.throttle.authenticate(secret, None, || self.keys.verify(secret))?;
        if caller.key_id.to_string() != client_id {
            return Err(Error::unauthenticated("invalid", "the client id is not the key's"));
        }
        let identity = format!("key:{client_id}");
        let ttl = match caller.expires_at {
            Some(at) => (at - Utc::now()).num_seconds().clamp(1, DEFAULT_TOKEN_TTL_SECS as i64) as u64,
            None => DEFAULT_TOKEN_TTL_SECS,
        };
        let (token, claims) = self.tokens.issue(&identity, &caller, ttl)?;
        let what = format!("token {} for {identity} (client credentials)", claims.jti);
        self.audit(AuditEvent::new(AuditKind::TokenIssued, Some(&caller), what, "issued"));
        Ok(CreatedToken { token, claims })
    }

    /// Revokes an access token until it expires. Its own bearer may; otherwise
    /// whoever may manage the keys of its tenant.
    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> Result<bbx_auth::Claims> {
        let claims = self
            .tokens
            .verify(token)
            .map_err(|e| Error::invalid_field("token", e.message))?;
        if caller.key_id.to_string() != claims.jti {
            caller.may(Action::ManageKeys)?;
            match &claims.tenant {
                Some(tenant) => caller.check_owner(tenant, "token", &claims.jti)?,
                None => caller.require_admin("revoke an administrator's token")?,
            }
        }
        self.tokens.revoke(&claims).await?;
        let what = format!("token {} of {}", claims.jti, claims.sub);
        let mut event = AuditEvent::new(AuditKind::CredentialRevoked, Some(caller), what, "revoked");
        event.tenant = claims.tenant.clone();
        self.audit(event);
        Ok(claims)
    }

    /// Whether the credential behind `caller` still works: not expired, and not
    /// revoked (a long-lived session asks, since it authenticated only once).
    pub fn credential_valid(&self, caller: &Caller) -> bool {
        self.keys.still_valid(caller) && !self.tokens.is_revoked(&caller.key_id.to_string())
    }

    /// Whether `token` is one of the kernel's, unexpired: its claims if so.
    pub fn verify_token(&self, token: &str) -> TokenCheck {
        match self.tokens.verify(token) {
            Ok(claims) => TokenCheck {
                valid: true,
                claims: Some(claims),
                error: None,
            },
            Err(e) => TokenCheck {
                valid: false,
                claims: None,
                error: Some(e),
            },
        }
    }
}

/// The tenants' secrets as the tools see them: a value for a bound host, and a
/// refusal audited.
pub(crate) struct SecretsForTools {
    pub(crate) secrets: Arc<bbx_auth::secrets::Secrets>,
    pub(crate) store: Arc<Store>,
    pub(crate) tasks: TaskTracker,
}

impl bbx_tools::SecretSource for SecretsForTools {
    fn reveal(&self, tenant: &str, name: &str, host: &str) -> Result<String> {
        self.secrets.reveal(tenant, name, host).inspect_err(|e| {
            if e.code == ErrorCode::PermissionDenied {
                let mut event =
                    AuditEvent::new(AuditKind::Denied, None, format!("secret {name} for {host}"), &e.message);
                event.tenant = Some(tenant.to_owned());
                bbx_component::write_later(
                    &self.store,
                    &self.tasks,
                    bbx_auth::audit::Record(event),
                    "an audit event",
                );
            }
        })
    }
}
