//! An agent's workspace files as a snapshot part, and put back.
//!
//! Records are keyed by the path inside the workspace (a directory's with a
//! trailing `/`); a value is the mode (u32) and, for a file, its bytes.
//! Symbolic links and special files are left out: a workspace's tools make
//! regular files, and a link restored could point anywhere.
//!
//! A restore writes the files into a directory beside the workspace, then
//! swaps the two with renames, so the workspace is never half-restored.

use bbx_core::{Error, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

/// Every directory and regular file under `root`, in path order.
pub fn capture(root: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut records = Vec::new();
    walk(root, root, &mut records)?;
    records.sort();
    Ok(records)
}

fn walk(root: &Path, dir: &Path, records: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(()),
        Err(e) => return Err(io("cannot read the workspace directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot read the workspace directory", dir, e))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io("cannot read", &path, e))?;
        let relative = path
            .strip_prefix(root)
            .expect("walked under the root")
            .as_os_str()
            .as_encoded_bytes()
            .to_vec();
        let mode = meta.permissions().mode().to_le_bytes().to_vec();
        if meta.is_dir() {
            let mut key = relative;
            key.push(b'/');
            records.push((key, mode));
            walk(root, &path, records)?;
        } else if meta.is_file() {
            let mut value = mode;
            value.extend(std::fs::read(&path).map_err(|e| io("cannot read", &path, e))?);
            records.push((relative, value));
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

/// Writes `records` into `staging` (made anew), owned as `workspace` is.
pub fn stage(workspace: &Path, staging: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(|e| io("cannot clear", staging, e))?;
    }
    std::fs::create_dir_all(staging).map_err(|e| io("cannot make", staging, e))?;
    let owner = std::fs::metadata(workspace).ok().map(|m| (m.uid(), m.gid()));
    let owned = |path: &Path| -> Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| io("cannot chown", path, e))?;
        }
        Ok(())
    };
    owned(staging)?;
    for (key, value) in records {
        let (is_dir, relative) = match key.strip_suffix(b"/") {
            Some(dir) => (true, dir),
            None => (false, key.as_slice()),
        };
        let relative = Path::new(unsafe_free_os_str(relative)?);
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
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("cannot make", parent, e))?;
            }
            std::fs::write(&path, &value[4..]).map_err(|e| io("cannot write", &path, e))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("cannot set the mode of", &path, e))?;
        owned(&path)?;
    }
    Ok(())
}

fn unsafe_free_os_str(bytes: &[u8]) -> Result<&std::ffi::OsStr> {
    use std::os::unix::ffi::OsStrExt;
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(crate::chunk::corrupt(
            "a workspace path in a snapshot is empty or holds a NUL",
        ));
    }
    Ok(std::ffi::OsStr::from_bytes(bytes))
}

/// Puts the staged files in the workspace's place (two renames); the old
/// files are removed after.
pub fn swap(workspace: &Path, staging: &Path) -> Result<()> {
    let old = staging.with_extension("old");
    if workspace.exists() {
        std::fs::rename(workspace, &old).map_err(|e| io("cannot move aside", workspace, e))?;
    }
    std::fs::rename(staging, workspace).map_err(|e| io("cannot move into place", staging, e))?;
    if let Some(parent) = workspace.parent()
        && let Ok(dir) = std::fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
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
