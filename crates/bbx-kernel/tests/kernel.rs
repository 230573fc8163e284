//! The kernel against a real data directory: durability, CAS, paging, tenancy.

mod support;

use bbx_core::ErrorCode;
use bbx_core::api::prelude::*;
use bbx_core::model::{CreateAgent, CreateApiKey, ListAgents, ListState, SetState};
use bbx_kernel::{Caller, Kernel, Session};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

async fn open(dir: &Path) -> (std::sync::Arc<Kernel>, Session) {
    let (kernel, admin) = support::open(dir).await;
    let session = kernel.session(admin);
    (kernel, session)
}

fn agent(name: &str) -> CreateAgent {
    CreateAgent {
        name: name.into(),
        ..Default::default()
    }
}

fn set(value: serde_json::Value, if_version: Option<u64>) -> SetState {
    SetState { value, if_version }
}

#[tokio::test]
async fn agents_and_state_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let first_key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let mode = std::fs::metadata(dir.path().join("admin.key")).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

    let a = api.create_agent(agent("planner")).await.unwrap();
    api.state_set(a.id, "plan/step".into(), set(json!({"n": 1, "items": [1, 2]}), None))
        .await
        .unwrap();
    kernel.shutdown().await;
    drop((kernel, api));

    let (kernel, api) = open(dir.path()).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin.key")).unwrap(),
        first_key,
        "no second admin key"
    );
    assert_eq!(api.get_agent(a.id).await.unwrap(), a);
    let entry = api.state_get(a.id, "plan/step".into()).await.unwrap();
    assert_eq!(entry.value, json!({"n": 1, "items": [1, 2]}));
    assert_eq!(entry.version, 1);
    assert_eq!(api.status().await.unwrap().agents, 1);
    kernel.shutdown().await;
}

