//! Anomaly detection: a baseline of each agent's behaviour, learned from its own
//! ops, and an Isolation Forest ([`forest`]) that scores each new op against it.
//!
//! Each op becomes [`FEATURES`]: how rare its kind and its target (a URL's host,
//! a program, a directory, a model) are for this agent, the size of its args,
//! the time since the agent's previous op, how many ops on the same target came
//! in the last ten seconds, the agent's recent error rate, the tokens an op that
//! can spend asks for with what the agent spent in the last minute, and how rare its hour is. Counts decay, so the baseline follows the
//! last [`AnomalyConfig::window`] ops or so. Nothing is decided of an agent before
//! [`AnomalyConfig::min_observations`] ops; then a model is trained (off the
//! submitting task) and again every [`AnomalyConfig::retrain_every`] ops, and
//! saved with its baseline. A model's threshold, unless configured, sits just
//! above the scores of its own window, so that a steady agent is flagged for at
//! most about one op in two hundred.

pub mod evaluate;
pub mod forest;

use bbx_core::AgentId;
use bbx_core::config::AnomalyConfig;
use forest::Forest;
use parking_lot::Mutex;
use rand::SeedableRng;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What each op is described by, in order.
pub const FEATURES: [&str; 8] = [
    "kind_rarity",
    "target_rarity",
    "args_bytes_log",
    "interval_log",
    "burst_log",
    "error_rate",
    "tokens_log",
    "hour_rarity",
];
const DIMS: usize = FEATURES.len();
/// The features where more is the threat, so that going beyond the window's
/// ceiling scores on its own: the rarity of the kind and the target, the args'
/// size, the burst, the tokens. (An hour, an interval or an error rate outside
/// a short window is usual.)
const OUTWARD: [usize; 5] = [0, 1, 2, 4, 6];

/// Agents whose baselines are held in memory at most; past it, the least
/// recently active agent's go (it learns again; its saved model comes back at
/// the next start).
pub const MAX_WATCHED: usize = 4096;
/// Kinds or targets one baseline counts at most; past it a new one stays rare.
const MAX_DISTINCT: usize = 1024;
/// Ops observed before the counts start: the first of an agent's ops are all
/// new, and a model must not learn that novelty is usual.
const WARMUP: u32 = 50;
/// How far a model's own threshold sits above its window's highest scores.
const MARGIN: f32 = 0.03;
/// The quantile of each feature in the window taken as its ceiling.
const CEILING: f64 = 1.0;
/// The quantile of its window's scores a model's threshold starts from.
const QUANTILE: f64 = 0.995;

/// An op's score, and whether it is anomalous.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Scored {
    pub score: f32,
    pub threshold: f32,
    pub anomalous: bool,
    /// The op's features, by name.
    pub features: std::collections::BTreeMap<String, f32>,
}

/// What an op of an agent looks like to the detector, taken from its kind and
/// args cheaply (hashes and sizes), so that learning and scoring can happen off
/// the submitting task.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    kind: u64,
    target: u64,
    args_bytes: u32,
    /// Tokens the op asks for; `None` for an op that cannot spend.
    asked_tokens: Option<u64>,
    /// Milliseconds since the epoch.
    pub at_ms: i64,
}

impl Observation {
    pub fn of(kind: &str, args: &Value, at_ms: i64) -> Self {
        let asked = if kind.starts_with("llm.") {
            asked_tokens(args)
        } else {
            0
        };
        Self {
            kind: hash_str(&[kind]),
            target: target(kind, args),
            args_bytes: json_bytes(args).min(u32::MAX as usize) as u32,
            asked_tokens: kind.starts_with("llm.").then_some(asked),
            at_ms,
        }
    }
}

/// A trained model with the baseline it was trained against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub forest: Forest,
    pub threshold: f32,
    pub trained_on: usize,
    /// Each feature's ceiling in the window ([`CEILING`]), and how far that is above its
    /// median (plus half a unit: features are logarithms and rarities).
    ceiling: [f32; DIMS],
    span: [f32; DIMS],
    counts: Counts,
}

impl Saved {
    /// The op's score: the forest's, or, when one feature lies beyond anything
    /// the window holds, its distance out if that is higher. An Isolation Forest
    /// isolates a point extreme on one feature of eight only in the trees that
    /// split on it early: alone, it scored an op with 300 KB of args (where 6 KB
    /// was the most seen) at 0.54, under its threshold. Beyond the ceiling by one
    /// span scores 0.75, by two 0.875.
    fn scored(&self, features: [f32; DIMS]) -> Scored {
        let score = self.score(&features);
        Scored {
            score,
            threshold: self.threshold,
            anomalous: score >= self.threshold,
            features: FEATURES.iter().map(|f| (*f).to_owned()).zip(features).collect(),
        }
    }

