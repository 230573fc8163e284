//! The component contract from a component's side: a component registered with
//! the kernel starts after recovery and submits ops of its own through the whole
//! pipeline, hears of deleted agents, and an agent's data goes out and back in
//! through the components that hold it.

use bbx_component::{Component, Context, OpKind, Prepared};
use bbx_core::api::prelude::*;
use bbx_core::config::{ConfigLayer, KernelConfig};
use bbx_core::model::{CreateAgent, ListState, SetState};
use bbx_core::op::{OpState, SubmitBatch, SubmitOp};
use bbx_core::{AgentId, ErrorCode, Result};
use bbx_kernel::{Caller, Kernel};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A component with no kinds of its own that, once started, submits a `noop` for
/// the agent named in its mailbox, and notes the agents it hears were deleted.
#[derive(Default)]
struct Watcher {
    deleted: Mutex<Vec<AgentId>>,
    submitted: Mutex<Option<tokio::sync::oneshot::Sender<Result<OpState>>>>,
    mailbox: Mutex<Option<(Caller, AgentId)>>,
}

impl Component for Watcher {
    fn name(&self) -> &'static str {
        "watcher"
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        let Some((caller, agent)) = self.mailbox.lock().take() else {
            return Ok(());
        };
        let reply = self.submitted.lock().take().expect("a reply channel");
        let submitter = ctx.submitter.clone();
        ctx.tasks.spawn(async move {
            let batch = SubmitBatch {
                ops: vec![SubmitOp::new(agent, "noop", json!({}))],
                wait_ms: None,
            };
            let done = async {
                let id = submitter.submit(&caller, batch).await?.ops[0].op_id;
                Ok(submitter.wait(&caller, id, Duration::from_secs(30)).await?.state)
            };
            let _ = reply.send(done.await);
        });
        Ok(())
    }

    fn agent_deleted(&self, _: &Context, agent: AgentId) {
        self.deleted.lock().push(agent);
    }
}

