//! `bbx bench memory`: SemanticMemory in process (the embedding model's
//! throughput; `add` with its durable acknowledgement next to an fdatasync loop
//! of the same run; vector and hybrid search with recall against exact search,
//! at 100k memories of real text or 1M synthetic vectors), WordNet retrieval
//! quality per search mode, and, over loopback HTTP at the same concurrency, BBX
//! next to a Chroma server holding the same vectors.

use crate::bench::{Figures, histogram, scratch_dir};
use crate::bench_memory_data::{Corpus, Query, WORDNET, exact_top_k, recall};
use crate::cli::{BenchMemoryArgs, Cli, ServeArgs};
use anyhow::{Context, Result, bail};
use bbx_core::config::{ConfigLayer, IndexSettings, MemoryConfig};
use bbx_kernel::{Caller, Kernel};
use bbx_memory::embed::{Embedder, LocalModel};
use bbx_memory::models::ALL_MINILM_L6_V2;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const K: usize = 10;
pub(crate) const K_PUB: usize = K;
const MODEL: &str = "all-minilm-l6-v2";

#[derive(Serialize)]
struct Report {
    source: &'static str,
    memories: usize,
    queries: usize,
    k: usize,
    embedding: Embedding,
    preload_memories_per_sec: f64,
    index_build_secs: f64,
    add: Figures,
    /// The same adds with `on_near_duplicate: keep`: no nearest-neighbour
    /// search before the write.
    add_without_near_duplicate_check: Figures,
    fsync_reference: Figures,
    expansion_search: usize,
    vector_search: Figures,
    vector_recall_at_10: f64,
    hybrid_search: Figures,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<Value>,
    http: crate::bench_memory_http::Comparison,
    targets: Targets,
}

#[derive(Serialize)]
struct Embedding {
    sentences: usize,
    per_sec_one_thread: f64,
    threads: usize,
    per_sec_all_threads: f64,
}

#[derive(Serialize)]
struct Targets {
    embedding_at_least_150_per_sec_per_core: bool,
    add_p50_under_1ms: bool,
    vector_search_p99_within_target: bool,
    vector_search_p99_target_ms: u64,
    recall_at_10_at_least_0_95: bool,
    hybrid_search_p99_under_10ms: Option<bool>,
    http_at_least_3x_chroma_qps_at_equal_recall: Option<bool>,
}

