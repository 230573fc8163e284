//! Storage failing below the kernel, for real: the data directory on a small
//! tmpfs that fills up. The kernel stops acknowledging with one clear error,
//! `/readyz` says why, and a restart with room recovers everything it had
//! acknowledged. (Needs root to mount; under `CI=true` a machine without it
//! fails the test.)

mod support;

use std::path::{Path, PathBuf};
use support::{Kernel, json};

/// Unmounts the small file system when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A tmpfs of `size` on `dir`, private to the kernel's user; or why not.
fn mount_tmpfs(dir: &Path, size: &str) -> Result<Mounted, String> {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    match mounted.status.success() {
        true => Ok(Mounted(dir.to_owned())),
        false => Err(String::from_utf8_lossy(&mounted.stderr).trim().to_owned()),
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let fs = rustix::fs::statvfs(dir).unwrap();
    fs.f_bavail * fs.f_frsize
}

#[test]
fn a_full_disk_stops_acknowledging_says_why_and_a_restart_with_room_recovers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let _mounted = match mount_tmpfs(dir.path(), "32m") {
        Ok(mounted) => mounted,
        Err(why) => return support::cannot_check(&format!("cannot mount a tmpfs: {why}")),
    };
    let data = dir.path().to_owned();
    let config = tempfile::NamedTempFile::new().unwrap();
    // Small journal segments: the journal needs new room soon, as fjall does.
    std::fs::write(
        config.path(),
        "max_body_bytes = 262144\n[ring]\njournal_segment_bytes = 1048576\n",
    )
    .unwrap();
    let mut kernel = Kernel::start_in(dir, &["--config", config.path().to_str().unwrap()]);
    let agent = kernel.new_agent();
    let filler = data.join("filler");
    let leave = 3 << 20;
    std::fs::write(&filler, vec![0u8; (free_bytes(&data).saturating_sub(leave)) as usize]).unwrap();

    let value = format!("\"{}\"", "x".repeat(100_000));
    let (mut acked, mut refused) = (Vec::new(), None);
    for i in 0..400 {
        let out = kernel.cli(&["state", "set", &agent, &format!("k{i}"), &value, "--json"]);
        if !out.status.success() {
            refused = Some(support::stderr(&out));
            break;
        }
        acked.push(i);
    }
    let refused = refused.expect("the disk filled up and a write was refused");
    assert!(!acked.is_empty(), "some writes went through first");
    assert!(refused.contains("unavailable"), "{refused}");
    assert_eq!(refused.trim().lines().count(), 1, "one clear error: {refused}");
    let ready = kernel.readyz();
    eprintln!("refused with: {refused}\n/readyz: {ready}");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(
        ready.contains("storage failed") && ready.contains("no space is left"),
        "/readyz says why: {ready}"
    );
    let again = kernel.cli(&["state", "set", &agent, "after", "1"]);
    assert!(!again.status.success(), "nothing more is acknowledged");

    kernel.crash();
    std::fs::remove_file(&filler).unwrap();
    kernel.restart();
    for i in acked {
        let got = json(&kernel.cli(&["state", "get", &agent, &format!("k{i}"), "--json"]));
        assert_eq!(
            got["value"].as_str().map(str::len),
            Some(100_000),
            "acknowledged write k{i} survived"
        );
    }
    assert!(kernel.readyz().starts_with("HTTP/1.1 200"));
}