fn config(dir: &Path) -> KernelConfig {
    let over = ConfigLayer {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    KernelConfig::resolve(ConfigLayer::default(), over).unwrap()
}

async fn new_agent(kernel: &Kernel, caller: &Caller) -> AgentId {
    let agent = CreateAgent {
        name: "a".into(),
        ..Default::default()
    };
    kernel.create_agent(caller, agent).await.unwrap().id
}

/// A caller of another tenant.
fn outsider() -> Caller {
    Caller::of_tenant(bbx_core::KeyId::generate(), "other", bbx_core::model::Role::TenantAdmin)
}

fn admin(kernel: &Kernel, dir: &Path) -> Caller {
    let token = std::fs::read_to_string(dir.join(bbx_kernel::ADMIN_KEY_FILE)).unwrap();
    kernel.authenticate(token.trim()).unwrap()
}

#[tokio::test]
async fn a_component_submits_through_the_pipeline_and_hears_of_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = Kernel::open(config(dir.path())).await.unwrap().kernel;
    let caller = admin(&kernel, dir.path());
    let agent = new_agent(&kernel, &caller).await;
    kernel.shutdown().await;
    drop(kernel);

    // Started again with the watcher, which submits as soon as it starts.
    let watcher = Arc::new(Watcher::default());
    let (reply, submitted) = tokio::sync::oneshot::channel();
    *watcher.submitted.lock() = Some(reply);
    *watcher.mailbox.lock() = Some((caller.clone(), agent));
    let kernel = Kernel::open_with(config(dir.path()), vec![watcher.clone()])
        .await
        .unwrap()
        .kernel;
    let state = tokio::time::timeout(Duration::from_secs(30), submitted)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.unwrap(), OpState::Done);

    // The pipeline's checks hold for a component as for anyone: another tenant's
    // caller is refused at the door.
    let outsider = outsider();
    let ctx_submit = kernel
        .submit(
            &outsider,
            SubmitBatch {
                ops: vec![SubmitOp::new(agent, "noop", json!({}))],
                wait_ms: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(ctx_submit.code, ErrorCode::NotFound);

    kernel.delete_agent(&caller, &agent).await.unwrap();
    assert_eq!(*watcher.deleted.lock(), vec![agent]);
    kernel.shutdown().await;
}

#[tokio::test]
async fn an_agents_data_goes_out_and_back_in_whole() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = Kernel::open(config(dir.path())).await.unwrap().kernel;
    let caller = admin(&kernel, dir.path());
    let api = kernel.session(caller.clone());
    let agent = api
        .create_agent(CreateAgent {
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let set = |value: Value| SetState {
        value,
        if_version: None,
    };
    api.state_set(agent, "kept".into(), set(json!(1))).await.unwrap();
    api.state_set(agent, "changed".into(), set(json!("before")))
        .await
        .unwrap();
    api.state_set(agent, "gone".into(), set(json!([1, 2]))).await.unwrap();
    api.state_delete(agent, "gone".into(), None).await.unwrap();
    let exported = kernel.export_agent(&caller, &agent).unwrap();
    assert_eq!(exported.parts.len(), 1, "only the state component holds data");
    assert_eq!(exported.parts[0].1.len(), 2, "tombstones are not exported");

    let changed_before = api.state_get(agent, "changed".into()).await.unwrap().version;
    api.state_set(agent, "changed".into(), set(json!("after")))
        .await
        .unwrap();
    api.state_set(agent, "added".into(), set(json!(true))).await.unwrap();
    kernel.import_agent(&caller, exported.clone()).await.unwrap();

    let listed = api.state_list(agent, ListState::default()).await.unwrap();
    let keys: Vec<(&str, &Value)> = listed.entries.iter().map(|e| (e.key.as_str(), &e.value)).collect();
    assert_eq!(keys, [("changed", &json!("before")), ("kept", &json!(1))]);
    let changed = api.state_get(agent, "changed".into()).await.unwrap();
    assert!(
        changed.version > changed_before + 1,
        "a restored key's version moves on past every version a client saw"
    );

    // A part for a component that does not exist is refused, and changes nothing.
    let mut foreign = exported.clone();
    foreign.parts.push(("nobody".into(), Vec::new()));
    let refused = kernel.import_agent(&caller, foreign).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidArgument);
    // Another tenant's caller cannot read or write the agent's data.
    let outsider = outsider();
    assert_eq!(
        kernel.export_agent(&outsider, &agent).unwrap_err().code,
        ErrorCode::NotFound
    );
    let refused = kernel.import_agent(&outsider, exported).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::NotFound);

    // The import survives a restart like any write.
    kernel.shutdown().await;
    drop((kernel, api));
    let kernel = Kernel::open(config(dir.path())).await.unwrap().kernel;
    let api = kernel.session(caller);
    assert_eq!(
        api.state_get(agent, "changed".into()).await.unwrap().value,
        json!("before")
    );
    assert_eq!(
        api.state_get(agent, "added".into()).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    kernel.shutdown().await;
}

/// Holds ops whose args name a hold (for that many milliseconds), refuses those
/// whose args say `refuse`, and labels those whose args name a taint.
struct Gatekeeper;

impl Component for Gatekeeper {
    fn name(&self) -> &'static str {
        "gatekeeper"
    }

    fn checks_ops(&self) -> bool {
        true
    }

    fn check(
        &self,
        submission: &bbx_component::Submission<'_>,
        labels: &mut Vec<String>,
    ) -> Result<bbx_component::Verdict> {
        let args = &submission.op.args;
        if let Some(taint) = args.get("taint").and_then(Value::as_str) {
            labels.push(format!("taint:{taint}"));
        }
        if args.get("refuse").is_some() {
            return Err(bbx_core::Error::new(
                ErrorCode::PolicyDenied,
                "the gatekeeper refuses it",
            ));
        }
        Ok(match args.get("hold_ms").and_then(Value::as_u64) {
            Some(ms) => bbx_component::Verdict::Hold {
                reason: "the gatekeeper wants a look".into(),
                within: Duration::from_millis(ms),
            },
            None => bbx_component::Verdict::Allow,
        })
    }
}

async fn submit_noop(kernel: &Kernel, caller: &Caller, agent: AgentId, args: Value) -> Result<bbx_core::OpId> {
    let batch = SubmitBatch {
        ops: vec![SubmitOp::new(agent, "noop", args)],
        wait_ms: None,
    };
    Ok(kernel.submit(caller, batch).await?.ops[0].op_id)
}

