//! all-MiniLM-L6-v2 in process: the tokenizer cuts each text at the model's limit,
//! texts are sorted by length and batched (each batch padded to its longest, so
//! a short text does not pay for a long one), BERT runs on candle, and the
//! output is mean-pooled over the real tokens and scaled to length 1, as
//! sentence-transformers does. The model loads on first use, so the kernel
//! starts without it.

use super::{Embedder, unit};
use crate::models::{ModelSpec, installed};
use bbx_component::Pending;
use bbx_core::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokenizers::{Tokenizer, TruncationParams};

/// The local model, loaded on first use.
pub struct LocalModel(Arc<Inner>);

struct Inner {
    spec: &'static ModelSpec,
    models: PathBuf,
    batch: usize,
    pool: rayon::ThreadPool,
    loaded: OnceLock<Arc<Loaded>>,
    loading: parking_lot::Mutex<()>,
}

struct Loaded {
    model: BertModel,
    tokenizer: Tokenizer,
}

impl LocalModel {
    /// The model `spec` as fetched into the models directory `models`, run on `threads` threads in
    /// batches of up to `batch` texts.
    pub fn new(spec: &'static ModelSpec, models: PathBuf, threads: usize, batch: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bbx-embed-{i}"))
            .build()
            .map_err(|e| Error::internal(format!("cannot start the embedding threads: {e}")))?;
        Ok(Self(Arc::new(Inner {
            spec,
            models,
            batch: batch.max(1),
            pool,
            loaded: OnceLock::new(),
            loading: parking_lot::Mutex::new(()),
        })))
    }

    /// Loads the model now rather than on first use: an error says how to get it.
    pub fn load_now(&self) -> Result<()> {
        self.0.loaded().map(drop)
    }
}

impl Inner {
    fn loaded(&self) -> Result<Arc<Loaded>> {
        if let Some(loaded) = self.loaded.get() {
            return Ok(loaded.clone());
        }
        let _one_loader = self.loading.lock();
        if let Some(loaded) = self.loaded.get() {
            return Ok(loaded.clone());
        }
        let loaded = Arc::new(self.load()?);
        let _ = self.loaded.set(loaded.clone());
        Ok(loaded)
    }

    fn load(&self) -> Result<Loaded> {
        let dir = installed(&self.models, self.spec)?;
        let broken = |what: &str, e: &dyn std::fmt::Display| {
            Error::internal(format!("the model in {} cannot be loaded ({what}): {e}", dir.display()))
        };
        let config: Config = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| broken("config.json", &e))
            .and_then(|text| serde_json::from_str(&text).map_err(|e| broken("config.json", &e)))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| broken("tokenizer.json", &e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: self.spec.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| broken("truncation", &e))?;
        tokenizer.with_padding(None);
        // SAFETY: the weights file is the model's own, written once by `bbx models
        // fetch` and never changed in place (a new fetch renames a new directory).
        let vars =
            unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu) }
                .map_err(|e| broken("model.safetensors", &e))?;
        let model = BertModel::load(vars, &config).map_err(|e| broken("weights", &e))?;
        Ok(Loaded { model, tokenizer })
    }

    /// Embeds on the calling thread (one of the pool's).
    fn embed_now(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let loaded = self.loaded()?;
        let encodings = loaded
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| Error::invalid_field("text", format!("cannot tokenize: {e}")))?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        let mut vectors = vec![Vec::new(); texts.len()];
        for batch in order.chunks(self.batch) {
            let ids: Vec<&[u32]> = batch.iter().map(|&i| encodings[i].get_ids()).collect();
            for (&i, vector) in batch.iter().zip(self.forward(&loaded.model, &ids)?) {
                vectors[i] = unit(vector, self.spec.dimensions, self.spec.name)?;
            }
        }
        Ok(vectors)
    }

    /// BERT over one batch padded to its longest, mean-pooled over real tokens.
    fn forward(&self, model: &BertModel, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let failed = |e: candle_core::Error| Error::internal(format!("the embedding model failed: {e}"));
        let longest = ids.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
        let mut flat_ids = Vec::with_capacity(ids.len() * longest);
        let mut mask = Vec::with_capacity(ids.len() * longest);
        for row in ids {
            flat_ids.extend(row.iter().copied());
            flat_ids.extend(std::iter::repeat_n(0u32, longest - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
        }
        let shape = (ids.len(), longest);
        let input = Tensor::from_vec(flat_ids, shape, &Device::Cpu).map_err(failed)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu).map_err(failed)?;
        let types = input.zeros_like().map_err(failed)?;
        let hidden = model.forward(&input, &types, Some(&mask)).map_err(failed)?;
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(failed)?
            .unsqueeze(2)
            .map_err(failed)?;
        let summed = hidden.broadcast_mul(&mask).and_then(|h| h.sum(1)).map_err(failed)?;
        let counts = mask.sum(1).map_err(failed)?;
        let pooled = summed.broadcast_div(&counts).map_err(failed)?;
        pooled.to_vec2::<f32>().map_err(failed)
    }
}

impl Embedder for LocalModel {
    fn model(&self) -> &str {
        self.0.spec.name
    }

    fn dimensions(&self) -> usize {
        self.0.spec.dimensions
    }

    fn embed<'a>(&'a self, texts: Vec<String>) -> Pending<'a, Vec<Vec<f32>>> {
        Box::pin(async move {
            if texts.is_empty() {
                return Ok(Vec::new());
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let inner = self.0.clone();
            self.0.pool.spawn(move || {
                // A panic in the tokenizer or the model fails this call, not the
                // process (rayon aborts on a panic that leaves a job).
                let embedded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.embed_now(&texts)))
                    .unwrap_or_else(|_| Err(Error::internal("the embedding model panicked on this input")));
                let _ = tx.send(embedded);
            });
            rx.await.map_err(|_| Error::internal("the embedding thread stopped"))?
        })
    }
}
