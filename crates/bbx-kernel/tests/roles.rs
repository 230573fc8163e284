//! Roles and scoped keys: what each role may do in its tenant (403 beyond it),
//! keys confined to one agent, key expiry, and who may make which keys.

mod support;

use bbx_core::ErrorCode;
use bbx_core::model::{CreateAgent, CreateApiKey, ListAgents, Role, SetState};
use bbx_core::op::{SubmitBatch, SubmitOp};
use bbx_core::{AgentId, Result};
use bbx_kernel::{Caller, Kernel};
use serde_json::json;

async fn agent(kernel: &Kernel, caller: &Caller, tenant: &str) -> AgentId {
    let req = CreateAgent {
        name: "a".into(),
        tenant: Some(tenant.into()),
        ..Default::default()
    };
    kernel.create_agent(caller, req).await.unwrap().id
}

/// A key made by `maker`, authenticated: the caller it is.
async fn key(kernel: &Kernel, maker: &Caller, req: CreateApiKey) -> Result<Caller> {
    let created = kernel.create_key(maker, req).await?;
    kernel.authenticate(&created.key)
}

fn of(tenant: &str, role: Role) -> CreateApiKey {
    CreateApiKey {
        name: format!("{}-key", role.as_str()),
        tenant: Some(tenant.into()),
        role: Some(role),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(result: Result<T>) -> ErrorCode {
    result.unwrap_err().code
}

#[tokio::test]
async fn each_role_does_what_it_names_in_its_tenant_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let mine = agent(&kernel, &admin, "acme").await;
    let other = agent(&kernel, &admin, "acme").await;
    let foreign = agent(&kernel, &admin, "globex").await;
    let set = |value| SetState {
        value,
        if_version: None,
    };
    let noop = |agent| SubmitBatch {
        ops: vec![SubmitOp::new(agent, "noop", json!({}))],
        wait_ms: None,
    };

    let reader = key(&kernel, &admin, of("acme", Role::Reader)).await.unwrap();
    assert_eq!(reader.role, Role::Reader);
    kernel
        .state_set(&admin, &mine, "k".into(), set(json!(1)))
        .await
        .unwrap();
    assert_eq!(kernel.state_get(&reader, &mine, "k").unwrap().value, json!(1));
    assert!(kernel.get_agent(&reader, &mine).is_ok());
    assert_eq!(
        code(kernel.state_set(&reader, &mine, "k".into(), set(json!(2))).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(kernel.submit(&reader, noop(mine)).await),
        ErrorCode::PermissionDenied
    );
    let create = CreateAgent {
        name: "b".into(),
        ..Default::default()
    };
    assert_eq!(
        code(kernel.create_agent(&reader, create.clone()).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(kernel.get_agent(&reader, &foreign)),
        ErrorCode::NotFound,
        "another tenant's is missing"
    );

    let operator = key(&kernel, &admin, of("acme", Role::Operator)).await.unwrap();
    kernel.create_agent(&operator, create.clone()).await.unwrap();
    kernel
        .state_set(&operator, &other, "k".into(), set(json!(3)))
        .await
        .unwrap();
    assert_eq!(
        code(key(&kernel, &operator, of("acme", Role::Reader)).await),
        ErrorCode::PermissionDenied
    );

    let confined = CreateApiKey {
        agent: Some(mine),
        ..of("acme", Role::Agent)
    };
    let own = key(&kernel, &admin, confined).await.unwrap();
    assert_eq!(own.agent, Some(mine));
    kernel.state_set(&own, &mine, "k".into(), set(json!(4))).await.unwrap();
    kernel.submit(&own, noop(mine)).await.unwrap();
    assert_eq!(
        code(kernel.state_set(&own, &other, "k".into(), set(json!(5))).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(kernel.submit(&own, noop(other)).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(kernel.list_agents(&own, ListAgents::default())),
        ErrorCode::PermissionDenied
    );
    assert_eq!(code(kernel.state_get(&own, &foreign, "k")), ErrorCode::NotFound);
    assert_eq!(
        code(kernel.create_agent(&own, create).await),
        ErrorCode::PermissionDenied
    );
    let unconfined = key(&kernel, &admin, of("acme", Role::Agent)).await;
    assert_eq!(
        code(unconfined),
        ErrorCode::InvalidArgument,
        "an agent key names its agent"
    );
    let elsewhere = CreateApiKey {
        agent: Some(foreign),
        ..of("acme", Role::Agent)
    };
    assert_eq!(code(key(&kernel, &admin, elsewhere).await), ErrorCode::InvalidArgument);
    kernel.shutdown().await;
}

#[tokio::test]
async fn a_tenant_administrator_makes_keys_of_its_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let boss = key(&kernel, &admin, of("acme", Role::TenantAdmin)).await.unwrap();
    // With no tenant named, the key is of the maker's own.
    let made = kernel
        .create_key(
            &boss,
            CreateApiKey {
                name: "ci".into(),
                role: Some(Role::Reader),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(made.info.tenant.as_deref(), Some("acme"));
    assert_eq!(made.info.role(), Role::Reader);
    assert_eq!(
        code(key(&kernel, &boss, of("globex", Role::Reader)).await),
        ErrorCode::PermissionDenied
    );
    let admin_key = CreateApiKey {
        name: "root".into(),
        role: Some(Role::Admin),
        ..Default::default()
    };
    assert_eq!(
        code(kernel.create_key(&boss, admin_key).await),
        ErrorCode::InvalidArgument
    );
    let listed = kernel.list_keys(&boss).unwrap();
    assert!(listed.iter().all(|k| k.tenant.as_deref() == Some("acme")), "{listed:?}");
    assert!(listed.len() >= 2);
    let admin_id = kernel
        .list_keys(&admin)
        .unwrap()
        .into_iter()
        .find(|k| k.tenant.is_none())
        .unwrap()
        .id;
    assert_eq!(code(kernel.revoke_key(&boss, &admin_id).await), ErrorCode::NotFound);
    kernel.revoke_key(&boss, &made.info.id).await.unwrap();
    assert_eq!(code(kernel.authenticate(&made.key)), ErrorCode::Unauthenticated);

    // Rotation: two valid keys while clients switch, then only the new one. Last
    // use shows in the listing.
    let old = kernel.create_key(&boss, of("acme", Role::Reader)).await.unwrap();
    let old_id = old.info.id;
    kernel.authenticate(&old.key).unwrap();
    let used = kernel
        .list_keys(&boss)
        .unwrap()
        .into_iter()
        .find(|k| k.id == old_id)
        .unwrap();
    assert!(used.last_used_at.is_some(), "{used:?}");
    let new = kernel.rotate_key(&boss, &old_id, Some(1)).await.unwrap();
    assert_eq!(
        (new.info.role(), new.info.tenant.as_deref()),
        (Role::Reader, Some("acme"))
    );
    assert!(kernel.authenticate(&old.key).is_ok() && kernel.authenticate(&new.key).is_ok());
    assert_eq!(
        code(kernel.rotate_key(&boss, &admin_id, None).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(kernel.rotate_key(&boss, &old_id, Some(31 * 24 * 3600)).await),
        ErrorCode::InvalidArgument
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        kernel.authenticate(&old.key).unwrap_err().details.unwrap()["reason"],
        "expired"
    );
    assert!(kernel.authenticate(&new.key).is_ok());

    // A key with a time to live stops working when it is up.
    let brief = CreateApiKey {
        ttl_secs: Some(1),
        ..of("acme", Role::Reader)
    };
    let created = kernel.create_key(&admin, brief).await.unwrap();
    assert!(kernel.authenticate(&created.key).is_ok());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let expired = kernel.authenticate(&created.key).unwrap_err();
    assert_eq!(expired.details.unwrap()["reason"], "expired");
    let forever = CreateApiKey {
        ttl_secs: Some(u64::MAX),
        ..of("acme", Role::Reader)
    };
    assert_eq!(
        code(kernel.create_key(&admin, forever).await),
        ErrorCode::InvalidArgument
    );
    kernel.shutdown().await;
}

/// A token's header and claims, base64url-encoded, with `signature`.
fn forged(header: serde_json::Value, claims: &serde_json::Value, signature: &str) -> String {
    use base64::Engine as _;
    let encode = |value: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    };
    format!("{}.{}.{signature}", encode(&header), encode(claims))
}

#[tokio::test]
async fn access_tokens_carry_their_role_and_refuse_every_forgery() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let mine = agent(&kernel, &admin, "acme").await;
    kernel
        .state_set(
            &admin,
            &mine,
            "k".into(),
            SetState {
                value: json!(1),
                if_version: None,
            },
        )
        .await
        .unwrap();
    let request = |role: Role, ttl: u64| bbx_kernel::CreateToken {
        identity: "dashboard".into(),
        tenant: Some("acme".into()),
        role: Some(role),
        ttl_secs: Some(ttl),
        ..Default::default()
    };
    let issued = kernel.create_token(&admin, request(Role::Reader, 600)).unwrap();
    assert_eq!(
        (issued.claims.sub.as_str(), issued.claims.roles.as_slice()),
        ("dashboard", &[Role::Reader][..])
    );
    let bearer = kernel.authenticate(&issued.token).unwrap();
    assert_eq!((bearer.tenant.as_deref(), bearer.role), (Some("acme"), Role::Reader));
    assert_eq!(kernel.state_get(&bearer, &mine, "k").unwrap().value, json!(1));
    let refused = kernel.state_set(
        &bearer,
        &mine,
        "k".into(),
        SetState {
            value: json!(2),
            if_version: None,
        },
    );
    assert_eq!(code(refused.await), ErrorCode::PermissionDenied);
    assert!(kernel.verify_token(&issued.token).valid);

    // The published keys check it, as any JWT library would.
    let jwks = kernel.jwks();
    let published = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_issuer(&["bbx"]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(&issued.token, &published, &validation).unwrap();
    assert_eq!(decoded.claims["tenant"], "acme");

    // Forgeries: a changed signature, alg none, HMAC keyed with the public key.
    let (head, signature) = issued.token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{head}.{flipped}{}", &signature[1..]);
    let claims = serde_json::to_value(&issued.claims).unwrap();
    let none = forged(json!({"alg": "none", "typ": "JWT"}), &claims, "");
    let public = jwks.keys[0].clone();
    let x = match &public.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(okp) => okp.x.clone(),
        other => panic!("an Ed25519 key is published, not {other:?}"),
    };
    let hmac_header = jsonwebtoken::Header {
        kid: public.common.key_id.clone(),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    let confused = jsonwebtoken::encode(
        &hmac_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(x.as_bytes()),
    )
    .unwrap();
    let oversized = "a".repeat(64 * 1024);
    for forgery in [tampered.as_str(), &none, &confused, "not.a.token", &oversized] {
        assert_eq!(
            code(kernel.authenticate(forgery)),
            ErrorCode::Unauthenticated,
            "{forgery:.40}"
        );
        assert!(!kernel.verify_token(forgery).valid);
    }

    // Who may issue: as for keys.
    let reader = key(&kernel, &admin, of("acme", Role::Reader)).await.unwrap();
    assert_eq!(
        code(kernel.create_token(&reader, request(Role::Reader, 60))),
        ErrorCode::PermissionDenied
    );
    let boss = key(&kernel, &admin, of("acme", Role::TenantAdmin)).await.unwrap();
    assert!(kernel.create_token(&boss, request(Role::Operator, 60)).is_ok());
    let elsewhere = bbx_kernel::CreateToken {
        tenant: Some("globex".into()),
        ..request(Role::Reader, 60)
    };
    assert_eq!(code(kernel.create_token(&boss, elsewhere)), ErrorCode::PermissionDenied);
    assert_eq!(
        code(kernel.create_token(&admin, request(Role::Reader, 86_401))),
        ErrorCode::InvalidArgument
    );

    // Revoked: refused until it would have expired, across a restart. Its own
    // bearer may revoke it; a tenant's administrator may revoke only its tenant's.
    let leaked = kernel.create_token(&admin, request(Role::Operator, 600)).unwrap();
    let other_boss = key(&kernel, &admin, of("globex", Role::TenantAdmin)).await.unwrap();
    assert_eq!(
        code(kernel.revoke_token(&other_boss, &leaked.token).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(kernel.revoke_token(&reader, &leaked.token).await),
        ErrorCode::PermissionDenied
    );
    kernel.revoke_token(&boss, &leaked.token).await.unwrap();
    let refused = kernel.authenticate(&leaked.token).unwrap_err();
    assert_eq!(refused.details.unwrap()["reason"], "revoked");
    let mine = kernel.create_token(&admin, request(Role::Reader, 600)).unwrap();
    let me = kernel.authenticate(&mine.token).unwrap();
    kernel.revoke_token(&me, &mine.token).await.unwrap();
    assert!(!kernel.credential_valid(&me), "a session on it ends");

    // A token outlives a restart (the signing keys are durable), not its time.
    let brief = kernel.create_token(&admin, request(Role::Reader, 1)).unwrap();
    kernel.shutdown().await;
    drop(kernel);
    let (kernel, _) = support::open(dir.path()).await;
    assert!(kernel.authenticate(&issued.token).is_ok());
    assert_eq!(
        code(kernel.authenticate(&leaked.token)),
        ErrorCode::Unauthenticated,
        "still revoked"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let expired = kernel.authenticate(&brief.token).unwrap_err();
    assert_eq!(expired.details.unwrap()["reason"], "expired");
    kernel.shutdown().await;
}

#[tokio::test]
async fn credentials_confined_to_op_kinds_submit_those_only() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let mine = agent(&kernel, &admin, "acme").await;
    let op = |kind: &str| SubmitBatch {
        ops: vec![SubmitOp::new(mine, kind, json!({ "ms": 1 }))],
        wait_ms: None,
    };
    let scoped = CreateApiKey {
        kinds: Some(vec!["noop".into(), "sleep".into()]),
        ..of("acme", Role::TenantAdmin)
    };
    let created = kernel.create_key(&admin, scoped).await.unwrap();
    assert_eq!(created.info.kinds, Some(vec!["noop".into(), "sleep".into()]));
    let key = kernel.authenticate(&created.key).unwrap();
    kernel.submit(&key, op("noop")).await.unwrap();
    let refused = kernel.submit(&key, op("state.incr")).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::PermissionDenied);
    assert!(refused.message.contains("noop, sleep"), "{}", refused.message);

    // What it makes stays within its kinds; a token carries them.
    let wider = CreateApiKey {
        kinds: Some(vec!["noop".into(), "tool.shell".into()]),
        ..of("acme", Role::Reader)
    };
    assert_eq!(code(kernel.create_key(&key, wider).await), ErrorCode::PermissionDenied);
    assert_eq!(
        code(kernel.create_key(&key, of("acme", Role::Reader)).await),
        ErrorCode::PermissionDenied,
        "an unconfined key is wider"
    );
    let request = bbx_kernel::CreateToken {
        identity: "svc".into(),
        tenant: Some("acme".into()),
        role: Some(Role::Operator),
        kinds: Some(vec!["sleep".into()]),
        ..Default::default()
    };
    let token = kernel.create_token(&key, request).unwrap();
    assert_eq!(token.claims.kinds, Some(vec!["sleep".into()]));
    let bearer = kernel.authenticate(&token.token).unwrap();
    kernel.submit(&bearer, op("sleep")).await.unwrap();
    assert_eq!(
        code(kernel.submit(&bearer, op("noop")).await),
        ErrorCode::PermissionDenied
    );
}
