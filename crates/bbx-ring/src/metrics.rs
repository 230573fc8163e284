//! The ring's metrics, served in `/metrics`. Children of labelled
//! families are resolved once, at start, so that counting an op is an atomic add
//! and never a map lookup.

use bbx_core::op::{CompletionStatus, Priority};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    priority: &'static str,
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "LOW",
        Priority::Normal => "NORMAL",
        Priority::High => "HIGH",
        Priority::Realtime => "REALTIME",
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~80 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 24))
}

#[derive(Clone)]
pub struct RingMetrics {
    completed_family: Family<StatusLabel, Counter>,
    queued_family: Family<PriorityLabel, Gauge>,
    latency_family: Family<PriorityLabel, Histogram, fn() -> Histogram>,
    pub submitted: Counter,
    pub deduplicated: Counter,
    pub refused: Counter,
    pub retries: Counter,
    pub pending: Gauge,
    completed: Vec<Counter>,
    queued: Vec<Gauge>,
    latency: Vec<Histogram>,
    quota_warnings: Family<LimitLabel, Counter>,
    quota_exceeded: Family<LimitLabel, Counter>,
}

impl Default for RingMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RingMetrics {
    pub fn new() -> Self {
        let completed_family = Family::<StatusLabel, Counter>::default();
        let queued_family = Family::<PriorityLabel, Gauge>::default();
        let latency_family =
            Family::<PriorityLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let completed = CompletionStatus::ALL
            .iter()
            .map(|s| {
                completed_family
                    .get_or_create(&StatusLabel { status: s.as_str() })
                    .clone()
            })
            .collect();
        let by_priority = |p: &Priority| PriorityLabel {
            priority: priority_name(*p),
        };
        let queued = Priority::ALL
            .iter()
            .map(|p| queued_family.get_or_create(&by_priority(p)).clone())
            .collect();
        let latency = Priority::ALL
            .iter()
            .map(|p| latency_family.get_or_create(&by_priority(p)).clone())
            .collect();
        Self {
            completed_family,
            queued_family,
            latency_family,
            submitted: Counter::default(),
            deduplicated: Counter::default(),
            refused: Counter::default(),
            retries: Counter::default(),
            pending: Gauge::default(),
            completed,
            queued,
            latency,
            quota_warnings: Family::default(),
            quota_exceeded: Family::default(),
        }
    }

    /// A submission left a node past 80 % of `limit`.
    pub fn quota_warning(&self, limit: &'static str) {
        self.quota_warnings.get_or_create(&LimitLabel { limit }).inc();
    }

    /// A submission did not fit `limit`.
    pub fn quota_exceeded(&self, limit: &'static str) {
        self.quota_exceeded.get_or_create(&LimitLabel { limit }).inc();
    }

    pub fn completed(&self, status: CompletionStatus, priority: Priority, total_us: u64) {
        self.completed[status as usize].inc();
        self.latency[priority.rank()].observe(total_us as f64 / 1e6);
    }

    pub fn completed_counts(&self) -> std::collections::BTreeMap<CompletionStatus, u64> {
        CompletionStatus::ALL
            .iter()
            .map(|s| (*s, self.completed[*s as usize].get()))
            .collect()
    }

    pub fn queued(&self, depths: impl Iterator<Item = (Priority, usize)>, pending: usize) {
        for (priority, depth) in depths {
            self.queued[priority.rank()].set(depth as i64);
        }
        self.pending.set(pending as i64);
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bbx_ring_submitted",
            "Ops accepted by the AgentRing",
            self.submitted.clone(),
        );
        registry.register(
            "bbx_ring_deduplicated",
            "Submissions answered with an existing op by idempotency key",
            self.deduplicated.clone(),
        );
        registry.register(
            "bbx_ring_refused",
            "Submissions refused because the queue was full",
            self.refused.clone(),
        );
        registry.register(
            "bbx_ring_retries",
            "Attempts retried after a backoff",
            self.retries.clone(),
        );
        registry.register(
            "bbx_ring_completed",
            "Ops completed, by status",
            self.completed_family.clone(),
        );
        registry.register(
            "bbx_ring_queued",
            "Ops waiting to run, by priority",
            self.queued_family.clone(),
        );
        registry.register(
            "bbx_ring_pending",
            "Ops accepted and not yet started",
            self.pending.clone(),
        );
        registry.register(
            "bbx_ring_op_duration_seconds",
            "Submission to completion, by priority",
            self.latency_family.clone(),
        );
        registry.register(
            "bbx_quota_warnings",
            "Submissions that left a quota node past 80 % of a limit, by limit",
            self.quota_warnings.clone(),
        );
        registry.register(
            "bbx_quota_exceeded",
            "Submissions that did not fit a limit (refused, or let through by notify), by limit",
            self.quota_exceeded.clone(),
        );
    }
}
