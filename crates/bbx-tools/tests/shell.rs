//! `tool.shell` against real processes, real cgroups and real namespaces.
//!
//! The limits are enforced by the host: with cgroups (v1 or v2) a memory hog is
//! OOM-killed and a fork bomb is capped; as root the program sees only its
//! workspace. Where the host lacks them (no cgroups, not root) the tests that need
//! them say so and check the weaker fallback instead.

use bbx_core::quota::{ProcessLimits, ToolSettings};
use bbx_core::{AgentId, ErrorCode, OpId};
use bbx_tools::{Call, Context, Tools, ToolsConfig};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

struct Fixture {
    tools: Tools,
    _dir: tempfile::TempDir,
    agent: AgentId,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let scope = format!("bbx-test-{}", OpId::generate());
    let tools = Tools::new(
        ToolsConfig {
            workspaces: dir.path().join("workspaces"),
            run_as: (65534, 65534),
            unsandboxed_shell: true,
            llm: Default::default(),
            mcp: Default::default(),
        },
        bbx_quota::cgroup::detect(&scope),
    )
    .unwrap();
    Fixture {
        tools,
        _dir: dir,
        agent: AgentId::generate(),
    }
}

impl Fixture {
    async fn run(&self, args: Value, limits: ProcessLimits) -> bbx_core::Result<Value> {
        let call = Call::parse("tool.shell", &args).unwrap()?;
        let ctx = Context {
            op_id: OpId::generate(),
            agent: self.agent,
            tenant: "default".into(),
            idempotency_key: None,
            settings: ToolSettings::default(),
            limits,
        };
        self.tools.run(&call, &ctx).await
    }

    fn has_cgroups(&self) -> bool {
        self.tools.cgroup_driver().kind() != "rlimits"
    }
}

/// A check this host cannot run: skipped on a developer's machine, a failure
/// under `CI=true`, where a skipped check would pass while testing nothing.
/// Returns (so the test can end) only when skipping is allowed.
fn cannot_check(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this check cannot run here ({why}), and under CI=true that fails the test"
    );
    eprintln!("skipped: {why}");
}

fn python(code: &str) -> Value {
    json!({ "program": "python3", "args": ["-c", code], "timeout_ms": 20_000 })
}