pub async fn memory(cli: &Cli, args: &BenchMemoryArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) || args.memories == 0 || args.queries == 0 {
        bail!("--seconds, --memories and --queries must be positive");
    }
    let config = crate::resolve_config(cli, &ServeArgs::default())?;
    let models = config.memory.models_dir(&config.data_dir);
    bbx_memory::models::installed(&models, &ALL_MINILM_L6_V2)?;
    let cache = dirs_cache().join("bbx-bench");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let embedding = embedding_throughput(&models, threads).await?;
    let wordnet = !args.synthetic && Path::new(WORDNET).join("data.noun").is_file();
    let corpus = if wordnet {
        crate::bench_memory_data::wordnet(&models, &cache, args.memories, args.queries, threads).await?
    } else {
        crate::bench_memory_data::synthetic(args.memories, args.queries, ALL_MINILM_L6_V2.dimensions)
    };
    eprintln!(
        "exact search of {} queries over {} vectors...",
        corpus.queries.len(),
        corpus.vectors.len()
    );
    let exact = exact_top_k(&corpus.vectors, &corpus.queries, K);
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let measure = Duration::from_secs_f64(args.seconds);
    let dir = scratch.path().join("kernel");
    let (chroma, concurrency) = (args.chroma.clone(), args.concurrency);
    let index = IndexSettings {
        expansion_search: args.expansion_search,
        ..IndexSettings::default()
    };
    let corpus = Arc::new(corpus);
    let in_process = {
        let corpus = corpus.clone();
        // The kernel gets a multi-threaded runtime of its own: this command's
        // runtime is single-threaded.
        std::thread::spawn(move || -> Result<InProcess> {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(in_process(
                    &dir,
                    (models, index),
                    &corpus,
                    &exact,
                    measure,
                    (chroma, concurrency),
                ))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the in-process phases panicked"))??
    };
    let fsync_reference = crate::bench_ring::fsync_loop(scratch.path(), 1, 4096, measure, false)?;
    let target_ms = if corpus.vectors.len() > 200_000 { 20 } else { 5 };
    let http = in_process.http;
    let targets = Targets {
        embedding_at_least_150_per_sec_per_core: embedding.per_sec_one_thread >= 150.0,
        add_p50_under_1ms: in_process.add.p50_us < 1000,
        vector_search_p99_within_target: in_process.vector.p99_us < target_ms * 1000,
        vector_search_p99_target_ms: target_ms,
        recall_at_10_at_least_0_95: in_process.recall >= 0.95,
        hybrid_search_p99_under_10ms: (corpus.vectors.len() <= 200_000).then_some(in_process.hybrid.p99_us < 10_000),
        http_at_least_3x_chroma_qps_at_equal_recall: http
            .chroma
            .as_ref()
            .map(|c| http.bbx.figures.ops_per_sec >= 3.0 * c.figures.ops_per_sec && http.bbx.recall >= c.recall),
    };
    let report = Report {
        source: corpus.source,
        memories: corpus.vectors.len(),
        queries: corpus.queries.len(),
        k: K,
        embedding,
        preload_memories_per_sec: in_process.preload_per_sec,
        index_build_secs: in_process.index_build_secs,
        add: in_process.add,
        add_without_near_duplicate_check: in_process.add_keep,
        fsync_reference,
        expansion_search: args.expansion_search,
        vector_search: in_process.vector,
        vector_recall_at_10: in_process.recall,
        hybrid_search: in_process.hybrid,
        quality: in_process.quality,
        http,
        targets,
    };
    if cli.json {
        crate::output::json(&report);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn dirs_cache() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// Short sentences a second, on one thread and on all.
async fn embedding_throughput(models: &Path, threads: usize) -> Result<Embedding> {
    let sentences: Vec<String> = (0..512)
        .map(|i| {
            format!(
                "Sentence {i}: the agent stored note number {} about its task.",
                i * 37 % 101
            )
        })
        .collect();
    let mut rates = Vec::new();
    for n in [1, threads] {
        let model = LocalModel::new(&ALL_MINILM_L6_V2, models.to_path_buf(), n, 32)?;
        model.embed(sentences[..32].to_vec()).await?;
        let started = Instant::now();
        model.embed(sentences.clone()).await?;
        rates.push(sentences.len() as f64 / started.elapsed().as_secs_f64());
    }
    Ok(Embedding {
        sentences: sentences.len(),
        per_sec_one_thread: rates[0],
        threads,
        per_sec_all_threads: rates[1],
    })
}

struct InProcess {
    preload_per_sec: f64,
    index_build_secs: f64,
    add: Figures,
    add_keep: Figures,
    vector: Figures,
    recall: f64,
    hybrid: Figures,
    quality: Option<Value>,
    http: crate::bench_memory_http::Comparison,
}

/// The bench's kernel and its one agent.
pub(crate) struct Bench {
    pub kernel: Arc<Kernel>,
    pub caller: Caller,
    /// The administrator's key, for requests over HTTP.
    pub key: String,
    pub agent: String,
}

impl Bench {
    pub(crate) async fn call(&self, name: &str, input: Value) -> Result<Value> {
        Ok(self.kernel.call_endpoint(&self.caller, name, input).await?)
    }

    fn search_input(&self, query: &Query, mode: &str, mmr: Option<f32>) -> Value {
        json!({ "agent": self.agent, "query": query.text, "vector": query.vector, "model": MODEL,
                "k": K, "mode": mode, "mmr": mmr })
    }
}

async fn in_process(
    dir: &Path,
    (models, index): (std::path::PathBuf, IndexSettings),
    corpus: &Corpus,
    exact: &[Vec<usize>],
    measure: Duration,
    (chroma, concurrency): (Option<std::path::PathBuf>, usize),
) -> Result<InProcess> {
    let over = ConfigLayer {
        memory: Some(MemoryConfig {
            models_dir: Some(models),
            index,
            ..MemoryConfig::default()
        }),
        ..ConfigLayer::default()
    };
    let (kernel, caller) = crate::bench::open_in_process(dir, over).await?;
    let agent = kernel
        .create_agent(&caller, serde_json::from_value(json!({ "name": "bench" }))?)
        .await?;
    let bench = Arc::new(Bench {
        kernel: kernel.clone(),
        caller,
        key: std::fs::read_to_string(dir.join(bbx_kernel::ADMIN_KEY_FILE))?
            .trim()
            .to_owned(),
        agent: agent.id.to_string(),
    });
    let (ids, preload_per_sec) = preload(&bench, corpus).await?;
    let indexing = Instant::now();
    while bench.call("memory.stats", json!({ "agent": bench.agent })).await?["index"]["pending"] != 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let index_build_secs = indexing.elapsed().as_secs_f64();
    let exact_ids: Vec<Vec<usize>> = exact.to_vec();
    let (vector, found) = search_phase(&bench, corpus, "vector", measure).await?;
    let recall = recall(&to_indices(&found, &ids), &exact_ids);
    let (hybrid, _) = search_phase(&bench, corpus, "hybrid", measure).await?;
    let quality = if corpus.queries.iter().any(|q| q.answer.is_some()) {
        Some(quality(&bench, corpus, &ids).await?)
    } else {
        None
    };
    let http =
        crate::bench_memory_http::compare(&bench, corpus, &ids, &exact_ids, measure, concurrency, chroma).await?;
    let add = add_phase(&bench, corpus, measure, "merge").await?;
    let add_keep = add_phase(&bench, corpus, measure, "keep").await?;
    kernel.shutdown().await;
    Ok(InProcess {
        preload_per_sec,
        index_build_secs,
        add,
        add_keep,
        vector,
        recall,
        hybrid,
        quality,
        http,
    })
}

/// Adds every memory of the corpus with its vector, 64 at a time; the id of each.
async fn preload(bench: &Arc<Bench>, corpus: &Corpus) -> Result<(Vec<String>, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(parking_lot::Mutex::new(vec![String::new(); corpus.texts.len()]));
    let started = Instant::now();
    let inputs: Arc<Vec<(String, Vec<f32>)>> = Arc::new(
        corpus
            .texts
            .iter()
            .cloned()
            .zip(corpus.vectors.iter().cloned())
            .collect(),
    );
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (bench, next, ids, inputs) = (bench.clone(), next.clone(), ids.clone(), inputs.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((text, vector)) = inputs.get(i) else {
                        return anyhow::Ok(());
                    };
                    let input = json!({ "agent": bench.agent, "text": text, "vector": vector, "model": MODEL,
                                        "on_near_duplicate": "keep" });
                    let added = bench.call("memory.add", input).await?;
                    ids.lock()[i] = added["id"].as_str().unwrap_or_default().to_owned();
                    if i % 20_000 == 19_999 {
                        eprintln!("added {} memories", i + 1);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let rate = corpus.texts.len() as f64 / started.elapsed().as_secs_f64();
    let ids = std::mem::take(&mut *ids.lock());
    Ok((ids, rate))
}

/// Memory ids as corpus indices (an id merged from two equal texts maps to the first).
pub(crate) fn to_indices(found: &[Vec<String>], ids: &[String]) -> Vec<Vec<usize>> {
    let index: std::collections::HashMap<&str, usize> =
        ids.iter().enumerate().rev().map(|(i, id)| (id.as_str(), i)).collect();
    found
        .iter()
        .map(|ids| ids.iter().filter_map(|id| index.get(id.as_str()).copied()).collect())
        .collect()
}

pub(crate) fn result_ids(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

/// Searches one query after another for `measure`; the ids each query found
/// on its first asking.
async fn search_phase(
    bench: &Bench,
    corpus: &Corpus,
    mode: &str,
    measure: Duration,
) -> Result<(Figures, Vec<Vec<String>>)> {
    let mut latencies = histogram();
    let mut found = Vec::with_capacity(corpus.queries.len());
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < measure || found.len() < corpus.queries.len() {
        let query = &corpus.queries[i % corpus.queries.len()];
        let sent = Instant::now();
        let answer = bench
            .call("memory.search", bench.search_input(query, mode, None))
            .await?;
        latencies.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        if found.len() < corpus.queries.len() {
            found.push(result_ids(&answer));
        }
        i += 1;
    }
    Ok((Figures::from(&latencies, started.elapsed()), found))
}

/// WordNet: each example's own gloss, by mode; Recall@1, Recall@10, MRR@10.
async fn quality(bench: &Bench, corpus: &Corpus, ids: &[String]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for (name, mode, mmr) in [
        ("vector", "vector", None),
        ("keyword", "keyword", None),
        ("hybrid", "hybrid", None),
        ("hybrid_mmr", "hybrid", Some(0.7)),
    ] {
        let (mut at_1, mut at_10, mut reciprocal, mut asked) = (0usize, 0usize, 0.0, 0usize);
        for query in &corpus.queries {
            let Some(answer) = query.answer else { continue };
            let found = result_ids(
                &bench
                    .call("memory.search", bench.search_input(query, mode, mmr))
                    .await?,
            );
            asked += 1;
            if let Some(rank) = found.iter().position(|id| *id == ids[answer]) {
                at_1 += usize::from(rank == 0);
                at_10 += 1;
                reciprocal += 1.0 / (rank as f64 + 1.0);
            }
        }
        let n = asked.max(1) as f64;
        out.insert(
            name.into(),
            json!({ "recall_at_1": at_1 as f64 / n, "recall_at_10": at_10 as f64 / n, "mrr_at_10": reciprocal / n, "queries": asked }),
        );
    }
    Ok(Value::Object(out))
}

/// Adds one memory at a time (its vector given: the embedding is not timed),
/// each acknowledged once durable: texts of the corpus's kind it does not hold.
async fn add_phase(bench: &Bench, corpus: &Corpus, measure: Duration, near: &str) -> Result<Figures> {
    if corpus.extra.is_empty() {
        bail!("the corpus has nothing left to add");
    }
    let mut latencies = histogram();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < measure {
        let (text, vector) = &corpus.extra[i % corpus.extra.len()];
        // Numbered, so that a text added again is no exact duplicate.
        let input = json!({ "agent": bench.agent, "text": format!("{text} ({near} {i})"),
                            "vector": vector, "model": MODEL, "on_near_duplicate": near });
        let sent = Instant::now();
        bench.call("memory.add", input).await.context("an add failed")?;
        latencies.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        i += 1;
    }
    Ok(Figures::from(&latencies, started.elapsed()))
}

fn print_report(r: &Report) {
    println!(
        "SemanticMemory: {} memories ({}), {} queries, k = {}",
        r.memories, r.source, r.queries, r.k
    );
    println!(
        "embedding: {:.0} sentences/s on one thread, {:.0} on {}",
        r.embedding.per_sec_one_thread, r.embedding.per_sec_all_threads, r.embedding.threads
    );
    println!(
        "preload: {:.0} memories/s; index built {:.1} s after",
        r.preload_memories_per_sec, r.index_build_secs
    );
    println!(
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "", "ops/s", "p50 µs", "p99 µs", "p99.9 µs"
    );
    r.add.print_row("add");
    r.add_without_near_duplicate_check.print_row("add, no near");
    r.fsync_reference.print_row("fdatasync 4K");
    r.vector_search.print_row("vector search");
    r.hybrid_search.print_row("hybrid search");
    println!("vector recall@10 against exact search: {:.4}", r.vector_recall_at_10);
    if let Some(quality) = &r.quality {
        println!("WordNet example -> gloss: {quality}");
    }
    println!("over HTTP: {}", serde_json::to_string(&r.http).unwrap_or_default());
    println!("targets: {}", serde_json::to_string(&r.targets).unwrap_or_default());
}
