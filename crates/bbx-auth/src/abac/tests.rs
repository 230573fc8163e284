use super::program::{PolicySet, check_alone};
use super::*;
use crate::rego::engine;
use bbx_core::model::Role;
use bbx_core::{ErrorCode, KeyId};

fn loaded(name: &str, source: &str) -> StoredPolicy {
    StoredPolicy {
        name: name.to_owned(),
        source: source.to_owned(),
        version: 1,
        updated_at: Utc::now(),
    }
}

fn decide(policies: &[StoredPolicy], caller: &Caller, access: &Access<'_>) -> Result<()> {
    PolicySet::build(policies.to_vec()).unwrap().decide(caller, access)
}

const NO_SECRET_KEYS: &str = r#"
package bbx.authz
deny contains "readers may not read keys under secret/" if {
    input.principal.role == "reader"
    startswith(input.resource.key, "secret/")
}
"#;

const PROD_NEEDS_OPERATOR: &str = r#"
package bbx.authz.prod
deny contains {"reason": "only operators act on production agents"} if {
    input.resource.labels.env == "prod"
    input.action.class == "act"
    input.principal.role != "operator"
}
"#;

#[test]
fn a_policy_refuses_by_attribute_and_names_itself() {
    let policies = [loaded("secrets", NO_SECRET_KEYS)];
    let reader = Caller::of_tenant(KeyId::generate(), "t", Role::Reader);
    let mut read = Access::new("state.get", Some(Action::Read), Some("t"));
    read.key = Some("secret/db");
    let refused = decide(&policies, &reader, &read).unwrap_err();
    assert_eq!(refused.code, ErrorCode::PermissionDenied);
    assert!(
        refused
            .message
            .contains("secrets: readers may not read keys under secret/"),
        "{}",
        refused.message
    );
    read.key = Some("public/db");
    assert!(decide(&policies, &reader, &read).is_ok());
    let operator = Caller::of_tenant(KeyId::generate(), "t", Role::Operator);
    read.key = Some("secret/db");
    assert!(decide(&policies, &operator, &read).is_ok());
}

#[test]
fn every_refusing_policy_is_named_and_labels_are_attributes() {
    let policies = [loaded("secrets", NO_SECRET_KEYS), loaded("prod", PROD_NEEDS_OPERATOR)];
    let labels: BTreeMap<String, String> = [("env".to_owned(), "prod".to_owned())].into();
    let agent = Caller::of_tenant(KeyId::generate(), "t", Role::Agent);
    let mut submit = Access::new("op.submit", Some(Action::Act), Some("t"));
    submit.labels = Some(&labels);
    let refused = decide(&policies, &agent, &submit).unwrap_err();
    assert!(
        refused
            .message
            .contains("prod: only operators act on production agents"),
        "{}",
        refused.message
    );
    assert!(!refused.message.contains("secrets:"));
    let staging: BTreeMap<String, String> = [("env".to_owned(), "staging".to_owned())].into();
    submit.labels = Some(&staging);
    assert!(decide(&policies, &agent, &submit).is_ok());
}

#[test]
fn policies_that_cannot_work_are_refused() {
    let cases = [
        ("package bbx.authz\ndeny contains x if {", "parse"),
        ("package other\ndeny contains \"x\" if { true }", "package"),
        ("package bbx.authz\nallow := true", "no deny rule"),
        ("package bbx.authz\ndeny := 7", "fails on a sample"),
        (
            "package bbx.authz\nx := 1\nx := 2\ndeny contains \"y\" if { x > 0 }",
            "is refused",
        ),
    ];
    for (source, why) in cases {
        let e = check_alone("bad", source).map(drop).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{source}");
        assert!(e.message.contains("policy bad is refused"), "{source}: {}", e.message);
        if why != "parse" {
            assert!(e.message.contains(why), "{source}: {}", e.message);
        }
    }
}

#[test]
fn a_policy_that_errs_on_a_request_refuses_it() {
    // Fine on the samples (no labels there); on a request whose label asks for a
    // billion steps it runs out of its budget.
    let source = r#"
package bbx.authz
deny contains "x" if {
    n := to_number(input.resource.labels.size)
    some i in numbers.range(1, n)
    some j in numbers.range(1, n)
    some k in numbers.range(1, n)
    i + j + k < 0
}
"#;
    let policies = [loaded("flaky", source)];
    let labels: BTreeMap<String, String> = [("size".to_owned(), "1000".to_owned())].into();
    let caller = Caller::of_tenant(KeyId::generate(), "t", Role::Operator);
    let mut access = Access::new("op.submit", Some(Action::Act), Some("t"));
    access.labels = Some(&labels);
    let refused = decide(&policies, &caller, &access).unwrap_err();
    assert_eq!(refused.code, ErrorCode::PermissionDenied);
    assert!(refused.message.contains("could not decide"), "{}", refused.message);
}

