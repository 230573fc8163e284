//! Prefix-stable assembly: a model input under a token budget that keeps the
//! previous window as its prefix whenever it can, so a provider's prompt
//! cache keeps serving it.
//!
//! A window is the head (system and pinned items, in order) and then the
//! body, in the order items were added. A new turn only appends. When the
//! window overflows it is compacted once, to `compact_to` of the budget: the
//! longest prefix of the body that fits 40% of that target stays as it was
//! (the last cache breakpoint), the most recent items stay, the most
//! important of the items between stay, and the rest is replaced by one
//! summary. The turns after a compaction only append again, until the next.

use crate::item::ItemId;
use bbx_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// One part of a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Part {
    Item(ItemId),
    /// What stands for evicted items.
    Summary {
        covers: Vec<ItemId>,
        text: String,
        tokens: u32,
    },
}

/// A window as assembled: what the next assembly keeps as its prefix.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Assembly {
    pub head: Vec<ItemId>,
    pub body: Vec<Part>,
}

/// An item that may go into a window.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub id: ItemId,
    pub tokens: u32,
    /// A system or pinned item: always in, at the head.
    pub head: bool,
}

/// A window, and how much of it the previous one shares.
#[derive(Debug, Clone)]
pub struct Plan {
    pub assembly: Assembly,
    pub tokens: u64,
    /// Leading parts (head and body) identical to the previous window's.
    pub prefix_parts: usize,
    pub prefix_tokens: u64,
    /// Whether this assembly compacted (and so summarized).
    pub compacted: bool,
}

/// What compaction is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub compact_to: f64,
    pub summary_tokens: u32,
}

/// A summary smaller than this says nothing: it is left out.
const MIN_SUMMARY_TOKENS: u64 = 16;

/// The candidates, in id order, looked up by id without a map: a window is
/// planned at every turn over every item, and building maps of them cost more
/// than the rest of the plan.
#[derive(Clone, Copy)]
struct Items<'a>(&'a [Candidate]);

impl Items<'_> {
    fn get(&self, id: ItemId) -> Option<&Candidate> {
        self.0.binary_search_by_key(&id, |c| c.id).ok().map(|i| &self.0[i])
    }

    fn tokens(&self, id: ItemId) -> u32 {
        self.get(id).map_or(0, |c| c.tokens)
    }

    fn in_body(&self, id: ItemId) -> bool {
        self.get(id).is_some_and(|c| !c.head)
    }
}

fn part_tokens(part: &Part, tokens: Items<'_>) -> u64 {
    match part {
        Part::Item(id) => u64::from(tokens.tokens(*id)),
        Part::Summary { tokens, .. } => u64::from(*tokens),
    }
}

/// The previous body's parts that still stand, in order, up to the first that
/// does not (an item deleted or moved to the head, or a summary of one).
fn kept_prefix(previous: &Assembly, head: &[ItemId], items: Items<'_>) -> Vec<Part> {
    if previous.head != head {
        return Vec::new();
    }
    previous
        .body
        .iter()
        .take_while(|part| match part {
            Part::Item(id) => items.in_body(*id),
            Part::Summary { covers, .. } => covers.iter().all(|id| items.in_body(*id)),
        })
        .cloned()
        .collect()
}

fn covered(parts: &[Part]) -> impl Iterator<Item = ItemId> + '_ {
    parts.iter().flat_map(|part| match part {
        Part::Item(id) => std::slice::from_ref(id).iter().copied(),
        Part::Summary { covers, .. } => covers.iter().copied(),
    })
}

