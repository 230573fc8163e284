//! Learned importance: the chance that an item is accessed again within the
//! next N steps of its agent, predicted by gradient-boosted trees (forust)
//! over access features, trained on the outcomes the kernel itself observes,
//! and a fixed formula until there is a model.

use crate::item::Kind;
use crate::state::{AgentContext, Entry};
use forust_ml::Matrix;
use forust_ml::gradientbooster::GradientBooster;
use forust_ml::objective::ObjectiveType;
use serde::{Deserialize, Serialize};

/// How many features an item has.
pub const FEATURES: usize = 11;

/// The features, by name, in the order [`features`] gives them.
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "recency_steps",
    "age_steps",
    "accesses",
    "tokens",
    "kind",
    "referenced_by",
    "items_after",
    "pinned",
    "role",
    "importance_hint",
    "last_gap_steps",
];

pub type Features = [f64; FEATURES];

/// What is known of an item at a step, for scoring or as a training sample.
pub fn features(entry: &Entry, step: u64, newest: u64) -> Features {
    let record = &entry.record;
    let created_step = entry.created_step.min(step);
    let last = if entry.access.count > 0 {
        entry.access.step
    } else {
        created_step
    };
    let gap = entry
        .previous_step
        .map_or(-1.0, |previous| (entry.access.step.saturating_sub(previous)) as f64);
    [
        (step.saturating_sub(last)) as f64,
        (step.saturating_sub(created_step)) as f64,
        f64::from(entry.access.count),
        f64::from(record.tokens),
        f64::from(record.kind.code()),
        f64::from(entry.referenced_by),
        newest.saturating_sub(record.id) as f64,
        f64::from(u8::from(record.pinned)),
        f64::from(record.role.map_or(0, |r| r.code())),
        record.importance.map_or(-1.0, f64::from),
        gap,
    ]
}

/// The fixed formula used before there is a model (and a baseline the model is
/// measured against): recent, frequent, referenced and pinned items matter, and
/// notes and summaries more than bulky tool output.
pub fn heuristic(f: &Features) -> f64 {
    if f[7] > 0.0 {
        return 1.0;
    }
    let recency = (-f[0] / 32.0).exp();
    let frequency = (f[2].ln_1p() / 3.0).min(1.0);
    let kind = match f[4] as u8 {
        k if k == Kind::Note.code() || k == Kind::Summary.code() => 1.0,
        k if k == Kind::Document.code() => 0.6,
        k if k == Kind::Message.code() => 0.5,
        _ => 0.2,
    };
    let referenced = (f[5] / 3.0).min(1.0);
    let hint = if f[9] >= 0.0 { f[9] } else { 0.5 };
    0.35 * recency + 0.2 * frequency + 0.15 * kind + 0.1 * referenced + 0.2 * hint
}

/// A sampled item whose outcome is not known yet.
#[derive(Debug, Clone)]
pub struct Sample {
    pub id: u64,
    pub step: u64,
    pub features: Features,
}

/// A trained model, with what it was trained on and how well it ranks unseen
/// outcomes.
#[derive(Serialize, Deserialize)]
pub struct Model {
    booster: GradientBooster,
    pub samples: usize,
    /// AUC on the held-out fifth of its samples.
    pub auc: f64,
    pub trained_at: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("samples", &self.samples)
            .field("auc", &self.auc)
            .finish_non_exhaustive()
    }
}

/// Column-major, as forust takes it.
fn columns(rows: &[Features]) -> Vec<f64> {
    let mut data = Vec::with_capacity(rows.len() * FEATURES);
    for feature in 0..FEATURES {
        data.extend(rows.iter().map(|row| row[feature]));
    }
    data
}

impl Model {
    /// Trains on `samples` (features, whether accessed again); the last fifth
    /// (in the order given: the most recent) is held out to measure it. None
    /// without both outcomes among them.
    pub fn train(samples: &[(Features, bool)]) -> Option<Self> {
        let split = samples.len() * 4 / 5;
        let (train, test) = samples.split_at(split);
        let positives = train.iter().filter(|(_, y)| *y).count();
        if positives == 0 || positives == train.len() || test.is_empty() {
            return None;
        }
        let rows: Vec<Features> = train.iter().map(|(f, _)| *f).collect();
        let y: Vec<f64> = train.iter().map(|(_, y)| f64::from(u8::from(*y))).collect();
        let data = columns(&rows);
        let matrix = Matrix::new(&data, rows.len(), FEATURES);
        let mut booster = GradientBooster::default()
            .set_objective_type(ObjectiveType::LogLoss)
            .set_iterations(60)
            .set_learning_rate(0.2)
            .set_max_depth(4)
            .set_parallel(false);
        booster.fit(&matrix, &y, &vec![1.0; y.len()], None).ok()?;
        let mut model = Self {
            booster,
            samples: samples.len(),
            auc: 0.0,
            trained_at: chrono::Utc::now(),
        };
        let scores = model.predict(&test.iter().map(|(f, _)| *f).collect::<Vec<_>>());
        let labels: Vec<bool> = test.iter().map(|(_, y)| *y).collect();
        model.auc = auc(&scores, &labels);
        Some(model)
    }

