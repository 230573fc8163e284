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
