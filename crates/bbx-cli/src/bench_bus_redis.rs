//! The Redis Streams reference of `bbx bench bus`: a `redis-server` of the
//! machine's, started on a scratch directory with `appendonly yes` and
//! `appendfsync always` (so that an acknowledged XADD is on disk, as a BBX publish
//! is), driven through the `redis` crate over loopback: `batched` is 4 clients
//! sending pipelines of `batch` XADDs of 1 KiB, `unbatched` is `publishers`
//! clients sending one XADD at a time on one multiplexed connection (Redis's best
//! case). BBX's phases run in process, so the ratios favour neither side only as
//! far as loopback TCP costs little next to a sync.

use crate::bench::{Figures, call_loop, free_port};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub(crate) struct RedisFigures {
    pub version: String,
    pub batched: Figures,
    pub unbatched: Figures,
}

/// A `redis-server` this benchmark started, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reference, or why there is none (no `redis-server` on this machine).
pub(crate) fn measure(
    dir: &Path,
    measure: Duration,
    batch: usize,
    publishers: usize,
) -> Result<Result<RedisFigures, String>> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let started = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let server = match started {
        Ok(child) => Server(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err("redis-server is not installed".into())),
        Err(e) => return Err(e).context("cannot start redis-server"),
    };
    let figures = std::thread::spawn(move || -> Result<RedisFigures> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(port, measure, batch, publishers))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the Redis phases panicked"))??;
    drop(server);
    Ok(Ok(figures))
}

async fn run(port: u16, measure: Duration, batch: usize, publishers: usize) -> Result<RedisFigures> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let connection = loop {
        match client.get_multiplexed_async_connection().await {
            Ok(connection) => break connection,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => bail!("redis-server did not answer: {e}"),
        }
    };
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection.clone())
        .await?;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let payload = "m".repeat(1024);
    let batched = call_loop(4, measure, batch as u64, {
        let (connection, payload) = (connection.clone(), payload.clone());
        move || {
            let (mut connection, payload) = (connection.clone(), payload.clone());
            async move {
                let mut pipe = redis::pipe();
                for _ in 0..batch {
                    pipe.cmd("XADD").arg("batched").arg("*").arg("m").arg(&payload).ignore();
                }
                pipe.query_async::<()>(&mut connection).await
            }
        }
    })
    .await?;
    let unbatched = call_loop(publishers, measure, 1, move || {
        let (mut connection, payload) = (connection.clone(), payload.clone());
        async move {
            redis::cmd("XADD")
                .arg("unbatched")
                .arg("*")
                .arg("m")
                .arg(&payload)
                .query_async::<String>(&mut connection)
                .await
                .map(drop)
        }
    })
    .await?;
    Ok(RedisFigures {
        version,
        batched,
        unbatched,
    })
}
