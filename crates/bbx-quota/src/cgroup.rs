//! Process limits for tool runs: one control group per run, with cgroup v2 where its
//! controllers are enabled, cgroup v1 otherwise, and rlimits as the last fallback, all
//! behind [`Driver`].
//!
//! A run's group is created before its process starts; the child joins it itself,
//! between `fork` and `exec` (by writing `0` to each `cgroup.procs` it is given), so
//! not even its first instruction runs outside the limits, and every process it
//! forks is born inside. When the run ends the group is emptied (every process in it
//! killed, however it was daemonized) and removed.

use bbx_core::quota::ProcessLimits;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CFS period the CPU share is expressed against (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Creates a control group per tool run.
pub trait Driver: Send + Sync + fmt::Debug {
    /// "cgroup v2", "cgroup v1" or "rlimits".
    fn kind(&self) -> &'static str;
    /// Where groups are made (one directory per controller), for `cgroup-status`.
    fn roots(&self) -> Vec<PathBuf>;
    /// A new group named `name` with `limits` applied.
    fn create(&self, name: &str, limits: &ProcessLimits) -> io::Result<Box<dyn Group>>;
    /// Kills and removes every group in the scope: what a kernel that died left
    /// running. Call it at start, when the scope is this kernel's alone.
    fn sweep(&self);
    /// Removes the scope itself, once every group in it is gone (at shutdown).
    fn close(&self) {
        for root in self.roots() {
            let _ = std::fs::remove_dir(root);
        }
    }
    /// The groups that exist now, by name.
    fn groups(&self) -> Vec<String> {
        let Some(root) = self.roots().into_iter().next() else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// One run's control group.
pub trait Group: Send + Sync {
    /// The `cgroup.procs` files the child writes `0` to before `exec`.
    fn join_files(&self) -> Vec<PathBuf>;
    /// The rlimits the child sets before `exec` (the fallback driver's only means).
    fn rlimits(&self) -> Vec<(Rlimit, u64)>;
    /// Kills every process in the group.
    fn kill_all(&self);
    /// What the limits did to the run so far.
    fn events(&self) -> Events;
}

/// An rlimit the child sets on itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// Address space, the closest rlimit to a memory limit.
    AddressSpace,
    /// Processes of the (unprivileged) uid the run uses.
    Processes,
}

/// What a group's limits did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    /// Processes killed by the out-of-memory killer at the group's memory limit.
    pub oom_kills: u64,
    /// Forks refused at the group's pids limit.
    pub pids_refused: u64,
    /// Periods in which the group used up its CPU share.
    pub cpu_throttled: u64,
}

/// The best driver this machine offers: v2 with memory, cpu and pids enabled, else v1
/// with those controllers mounted and writable, else rlimits. `scope` names the
/// subtree (a relative path) BBX creates its groups in.
pub fn detect(scope: &str) -> Box<dyn Driver> {
    match V2::detect(scope) {
        Ok(v2) => return Box::new(v2),
        Err(e) => tracing::debug!(error = %e, "cgroup v2 is not usable"),
    }
    match V1::detect(scope) {
        Ok(v1) => return Box::new(v1),
        Err(e) => tracing::debug!(error = %e, "cgroup v1 is not usable"),
    }
    tracing::warn!("no usable cgroup controllers: tool processes get rlimits only (no CPU share)");
    Box::new(Rlimits)
}

/// The cgroup of this process for `controller` (v1) or the unified one (`""`), as a
/// path below the hierarchy's mount point.
fn own_cgroup(controller: &str) -> io::Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/cgroup")?;
    for line in table.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        if matches {
            return Ok(PathBuf::from(path.trim_start_matches('/')));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("this process is in no {controller:?} cgroup"),
    ))
}

fn read_counter(file: &Path, name: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == name).then(|| value.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// Makes `dir` and checks that it took the controller's files.
fn make_dir(dir: &Path, probe: &str) -> io::Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if dir.join(probe).exists() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} has no {probe}", dir.display()),
        ))
    }
}

