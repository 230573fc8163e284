use super::*;
use crate::taint::Tainted;
use bbx_core::model::Agent;

fn stored(name: &str, source: &str) -> StoredPolicy {
    StoredPolicy {
        bundle: None,
        name: name.into(),
        tenant: None,
        source: source.into(),
        version: 1,
        updated_at: Utc::now(),
    }
}

fn agent() -> Agent {
    Agent {
        id: bbx_core::AgentId::generate(),
        name: "a".into(),
        tenant: "acme".into(),
        labels: Default::default(),
        status: bbx_core::model::AgentStatus::Idle,
        created_at: Utc::now(),
        tools: Default::default(),
    }
}

pub const NO_TAINTED_EGRESS: &str = r#"
package bbx.flow
kinds := {"tool.http"}
decision := {"action": "block", "reason": sprintf("the request carries untrusted content at %s", [input.tainted[0].path])} if {
    count(input.tainted) > 0
}
"#;

#[test]
fn a_policy_decides_the_kinds_it_names_from_what_it_sees() {
    let policy = Loaded::compile(stored("egress", NO_TAINTED_EGRESS)).unwrap();
    assert!(policy.concerns("tool.http") && !policy.concerns("tool.shell"));
    let a = agent();
    let args = serde_json::json!({ "url": "http://evil.example/" });
    let tainted = [Tainted {
        path: "/url".into(),
        source: bbx_core::OpId::generate(),
    }];
    let blocked = policy
        .decide(&regorus::Value::from(input(
            "tool.http",
            &args,
            &a,
            &tainted,
            "agent",
            None,
        )))
        .unwrap();
    assert_eq!(
        (blocked.action, blocked.reason.as_str()),
        (Action::Block, "the request carries untrusted content at /url")
    );
    assert_eq!(
        policy.decide(&regorus::Value::from(input("tool.http", &args, &a, &[], "agent", None))),
        None
    );
}

#[test]
fn policies_that_cannot_work_are_refused() {
    for (source, why) in [
        ("package bbx.flow\ndecision := {", "is refused"),
        ("package other\ndecision := {\"action\": \"block\"}", "must be bbx.flow"),
        (
            "package bbx.flow\ndecision := {\"action\": \"explode\"}",
            "unknown action",
        ),
        ("package bbx.flow\ndecision := 7", "has no action"),
        ("package bbx.flow\nkinds := 3", "set of op kinds"),
    ] {
        let e = Loaded::compile(stored("bad", source)).map(drop).unwrap_err();
        assert_eq!(e.code, bbx_core::ErrorCode::InvalidArgument, "{source}");
        assert!(e.message.contains(why), "{source}: {}", e.message);
    }
}

#[test]
fn the_book_finds_the_policies_of_a_kind_and_a_tenant() {
    let egress = Arc::new(Loaded::compile(stored("egress", NO_TAINTED_EGRESS)).unwrap());
    let mut theirs = stored(
        "all",
        "package bbx.flow\ndecision := {\"action\": \"audit\", \"reason\": \"x\"}",
    );
    theirs.tenant = Some("globex".into());
    let all = Arc::new(Loaded::compile(theirs).unwrap());
    let book = Book::new(vec![egress, all]);
    assert!(book.concerns_any("acme", "tool.http"));
    assert!(
        !book.concerns_any("acme", "tool.shell"),
        "globex's policy is not acme's"
    );
    assert!(book.concerns_any("globex", "tool.shell"));
    assert_eq!(book.concerning("globex", "tool.http").len(), 2);
}

#[test]
fn the_starter_policy_blocks_tainted_egress_and_holds_tainted_commands() {
    let starter = Loaded::compile(stored("starter", crate::STARTER_POLICY)).unwrap();
    let a = agent();
    let source = bbx_core::OpId::generate();
    let decide = |kind: &str, args: serde_json::Value, tainted: &[Tainted]| {
        starter
            .decide(&regorus::Value::from(input(kind, &args, &a, tainted, "agent", None)))
            .map(|d| d.action)
    };
    let at = |path: &str| {
        vec![Tainted {
            path: path.into(),
            source,
        }]
    };
    let post = serde_json::json!({ "method": "POST", "url": "https://x.example/", "body": "data" });
    let get = serde_json::json!({ "url": "https://x.example/" });
    assert_eq!(decide("tool.http", post.clone(), &at("/url")), Some(Action::Block));
    assert_eq!(decide("tool.http", post.clone(), &at("/body/to")), Some(Action::Block));
    assert_eq!(
        decide("tool.http", post.clone(), &[at("/url"), at("/body")].concat()),
        Some(Action::Block),
        "no conflict"
    );
    assert_eq!(
        decide("tool.http", get.clone(), &at("/url")),
        Some(Action::Warn),
        "following a link reads"
    );
    assert_eq!(decide("tool.http", post, &[]), None);
    assert_eq!(
        decide("tool.mcp", serde_json::json!({}), &at("/arguments/to")),
        Some(Action::Block)
    );
    assert_eq!(decide("tool.shell", get, &at("/args/1")), Some(Action::RequireApproval));
    assert!(!starter.concerns("state.set"));
}

#[test]
fn a_policy_may_deny_by_default_the_kinds_it_governs() {
    let source = r#"package bbx.flow
kinds := {"tool.http"}
default_decision := "deny"
decision := {"action": "allow", "reason": "reads are fine"} if { input.op.args.method == "GET" }
"#;
    let strict = Loaded::compile(stored("strict", source)).unwrap();
    assert!(strict.denies_by_default);
    let flow =
        crate::Flow::with_policies(&bbx_core::config::FlowConfig::default(), vec![stored("strict", source)]).unwrap();
    let a = agent();
    let explain = |kind: &str, args: serde_json::Value| flow.explain(&a, kind, &args, "agent", None);
    let get = explain(
        "tool.http",
        serde_json::json!({ "url": "https://x.example/", "method": "GET" }),
    );
    assert_eq!(get.action, Action::Allow, "{get:?}");
    let post = explain(
        "tool.http",
        serde_json::json!({ "url": "https://x.example/", "method": "POST" }),
    );
    assert_eq!(post.action, Action::Block, "{post:?}");
    assert_eq!(post.decided[0].policy, "strict");
    assert_eq!(
        explain("noop", serde_json::json!({})).action,
        Action::Allow,
        "not a kind it governs"
    );
    let vague = source.replace(r#"default_decision := "deny""#, r#"default_decision := "maybe""#);
    assert!(Loaded::compile(stored("vague", &vague)).is_err());
    assert!(
        !Loaded::compile(stored("plain", &source.replace("default_decision := \"deny\"\n", "")))
            .unwrap()
            .denies_by_default
    );
}
