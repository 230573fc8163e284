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

/// Directories deeper than this are left out: each level holds a descriptor
/// while it is walked, and an agent's tools must not exhaust the kernel's.
const MAX_DEPTH: usize = 128;

fn walk(root: &Path, dir: &OwnedFd, prefix: &[u8], records: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    // Listed first and the listing closed, so a level holds one descriptor.
    let names: Vec<Vec<u8>> = rustix::fs::Dir::read_from(dir)
        .map_err(|e| io("cannot read the workspace", root, e))?
        .map(|entry| entry.map(|entry| entry.file_name().to_bytes().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| io("cannot read the workspace", root, e))?;
    let depth = prefix.iter().filter(|&&b| b == b'/').count();
    for name in &names {
        let name = name.as_slice();
        if name == b"." || name == b".." {
            continue;
        }
        // Only directories and regular files are opened (a socket or a device
        // is not), and what was opened must be what was looked at.
        let looked = match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(io("cannot read an entry of the workspace", root, e)),
        };
        if !matches!(
            rustix::fs::FileType::from_raw_mode(looked.st_mode),
            rustix::fs::FileType::Directory | rustix::fs::FileType::RegularFile
        ) {
            continue;
        }
        // Non-blocking: were it swapped for a FIFO, the open would not wait for a writer.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // Gone since it was looked at, or swapped for a link or a special file.
            Err(
                rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::NXIO | rustix::io::Errno::NODEV,
            ) => {
                continue;
            }
            Err(e) => return Err(io("cannot open an entry of the workspace", root, e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io("cannot read an entry of the workspace", root, e))?;
        if (stat.st_dev, stat.st_ino) != (looked.st_dev, looked.st_ino) {
            continue;
        }
        let mut relative = prefix.to_vec();
        relative.extend_from_slice(name);
        let mode = (stat.st_mode & 0o7777).to_le_bytes().to_vec();
        match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
            rustix::fs::FileType::Directory if depth < MAX_DEPTH => {
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

/// Removes, on a thread of its own, the staging directories and moved-aside
/// workspaces that restores a crash cut short left in `workspaces`.
pub fn remove_leftovers(workspaces: &Path) {
    let Ok(entries) = std::fs::read_dir(workspaces) else {
        return;
    };
    let leftovers: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with('.') && name.contains(".restore-")
        })
        .map(|entry| entry.path())
        .collect();
    if leftovers.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        for path in leftovers {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "a restore's leftover files stay");
            }
        }
    });
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
        let removal = std::thread::Builder::new().name("bbx-snapshot-clean".into()).spawn({
            let aside = aside.clone();
            move || {
                if let Err(e) = std::fs::remove_dir_all(&aside) {
                    tracing::warn!(path = %aside.display(), error = %e, "a restored workspace's old files stay");
                }
            }
        });
        if removal.is_err() {
            tracing::warn!(path = %aside.display(), "a restored workspace's old files stay until the next start");
        }
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
    fn links_sockets_and_fifos_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), workspace.join("link")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(workspace.join("sock")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            workspace.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::write(workspace.join("kept.txt"), b"kept").unwrap();
        let captured = capture(&workspace).unwrap();
        let names: Vec<&[u8]> = captured.iter().map(|(key, _)| key.as_slice()).collect();
        assert_eq!(names, [b"kept.txt".as_slice()]);
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