    /// The chance, 0 to 1, that each item is accessed again.
    pub fn predict(&self, rows: &[Features]) -> Vec<f64> {
        if rows.is_empty() {
            return Vec::new();
        }
        let data = columns(rows);
        let matrix = Matrix::new(&data, rows.len(), FEATURES);
        self.booster
            .predict(&matrix, false)
            .into_iter()
            .map(|margin| 1.0 / (1.0 + (-margin).exp()))
            .collect()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What scores items: the model once there is one, the formula before.
pub fn scores(model: Option<&Model>, rows: &[Features]) -> Vec<f64> {
    match model {
        Some(model) => model.predict(rows),
        None => rows.iter().map(heuristic).collect(),
    }
}

/// The area under the ROC curve of `scores` for `labels`: the chance that a
/// random positive scores above a random negative (ties count half).
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut ranked: Vec<(f64, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = labels.iter().filter(|y| **y).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    // Sum of the positives' ranks, ties given their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < ranked.len() {
        let mut j = i;
        while j < ranked.len() && ranked[j].0 == ranked[i].0 {
            j += 1;
        }
        let average_rank = (i + j + 1) as f64 / 2.0;
        rank_sum += ranked[i..j].iter().filter(|(_, y)| *y).count() as f64 * average_rank;
        i = j;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// The outcomes observed so far, for the next training: a bounded window of
/// the most recent.
#[derive(Debug, Default)]
pub struct TrainingSet {
    pub samples: VecDeque<(Features, bool)>,
    /// Outcomes added since the last training.
    pub fresh: usize,
}

use std::collections::VecDeque;

/// The most outcomes kept for training.
pub const MAX_SAMPLES: usize = 50_000;

impl TrainingSet {
    pub fn push(&mut self, features: Features, accessed: bool) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((features, accessed));
        self.fresh += 1;
    }
}

/// Items sampled per step of an agent, to learn from.
const SAMPLES_PER_STEP: usize = 2;

/// At the agent's current step: settles the samples whose window has passed
/// (into `outcomes`), and samples some items to watch. Items are picked by a
/// cheap hash of the step, so which are watched does not depend on their
/// scores.
pub fn observe(agent: &mut AgentContext, window: u64, outcomes: &mut Vec<(Features, bool)>) {
    let step = agent.step;
    while let Some(sample) = agent.pending.front() {
        if sample.step + window > step {
            break;
        }
        let sample = agent.pending.pop_front().expect("the front exists");
        if let Some(entry) = agent.items.get(&sample.id) {
            let accessed = entry.access.step > sample.step && entry.access.step <= sample.step + window;
            outcomes.push((sample.features, accessed));
        }
    }
    let count = agent.items.len() as u64;
    let Some(newest) = agent.items.keys().next_back().copied() else {
        return;
    };
    for n in 0..SAMPLES_PER_STEP as u64 {
        let pick = splitmix(step.wrapping_mul(31).wrapping_add(n)) % count;
        // The keys are dense from 1 in the common case; a gap (a deletion)
        // falls to the next item.
        let Some((_, entry)) = agent.items.range(pick + 1..).next() else {
            continue;
        };
        agent.pending.push_back(Sample {
            id: entry.record.id,
            step,
            features: features(entry, step, newest),
        });
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_ranks_pairs() {
        assert_eq!(auc(&[0.1, 0.9], &[false, true]), 1.0);
        assert_eq!(auc(&[0.9, 0.1], &[false, true]), 0.0);
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), 0.5);
    }

    #[test]
    fn a_model_learns_a_rule_the_formula_does_not_know() {
        // Re-accessed: notes, whatever their recency; never: tool results.
        let samples: Vec<(Features, bool)> = (0..4000)
            .map(|i| {
                let note = i % 3 == 0;
                let kind = if note { Kind::Note } else { Kind::ToolResult };
                let mut f = [0.0; FEATURES];
                f[0] = (i % 97) as f64;
                f[4] = f64::from(kind.code());
                f[9] = -1.0;
                (f, note)
            })
            .collect();
        let model = Model::train(&samples).unwrap();
        assert!(model.auc > 0.99, "{}", model.auc);
        let restored = Model::from_json(&model.to_json()).unwrap();
        let rows: Vec<Features> = samples.iter().map(|(f, _)| *f).take(10).collect();
        assert_eq!(restored.predict(&rows), model.predict(&rows));
    }
}
