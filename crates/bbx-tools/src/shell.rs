//! `tool.shell`: a program run in a sandbox, its whole process tree killed when it
//! ends.
//!
//! Between `fork` and `exec` the child, still root, confines itself:
//! 1. joins the run's control group (so every process it forks is counted and
//!    limited from birth) and sets the fallback rlimits;
//! 2. when the kernel is root, enters a mount namespace (and a network namespace if
//!    the agent has `no_network`), mounts a fresh tmpfs as its root holding only
//!    read-only binds of the system directories, `/dev/{null,zero,random,urandom}`,
//!    a private `/tmp` and the agent's workspace at `/workspace`, and `chroot`s into
//!    it, so files outside the workspace do not exist for it;
//! 3. drops to the unprivileged uid with no supplementary groups and
//!    `no_new_privs`, so a setuid binary cannot take root back.
//!
//! Everything the child does there is a raw system call on memory prepared by the
//! parent: after `fork` in a threaded process nothing else is safe.

use crate::Context;
use bbx_core::{Error, ErrorCode, Result};
use bbx_quota::cgroup::{Driver, Group, Rlimit};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Default cap on each of stdout and stderr.
const DEFAULT_OUTPUT_BYTES: u64 = 1 << 20;
const MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// What every program gets in its environment.
const BASE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// System directories visible, read-only, inside the sandbox.
const SYSTEM_DIRS: [&str; 6] = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];
/// How long output may keep arriving after the program ended and its tree was killed.
const DRAIN: Duration = Duration::from_secs(2);
/// GPUs a memory limit is written for when the visible ones are not listed.
const MAX_GPUS: usize = 16;
/// Where the workspace appears inside the sandbox.
const SANDBOX_WORKSPACE: &str = "/workspace";

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShellCall {
    /// The program, found on PATH if it has no slash; with `shell: true`, a script for `/bin/sh -c`.
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Run `program` through `/bin/sh -c` (interpolation, pipes); off by default.
    #[serde(default)]
    pub shell: bool,
    /// Working directory, relative to the workspace.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Variables set for the program, besides PATH, HOME, LANG and the agent's `env_allow`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// Time allowed; the whole process tree is killed when it passes.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Most bytes kept of each of stdout and stderr (default 1 MiB).
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
}

