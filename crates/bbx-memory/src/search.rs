//! Search: vector (the namespace's nearest by cosine), keyword (BM25) or hybrid
//! (both, fused by reciprocal rank), then metadata filters, validity "as of" a
//! time, time decay, a score threshold and MMR diversity. Each result says why
//! it scored: its rank and score in each leg, the fusion, the decay, the MMR
//! step that picked it.

use crate::catalog::{Catalog, millis};
use crate::embedded::cosine;
use crate::record::MemoryId;
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Results one search returns at most.
pub const MAX_K: usize = 1000;
/// Reciprocal rank fusion's constant (Cormack et al.): ranks past the first
/// few count for little, and no leg's raw scores need scaling.
const RRF_K: f32 = 60.0;

/// How a search ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Vector,
    Keyword,
    #[default]
    Hybrid,
}

/// What a search asks: `memory.search`'s args.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    /// Another agent's memory to search, where that agent granted this one
    /// read over it (FlowIntegrity); for ops only.
    #[serde(default)]
    pub owner: Option<bbx_core::AgentId>,
    /// What to look for: embedded for the vector leg, split into words for the
    /// keyword leg. Needed unless `vector` is given to a vector search.
    #[serde(default)]
    pub query: Option<String>,
    /// The query's vector, already embedded by the model in use (named in
    /// `model`), instead of embedding `query`.
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    #[serde(default)]
    pub model: Option<String>,
    /// Results to return at most [default: 10; 1 to 1000].
    #[serde(default)]
    pub k: Option<usize>,
    /// vector, keyword or hybrid [default: hybrid].
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Metadata every result must have: each key equal to the value (to one of
    /// them, for a list).
    #[serde(default)]
    pub filter: Option<Map<String, Value>>,
    /// Results scoring below this are left out (vector: cosine; keyword: BM25;
    /// hybrid: fused rank, 1 for first in both).
    #[serde(default)]
    pub min_score: Option<f32>,
    /// Diversify with maximal marginal relevance: the weight of relevance
    /// against novelty, from 0 to 1 (0.5 is even) [default: off].
    #[serde(default)]
    pub mmr: Option<f32>,
    /// Weigh each result by 0.5^(age / half_life) [default: off].
    #[serde(default)]
    pub half_life_secs: Option<f64>,
    /// Search the memories as they held at this time (RFC 3339) [default: now].
    #[serde(default)]
    pub as_of: Option<DateTime<Utc>>,
}

/// A search, checked.
#[derive(Debug, Clone)]
pub struct Search {
    pub query: String,
    /// The query's vector if it was given, with its model.
    pub vector: Option<(Vec<f32>, String)>,
    pub k: usize,
    pub mode: Mode,
    pub filter: Option<Map<String, Value>>,
    pub min_score: Option<f32>,
    pub mmr: Option<f32>,
    pub half_life_secs: Option<f64>,
    pub as_of: Option<DateTime<Utc>>,
}

impl SearchArgs {
    pub fn check(self, max_query_bytes: usize) -> bbx_core::Result<Search> {
        use bbx_core::Error;
        let mode = self.mode.unwrap_or_default();
        let vector = match (self.vector, self.model) {
            (Some(vector), Some(model)) => Some((vector, model)),
            (None, None) => None,
            _ => {
                return Err(Error::invalid_field(
                    "vector",
                    "a vector needs its model, and a model its vector",
                ));
            }
        };
        let query = self.query.unwrap_or_default();
        let words_needed = mode != Mode::Vector || vector.is_none();
        if words_needed && query.trim().is_empty() {
            return Err(Error::invalid_field("query", "the query is empty"));
        }
        if query.len() > max_query_bytes {
            return Err(Error::invalid_field(
                "query",
                format!("the query is {} bytes; at most {max_query_bytes}", query.len()),
            ));
        }
        let k = self.k.unwrap_or(10);
        if !(1..=MAX_K).contains(&k) {
            return Err(Error::invalid_field(
                "k",
                format!("k must be from 1 to {MAX_K}, not {k}"),
            ));
        }
        if let Some(lambda) = self.mmr
            && !(0.0..=1.0).contains(&lambda)
        {
            return Err(Error::invalid_field("mmr", "mmr must be from 0 to 1"));
        }
        if self.min_score.is_some_and(|s| !s.is_finite()) {
            return Err(Error::invalid_field("min_score", "min_score must be a number"));
        }
        if let Some(half_life) = self.half_life_secs
            && !(half_life.is_finite() && half_life > 0.0)
        {
            return Err(Error::invalid_field("half_life_secs", "half_life_secs must be above 0"));
        }
        Ok(Search {
            query,
            vector,
            k,
            mode,
            filter: self.filter.filter(|f| !f.is_empty()),
            min_score: self.min_score,
            mmr: self.mmr,
            half_life_secs: self.half_life_secs,
            as_of: self.as_of,
        })
    }
}

