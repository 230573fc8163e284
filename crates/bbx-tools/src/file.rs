//! `tool.file`: read, write, append, list, stat and delete inside the agent's
//! workspace.
//!
//! Paths are relative to the workspace. A path that is absolute or climbs with `..`
//! is refused before anything is touched (the op completes with
//! `path_outside_workspace`, like every other refusal of the sandbox); every other
//! path is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from the workspace's
//! directory, so the kernel itself refuses any resolution (a symlink, even one made
//! a moment ago by the agent's own program) that would leave it.

use base64::Engine as _;
use bbx_core::{Error, ErrorCode, Result};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde::Deserialize;
use serde_json::{Value, json};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

/// Default most bytes a `read` returns.
const DEFAULT_READ_BYTES: u64 = 1 << 20;
/// Most bytes a `read` may ask for.
const MAX_READ_BYTES: u64 = 16 << 20;
/// Most entries a `list` returns.
const MAX_LIST: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileOp {
    Read,
    Write,
    Append,
    List,
    Stat,
    Delete,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileCall {
    pub op: FileOp,
    /// Relative to the workspace; "." is the workspace itself.
    pub path: String,
    /// Text to write or append.
    #[serde(default)]
    pub content: Option<String>,
    /// Bytes to write or append, base64-encoded.
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Most bytes a read returns (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

fn outside(path: &str, why: &str) -> Error {
    Error::new(
        ErrorCode::PathOutsideWorkspace,
        format!("path {path:?} is outside the agent's workspace: {why}"),
    )
    .with_details(json!({ "path": path }))
}

impl FileCall {
    pub(crate) fn checked(self) -> Result<Self> {
        if self.path.is_empty() || self.path.contains('\0') {
            return Err(Error::invalid_field("args.path", "path must be non-empty, without NUL"));
        }
        let writes = matches!(self.op, FileOp::Write | FileOp::Append);
        match (&self.content, &self.content_base64) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid_field(
                    "args.content",
                    "give content or content_base64, not both",
                ));
            }
            (None, None) if writes => {
                return Err(Error::invalid_field(
                    "args.content",
                    "write and append need content or content_base64",
                ));
            }
            (Some(_), None) | (None, Some(_)) if !writes => {
                return Err(Error::invalid_field(
                    "args.content",
                    "only write and append take content",
                ));
            }
            _ => {}
        }
        if let Some(encoded) = &self.content_base64 {
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| Error::invalid_field("args.content_base64", format!("not valid base64: {e}")))?;
        }
        if self.max_bytes.is_some_and(|m| m == 0 || m > MAX_READ_BYTES) {
            return Err(Error::invalid_field(
                "args.max_bytes",
                format!("max_bytes must be 1 to {MAX_READ_BYTES}"),
            ));
        }
        if self.op == FileOp::Delete && self.normal_parts().is_empty() {
            return Err(Error::invalid_field(
                "args.path",
                "the workspace itself cannot be deleted",
            ));
        }
        Ok(self)
    }

    pub fn is_read_only(&self) -> bool {
        matches!(self.op, FileOp::Read | FileOp::List | FileOp::Stat)
    }

    fn normal_parts(&self) -> Vec<&str> {
        self.path.split('/').filter(|p| !p.is_empty() && *p != ".").collect()
    }

    fn content(&self) -> Vec<u8> {
        match (&self.content, &self.content_base64) {
            (Some(text), _) => text.as_bytes().to_vec(),
            // Checked when the call was parsed.
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    /// Runs the call in `workspace` (blocking).
    pub fn run(&self, workspace: &Path) -> Result<Value> {
        relative_inside(&self.path)?;
        let root = rustix::fs::open(
            workspace,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::internal(format!("cannot open the workspace: {e}")))?;
        let path = self.path.as_str();
        let fail = |e: Errno| errno_error(path, e);
        match self.op {
            FileOp::Read => {
                let fd = regular_file(beneath(&root, path, OFlags::RDONLY | OFlags::NONBLOCK), path)?;
                let limit = self.max_bytes.unwrap_or(DEFAULT_READ_BYTES);
                let size = rustix::fs::fstat(&fd).map_err(fail)?.st_size as u64;
                let mut file = std::fs::File::from(fd);
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, limit), &mut bytes)
                    .map_err(|e| Error::new(ErrorCode::FailedPrecondition, format!("cannot read {path:?}: {e}")))?;
                let truncated = size > bytes.len() as u64;
                let mut out = json!({ "path": path, "size": size, "truncated": truncated });
                match String::from_utf8(bytes) {
                    Ok(text) => out["content"] = Value::String(text),
                    Err(e) => {
                        out["content_base64"] =
                            Value::String(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
                    }
                }
                Ok(out)
            }
            FileOp::Write | FileOp::Append => {
                let parts = self.normal_parts();
                let (name, dirs) = parts
                    .split_last()
                    .ok_or_else(|| Error::invalid_field("args.path", "write and append need a file name"))?;
                let parent = make_dirs(&root, dirs).map_err(fail)?;
                let mode = if self.op == FileOp::Append {
                    OFlags::APPEND
                } else {
                    OFlags::TRUNC
                };
                let fd = regular_file(
                    beneath(&parent, name, OFlags::WRONLY | OFlags::CREATE | OFlags::NONBLOCK | mode),
                    path,
                )?;
                hand_over(&root, &fd);
                let content = self.content();
                let mut file = std::fs::File::from(fd);
                std::io::Write::write_all(&mut file, &content)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| Error::new(ErrorCode::FailedPrecondition, format!("cannot write {path:?}: {e}")))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Ok(json!({ "path": path, "written": content.len(), "size": size }))
            }
            FileOp::List => {
                let fd = beneath(&root, path, OFlags::RDONLY | OFlags::DIRECTORY).map_err(fail)?;
                let mut entries = Vec::new();
                let mut truncated = false;
                for entry in Dir::read_from(&fd).map_err(fail)? {
                    let entry = entry.map_err(fail)?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name == "." || name == ".." {
                        continue;
                    }
                    if entries.len() == MAX_LIST {
                        truncated = true;
                        break;
                    }
                    let stat = rustix::fs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW).ok();
                    entries.push(json!({
                        "name": name,
                        "type": stat.as_ref().map_or("unknown", |s| type_name(FileType::from_raw_mode(s.st_mode))),
                        "size": stat.map_or(0, |s| s.st_size),
                    }));
                }
                entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                Ok(json!({ "path": path, "entries": entries, "truncated": truncated }))
            }
            FileOp::Stat => {
                let fd = beneath(&root, path, OFlags::PATH).map_err(fail)?;
                let stat = rustix::fs::fstat(&fd).map_err(fail)?;
                Ok(json!({
                    "path": path,
                    "type": type_name(FileType::from_raw_mode(stat.st_mode)),
                    "size": stat.st_size,
                    "mode": format!("{:o}", stat.st_mode & 0o7777),
                    "modified": stat.st_mtime,
                }))
            }
            FileOp::Delete => {
                let parts = self.normal_parts();
                let (name, dirs) = parts.split_last().expect("checked: delete names an entry");
                let parent_path = if dirs.is_empty() {
                    ".".to_owned()
                } else {
                    dirs.join("/")
                };
                let parent = beneath(&root, &parent_path, OFlags::PATH | OFlags::DIRECTORY).map_err(fail)?;
                let stat = rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW).map_err(fail)?;
                let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
                let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
                rustix::fs::unlinkat(&parent, *name, flags).map_err(fail)?;
                Ok(json!({ "path": path, "deleted": true }))
            }
        }
    }
}