impl ShellCall {
    pub(crate) fn checked(self) -> Result<Self> {
        if self.program.is_empty() || self.program.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid_field(
                "args.program",
                "program and args must be non-empty, without NUL",
            ));
        }
        if self.cwd.as_ref().is_some_and(|c| c.is_empty() || c.contains('\0')) {
            return Err(Error::invalid_field("args.cwd", "cwd must be non-empty, without NUL"));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(Error::invalid_field(
                    "args.env",
                    format!("{name:?} is not a valid variable"),
                ));
            }
        }
        if self.timeout_ms == Some(0) {
            return Err(Error::invalid_field("args.timeout_ms", "timeout_ms must be at least 1"));
        }
        if self.max_output_bytes.is_some_and(|m| m == 0 || m > MAX_OUTPUT_BYTES) {
            return Err(Error::invalid_field(
                "args.max_output_bytes",
                format!("max_output_bytes must be 1 to {MAX_OUTPUT_BYTES}"),
            ));
        }
        Ok(self)
    }

    pub(crate) async fn run(&self, ctx: &Context, sandbox: &Sandbox<'_>) -> Result<Value> {
        let started = Instant::now();
        if ctx.settings.no_network && !sandbox.isolate {
            // Running it with the network would break the agent's setting silently.
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "the agent's tools.no_network needs namespaces, which need the kernel to run as root",
            ));
        }
        let cwd = self.cwd.as_deref().unwrap_or(".");
        // The kernel looks the directory up below the workspace only, so a symlink
        // planted by an earlier run cannot point the program elsewhere.
        crate::file::directory_inside(sandbox.workspace, cwd)?;
        // One group per run: an attempt's group may still be being removed when
        // the op's next attempt starts.
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let group = sandbox
            .cgroups
            .create(&format!("op-{}-{run}", ctx.op_id), &ctx.limits)
            .map_err(|e| Error::unavailable(format!("cannot make the run's {}: {e}", sandbox.cgroups.kind())))?;
        let confinement = Confinement::prepare(group.as_ref(), sandbox, ctx.settings.no_network, cwd)?;

        let (program, args) = if self.shell {
            ("/bin/sh".to_owned(), vec!["-c".to_owned(), self.program.clone()])
        } else {
            (self.program.clone(), self.args.clone())
        };
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .env("PATH", BASE_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", confinement.home())
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if !sandbox.isolate {
            command.current_dir(sandbox.workspace.join(cwd));
        }
        for name in &ctx.settings.env_allow {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(&self.env);
        // GPUs are handed out through the CUDA runtime's own controls: which devices
        // it may see, and (under MPS) how much memory it may pin on each.
        if let Some(devices) = &ctx.limits.gpu_devices {
            let list: Vec<String> = devices.iter().map(u32::to_string).collect();
            command.env("CUDA_VISIBLE_DEVICES", list.join(","));
            command.env(
                "NVIDIA_VISIBLE_DEVICES",
                if list.is_empty() {
                    "void".to_owned()
                } else {
                    list.join(",")
                },
            );
        }
        if let Some(bytes) = ctx.limits.gpu_memory_bytes {
            // Per visible device, which CUDA numbers from 0 after CUDA_VISIBLE_DEVICES.
            let visible = ctx.limits.gpu_devices.as_ref().map_or(MAX_GPUS, Vec::len);
            let limit = (0..visible)
                .map(|d| format!("{d}={}M", (bytes >> 20).max(1)))
                .collect::<Vec<_>>()
                .join(",");
            command.env("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", limit);
        }
        // SAFETY: the closure makes only async-signal-safe system calls on memory
        // prepared before the fork, and allocates nothing.
        unsafe {
            command.pre_exec(move || confinement.enter());
        }
        let mut child = command.spawn().map_err(|e| spawn_error(&program, &e))?;
        let pid = child.id().map_or(0, |p| p as i32);
        let mut tree = Tree {
            pid,
            group: Some(group),
        };

        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), self.stdin.clone()) {
            tokio::spawn(async move {
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        let cap = self.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES) as usize;
        let stdout = tokio::spawn(capture(child.stdout.take(), cap));
        let stderr = tokio::spawn(capture(child.stderr.take(), cap));

        let limit = self.timeout_ms.map(Duration::from_millis);
        let exit = match limit {
            Some(limit) => tokio::time::timeout(limit, child.wait()).await.ok(),
            None => Some(child.wait().await),
        };
        // The program's end is the run's end: whatever it left behind goes with it,
        // so the pipes close and the readers finish.
        tree.kill_async().await;
        // With rlimits only, a daemon that left the process group can keep the pipes
        // open: the output is what arrived by then.
        let drained = |reader: tokio::task::JoinHandle<Captured>| async move {
            let abort = reader.abort_handle();
            match tokio::time::timeout(DRAIN, reader).await {
                Ok(captured) => captured.unwrap_or_default(),
                Err(_) => {
                    abort.abort();
                    Captured::default()
                }
            }
        };
        let (stdout, stderr) = (drained(stdout).await, drained(stderr).await);
        let events = tree.events();
        // Every process in the group is dead; removing its directory (which waits
        // for the last of them to be reaped) need not delay the completion.
        drop(tree);
        let output = json!({
            "stdout": stdout.text(),
            "stderr": stderr.text(),
            "stdout_truncated": stdout.truncated,
            "stderr_truncated": stderr.truncated,
            "duration_ms": started.elapsed().as_millis() as u64,
            "cpu_throttled_periods": events.cpu_throttled,
            "sandbox": { "limits": sandbox.cgroups.kind(), "isolated": sandbox.isolate },
        });

        if events.oom_kills > 0 {
            return Err(Error::new(
                ErrorCode::MemoryLimit,
                format!(
                    "the program was killed at its memory limit of {} bytes",
                    ctx.limits.memory_bytes.unwrap_or_default()
                ),
            )
            .with_details(with(output, "limit", json!("memory_bytes"))));
        }
        let Some(exit) = exit else {
            let ms = limit.map_or(0, |l| l.as_millis() as u64);
            return Err(Error::new(
                ErrorCode::Timeout,
                format!("the program ran past its {ms} ms timeout and was killed"),
            )
            .with_details(output));
        };
        let status = exit.map_err(|e| Error::internal(format!("cannot wait for the program: {e}")))?;
        let code = status.code();
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        let output = with(with(output, "exit_code", json!(code)), "signal", json!(signal));
        if status.success() {
            return Ok(output);
        }
        if events.pids_refused > 0 {
            return Err(Error::new(
                ErrorCode::PidsLimit,
                format!(
                    "the program hit its limit of {} processes ({} forks refused)",
                    ctx.limits.pids.unwrap_or_default(),
                    events.pids_refused
                ),
            )
            .with_details(with(output, "limit", json!("pids"))));
        }
        let how = match (code, signal) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "failed".to_owned(),
        };
        Err(Error::new(ErrorCode::ToolFailed, format!("{program} {how}")).with_details(output))
    }
}

