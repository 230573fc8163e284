//! Access tokens: short-lived JWTs the kernel signs with Ed25519 keys of its own
//! (EdDSA), accepted as bearer credentials everywhere a key is, and published as a
//! JWKS (`/.well-known/jwks.json`) so that anyone can check them.
//!
//! Only EdDSA with a key id the kernel made is accepted: `alg: none`, HMAC with the
//! public key as its secret (algorithm confusion) and every other algorithm are
//! refused before a signature is looked at. The kernel's own clock issues and
//! checks them, so a token gets no leeway.

use crate::Caller;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bbx_core::model::Role;
use bbx_core::{AgentId, Error, KeyId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The kernel's signing keys: key id -> [`StoredSigningKey`] as JSON. Its id is what
/// redo records carry: never change it.
pub const SIGNING_KEYS: KeyspaceDef = KeyspaceDef {
    id: 10,
    name: "signing_keys",
};

/// Revoked tokens until they expire: jti -> `exp` (i64, big-endian). Its id is what
/// redo records carry: never change it.
pub const REVOKED_TOKENS: KeyspaceDef = KeyspaceDef {
    id: 12,
    name: "revoked_tokens",
};

/// The longest a token may live: a day.
pub const MAX_TTL_SECS: u64 = 24 * 3600;
/// A token is refused past this size, before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Who issues the kernel's tokens (`iss`).
pub const ISSUER: &str = "bbx";

/// What a token says of its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Claims {
    pub iss: String,
    /// The identity it was issued to.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub roles: Vec<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    /// The op kinds its bearer may submit, if it is confined to some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    pub iat: i64,
    pub exp: i64,
    /// The token's id.
    pub jti: String,
}

impl Claims {
    /// The caller the token makes its bearer.
    pub fn caller(&self) -> Result<Caller> {
        let jti: KeyId = self.jti.parse()?;
        let role = *self.roles.first().ok_or_else(|| invalid("the token names no role"))?;
        let expires_at =
            DateTime::from_timestamp(self.exp, 0).ok_or_else(|| invalid("the token's exp is out of range"))?;
        Ok(Caller {
            key_id: jti,
            tenant: self.tenant.clone(),
            role,
            agent: self.agent,
            expires_at: Some(expires_at),
            source: None,
            kinds: self.kinds.clone(),
        })
    }
}

fn invalid(why: &str) -> Error {
    Error::unauthenticated("invalid", format!("the token is not valid: {why}"))
}

/// A signing key as stored: its id, its Ed25519 private key (PKCS#8 v1) and when it
/// was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    created_at: DateTime<Utc>,
}

#[derive(Debug)]
struct Revoke {
    jti: String,
    exp: i64,
    /// Revocations whose tokens have expired since, removed with this one.
    expired: Vec<String>,
}

impl Staged for Revoke {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.put(
            REVOKED_TOKENS,
            self.jti.as_bytes().to_vec(),
            self.exp.to_be_bytes().to_vec(),
        );
        for jti in &self.expired {
            tx.remove(REVOKED_TOKENS, jti.as_bytes().to_vec());
        }
        Ok(Applied::Done)
    }
}

#[derive(Debug)]
struct PutSigningKey(StoredSigningKey);

impl Staged for PutSigningKey {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let json = serde_json::to_vec(&self.0).map_err(|e| Error::internal(e.to_string()))?;
        tx.put(SIGNING_KEYS, self.0.kid.as_bytes().to_vec(), json);
        Ok(Applied::Done)
    }
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    /// Parsed once: parsing the key on every check was a fifth of a token's
    /// first use.
    verifier: aws_lc_rs::signature::ParsedPublicKey,
    jwk: Jwk,
}

impl SigningKey {
    fn from_stored(stored: &StoredSigningKey) -> Result<Self> {
        let encoding = EncodingKey::from_ed_der(&stored.pkcs8);
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA)
            .map_err(|e| Error::internal(format!("signing key {} is unreadable: {e}", stored.kid)))?;
        jwk.common.key_id = Some(stored.kid.clone());
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&stored.pkcs8)
            .map_err(|e| Error::internal(format!("signing key {} is unreadable: {e}", stored.kid)))?;
        let verifier = aws_lc_rs::signature::ParsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            aws_lc_rs::signature::KeyPair::public_key(&pair).as_ref(),
        )
        .map_err(|e| Error::internal(format!("signing key {} is unreadable: {e}", stored.kid)))?;
        Ok(Self {
            kid: stored.kid.clone(),
            encoding,
            verifier,
            jwk,
        })
    }
}

/// The kernel's token issuer and verifier.
pub struct Tokens {
    store: Arc<Store>,
    /// Oldest first; the newest signs.
    keys: parking_lot::RwLock<Vec<Arc<SigningKey>>>,
    /// Revoked tokens not yet expired: jti -> exp.
    revoked: parking_lot::RwLock<std::collections::HashMap<String, i64>>,
    /// Tokens whose signature checked, so that a token's later uses cost a lookup
    /// instead of a signature check; bounded (started over when full).
    verified: parking_lot::Mutex<std::collections::HashMap<Box<str>, Claims>>,
}

/// Tokens the verified cache holds at most.
const VERIFIED_CACHE: usize = 16_384;