    pub fn score(&self, features: &[f32; DIMS]) -> f32 {
        let beyond = OUTWARD
            .iter()
            .map(|&f| (features[f] - self.ceiling[f]) / self.span[f])
            .fold(f32::NEG_INFINITY, f32::max);
        let novelty = if beyond > 0.0 {
            1.0 - 0.5f32.powf(1.0 + beyond)
        } else {
            0.0
        };
        self.forest.score(features).max(novelty)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    kinds: FxHashMap<u64, f32>,
    targets: FxHashMap<u64, f32>,
    hours: [f32; 24],
    total: f32,
    error_rate: f32,
    first_at_ms: Option<i64>,
}

impl Counts {
    fn rarity(count: Option<&f32>, total: f32) -> f32 {
        -((count.copied().unwrap_or(0.0) + 0.5) / (total + 1.0)).ln()
    }

    fn add(map: &mut FxHashMap<u64, f32>, key: u64) {
        if let Some(count) = map.get_mut(&key) {
            *count += 1.0;
        } else if map.len() < MAX_DISTINCT {
            map.insert(key, 1.0);
        }
    }

    /// Halves every count once they pass twice the window, so that the baseline
    /// follows recent behaviour.
    /// Hours decay far more slowly: a day of a busy agent is many windows.
    fn decay(&mut self, window: usize) {
        if self.total >= 2.0 * window as f32 {
            for count in self.kinds.values_mut().chain(self.targets.values_mut()) {
                *count /= 2.0;
            }
            self.total /= 2.0;
        }
        let hours: f32 = self.hours.iter().sum();
        if hours >= HOURS_KEPT {
            self.hours.iter_mut().for_each(|count| *count /= 2.0);
        }
    }
}

/// One agent's baseline, window and model.
#[derive(Default)]
struct Baseline {
    counts: Counts,
    observed: u32,
    last_at_ms: Option<i64>,
    /// The targets and times of the ops of the last ten seconds, and how many of
    /// them each target has.
    recent: VecDeque<(u64, i64)>,
    recent_by_target: FxHashMap<u64, u32>,
    /// Tokens spent, with when, over the last minute.
    spent: VecDeque<(i64, u64)>,
    window: VecDeque<[f32; DIMS]>,
    since_training: usize,
    training: bool,
    /// Anomalous ops not yet learned from: each is, once it completes `ok` (an
    /// op held and denied, blocked or refused never is).
    pending: VecDeque<(bbx_core::OpId, Observation)>,
    model: Option<Arc<Saved>>,
}

/// An agent the detector watches: its budget of ops observed in the current
/// second, read without its baseline's lock (an op over it costs no more), and
/// its baseline.
#[derive(Default)]
struct Watched {
    /// The second (since the epoch) and the ops observed in it, packed: second
    /// in the high 44 bits, count in the low 20.
    budget: std::sync::atomic::AtomicU64,
    /// When it last submitted an op (the detector's tick), for eviction without
    /// locking baselines.
    last_active: std::sync::atomic::AtomicU64,
    baseline: Mutex<Baseline>,
}

impl Watched {
    /// Takes one op of the second of `at_ms` from a budget of `max`.
    fn admit(&self, at_ms: i64, max: u32) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let second = at_ms.div_euclid(1000) as u64 & ((1 << 44) - 1);
        let max = u64::from(max.min((1 << 20) - 1));
        let mut current = self.budget.load(Relaxed);
        loop {
            let used = if current >> 20 == second {
                current & ((1 << 20) - 1)
            } else {
                0
            };
            if used >= max {
                return false;
            }
            match self
                .budget
                .compare_exchange_weak(current, (second << 20) | (used + 1), Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

const BURST_MS: i64 = 10_000;
/// Anomalous ops an agent has waiting to complete at most; past it the oldest
/// is never learned from.
const MAX_PENDING: usize = 64;
/// Ops the hours histogram weighs before it halves.
const HOURS_KEPT: f32 = 100_000.0;
const SPEND_MS: i64 = 60_000;

fn hash_str(parts: &[&str]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

/// What an op acts on: a URL's host and port, a program, a file's directory, a
/// model; the kind itself for an op with no such target.
fn target(kind: &str, args: &Value) -> u64 {
    let text = |field: &str| args.get(field).and_then(Value::as_str);
    match kind {
        "tool.http" | "tool.mcp" => {
            let host = text("url").and_then(|u| url::Url::parse(u).ok()).map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or(""),
                    u.port_or_known_default().unwrap_or(0)
                )
            });
            let server = text("server");
            hash_str(&[kind, host.as_deref().or(server).unwrap_or("")])
        }
        "tool.shell" => {
            // A script run through the shell is known by its first word.
            let program = text("program").map(|p| match args.get("shell") {
                Some(Value::Bool(true)) => p.split_whitespace().next().unwrap_or(""),
                _ => p,
            });
            hash_str(&[kind, program.unwrap_or("")])
        }
        "tool.file" => {
            let dir = text("path").map(|p| p.rsplit_once('/').map_or("", |(dir, _)| dir));
            hash_str(&[kind, dir.unwrap_or("")])
        }
        "llm.chat" => hash_str(&[kind, text("model").unwrap_or("")]),
        _ => hash_str(&[kind]),
    }
}

/// The bytes `value` takes as JSON, roughly (strings by length), without
/// formatting it.
fn json_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(json_bytes).sum::<usize>() + 2,
        Value::Object(map) => map.iter().map(|(k, v)| k.len() + 3 + json_bytes(v)).sum::<usize>() + 2,
    }
}