/// Refuses a path that is absolute or climbs out with `..`, before any lookup.
pub(crate) fn relative_inside(path: &str) -> Result<()> {
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::Prefix(_) => return Err(outside(path, "it is absolute")),
            Component::ParentDir => return Err(outside(path, "it contains ..")),
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    Ok(())
}

/// Checks that `path` is a directory inside `workspace`.
pub(crate) fn directory_inside(workspace: &Path, path: &str) -> Result<()> {
    relative_inside(path)?;
    let root = rustix::fs::open(
        workspace,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::internal(format!("cannot open the workspace: {e}")))?;
    beneath(&root, path, OFlags::PATH | OFlags::DIRECTORY)
        .map(drop)
        .map_err(|e| errno_error(path, e))
}

/// Opens `path` below `dir`, never resolving outside it.
fn beneath(dir: &impl AsFd, path: &str, flags: OFlags) -> std::result::Result<OwnedFd, Errno> {
    // openat2 refuses a mode unless it creates.
    let mode = if flags.contains(OFlags::CREATE) {
        Mode::from_raw_mode(0o644)
    } else {
        Mode::empty()
    };
    rustix::fs::openat2(
        dir,
        path,
        flags | OFlags::CLOEXEC,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The opened file, if it is a regular one, made blocking again. It was opened
/// without blocking so that a FIFO (which an agent's program can make) cannot
/// hang the open forever, and is refused here, as are devices and sockets.
fn regular_file(opened: std::result::Result<OwnedFd, Errno>, path: &str) -> Result<OwnedFd> {
    let fd = opened.map_err(|e| errno_error(path, e))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| errno_error(path, e))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Error::new(
            ErrorCode::FailedPrecondition,
            format!("{path:?} is not a regular file"),
        ));
    }
    rustix::fs::fcntl_setfl(
        &fd,
        rustix::fs::fcntl_getfl(&fd).map_err(|e| errno_error(path, e))? - OFlags::NONBLOCK,
    )
    .map_err(|e| errno_error(path, e))?;
    Ok(fd)
}