/// Assembles a window of `candidates` (in id order, which it relies on) under
/// `budget` tokens.
/// `summarize` turns evicted parts into a summary of at most the tokens it is
/// given; `scores` says how important each item is.
pub fn plan(
    candidates: &[Candidate],
    previous: Option<&Assembly>,
    budget: u32,
    settings: Settings,
    mut summarize: impl FnMut(&[Part], u32) -> Result<Part>,
    mut scores: impl FnMut(&[ItemId]) -> Vec<f64>,
) -> Result<Plan> {
    let head: Vec<ItemId> = candidates.iter().filter(|c| c.head).map(|c| c.id).collect();
    let head_tokens: u64 = candidates.iter().filter(|c| c.head).map(|c| u64::from(c.tokens)).sum();
    if head_tokens > u64::from(budget) {
        return Err(Error::invalid_field(
            "budget",
            format!(
                "a budget of {budget} tokens is smaller than the system and pinned items ({head_tokens} tokens): {} short",
                head_tokens - u64::from(budget)
            ),
        ));
    }
    let tokens = Items(candidates);
    let mut body = previous.map_or_else(Vec::new, |p| kept_prefix(p, &head, tokens));
    let frontier = covered(&body).max().unwrap_or(0);
    let mut in_body: Vec<ItemId> = covered(&body).collect();
    in_body.sort_unstable();
    let orphaned = candidates
        .iter()
        .any(|c| !c.head && c.id <= frontier && in_body.binary_search(&c.id).is_err());
    if orphaned {
        // An item unpinned back into the body: the order changed.
        body.clear();
    }
    let frontier = covered(&body).max().unwrap_or(0);
    body.extend(
        candidates
            .iter()
            .filter(|c| !c.head && c.id > frontier)
            .map(|c| Part::Item(c.id)),
    );
    let total = |body: &[Part]| head_tokens + body.iter().map(|p| part_tokens(p, tokens)).sum::<u64>();
    let mut compacted = false;
    if total(&body) > u64::from(budget) {
        body = compact(
            &body,
            head_tokens,
            budget,
            settings,
            tokens,
            &mut summarize,
            &mut scores,
        )?;
        compacted = true;
    }
    let assembly = Assembly { head, body };
    let (prefix_parts, prefix_tokens) = previous.map_or((0, 0), |p| shared_prefix(p, &assembly, tokens));
    Ok(Plan {
        tokens: total(&assembly.body),
        assembly,
        prefix_parts,
        prefix_tokens,
        compacted,
    })
}