/// Tokens an op asks for (an `llm.chat`'s `max_tokens`).
fn asked_tokens(args: &Value) -> u64 {
    args.get("max_tokens").and_then(Value::as_u64).unwrap_or(0)
}

impl Baseline {
    fn features(&mut self, op: &Observation) -> [f32; DIMS] {
        let (kind, target) = (op.kind, op.target);
        let counts = &self.counts;
        while let Some(&(old, _)) = self.recent.front().filter(|(_, t)| op.at_ms - t > BURST_MS) {
            self.recent.pop_front();
            if let Some(count) = self.recent_by_target.get_mut(&old) {
                *count -= 1;
                if *count == 0 {
                    self.recent_by_target.remove(&old);
                }
            }
        }
        while self.spent.front().is_some_and(|(t, _)| op.at_ms - t > SPEND_MS) {
            self.spent.pop_front();
        }
        let interval = self
            .last_at_ms
            .map_or(3_600_000, |last| (op.at_ms - last).clamp(0, 3_600_000));
        // Spend is an op's that can spend: what it asks for, with what the
        // agent spent in the last minute.
        let tokens = op.asked_tokens.map_or(0, |asked| {
            let spent = self.spent.iter().fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
            spent.saturating_add(asked)
        });
        let burst = self.recent_by_target.get(&target).copied().unwrap_or(0);
        let hour = op.at_ms.div_euclid(3_600_000).rem_euclid(24) as usize;
        [
            Counts::rarity(counts.kinds.get(&kind), counts.total),
            Counts::rarity(counts.targets.get(&target), counts.total),
            (op.args_bytes as f32).ln_1p(),
            (interval as f32).ln_1p(),
            (burst as f32).ln_1p(),
            counts.error_rate,
            (tokens as f32).ln_1p(),
            // Which hours are usual is known only after a day of watching.
            if counts.first_at_ms.is_some_and(|first| op.at_ms - first >= 86_400_000) {
                Counts::rarity(Some(&counts.hours[hour]), counts.hours.iter().sum())
            } else {
                0.0
            },
        ]
    }

    fn learn(&mut self, op: &Observation, features: Option<[f32; DIMS]>, config: &AnomalyConfig) {
        let (kind, target) = (op.kind, op.target);
        self.observed = self.observed.saturating_add(1);
        self.last_at_ms = Some(op.at_ms);
        if self.recent.len() < 4096 {
            self.recent.push_back((target, op.at_ms));
            *self.recent_by_target.entry(target).or_default() += 1;
        }
        if let Some(features) = features.filter(|_| self.observed > WARMUP) {
            if self.window.len() == config.window {
                self.window.pop_front();
            }
            self.window.push_back(features);
            self.since_training += 1;
        }
        let counts = &mut self.counts;
        counts.first_at_ms.get_or_insert(op.at_ms);
        Counts::add(&mut counts.kinds, kind);
        Counts::add(&mut counts.targets, target);
        counts.hours[op.at_ms.div_euclid(3_600_000).rem_euclid(24) as usize] += 1.0;
        counts.total += 1.0;
        counts.error_rate *= 0.99;
        counts.decay(config.window);
    }