#[tokio::test]
async fn a_held_op_runs_once_approved_and_never_if_denied_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Kernel::open_with(config(dir.path()), vec![Arc::new(Gatekeeper)]);
    let kernel = open().await.unwrap().kernel;
    let caller = admin(&kernel, dir.path());
    let agent = new_agent(&kernel, &caller).await;
    let state = |kernel: &Kernel, id| kernel.op(&caller, &id).unwrap().state;
    let wait = |kernel: Arc<Kernel>, id| {
        let caller = caller.clone();
        async move {
            kernel
                .wait_op(&caller, &id, Duration::from_secs(30))
                .await
                .unwrap()
                .completion
                .unwrap()
        }
    };

    let approved = submit_noop(&kernel, &caller, agent, json!({ "hold_ms": 600_000 }))
        .await
        .unwrap();
    let denied = submit_noop(&kernel, &caller, agent, json!({ "hold_ms": 600_000 }))
        .await
        .unwrap();
    let survives = submit_noop(&kernel, &caller, agent, json!({ "hold_ms": 600_000 }))
        .await
        .unwrap();
    let expires = submit_noop(&kernel, &caller, agent, json!({ "hold_ms": 300 }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(&kernel, approved), OpState::PendingApproval);

    // Only a caller who sees the op may decide, and only while it is held.
    let outsider = outsider();
    let refused = kernel.approve_op(&outsider, &approved).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::NotFound);

    kernel.approve_op(&caller, &approved).await.unwrap();
    assert_eq!(
        wait(kernel.clone(), approved).await.status,
        bbx_core::op::CompletionStatus::Ok
    );
    let again = kernel.approve_op(&caller, &approved).await.unwrap_err();
    assert_eq!(again.code, ErrorCode::FailedPrecondition);

    kernel.deny_op(&caller, &denied, "not today").await.unwrap();
    let done = wait(kernel.clone(), denied).await;
    assert_eq!(done.error.unwrap().code, ErrorCode::PolicyDenied);
    let done = wait(kernel.clone(), expires).await;
    let error = done.error.unwrap();
    assert_eq!(error.code, ErrorCode::PolicyDenied);
    assert!(error.message.contains("not approved in time"), "{}", error.message);

    // A refusal refuses the whole batch, and journals nothing of it.
    let refused = submit_noop(&kernel, &caller, agent, json!({ "refuse": true }))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::PolicyDenied);

    // The hold is durable: after a restart the op is still waiting, then runs once approved.
    kernel.shutdown().await;
    drop(kernel);
    let kernel = open().await.unwrap().kernel;
    assert_eq!(state(&kernel, survives), OpState::PendingApproval);
    kernel.approve_op(&caller, &survives).await.unwrap();
    assert_eq!(
        wait(kernel.clone(), survives).await.status,
        bbx_core::op::CompletionStatus::Ok
    );
    kernel.shutdown().await;
}

const STAMPS: bbx_store::KeyspaceDef = bbx_store::KeyspaceDef {
    id: 200,
    name: "stamps",
};

/// Serves `stamp.put`, whose effect writes its op's labels into a keyspace of the
/// component's own, and `stamp.get`, which reads them back; labels what `sleep`
/// returns; and notes every completion it sees.
#[derive(Default)]
struct Stamper {
    seen: Mutex<Vec<bbx_core::OpId>>,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct StampArgs {
    agent_id: String,
}

#[derive(Debug)]
struct StampPut;

/// Reads the stamp, or fails with the message it was given.
#[derive(Debug)]
struct StampGet(Option<String>);

impl bbx_component::EffectOp for StampPut {
    fn stage(&self, tx: &mut bbx_store::GroupTx<'_>, staging: &bbx_component::Staging<'_>) -> Result<Value> {
        tx.put(
            STAMPS,
            staging.agent.as_bytes().to_vec(),
            staging.labels.join(",").into_bytes(),
        );
        Ok(Value::Null)
    }
}

impl bbx_component::ReadOp for StampGet {
    fn read(&self, store: &bbx_store::Store, agent: &AgentId) -> Result<Value> {
        use fjall::Readable;
        if let Some(message) = &self.0 {
            return Err(bbx_core::Error::new(ErrorCode::ToolFailed, message.clone()));
        }
        let stored = store.view().get(store.keyspace(STAMPS), agent.as_bytes()).unwrap();
        Ok(json!(stored.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())))
    }
}

