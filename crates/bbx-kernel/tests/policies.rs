//! Custom authorization policies (ABAC in Rego): they refuse by the principal's,
//! the resource's and the request's attributes, never widen a role, survive a
//! restart, and a policy that cannot work is refused while the one in force stays.

mod support;

use bbx_core::ErrorCode;
use bbx_core::model::{CreateAgent, CreateApiKey, Role, SetState};
use bbx_core::op::{SubmitBatch, SubmitOp};
use bbx_core::{AgentId, Result};
use bbx_kernel::{AuditKind, AuditQuery, Caller, Kernel};
use serde_json::json;
use std::collections::BTreeMap;

async fn agent(kernel: &Kernel, caller: &Caller, env: &str) -> AgentId {
    let req = CreateAgent {
        name: "a".into(),
        tenant: Some("acme".into()),
        labels: Some(BTreeMap::from([("env".to_owned(), env.to_owned())])),
        ..Default::default()
    };
    kernel.create_agent(caller, req).await.unwrap().id
}

async fn key(kernel: &Kernel, admin: &Caller, role: Role) -> Caller {
    key_for(kernel, admin, role, None).await
}

async fn key_for(kernel: &Kernel, admin: &Caller, role: Role, agent: Option<AgentId>) -> Caller {
    let req = CreateApiKey {
        name: "k".into(),
        tenant: Some("acme".into()),
        role: Some(role),
        agent,
        ..Default::default()
    };
    let created = kernel.create_key(admin, req).await.unwrap();
    kernel.authenticate(&created.key).unwrap()
}

fn set(value: serde_json::Value) -> SetState {
    SetState {
        value,
        if_version: None,
    }
}

fn code<T: std::fmt::Debug>(result: Result<T>) -> ErrorCode {
    result.unwrap_err().code
}

const PROD: &str = r#"
package bbx.authz.prod
deny contains "only operators change production agents" if {
    input.resource.labels.env == "prod"
    input.action.class == "act"
    input.principal.role != "operator"
}
deny contains "no shell on production agents" if {
    input.resource.labels.env == "prod"
    input.action.op_kind == "shell.exec"
}
"#;

const READERS: &str = r#"
package bbx.authz
deny contains "readers stay out of keys under private/" if {
    input.principal.role == "reader"
    startswith(input.resource.key, "private/")
}
"#;

#[tokio::test]
async fn policies_refuse_by_attributes_and_never_widen_a_role() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let prod = agent(&kernel, &admin, "prod").await;
    let dev = agent(&kernel, &admin, "dev").await;
    let tenant_admin = key(&kernel, &admin, Role::TenantAdmin).await;
    let operator = key(&kernel, &admin, Role::Operator).await;
    let reader = key(&kernel, &admin, Role::Reader).await;

    assert_eq!(
        code(kernel.put_policy(&tenant_admin, "prod", PROD.into()).await),
        ErrorCode::PermissionDenied,
        "policies are the administrator's"
    );
    let stored = kernel.put_policy(&admin, "prod", PROD.into()).await.unwrap();
    assert_eq!(stored.version, 1);
    kernel.put_policy(&admin, "readers", READERS.into()).await.unwrap();

    let refused = kernel
        .state_set(&tenant_admin, &prod, "k".into(), set(json!(1)))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::PermissionDenied);
    assert!(
        refused
            .message
            .contains("prod: only operators change production agents"),
        "{}",
        refused.message
    );
    kernel
        .state_set(&tenant_admin, &dev, "k".into(), set(json!(1)))
        .await
        .unwrap();
    kernel
        .state_set(&operator, &prod, "private/x".into(), set(json!(2)))
        .await
        .unwrap();
    let shell = |agent| SubmitBatch {
        ops: vec![SubmitOp::new(agent, "shell.exec", json!({ "argv": ["true"] }))],
        wait_ms: None,
    };
    let refused = kernel.submit(&operator, shell(prod)).await.unwrap_err();
    assert!(
        refused.message.contains("no shell on production agents"),
        "{}",
        refused.message
    );
    assert_eq!(refused.code, ErrorCode::PermissionDenied);

    assert_eq!(
        code(kernel.state_get(&reader, &prod, "private/x")),
        ErrorCode::PermissionDenied
    );
    assert_eq!(kernel.state_get(&operator, &prod, "private/x").unwrap().value, json!(2));
    assert_eq!(
        code(kernel.state_set(&reader, &dev, "public".into(), set(json!(3))).await),
        ErrorCode::PermissionDenied,
        "a policy that refuses nothing leaves the role's refusal"
    );

    let rules = kernel.auth_rules(&reader).unwrap();
    let names: Vec<&str> = rules["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["prod", "readers"]);
    assert!(
        rules["policies"][0].get("source").is_none(),
        "only administrators read sources"
    );
    assert!(kernel.auth_rules(&admin).unwrap()["policies"][0]["source"].is_string());

    // Audit events are written off the caller's path; a shutdown waits for them.
    kernel.shutdown().await;
    drop(kernel);
    let (kernel, admin) = support::open(dir.path()).await;
    let tenant_admin = kernel.authenticate(&tenant_admin_key(&kernel, &admin).await).unwrap();
    assert_eq!(
        code(kernel.state_set(&tenant_admin, &prod, "k".into(), set(json!(1))).await),
        ErrorCode::PermissionDenied,
        "policies survive a restart"
    );
    let changes = kernel
        .audit_events(
            &admin,
            &AuditQuery {
                kind: Some(AuditKind::PolicyChanged),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");

    kernel.delete_policy(&admin, "prod").await.unwrap();
    kernel
        .state_set(&tenant_admin, &prod, "k".into(), set(json!(1)))
        .await
        .unwrap();
    assert_eq!(code(kernel.delete_policy(&admin, "prod").await), ErrorCode::NotFound);
}

async fn tenant_admin_key(kernel: &Kernel, admin: &Caller) -> String {
    let req = CreateApiKey {
        name: "again".into(),
        tenant: Some("acme".into()),
        role: Some(Role::TenantAdmin),
        ..Default::default()
    };
    kernel.create_key(admin, req).await.unwrap().key
}

#[tokio::test]
async fn a_policy_that_cannot_work_is_refused_and_the_one_in_force_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = support::open(dir.path()).await;
    let prod = agent(&kernel, &admin, "prod").await;
    let agent_key = key_for(&kernel, &admin, Role::Agent, Some(prod)).await;
    kernel.put_policy(&admin, "prod", PROD.into()).await.unwrap();
    for broken in [
        "package bbx.authz.prod\ndeny contains",
        "package elsewhere\ndeny contains \"x\" if { true }",
        "package bbx.authz.prod\ndeny := 7",
    ] {
        let refused = kernel.put_policy(&admin, "prod", broken.into()).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidArgument, "{broken}");
    }
    let rules = kernel.auth_rules(&admin).unwrap();
    assert_eq!(rules["policies"][0]["version"], 1);
    assert_eq!(rules["policies"][0]["source"], PROD);
    assert_eq!(
        code(kernel.state_set(&agent_key, &prod, "k".into(), set(json!(1))).await),
        ErrorCode::PermissionDenied,
        "the policy in force still decides"
    );
}