    fn due(&self, config: &AnomalyConfig) -> bool {
        !self.training
            && self.window.len() >= config.min_observations
            && (self.model.is_none() || self.since_training >= config.retrain_every)
    }
}

/// The detector: every watched agent's baseline.
pub struct Detector {
    config: AnomalyConfig,
    unobserved: std::sync::atomic::AtomicU64,
    /// Anomalous ops waiting to complete, of all agents.
    pending: std::sync::atomic::AtomicUsize,
    agents: parking_lot::RwLock<FxHashMap<AgentId, Arc<Watched>>>,
    ticks: std::sync::atomic::AtomicU64,
}

/// What training an agent's model needs, taken from its baseline.
pub struct Training {
    pub agent: AgentId,
    points: Vec<Vec<f32>>,
    counts: Counts,
    seed: u64,
}

impl Training {
    /// Trains the model (slow: run it off the submitting task).
    pub fn run(self, threshold: Option<f32>) -> Option<Saved> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let forest = Forest::train(&self.points, &mut rng)?;
        let (mut ceiling, mut span) = ([0.0; DIMS], [0.0; DIMS]);
        for f in 0..DIMS {
            let mut values: Vec<f32> = self.points.iter().map(|p| p[f]).collect();
            values.sort_by(f32::total_cmp);
            // A high quantile, not the top: a few anomalous ops in the window
            // must not lift it.
            ceiling[f] = values[((values.len() - 1) as f64 * CEILING).round() as usize];
            span[f] = ceiling[f] - values[values.len() / 2] + 0.5;
        }
        let mut saved = Saved {
            forest,
            threshold: 1.0,
            trained_on: self.points.len(),
            ceiling,
            span,
            counts: self.counts,
        };
        saved.threshold = threshold.unwrap_or_else(|| {
            let mut scores: Vec<f32> = self.points.iter().map(|p| saved.score(&to_array(p))).collect();
            scores.sort_by(f32::total_cmp);
            let at = ((scores.len() - 1) as f64 * QUANTILE).round() as usize;
            (scores[at] + MARGIN).min(0.99)
        });
        Some(saved)
    }
}

