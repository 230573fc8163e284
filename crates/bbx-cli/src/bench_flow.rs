//! `bbx bench flow`: FlowIntegrity's check in process: an op decided by a set of
//! 20 rules, an op whose kind no policy concerns (with anomaly detection off, and
//! on), the taint labelling of a 4 KB args
//! object against 10,000 fingerprints, and an op scored by an agent's anomaly
//! model; then the injection scenarios and the anomaly detector's evaluation.

use crate::bench::{NanoFigures, time_each};
use crate::cli::{BenchFlowArgs, Cli};
use anyhow::{Result, bail};
use bbx_component::{Component, Submission};
use bbx_core::config::{AnomalyConfig, FlowConfig};
use bbx_core::model::{Agent, AgentStatus};
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, KeyId, OpId};
use bbx_flow::Flow;
use bbx_flow::anomaly::Observation;
use bbx_flow::policy::StoredPolicy;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Serialize)]
struct Report {
    /// `tool.http` decided by 20 rules in 4 policies.
    policy_20_rules: NanoFigures,
    /// `noop`, which no policy concerns, with anomaly detection off.
    unconcerned_kind: NanoFigures,
    /// The same with anomaly detection on, each op learned from (its agent has
    /// no model yet; no budget).
    unconcerned_kind_learning: NanoFigures,
    /// The same, the agent past its `max_ops_per_sec` (so: unobserved).
    unconcerned_kind_over_budget: NanoFigures,
    taint_4kb_args_10k_fingerprints: NanoFigures,
    /// An op scored by its agent's model (observation, features, score, learning).
    anomaly_score: NanoFigures,
    /// The detector on traces of four agent profiles with misbehaviour injected,
    /// one evaluation per seed.
    anomaly_evaluation: Vec<bbx_flow::anomaly::evaluate::Evaluation>,
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
    anomaly_score_p99_under_10us: bool,
    /// In every evaluation.
    anomaly_auc_at_least_0_9: bool,
    anomaly_false_positives_at_most_1_percent: bool,
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
            bundle: None,
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
    let anomaly_off = FlowConfig {
        anomaly: AnomalyConfig {
            enabled: false,
            ..AnomalyConfig::default()
        },
    };
    let flow = Flow::with_policies(&anomaly_off, policies())?;
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
    let decided = flow.explain(&agent, "tool.http", &op_args, "agent", None);
    if decided.action != bbx_flow::policy::Action::Allow {
        bail!("the benchmark's rules decided its op: {:?}", decided.decided);
    }
    let policy_20_rules = time_each(measure, || {
        std::hint::black_box(flow.explain(&agent, "tool.http", &op_args, "agent", None));
    });

    let caller = bbx_auth::Caller::of_tenant(KeyId::generate(), "bench", bbx_core::model::Role::Agent);
    let noop = SubmitOp::new(agent.id, "noop", json!({}));
    let submission = Submission {
        op_id: OpId::generate(),
        caller: &caller,
        tenant: "bench",
        op: &noop,
        references: &[],
    };
    let mut labels = Vec::new();
    let unconcerned_kind = time_each(measure, || {
        std::hint::black_box(flow.check(&submission, &mut labels).expect("allowed"));
    });
    let mut unlimited = FlowConfig::default();
    unlimited.anomaly.max_ops_per_sec = u32::MAX;
    let learning = Flow::with_policies(&unlimited, policies())?;
    let unconcerned_kind_learning = time_each(measure, || {
        std::hint::black_box(learning.check(&submission, &mut labels).expect("allowed"));
    });
    let budgeted = Flow::with_policies(&FlowConfig::default(), policies())?;
    let unconcerned_kind_over_budget = time_each(measure, || {
        std::hint::black_box(budgeted.check(&submission, &mut labels).expect("allowed"));
    });

    let anomaly = AnomalyConfig::default();
    let (detector, modelled, model) = bbx_flow::anomaly::evaluate::trained(&anomaly, 1);
    if model.is_none() {
        bail!("the anomaly benchmark's agent has no model after its learning ops");
    }
    let get = json!({ "url": "https://arxiv.org/abs/2501.00001", "method": "GET" });
    let mut at_ms = chrono::Utc::now().timestamp_millis();
    let anomaly_score = time_each(measure, || {
        at_ms += 3_000;
        let observation = Observation::of("tool.http", &get, at_ms);
        std::hint::black_box(detector.submitted(&modelled, OpId::generate(), &observation));
    });
    let anomaly_evaluation: Vec<_> = [42, 7, 1234]
        .into_iter()
        .map(|seed| bbx_flow::anomaly::evaluate::evaluate(&anomaly, seed, (1500, 1000)))
        .collect();

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
        std::hint::black_box(flow.taints().tainted(agent.id, &args));
    });

    let injection = bbx_flow::injection::evaluate(bbx_flow::STARTER_POLICY)?;
    let report = Report {
        injection,
        targets: Targets {
            policy_p99_under_20us: policy_20_rules.p99_ns < 20_000,
            unconcerned_p99_under_200ns: unconcerned_kind.p99_ns < 200,
            taint_p99_under_20us: taint_4kb_args_10k_fingerprints.p99_ns < 20_000,
            anomaly_score_p99_under_10us: anomaly_score.p99_ns < 10_000,
            anomaly_auc_at_least_0_9: anomaly_evaluation.iter().all(|e| e.auc >= 0.9),
            anomaly_false_positives_at_most_1_percent: anomaly_evaluation.iter().all(|e| e.false_positive_rate <= 0.01),
        },
        policy_20_rules,
        unconcerned_kind,
        unconcerned_kind_learning,
        unconcerned_kind_over_budget,
        taint_4kb_args_10k_fingerprints,
        anomaly_score,
        anomaly_evaluation,
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::bench::print_nano_table(&[
            ("policy_20_rules", &report.policy_20_rules),
            ("unconcerned_kind", &report.unconcerned_kind),
            ("unconcerned_kind_learning", &report.unconcerned_kind_learning),
            ("unconcerned_kind_over_budget", &report.unconcerned_kind_over_budget),
            (
                "taint_4kb_args_10k_fingerprints",
                &report.taint_4kb_args_10k_fingerprints,
            ),
            ("anomaly_score", &report.anomaly_score),
        ]);
        for e in &report.anomaly_evaluation {
            println!(
                "anomaly evaluation: {} ops scored ({} injected): AUC {:.3}, precision {:.3}, recall {:.3}; clean ops flagged {:.2}% of {}",
                e.scored_ops,
                e.injected_ops,
                e.auc,
                e.precision,
                e.recall,
                e.false_positive_rate * 100.0,
                e.clean_ops
            );
        }
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
