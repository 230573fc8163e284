//! `llm.chat` and budgets against a real HTTP server on loopback that speaks the
//! OpenAI chat protocol and plays scripted answers: the last user message says what
//! to answer (`tokens:P:C[:CACHED]`, `echo` (the messages it got), `error:STATUS`,
//! `hang`), streamed when asked.

mod support;

use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::model::CreateAgent;
use bbx_core::op::{OpState, SubmitBatch, SubmitOp};
use bbx_core::quota::{Node, QuotaLimits};
use serde_json::{Value, json};
use std::time::Duration;
use support::Kernel;
use tokio::io::AsyncWriteExt;

/// Requests the scripted server is holding without an answer, ever received.
static HANGING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Starts the scripted model server; its base URL.
async fn scripted_model() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}/v1", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(socket));
        }
    });
    base
}

async fn serve(mut socket: tokio::net::TcpStream) {
    let Some(request) = support::read_json_request(&mut socket).await else {
        return;
    };
    let script = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let model = request["model"].as_str().unwrap_or("m").to_owned();
    let reply = |status: &str, content_type: &str, body: String| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let response = if script == "hang" {
        HANGING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(120)).await;
        return;
    } else if let Some(status) = script.strip_prefix("error:") {
        let body = json!({"error": {"message": format!("scripted {status}"), "type": "server_error"}});
        reply(&format!("{status} Scripted"), "application/json", body.to_string())
    } else {
        let mut parts = script.strip_prefix("tokens:").unwrap_or("1:1").split(':');
        let prompt: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(1);
        let completion: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(1);
        let mut usage =
            json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
        if let Some(cached) = parts.next().and_then(|p| p.parse::<u64>().ok()) {
            usage["prompt_tokens_details"] = json!({ "cached_tokens": cached });
        }
        let content = match script.as_str() {
            "echo" => request["messages"].to_string(),
            _ => "Hello".to_owned(),
        };
        if stream {
            let mut events = String::new();
            for piece in ["Hel", "lo"] {
                let chunk = json!({"model": model, "choices": [{"index": 0, "delta": {"content": piece}}]});
                events.push_str(&format!("data: {chunk}\n\n"));
            }
            let last = json!({"model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
            events.push_str(&format!("data: {last}\n\n"));
            let usage_chunk = json!({"model": model, "choices": [], "usage": usage});
            events.push_str(&format!("data: {usage_chunk}\n\ndata: [DONE]\n\n"));
            reply("200 OK", "text/event-stream", events)
        } else {
            let body = json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": usage,
            });
            reply("200 OK", "application/json", body.to_string())
        }
    };
    let _ = socket.write_all(response.as_bytes()).await;
}

/// A kernel whose one LLM endpoint is the scripted server; model "m" costs $1 per
/// million prompt tokens and $2 per million completion tokens.
async fn kernel_with_model() -> (Kernel, tempfile::TempDir) {
    kernel_with_model_and("").await
}

/// [`kernel_with_model`], with `extra` appended to its configuration.
async fn kernel_with_model_and(extra: &str) -> (Kernel, tempfile::TempDir) {
    let base = scripted_model().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bbx.toml");
    std::fs::write(
        &config,
        format!(
            "[tools.llm]\ndefault_max_tokens = 100\n\
             [tools.llm.endpoints.local]\nbase_url = \"{base}\"\n\
             [tools.llm.prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n{extra}"
        ),
    )
    .unwrap();
    let kernel = Kernel::start_with(&["--config", config.to_str().unwrap()]);
    (kernel, dir)
}

fn chat(agent: bbx_core::AgentId, script: &str, extra: Value) -> SubmitOp {
    let mut args = json!({"model": "m", "messages": [{"role": "user", "content": script}]});
    if let (Value::Object(args), Value::Object(extra)) = (&mut args, extra) {
        args.extend(extra);
    }
    SubmitOp::new(agent, "llm.chat", args)
}