/// Keeps the `k` highest scores, best first (ties by id, so results are stable).
pub fn top_k(scored: &mut Vec<(u64, f32)>, k: usize) {
    let order = |a: &(u64, f32), b: &(u64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if scored.len() > k && k > 0 {
        scored.select_nth_unstable_by(k - 1, order);
        scored.truncate(k);
    }
    scored.sort_unstable_by(order);
}

/// One result's scoring, before its text is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub id: MemoryId,
    pub score: f32,
    pub why: Map<String, Value>,
}

/// What each leg found, best first: (id, its score in the leg).
#[derive(Debug, Default)]
pub struct Legs {
    pub vector: Vec<(u64, f32)>,
    pub keyword: Vec<(u64, f32)>,
}

/// Fuses the legs, then weighs, thresholds and diversifies: the final ranking.
pub fn rank(
    search: &Search,
    legs: Legs,
    catalog: &Catalog,
    now: DateTime<Utc>,
    vector_of: impl Fn(u64) -> Option<Vec<f32>>,
) -> Vec<Scored> {
    let mut why: FxHashMap<u64, Map<String, Value>> = FxHashMap::default();
    let mut scores: FxHashMap<u64, f32> = FxHashMap::default();
    for (leg, found, field) in [
        ("vector", &legs.vector, "similarity"),
        ("keyword", &legs.keyword, "bm25"),
    ] {
        for (rank, &(id, score)) in found.iter().enumerate() {
            why.entry(id)
                .or_default()
                .insert(leg.to_owned(), json!({ "rank": rank + 1, field: score }));
            let fused = match search.mode {
                Mode::Hybrid => 1.0 / (RRF_K + rank as f32 + 1.0),
                _ => score,
            };
            *scores.entry(id).or_default() += fused;
        }
    }
    let at = millis(search.as_of.unwrap_or(now));
    let mut ranked: Vec<(u64, f32)> = scores
        .into_iter()
        .map(|(id, mut score)| {
            let reasons = why.entry(id).or_default();
            if search.mode == Mode::Hybrid {
                // 1 for first in both legs.
                score /= 2.0 / (RRF_K + 1.0);
                reasons.insert("rrf".into(), json!(score));
            }
            if let (Some(half_life), Some(entry)) = (search.half_life_secs, catalog.entries.get(&id)) {
                let age_secs = ((at - entry.created_ms).max(0) as f64) / 1000.0;
                let decay = 0.5f64.powf(age_secs / half_life) as f32;
                score *= decay;
                reasons.insert("decay".into(), json!(decay));
            }
            (id, score)
        })
        .filter(|(_, score)| search.min_score.is_none_or(|min| *score >= min))
        .collect();
    let pool = if search.mmr.is_some() {
        (search.k * 4).max(20)
    } else {
        search.k
    };
    top_k(&mut ranked, pool);
    if let Some(lambda) = search.mmr {
        ranked = diversify(ranked, search.k, lambda, &vector_of, &mut why);
    }
    ranked.truncate(search.k);
    ranked
        .into_iter()
        .map(|(id, score)| Scored {
            id: MemoryId(id),
            score,
            why: why.remove(&id).unwrap_or_default(),
        })
        .collect()
}

