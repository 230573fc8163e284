//! An agent's workspace files as a snapshot part, and put back.
//!
//! Records are keyed by the path inside the workspace (a directory's with a
//! trailing `/`); a value is the mode (u32) and, for a file, its bytes.
//! Symbolic links and special files are left out: a workspace's tools make
//! regular files, and a link restored could point anywhere.
//!
//! A restore writes the files into a directory beside the workspace (only
//! the kernel's until it is complete), then swaps the two with renames, so
//! the workspace is never half-restored.

use bbx_core::{Error, Result};
use rustix::fs::{Mode, OFlags};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

/// Every directory and regular file under `root`, in path order. Each entry
/// is opened relative to its directory without following links, and checked
/// as opened: a tool that swaps a file for a link while this runs gets the
/// link left out, never what it points to. An entry that vanishes meanwhile
/// is left out too.
pub fn capture(root: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = match rustix::fs::open(root, flags, Mode::empty()) {
        Ok(dir) => dir,
        Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
        Err(e) => return Err(io("cannot open the workspace", root, e)),
    };
    let mut records = Vec::new();
    walk(root, &dir, &[], &mut records)?;
    records.sort();
    Ok(records)
}

fn walk(root: &Path, dir: &OwnedFd, prefix: &[u8], records: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let entries = rustix::fs::Dir::read_from(dir).map_err(|e| io("cannot read the workspace", root, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot read the workspace", root, e))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        // Non-blocking: a FIFO opens without waiting for a writer (and is then left out).
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // Gone since it was listed, or a link.
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => continue,
            Err(e) => return Err(io("cannot open an entry of the workspace", root, e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io("cannot read an entry of the workspace", root, e))?;
        let mut relative = prefix.to_vec();
        relative.extend_from_slice(name);
        let mode = (stat.st_mode & 0o7777).to_le_bytes().to_vec();
        match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
            rustix::fs::FileType::Directory => {
                relative.push(b'/');
                records.push((relative.clone(), mode));
                walk(root, &fd, &relative, records)?;
            }
            rustix::fs::FileType::RegularFile => {
                let mut value = mode;
                std::fs::File::from(fd)
                    .read_to_end(&mut value)
                    .map_err(|e| io("cannot read a file of the workspace", root, e))?;
                records.push((relative, value));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where a restore stages the files of `workspace`.
pub fn staging_dir(workspace: &Path, tag: &str) -> PathBuf {
    let name = workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    workspace.with_file_name(format!(".{name}.restore-{tag}"))
}

/// Writes `records` into `staging` (made anew), then gives it the owner and
/// mode `workspace` has. Until then only the kernel may enter it (0700), so
/// nothing the agent runs can plant a link in it to be written through.
pub fn stage(workspace: &Path, staging: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(|e| io("cannot clear", staging, e))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(|e| io("cannot make", staging, e))?;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for (key, value) in records {
        let (is_dir, relative) = match key.strip_suffix(b"/") {
            Some(dir) => (true, dir),
            None => (false, key.as_slice()),
        };
        let relative = Path::new(checked_os_str(relative)?);
        if relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(crate::chunk::corrupt(
                "a workspace path in a snapshot leaves the workspace",
            ));
        }
        if value.len() < 4 {
            return Err(crate::chunk::corrupt("a workspace record has no mode"));
        }
        let mode = u32::from_le_bytes(value[..4].try_into().expect("4 bytes")) & 0o7777;
        let path = staging.join(relative);
        if is_dir {
            std::fs::create_dir_all(&path).map_err(|e| io("cannot make", &path, e))?;
            dirs.push((path, mode));
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("cannot make", parent, e))?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
                .map_err(|e| io("cannot write", &path, e))?;
            file.write_all(&value[4..]).map_err(|e| io("cannot write", &path, e))?;
            files.push((path, mode));
        }
    }
    let owner = std::fs::metadata(workspace).ok();
    // Files first, then directories deepest first: a read-only directory gets
    // its mode once nothing more is written into it.
    dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    let workspace_mode = owner.as_ref().map_or(0o700, |m| m.mode() & 0o7777);
    let everything = files
        .into_iter()
        .chain(dirs)
        .chain([(staging.to_owned(), workspace_mode)]);
    for (path, mode) in everything {
        if let Some(meta) = &owner {
            std::os::unix::fs::lchown(&path, Some(meta.uid()), Some(meta.gid()))
                .map_err(|e| io("cannot chown", &path, e))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("cannot set the mode of", &path, e))?;
    }
    Ok(())
}

fn checked_os_str(bytes: &[u8]) -> Result<&std::ffi::OsStr> {
    use std::os::unix::ffi::OsStrExt;
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(crate::chunk::corrupt(
            "a workspace path in a snapshot is empty or holds a NUL",
        ));
    }
    Ok(std::ffi::OsStr::from_bytes(bytes))
}

/// Puts the staged files in the workspace's place: the workspace is moved
/// aside and the staged files moved in (moved back if that fails); the old
/// files are removed after, off the caller's thread.
pub fn swap(workspace: &Path, staging: &Path) -> Result<()> {
    let mut aside = staging.as_os_str().to_owned();
    aside.push(".old");
    let aside = PathBuf::from(aside);
    let had = workspace.exists();
    if had {
        std::fs::rename(workspace, &aside).map_err(|e| io("cannot move aside", workspace, e))?;
    }
    if let Err(e) = std::fs::rename(staging, workspace) {
        if had {
            let _ = std::fs::rename(&aside, workspace);
        }
        return Err(io("cannot move into place", staging, e));
    }
    if let Some(parent) = workspace.parent()
        && let Ok(dir) = std::fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    if had {
        std::thread::spawn(move || {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                tracing::warn!(path = %aside.display(), error = %e, "a restored workspace's old files stay");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_comes_back_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(workspace.join("notes/deep")).unwrap();
        std::fs::write(workspace.join("a.txt"), b"alpha").unwrap();
        std::fs::write(workspace.join("notes/deep/b.bin"), [0u8, 1, 2, 255]).unwrap();
        std::fs::set_permissions(workspace.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let captured = capture(&workspace).unwrap();
        std::fs::write(workspace.join("a.txt"), b"changed").unwrap();
        std::fs::write(workspace.join("new.txt"), b"later").unwrap();
        let staging = staging_dir(&workspace, "t1");
        stage(&workspace, &staging, &captured).unwrap();
        swap(&workspace, &staging).unwrap();
        assert_eq!(std::fs::read(workspace.join("a.txt")).unwrap(), b"alpha");
        assert!(!workspace.join("new.txt").exists());
        assert_eq!(
            std::fs::read(workspace.join("notes/deep/b.bin")).unwrap(),
            [0u8, 1, 2, 255]
        );
        let mode = std::fs::metadata(workspace.join("a.txt")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(capture(&workspace).unwrap(), captured);
        assert!(!staging.exists());
    }

    #[test]
    fn a_path_that_leaves_the_workspace_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let staging = staging_dir(&workspace, "t2");
        let evil = vec![(b"../escape".to_vec(), 0o644u32.to_le_bytes().to_vec())];
        assert!(stage(&workspace, &staging, &evil).is_err());
        assert!(!dir.path().join("escape").exists());
    }
}