impl Detector {
    pub fn new(config: AnomalyConfig) -> Self {
        Self {
            config,
            unobserved: Default::default(),
            pending: Default::default(),
            agents: Default::default(),
            ticks: Default::default(),
        }
    }

    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }

    fn watched(&self, agent: &AgentId) -> Arc<Watched> {
        if let Some(watched) = self.agents.read().get(agent) {
            return watched.clone();
        }
        let mut agents = self.agents.write();
        if !agents.contains_key(agent) && agents.len() >= MAX_WATCHED {
            let idlest = agents
                .iter()
                .min_by_key(|(_, w)| w.last_active.load(std::sync::atomic::Ordering::Relaxed))
                .map(|(id, _)| *id);
            if let Some(evicted) = idlest.and_then(|idlest| agents.remove(&idlest)) {
                let pending = evicted.baseline.lock().pending.len();
                self.pending.fetch_sub(pending, std::sync::atomic::Ordering::Relaxed);
            }
        }
        agents.entry(*agent).or_default().clone()
    }

    /// Whether an op of `agent` at `at_ms` is within the agent's
    /// [`AnomalyConfig::max_ops_per_sec`]; one that is not is counted unobserved.
    pub fn admit(&self, agent: &AgentId, at_ms: i64) -> bool {
        let admitted = self
            .agents
            .read()
            .get(agent)
            .is_none_or(|w| w.admit(at_ms, self.config.max_ops_per_sec));
        if !admitted {
            self.unobserved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }

    /// Whether the agent's baseline is in memory.
    pub fn watches(&self, agent: &AgentId) -> bool {
        self.agents.read().contains_key(agent)
    }

    /// Scores an op of `agent` (once the agent has a model) and learns from it.
    /// Returns the score, and the training to run if a model is due.
    pub fn submitted(
        &self,
        agent: &AgentId,
        op_id: bbx_core::OpId,
        op: &Observation,
    ) -> (Option<Scored>, Option<Training>) {
        let watched = self.watched(agent);
        let tick = self.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        watched.last_active.store(tick, std::sync::atomic::Ordering::Relaxed);
        let mut baseline = watched.baseline.lock();
        let features = baseline.features(op);
        let scored = baseline.model.as_ref().map(|model| model.scored(features));
        // An anomalous op is learned from only once it has run (so retrying one
        // that was held, denied or refused does not make it familiar), and then
        // counted (a new host used from then on becomes familiar, so a change of
        // behaviour is not flagged forever) but kept out of the window: a model
        // learns neither that a burst of them is usual nor a threshold above them.
        if scored.as_ref().is_some_and(|s| s.anomalous) {
            if baseline.pending.len() == MAX_PENDING {
                baseline.pending.pop_front();
            } else {
                self.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            baseline.pending.push_back((op_id, *op));
        } else {
            baseline.learn(op, Some(features), &self.config);
        }
        let training = baseline.due(&self.config).then(|| {
            baseline.training = true;
            baseline.since_training = 0;
            Training {
                agent: *agent,
                points: baseline.window.iter().map(|p| p.to_vec()).collect(),
                counts: baseline.counts.clone(),
                seed: u64::from(baseline.observed) ^ hash_str(&[&agent.to_string()]),
            }
        });
        (scored, training)
    }

    /// What an op of `agent` would score, learning nothing from it.
    pub fn peek(&self, agent: &AgentId, op: &Observation) -> Option<Scored> {
        let watched = self.agents.read().get(agent).cloned()?;
        let mut baseline = watched.baseline.lock();
        let features = baseline.features(op);
        baseline.model.as_ref().map(|model| model.scored(features))
    }

    /// An op of `agent` ended: whether it failed, and the tokens it spent. An
    /// op that succeeded spending nothing (most) costs nothing here: each op
    /// observed decays the error rate instead.
    pub fn completed(&self, agent: &AgentId, op_id: bbx_core::OpId, failed: bool, (tokens, at_ms): (u64, i64)) {
        let pending = self.pending.load(std::sync::atomic::Ordering::Relaxed) > 0;
        if !failed && tokens == 0 && !pending {
            return;
        }
        let Some(watched) = self.agents.read().get(agent).cloned() else {
            return;
        };
        let mut baseline = watched.baseline.lock();
        if let Some(at) = baseline.pending.iter().position(|(id, _)| *id == op_id) {
            let (_, op) = baseline.pending.remove(at).expect("a position found");
            self.pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if !failed {
                baseline.learn(&op, None, &self.config);
            }
        }
        if failed {
            // Over about the last hundred ops: one failure moves it by a hundredth.
            baseline.counts.error_rate = (baseline.counts.error_rate + 0.01).min(1.0);
        }
        if tokens > 0 && baseline.spent.len() < 4096 {
            baseline.spent.push_back((at_ms, tokens));
        }
    }

    /// Installs a trained (or loaded) model; `None` ends a training that failed.
    pub fn install(&self, agent: &AgentId, saved: Option<Arc<Saved>>) {
        let watched = self.watched(agent);
        let mut baseline = watched.baseline.lock();
        baseline.training = false;
        if let Some(saved) = saved {
            if baseline.observed == 0 {
                // Loaded after a restart: the counts it was trained against come back.
                baseline.counts = saved.counts.clone();
                baseline.observed = WARMUP + 1;
            }
            baseline.model = Some(saved);
        }
    }

    /// Ops left unobserved, past their agents' budgets.
    pub fn unobserved(&self) -> u64 {
        self.unobserved.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Agents watched, and with a model.
    pub fn stats(&self) -> (usize, usize) {
        let agents = self.agents.read();
        let modelled = agents.values().filter(|w| w.baseline.lock().model.is_some()).count();
        (agents.len(), modelled)
    }

    /// The agent's model, if it has one.
    pub fn model(&self, agent: &AgentId) -> Option<Arc<Saved>> {
        self.agents
            .read()
            .get(agent)
            .and_then(|w| w.baseline.lock().model.clone())
    }

    pub fn forget(&self, agent: &AgentId) {
        if let Some(watched) = self.agents.write().remove(agent) {
            let pending = watched.baseline.lock().pending.len();
            self.pending.fetch_sub(pending, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn to_array(point: &[f32]) -> [f32; DIMS] {
    let mut out = [0.0; DIMS];
    out.copy_from_slice(point);
    out
}

/// Tokens a completed op's result says it spent (`usage.total_tokens`).
pub fn spent_tokens(result: Option<&Value>) -> u64 {
    result
        .and_then(|r| r.pointer("/usage/total_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}