impl Component for Stamper {
    fn name(&self) -> &'static str {
        "stamp"
    }

    fn kinds(&self) -> &'static [OpKind] {
        const KINDS: &[OpKind] = &[
            OpKind {
                name: "stamp.put",
                effects: bbx_core::op::Effects::Kernel,
            },
            OpKind {
                name: "stamp.get",
                effects: bbx_core::op::Effects::None,
            },
        ];
        KINDS
    }

    fn keyspaces(&self) -> &'static [bbx_store::KeyspaceDef] {
        &[STAMPS]
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        let fail = args.get("fail").and_then(Value::as_str).map(str::to_owned);
        Ok(match kind {
            "stamp.put" => Prepared::Effect(Arc::new(StampPut)),
            _ => Prepared::Read(Arc::new(StampGet(fail))),
        })
    }

    fn labels_results(&self) -> bool {
        true
    }

    fn label(&self, op: &bbx_component::Attempted<'_>, result: &Value) -> Vec<String> {
        if op.kind == "sleep" {
            vec!["slept".into()]
        } else if let Some(message) = result.pointer("/error/message").and_then(Value::as_str) {
            vec![format!("failed:{message}")]
        } else {
            Vec::new()
        }
    }

    fn observes(&self) -> bool {
        true
    }

    /// `stamp.read`: an agent's stamp, read through the pipeline as the caller.
    fn endpoints(&self, ctx: &Context) -> Vec<bbx_component::Endpoint> {
        let submitter = ctx.submitter.clone();
        let read = move |caller: Caller, args: StampArgs| {
            let submitter = submitter.clone();
            async move {
                let batch = SubmitBatch {
                    ops: vec![SubmitOp::new(args.agent_id.parse()?, "stamp.get", json!({}))],
                    wait_ms: None,
                };
                let id = submitter.submit(&caller, batch).await?.ops[0].op_id;
                let done = submitter.wait(&caller, id, Duration::from_secs(30)).await?;
                Ok(done.completion.and_then(|c| c.result).unwrap_or(Value::Null))
            }
        };
        let path = ("GET", "/v1/agents/{agent_id}/stamp");
        vec![bbx_component::Endpoint::new(
            "stamp.read",
            path,
            "An agent's stamp.",
            read,
        )]
    }

    fn completed(&self, completion: &Arc<bbx_core::op::Completion>) {
        self.seen.lock().push(completion.op_id);
    }
}