/// Kills the processes listed in `procs` until none is left (a process may fork
/// while the list is read; each round kills what the last one missed).
fn kill_listed(procs: &Path) {
    for _ in 0..100 {
        let Ok(list) = std::fs::read_to_string(procs) else {
            return;
        };
        let pids: Vec<i32> = list.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Removes a group's directory once its processes are gone (they may take a moment
/// to be reaped after SIGKILL).
fn remove_dir(dir: &Path) {
    let mut pause = Duration::from_micros(50);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
    tracing::warn!(dir = %dir.display(), "a tool's cgroup could not be removed");
}

/// cgroup v2: one directory in the unified hierarchy.
#[derive(Debug)]
pub struct V2 {
    root: PathBuf,
}

impl V2 {
    fn detect(scope: &str) -> io::Result<Self> {
        let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|m| m.join("cgroup.controllers").exists())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))?;
        let mut root = mount.join(own_cgroup("")?);
        // Each level of the scope passes the controllers down to the next.
        for level in Path::new(scope).components() {
            root.push(level);
            make_dir(&root, "cgroup.controllers")?;
            let available = std::fs::read_to_string(root.join("cgroup.controllers"))?;
            for controller in ["memory", "pids", "cpu"] {
                if !available.split_whitespace().any(|c| c == controller) {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("the {controller} controller is not enabled for {}", root.display()),
                    ));
                }
            }
            std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
        }
        Ok(Self { root })
    }
}

impl Driver for V2 {
    fn kind(&self) -> &'static str {
        "cgroup v2"
    }

    fn roots(&self) -> Vec<PathBuf> {
        vec![self.root.clone()]
    }

    fn sweep(&self) {
        for name in self.groups() {
            drop(V2Group {
                dir: self.root.join(name),
            });
        }
    }

    fn create(&self, name: &str, limits: &ProcessLimits) -> io::Result<Box<dyn Group>> {
        let dir = self.root.join(name);
        make_dir(&dir, "cgroup.procs")?;
        let group = V2Group { dir };
        if let Some(bytes) = limits.memory_bytes {
            std::fs::write(group.dir.join("memory.max"), bytes.to_string())?;
            // Swap would let a process outlive its limit slowly instead of being killed.
            let _ = std::fs::write(group.dir.join("memory.swap.max"), "0");
        }
        if let Some(pids) = limits.pids {
            std::fs::write(group.dir.join("pids.max"), pids.to_string())?;
        }
        if let Some(percent) = limits.cpu_percent {
            let quota = CPU_PERIOD_US * u64::from(percent) / 100;
            std::fs::write(group.dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(Box::new(group))
    }
}

struct V2Group {
    dir: PathBuf,
}

impl Group for V2Group {
    fn join_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn rlimits(&self) -> Vec<(Rlimit, u64)> {
        Vec::new()
    }

    fn kill_all(&self) {
        // cgroup.kill (Linux 5.14) kills the whole group at once, forks in flight too.
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
            kill_listed(&self.dir.join("cgroup.procs"));
        }
    }

    fn events(&self) -> Events {
        Events {
            oom_kills: read_counter(&self.dir.join("memory.events"), "oom_kill"),
            pids_refused: read_counter(&self.dir.join("pids.events"), "max"),
            cpu_throttled: read_counter(&self.dir.join("cpu.stat"), "nr_throttled"),
        }
    }
}

impl Drop for V2Group {
    fn drop(&mut self) {
        self.kill_all();
        remove_dir(&self.dir);
    }
}

/// cgroup v1: one directory in each of the memory, cpu and pids hierarchies.
#[derive(Debug)]
pub struct V1 {
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
}

impl V1 {
    fn detect(scope: &str) -> io::Result<Self> {
        let root = |controller: &str, probe: &str| -> io::Result<PathBuf> {
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(own_cgroup(controller)?)
                .join(scope);
            make_dir(&dir, probe)?;
            Ok(dir)
        };
        Ok(Self {
            memory: root("memory", "memory.limit_in_bytes")?,
            cpu: root("cpu", "cpu.cfs_quota_us")?,
            pids: root("pids", "pids.max")?,
        })
    }
}