impl Tokens {
    /// Loads the signing keys; makes the first if there is none.
    pub async fn open(store: Arc<Store>) -> Result<Self> {
        let mut stored: Vec<StoredSigningKey> = Vec::new();
        for item in store.keyspace(SIGNING_KEYS).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load signing keys", e))?;
            stored.push(
                serde_json::from_slice(&value)
                    .map_err(|e| Error::internal(format!("a stored signing key is unreadable: {e}")))?,
            );
        }
        stored.sort_by_key(|key| key.created_at);
        let keys = stored.iter().map(SigningKey::from_stored).collect::<Result<Vec<_>>>()?;
        let mut revoked = std::collections::HashMap::new();
        for item in store.keyspace(REVOKED_TOKENS).iter() {
            let (jti, exp) = item.into_inner().map_err(|e| storage_error("load revoked tokens", e))?;
            let exp = <[u8; 8]>::try_from(&exp[..])
                .map(i64::from_be_bytes)
                .unwrap_or(i64::MAX);
            revoked.insert(String::from_utf8_lossy(&jti).into_owned(), exp);
        }
        let tokens = Self {
            store,
            keys: parking_lot::RwLock::new(keys.into_iter().map(Arc::new).collect()),
            revoked: parking_lot::RwLock::new(revoked),
            verified: parking_lot::Mutex::new(std::collections::HashMap::new()),
        };
        if tokens.keys.read().is_empty() {
            tokens.rotate().await?;
        }
        Ok(tokens)
    }

    /// Makes a new signing key, which signs from now on; tokens the older ones
    /// signed stay valid until they expire.
    pub async fn rotate(&self) -> Result<()> {
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate()
            .map_err(|_| Error::internal("cannot generate a signing key"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| Error::internal("cannot encode a signing key"))?;
        let stored = StoredSigningKey {
            kid: KeyId::generate().to_string(),
            pkcs8: pkcs8.as_ref().to_vec(),
            created_at: Utc::now(),
        };
        let key = SigningKey::from_stored(&stored)?;
        self.store.write(PutSigningKey(stored)).await?;
        self.keys.write().push(Arc::new(key));
        Ok(())
    }

    /// Signs a token for `sub`, confined as `confined` is (its tenant, role and
    /// agent), living `ttl_secs` (1 s to a day).
    pub fn issue(&self, sub: &str, confined: &Caller, ttl_secs: u64) -> Result<(String, Claims)> {
        if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(Error::invalid_field(
                "ttl_secs",
                format!("a token lives 1 to {MAX_TTL_SECS} seconds"),
            ));
        }
        let now = Utc::now().timestamp();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: sub.to_owned(),
            tenant: confined.tenant.clone(),
            roles: vec![confined.role],
            agent: confined.agent,
            kinds: confined.kinds.clone(),
            iat: now,
            exp: now + ttl_secs as i64,
            jti: KeyId::generate().to_string(),
        };
        let key = self
            .keys
            .read()
            .last()
            .cloned()
            .ok_or_else(|| Error::internal("no signing key"))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| Error::internal(format!("cannot sign a token: {e}")))?;
        Ok((token, claims))
    }

    /// The claims of a token the kernel signed and that has not expired. A token
    /// seen before is found in a cache (and still checked for expiry and
    /// revocation); its signature is checked once.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("it is too long"));
        }
        let cached = self.verified.lock().get(token).cloned();
        if let Some(claims) = cached {
            if claims.exp < Utc::now().timestamp() {
                return Err(Error::unauthenticated("expired", "the token has expired"));
            }
            if self.is_revoked(&claims.jti) {
                return Err(Error::unauthenticated("revoked", "the token has been revoked"));
            }
            return Ok(claims);
        }
        let claims = self.verify_signed(token)?;
        let mut verified = self.verified.lock();
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// [`Self::verify`] without the cache: the header, the signature and the claims.
    fn verify_signed(&self, token: &str) -> Result<Claims> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("it is malformed"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(invalid("only EdDSA tokens are accepted"));
        }
        let kid = header.kid.ok_or_else(|| invalid("it names no key"))?;
        let key = self
            .keys
            .read()
            .iter()
            .find(|key| key.kid == kid)
            .cloned()
            .ok_or_else(|| invalid("it was signed by a key this kernel does not have"))?;
        // The signing input is the token up to its last dot; the signature after it.
        let (signed, signature) = token.rsplit_once('.').ok_or_else(|| invalid("it is malformed"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| invalid("its signature is not base64url"))?;
        key.verifier
            .verify_sig(signed.as_bytes(), &signature)
            .map_err(|_| invalid("its signature or claims do not check"))?;
        let payload = signed.split_once('.').map(|(_, payload)| payload).unwrap_or_default();
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| invalid("its signature or claims do not check"))?;
        if claims.iss != ISSUER {
            return Err(invalid("its signature or claims do not check"));
        }
        // Issued and checked on one clock: no leeway, so a token of a second is
        // refused within two (its times are whole seconds).
        if claims.exp < Utc::now().timestamp() {
            return Err(Error::unauthenticated("expired", "the token has expired"));
        }
        if self.is_revoked(&claims.jti) {
            return Err(Error::unauthenticated("revoked", "the token has been revoked"));
        }
        Ok(claims)
    }

    /// Whether the token `jti` was revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.read().contains_key(jti)
    }

    /// Revokes the token `claims` describe, durably, until it would have expired;
    /// revocations of tokens expired since are dropped on the way.
    pub async fn revoke(&self, claims: &Claims) -> Result<()> {
        let now = Utc::now().timestamp();
        let expired = self
            .revoked
            .read()
            .iter()
            .filter(|(_, exp)| **exp < now)
            .map(|(jti, _)| jti.clone())
            .collect();
        let revoke = Revoke {
            jti: claims.jti.clone(),
            exp: claims.exp,
            expired,
        };
        self.store.write(revoke).await.map(drop)?;
        let mut revoked = self.revoked.write();
        revoked.retain(|_, exp| *exp >= now);
        revoked.insert(claims.jti.clone(), claims.exp);
        Ok(())
    }

    /// The public keys, for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys.read().iter().map(|key| key.jwk.clone()).collect(),
        }
    }
}
