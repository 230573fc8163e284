//! `bbx bench flow`: FlowIntegrity's check in process: an op decided by a set of
//! 20 rules, an op whose kind no policy concerns, and the taint labelling of a
//! 4 KB args object against 10,000 fingerprints.

use crate::bench::{NanoFigures, time_each};
use crate::cli::{BenchFlowArgs, Cli};
use anyhow::{Result, bail};
use bbx_component::{Component, Submission};
use bbx_core::model::{Agent, AgentStatus};
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, KeyId, OpId};
use bbx_flow::Flow;
use bbx_flow::policy::StoredPolicy;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Serialize)]
struct Report {
    /// `tool.http` decided by 20 rules in 4 policies.
    policy_20_rules: NanoFigures,
    /// `noop`, which no policy concerns.
    unconcerned_kind: NanoFigures,
    taint_4kb_args_10k_fingerprints: NanoFigures,
    /// The injection scenarios under the starter policy: injected calls stopped,
    /// benign calls allowed, and what went the wrong way.
    injection: bbx_flow::injection::Report,
    targets: Targets,
}

#[derive(Serialize)]
struct Targets {
    policy_p99_under_20us: bool,
    unconcerned_p99_under_200ns: bool,
    taint_p99_under_20us: bool,
}

/// The `n`th of 20 rules: each looks at the op, none decides the measured one.
fn rule(n: usize) -> String {
    let condition = match n % 5 {
        0 => format!(r#"input.agent.labels.env == "prod-{n}""#),
        1 => format!(r#"startswith(input.op.args.url, "http://blocked-{n}.example/")"#),
        2 => format!(r#"input.op.args.method == "DELETE"; input.caller.role == "reader-{n}""#),
        3 => format!(r#"some t in input.tainted; t.path == "/never/{n}""#),
        _ => format!(r#"count(input.op.args.body) > {}"#, 1_000_000 + n),
    };
    format!(
        "decision := {{\"action\": \"block\", \"reason\": \"rule {n}\"}} if {{ {} }}\n",
        condition.replace("; ", "\n")
    )
}

/// 20 rules in 4 policies, on the tool kinds.
pub(crate) fn policies() -> Vec<StoredPolicy> {
    (0..4)
        .map(|p| StoredPolicy {
            name: format!("bench-{p}"),
            tenant: None,
            source: format!(
                "package bbx.flow\nkinds := {{\"tool.http\", \"tool.shell\", \"tool.file\", \"tool.mcp\", \"llm.chat\"}}\n{}",
                (0..5).map(|r| rule(p * 5 + r)).collect::<String>()
            ),
            version: 1,
            updated_at: chrono::Utc::now(),
        })
        .collect()
}

pub async fn flow(cli: &Cli, args: &BenchFlowArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    let measure = Duration::from_secs_f64(args.seconds);
    let flow = Flow::with_policies(policies())?;
    let agent = Agent {
        id: AgentId::generate(),
        name: "bench".into(),
        tenant: "bench".into(),
        labels: [("env".to_owned(), "dev".to_owned())].into(),
        status: AgentStatus::Idle,
        created_at: chrono::Utc::now(),
        tools: Default::default(),
    };
    let op_args = json!({ "url": "https://api.example.com/v1/items", "method": "POST", "body": "{\"a\": 1}" });
    let decided = flow.explain(&agent, "tool.http", &op_args, "agent");
    if decided.action != bbx_flow::policy::Action::Allow {
        bail!("the benchmark's rules decided its op: {:?}", decided.decided);
    }
    let policy_20_rules = time_each(measure, || {
        std::hint::black_box(flow.explain(&agent, "tool.http", &op_args, "agent"));
    });

    let caller = bbx_auth::Caller::of_tenant(KeyId::generate(), "bench", bbx_core::model::Role::Agent);
    let noop = SubmitOp::new(agent.id, "noop", json!({}));
    let submission = Submission {
        caller: &caller,
        tenant: "bench",
        op: &noop,
    };
    let mut labels = Vec::new();
    let unconcerned_kind = time_each(measure, || {
        std::hint::black_box(flow.check(&submission, &mut labels).expect("allowed"));
    });

    // 10,000 fingerprints of untrusted pages, then args of 4 KB of other text.
    let source = OpId::generate();
    for page in 0..100 {
        let words: Vec<String> = (0..100)
            .map(|w| format!("https://host-{page}-{w}.example/path token-{page:04}-{w:04}-abcdef"))
            .collect();
        flow.taints()
            .record(agent.id, source, &json!({ "body": words.join(" ") }));
    }
    let text: String = (0..460).map(|i| format!("word{i:04} ")).collect::<String>();
    let args: Value = json!({ "url": "https://api.example.com/v1/items", "body": &text[..4000] });
    let taint_4kb_args_10k_fingerprints = time_each(measure, || {
        std::hint::black_box(flow.taints().tainted(&agent.id, &args));
    });

    let injection = bbx_flow::injection::evaluate(bbx_flow::STARTER_POLICY)?;
    let report = Report {
        injection,
        targets: Targets {
            policy_p99_under_20us: policy_20_rules.p99_ns < 20_000,
            unconcerned_p99_under_200ns: unconcerned_kind.p99_ns < 200,
            taint_p99_under_20us: taint_4kb_args_10k_fingerprints.p99_ns < 20_000,
        },
        policy_20_rules,
        unconcerned_kind,
        taint_4kb_args_10k_fingerprints,
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::bench::print_nano_table(&[
            ("policy_20_rules", &report.policy_20_rules),
            ("unconcerned_kind", &report.unconcerned_kind),
            (
                "taint_4kb_args_10k_fingerprints",
                &report.taint_4kb_args_10k_fingerprints,
            ),
        ]);
        let i = &report.injection;
        println!(
            "injection scenarios ({}), starter policy: {}/{} injected calls stopped, {}/{} benign calls allowed",
            i.scenarios, i.injected_stopped, i.injected_calls, i.benign_allowed, i.benign_calls
        );
        for wrong in &i.wrong {
            println!("  wrong way: {wrong}");
        }
    }
    Ok(())
}
