//! Which op runs next.
//!
//! Four priority levels, served highest first, with two corrections:
//! - **Aging.** A level's effective priority grows by one for every `aging` interval
//!   its oldest op has waited, so a steady stream of `Realtime` ops delays `Low` ops by
//!   at most about four intervals; it never starves them.
//! - **Fairness.** Inside a level, agents take turns (round robin, one op each), so an
//!   agent that floods the ring delays only itself.
//!
//! The queue is bounded: a full scheduler refuses new ops (the API turns that into
//! 429 with `Retry-After`), and `Low` ops can be shed early, before the queue is full.
//! Time is passed in by the caller, which keeps the policy deterministic to test.

use bbx_core::op::Priority;
use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most ops waiting at once (the submission queue's size).
    pub capacity: usize,
    /// Most ops one agent may have waiting, so that a flooding agent is refused
    /// before it fills the queue for everyone else.
    pub agent_capacity: usize,
    /// How long an op waits before its level counts as one priority higher.
    pub aging: Duration,
    /// Shed `Low` ops once the queue is this full (a fraction, e.g. 0.8); `None` keeps
    /// them until the queue is completely full.
    pub shed_low_above: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            capacity: 8192,
            agent_capacity: 2048,
            aging: Duration::from_millis(100),
            shed_low_above: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the submission queue is full ({capacity} ops waiting)")]
    Full { capacity: usize },
    #[error("this agent already has {capacity} ops waiting, its limit")]
    AgentFull { capacity: usize },
    #[error("the submission queue is busy and sheds LOW-priority ops")]
    Shed,
}

/// An op leaving the scheduler.
#[derive(Debug, PartialEq, Eq)]
pub struct Next<K, T> {
    pub agent: K,
    pub priority: Priority,
    pub item: T,
    pub waited: Duration,
}

struct Waiting<T> {
    since: Instant,
    seq: u64,
    item: T,
}

struct Level<K, T> {
    /// Agents with ops at this level, in turn order.
    turns: VecDeque<K>,
    queues: FxHashMap<K, VecDeque<Waiting<T>>>,
    /// (enqueue time, seq) of every op at this level: its first is the oldest.
    ages: BTreeSet<(Instant, u64)>,
}

impl<K, T> Default for Level<K, T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            queues: FxHashMap::default(),
            ages: BTreeSet::new(),
        }
    }
}

/// Keyed by agent with Fx hashing: agent ids are random ids the kernel generates,
/// so SipHash's defence against chosen keys buys nothing, and the scheduler hashes
/// an agent several times per op.
pub struct Scheduler<K, T> {
    config: SchedulerConfig,
    levels: [Level<K, T>; 4],
    /// Ops waiting per agent, across levels.
    per_agent: FxHashMap<K, usize>,
    len: usize,
    seq: u64,
}

