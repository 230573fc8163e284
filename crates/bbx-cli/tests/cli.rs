//! The `bbx` command against a real kernel: the issue's contract, and failures.

mod support;

use serde_json::json;
use std::io::Write as _;
use std::process::Command;
use support::{BBX, Kernel, json, stderr, stdout};

#[test]
fn agent_and_state_contract_holds_across_a_restart() {
    let mut kernel = Kernel::start();
    let agent = json(&kernel.cli(&["agent", "create", "planner", "--label", "team=ml", "--json"]));
    let id = agent["id"]
        .as_str()
        .expect("agent create --json prints an id")
        .to_owned();
    assert_eq!(agent["labels"], json!({ "team": "ml" }));

    let value = r#"{"plan":["read","write"],"n":3}"#;
    let set = kernel.cli(&["state", "set", &id, "plan/current", value]);
    assert!(set.status.success(), "{}", stderr(&set));
    let got = json(&kernel.cli(&["state", "get", &id, "plan/current", "--json"]));
    assert_eq!(got["value"], serde_json::from_str::<serde_json::Value>(value).unwrap());

    let (clean, _) = kernel.stop();
    assert!(clean);
    kernel.restart();
    let got = json(&kernel.cli(&["state", "get", &id, "plan/current", "--json"]));
    assert_eq!(got["value"]["plan"], json!(["read", "write"]));
    assert_eq!(got["version"], 1);

    for i in 0..4 {
        json(&kernel.cli(&["agent", "create", &format!("extra-{i}"), "--json"]));
    }
    let paged = json(&kernel.cli(&["agent", "list", "--limit", "2", "--all", "--json"]));
    assert_eq!(
        paged["agents"].as_array().unwrap().len(),
        5,
        "--all follows every cursor"
    );
    assert!(paged["next_cursor"].is_null());

    let mut piped = std::process::Command::new(BBX)
        .args(["--url", &kernel.url(), "--data-dir"])
        .arg(kernel.data_dir())
        .args(["state", "set", &id, "from/stdin", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(piped.stdin.as_mut().unwrap(), br#"{"big": [1, 2, 3]}"#).unwrap();
    assert!(piped.wait_with_output().unwrap().status.success());
    let got = json(&kernel.cli(&["state", "get", &id, "from/stdin", "--json"]));
    assert_eq!(got["value"]["big"], json!([1, 2, 3]));

    let listed = json(&kernel.cli(&["agent", "list", "--label", "team=ml", "--json"]));
    assert_eq!(listed["agents"][0]["id"], id.as_str());
    let page = json(&kernel.cli(&["state", "list", &id, "--prefix", "plan/", "--json"]));
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);

    let cas = kernel.cli(&["state", "set", &id, "plan/current", "1", "--if-version", "7"]);
    assert!(!cas.status.success());
    assert!(stderr(&cas).contains("version_conflict"), "{}", stderr(&cas));

    assert!(kernel.cli(&["state", "delete", &id, "plan/current"]).status.success());
    assert!(kernel.cli(&["agent", "delete", &id]).status.success());
    let gone = kernel.cli(&["agent", "get", &id]);
    assert!(!gone.status.success());

    let status = json(&kernel.cli(&["status", "--json"]));
    let alias = json(&kernel.cli(&["v2", "status", "--json"]));
    assert_eq!(status["agents"], 4, "only the planner was deleted");
    assert_eq!(alias["listen"], status["listen"]);
}

/// A failing command prints exactly one line on stderr and exits non-zero.
fn assert_one_line_failure(output: &std::process::Output, needle: &str) {
    assert!(!output.status.success());
    let err = stderr(output);
    assert_eq!(err.trim_end().lines().count(), 1, "more than one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(stdout(output).is_empty());
}

#[test]
fn failures_are_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.key"), "bbx_x_y\n").unwrap();
    let run = |args: &[&str]| {
        Command::new(BBX)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("BBX_API_KEY")
            .output()
            .unwrap()
    };
    let port = support::free_port();
    let nobody = format!("http://127.0.0.1:{port}");
    assert_one_line_failure(&run(&["--url", &nobody, "status"]), "no BBX kernel answers");
    assert_one_line_failure(&run(&["--url", "not a url", "agent", "list"]), "not an http(s) URL");
    assert_one_line_failure(&run(&["--url", &nobody, "mcp"]), "no BBX kernel answers");
    assert_one_line_failure(
        &run(&["bench", "api", "--set-rate", "0"]),
        "--set-rate must be a positive number",
    );
    assert_one_line_failure(
        &run(&["bench", "api", "--seconds", "NaN"]),
        "--seconds must be a positive number",
    );

    let kernel = Kernel::start();
    assert_one_line_failure(&kernel.cli(&["agent", "get", "../../etc"]), "invalid_id");
    assert_one_line_failure(&kernel.cli(&["agent", "create", ""]), "invalid_argument");
    assert_one_line_failure(&kernel.cli(&["agent", "create", "x", "--label", "nokey"]), "key=value");
    let a = json(&kernel.cli(&["agent", "create", "a", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_one_line_failure(&kernel.cli(&["state", "set", &a, "k", "{not json"]), "must be JSON");
    assert_one_line_failure(&kernel.cli(&["state", "get", &a, "missing"]), "not_found");
    assert_one_line_failure(&kernel.cli(&["--api-key", "bbx_nope", "status"]), "unauthenticated");
}

#[test]
fn config_show_layers_file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bbx.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9001\"\nmax_body_bytes = 4096\ncommit_max_batch = 8\n",
    )
    .unwrap();
    let show = |env: &[(&str, &str)], flags: &[&str]| {
        let mut cmd = Command::new(BBX);
        cmd.args(["config", "show", "--json", "--config"])
            .arg(&file)
            .args(flags);
        for var in [
            "BBX_LISTEN",
            "BBX_MAX_BODY_BYTES",
            "BBX_COMMIT_MAX_BATCH",
            "BBX_DATA_DIR",
            "BBX_LOG",
            "BBX_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        json(&cmd.output().unwrap())
    };
    let from_file = show(&[], &[]);
    assert_eq!(from_file["listen"], "127.0.0.1:9001");
    assert_eq!(from_file["max_body_bytes"], 4096);
    let from_env = show(&[("BBX_LISTEN", "127.0.0.1:9002"), ("BBX_COMMIT_MAX_BATCH", "16")], &[]);
    assert_eq!(from_env["listen"], "127.0.0.1:9002");
    assert_eq!(from_env["commit_max_batch"], 16);
    assert_eq!(from_env["max_body_bytes"], 4096);
    let from_flag = show(&[("BBX_LISTEN", "127.0.0.1:9002")], &["--listen", "127.0.0.1:9003"]);
    assert_eq!(from_flag["listen"], "127.0.0.1:9003");

    std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let typo = Command::new(BBX)
        .args(["config", "show", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_one_line_failure(&typo, "unknown field");
}

#[test]
fn completions_and_serve_refusing_a_taken_port() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BBX).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        assert!(stdout(&out).contains("state"), "{shell}");
    }
    let kernel = Kernel::start();
    let other = tempfile::tempdir().unwrap();
    let taken = Command::new(BBX)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", kernel.port), "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    assert_one_line_failure(&taken, "cannot listen");
    // A second kernel on the same data directory is refused, not allowed to corrupt
    // it: it must not even recover the journal, which would cut what looks like a
    // torn tail but is a record the running kernel is writing.
    let mut segments: Vec<_> = std::fs::read_dir(kernel.data_dir().join("journal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a journal segment").clone();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap()
        .write_all(b"torn")
        .unwrap();
    let length = std::fs::metadata(&last).unwrap().len();
    let same_dir = Command::new(BBX)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", support::free_port()),
            "--data-dir",
        ])
        .arg(kernel.data_dir())
        .output()
        .unwrap();
    assert_one_line_failure(&same_dir, "in use by another BBX kernel");
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        length,
        "the refused kernel cut the journal"
    );
}

#[test]
fn bench_api_runs_end_to_end_and_reports_every_figure() {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(BBX)
        .args([
            "bench",
            "api",
            "--json",
            "--seconds",
            "0.3",
            "--cold-starts",
            "1",
            "--set-clients",
            "4",
        ])
        .args(["--get-clients", "4", "--set-rate", "200", "--scratch-dir"])
        .arg(scratch.path())
        .env_remove("BBX_URL")
        .output()
        .unwrap();
    let report = json(&out);
    for phase in ["fdatasync", "set", "set_paced", "get_max", "get_half_load"] {
        let figures = &report[phase];
        assert!(figures["ops"].as_u64().unwrap() > 0, "{phase}: {figures}");
        assert!(
            figures["p50_us"].as_u64().unwrap() <= figures["p99_us"].as_u64().unwrap(),
            "{phase}"
        );
    }
    assert!(report["get_max"]["kernel_p99_us_at_most"].is_u64(), "{report}");
    assert!(report["set_paced"]["generator_lag_p99_us"].is_u64(), "{report}");
    assert!(report["cold_start_ms"]["median"].as_f64().unwrap() > 0.0);
    assert!(report["writes_per_sync"].as_f64().unwrap() >= 1.0);
}

#[test]
fn a_lost_admin_key_can_be_reset_offline() {
    let mut kernel = Kernel::start();
    let old_key = kernel.key();
    let refused = kernel.cli(&["key", "reset-admin"]);
    assert_one_line_failure(&refused, "in use by another BBX kernel");

    let (clean, _) = kernel.stop();
    assert!(clean);
    std::fs::remove_file(kernel.data_dir().join("admin.key")).unwrap();
    let reset = json(&kernel.cli(&["key", "reset-admin", "--json"]));
    assert!(reset["admin_key_file"].as_str().unwrap().ends_with("admin.key"));
    kernel.restart();
    let new_key = kernel.key();
    assert_ne!(new_key, old_key);
    assert!(kernel.cli(&["status"]).status.success(), "the new key works");
    let keys = json(&kernel.cli(&["key", "list", "--json"]));
    assert_eq!(
        keys.as_array().unwrap().len(),
        2,
        "the old key is kept, to be revoked by its owner"
    );
}

#[test]
fn a_corrupt_journal_stops_the_kernel_until_an_operator_repairs_it() {
    let mut kernel = Kernel::start();
    let agent = json(&kernel.cli(&["agent", "create", "j", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 0..3 {
        let value = format!(r#"{{"key":"k{n}","value":{n}}}"#);
        let out = kernel.cli(&["ring", "submit", &agent, "state.set", &value, "--wait"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(kernel.stop().0);

    // Flip a byte inside the first record: intact records follow it, so this is not
    // a torn tail but corruption, and the kernel must not guess.
    let journal = kernel.data_dir().join("journal");
    let segment = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[30] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();

    let serve = Command::new(BBX)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(kernel.data_dir())
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(stderr(&serve).contains("bbx journal repair"), "{}", stderr(&serve));

    let verify = kernel.cli(&["journal", "verify"]);
    assert!(!verify.status.success());
    assert!(stdout(&verify).contains("CORRUPT"), "{}", stdout(&verify));
    let repair = kernel.cli(&["journal", "repair", "--json"]);
    assert!(repair.status.success(), "{}", stderr(&repair));
    assert_eq!(json(&repair)["repaired"], true);
    assert!(kernel.cli(&["journal", "verify"]).status.success());
    kernel.restart();
    assert!(kernel.cli(&["ring", "stats"]).status.success());
}

#[test]
fn bench_auth_runs_end_to_end_and_reports_every_scenario() {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(BBX)
        .args(["bench", "auth", "--json", "--seconds", "0.05", "--scratch-dir"])
        .arg(scratch.path())
        .env_remove("BBX_URL")
        .output()
        .unwrap();
    let report = json(&out);
    let scenarios = [
        "api_key",
        "token_first_use",
        "token_cached",
        "api_key_with_20_rules",
        "reference_sha256",
    ];
    assert_figures(&report, &scenarios);
    assert!(report["targets"]["token_cached_p99_under_5us"].is_boolean());
    assert_eq!(report["token_first_use"]["ops"], 1000, "every token made is used once");
    assert_eq!(report["rules_on_vm"], true);
}

/// Each scenario of `report` measured something, with p50 <= p99.
fn assert_figures(report: &serde_json::Value, scenarios: &[&str]) {
    for scenario in scenarios {
        let figures = &report[scenario];
        assert!(figures["ops"].as_u64().unwrap() > 0, "{scenario}: {figures}");
        let (p50, p99) = (figures["p50_ns"].as_u64().unwrap(), figures["p99_ns"].as_u64().unwrap());
        assert!(0 < p50 && p50 <= p99, "{scenario}: {figures}");
    }
}

#[test]
fn bench_flow_runs_end_to_end_and_reports_every_scenario() {
    let out = Command::new(BBX)
        .args(["bench", "flow", "--json", "--seconds", "0.05"])
        .output()
        .unwrap();
    let report = json(&out);
    assert_figures(
        &report,
        &["policy_20_rules", "unconcerned_kind", "taint_4kb_args_10k_fingerprints"],
    );
    assert!(report["targets"]["taint_p99_under_20us"].is_boolean());
}

#[test]
fn bench_ring_runs_end_to_end_and_reports_every_scenario() {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(BBX)
        .args([
            "bench",
            "ring",
            "--json",
            "--seconds",
            "0.3",
            "--durable-submitters",
            "16",
            "--inproc-submitters",
            "2",
        ])
        .args([
            "--http-clients",
            "4",
            "--http-single-clients",
            "2",
            "--no-isolate",
            "--scratch-dir",
        ])
        .arg(scratch.path())
        .env_remove("BBX_URL")
        .output()
        .unwrap();
    let report = json(&out);
    for scenario in [
        "inproc",
        "durable",
        "fsync_ceiling",
        "fsync_ceiling_preallocated",
        "http_batch",
        "http_single",
    ] {
        let figures = &report[scenario];
        assert!(figures["ops_per_sec"].as_f64().unwrap() > 0.0, "{scenario}: {figures}");
        for field in ["p50_us", "p99_us", "p999_us"] {
            assert!(figures[field].as_u64().unwrap() > 0, "{scenario}.{field}: {figures}");
        }
    }
    assert!(report["durable_records_per_sync"].as_f64().unwrap() >= 1.0);
    assert!(report["durable_journal_busy"].as_f64().unwrap() > 0.0);
    let syncs = ["durable_sync_p50_us", "durable_sync_p99_us", "durable_sync_max_us"]
        .map(|field| report[field].as_u64().unwrap());
    assert!(
        syncs[0] > 0 && syncs[0] <= syncs[1] && syncs[1] <= syncs[2],
        "{syncs:?}"
    );
    assert_eq!(report["http_single_clients"], 2);
    assert_eq!(report["inproc_submitters"], 2);
    // No --journal-nice and the default config: the writer keeps the nice value
    // it inherits, this test's own (field 19 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let own_nice: i64 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(report["durable_journal_writer_nice"], own_nice, "{report}");
    // The committer takes the default 10, or keeps this test's own if that is higher.
    assert_eq!(report["durable_committer_nice"], own_nice.max(10), "{report}");
    assert!(report["targets"].is_object());

    for (flag, value) in [
        ("--inproc-submitters", "0"),
        ("--journal-nice", "5"),
        ("--committer-nice", "20"),
    ] {
        let refused = Command::new(BBX).args(["bench", "ring", flag, value]).output().unwrap();
        assert!(!refused.status.success());
        assert!(stderr(&refused).contains(flag), "{}", stderr(&refused));
    }
}