#[tokio::test]
async fn labels_follow_an_op_into_its_effect_and_completion_and_observers_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let stamper = Arc::new(Stamper::default());
    let components: Vec<Arc<dyn Component>> = vec![Arc::new(Gatekeeper), stamper.clone()];
    let kernel = Kernel::open_with(config(dir.path()), components).await.unwrap().kernel;
    let caller = admin(&kernel, dir.path());
    let agent = new_agent(&kernel, &caller).await;
    let run = |kind: &'static str, args: Value| {
        let (kernel, caller) = (kernel.clone(), caller.clone());
        async move {
            let batch = SubmitBatch {
                ops: vec![SubmitOp::new(agent, kind, args)],
                wait_ms: None,
            };
            let id = kernel.submit(&caller, batch).await.unwrap().ops[0].op_id;
            kernel
                .wait_op(&caller, &id, Duration::from_secs(30))
                .await
                .unwrap()
                .completion
                .unwrap()
        }
    };
    let put = run("stamp.put", json!({ "taint": "web" })).await;
    assert_eq!(put.labels, ["taint:web"]);
    let got = run("stamp.get", json!({})).await;
    assert_eq!(
        got.result,
        Some(json!("taint:web")),
        "the effect staged its op's labels"
    );
    let slept = run("sleep", json!({ "ms": 1 })).await;
    assert_eq!(slept.labels, ["slept"]);
    // A failed attempt's error is labelled too: it can carry what the outside sent.
    let failed = run("stamp.get", json!({ "fail": "from outside" })).await;
    assert_eq!(failed.status, bbx_core::op::CompletionStatus::Error);
    assert_eq!(failed.labels, ["failed:from outside"]);
    for _ in 0..100 {
        if stamper.seen.lock().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = stamper.seen.lock().clone();
    for done in [&put, &got, &slept] {
        assert!(seen.contains(&done.op_id), "the observer saw {}", done.kind);
    }

    // The component's endpoint, listed beside the kernel's and run as the caller.
    let names: Vec<String> = kernel.endpoints().into_iter().map(|e| e.name).collect();
    assert!(names.contains(&"stamp.read".to_owned()) && names.contains(&"ring.approve".to_owned()));
    let read = kernel
        .call_endpoint(&caller, "stamp.read", json!({ "agent_id": agent.to_string() }))
        .await
        .unwrap();
    assert_eq!(read, json!("taint:web"));
    let outsider = outsider();
    let call = |caller: Caller, input: Value| {
        let kernel = kernel.clone();
        async move {
            kernel
                .call_endpoint(&caller, "stamp.read", input)
                .await
                .unwrap_err()
                .code
        }
    };
    assert_eq!(
        call(outsider, json!({ "agent_id": agent.to_string() })).await,
        ErrorCode::NotFound
    );
    assert_eq!(
        call(caller.clone(), json!({ "agent": 1 })).await,
        ErrorCode::InvalidArgument
    );
    let unknown = kernel
        .call_endpoint(&caller, "stamp.nothing", json!({}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code, ErrorCode::NotFound);

    // The labels are durable with the completion.
    kernel.shutdown().await;
    drop(kernel);
    let kernel = Kernel::open_with(
        config(dir.path()),
        vec![Arc::new(Gatekeeper), Arc::new(Stamper::default())],
    )
    .await
    .unwrap()
    .kernel;
    let stored = kernel.op(&caller, &put.op_id).unwrap().completion.unwrap();
    assert_eq!(stored.labels, ["taint:web"]);
    kernel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_context_goes_out_and_back_in_and_its_ids_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = Kernel::open(config(dir.path())).await.unwrap().kernel;
    let caller = admin(&kernel, dir.path());
    let agent = new_agent(&kernel, &caller).await;
    let put = |text: &str| {
        let input = json!({ "agent": agent, "content": text });
        let (kernel, caller) = (kernel.clone(), caller.clone());
        async move {
            kernel.call_endpoint(&caller, "context.put", input).await.unwrap()["id"]
                .as_u64()
                .unwrap()
        }
    };
    let contexts = kernel
        .component::<bbx_context::Contexts>()
        .expect("the kernel has context");
    for text in ["one", "two", "three"] {
        put(text).await;
    }
    let exported = kernel.export_agent(&caller, &agent).unwrap();
    assert!(exported.parts.iter().any(|(name, _)| name == "context"));
    assert_eq!(put("four").await, 4);
    let deleted = json!({ "agent": agent, "id": 1 });
    kernel.call_endpoint(&caller, "context.delete", deleted).await.unwrap();

    // A part whose block was tampered with is refused, and changes nothing.
    let mut tampered = exported.clone();
    let (_, records) = tampered.parts.iter_mut().find(|(name, _)| name == "context").unwrap();
    let block = records
        .iter_mut()
        .find(|r| r.key[0] == bbx_context::CONTEXT_BLOCKS.id)
        .unwrap();
    let last = block.value.len() - 1;
    block.value[last] ^= 0xff;
    let refused = kernel.import_agent(&caller, tampered).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{}", refused.message);
    assert_eq!(contexts.stats(agent).unwrap()["items"], 3);

    kernel.import_agent(&caller, exported).await.unwrap();
    let texts: Vec<String> = (1..=3)
        .map(|id| contexts.get(agent, id).unwrap().content.to_string())
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(contexts.get(agent, 4).is_err(), "what came after the export is gone");
    assert_eq!(put("five").await, 5, "an id is never given twice");
    kernel.shutdown().await;
}