/// Maximal marginal relevance (Carbonell & Goldstein): picks, one at a time, the
/// candidate with the best `lambda * relevance - (1 - lambda) * its highest
/// cosine to one already picked`; relevance is the score over the best score.
fn diversify(
    candidates: Vec<(u64, f32)>,
    k: usize,
    lambda: f32,
    vector_of: &impl Fn(u64) -> Option<Vec<f32>>,
    why: &mut FxHashMap<u64, Map<String, Value>>,
) -> Vec<(u64, f32)> {
    let best = candidates.first().map_or(1.0, |c| c.1).max(f32::MIN_POSITIVE);
    let vectors: FxHashMap<u64, Vec<f32>> = candidates
        .iter()
        .filter_map(|(id, _)| Some((*id, vector_of(*id)?)))
        .collect();
    let mut left = candidates;
    let mut picked: Vec<(u64, f32)> = Vec::with_capacity(k);
    while picked.len() < k && !left.is_empty() {
        let (at, value, redundancy) = left
            .iter()
            .enumerate()
            .map(|(i, (id, score))| {
                let redundancy = vectors.get(id).map_or(0.0, |v| {
                    picked
                        .iter()
                        .filter_map(|(p, _)| vectors.get(p))
                        .map(|p| cosine(v, p))
                        .fold(0.0f32, f32::max)
                });
                (i, lambda * (score / best) - (1.0 - lambda) * redundancy, redundancy)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0, 0.0));
        let chosen = left.remove(at);
        why.entry(chosen.0).or_default().insert(
            "mmr".into(),
            json!({ "step": picked.len() + 1, "value": value, "redundancy": redundancy }),
        );
        picked.push(chosen);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(mode: Mode) -> Search {
        SearchArgs {
            owner: None,
            query: Some("q".into()),
            vector: None,
            model: None,
            k: Some(2),
            mode: Some(mode),
            filter: None,
            min_score: None,
            mmr: None,
            half_life_secs: None,
            as_of: None,
        }
        .check(100)
        .unwrap()
    }

    #[test]
    fn hybrid_fuses_by_rank_and_says_why() {
        let legs = Legs {
            vector: vec![(1, 0.9), (2, 0.8), (3, 0.7)],
            keyword: vec![(2, 7.0), (3, 5.0)],
        };
        let ranked = rank(&search(Mode::Hybrid), legs, &Catalog::default(), Utc::now(), |_| None);
        assert_eq!(ranked.iter().map(|s| s.id.0).collect::<Vec<_>>(), [2, 3]);
        assert!(ranked[0].score <= 1.0 && ranked[0].score > ranked[1].score);
        assert_eq!(ranked[0].why["vector"]["rank"], 2);
        assert_eq!(ranked[0].why["keyword"]["rank"], 1);
    }

    #[test]
    fn mmr_passes_over_near_copies() {
        let vectors: FxHashMap<u64, Vec<f32>> = [(1, vec![1.0, 0.0]), (2, vec![0.999, 0.0447]), (3, vec![0.0, 1.0])]
            .into_iter()
            .collect();
        let mut s = search(Mode::Vector);
        let legs = || Legs {
            vector: vec![(1, 0.9), (2, 0.89), (3, 0.6)],
            keyword: Vec::new(),
        };
        let plain = rank(&s, legs(), &Catalog::default(), Utc::now(), |id| {
            vectors.get(&id).cloned()
        });
        assert_eq!(plain.iter().map(|s| s.id.0).collect::<Vec<_>>(), [1, 2]);
        s.mmr = Some(0.5);
        let diverse = rank(&s, legs(), &Catalog::default(), Utc::now(), |id| {
            vectors.get(&id).cloned()
        });
        assert_eq!(diverse.iter().map(|s| s.id.0).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(diverse[1].why["mmr"]["step"], 2);
    }

    #[test]
    fn bad_searches_are_refused() {
        let args = |k: Option<usize>, query: &str| SearchArgs {
            owner: None,
            query: Some(query.into()),
            vector: None,
            model: None,
            k,
            mode: None,
            filter: None,
            min_score: None,
            mmr: None,
            half_life_secs: None,
            as_of: None,
        };
        assert!(args(Some(0), "q").check(100).is_err());
        assert!(args(Some(1_000_000_000), "q").check(100).is_err());
        assert!(args(None, "  ").check(100).is_err());
        assert!(args(None, &"x".repeat(101)).check(100).is_err());
        assert_eq!(args(None, "q").check(100).unwrap().k, 10);
    }

    #[test]
    fn top_k_keeps_the_best_in_order() {
        let mut scored = vec![(1, 0.1), (2, 0.9), (3, 0.5), (4, 0.9)];
        top_k(&mut scored, 3);
        assert_eq!(scored, [(2, 0.9), (4, 0.9), (3, 0.5)]);
    }
}