fn with(mut value: Value, key: &str, field: Value) -> Value {
    value[key] = field;
    value
}

fn spawn_error(program: &str, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::new(
            ErrorCode::FailedPrecondition,
            format!("program {program:?} was not found (PATH is {BASE_PATH})"),
        ),
        _ => Error::new(ErrorCode::FailedPrecondition, format!("cannot start {program:?}: {e}")),
    }
}

/// Where and how a program runs.
pub(crate) struct Sandbox<'a> {
    pub cgroups: &'a dyn Driver,
    /// uid and gid to drop to.
    pub run_as: Option<(u32, u32)>,
    /// Mount (and network) namespaces with only the workspace visible.
    pub isolate: bool,
    pub workspace: &'a Path,
    /// An empty directory to mount the sandbox's root on.
    pub mount_point: &'a Path,
}

/// A running program's process tree: killed when the run ends or its future is
/// dropped (a ring timeout or cancel), and its group removed.
struct Tree {
    pid: i32,
    group: Option<Box<dyn Group>>,
}

impl Tree {
    /// Kills the process group: one system call, safe on any thread.
    fn kill_group(&self) {
        if self.pid > 0 {
            // SAFETY: kill has no memory-safety preconditions; a negative pid names
            // the process group the child leads.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }

    /// Kills the whole tree, its cgroup too. Emptying a cgroup without
    /// `cgroup.kill` loops (and sleeps) until no process is left, so that part
    /// runs on a blocking thread, never on the runtime's.
    async fn kill_async(&mut self) {
        self.kill_group();
        if let Some(group) = self.group.take() {
            let emptied = tokio::task::spawn_blocking(move || {
                group.kill_all();
                group
            })
            .await;
            self.group = emptied.ok();
        }
    }

    fn events(&self) -> bbx_quota::cgroup::Events {
        self.group.as_ref().map(|g| g.events()).unwrap_or_default()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.kill_group();
        if let Some(group) = self.group.take() {
            // Emptying a group, and removing it once its processes are reaped,
            // loop and sleep: not on a runtime thread.
            let finish = move || {
                group.kill_all();
                drop(group);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(finish)),
                Err(_) => finish(),
            }
        }
    }
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads a pipe to its end, keeping the first `cap` bytes: the program is never
/// blocked on a full pipe, and never costs more than `cap` of memory.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else { return captured };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return captured,
            Ok(n) => {
                let room = cap - captured.bytes.len();
                captured.bytes.extend_from_slice(&buffer[..n.min(room)]);
                captured.truncated |= n > room;
            }
        }
    }
}

/// What the child does to itself between `fork` and `exec`, prepared in full
/// beforehand.
struct Confinement {
    join: Vec<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlim_t)>,
    isolate: Option<Isolation>,
    run_as: Option<(u32, u32)>,
    home: String,
}

struct Isolation {
    unshare_flags: libc::c_int,
    root: CString,
    /// Each system path inside the new root: a directory to bind read-only, or a
    /// symlink to recreate (merged-/usr systems link /bin to usr/bin).
    system: Vec<(CString, CString, Option<CString>)>,
    dev: CString,
    devices: Vec<(CString, CString)>,
    tmp: CString,
    workspace: (CString, CString),
    cwd: CString,
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::internal("a path holds a NUL byte"))
}