async fn run(client: &Client, op: SubmitOp) -> bbx_core::op::Completion {
    let id = client
        .submit_ops(SubmitBatch {
            ops: vec![op],
            wait_ms: None,
        })
        .await
        .unwrap()
        .ops[0]
        .op_id;
    client
        .wait_op(id, Duration::from_secs(60))
        .await
        .unwrap()
        .completion
        .expect("done within a minute")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_takes_the_agents_assembled_context_and_reports_cached_tokens() {
    let (kernel, _config) = kernel_with_model().await;
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = kernel.new_agent();
    for (text, role) in [
        ("You are terse.", "system"),
        ("the door is blue", "user"),
        ("noted", "assistant"),
    ] {
        let put = kernel.cli(&["context", "put", &agent, text, "--role", role]);
        assert!(put.status.success(), "{}", support::stderr(&put));
    }
    let agent: bbx_core::AgentId = agent.parse().unwrap();
    let context = json!({ "context": { "budget": 1000 } });
    let echoed = run(&client, chat(agent, "echo", context.clone())).await;
    let sent: Value = serde_json::from_str(echoed.result.unwrap()["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent,
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "the door is blue"},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": "echo"},
        ]),
        "the window, then the call's own message"
    );
    let cached = run(&client, chat(agent, "tokens:900:10:768", context)).await;
    assert_eq!(cached.result.unwrap()["usage"]["cached_tokens"], 768);
    let plain = run(&client, chat(agent, "tokens:9:1", json!({}))).await;
    assert!(plain.result.unwrap()["usage"].get("cached_tokens").is_none());
    let short = run(&client, chat(agent, "echo", json!({ "context": { "budget": 2 } }))).await;
    let error = short.error.expect("a budget under the system prompt fails");
    assert!(error.message.contains("short"), "{}", error.message);
}

/// Puts 40 turns of about 55 tokens each, and assembles a window of 1,500 as
/// the agent.
fn overflowing_window(kernel: &Kernel, agent: &str) -> Value {
    for turn in 0..40 {
        let text = format!(
            "Turn {turn}: the parcel for order {turn}-X{turn} left depot {} at dawn, and the courier logged it twice. \
             The customer asked for a signature on delivery and a call before noon. \
             Nothing else changed about the route, the van or the weather that day.",
            turn * 7
        );
        let put = kernel.cli(&["context", "put", agent, &text, "--role", "user"]);
        assert!(put.status.success(), "{}", support::stderr(&put));
    }
    let key = kernel.agent_key(agent);
    let window = kernel.cli(&[
        "--api-key",
        &key,
        "context",
        "assemble",
        agent,
        "--budget",
        "1500",
        "--json",
    ]);
    assert!(window.status.success(), "{}", support::stderr(&window));
    let window = support::json(&window);
    assert_eq!(window["compacted"], true, "{window}");
    assert!(window["tokens"].as_u64().unwrap() <= 1500, "{window}");
    window
}