/// Makes each directory of `dirs` in turn below `root`; the last one, opened.
fn make_dirs(root: &OwnedFd, dirs: &[&str]) -> std::result::Result<OwnedFd, Errno> {
    let mut current = beneath(root, ".", OFlags::PATH | OFlags::DIRECTORY)?;
    for dir in dirs {
        match rustix::fs::mkdirat(&current, *dir, Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                let made = beneath(&current, dir, OFlags::PATH | OFlags::DIRECTORY)?;
                hand_over(root, &made);
                current = made;
            }
            Err(Errno::EXIST) => current = beneath(&current, dir, OFlags::PATH | OFlags::DIRECTORY)?,
            Err(e) => return Err(e),
        }
    }
    Ok(current)
}

/// Gives what the kernel made to the workspace's owner, so the agent's programs
/// (which run as that user) can use it.
fn hand_over(root: &OwnedFd, made: &OwnedFd) {
    if let Ok(owner) = rustix::fs::fstat(root) {
        let uid = rustix::fs::Uid::from_raw(owner.st_uid);
        let gid = rustix::fs::Gid::from_raw(owner.st_gid);
        // Fails only when the kernel is not root, and then it made them as the owner anyway.
        let _ = rustix::fs::chownat(made, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH);
    }
}

fn type_name(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        _ => "other",
    }
}

