//! What `bbx bench memory` searches: WordNet's glosses (Debian's `wordnet-base`),
//! real text embedded by the local model (cached, keyed by the texts' hash), with
//! its usage examples as queries whose right answer is their own synset's gloss;
//! or synthetic clustered unit vectors, for sizes past WordNet's 117,659 glosses.
//! And the exact nearest neighbours that recall is measured against.

use anyhow::{Context, Result, bail};
use bbx_memory::embed::{Embedder, LocalModel};
use bbx_memory::models::ALL_MINILM_L6_V2;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const WORDNET: &str = "/usr/share/wordnet";

/// Memories and queries, each with its vector.
pub struct Corpus {
    pub source: &'static str,
    pub texts: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
    pub queries: Vec<Query>,
    /// Texts and vectors of the same kind that the corpus does not hold: what
    /// the add phase adds.
    pub extra: Vec<(String, Vec<f32>)>,
}

pub struct Query {
    pub text: String,
    pub vector: Vec<f32>,
    /// The memory that answers it, for the quality figures (WordNet only).
    pub answer: Option<usize>,
}

/// WordNet's synsets: "words: definition" and their examples.
fn wordnet_synsets() -> Result<Vec<(String, Vec<String>)>> {
    let mut synsets = Vec::new();
    for part in ["noun", "verb", "adj", "adv"] {
        let path = Path::new(WORDNET).join(format!("data.{part}"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (install Debian's wordnet-base)", path.display()))?;
        for line in text.lines().filter(|l| !l.starts_with("  ")) {
            let Some((head, gloss)) = line.split_once(" | ") else {
                continue;
            };
            let fields: Vec<&str> = head.split(' ').collect();
            let count = fields
                .get(3)
                .and_then(|c| usize::from_str_radix(c, 16).ok())
                .unwrap_or(0);
            let words: Vec<String> = (0..count)
                .filter_map(|i| fields.get(4 + 2 * i))
                .map(|w| w.replace('_', " "))
                .collect();
            let (mut definition, mut examples) = (Vec::new(), Vec::new());
            for piece in gloss.trim().split("; ") {
                match piece.strip_prefix('"') {
                    Some(example) => examples.push(example.trim_end_matches('"').to_owned()),
                    None => definition.push(piece),
                }
            }
            synsets.push((format!("{}: {}", words.join(", "), definition.join("; ")), examples));
        }
    }
    Ok(synsets)
}

/// WordNet's first `limit` glosses and, for up to `queries` of them, their
/// first example as a query.
pub async fn wordnet(models: &Path, cache: &Path, limit: usize, queries: usize, threads: usize) -> Result<Corpus> {
    let synsets = wordnet_synsets()?;
    if synsets.is_empty() {
        bail!("{WORDNET} holds no synsets");
    }
    // Shuffled (seeded): the first N are a sample of every part of speech.
    let mut order: Vec<usize> = (0..synsets.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order.truncate(limit);
    let texts: Vec<String> = order.iter().map(|&i| synsets[i].0.clone()).collect();
    let mut asked: Vec<(String, usize)> = order
        .iter()
        .enumerate()
        .filter_map(|(at, &i)| synsets[i].1.first().map(|example| (example.clone(), at)))
        .collect();
    // Examples past the queries: real sentences no memory holds, to add.
    let extra_texts: Vec<String> = asked.iter().skip(queries).take(4096).map(|(t, _)| t.clone()).collect();
    asked.truncate(queries);
    let model = LocalModel::new(&ALL_MINILM_L6_V2, models.to_path_buf(), threads, 64)?;
    let vectors = embed_cached(&model, cache, &texts).await?;
    let asked_texts: Vec<String> = asked.iter().map(|(t, _)| t.clone()).collect();
    let query_vectors = embed_cached(&model, cache, &asked_texts).await?;
    let extra_vectors = embed_cached(&model, cache, &extra_texts).await?;
    Ok(Corpus {
        source: "wordnet",
        texts,
        vectors,
        queries: asked
            .into_iter()
            .zip(query_vectors)
            .map(|((text, answer), vector)| Query {
                text,
                vector,
                answer: Some(answer),
            })
            .collect(),
        extra: extra_texts.into_iter().zip(extra_vectors).collect(),
    })
}

/// `count` unit vectors around 1,000 random centres (each a centre plus
/// Gaussian noise of about the centre's length, so a vector's cosine to its
/// centre is about 0.7), and `queries` more drawn the same way.
pub fn synthetic(count: usize, queries: usize, dimensions: usize) -> Corpus {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut gaussian = move || {
        // Box-Muller.
        let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random_range(0.0..1.0));
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let unit = |mut v: Vec<f32>| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    };
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| unit((0..dimensions).map(|_| gaussian()).collect()))
        .collect();
    let sigma = 1.0 / (dimensions as f32).sqrt();
    let mut draw = |i: usize| {
        let centre = &centres[i % centres.len()];
        unit(centre.iter().map(|c| c + sigma * gaussian()).collect())
    };
    let vectors: Vec<Vec<f32>> = (0..count).map(&mut draw).collect();
    let queries = (0..queries)
        .map(|i| Query {
            text: format!("synthetic query {i}"),
            vector: draw(i * 7 + 3),
            answer: None,
        })
        .collect();
    let extra = (0..4096)
        .map(|i| (format!("synthetic addition {i}"), draw(i * 13 + 5)))
        .collect();
    Corpus {
        source: "synthetic",
        texts: (0..count).map(|i| format!("synthetic memory {i}")).collect(),
        vectors,
        queries,
        extra,
    }
}

/// Embeds `texts`, or reads their vectors from the cache a run before left.
pub async fn embed_cached(model: &LocalModel, cache: &Path, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let mut hasher = Sha256::new();
    for text in texts {
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    let name = format!("{}-{}.f32", model.model(), &hex::encode(hasher.finalize())[..16]);
    let path: PathBuf = cache.join(name);
    let dimensions = model.dimensions();
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == texts.len() * dimensions * 4
    {
        return Ok(bytes
            .chunks_exact(dimensions * 4)
            .map(bbx_memory::record::decode_vector)
            .collect());
    }
    let mut vectors = Vec::with_capacity(texts.len());
    let started = std::time::Instant::now();
    for (i, batch) in texts.chunks(1024).enumerate() {
        vectors.extend(model.embed(batch.to_vec()).await?);
        if i % 20 == 19 {
            eprintln!(
                "embedded {} of {} texts ({:.0}/s)",
                vectors.len(),
                texts.len(),
                vectors.len() as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    std::fs::create_dir_all(cache)?;
    let bytes: Vec<u8> = vectors
        .iter()
        .flat_map(|v| bbx_memory::record::encode_vector(v))
        .collect();
    std::fs::write(&path, bytes)?;
    Ok(vectors)
}

/// The `k` nearest of `vectors` to each query, by exact cosine (unit vectors).
pub fn exact_top_k(vectors: &[Vec<f32>], queries: &[Query], k: usize) -> Vec<Vec<usize>> {
    queries
        .iter()
        .map(|query| {
            let mut scored: Vec<(u64, f32)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (i as u64, v.iter().zip(&query.vector).map(|(a, b)| a * b).sum()))
                .collect();
            bbx_memory::search::top_k(&mut scored, k);
            scored.into_iter().map(|(i, _)| i as usize).collect()
        })
        .collect()
}

/// The share of the exact top k that `found` holds, over every query.
pub fn recall(found: &[Vec<usize>], exact: &[Vec<usize>]) -> f64 {
    let (mut hit, mut total) = (0usize, 0usize);
    for (found, exact) in found.iter().zip(exact) {
        total += exact.len();
        hit += exact.iter().filter(|e| found.contains(e)).count();
    }
    hit as f64 / total.max(1) as f64
}