#[tokio::test]
async fn concurrent_cas_has_exactly_one_winner_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let a = api.create_agent(agent("counter")).await.unwrap();
    api.state_set(a.id, "n".into(), set(json!(0), Some(0))).await.unwrap();

    // 100 clients race to move version 1 to version 2; then again from 2 to 3.
    for round in 1..=2u64 {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let api = api.clone();
                tokio::spawn(async move { api.state_set(a.id, "n".into(), set(json!(i), Some(round))).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(entry) => {
                    assert_eq!(entry.version, round + 1);
                    wins += 1;
                }
                Err(e) => assert_eq!(e.code, ErrorCode::VersionConflict),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    assert_eq!(api.state_get(a.id, "n".into()).await.unwrap().version, 3);
    let stale = api
        .state_set(a.id, "n".into(), set(json!("late"), Some(1)))
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::VersionConflict);
    assert_eq!(stale.details.unwrap()["actual"], 3);
    kernel.shutdown().await;
}

#[tokio::test]
async fn deleting_an_agent_deletes_its_state_and_only_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let doomed = api.create_agent(agent("doomed")).await.unwrap();
    let kept = api.create_agent(agent("kept")).await.unwrap();
    for i in 0..50 {
        api.state_set(doomed.id, format!("k{i}"), set(json!(i), None))
            .await
            .unwrap();
    }
    api.state_set(kept.id, "k0".into(), set(json!("mine"), None))
        .await
        .unwrap();
    api.delete_agent(doomed.id).await.unwrap();

    assert_eq!(api.get_agent(doomed.id).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(
        api.state_get(doomed.id, "k0".into()).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    // Ops were checked against the agent before (its tenant is cached): no longer.
    let noop = bbx_core::op::SubmitBatch {
        ops: vec![bbx_core::op::SubmitOp::new(doomed.id, "noop", json!(null))],
        wait_ms: None,
    };
    assert_eq!(api.submit_ops(noop).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(api.state_get(kept.id, "k0".into()).await.unwrap().value, json!("mine"));
    assert_eq!(api.status().await.unwrap().agents, 1);
    // A second delete is a 404.
    assert_eq!(api.delete_agent(doomed.id).await.unwrap_err().code, ErrorCode::NotFound);
    kernel.shutdown().await;
}

#[tokio::test]
async fn listing_pages_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let mut made = Vec::new();
    for i in 0..7 {
        let labels = BTreeMap::from([("team".to_string(), if i % 2 == 0 { "ml" } else { "ops" }.to_string())]);
        let tenant = if i < 5 { "acme" } else { "globex" };
        let req = CreateAgent {
            name: format!("a{i}"),
            tenant: Some(tenant.into()),
            labels: Some(labels),
            tools: None,
        };
        made.push(api.create_agent(req).await.unwrap().id);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = api
            .list_agents(ListAgents {
                limit: Some(3),
                cursor,
                ..Default::default()
            })
            .await
            .unwrap();
        seen.extend(page.agents.iter().map(|a| a.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, made, "pages cover every agent once, oldest first");

    let acme = api
        .list_agents(ListAgents {
            tenant: Some("acme".into()),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(acme.agents.iter().map(|a| a.id).collect::<Vec<_>>(), made[..2]);
    let rest = api
        .list_agents(ListAgents {
            tenant: Some("acme".into()),
            cursor: acme.next_cursor,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.agents.iter().map(|a| a.id).collect::<Vec<_>>(), made[2..5]);
    assert!(rest.next_cursor.is_none());

    let ml = api
        .list_agents(ListAgents {
            label: Some("team=ml".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ml.agents.len(), 4);
    let bad = api
        .list_agents(ListAgents {
            limit: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::InvalidArgument);
    let bad = api
        .list_agents(ListAgents {
            cursor: Some("../x".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::InvalidArgument);

    let a = made[0];
    for key in ["notes/b", "notes/a", "notes/c", "other", "notes"] {
        api.state_set(a, key.into(), set(json!(key), None)).await.unwrap();
    }
    let page = api
        .state_list(
            a,
            ListState {
                prefix: Some("notes/".into()),
                limit: Some(2),
                cursor: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["notes/a", "notes/b"]
    );
    let page = api
        .state_list(
            a,
            ListState {
                prefix: Some("notes/".into()),
                limit: Some(2),
                cursor: page.next_cursor,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["notes/c"]
    );
    assert!(page.next_cursor.is_none());
    kernel.shutdown().await;
}

#[tokio::test]
async fn tenant_keys_are_confined_and_revoked_keys_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = open(dir.path()).await;
    let theirs = admin
        .create_agent(CreateAgent {
            name: "x".into(),
            tenant: Some("globex".into()),
            labels: None,
            tools: None,
        })
        .await
        .unwrap();
    let created = kernel
        .create_key(
            admin.caller(),
            CreateApiKey {
                name: "acme-ci".into(),
                tenant: Some("acme".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let acme: Caller = kernel.authenticate(&created.key).unwrap();
    let acme_api = kernel.session(acme.clone());

    let mine = acme_api.create_agent(agent("mine")).await.unwrap();
    assert_eq!(mine.tenant, "acme");
    // Private networks and the kernel's environment are the operator's to open.
    for tools in [
        bbx_core::quota::ToolSettings {
            allow_networks: vec!["169.254.0.0/16".into()],
            ..Default::default()
        },
        bbx_core::quota::ToolSettings {
            env_allow: vec!["OPENAI_API_KEY".into()],
            ..Default::default()
        },
    ] {
        let refused = acme_api
            .create_agent(CreateAgent {
                name: "greedy".into(),
                tools: Some(tools),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::PermissionDenied);
    }
    // Another tenant's agent is answered exactly as one that does not exist.
    let missing = acme_api.get_agent(bbx_core::AgentId::generate()).await.unwrap_err();
    for foreign in [
        acme_api.get_agent(theirs.id).await.unwrap_err(),
        acme_api.state_get(theirs.id, "k".into()).await.unwrap_err(),
        acme_api.delete_agent(theirs.id).await.unwrap_err(),
    ] {
        assert_eq!(foreign.code, ErrorCode::NotFound);
        assert!(!format!("{foreign:?}").contains("globex"), "{foreign:?}");
        assert_eq!(
            foreign.details.as_ref().unwrap()["kind"],
            missing.details.as_ref().unwrap()["kind"]
        );
    }
    // A tenant it names itself is refused with 403, and not named back.
    let elsewhere = acme_api
        .create_agent(CreateAgent {
            name: "y".into(),
            tenant: Some("globex".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code, ErrorCode::PermissionDenied);
    let status = acme_api.status().await.unwrap();
    assert_eq!(status.agents, 1, "a tenant key counts its own tenant's agents");
    assert!(
        status.data_dir.is_none() && status.storage.is_none(),
        "no host details for tenant keys"
    );
    assert_eq!(admin.status().await.unwrap().agents, 2);
    let listed = acme_api.list_agents(ListAgents::default()).await.unwrap();
    assert_eq!(listed.agents.iter().map(|a| a.id).collect::<Vec<_>>(), [mine.id]);
    assert_eq!(kernel.list_keys(&acme).unwrap_err().code, ErrorCode::PermissionDenied);

    kernel.revoke_key(admin.caller(), &created.info.id).await.unwrap();
    let err = kernel.authenticate(&created.key).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    assert_eq!(err.details.unwrap()["reason"], "revoked");
    kernel.shutdown().await;
    drop((kernel, admin, acme_api));

    // Revocation is durable.
    let (kernel, _) = open(dir.path()).await;
    assert!(kernel.authenticate(&created.key).is_err());
    kernel.shutdown().await;
}

#[tokio::test]
async fn invalid_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    for bad in [
        agent(""),
        agent(&"n".repeat(10_000)),
        agent("bell\u{7}"),
        CreateAgent {
            name: "x".into(),
            tenant: Some("../etc".into()),
            labels: None,
            tools: None,
        },
        CreateAgent {
            name: "x".into(),
            tools: Some(bbx_core::quota::ToolSettings {
                allow_networks: vec!["not-a-network".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
    ] {
        assert_eq!(
            api.create_agent(bad).await.unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }
    let a = api.create_agent(agent("a")).await.unwrap();
    assert_eq!(
        api.state_set(a.id, String::new(), set(json!(1), None))
            .await
            .unwrap_err()
            .code,
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        api.state_set(a.id, "k\n".into(), set(json!(1), None))
            .await
            .unwrap_err()
            .code,
        ErrorCode::InvalidArgument
    );
    let big = json!("x".repeat(2 * 1024 * 1024));
    assert_eq!(
        api.state_set(a.id, "big".into(), set(big, None))
            .await
            .unwrap_err()
            .code,
        ErrorCode::PayloadTooLarge
    );
    assert_eq!(
        api.state_delete(a.id, "missing".into(), None).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    assert_eq!(api.status().await.unwrap().agents, 1);
    assert!(
        api.state_list(a.id, ListState::default())
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    kernel.shutdown().await;
}

#[tokio::test]
async fn every_acknowledged_write_was_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let a = api.create_agent(agent("synced")).await.unwrap();
    let before = api.status().await.unwrap().storage.unwrap();
    let journal_before = kernel.wal_status(api.caller()).await.unwrap();
    // One at a time, each write is alone in its group, so each costs one journal
    // append and fdatasync.
    for i in 0..10 {
        api.state_set(a.id, format!("k{i}"), set(json!(i), None)).await.unwrap();
    }
    let after = api.status().await.unwrap().storage.unwrap();
    let journal_after = kernel.wal_status(api.caller()).await.unwrap();
    assert_eq!(after.writes_committed - before.writes_committed, 10);
    assert_eq!(after.syncs - before.syncs, 10);
    assert_eq!(journal_after.syncs_total - journal_before.syncs_total, 10);
    assert_eq!(journal_after.records_total - journal_before.records_total, 10);
    assert!(journal_after.sync_micros_total > journal_before.sync_micros_total);

    // Concurrent writers share syncs: 200 writes take fewer than 200 syncs.
    let writers: Vec<_> = (0..200)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move { api.state_set(a.id, format!("c{i}"), set(json!(i), None)).await })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let concurrent = api.status().await.unwrap().storage.unwrap();
    assert_eq!(concurrent.writes_committed - after.writes_committed, 200);
    assert!(
        concurrent.syncs - after.syncs < 200,
        "no group commit: {} syncs",
        concurrent.syncs - after.syncs
    );
    kernel.shutdown().await;
}

#[tokio::test]
async fn the_last_admin_key_cannot_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin) = open(dir.path()).await;
    let err = kernel
        .revoke_key(admin.caller(), &admin.caller().key_id)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
    let second = kernel
        .create_key(
            admin.caller(),
            CreateApiKey {
                name: "second".into(),
                tenant: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    kernel.revoke_key(admin.caller(), &admin.caller().key_id).await.unwrap();
    assert!(kernel.authenticate(&second.key).unwrap().is_admin());
    kernel.shutdown().await;
}

#[tokio::test]
async fn deleted_keys_disappear_and_cursors_stay_inside_their_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let a = api.create_agent(agent("a")).await.unwrap();
    for key in ["a/1", "a/2", "b/1"] {
        api.state_set(a.id, key.into(), set(json!(key), None)).await.unwrap();
    }
    api.state_delete(a.id, "a/1".into(), None).await.unwrap();
    assert_eq!(
        api.state_get(a.id, "a/1".into()).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let page = api.state_list(a.id, ListState::default()).await.unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["a/2", "b/1"]
    );
    // Re-created after a delete, a key continues its versions.
    assert_eq!(
        api.state_set(a.id, "a/1".into(), set(json!(0), Some(0)))
            .await
            .unwrap()
            .version,
        2
    );

    // Many deleted keys cost a page a bounded scan, and listing still reaches the end.
    for i in 0..1500 {
        api.state_set(a.id, format!("d/{i:04}"), set(json!(i), None))
            .await
            .unwrap();
        api.state_delete(a.id, format!("d/{i:04}"), None).await.unwrap();
    }
    api.state_set(a.id, "d/zz".into(), set(json!("last"), None))
        .await
        .unwrap();
    let mut found = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let req = ListState {
            prefix: Some("d/".into()),
            limit: Some(10),
            cursor: cursor.take(),
        };
        let page = api.state_list(a.id, req).await.unwrap();
        pages += 1;
        found.extend(page.entries.into_iter().map(|e| e.key));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(found, ["d/zz"]);
    assert!(pages >= 2, "the tombstones were scanned in bounded pages");

    let outside = hex_cursor("a/");
    let req = ListState {
        prefix: Some("b/".into()),
        limit: None,
        cursor: Some(outside),
    };
    assert_eq!(
        api.state_list(a.id, req).await.unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    kernel.shutdown().await;
}

fn hex_cursor(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

async fn wait_for_purges(kernel: &Kernel) {
    for _ in 0..1000 {
        if kernel.pending_purges().unwrap() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the purge of deleted agents' state did not finish");
}

#[tokio::test]
async fn a_large_agent_is_deleted_at_once_and_its_state_purged_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let big = api.create_agent(agent("big")).await.unwrap();
    let writers: Vec<_> = (0..50)
        .map(|w| {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    api.state_set(big.id, format!("k{w}/{i}"), set(json!(i), None))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    api.delete_agent(big.id).await.unwrap();
    assert_eq!(
        api.get_agent(big.id).await.unwrap_err().code,
        ErrorCode::NotFound,
        "gone at once"
    );
    assert_eq!(
        api.state_get(big.id, "k0/0".into()).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    kernel.shutdown().await;
    drop((kernel, api));

    // Whatever the purge had done before the shutdown, the next start finishes it.
    let (kernel, api) = open(dir.path()).await;
    wait_for_purges(&kernel).await;
    assert_eq!(api.status().await.unwrap().agents, 0);
    kernel.shutdown().await;
}

#[tokio::test]
async fn a_rare_label_reads_a_bounded_number_of_agents_per_page() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let mut creating = tokio::task::JoinSet::new();
    for chunk in 0..10 {
        let api = api.clone();
        creating.spawn(async move {
            for i in 0..bbx_kernel::LIST_SCAN_BUDGET / 10 {
                api.create_agent(agent(&format!("plain-{chunk}-{i}"))).await.unwrap();
            }
        });
    }
    creating.join_all().await;
    let rare = api
        .create_agent(CreateAgent {
            name: "rare".into(),
            labels: Some(BTreeMap::from([("team".to_string(), "rare".to_string())])),
            ..Default::default()
        })
        .await
        .unwrap();
    let filter = |cursor| ListAgents {
        label: Some("team=rare".into()),
        cursor,
        ..Default::default()
    };
    // The first page reads its budget, finds nothing, and says where to go on.
    let first = api.list_agents(filter(None)).await.unwrap();
    assert!(first.agents.is_empty());
    let cursor = first.next_cursor.expect("a cursor past the agents read");
    let second = api.list_agents(filter(Some(cursor))).await.unwrap();
    assert_eq!(second.agents.iter().map(|a| a.id).collect::<Vec<_>>(), [rare.id]);
    assert!(second.next_cursor.is_none());
    kernel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_quota_updates_of_different_limits_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, api) = open(dir.path()).await;
    let node = bbx_core::quota::Node::Tenant("acme".into());
    let mut updates = tokio::task::JoinSet::new();
    for i in 0..32u32 {
        let (api, node) = (api.clone(), node.clone());
        updates.spawn(async move {
            // Each task sets one limit of its own, never touched by the others.
            let update = match i % 4 {
                0 => bbx_core::quota::QuotaLimits {
                    requests_per_second: Some(100 + i),
                    ..Default::default()
                },
                1 => bbx_core::quota::QuotaLimits {
                    tool_calls_per_minute: Some(100 + i),
                    ..Default::default()
                },
                2 => bbx_core::quota::QuotaLimits {
                    concurrent_ops: Some(100 + i),
                    ..Default::default()
                },
                _ => bbx_core::quota::QuotaLimits {
                    pids: Some(100 + i),
                    ..Default::default()
                },
            };
            api.set_quota(node, update).await.unwrap();
        });
    }
    updates.join_all().await;
    let limits = api.quota(node.clone()).await.unwrap().limits;
    let all_set = |limits: &bbx_core::quota::QuotaLimits| {
        limits.requests_per_second.is_some()
            && limits.tool_calls_per_minute.is_some()
            && limits.concurrent_ops.is_some()
            && limits.pids.is_some()
    };
    assert!(all_set(&limits), "{limits:?}");
    kernel.shutdown().await;
    drop((kernel, api));
    // What was stored last is what was in force last.
    let (kernel, api) = open(dir.path()).await;
    assert_eq!(api.quota(node).await.unwrap().limits, limits);
    kernel.shutdown().await;
}