fn summary_of(window: &Value) -> String {
    let items = window["items"].as_array().unwrap();
    let summary = items.iter().find(|i| i["kind"] == "summary").expect("a summary");
    summary["content"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_context_is_summarized_by_the_model_on_the_agents_budget() {
    let (kernel, _config) = kernel_with_model_and("[context]\nsummary_model = \"m\"\n").await;
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = kernel.new_agent();
    let window = overflowing_window(&kernel, &agent);
    assert_eq!(window["summary_by"], "m", "{window}");
    let summary = summary_of(&window);
    assert!(
        summary.starts_with("[Summary of") && summary.ends_with("\nHello"),
        "the model's answer under the span's header: {summary}"
    );
    let id: bbx_core::AgentId = agent.parse().unwrap();
    let spent = client.quota(Node::Agent(id)).await.unwrap().usage.spent_today_usd;
    assert!(spent > 0.0, "the summary is billed to the agent");

    let again = support::json(&kernel.cli(&["context", "assemble", &agent, "--budget", "1500", "--json"]));
    assert_eq!(
        again["items"], window["items"],
        "the same window, prefix and summary, for any reader"
    );
    assert!(again.get("summary_by").is_none(), "no new summary: {again}");
    let after = client.quota(Node::Agent(id)).await.unwrap().usage.spent_today_usd;
    assert_eq!(after, spent, "nothing more was spent");

    // Another caller's window never spends the agent's budget on a model.
    for turn in 0..20 {
        let text = format!(
            "Later turn {turn}: a second parcel for order {turn}-Y{turn} waited at depot {} until noon. \
             The driver called ahead twice and the customer confirmed the new window by text.",
            turn * 3
        );
        let put = kernel.cli(&["context", "put", &agent, &text, "--role", "user"]);
        assert!(put.status.success(), "{}", support::stderr(&put));
    }
    let theirs = support::json(&kernel.cli(&["context", "assemble", &agent, "--budget", "1500", "--json"]));
    assert_eq!(theirs["compacted"], true, "{theirs}");
    assert_eq!(theirs["summary_by"], "extractive", "{theirs}");
    let last = client.quota(Node::Agent(id)).await.unwrap().usage.spent_today_usd;
    assert_eq!(last, spent, "nothing spent for another caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_summary_model_leaves_an_extractive_summary() {
    let down = format!("http://127.0.0.1:{}/v1", support::free_port());
    let (kernel, _config) = kernel_with_model_and(&format!(
        "[tools.llm.endpoints.down]\nbase_url = \"{down}\"\n\
         [context]\nsummary_model = \"m\"\nsummary_endpoint = \"down\"\n"
    ))
    .await;
    let agent = kernel.new_agent();
    let window = overflowing_window(&kernel, &agent);
    assert_eq!(window["summary_by"], "extractive", "{window}");
    assert!(
        window["summary_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{window}"
    );
    let summary = summary_of(&window);
    assert!(summary.contains("depot"), "sentences of the evicted turns: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_report_usage_and_cost_and_map_failures() {
    let (kernel, _config) = kernel_with_model().await;
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "chatty".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;

    let plain = run(&client, chat(agent, "tokens:1000:500", json!({}))).await;
    let result = plain.result.as_ref().unwrap();
    assert_eq!(result["content"], "Hello");
    assert_eq!(result["usage"]["prompt_tokens"], 1000);
    assert_eq!(result["usage"]["completion_tokens"], 500);
    assert_eq!(result["cost_micros"], 1000 + 2 * 500);
    assert_eq!(result["cost_usd"], 0.002);

    let streamed = run(&client, chat(agent, "tokens:7:2", json!({"stream": true}))).await;
    let result = streamed.result.as_ref().unwrap();
    assert_eq!(result["content"], "Hello", "{result}");
    assert_eq!(result["finish_reason"], "stop");
    assert_eq!(result["usage"]["total_tokens"], 9);
    assert_eq!(result["cost_micros"], 7 + 2 * 2);

    let server_error = run(&client, chat(agent, "error:500", json!({}))).await;
    assert_eq!(server_error.status.as_str(), "error");
    assert_eq!(server_error.error.as_ref().unwrap().code.as_str(), "unavailable");
    let bad_request = run(&client, chat(agent, "error:400", json!({}))).await;
    assert_eq!(bad_request.error.as_ref().unwrap().code.as_str(), "tool_failed");
    assert!(bad_request.error.as_ref().unwrap().message.contains("scripted 400"));

    let hung = run(&client, chat(agent, "hang", json!({"timeout_ms": 300}))).await;
    assert_eq!(hung.status.as_str(), "timeout", "{hung:?}");

    let unknown = run(&client, chat(agent, "tokens:1:1", json!({"endpoint": "elsewhere"}))).await;
    assert!(unknown.error.unwrap().message.contains("elsewhere"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_spend_exactly_their_costs_and_never_pass_the_budget() {
    let (kernel, _config) = kernel_with_model().await;
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "spender".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    const BUDGET_MICROS: u64 = 40_000;
    client
        .set_quota(
            Node::Agent(agent),
            QuotaLimits {
                cost_per_day_usd: Some(BUDGET_MICROS as f64 / 1e6),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let mut ids = Vec::new();
    for batch in 0..10 {
        let ops = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                chat(agent, &format!("tokens:{}:{}", 5 + n % 17, 3 + n % 41), json!({}))
            })
            .collect();
        let submitted = client
            .submit_ops(SubmitBatch {
                ops,
                wait_ms: Some(30_000),
            })
            .await
            .unwrap();
        ids.extend(submitted.ops.into_iter().map(|o| o.op_id));
    }
    let (mut spent, mut ok, mut refused) = (0u64, 0, 0);
    for id in ids {
        let info = client.wait_op(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(info.state, OpState::Done);
        let completion = info.completion.unwrap();
        match completion.status.as_str() {
            "ok" => {
                ok += 1;
                spent += completion.result.unwrap()["cost_micros"].as_u64().unwrap();
            }
            _ => {
                let error = completion.error.unwrap();
                assert_eq!(error.code.as_str(), "quota_exceeded", "{error:?}");
                assert_eq!(error.details.unwrap()["limit"], "cost_per_day_usd");
                refused += 1;
            }
        }
    }
    assert!(
        ok > 0 && refused > 0,
        "the budget ran out part way ({ok} ok, {refused} refused)"
    );
    let usage = client.quota(Node::Agent(agent)).await.unwrap().usage;
    let recorded = (usage.spent_today_usd * 1e6).round() as u64;
    assert_eq!(recorded, spent, "spent is exactly the sum of the reconciled costs");
    assert!(recorded <= BUDGET_MICROS);
    assert_eq!(usage.reserved_usd, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_reserve_and_reconcile_leaves_the_budget_correct() {
    let (mut kernel, _config) = kernel_with_model().await;
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "crashy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    client
        .set_quota(
            Node::Agent(agent),
            QuotaLimits {
                cost_per_month_usd: Some(1.0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let done = run(&client, chat(agent, "tokens:100:50", json!({}))).await;
    assert_eq!(done.result.unwrap()["cost_micros"], 200);

    // A call the model never answers: reserved (at most 8+4+4 prompt bytes and 100
    // completion tokens, 216 micro-dollars) and running when the kernel dies.
    let hung_before = HANGING.load(std::sync::atomic::Ordering::SeqCst);
    let hanging = client
        .submit_ops(SubmitBatch {
            ops: vec![chat(agent, "hang", json!({}))],
            wait_ms: None,
        })
        .await
        .unwrap()
        .ops[0]
        .op_id;
    // The request reaching the model means the start mark was durable before it.
    while HANGING.load(std::sync::atomic::Ordering::SeqCst) == hung_before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let usage = client.quota(Node::Agent(agent)).await.unwrap().usage;
    let reserved = (usage.reserved_usd * 1e6).round() as u64;
    assert_eq!(reserved, ("user".len() + "hang".len()) as u64 + 8 + 2 * 100);
    kernel.crash();
    kernel.restart();
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let info = client.wait_op(hanging, Duration::from_secs(30)).await.unwrap();
    assert_eq!(info.completion.unwrap().status.as_str(), "in_doubt");
    // Its cost is unknown, so it is charged all it reserved: nothing is lost, and
    // the call that completed before the crash is not counted twice.
    let usage = client.quota(Node::Agent(agent)).await.unwrap().usage;
    assert_eq!((usage.spent_this_month_usd * 1e6).round() as u64, 200 + reserved);
    assert_eq!(usage.reserved_usd, 0.0);
    // And it survives another restart exactly.
    let (clean, log) = kernel.stop();
    assert!(clean, "{log}");
    kernel.restart();
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let usage = client.quota(Node::Agent(agent)).await.unwrap().usage;
    assert_eq!((usage.spent_this_month_usd * 1e6).round() as u64, 200 + reserved);
}
