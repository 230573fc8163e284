use super::*;
use bbx_core::ErrorCode;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const ISSUER: &str = "https://idp.example";

fn config() -> OidcIssuer {
    OidcIssuer {
        issuer: ISSUER.into(),
        audience: "urn:bbx".into(),
        tenant: None,
        tenant_claim: "tenant".into(),
        roles_claim: "roles".into(),
        role_map: [
            ("idp-ops".to_owned(), Role::Operator),
            ("idp-read".to_owned(), Role::Reader),
        ]
        .into(),
        leeway_secs: 5,
        jwks_min_refetch_secs: 10,
    }
}

/// An issuer whose key `kid` is already known, and that key to sign with.
fn issuer_with_key(kid: &str) -> (Oidc, EncodingKey) {
    let (oidc, key, _) = issuer_with_public_key(kid);
    (oidc, key)
}

/// [`issuer_with_key`], with the public key as the issuer publishes it.
fn issuer_with_public_key(kid: &str) -> (Oidc, EncodingKey, String) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let encoding = EncodingKey::from_ec_der(pair.to_pkcs8v1().unwrap().as_ref());
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    let oidc = Oidc::new(&[config()]).unwrap();
    let decoding = DecodingKey::from_jwk(&jwk).unwrap();
    let mut keys = oidc.issuers[0].keys.write();
    keys.by_kid.insert(kid.into(), (decoding, algorithm(&jwk).unwrap()));
    keys.fetched_at = Some(Instant::now());
    drop(keys);
    (oidc, encoding, serde_json::to_string(&jwk).unwrap())
}

fn claims(exp_in: i64) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": ISSUER, "aud": "urn:bbx", "sub": "svc-1", "tenant": "acme",
        "roles": ["idp-read", "idp-ops", "unknown"], "iat": now, "exp": now + exp_in,
    })
}

fn sign(key: &EncodingKey, kid: &str, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn refusal(oidc: &Oidc, token: &str) -> String {
    let e = oidc.verify(token).expect("a configured issuer's").unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    e.message
}

#[test]
fn a_good_token_maps_to_its_tenant_and_most_privileged_role() {
    let (oidc, key) = issuer_with_key("k1");
    let caller = oidc.verify(&sign(&key, "k1", &claims(60))).unwrap().unwrap();
    assert_eq!(caller.tenant.as_deref(), Some("acme"));
    assert_eq!(caller.role, Role::Operator);
    let again = oidc.verify(&sign(&key, "k1", &claims(120))).unwrap().unwrap();
    assert_eq!(caller.key_id, again.key_id, "one subject, one principal");
}

#[test]
fn bad_tokens_are_refused_each_with_its_reason() {
    let (oidc, key) = issuer_with_key("k1");
    assert!(refusal(&oidc, &sign(&key, "k1", &claims(-60))).contains("expired"));
    let mut wrong_aud = claims(60);
    wrong_aud["aud"] = json!("urn:other");
    assert!(refusal(&oidc, &sign(&key, "k1", &wrong_aud)).contains("not valid"));
    assert!(refusal(&oidc, &sign(&key, "k9", &claims(60))).contains("no key \"k9\""));
    let mut no_role = claims(60);
    no_role["roles"] = json!(["unknown"]);
    assert!(refusal(&oidc, &sign(&key, "k1", &no_role)).contains("grants no BBX role"));
    let mut no_tenant = claims(60);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    assert!(refusal(&oidc, &sign(&key, "k1", &no_tenant)).contains("tenant"));
    let mut not_yet = claims(600);
    not_yet["nbf"] = json!(chrono::Utc::now().timestamp() + 300);
    assert!(refusal(&oidc, &sign(&key, "k1", &not_yet)).contains("not valid"));

    let (_, other_key) = issuer_with_key("k1");
    assert!(
        refusal(&oidc, &sign(&other_key, "k1", &claims(60))).contains("not valid"),
        "a forged signature"
    );
}

#[test]
fn none_and_hmac_with_the_public_key_are_refused() {
    use base64::Engine as _;
    let (oidc, _, public) = issuer_with_public_key("k1");
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "k1"})), b64(&claims(60)));
    assert!(oidc.verify(&none).is_none_or(|r| r.is_err()), "alg none");
    // HS256 keyed with the public key's bytes (algorithm confusion).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let hmac = jsonwebtoken::encode(&header, &claims(60), &EncodingKey::from_secret(public.as_bytes())).unwrap();
    assert!(refusal(&oidc, &hmac).contains("not valid"));
}

#[test]
fn other_issuers_tokens_are_not_this_ones_to_decide() {
    let (oidc, key) = issuer_with_key("k1");
    let mut elsewhere = claims(60);
    elsewhere["iss"] = json!("https://evil.example");
    let token = sign(&key, "k1", &elsewhere);
    assert!(oidc.verify(&token).is_none());
    assert!(!oidc.claims_issuer(&token));
    assert!(oidc.verify("not a token").is_none());
}

#[test]
fn keys_are_fetched_again_only_when_needed_and_not_too_often() {
    let (oidc, _) = issuer_with_key("k1");
    let issuer = &oidc.issuers[0];
    assert!(!issuer.needs_fetch(Some("k1")), "a known key, fresh");
    assert!(issuer.needs_fetch(Some("k2")), "an unknown key");
    issuer.keys.write().attempted_at = Some(Instant::now());
    assert!(!issuer.needs_fetch(Some("k2")), "not again within the minimum interval");
}

#[test]
fn keys_are_only_asymmetric_and_keep_their_family() {
    let (oidc, _) = issuer_with_key("k1");
    assert_eq!(oidc.issuers[0].keys.read().by_kid["k1"].1, Algorithm::ES256);
    let mut jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(json!({
        "kty": "oct", "k": "c2VjcmV0", "kid": "h"
    }))
    .unwrap();
    assert_eq!(algorithm(&jwk), None, "no HMAC keys");
    jwk = serde_json::from_value(json!({
        "kty": "EC", "crv": "P-256", "alg": "RS256", "kid": "e",
        "x": "8NuH9wEUKVRy1QCQpG-WNSNbsJ8lh6WQSp1a0x5efBc", "y": "bfiuuoUaRJ5ex7MFg0aSLanXtVdeT2DwWF_F3sQu_x8"
    }))
    .unwrap();
    assert_eq!(algorithm(&jwk), None, "an EC key declaring RS256");
}
