//! Access tokens of outside OpenID Connect issuers (Auth0, Keycloak, Google, ...).
//!
//! An issuer is configured (`[[auth.oidc]]`); its discovery document names its
//! keys (`jwks_uri`), which are fetched once, cached, and fetched again when a
//! token names a key id not among them (at most once per `jwks_min_refetch_secs`,
//! so a flood of made-up key ids costs one fetch). A token is accepted only if its
//! `iss` is a configured issuer, it is signed by one of that issuer's asymmetric
//! keys with the algorithm the key declares (`alg: none` and HMAC never), its
//! `aud` includes the configured audience, and it is within `exp` and `nbf` give
//! or take the issuer's leeway. Its claims map to a tenant and a role.

use crate::Caller;
use bbx_core::config::OidcIssuer;
use bbx_core::model::Role;
use bbx_core::{Error, KeyId, Result};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long fetched keys are trusted before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// The largest discovery document or key set read.
const MAX_DOCUMENT_BYTES: u64 = 1 << 20;
/// How long a discovery or key fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The configured issuers.
pub struct Oidc {
    issuers: Vec<Issuer>,
    http: reqwest::Client,
}

struct Issuer {
    config: OidcIssuer,
    keys: parking_lot::RwLock<IssuerKeys>,
    /// One fetch at a time; the others wait for its keys.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct IssuerKeys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

/// What the kernel needs to know of a token before checking it: whose it is and
/// which key signed it. Nothing here is trusted until the signature checks.
struct Unverified {
    iss: String,
    kid: Option<String>,
}

/// The issuer a token claims (`iss`), unverified: to choose who checks it, and
/// to say whose it is when nobody may.
pub fn claimed_issuer(token: &str) -> Option<String> {
    unverified(token).map(|t| t.iss)
}

fn unverified(token: &str) -> Option<Unverified> {
    use base64::Engine as _;
    let header = jsonwebtoken::decode_header(token).ok()?;
    let payload = token.split('.').nth(1)?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    let Iss { iss } = serde_json::from_slice(&payload).ok()?;
    Some(Unverified { iss, kid: header.kid })
}

fn invalid(why: impl std::fmt::Display) -> Error {
    Error::unauthenticated("invalid", format!("the token is not valid: {why}"))
}

impl Oidc {
    pub fn new(issuers: &[OidcIssuer]) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self {
            issuers: issuers
                .iter()
                .map(|config| Issuer {
                    config: config.clone(),
                    keys: Default::default(),
                    fetching: Default::default(),
                })
                .collect(),
            http,
        })
    }

    /// The configured issuers' URLs.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| i.config.issuer.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Whether `token` claims to be from a configured issuer (so that only it may
    /// decide the token).
    pub fn claims_issuer(&self, token: &str) -> bool {
        unverified(token).is_some_and(|t| self.issuer(&t.iss).is_some())
    }

    fn issuer(&self, iss: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.config.issuer == iss)
    }

    /// Fetches the keys of the issuer `token` names if it needs them: none
    /// fetched yet, too old, or not the key the token names (at most once per the
    /// issuer's minimum interval). A failed fetch leaves the keys there were.
    pub async fn refresh_for(&self, token: &str) {
        let Some(claimed) = unverified(token) else { return };
        let Some(issuer) = self.issuer(&claimed.iss) else {
            return;
        };
        if !issuer.needs_fetch(claimed.kid.as_deref()) {
            return;
        }
        let _fetching = issuer.fetching.lock().await;
        // Another request may have fetched them while this one waited.
        if !issuer.needs_fetch(claimed.kid.as_deref()) {
            return;
        }
        issuer.keys.write().attempted_at = Some(Instant::now());
        match self.fetch(&issuer.config).await {
            Ok(by_kid) => {
                let mut keys = issuer.keys.write();
                keys.by_kid = by_kid;
                keys.fetched_at = Some(Instant::now());
            }
            Err(e) => tracing::warn!(issuer = %issuer.config.issuer, error = %e, "cannot fetch an OIDC issuer's keys"),
        }
    }

    async fn fetch(
        &self,
        config: &OidcIssuer,
    ) -> std::result::Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&url).await?;
        if discovery.issuer != config.issuer {
            return Err(format!(
                "its discovery document names the issuer {:?}",
                discovery.issuer
            ));
        }
        if !(discovery.jwks_uri.starts_with("https://") || bbx_core::config::is_loopback_http(&discovery.jwks_uri)) {
            return Err(format!("its jwks_uri {:?} is not https", discovery.jwks_uri));
        }
        let set: JwkSet = self.get_json(&discovery.jwks_uri).await?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let alg = algorithm(jwk)?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((kid, (key, alg)))
            })
            .collect())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> std::result::Result<T, String> {
        let response = self.http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: {}", response.status()));
        }
        if response.content_length().is_some_and(|n| n > MAX_DOCUMENT_BYTES) {
            return Err(format!("GET {url}: the document is over {MAX_DOCUMENT_BYTES} bytes"));
        }
        let body = response.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        if body.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(format!("GET {url}: the document is over {MAX_DOCUMENT_BYTES} bytes"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: {e}"))
    }

    /// The caller an outside issuer's token makes its bearer; `None` if the token
    /// does not claim a configured issuer.
    pub fn verify(&self, token: &str) -> Option<Result<Caller>> {
        let claimed = unverified(token)?;
        let issuer = self.issuer(&claimed.iss)?;
        Some(issuer.verify(token, claimed.kid.as_deref()))
    }
}

