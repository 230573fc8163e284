//! Extractive summaries of evicted spans: the sentences that carry the most
//! rare terms, numbers and names, under a token cap, in their original order.

use crate::tokens::TokenCounter;
use rustc_hash::{FxHashMap, FxHashSet};

/// Sentences of `texts`, split at ., !, ? and line ends.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(['.', '!', '?', '\n'])
        .map(str::trim)
        .filter(|s| s.split_whitespace().count() >= 3)
}

fn terms(sentence: &str) -> FxHashSet<String> {
    sentence
        .split(|c: char| !c.is_alphanumeric() && c != '_' && c != '-')
        .filter(|t| t.len() > 2)
        .map(str::to_lowercase)
        .collect()
}

/// Whether a word looks like a value worth keeping: it has a digit, or
/// capitals past its first letter, or joins parts with - _ / . :
fn is_specific(word: &str) -> bool {
    let word = word.trim_matches(|c: char| !c.is_alphanumeric());
    word.chars().any(|c| c.is_ascii_digit())
        || word.chars().skip(1).any(char::is_uppercase)
        || (word.len() > 3 && word.contains(['-', '_', '/', ':']))
}

/// A summary of `texts` in at most `max_tokens` tokens (with its header).
pub fn summarize(header: &str, texts: &[&str], max_tokens: u32, counter: &TokenCounter) -> String {
    let all: Vec<&str> = texts.iter().flat_map(|text| sentences(text)).collect();
    let sets: Vec<FxHashSet<String>> = all.iter().map(|s| terms(s)).collect();
    let values: Vec<FxHashSet<&str>> = all
        .iter()
        .map(|s| {
            s.split_whitespace()
                .filter(|w| is_specific(w))
                .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
                .collect()
        })
        .collect();
    let mut frequency: FxHashMap<&str, u32> = FxHashMap::default();
    for set in &sets {
        for term in set {
            *frequency.entry(term.as_str()).or_default() += 1;
        }
    }
    let n = all.len().max(1) as f64;
    let mut ranked: Vec<(usize, f64)> = all
        .iter()
        .zip(&sets)
        .enumerate()
        .map(|(i, (sentence, set))| {
            let rarity: f64 = set.iter().map(|t| (n / f64::from(frequency[t.as_str()])).ln()).sum();
            let specific = sentence.split_whitespace().filter(|w| is_specific(w)).count() as f64;
            let words = sentence.split_whitespace().count() as f64;
            (i, (rarity + 2.0 * specific) / words.sqrt())
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut used = counter.count(header) + 1;
    let mut chosen: Vec<usize> = Vec::new();
    for (i, _) in ranked {
        let tokens = counter.count(all[i]) + 1;
        if used + tokens > max_tokens {
            continue;
        }
        // A sentence that says much the same as one chosen, and no value it
        // did not, is a repeat; one with a value of its own is not.
        let repeats = chosen.iter().any(|&j| {
            let common = sets[i].intersection(&sets[j]).count();
            common * 10 > sets[i].len().min(sets[j].len()) * 7 && values[i].is_subset(&values[j])
        });
        if !repeats {
            used += tokens;
            chosen.push(i);
        }
    }
    chosen.sort_unstable();
    let mut summary = header.to_owned();
    for i in chosen {
        summary.push(' ');
        summary.push_str(all[i]);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_specific_sentences_under_the_cap() {
        let counter = TokenCounter::new("o200k").unwrap();
        let texts = [
            "Sure, I can help with that. Let me look into it for you.",
            "The staging database runs on port 6543 with user app_rw.",
            "Okay, that sounds good to me. Let me look into it now.",
        ];
        let summary = summarize("Earlier:", &texts, 40, &counter);
        assert!(summary.contains("port 6543"), "{summary}");
        assert!(counter.count(&summary) <= 40);
        assert_eq!(summarize("Earlier:", &texts, 3, &counter), "Earlier:");
    }

    #[test]
    fn sentences_alike_but_for_their_values_are_both_kept() {
        let counter = TokenCounter::new("o200k").unwrap();
        let texts = [
            "The invoice code for case 12 is Q123-12. The weather was fine and the team met.",
            "The invoice code for case 40 is Q555-40. The weather was fine and the team met.",
        ];
        let summary = summarize("Earlier:", &texts, 200, &counter);
        assert!(summary.contains("Q123-12") && summary.contains("Q555-40"), "{summary}");
        assert_eq!(summary.matches("The weather was fine").count(), 1, "{summary}");
    }
}
