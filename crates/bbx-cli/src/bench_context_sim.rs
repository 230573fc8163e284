//! The quality half of `bbx bench context`, on generated sessions
//! ([`crate::bench_context_trace`]) replayed through the crate's own code:
//! the importance model against LRU, LFU and the fixed formula (AUC of
//! "accessed again within N steps", and the HOT tier's hit rate at equal
//! memory, with and without co-access prefetch), and prefix-stable assembly
//! against cutting the oldest turns.

use crate::bench_context_trace::{Event, Put, Session, session};
use bbx_context::assemble::{self, Candidate, Part, Settings};
use bbx_context::codec::Codec;
use bbx_context::importance::{self, Features, Model};
use bbx_context::item::{Access, Record, Role};
use bbx_context::prefetch::CoAccess;
use bbx_context::state::{AgentContext, Entry, Resident};
use bbx_context::tokens::TokenCounter;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;
use std::sync::Arc;

/// A session replayed into an agent's context as the runtime keeps it.
struct Replay {
    ctx: AgentContext,
    window: u64,
    outcomes: Vec<(Features, bool)>,
}

impl Replay {
    fn new(window: u64) -> Self {
        Self {
            ctx: AgentContext::new(Arc::default()),
            window,
            outcomes: Vec::new(),
        }
    }

    fn put(&mut self, put: &Put, tokens: u32) -> u64 {
        let id = self.ctx.items.len() as u64 + 1;
        self.ctx.step += 1;
        let record = Record {
            id,
            kind: put.kind,
            role: Some(put.role),
            tokens,
            bytes: put.text.len() as u32,
            pinned: put.pinned,
            importance: None,
            created: chrono::Utc::now(),
            refs: put.refs.clone(),
            codec: Codec::Lz4,
            stored_bytes: 0,
            labels: Vec::new(),
        };
        self.ctx.insert(Entry {
            record,
            access: Access::default(),
            created_step: self.ctx.step,
            previous_step: None,
            referenced_by: 0,
            generation: self.ctx.generation(),
            resident: Resident::None,
            disk_bytes: 0,
            prefetched: false,
        });
        importance::observe(&mut self.ctx, self.window, &mut self.outcomes);
        id
    }

    fn get(&mut self, id: u64) {
        self.ctx.touch(id, 0);
        importance::observe(&mut self.ctx, self.window, &mut self.outcomes);
    }

    fn features(&self, ids: &[u64]) -> Vec<Features> {
        let newest = self.ctx.items.len() as u64;
        ids.iter()
            .map(|id| importance::features(&self.ctx.items[id], self.ctx.step, newest))
            .collect()
    }
}

/// How an eviction policy scores items: the lowest go first.
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Lru,
    Lfu,
    Formula,
    Model,
}

fn scores(policy: Policy, model: Option<&Model>, rows: &[Features]) -> Vec<f64> {
    match policy {
        Policy::Lru => rows.iter().map(|f| -f[0]).collect(),
        Policy::Lfu => rows.iter().map(|f| f[2] - 1e-6 * f[0]).collect(),
        Policy::Formula => rows.iter().map(importance::heuristic).collect(),
        Policy::Model => importance::scores(model, rows),
    }
}

#[derive(Serialize, Default, Clone, Copy)]
pub struct PerPolicy {
    pub lru: f64,
    pub lfu: f64,
    pub formula: f64,
    pub model: f64,
}

#[derive(Serialize)]
pub struct Importance {
    pub sessions_train: usize,
    pub sessions_test: usize,
    pub turns_per_session: usize,
    pub reaccess_steps: u64,
    pub samples_train: usize,
    pub samples_test: usize,
    pub positive_share_test: f64,
    pub auc: PerPolicy,
    pub hot_bytes: u64,
    pub hot_hit_rate: PerPolicy,
    pub hot_hit_rate_model_with_prefetch: f64,
    pub prefetch_issued: u64,
    pub prefetch_hits: u64,
    pub prefetch_precision: f64,
}

/// A HOT tier of `capacity` bytes under one policy.
struct Cache {
    policy: Policy,
    capacity: u64,
    held: FxHashMap<u64, u64>,
    bytes: u64,
    hits: u64,
    accesses: u64,
    prefetched: FxHashSet<u64>,
}

