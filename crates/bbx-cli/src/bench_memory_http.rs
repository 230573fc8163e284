//! `bbx bench memory`'s comparison over loopback HTTP: BBX's search endpoint and
//! a Chroma server (`chroma run`, from PyPI's chromadb) holding the same
//! vectors, queried with the same vectors and k at the same concurrency.

use crate::bench::{Figures, free_port, histogram};
use crate::bench_memory::{Bench, result_ids, to_indices};
use crate::bench_memory_data::{Corpus, recall};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Comparison {
    pub concurrency: usize,
    pub bbx: Side,
    pub chroma: Option<Side>,
    /// Why Chroma was not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chroma_missing: Option<String>,
    /// BBX's queries a second over Chroma's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qps_ratio: Option<f64>,
}

#[derive(Serialize)]
pub struct Side {
    #[serde(flatten)]
    pub figures: Figures,
    pub recall: f64,
}

pub async fn compare(
    bench: &Arc<Bench>,
    corpus: &Corpus,
    ids: &[String],
    exact: &[Vec<usize>],
    measure: Duration,
    concurrency: usize,
    chroma: Option<PathBuf>,
) -> Result<Comparison> {
    let http = reqwest::Client::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = bbx_server::app(bench.kernel.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/v1/agents/{}/memories/search", bench.agent);
    let key = bench.key.clone();
    let vectors: Arc<Vec<Vec<f32>>> = Arc::new(corpus.queries.iter().map(|q| q.vector.clone()).collect());
    let bbx = {
        let http = http.clone();
        query_loop(vectors.clone(), concurrency, measure, move |vector| {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move {
                let body = json!({ "vector": vector, "model": "all-minilm-l6-v2", "k": crate::bench_memory::K_PUB, "mode": "vector" });
                let answer: Value = http.post(&url).bearer_auth(&key).json(&body).send().await?.error_for_status()?.json().await?;
                Ok(result_ids(&answer))
            }
        })
        .await?
    };
    server.abort();
    let bbx = Side {
        recall: recall(&to_indices(&bbx.1, ids), exact),
        figures: bbx.0,
    };
    let (chroma, chroma_missing) = match chroma_binary(chroma) {
        Err(why) => (None, Some(why.to_string())),
        Ok(binary) => {
            let side = chroma_side(&binary, &http, corpus, vectors, exact, measure, concurrency).await?;
            (Some(side), None)
        }
    };
    Ok(Comparison {
        concurrency,
        qps_ratio: chroma
            .as_ref()
            .map(|c| bbx.figures.ops_per_sec / c.figures.ops_per_sec.max(1e-9)),
        bbx,
        chroma,
        chroma_missing,
    })
}

/// `concurrency` clients asking `ask` for one query vector after another for
/// `measure` (and until each query was asked once); the ids each query found.
async fn query_loop<F, Fut>(
    vectors: Arc<Vec<Vec<f32>>>,
    concurrency: usize,
    measure: Duration,
    ask: F,
) -> Result<(Figures, Vec<Vec<String>>)>
where
    F: Fn(Vec<f32>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<String>>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let found = Arc::new(parking_lot::Mutex::new(vec![Vec::new(); vectors.len()]));
    let started = Instant::now();
    let end = started + measure;
    let clients: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (ask, next, found, vectors) = (ask.clone(), next.clone(), found.clone(), vectors.clone());
            tokio::spawn(async move {
                let mut latencies = histogram();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= end && i >= vectors.len() {
                        return anyhow::Ok(latencies);
                    }
                    let sent = Instant::now();
                    let ids = ask(vectors[i % vectors.len()].clone()).await?;
                    latencies.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    if i < vectors.len() {
                        found.lock()[i] = ids;
                    }
                }
            })
        })
        .collect();
    let mut all = histogram();
    for client in clients {
        all.add(client.await??)?;
    }
    let found = std::mem::take(&mut *found.lock());
    Ok((Figures::from(&all, started.elapsed()), found))
}

fn chroma_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given.or_else(|| std::env::var_os("BBX_CHROMA").map(PathBuf::from)) {
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chroma"))
        .find(|candidate| candidate.is_file())
        .context("no `chroma` on PATH (pip install chromadb; or --chroma PATH, or $BBX_CHROMA)")
}

/// A Chroma server of its own, killed when dropped.
struct ChromaServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for ChromaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chroma_side(
    binary: &std::path::Path,
    http: &reqwest::Client,
    corpus: &Corpus,
    vectors: Arc<Vec<Vec<f32>>>,
    exact: &[Vec<usize>],
    measure: Duration,
    concurrency: usize,
) -> Result<Side> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = std::process::Command::new(binary)
        .args(["run", "--host", "127.0.0.1", "--port", &port.to_string(), "--path"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let _server = ChromaServer { child, _dir: dir };
    let base = format!("http://127.0.0.1:{port}/api/v2");
    let started = Instant::now();
    while http.get(format!("{base}/heartbeat")).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("chroma did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let collections = format!("{base}/tenants/default_tenant/databases/default_database/collections");
    let made: Value = http
        .post(&collections)
        .json(&json!({ "name": "bench", "configuration": { "hnsw": { "space": "cosine" } } }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let collection = format!(
        "{collections}/{}",
        made["id"].as_str().context("chroma made no collection id")?
    );
    let loading = Instant::now();
    for (batch, chunk) in corpus.vectors.chunks(2000).enumerate() {
        let ids: Vec<String> = (0..chunk.len()).map(|i| (batch * 2000 + i).to_string()).collect();
        http.post(format!("{collection}/add"))
            .json(&json!({ "ids": ids, "embeddings": chunk }))
            .send()
            .await?
            .error_for_status()
            .context("chroma refused an add")?;
    }
    eprintln!(
        "chroma loaded {} vectors in {:.1} s",
        corpus.vectors.len(),
        loading.elapsed().as_secs_f64()
    );
    let query = format!("{collection}/query");
    let http = http.clone();
    let (figures, found) = query_loop(vectors, concurrency, measure, move |vector| {
        let (http, query) = (http.clone(), query.clone());
        async move {
            let body = json!({ "query_embeddings": [vector], "n_results": crate::bench_memory::K_PUB, "include": ["distances"] });
            let answer: Value = http.post(&query).json(&body).send().await?.error_for_status()?.json().await?;
            Ok(answer["ids"][0]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect())
        }
    })
    .await?;
    let found: Vec<Vec<usize>> = found
        .iter()
        .map(|ids| ids.iter().filter_map(|id| id.parse().ok()).collect())
        .collect();
    Ok(Side {
        recall: recall(&found, exact),
        figures,
    })
}