fn errno_error(path: &str, e: Errno) -> Error {
    match e {
        // EXDEV: resolution would leave the workspace; ELOOP: a magic link or a
        // symlink loop, neither of which may be followed.
        Errno::XDEV | Errno::LOOP => outside(path, "it resolves through a link that leads out"),
        Errno::NOENT => Error::not_found("file", path),
        Errno::ISDIR => Error::new(ErrorCode::FailedPrecondition, format!("{path:?} is a directory")),
        Errno::NOTDIR => Error::new(ErrorCode::FailedPrecondition, format!("{path:?} is not a directory")),
        Errno::NOTEMPTY => Error::new(
            ErrorCode::FailedPrecondition,
            format!("directory {path:?} is not empty"),
        ),
        Errno::EXIST => Error::new(
            ErrorCode::AlreadyExists,
            format!("{path:?} exists and is not a directory"),
        ),
        e => Error::new(ErrorCode::FailedPrecondition, format!("{path:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(op: FileOp, path: &str, content: Option<&str>) -> Result<FileCall> {
        FileCall {
            op,
            path: path.into(),
            content: content.map(Into::into),
            content_base64: None,
            max_bytes: None,
        }
        .checked()
    }

    #[test]
    fn files_are_written_read_listed_and_deleted_inside_the_workspace() {
        let ws = tempfile::tempdir().unwrap();
        let write = call(FileOp::Write, "notes/a.txt", Some("hello")).unwrap();
        assert_eq!(write.run(ws.path()).unwrap()["written"], 5);
        call(FileOp::Append, "notes/a.txt", Some(" world"))
            .unwrap()
            .run(ws.path())
            .unwrap();
        let read = call(FileOp::Read, "notes/a.txt", None).unwrap().run(ws.path()).unwrap();
        assert_eq!(read["content"], "hello world");
        let list = call(FileOp::List, "notes", None).unwrap().run(ws.path()).unwrap();
        assert_eq!(list["entries"][0]["name"], "a.txt");
        assert_eq!(list["entries"][0]["type"], "file");
        let stat = call(FileOp::Stat, "notes/a.txt", None).unwrap().run(ws.path()).unwrap();
        assert_eq!(stat["size"], 11);
        call(FileOp::Delete, "notes/a.txt", None)
            .unwrap()
            .run(ws.path())
            .unwrap();
        let gone = call(FileOp::Read, "notes/a.txt", None)
            .unwrap()
            .run(ws.path())
            .unwrap_err();
        assert_eq!(gone.code, ErrorCode::NotFound);
    }

    #[test]
    fn absolute_paths_and_dot_dot_are_refused_before_anything_is_touched() {
        let ws = tempfile::tempdir().unwrap();
        for path in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            let e = call(FileOp::Read, path, None).unwrap().run(ws.path()).unwrap_err();
            assert_eq!(e.code, ErrorCode::PathOutsideWorkspace, "{path}");
        }
        let planted = call(FileOp::Write, "../planted", Some("x"))
            .unwrap()
            .run(ws.path())
            .unwrap_err();
        assert_eq!(planted.code, ErrorCode::PathOutsideWorkspace);
        assert!(!ws.path().parent().unwrap().join("planted").exists());
        assert_eq!(
            call(FileOp::Delete, ".", None).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(call(FileOp::Write, "a", None).is_err(), "write needs content");
        assert!(call(FileOp::Read, "a", Some("x")).is_err(), "read takes none");
    }

    #[test]
    fn symlinks_that_lead_out_are_refused_and_those_inside_are_followed() {
        let outside_dir = tempfile::tempdir().unwrap();
        std::fs::write(outside_dir.path().join("secret"), "s3cret").unwrap();
        let ws = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside_dir.path().join("secret"), ws.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside_dir.path(), ws.path().join("dir")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", ws.path().join("magic")).unwrap();
        for path in ["link", "dir/secret", "magic"] {
            let e = call(FileOp::Read, path, None).unwrap().run(ws.path()).unwrap_err();
            assert_eq!(e.code, ErrorCode::PathOutsideWorkspace, "{path}");
        }
        let e = call(FileOp::Write, "dir/planted", Some("x"))
            .unwrap()
            .run(ws.path())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PathOutsideWorkspace);
        assert!(!outside_dir.path().join("planted").exists());

        std::fs::write(ws.path().join("real"), "inside").unwrap();
        std::os::unix::fs::symlink("real", ws.path().join("alias")).unwrap();
        let read = call(FileOp::Read, "alias", None).unwrap().run(ws.path()).unwrap();
        assert_eq!(read["content"], "inside");
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_hanging_the_call() {
        let ws = tempfile::tempdir().unwrap();
        let fifo = ws.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        for op in [FileOp::Read, FileOp::Append] {
            let content = (op == FileOp::Append).then_some("x");
            let e = call(op, "pipe", content).unwrap().run(ws.path()).unwrap_err();
            assert!(matches!(e.code, ErrorCode::FailedPrecondition), "{op:?}: {e:?}");
        }
    }

    #[test]
    fn binary_content_round_trips_as_base64_and_reads_are_capped() {
        let ws = tempfile::tempdir().unwrap();
        let bytes = [0u8, 159, 146, 150, 255];
        let write = FileCall {
            op: FileOp::Write,
            path: "b.bin".into(),
            content: None,
            content_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            max_bytes: None,
        }
        .checked()
        .unwrap();
        write.run(ws.path()).unwrap();
        let read = FileCall {
            op: FileOp::Read,
            path: "b.bin".into(),
            content: None,
            content_base64: None,
            max_bytes: Some(3),
        }
        .checked()
        .unwrap()
        .run(ws.path())
        .unwrap();
        assert_eq!(read["truncated"], true);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(read["content_base64"].as_str().unwrap())
                .unwrap(),
            &bytes[..3]
        );
    }
}