#[tokio::test]
async fn a_program_runs_in_its_workspace_and_its_output_and_exit_code_come_back() {
    let f = fixture();
    let out = f
        .run(
            python("import os; print(os.getcwd()); open('made.txt','w').write('x')"),
            ProcessLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(out["exit_code"], 0);
    assert!(out["stdout"].as_str().unwrap().trim().ends_with("workspace") || !f.tools.isolates());
    assert!(f.tools.workspace(&f.agent).unwrap().join("made.txt").exists());

    let failed = f
        .run(python("import sys; sys.exit(3)"), ProcessLimits::default())
        .await
        .unwrap_err();
    assert_eq!(failed.code, ErrorCode::ToolFailed);
    assert_eq!(failed.details.unwrap()["exit_code"], 3);

    // No shell unless asked: the argument is passed as is.
    let echoed = f
        .run(
            json!({"program": "echo", "args": ["$HOME; rm -rf /"]}),
            ProcessLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(echoed["stdout"], "$HOME; rm -rf /\n");
    let shelled = f
        .run(
            json!({"program": "echo a | tr a b", "shell": true}),
            ProcessLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(shelled["stdout"], "b\n");
}

#[tokio::test]
async fn a_memory_hog_is_killed_at_its_limit() {
    let f = fixture();
    let limits = ProcessLimits {
        memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    let hog = python("x = bytearray(400 << 20); x[::4096] = b'1' * len(x[::4096]); print('survived')");
    let e = f.run(hog, limits).await.unwrap_err();
    if f.has_cgroups() {
        assert_eq!(e.code, ErrorCode::MemoryLimit, "{e:?}");
        assert_eq!(e.details.unwrap()["limit"], "memory_bytes");
    } else {
        // An address-space rlimit makes the allocation fail instead.
        assert_eq!(e.code, ErrorCode::ToolFailed, "{e:?}");
    }
}

#[tokio::test]
async fn a_fork_bomb_is_capped_at_its_pids_limit() {
    let f = fixture();
    if !f.has_cgroups() {
        return cannot_check("no cgroups here, and RLIMIT_NPROC counts the whole uid");
    }
    let limits = ProcessLimits {
        pids: Some(16),
        ..Default::default()
    };
    let bomb = python("import os, time\nfor _ in range(200):\n    os.fork()\ntime.sleep(0.2)");
    let e = f.run(bomb, limits).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PidsLimit, "{e:?}");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_tree() {
    let f = fixture();
    // The program leaves a grandchild in its own session (escaping the process
    // group) and reports its pid, then hangs.
    let code = "import os, subprocess, sys, time\n\
                p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n\
                print(p.pid, flush=True)\n\
                time.sleep(300)";
    let started = Instant::now();
    let mut args = python(code);
    args["timeout_ms"] = json!(1500);
    let e = f.run(args, ProcessLimits::default()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(started.elapsed() < Duration::from_secs(60));
    let grandchild: i32 = e.details.unwrap()["stdout"].as_str().unwrap().trim().parse().unwrap();
    if !f.has_cgroups() {
        return cannot_check("no cgroups: a grandchild in its own session escapes the kill");
    }
    {
        // Give the reaper a moment, then the pid must be gone (or a zombie of init).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = std::fs::read_to_string(format!("/proc/{grandchild}/status")).unwrap_or_default();
        let alive = status.lines().any(|l| l.starts_with("State:") && !l.contains('Z'));
        assert!(!alive, "the grandchild {grandchild} outlived the timeout");
    }
}

#[tokio::test]
async fn a_sandboxed_program_cannot_read_outside_its_workspace() {
    let f = fixture();
    if !f.tools.isolates() {
        return cannot_check("namespaces need root");
    }
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cret").unwrap();
    let path = secret.path().display().to_string();
    let mut args = python(
        "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError as e:\n    print('refused', type(e).__name__)",
    );
    args["args"].as_array_mut().unwrap().push(json!(path));
    let out = f.run(args, ProcessLimits::default()).await.unwrap();
    assert!(out["stdout"].as_str().unwrap().starts_with("refused"), "{out}");
    // Nor another agent's workspace, nor the kernel's data.
    let listing = f
        .run(json!({"program": "ls", "args": ["/"]}), ProcessLimits::default())
        .await
        .unwrap();
    let top: Vec<&str> = listing["stdout"].as_str().unwrap().lines().collect();
    assert!(top.contains(&"workspace") && top.contains(&"usr"), "{top:?}");
    assert!(
        !top.contains(&"root") && !top.contains(&"work") && !top.contains(&"proc"),
        "{top:?}"
    );
    // And it is not root.
    let id = f
        .run(json!({"program": "id", "args": ["-u"]}), ProcessLimits::default())
        .await
        .unwrap();
    assert_eq!(id["stdout"], "65534\n");
}

#[tokio::test]
async fn a_busy_loop_gets_its_cpu_share_and_no_more() {
    let f = fixture();
    if !f.has_cgroups() {
        return cannot_check("no cgroups, no CPU share");
    }
    let limits = ProcessLimits {
        cpu_percent: Some(20),
        ..Default::default()
    };
    // Spins for 1 s of wall time, then reports the CPU time it got.
    let spin = python("import time\nt = time.time()\nwhile time.time() - t < 1.0: pass\nprint(time.process_time())");
    let out = f.run(spin, limits).await.unwrap();
    let cpu: f64 = out["stdout"].as_str().unwrap().trim().parse().unwrap();
    // 20 % of a core over about 1 s, with one scheduler period of slack.
    assert!(cpu < 0.45, "got {cpu} s of CPU in 1 s at a 20 % share");
    assert!(out["cpu_throttled_periods"].as_u64().unwrap() > 0);
}