impl<K: Hash + Eq + Clone, T> Scheduler<K, T> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            levels: Default::default(),
            per_agent: FxHashMap::default(),
            len: 0,
            seq: 0,
        }
    }

    /// Ops admitted and not yet popped or released: queued ones plus those admitted
    /// for later (waiting for dependencies or a retry timer).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Ops queued at one priority.
    pub fn depth(&self, priority: Priority) -> usize {
        self.levels[priority.rank()].ages.len()
    }

    /// Admits a whole batch or none of it: each op takes a slot of the queue (and of
    /// its agent's share) now, and is [`enqueue`](Self::enqueue)d or
    /// [`release`](Self::release)d later. Holding the slot from submission on is what
    /// keeps a batch that was acknowledged from finding the queue full.
    pub fn admit(&mut self, ops: &[(K, Priority)]) -> Result<(), Refused> {
        if self.len + ops.len() > self.config.capacity {
            return Err(Refused::Full {
                capacity: self.config.capacity,
            });
        }
        let mut per_agent: FxHashMap<&K, usize> = FxHashMap::default();
        for (agent, priority) in ops {
            let mine = per_agent
                .entry(agent)
                .or_insert_with(|| self.per_agent.get(agent).copied().unwrap_or(0));
            *mine += 1;
            if *mine > self.config.agent_capacity {
                return Err(Refused::AgentFull {
                    capacity: self.config.agent_capacity,
                });
            }
            if *priority == Priority::Low
                && self
                    .config
                    .shed_low_above
                    .is_some_and(|f| self.len as f64 >= f * self.config.capacity as f64)
            {
                return Err(Refused::Shed);
            }
        }
        for (agent, _) in ops {
            self.count_in(agent.clone());
        }
        Ok(())
    }

    /// Admits an op that was admitted before and must not be refused now (a retry).
    pub fn readmit(&mut self, agent: K) {
        self.count_in(agent);
    }

    fn count_in(&mut self, agent: K) {
        *self.per_agent.entry(agent).or_default() += 1;
        self.len += 1;
    }

    fn count_out(&mut self, agent: &K) {
        if let Some(n) = self.per_agent.get_mut(agent) {
            *n -= 1;
            if *n == 0 {
                self.per_agent.remove(agent);
            }
        }
        self.len -= 1;
    }

    /// Gives back the slot of an admitted op that will not run (cancelled while it
    /// waited for its dependencies).
    pub fn release(&mut self, agent: &K) {
        self.count_out(agent);
    }

    /// Queues an admitted op.
    pub fn enqueue(&mut self, agent: K, priority: Priority, item: T, now: Instant) {
        self.seq += 1;
        let level = &mut self.levels[priority.rank()];
        level.ages.insert((now, self.seq));
        let queue = level.queues.entry(agent.clone()).or_default();
        if queue.is_empty() {
            level.turns.push_back(agent);
        }
        queue.push_back(Waiting {
            since: now,
            seq: self.seq,
            item,
        });
    }

    /// Admits and queues one op.
    pub fn push(&mut self, agent: K, priority: Priority, item: T, now: Instant) -> Result<(), Refused> {
        self.admit(&[(agent.clone(), priority)])?;
        self.enqueue(agent, priority, item, now);
        Ok(())
    }

    /// The next op to run, if any.
    pub fn pop(&mut self, now: Instant) -> Option<Next<K, T>> {
        let aging = self.config.aging.as_nanos().max(1);
        let rank = (0..4)
            .filter_map(|rank| {
                let (oldest, _) = self.levels[rank].ages.first()?;
                let boost = now.saturating_duration_since(*oldest).as_nanos() / aging;
                Some((rank as u128 + boost, rank))
            })
            .max()?
            .1;
        let level = &mut self.levels[rank];
        let agent = level
            .turns
            .pop_front()
            .expect("a level with ops has an agent whose turn it is");
        let queue = level.queues.get_mut(&agent).expect("agents in turn have a queue");
        let waiting = queue.pop_front().expect("agents in turn have an op");
        if queue.is_empty() {
            level.queues.remove(&agent);
        } else {
            level.turns.push_back(agent.clone());
        }
        level.ages.remove(&(waiting.since, waiting.seq));
        self.count_out(&agent);
        Some(Next {
            agent,
            priority: Priority::ALL[rank],
            item: waiting.item,
            waited: now.saturating_duration_since(waiting.since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scheduler(capacity: usize) -> Scheduler<u32, u32> {
        Scheduler::new(SchedulerConfig {
            capacity,
            agent_capacity: capacity,
            ..Default::default()
        })
    }

    #[test]
    fn higher_priority_runs_first() {
        let mut s = scheduler(16);
        let now = Instant::now();
        for (i, p) in [Priority::Low, Priority::Realtime, Priority::Normal, Priority::High]
            .into_iter()
            .enumerate()
        {
            s.push(1, p, i as u32, now).unwrap();
        }
        let order: Vec<Priority> = std::iter::from_fn(|| s.pop(now)).map(|n| n.priority).collect();
        assert_eq!(
            order,
            [Priority::Realtime, Priority::High, Priority::Normal, Priority::Low]
        );
    }

    #[test]
    fn a_flooding_agent_delays_only_itself() {
        let mut s = scheduler(10_000);
        let now = Instant::now();
        for i in 0..1000 {
            s.push(1, Priority::Normal, i, now).unwrap();
        }
        for i in 0..10 {
            s.push(2, Priority::Normal, i, now).unwrap();
        }
        let first_20: Vec<u32> = (0..20).map(|_| s.pop(now).unwrap().agent).collect();
        assert_eq!(
            first_20.iter().filter(|&&a| a == 2).count(),
            10,
            "agent 2 alternates with the flooder"
        );
    }

    #[test]
    fn a_flooding_agent_is_refused_before_it_fills_the_queue() {
        let mut s: Scheduler<u32, u32> = Scheduler::new(SchedulerConfig {
            capacity: 100,
            agent_capacity: 25,
            ..Default::default()
        });
        let now = Instant::now();
        let accepted = (0..1000)
            .filter(|i| s.push(1, Priority::Realtime, *i, now).is_ok())
            .count();
        assert_eq!(accepted, 25);
        assert_eq!(
            s.push(1, Priority::Low, 0, now),
            Err(Refused::AgentFull { capacity: 25 })
        );
        for other in 2..5 {
            assert!(
                s.push(other, Priority::Low, 0, now).is_ok(),
                "agent {other} still gets in"
            );
        }
        s.pop(now).unwrap();
        assert!(
            s.push(1, Priority::Normal, 0, now).is_ok(),
            "a slot of its own frees up"
        );
    }

    #[test]
    fn low_priority_is_delayed_but_never_starved() {
        let mut s = scheduler(10_000);
        let start = Instant::now();
        s.push(7, Priority::Low, 0, start).unwrap();
        // A fresh REALTIME op arrives every millisecond and the worker takes one op per
        // millisecond: without aging the LOW op would wait forever.
        let mut served_low_at = None;
        for ms in 0..1000u64 {
            let now = start + Duration::from_millis(ms);
            s.push(1, Priority::Realtime, 1, now).unwrap();
            if s.pop(now).unwrap().priority == Priority::Low {
                served_low_at = Some(ms);
                break;
            }
        }
        let ms = served_low_at.expect("the LOW op ran");
        assert!(
            (400..=500).contains(&ms),
            "aged past REALTIME after about 4 intervals, got {ms} ms"
        );
    }

    #[test]
    fn a_full_queue_refuses_and_low_can_be_shed_early() {
        let now = Instant::now();
        let mut s = scheduler(2);
        s.push(1, Priority::High, 0, now).unwrap();
        s.push(1, Priority::High, 1, now).unwrap();
        assert_eq!(
            s.push(1, Priority::Realtime, 2, now),
            Err(Refused::Full { capacity: 2 })
        );
        s.pop(now).unwrap();
        assert!(s.push(1, Priority::Realtime, 2, now).is_ok());

        let mut s: Scheduler<u32, u32> = Scheduler::new(SchedulerConfig {
            capacity: 10,
            agent_capacity: 10,
            shed_low_above: Some(0.5),
            ..Default::default()
        });
        for i in 0..5 {
            s.push(1, Priority::Normal, i, now).unwrap();
        }
        assert_eq!(s.push(1, Priority::Low, 9, now), Err(Refused::Shed));
        assert!(s.push(1, Priority::Normal, 9, now).is_ok());
        assert_eq!(s.depth(Priority::Normal), 6);
    }

    #[test]
    fn a_batch_is_admitted_whole_or_not_at_all() {
        let mut s: Scheduler<u32, u32> = Scheduler::new(SchedulerConfig {
            capacity: 10,
            agent_capacity: 4,
            ..Default::default()
        });
        let batch = |agent, n| vec![(agent, Priority::Normal); n];
        assert_eq!(s.admit(&batch(1, 5)), Err(Refused::AgentFull { capacity: 4 }));
        assert!(s.is_empty(), "a refused batch takes nothing");
        s.admit(&batch(1, 4)).unwrap();
        s.admit(&batch(2, 4)).unwrap();
        assert_eq!(s.admit(&batch(3, 3)), Err(Refused::Full { capacity: 10 }));
        assert_eq!(s.len(), 8);
        // Admitted slots are held until queued and popped, or released.
        s.release(&1);
        s.enqueue(2, Priority::High, 7, Instant::now());
        assert_eq!(s.pop(Instant::now()).unwrap().item, 7);
        assert_eq!(s.len(), 6);
        s.admit(&batch(1, 1)).unwrap();
        s.readmit(1);
        assert_eq!(s.len(), 8, "a retry is admitted past the agent's share");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push { agent: u8, priority: u8 },
        Pop,
        Wait(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..4, 0u8..4).prop_map(|(agent, priority)| Step::Push { agent, priority }),
            2 => Just(Step::Pop),
            1 => (0u8..250).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// Whatever the interleaving: every accepted op comes out exactly once, ops of
        /// one agent at one priority keep their order, and the counters agree.
        #[test]
        fn ops_are_neither_lost_nor_duplicated_nor_reordered(steps in proptest::collection::vec(step(), 0..300)) {
            let mut s: Scheduler<u8, u32> =
                Scheduler::new(SchedulerConfig { capacity: 64, agent_capacity: 24, ..Default::default() });
            let mut now = Instant::now();
            let mut next_id = 0u32;
            let mut accepted = std::collections::HashMap::<(u8, Priority), VecDeque<u32>>::new();
            let check = |n: Next<u8, u32>, accepted: &mut std::collections::HashMap<(u8, Priority), VecDeque<u32>>| {
                let expected = accepted.get_mut(&(n.agent, n.priority)).and_then(VecDeque::pop_front);
                assert_eq!(expected, Some(n.item), "FIFO per agent and priority");
            };
            for step in steps {
                match step {
                    Step::Push { agent, priority } => {
                        let priority = Priority::ALL[priority as usize];
                        let agent_waiting: usize =
                            Priority::ALL.iter().map(|p| accepted.get(&(agent, *p)).map_or(0, VecDeque::len)).sum();
                        match s.push(agent, priority, next_id, now) {
                            Ok(()) => accepted.entry((agent, priority)).or_default().push_back(next_id),
                            Err(Refused::Full { .. }) => prop_assert_eq!(s.len(), 64),
                            Err(Refused::AgentFull { .. }) => prop_assert_eq!(agent_waiting, 24),
                            Err(Refused::Shed) => prop_assert!(false, "shedding is off"),
                        }
                        next_id += 1;
                    }
                    Step::Pop => {
                        if let Some(n) = s.pop(now) {
                            check(n, &mut accepted);
                        }
                    }
                    Step::Wait(ms) => now += Duration::from_millis(ms as u64),
                }
                let waiting: usize = accepted.values().map(VecDeque::len).sum();
                prop_assert_eq!(s.len(), waiting);
                prop_assert_eq!(Priority::ALL.iter().map(|p| s.depth(*p)).sum::<usize>(), waiting);
            }
            while let Some(n) = s.pop(now) {
                check(n, &mut accepted);
            }
            prop_assert!(accepted.values().all(VecDeque::is_empty));
            prop_assert!(s.is_empty());
        }
    }
}