impl Cache {
    fn new(policy: Policy, capacity: u64) -> Self {
        Self {
            policy,
            capacity,
            held: FxHashMap::default(),
            bytes: 0,
            hits: 0,
            accesses: 0,
            prefetched: FxHashSet::default(),
        }
    }

    fn admit(&mut self, id: u64, bytes: u64, replay: &Replay, model: Option<&Model>) {
        if self.held.insert(id, bytes).is_none() {
            self.bytes += bytes;
        }
        if self.bytes <= self.capacity {
            return;
        }
        // Evicted in a batch, as the migrator does, down to 90%.
        let ids: Vec<u64> = self
            .held
            .keys()
            .copied()
            .filter(|i| *i != id && !replay.ctx.items[i].record.pinned)
            .collect();
        let mut ranked: Vec<(f64, u64)> = scores(self.policy, model, &replay.features(&ids))
            .into_iter()
            .zip(ids)
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, victim) in ranked {
            if self.bytes <= self.capacity * 9 / 10 {
                break;
            }
            self.bytes -= self.held.remove(&victim).unwrap_or(0);
            self.prefetched.remove(&victim);
        }
    }

    fn access(&mut self, id: u64, bytes: u64, replay: &Replay, model: Option<&Model>) -> bool {
        self.accesses += 1;
        let hit = self.held.contains_key(&id);
        if hit {
            self.hits += 1;
        } else {
            self.admit(id, bytes, replay, model);
        }
        hit
    }
}

fn tokens_of(session: &Session, counter: &TokenCounter) -> Vec<u32> {
    session
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Put(put) => Some(counter.count(&put.text)),
            _ => None,
        })
        .collect()
}

/// Trains on `train` sessions' observed outcomes, then measures on `test`
/// sessions; gives the model too.
pub fn importance(train: usize, test: usize, turns: usize, window: u64, hot_bytes: u64) -> (Importance, Option<Model>) {
    let counter = TokenCounter::new("o200k").expect("o200k is built in");
    let mut train_samples = Vec::new();
    for seed in 0..train as u64 {
        let session = session(seed, turns);
        let tokens = tokens_of(&session, &counter);
        let mut replay = Replay::new(window);
        for event in &session.events {
            match event {
                Event::Put(put) => {
                    let id = replay.ctx.items.len();
                    replay.put(put, tokens[id]);
                }
                Event::Get(id) => replay.get(*id),
                Event::Turn { .. } => {}
            }
        }
        train_samples.extend(replay.outcomes);
    }
    let model = Model::train(&train_samples);
    let policies = [Policy::Lru, Policy::Lfu, Policy::Formula, Policy::Model];
    let mut test_samples = Vec::new();
    let (mut hits, mut accesses) = ([0u64; 4], [0u64; 4]);
    let (mut prefetch_hits, mut prefetch_issued, mut with_prefetch) = (0u64, 0u64, (0u64, 0u64));
    for seed in 0..test as u64 {
        let session = session(1_000_000 + seed, turns);
        let tokens = tokens_of(&session, &counter);
        let mut replay = Replay::new(window);
        let mut caches: Vec<Cache> = policies.iter().map(|p| Cache::new(*p, hot_bytes)).collect();
        let mut prefetching = Cache::new(Policy::Model, hot_bytes);
        let mut coaccess = CoAccess::default();
        let mut last = None;
        let mut sizes = Vec::new();
        for event in &session.events {
            match event {
                Event::Put(put) => {
                    let id = replay.put(put, tokens[sizes.len()]);
                    sizes.push(put.text.len() as u64);
                    for cache in caches.iter_mut().chain([&mut prefetching]) {
                        cache.admit(id, sizes[id as usize - 1], &replay, model.as_ref());
                    }
                }
                Event::Get(id) => {
                    replay.get(*id);
                    let bytes = sizes[*id as usize - 1];
                    for cache in &mut caches {
                        cache.access(*id, bytes, &replay, model.as_ref());
                    }
                    if prefetching.access(*id, bytes, &replay, model.as_ref()) && prefetching.prefetched.remove(id) {
                        prefetch_hits += 1;
                    }
                    if let Some(previous) = last.replace(*id) {
                        coaccess.record(previous, *id);
                    }
                    if let Some(next) = coaccess.predict(*id).filter(|n| !prefetching.held.contains_key(n)) {
                        prefetch_issued += 1;
                        prefetching.admit(next, sizes[next as usize - 1], &replay, model.as_ref());
                        prefetching.prefetched.insert(next);
                    }
                }
                Event::Turn { .. } => {}
            }
        }
        for (i, cache) in caches.iter().enumerate() {
            hits[i] += cache.hits;
            accesses[i] += cache.accesses;
        }
        with_prefetch.0 += prefetching.hits;
        with_prefetch.1 += prefetching.accesses;
        test_samples.extend(replay.outcomes);
    }
    let labels: Vec<bool> = test_samples.iter().map(|(_, y)| *y).collect();
    let rows: Vec<Features> = test_samples.iter().map(|(f, _)| *f).collect();
    let auc_of = |policy| importance::auc(&scores(policy, model.as_ref(), &rows), &labels);
    let rate = |i: usize| hits[i] as f64 / accesses[i].max(1) as f64;
    let report = Importance {
        sessions_train: train,
        sessions_test: test,
        turns_per_session: turns,
        reaccess_steps: window,
        samples_train: train_samples.len(),
        samples_test: test_samples.len(),
        positive_share_test: labels.iter().filter(|y| **y).count() as f64 / labels.len().max(1) as f64,
        auc: PerPolicy {
            lru: auc_of(Policy::Lru),
            lfu: auc_of(Policy::Lfu),
            formula: auc_of(Policy::Formula),
            model: if model.is_some() {
                auc_of(Policy::Model)
            } else {
                f64::NAN
            },
        },
        hot_bytes,
        hot_hit_rate: PerPolicy {
            lru: rate(0),
            lfu: rate(1),
            formula: rate(2),
            model: rate(3),
        },
        hot_hit_rate_model_with_prefetch: with_prefetch.0 as f64 / with_prefetch.1.max(1) as f64,
        prefetch_issued,
        prefetch_hits,
        prefetch_precision: prefetch_hits as f64 / prefetch_issued.max(1) as f64,
    };
    (report, model)
}