/// The algorithm a key is for: the one it declares, else its type's; only
/// asymmetric keys.
fn algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let declared = jwk
        .common
        .key_algorithm
        .and_then(|alg| alg.to_string().parse::<Algorithm>().ok());
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        _ => return None,
    };
    let alg = declared.unwrap_or(by_type);
    let same_family = matches!(
        (alg, by_type),
        (
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
            Algorithm::RS256
        ) | (Algorithm::ES256, Algorithm::ES256)
            | (Algorithm::ES384, Algorithm::ES384)
            | (Algorithm::EdDSA, Algorithm::EdDSA)
    );
    same_family.then_some(alg)
}

impl Issuer {
    fn needs_fetch(&self, kid: Option<&str>) -> bool {
        let keys = self.keys.read();
        let min_interval = Duration::from_secs(self.config.jwks_min_refetch_secs);
        let may_try = keys.attempted_at.is_none_or(|at| at.elapsed() >= min_interval);
        let stale = keys.fetched_at.is_none_or(|at| at.elapsed() >= KEYS_TTL);
        let unknown = kid.is_some_and(|kid| !keys.by_kid.contains_key(kid));
        may_try && (stale || unknown)
    }

    fn verify(&self, token: &str, kid: Option<&str>) -> Result<Caller> {
        let kid = kid.ok_or_else(|| invalid("it names no key id (kid)"))?;
        let (key, alg) = self
            .keys
            .read()
            .by_kid
            .get(kid)
            .cloned()
            .ok_or_else(|| invalid(format!("its issuer publishes no key {kid:?}")))?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_secs;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    Error::unauthenticated("expired", "the token has expired")
                }
                _ => invalid(e),
            })?;
        self.caller(&data.claims)
    }

    /// The caller the verified `claims` make: the tenant, and the most privileged
    /// role the role claim maps to.
    fn caller(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Result<Caller> {
        let config = &self.config;
        let tenant = match &config.tenant {
            Some(tenant) => tenant.clone(),
            None => claims
                .get(&config.tenant_claim)
                .and_then(|v| v.as_str())
                .ok_or_else(|| invalid(format!("it has no {:?} claim naming a tenant", config.tenant_claim)))?
                .to_owned(),
        };
        bbx_core::validate::tenant(&tenant).map_err(|e| invalid(e.message))?;
        let names: Vec<&str> = match claims.get(&config.roles_claim) {
            Some(serde_json::Value::String(s)) => s.split_whitespace().collect(),
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let role = names
            .iter()
            .filter_map(|name| match config.role_map.is_empty() {
                true => name.parse::<Role>().ok(),
                false => config.role_map.get(*name).copied(),
            })
            .filter(|role| *role != Role::Admin)
            .min_by_key(|role| Role::ALL.iter().position(|r| r == role))
            .ok_or_else(|| invalid(format!("its {:?} claim grants no BBX role", config.roles_claim)))?;
        let subject = claims.get("sub").and_then(|v| v.as_str()).unwrap_or_default();
        let exp = claims.get("exp").and_then(|v| v.as_i64()).unwrap_or_default();
        Ok(Caller {
            key_id: principal_id(&config.issuer, subject),
            tenant: Some(tenant),
            role,
            agent: None,
            expires_at: chrono::DateTime::from_timestamp(exp, 0),
            source: None,
            kinds: None,
        })
    }
}

/// A stable id for an outside principal (issuer and subject), so that its
/// requests share one identity in the audit log and in per-key limits.
fn principal_id(issuer: &str, subject: &str) -> KeyId {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(issuer.as_bytes())
        .chain_update([0])
        .chain_update(subject.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // A version-8 (custom) UUID: never one the kernel generates (v7).
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    KeyId::from_bytes(bytes)
}

#[cfg(test)]
mod tests;
