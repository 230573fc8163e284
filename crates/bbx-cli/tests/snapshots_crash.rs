//! StateSnapshots across SIGKILLs: a snapshot cut short is never listed (its
//! op, journaled, is taken again by recovery, whole); a restore cut short is
//! never half-applied (recovery finishes it, state and workspace together).

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::{Kernel, json};

/// Random bytes that do not compress (so a snapshot of them takes a while),
/// the same for the same seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut bytes = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// An agent whose workspace holds 48 MB, and 100 state keys set to `value`.
fn big_agent(kernel: &Kernel, value: &str) -> String {
    let agent = kernel.new_agent();
    let workspace = kernel.data_dir().join("workspaces").join(&agent);
    std::fs::create_dir_all(workspace.join("data")).unwrap();
    for i in 0..3 {
        std::fs::write(workspace.join(format!("data/blob-{i}")), noise(16 << 20, i + 1)).unwrap();
    }
    let ops: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"key":"k{i:03}","value":{value}}}"#))
        .collect();
    for args in &ops {
        json(&kernel.cli(&["ring", "submit", &agent, "state.set", args, "--wait", "--json"]));
    }
    agent
}

/// The 100 keys' values, read in one request (one view of the store).
fn values(kernel: &Kernel, agent: &str) -> Vec<Value> {
    let page = json(&kernel.cli(&["state", "list", agent, "--prefix", "k", "--limit", "1000", "--json"]));
    let values: Vec<Value> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["value"].clone())
        .collect();
    assert_eq!(values.len(), 100, "{page}");
    values
}

fn wait_op(kernel: &Kernel, op: &str) -> Value {
    json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "120000", "--json"]))
}

fn listed(kernel: &Kernel, agent: &str) -> Vec<Value> {
    json(&kernel.cli(&["snapshot", "list", agent, "--json"]))["snapshots"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_snapshot_cut_short_by_sigkill_is_never_listed_and_is_taken_again_whole() {
    let mut kernel = Kernel::start();
    let agent = big_agent(&kernel, "1");
    let submitted = json(&kernel.cli(&["ring", "submit", &agent, "snapshot.create", "{}", "--json"]));
    let op = submitted["op_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(150));
    kernel.crash();
    // What reached the stores may be a part of the snapshot: nothing lists it.
    kernel.restart();
    let done = wait_op(&kernel, &op);
    assert_eq!(done["status"], "ok", "recovery takes the snapshot again: {done}");
    let snapshots = listed(&kernel, &agent);
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let id = snapshots[0]["id"].as_str().unwrap();
    assert_eq!(done["result"]["id"], id);
    let verified = json(&kernel.cli(&["snapshot", "verify", id, "--json"]));
    assert_eq!(verified["ok"], true);
    assert_eq!(
        snapshots[0]["parts"]["files"], 4,
        "a directory and three files: {snapshots:?}"
    );
}

#[test]
fn a_restore_cut_short_by_sigkill_is_never_half_applied() {
    let mut kernel = Kernel::start();
    let agent = big_agent(&kernel, "1");
    let snapshot = json(&kernel.cli(&["snapshot", "create", &agent, "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..100 {
        json(&kernel.cli(&["state", "set", &agent, &format!("k{i:03}"), "2", "--json"]));
    }
    let workspace = kernel.data_dir().join("workspaces").join(&agent);
    std::fs::write(workspace.join("data/blob-0"), b"changed").unwrap();
    std::fs::write(workspace.join("later.txt"), b"after the snapshot").unwrap();

    let args = format!(r#"{{"snapshot":"{snapshot}"}}"#);
    let submitted = json(&kernel.cli(&["ring", "submit", &agent, "snapshot.restore", &args, "--json"]));
    let op = submitted["op_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(100));
    kernel.crash();
    kernel.restart();

    // Until the recovered restore completes, the state is all old or all new.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = values(&kernel, &agent);
        let first = seen[0].clone();
        assert!(seen.iter().all(|v| *v == first), "half restored: {seen:?}");
        let status = json(&kernel.cli(&["ring", "get", &op, "--json"]));
        if status["completion"].is_object()
            || status["status"].is_string() && status["status"] != "pending" && status["status"] != "running"
        {
            break;
        }
        assert!(Instant::now() < deadline, "the restore never completed: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = wait_op(&kernel, &op);
    assert_eq!(done["status"], "ok", "{done}");
    assert!(values(&kernel, &agent).iter().all(|v| *v == 1));
    assert_eq!(
        std::fs::read(workspace.join("data/blob-0")).unwrap(),
        noise(16 << 20, 1)
    );
    assert!(!workspace.join("later.txt").exists());
}