#[derive(Serialize, Default)]
pub struct WindowFigures {
    /// Mean share of a window's tokens that is a prefix of the previous
    /// window (what a prompt cache can serve), over the turns once the
    /// session no longer fits the budget.
    pub prefix_share_mean: f64,
    pub prefix_share_p10: f64,
    /// Share of facts asked about that the window still holds (verbatim or
    /// in a summary).
    pub facts_reachable: f64,
    pub compactions: usize,
    pub max_tokens: u64,
}

#[derive(Serialize)]
pub struct Assembly {
    pub turns: usize,
    pub budget: u32,
    pub session_tokens: u64,
    pub facts_asked: usize,
    pub bbx: WindowFigures,
    pub cut_oldest: WindowFigures,
}

fn summarize(parts: &[Part], cap: u32, texts: &[String], counter: &TokenCounter) -> bbx_core::Result<Part> {
    let mut covers = Vec::new();
    let mut inputs: Vec<&str> = Vec::new();
    for part in parts {
        match part {
            Part::Item(id) => {
                covers.push(*id);
                inputs.push(&texts[*id as usize - 1]);
            }
            Part::Summary {
                covers: inner, text, ..
            } => {
                covers.extend_from_slice(inner);
                inputs.push(text);
            }
        }
    }
    let text = bbx_context::summary::summarize("[Summary of earlier items]", &inputs, cap, counter);
    Ok(Part::Summary {
        covers,
        tokens: counter.count(&text),
        text,
    })
}

fn percentile_10(mut shares: Vec<f64>) -> f64 {
    if shares.is_empty() {
        return 0.0;
    }
    shares.sort_by(f64::total_cmp);
    shares[shares.len() / 10]
}

