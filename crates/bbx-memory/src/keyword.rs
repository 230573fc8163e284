//! Keyword search: BM25 over one namespace's memories (an inverted index per
//! agent, so one agent's words never weigh on another's scores). Words are
//! lowercased, split at anything not a letter or digit (each CJK ideograph is a
//! word of its own), English stopwords dropped and the rest stemmed.

use rust_stemmers::{Algorithm, Stemmer};
use rustc_hash::FxHashMap;
use std::sync::OnceLock;

/// BM25's term-frequency saturation and length normalization.
const K1: f32 = 1.2;
const B: f32 = 0.75;

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with",
];

/// A text's search terms.
pub fn terms(text: &str) -> Vec<String> {
    static STEMMER: OnceLock<Stemmer> = OnceLock::new();
    let stemmer = STEMMER.get_or_init(|| Stemmer::create(Algorithm::English));
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() && !STOPWORDS.contains(&word.as_str()) {
            out.push(stemmer.stem(word).into_owned());
        }
        word.clear();
    };
    for c in text.chars() {
        if is_ideograph(c) {
            flush(&mut word, &mut out);
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else {
            flush(&mut word, &mut out);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn is_ideograph(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

/// One namespace's inverted index.
#[derive(Debug, Default)]
pub struct Keywords {
    vocabulary: FxHashMap<Box<str>, u32>,
    /// Per term: the memories that have it, and how often.
    postings: Vec<FxHashMap<u64, u16>>,
    /// Per memory: its length in terms, and its distinct terms.
    docs: FxHashMap<u64, (u32, Box<[u32]>)>,
    total_len: u64,
}

impl Keywords {
    pub fn insert(&mut self, id: u64, text: &str) {
        self.remove(id);
        let terms = terms(text);
        let mut counts: FxHashMap<u32, u16> = FxHashMap::default();
        for term in &terms {
            let next = self.postings.len() as u32;
            let term_id = *self.vocabulary.entry(term.as_str().into()).or_insert(next);
            if term_id == next {
                self.postings.push(FxHashMap::default());
            }
            let count = counts.entry(term_id).or_default();
            *count = count.saturating_add(1);
        }
        for (&term, &count) in &counts {
            self.postings[term as usize].insert(id, count);
        }
        self.total_len += terms.len() as u64;
        self.docs.insert(id, (terms.len() as u32, counts.into_keys().collect()));
    }

    pub fn remove(&mut self, id: u64) {
        if let Some((len, terms)) = self.docs.remove(&id) {
            self.total_len -= u64::from(len);
            for term in terms.iter() {
                self.postings[*term as usize].remove(&id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// The `k` memories that `allow` lets through with the best BM25 scores for
    /// `query`, best first; none score without a query term.
    pub fn search(&self, query: &str, k: usize, allow: impl Fn(u64) -> bool) -> Vec<(u64, f32)> {
        if self.docs.is_empty() || k == 0 {
            return Vec::new();
        }
        let n = self.docs.len() as f32;
        let average = (self.total_len as f32 / n).max(1.0);
        let mut scores: FxHashMap<u64, f32> = FxHashMap::default();
        let mut query_terms: Vec<u32> = terms(query)
            .iter()
            .filter_map(|term| self.vocabulary.get(term.as_str()).copied())
            .collect();
        query_terms.sort_unstable();
        query_terms.dedup();
        // A term in more than half the namespace weighs almost nothing (its idf
        // is under ln 2) and costs a pass over half the namespace: it is left
        // out when a rarer term is asked for too.
        let common = |term: &u32| self.postings[*term as usize].len() * 2 > self.docs.len();
        if query_terms.iter().any(|t| !common(t)) {
            query_terms.retain(|t| !common(t));
        } else if let Some(rarest) = query_terms
            .iter()
            .copied()
            .min_by_key(|t| self.postings[*t as usize].len())
        {
            query_terms = vec![rarest];
        }
        for term_id in query_terms {
            let postings = &self.postings[term_id as usize];
            let df = postings.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for (&id, &tf) in postings {
                let len = self.docs.get(&id).map_or(average, |(len, _)| *len as f32);
                let tf = f32::from(tf);
                let part = idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / average));
                *scores.entry(id).or_default() += part;
            }
        }
        let mut ranked: Vec<(u64, f32)> = scores.into_iter().filter(|(id, _)| allow(*id)).collect();
        crate::search::top_k(&mut ranked, k);
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_folded_stemmed_and_split() {
        assert_eq!(
            terms("The Cats were RUNNING, to Lisbon!"),
            ["cat", "were", "run", "lisbon"]
        );
        assert_eq!(terms("東京 rocks"), ["東", "京", "rock"]);
        assert!(terms("  ,.; ").is_empty());
    }

    #[test]
    fn rarer_and_more_frequent_terms_score_higher() {
        let mut index = Keywords::default();
        index.insert(1, "the cat sat on the mat");
        index.insert(2, "the dog sat on the log");
        index.insert(3, "cat cat cat everywhere");
        index.insert(4, "a bird");
        let found = index.search("cat", 10, |_| true);
        assert_eq!(found.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [3, 1]);
        assert!(index.search("sat", 10, |id| id != 2).iter().all(|(id, _)| *id == 1));
        assert!(index.search("unknown", 10, |_| true).is_empty());
        index.remove(3);
        index.insert(1, "now about dogs");
        assert!(index.search("cat", 10, |_| true).is_empty());
        assert_eq!(index.search("dog", 10, |_| true).len(), 2);
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn a_term_in_most_memories_gives_way_to_a_rarer_one() {
        let mut index = Keywords::default();
        for id in 0..100 {
            index.insert(id, &format!("common word number{id}"));
        }
        // "common" is in every memory: the rare term decides alone.
        assert_eq!(
            index
                .search("common number7", 5, |_| true)
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>(),
            [7]
        );
        // Only common terms: the rarest of them is searched.
        assert_eq!(index.search("common", 5, |_| true).len(), 5);
    }
}
