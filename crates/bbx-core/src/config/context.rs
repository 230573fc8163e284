//! ContextTiering's settings (`[context]`): how tokens are counted, how large
//! an item may be, and the byte budgets of the tiers.

use serde::{Deserialize, Serialize};

/// `[context]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextConfig {
    /// What counts tokens: `o200k` (GPT-4o and later), `cl100k` (GPT-4,
    /// GPT-3.5), or the path of a Hugging Face `tokenizer.json` for a local
    /// model [default: o200k].
    pub tokenizer: String,
    /// The largest item, in bytes of UTF-8 [default: 1 MiB].
    pub max_item_bytes: usize,
    /// What one agent may hold in each memory tier before the migrator demotes
    /// its least important items.
    pub agent: TierBudgets,
    /// What all agents together may hold in each memory tier.
    pub global: TierBudgets,
    /// The zstd level of COOL items [default: 3].
    pub cool_level: i32,
    /// The zstd level of COLD items [default: 19].
    pub cold_level: i32,
    /// How often the migrator runs, in milliseconds [default: 500].
    pub migrate_every_ms: u64,
    /// An agent untouched this long is let go: memory drops its copies (its
    /// blocks are on disk) and its index, so an idle agent costs no memory
    /// [default: 300].
    pub idle_secs: u64,
    /// "Accessed again within this many of the agent's steps" is what the
    /// importance model learns to predict [default: 64].
    pub reaccess_steps: u64,
    /// The model is trained again once this many new outcomes are known
    /// [default: 4000].
    pub retrain_every: usize,
    /// Prefetch what usually follows an accessed item [default: true].
    pub prefetch: bool,
    /// Assembly: when a window overflows, it is cut back to this share of the
    /// budget, so the turns after it only append [default: 0.6].
    pub compact_to: f64,
    /// Assembly: the most tokens a summary of evicted items takes; it never
    /// takes more than a tenth of the compacted window [default: 4096].
    pub summary_tokens: usize,
    /// Assembly: the model that writes summaries, through `llm.chat` on the
    /// agent's budget; unset, summaries are extractive [default: unset].
    pub summary_model: Option<String>,
    /// The `[tools.llm.endpoints]` entry that serves `summary_model` (needed
    /// when several are configured).
    pub summary_endpoint: Option<String>,
    /// The most tokens of evicted text a summary model is shown; more is first
    /// cut down extractively to this [default: 16000].
    pub summary_input_tokens: usize,
    /// How long a window waits for the model's summary before it takes an
    /// extractive one, in milliseconds [default: 60000].
    pub summary_timeout_ms: u64,
    /// Items that reach COLD are added to the agent's SemanticMemory (when
    /// the kernel serves it), so `context search` finds them [default: true].
    pub cold_search: bool,
    /// Keep COLD blocks in an S3 bucket (objects under `prefix/`, by default
    /// `bbx-context/`) instead of the local disk [default: unset, local].
    pub cold_objects: Option<super::S3Bucket>,
}

/// Byte budgets of the tiers held in memory, and of COOL (beyond which items
/// go COLD).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierBudgets {
    pub hot_bytes: u64,
    pub warm_bytes: u64,
    pub cool_bytes: u64,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            tokenizer: "o200k".to_owned(),
            max_item_bytes: 1024 * 1024,
            agent: TierBudgets {
                hot_bytes: 2 * 1024 * 1024,
                warm_bytes: 8 * 1024 * 1024,
                cool_bytes: 256 * 1024 * 1024,
            },
            global: TierBudgets {
                hot_bytes: 256 * 1024 * 1024,
                warm_bytes: 512 * 1024 * 1024,
                cool_bytes: 64 * 1024 * 1024 * 1024,
            },
            cool_level: 3,
            cold_level: 19,
            migrate_every_ms: 500,
            idle_secs: 300,
            reaccess_steps: 64,
            retrain_every: 4000,
            prefetch: true,
            compact_to: 0.6,
            summary_tokens: 4096,
            summary_model: None,
            summary_endpoint: None,
            summary_input_tokens: 16_000,
            summary_timeout_ms: 60_000,
            cold_search: true,
            cold_objects: None,
        }
    }
}

impl ContextConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |field: &str, why: &str| Err(crate::Error::invalid_field(field, format!("context.{field} {why}")));
        if !(1..=64 * 1024 * 1024).contains(&self.max_item_bytes) {
            return bad("max_item_bytes", "must be 1 byte to 64 MiB");
        }
        if !(1..=22).contains(&self.cool_level) || !(1..=22).contains(&self.cold_level) {
            return bad("cool_level", "and cold_level must be zstd levels, 1 to 22");
        }
        if !(10..=60_000).contains(&self.migrate_every_ms) {
            return bad("migrate_every_ms", "must be 10 ms to 60 s");
        }
        if self.idle_secs == 0 {
            return bad("idle_secs", "must be at least 1");
        }
        if !(1..=1_000_000).contains(&self.reaccess_steps) {
            return bad("reaccess_steps", "must be 1 to 1,000,000");
        }
        if self.retrain_every < 100 {
            return bad("retrain_every", "must be at least 100");
        }
        if !(0.1..=0.95).contains(&self.compact_to) {
            return bad("compact_to", "must be from 0.1 to 0.95");
        }
        if self.summary_tokens < 16 {
            return bad("summary_tokens", "must be at least 16");
        }
        if !(256..=1_000_000).contains(&self.summary_input_tokens) {
            return bad("summary_input_tokens", "must be 256 to 1,000,000");
        }
        if !(1_000..=600_000).contains(&self.summary_timeout_ms) {
            return bad("summary_timeout_ms", "must be 1000 to 600000");
        }
        if self.summary_model.as_deref().is_some_and(str::is_empty) {
            return bad("summary_model", "must not be empty");
        }
        Ok(())
    }
}