impl Confinement {
    fn prepare(group: &dyn Group, sandbox: &Sandbox<'_>, no_network: bool, cwd: &str) -> Result<Self> {
        let join = group.join_files().iter().map(|p| c_path(p)).collect::<Result<_>>()?;
        let rlimits = group
            .rlimits()
            .into_iter()
            .map(|(limit, value)| {
                let resource = match limit {
                    Rlimit::AddressSpace => libc::RLIMIT_AS,
                    Rlimit::Processes => libc::RLIMIT_NPROC,
                };
                (resource, value as libc::rlim_t)
            })
            .collect();
        let isolate = if sandbox.isolate {
            let root = sandbox.mount_point;
            let mut system = Vec::new();
            for dir in SYSTEM_DIRS {
                let host = Path::new(dir);
                let inside = root.join(dir.trim_start_matches('/'));
                match std::fs::symlink_metadata(host) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        let target = std::fs::read_link(host)
                            .map_err(|e| Error::internal(format!("cannot read link {dir}: {e}")))?;
                        system.push((c_path(host)?, c_path(&inside)?, Some(c_path(&target)?)));
                    }
                    Ok(meta) if meta.is_dir() => system.push((c_path(host)?, c_path(&inside)?, None)),
                    _ => {}
                }
            }
            let devices = DEVICES
                .iter()
                .filter(|d| Path::new(d).exists())
                .map(|d| Ok((c_path(Path::new(d))?, c_path(&root.join(d.trim_start_matches('/')))?)))
                .collect::<Result<_>>()?;
            let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if no_network {
                flags |= libc::CLONE_NEWNET;
            }
            Some(Isolation {
                unshare_flags: flags,
                root: c_path(root)?,
                system,
                dev: c_path(&root.join("dev"))?,
                devices,
                tmp: c_path(&root.join("tmp"))?,
                workspace: (
                    c_path(sandbox.workspace)?,
                    c_path(&root.join(SANDBOX_WORKSPACE.trim_start_matches('/')))?,
                ),
                cwd: c_path(&Path::new(SANDBOX_WORKSPACE).join(cwd))?,
            })
        } else {
            None
        };
        let home = if sandbox.isolate {
            SANDBOX_WORKSPACE.to_owned()
        } else {
            sandbox.workspace.to_string_lossy().into_owned()
        };
        Ok(Self {
            join,
            rlimits,
            isolate,
            run_as: sandbox.run_as,
            home,
        })
    }

    fn home(&self) -> &str {
        &self.home
    }

    /// Runs in the child after `fork`.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY (whole function): raw system calls on NUL-terminated strings that
        // live in `self`, which the parent keeps alive until `exec`.
        unsafe {
            for file in &self.join {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            for (resource, value) in &self.rlimits {
                let limit = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                check(libc::setrlimit(*resource, &limit))?;
            }
            if let Some(isolation) = &self.isolate {
                isolation.enter()?;
            }
            if let Some((uid, gid)) = self.run_as {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

impl Isolation {
    /// # Safety
    /// Only between `fork` and `exec`, with `self` alive.
    unsafe fn enter(&self) -> std::io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let bind = |from: &CString, to: &CString, read_only: bool| -> std::io::Result<()> {
            // SAFETY: see `Confinement::enter`.
            unsafe {
                check(libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    none.cast(),
                ))?;
                let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                if read_only {
                    flags |= libc::MS_RDONLY;
                }
                check(libc::mount(none, to.as_ptr(), none, flags, none.cast()))
            }
        };
        // SAFETY: see `Confinement::enter`.
        unsafe {
            check(libc::unshare(self.unshare_flags))?;
            // Mounts made from here on stay in this namespace.
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"size=64m,mode=755".as_ptr().cast(),
            ))?;
            for (host, inside, link) in &self.system {
                match link {
                    Some(target) => check(libc::symlink(target.as_ptr(), inside.as_ptr()))?,
                    None => {
                        check(libc::mkdir(inside.as_ptr(), 0o755))?;
                        bind(host, inside, true)?;
                    }
                }
            }
            check(libc::mkdir(self.dev.as_ptr(), 0o755))?;
            for (host, inside) in &self.devices {
                let fd = libc::open(inside.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                bind(host, inside, false)?;
            }
            check(libc::mkdir(self.tmp.as_ptr(), 0o1777))?;
            check(libc::chmod(self.tmp.as_ptr(), 0o1777))?;
            check(libc::mkdir(self.workspace.1.as_ptr(), 0o755))?;
            bind(&self.workspace.0, &self.workspace.1, false)?;
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The sandbox's root is a directory only mounted over inside each run's own
/// namespace; it stays empty outside.
pub(crate) fn mount_point(base: &Path) -> PathBuf {
    base.join("sandbox-root")
}