fn compact(
    body: &[Part],
    head_tokens: u64,
    budget: u32,
    settings: Settings,
    tokens: Items<'_>,
    summarize: &mut impl FnMut(&[Part], u32) -> Result<Part>,
    scores: &mut impl FnMut(&[ItemId]) -> Vec<f64>,
) -> Result<Vec<Part>> {
    let target = (f64::from(budget) * settings.compact_to) as u64;
    let summary_cap = u64::from(settings.summary_tokens).min(target / 10).max(1);
    // The stable prefix: what the provider has cached stays.
    let mut used = head_tokens;
    let mut prefix_end = 0;
    for part in body {
        let t = part_tokens(part, tokens);
        if used + t > head_tokens.max(target * 2 / 5) {
            break;
        }
        used += t;
        prefix_end += 1;
    }
    let room = target.saturating_sub(used + summary_cap);
    // The most recent parts, up to 60% of the room left.
    let mut tail_start = body.len();
    let mut tail_tokens = 0;
    while tail_start > prefix_end {
        let t = part_tokens(&body[tail_start - 1], tokens);
        if tail_tokens + t > room * 3 / 5 {
            break;
        }
        tail_tokens += t;
        tail_start -= 1;
    }
    // The most important items in between, in the room that is left.
    let span = &body[prefix_end..tail_start];
    let span_items: Vec<ItemId> = span
        .iter()
        .filter_map(|p| match p {
            Part::Item(id) => Some(*id),
            Part::Summary { .. } => None,
        })
        .collect();
    let mut ranked: Vec<(ItemId, f64)> = span_items.iter().copied().zip(scores(&span_items)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut important = rustc_hash::FxHashSet::default();
    let mut important_tokens = 0;
    for (id, score) in ranked {
        let t = u64::from(tokens.tokens(id));
        if score >= 0.5 && tail_tokens + important_tokens + t <= room {
            important_tokens += t;
            important.insert(id);
        }
    }
    let evicted: Vec<Part> = span
        .iter()
        .filter(|p| !matches!(p, Part::Item(id) if important.contains(id)))
        .cloned()
        .collect();
    let mut compacted: Vec<Part> = body[..prefix_end].to_vec();
    // What the summary may take: never past the budget, whatever it was given.
    let cap = summary_cap.min(u64::from(budget).saturating_sub(used + tail_tokens + important_tokens));
    if !evicted.is_empty() && cap >= MIN_SUMMARY_TOKENS {
        let summary = summarize(&evicted, cap as u32)?;
        if part_tokens(&summary, tokens) <= cap {
            compacted.push(summary);
        }
    }
    compacted.extend(
        span.iter()
            .filter(|p| matches!(p, Part::Item(id) if important.contains(id)))
            .cloned(),
    );
    compacted.extend_from_slice(&body[tail_start..]);
    Ok(compacted)
}

/// How many leading parts, and tokens, two windows share (compared in place:
/// a summary can cover thousands of items).
fn shared_prefix(previous: &Assembly, next: &Assembly, tokens: Items<'_>) -> (usize, u64) {
    let mut parts = 0;
    let mut shared = 0;
    for (a, b) in previous.head.iter().zip(&next.head) {
        if a != b {
            return (parts, shared);
        }
        parts += 1;
        shared += u64::from(tokens.tokens(*b));
    }
    if previous.head.len() != next.head.len() {
        return (parts, shared);
    }
    for (a, b) in previous.body.iter().zip(&next.body) {
        if a != b {
            break;
        }
        parts += 1;
        shared += part_tokens(b, tokens);
    }
    (parts, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(n: u64, tokens: u32) -> Vec<Candidate> {
        let mut all = vec![Candidate {
            id: 1,
            tokens: 50,
            head: true,
        }];
        all.extend((2..=n).map(|id| Candidate {
            id,
            tokens,
            head: false,
        }));
        all
    }

    fn summary_of(parts: &[Part], cap: u32) -> Result<Part> {
        Ok(Part::Summary {
            covers: covered(parts).collect(),
            text: format!("{} parts", parts.len()),
            tokens: cap.min(20),
        })
    }

    const SETTINGS: Settings = Settings {
        compact_to: 0.6,
        summary_tokens: 64,
    };

    #[test]
    fn turns_append_and_compaction_keeps_the_cached_prefix() {
        let mut previous: Option<Assembly> = None;
        let mut compactions = 0;
        for n in 2..400 {
            let plan = plan(&turns(n, 100), previous.as_ref(), 4000, SETTINGS, summary_of, |ids| {
                vec![0.0; ids.len()]
            })
            .unwrap();
            assert!(plan.tokens <= 4000);
            if let Some(previous) = &previous {
                let before = previous.head.len() + previous.body.len();
                if plan.compacted {
                    compactions += 1;
                    // The head and the stable prefix stay.
                    assert!(plan.prefix_tokens >= 50 + 900, "{plan:?}");
                } else {
                    assert_eq!(plan.prefix_parts, before, "a turn only appends");
                }
            }
            previous = Some(plan.assembly);
        }
        // 100-token turns fill the 1600 tokens freed by each compaction.
        assert!((15..=30).contains(&compactions), "{compactions}");
    }

    #[test]
    fn important_items_stay_verbatim_and_a_deleted_item_breaks_the_prefix() {
        let all = turns(100, 100);
        let plan1 = plan(&all, None, 4000, SETTINGS, summary_of, |ids| {
            ids.iter().map(|id| if *id == 40 { 0.9 } else { 0.1 }).collect()
        })
        .unwrap();
        assert!(plan1.assembly.body.contains(&Part::Item(40)));
        let without: Vec<Candidate> = all.iter().copied().filter(|c| c.id != 3).collect();
        let plan2 = plan(&without, Some(&plan1.assembly), 4000, SETTINGS, summary_of, |ids| {
            vec![0.0; ids.len()]
        })
        .unwrap();
        assert_eq!(plan2.prefix_parts, 2, "the head and item 2 are still shared");
    }

    proptest::proptest! {
        #[test]
        fn a_window_fits_its_budget_and_holds_each_item_once(
            sizes in proptest::collection::vec((1u32..400, proptest::bool::weighted(0.05)), 1..120),
            budget in 1u32..6000,
            deleted in proptest::collection::vec(1u64..120, 0..4),
        ) {
            let all: Vec<Candidate> = sizes.iter().enumerate().map(|(i, (tokens, head))| Candidate { id: i as u64 + 1, tokens: *tokens, head: *head }).collect();
            let head_tokens: u64 = all.iter().filter(|c| c.head).map(|c| u64::from(c.tokens)).sum();
            let Ok(first) = plan(&all, None, budget, SETTINGS, summary_of, |ids| ids.iter().map(|id| (id % 3) as f64 / 2.0).collect()) else {
                proptest::prop_assert!(head_tokens > u64::from(budget));
                return Ok(());
            };
            let rest: Vec<Candidate> = all.iter().copied().filter(|c| !deleted.contains(&c.id)).collect();
            let second = plan(&rest, Some(&first.assembly), budget, SETTINGS, summary_of, |ids| vec![0.7; ids.len()]).unwrap();
            for (plan, candidates) in [(&first, &all), (&second, &rest)] {
                proptest::prop_assert!(plan.tokens <= u64::from(budget), "{} > {budget}", plan.tokens);
                let mut seen: Vec<u64> = plan.assembly.head.iter().copied().chain(covered(&plan.assembly.body)).collect();
                let shown = seen.len();
                seen.sort_unstable();
                seen.dedup();
                proptest::prop_assert_eq!(seen.len(), shown, "an item twice");
                proptest::prop_assert!(seen.iter().all(|id| candidates.iter().any(|c| c.id == *id)), "a deleted item");
                proptest::prop_assert!(candidates.iter().filter(|c| c.head).all(|c| plan.assembly.head.contains(&c.id)));
            }
        }
    }

    #[test]
    fn a_budget_below_the_pinned_items_names_the_shortfall() {
        let err = plan(&turns(3, 10), None, 30, SETTINGS, summary_of, |ids| {
            vec![0.0; ids.len()]
        })
        .unwrap_err();
        assert!(err.message.contains("20 short"), "{}", err.message);
    }
}