/// One long session, a window assembled every turn by BBX and by cutting the
/// oldest turns.
pub fn assembly(turns: usize, budget: u32, model: Option<&Model>) -> Assembly {
    let counter = TokenCounter::new("o200k").expect("o200k is built in");
    let session = session(42, turns);
    let tokens = tokens_of(&session, &counter);
    let mut replay = Replay::new(64);
    let mut texts: Vec<String> = Vec::new();
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut previous: Option<assemble::Assembly> = None;
    let mut previous_cut: Vec<u64> = Vec::new();
    let (mut bbx, mut cut) = (WindowFigures::default(), WindowFigures::default());
    let (mut bbx_shares, mut cut_shares) = (Vec::new(), Vec::new());
    let (mut asked, mut bbx_found, mut cut_found) = (0usize, 0usize, 0usize);
    let mut full = false;
    let defaults = bbx_core::config::ContextConfig::default();
    let settings = Settings {
        compact_to: defaults.compact_to,
        summary_tokens: defaults.summary_tokens as u32,
    };
    for event in &session.events {
        match event {
            Event::Put(put) => {
                let id = replay.put(put, tokens[texts.len()]);
                candidates.push(Candidate {
                    id,
                    tokens: tokens[texts.len()],
                    head: put.pinned || put.role == Role::System,
                });
                texts.push(put.text.clone());
            }
            Event::Get(id) => replay.get(*id),
            Event::Turn { needs } => {
                let plan = assemble::plan(
                    &candidates,
                    previous.as_ref(),
                    budget,
                    settings,
                    |parts, cap| summarize(parts, cap, &texts, &counter),
                    |ids| importance::scores(model, &replay.features(ids)),
                )
                .expect("the head fits the budget");
                let window = cut_oldest(&candidates, budget);
                let window_tokens = |ids: &[u64]| ids.iter().map(|id| u64::from(tokens[*id as usize - 1])).sum::<u64>();
                let cut_tokens = window_tokens(&window);
                full |= plan.compacted || cut_tokens + 2000 > u64::from(budget);
                if full && previous.is_some() {
                    bbx_shares.push(plan.prefix_tokens as f64 / plan.tokens.max(1) as f64);
                    let shared = window.iter().zip(&previous_cut).take_while(|(a, b)| a == b).count();
                    cut_shares.push(window_tokens(&window[..shared]) as f64 / cut_tokens.max(1) as f64);
                }
                bbx.compactions += usize::from(plan.compacted);
                bbx.max_tokens = bbx.max_tokens.max(plan.tokens);
                cut.max_tokens = cut.max_tokens.max(cut_tokens);
                for fact in needs {
                    let sentence = &session.facts[*fact].sentence;
                    asked += 1;
                    let in_bbx = plan
                        .assembly
                        .head
                        .iter()
                        .any(|id| texts[*id as usize - 1].contains(sentence))
                        || plan.assembly.body.iter().any(|part| match part {
                            Part::Item(id) => texts[*id as usize - 1].contains(sentence),
                            Part::Summary { text, .. } => text.contains(sentence),
                        });
                    bbx_found += usize::from(in_bbx);
                    cut_found += usize::from(window.iter().any(|id| texts[*id as usize - 1].contains(sentence)));
                }
                previous = Some(plan.assembly);
                previous_cut = window;
            }
        }
    }
    let mean = |shares: &[f64]| shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    bbx.prefix_share_mean = mean(&bbx_shares);
    cut.prefix_share_mean = mean(&cut_shares);
    bbx.prefix_share_p10 = percentile_10(bbx_shares);
    cut.prefix_share_p10 = percentile_10(cut_shares);
    bbx.facts_reachable = bbx_found as f64 / asked.max(1) as f64;
    cut.facts_reachable = cut_found as f64 / asked.max(1) as f64;
    Assembly {
        turns,
        budget,
        session_tokens: tokens.iter().map(|t| u64::from(*t)).sum(),
        facts_asked: asked,
        bbx,
        cut_oldest: cut,
    }
}

/// The head, then the newest items that fit, in order: what most frameworks do.
fn cut_oldest(candidates: &[Candidate], budget: u32) -> Vec<u64> {
    let head: Vec<u64> = candidates.iter().filter(|c| c.head).map(|c| c.id).collect();
    let mut room = u64::from(budget)
        - candidates
            .iter()
            .filter(|c| c.head)
            .map(|c| u64::from(c.tokens))
            .sum::<u64>();
    let mut tail = Vec::new();
    for c in candidates.iter().rev().filter(|c| !c.head) {
        if u64::from(c.tokens) > room {
            break;
        }
        room -= u64::from(c.tokens);
        tail.push(c.id);
    }
    tail.reverse();
    head.into_iter().chain(tail).collect()
}
