//! A real `bbx serve` process on a free loopback port and a scratch data directory.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod seaweed;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BBX: &str = env!("CARGO_BIN_EXE_bbx");

pub struct Kernel {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Flags given at start, given again at every restart.
    flags: Vec<String>,
    /// What the kernel wrote to stderr, across restarts, and the thread reading it.
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    drain: Option<std::thread::JoinHandle<()>>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Kernel {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// A kernel whose data directory is `dir` (a small file system mounted
    /// there, say).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let mut kernel = Self {
            dir,
            port: free_port(),
            child: None,
            flags: extra.iter().map(|f| f.to_string()).collect(),
            log: Default::default(),
            drain: None,
        };
        kernel.spawn();
        kernel
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.key"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn spawn(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut child = Command::new(BBX)
            .args(["serve", "--listen", &listen, "--data-dir"])
            .arg(self.dir.path())
            .args(&self.flags)
            .env_remove("BBX_URL")
            .env_remove("BBX_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drained as it comes: a kernel that logs more than a pipe holds must not
        // block on its own stderr.
        let mut stderr = child.stderr.take().expect("piped");
        let log = self.log.clone();
        self.drain = Some(std::thread::spawn(move || {
            use std::io::Read;
            let mut buffer = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        }));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&listen).is_ok() && self.ready() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bbx serve exited early with {status}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("bbx serve did not become ready");
    }

    fn ready(&self) -> bool {
        self.readyz().starts_with("HTTP/1.1 200")
    }

    /// `GET /readyz`'s whole response (empty if nothing listens).
    pub fn readyz(&self) -> String {
        let mut stream = match std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            Ok(s) => s,
            Err(_) => return String::new(),
        };
        use std::io::{Read, Write};
        let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    /// Everything the kernel wrote to stderr, once it has exited.
    fn stderr(&mut self) -> String {
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// SIGTERM, wait, and return (exit success, stderr).
    pub fn stop(&mut self) -> (bool, String) {
        let mut child = self.child.take().expect("kernel is running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("child pids are positive");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = child.wait().unwrap();
        (status.success(), self.stderr())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("kernel is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or crash the kernel first");
        self.spawn();
    }

    /// A kernel started with `config` as its TOML file, and the file's path
    /// (to change before a restart).
    pub fn with_config(config: &str) -> (Self, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("bbx.toml");
        std::fs::write(&path, config).unwrap();
        (Self::start_with(&["--config", path.to_str().unwrap()]), path)
    }

    /// A new agent's id.
    pub fn new_agent(&self) -> String {
        let created = json(&self.cli(&["agent", "create", "x", "--json"]));
        created["id"].as_str().unwrap().to_owned()
    }

    /// A new API key of the default tenant that acts as `agent` alone.
    pub fn agent_key(&self, agent: &str) -> String {
        let created = json(&self.cli(&[
            "auth",
            "create-api-key",
            "self",
            "--tenant",
            "default",
            "--role",
            "agent",
            "--agent",
            agent,
            "--json",
        ]));
        created["key"].as_str().unwrap().to_owned()
    }

    /// Runs `bbx ARGS`, which must fail with one line on stderr containing
    /// `needle`.
    pub fn refused(&self, args: &[&str], needle: &str) {
        let out = self.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", stdout(&out));
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} does not say {needle:?}");
    }

    /// Runs `bbx ARGS` as a client of this kernel.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BBX)
            .arg("--url")
            .arg(self.url())
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .env_remove("BBX_API_KEY")
            .output()
            .unwrap()
    }

    /// The event stream of `agent` (`GET /v1/ops/events?agent=AGENT`), open.
    pub async fn events(&self, agent: &str) -> reqwest::Response {
        self.events_as(&self.key(), &format!("?agent={agent}")).await
    }

    /// The event stream as `key` sees it, with `query`, open.
    pub async fn events_as(&self, key: &str, query: &str) -> reqwest::Response {
        let response = reqwest::Client::new()
            .get(format!("{}/v1/ops/events{query}", self.url()))
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
    }

    /// `bbx` with `--api-key KEY` (an agent's, from [`Kernel::agent_key`]).
    pub fn cli_as(&self, key: &str, args: &[&str]) -> Output {
        let mut all = vec!["--api-key", key];
        all.extend_from_slice(args);
        self.cli(&all)
    }
}

impl Drop for Kernel {
    /// A graceful stop, so the kernel removes what it made outside its data
    /// directory (its cgroup scope); SIGKILL if it does not stop in time.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "command failed: {}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(output)))
}

/// A check this host cannot run: skipped on a developer's machine, a failure
/// under `CI=true`, where a skipped check would pass while testing nothing.
/// Returns (so the test can end) only when skipping is allowed.
pub fn cannot_check(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this check cannot run here ({why}), and under CI=true that fails the test"
    );
    eprintln!("skipped: {why}");
}

/// Reads one HTTP request from `socket` and answers its body as JSON (null
/// when it is none, or not JSON); `None` if the client went first.
pub async fn read_json_request(socket: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let (head_end, length) = loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while data.len() < head_end + length {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    Some(serde_json::from_slice(&data[head_end..head_end + length]).unwrap_or(serde_json::Value::Null))
}

/// The request heads a [`http_server`] saw.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A loopback HTTP server that answers each request with what `answer` makes of
/// its head (a content type and a body), and keeps the heads it saw.
pub async fn http_server<F>(answer: F) -> (u16, Seen)
where
    F: Fn(&str) -> (&'static str, String) + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let log = seen.clone();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (log, answer) = (log.clone(), answer.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                log.lock().unwrap().push(head.clone());
                let (content_type, body) = answer(&head);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

/// Reads an open event stream until `done` holds of what it read (30 s at
/// most): each event's data (notices and completions), as JSON.
pub async fn read_events(
    mut response: reqwest::Response,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let (mut text, mut seen) = (String::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&seen) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("the events did not come: {seen:#?}"))
            .unwrap()
            .expect("the stream ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            seen.extend(
                event
                    .lines()
                    .filter_map(|l| serde_json::from_str(l.strip_prefix("data:")?.trim()).ok()),
            );
        }
    }
    seen
}