impl Driver for V1 {
    fn kind(&self) -> &'static str {
        "cgroup v1"
    }

    fn roots(&self) -> Vec<PathBuf> {
        vec![self.memory.clone(), self.cpu.clone(), self.pids.clone()]
    }

    fn sweep(&self) {
        for name in self.groups() {
            drop(V1Group {
                memory: self.memory.join(&name),
                cpu: self.cpu.join(&name),
                pids: self.pids.join(&name),
            });
        }
    }

    fn create(&self, name: &str, limits: &ProcessLimits) -> io::Result<Box<dyn Group>> {
        let group = V1Group {
            memory: self.memory.join(name),
            cpu: self.cpu.join(name),
            pids: self.pids.join(name),
        };
        make_dir(&group.memory, "memory.limit_in_bytes")?;
        make_dir(&group.cpu, "cpu.cfs_quota_us")?;
        make_dir(&group.pids, "pids.max")?;
        if let Some(bytes) = limits.memory_bytes {
            std::fs::write(group.memory.join("memory.limit_in_bytes"), bytes.to_string())?;
            // Memory plus swap at the same limit: no swapping past it.
            let _ = std::fs::write(group.memory.join("memory.memsw.limit_in_bytes"), bytes.to_string());
        }
        if let Some(pids) = limits.pids {
            std::fs::write(group.pids.join("pids.max"), pids.to_string())?;
        }
        if let Some(percent) = limits.cpu_percent {
            std::fs::write(group.cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
            let quota = CPU_PERIOD_US * u64::from(percent) / 100;
            std::fs::write(group.cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        Ok(Box::new(group))
    }
}

struct V1Group {
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
}

impl Group for V1Group {
    fn join_files(&self) -> Vec<PathBuf> {
        [&self.memory, &self.cpu, &self.pids]
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    fn rlimits(&self) -> Vec<(Rlimit, u64)> {
        Vec::new()
    }

    fn kill_all(&self) {
        kill_listed(&self.pids.join("cgroup.procs"));
    }

    fn events(&self) -> Events {
        Events {
            oom_kills: read_counter(&self.memory.join("memory.oom_control"), "oom_kill"),
            pids_refused: read_counter(&self.pids.join("pids.events"), "max"),
            cpu_throttled: read_counter(&self.cpu.join("cpu.stat"), "nr_throttled"),
        }
    }
}

impl Drop for V1Group {
    fn drop(&mut self) {
        self.kill_all();
        for dir in [&self.memory, &self.cpu, &self.pids] {
            remove_dir(dir);
        }
    }
}

/// No cgroups: the child limits itself with rlimits. There is no CPU share, the
/// memory limit bounds address space (not resident memory), and the process limit
/// counts the run's uid, so it holds only when runs get a uid of their own.
#[derive(Debug)]
pub struct Rlimits;

impl Driver for Rlimits {
    fn kind(&self) -> &'static str {
        "rlimits"
    }

    fn roots(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Without groups, a dead kernel's leftovers cannot be found.
    fn sweep(&self) {}

    fn create(&self, _name: &str, limits: &ProcessLimits) -> io::Result<Box<dyn Group>> {
        let mut rlimits = Vec::new();
        if let Some(bytes) = limits.memory_bytes {
            rlimits.push((Rlimit::AddressSpace, bytes));
        }
        if let Some(pids) = limits.pids {
            rlimits.push((Rlimit::Processes, u64::from(pids)));
        }
        Ok(Box::new(RlimitGroup { rlimits }))
    }
}

struct RlimitGroup {
    rlimits: Vec<(Rlimit, u64)>,
}

impl Group for RlimitGroup {
    fn join_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn rlimits(&self) -> Vec<(Rlimit, u64)> {
        self.rlimits.clone()
    }

    /// The process group kill that every run gets is all there is.
    fn kill_all(&self) {}

    fn events(&self) -> Events {
        Events::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "low 0\nhigh 0\nmax 12\noom 2\noom_kill 3\n").unwrap();
        assert_eq!(read_counter(&file, "oom_kill"), 3);
        assert_eq!(read_counter(&file, "max"), 12);
        assert_eq!(read_counter(&file, "absent"), 0);
        assert_eq!(read_counter(&dir.path().join("missing"), "max"), 0);
    }

    #[test]
    fn the_fallback_driver_turns_limits_into_rlimits() {
        let group = Rlimits
            .create(
                "x",
                &ProcessLimits {
                    memory_bytes: Some(64 << 20),
                    pids: Some(8),
                    cpu_percent: Some(50),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            group.rlimits(),
            vec![(Rlimit::AddressSpace, 64 << 20), (Rlimit::Processes, 8)]
        );
        assert!(group.join_files().is_empty());
    }

    #[test]
    fn this_process_has_a_cgroup() {
        // Every Linux process is in some cgroup, v1 or v2.
        assert!(own_cgroup("").is_ok() || own_cgroup("memory").is_ok());
    }
}