#[test]
fn the_context_carries_time_and_source() {
    let source = r#"
package bbx.authz
deny contains "not from there" if { input.context.source == "10.0.0.9" }
deny contains "no time" if { not input.context.unix }
"#;
    let policies = [loaded("context", source)];
    let mut caller = Caller::of_tenant(KeyId::generate(), "t", Role::Operator);
    let access = Access::new("agent.list", Some(Action::Read), Some("t"));
    assert!(decide(&policies, &caller, &access).is_ok());
    caller.source = Some("10.0.0.9".to_owned());
    let refused = decide(&policies, &caller, &access).unwrap_err();
    assert!(refused.message.contains("not from there"), "{}", refused.message);
}

#[test]
fn ordinary_policies_run_on_the_vm_and_decide_as_the_interpreter() {
    let set = PolicySet::build(vec![
        loaded("secrets", NO_SECRET_KEYS),
        loaded("prod", PROD_NEEDS_OPERATOR),
    ])
    .unwrap();
    assert!(set.on_vm());
}

#[test]
fn two_policies_may_not_share_a_package() {
    let twin = NO_SECRET_KEYS.replace("readers may not", "nor may they");
    let e = PolicySet::build(vec![loaded("one", NO_SECRET_KEYS), loaded("two", &twin)])
        .map(drop)
        .unwrap_err();
    assert!(
        e.message
            .contains("policy two is refused: policy one already has its package"),
        "{}",
        e.message
    );
}

#[test]
#[ignore]
fn profile_costs() {
    let caller = Caller::of_tenant(KeyId::generate(), "t", Role::Reader);
    let labels: BTreeMap<String, String> = [("env".to_owned(), "dev".to_owned())].into();
    let mut access = Access::new("state.get", Some(Action::Read), Some("t"));
    access.labels = Some(&labels);
    access.key = Some("notes/x");
    let time = |name: &str, f: &mut dyn FnMut()| {
        for _ in 0..200 {
            f();
        }
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            f();
        }
        println!("{name}: {:?}", t.elapsed() / 2000);
    };
    time("input json", &mut || {
        std::hint::black_box(access.input(&caller, Utc::now()));
    });
    time("input value", &mut || {
        std::hint::black_box(regorus::Value::from(access.input(&caller, Utc::now())));
    });
    let rule = |n: usize| format!("deny contains \"r{n}\" if {{ input.resource.labels.env == \"prod-{n}\" }}\n");
    let one: String = (0..1).map(rule).collect();
    let twenty: String = (0..20).map(rule).collect();
    for (name, src) in [("1 rule", one), ("20 rules", twenty)] {
        let set = PolicySet::build(vec![loaded("p", &format!("package bbx.authz\n{src}"))]).unwrap();
        time(&format!("set {name}"), &mut || {
            set.decide(&caller, &access).unwrap();
        });
        let mut engine = engine();
        engine
            .add_policy("p.rego".into(), format!("package bbx.authz\n{src}"))
            .unwrap();
        let entry: regorus::Rc<str> = "data.bbx.authz.deny".into();
        let compiled = engine.compile_with_entrypoint(&entry).unwrap();
        let input = regorus::Value::from(access.input(&caller, Utc::now()));
        time(&format!("compiled {name}"), &mut || {
            std::hint::black_box(compiled.eval_with_input(input.clone()).unwrap());
        });
        engine.set_input(input.clone());
        time(&format!("engine eval_rule {name}"), &mut || {
            std::hint::black_box(engine.eval_rule("data.bbx.authz.deny".into()).unwrap());
        });
        let program =
            regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &["data.bbx.authz.deny"])
                .unwrap();
        let mut vm = regorus::rvm::vm::RegoVM::new();
        vm.load_program(program.clone());
        time(&format!("rvm {name}"), &mut || {
            vm.set_input(input.clone());
            std::hint::black_box(vm.execute().unwrap());
        });
        time(&format!("engine clone+eval {name}"), &mut || {
            let mut e = engine.clone();
            e.set_input(input.clone());
            std::hint::black_box(e.eval_rule("data.bbx.authz.deny".into()).unwrap());
        });
    }
}
