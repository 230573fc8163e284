//! AgentQuotas: every agent and tenant kept inside its limits.
//!
//! This crate owns the quota hierarchy (tenant -> agent) and what it decides:
//! whether a submission fits the rate limits of every node on its path
//! ([`Quotas::check_rates`], token buckets that refill continuously), whether a new op
//! fits their limits on ops in flight ([`Quotas::acquire`]), and the process limits
//! a tool run gets ([`cgroup`]). A check walks the whole path under the nodes'
//! locks, taken in one order, and takes from every node or from none, so a refused
//! op costs no node anything and a child can never exceed its parent.
//!
//! Budgets (cost per UTC day and month, LLM tokens per minute) are reserved before
//! an op runs, at the most it can spend ([`Quotas::reserve`]), and settled with
//! what it actually spent ([`Quotas::settle`]); a reservation counts against the
//! limit while it is held, so concurrent ops can never together overspend.
//!
//! It performs no storage I/O: the kernel persists each node's [`QuotaLimits`] and
//! its spend per window, and hands them over at start ([`Quotas::set`],
//! [`Quotas::load_spent`]) and on every change.

pub mod cgroup;
pub mod gpu;
mod rate;
pub mod stored;

pub use rate::TokenBucket;

pub use bbx_core::quota::Node;
use bbx_core::quota::{QuotaAction, QuotaLimits, QuotaUsage, Reservation, usd_to_micros};
use bbx_core::{AgentId, Error, ErrorCode};
use chrono::{DateTime, Utc};
use parking_lot::{Mutex, MutexGuard, RwLock};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a submission asks of the rate limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub ops: u32,
    pub tool_calls: u32,
}

/// A limit that a submission does not fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    pub node: String,
    /// The limit's field name, e.g. `requests_per_second`.
    pub limit: &'static str,
    pub value: u64,
    /// When the submission would fit, if waiting can help.
    pub retry_after: Option<Duration>,
    pub action: QuotaAction,
    /// How long `throttle` may wait on this node.
    pub max_delay: Duration,
}

impl From<Exceeded> for Error {
    fn from(e: Exceeded) -> Self {
        let retry_after_ms = e.retry_after.map(|d| d.as_millis().max(1) as u64);
        Error::new(
            ErrorCode::QuotaExceeded,
            format!("{} of {} is exceeded (limit {})", e.limit, e.node, e.value),
        )
        .with_details(serde_json::json!({
            "limit": e.limit,
            "node": e.node,
            "value": e.value,
            "retry_after_ms": retry_after_ms,
        }))
    }
}

/// A node past 80 % of one of its limits after an admission.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    pub node: String,
    pub limit: &'static str,
}

/// Default longest wait of a throttled submission.
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);
/// How soon to look again when ops in flight are at their limit.
const CONCURRENCY_RETRY: Duration = Duration::from_millis(10);

/// A node: one per tenant or agent for as long as it exists. Its limits change in
/// place, under its lock, so a change never loses a count taken meanwhile.
struct NodeQuota {
    name: String,
    live: Mutex<Live>,
    rejected: AtomicU64,
    throttled: AtomicU64,
    warnings: AtomicU64,
}

struct Live {
    limits: QuotaLimits,
    requests: Option<TokenBucket>,
    tool_calls: Option<TokenBucket>,
    llm_tokens: Option<TokenBucket>,
    in_flight: u64,
    /// Spend by window (`2026-11-24`, `2026-11`).
    windows: HashMap<String, WindowSpend>,
}

#[derive(Debug, Clone, Copy, Default)]
struct WindowSpend {
    spent: u64,
    reserved: u64,
}

/// The budget windows of a moment: its UTC day and month.
pub fn windows(wall: DateTime<Utc>) -> (String, String) {
    (wall.format("%Y-%m-%d").to_string(), wall.format("%Y-%m").to_string())
}

/// Where a node's spend in a window is stored.
pub fn spend_key(node: &impl fmt::Display, window: &str) -> String {
    format!("{node}|{window}")
}

/// The node and window of a stored spend key.
pub fn parse_spend_key(key: &str) -> Option<(Node, String)> {
    let (node, window) = key.rsplit_once('|')?;
    Some((node.parse().ok()?, window.to_owned()))
}

/// What a node does when a limit is reached: its action and longest throttle.
type Policy = (QuotaAction, Duration);

impl Live {
    fn policy(&self) -> Policy {
        (
            self.limits.action.unwrap_or_default(),
            self.limits
                .max_delay_ms
                .map_or(DEFAULT_MAX_DELAY, Duration::from_millis),
        )
    }

    /// Takes new limits: their rate buckets start full; ops in flight and spend stay.
    fn apply(&mut self, limits: QuotaLimits, now: Instant) {
        self.requests = limits
            .requests_per_second
            .map(|r| TokenBucket::new(f64::from(r), f64::from(r), now));
        self.tool_calls = limits
            .tool_calls_per_minute
            .map(|r| TokenBucket::new(f64::from(r), f64::from(r) / 60.0, now));
        self.llm_tokens = limits
            .llm_tokens_per_minute
            .map(|r| TokenBucket::new(r as f64, r as f64 / 60.0, now));
        self.limits = limits;
    }
}

impl NodeQuota {
    fn new(node: &Node, limits: QuotaLimits, now: Instant) -> Self {
        let mut live = Live {
            limits: QuotaLimits::default(),
            requests: None,
            tool_calls: None,
            llm_tokens: None,
            in_flight: 0,
            windows: HashMap::new(),
        };
        live.apply(limits, now);
        Self {
            name: node.to_string(),
            live: Mutex::new(live),
            rejected: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            warnings: AtomicU64::new(0),
        }
    }

    fn exceeded(&self, policy: Policy, limit: &'static str, value: u64, retry_after: Option<Duration>) -> Exceeded {
        Exceeded {
            node: self.name.clone(),
            limit,
            value,
            retry_after,
            action: policy.0,
            max_delay: policy.1,
        }
    }
}

/// The quota hierarchy and its live counters.
#[derive(Default)]
pub struct Quotas {
    nodes: RwLock<HashMap<Node, Arc<NodeQuota>>>,
    /// Each agent's path as last resolved, so that the per-op checks look up one
    /// agent id instead of building and hashing both nodes' names. Cleared when
    /// a node is removed.
    paths: RwLock<FxHashMap<AgentId, CachedPath>>,
}

/// The nodes on an agent's path, root first: tenant, its group if it has one,
/// agent. Locks are always taken in this order.
type Path = Arc<[Arc<NodeQuota>]>;

struct CachedPath {
    tenant: String,
    /// The agent's group when the path was resolved: a path is used only while
    /// the agent's node still names the same group.
    group: Option<String>,
    nodes: Path,
}

impl Quotas {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a node's limits (replacing them), keeping its ops in flight and its
    /// spend; its rate buckets start full. An agent changes group only while it
    /// holds nothing (no op in flight, no budget reserved): what it holds is
    /// given back along the path it was taken on.
    pub fn set(&self, node: Node, limits: QuotaLimits) -> Result<(), Error> {
        let is_agent = matches!(node, Node::Agent(_));
        let quota = self.node(node);
        let mut live = quota.live.lock();
        if is_agent && live.limits.group != limits.group {
            let holds = live.in_flight > 0 || live.windows.values().any(|w| w.reserved > 0);
            if holds {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("{} has ops in flight; change its group when it is idle", quota.name),
                ));
            }
        }
        live.apply(limits, Instant::now());
        Ok(())
    }

    /// The group an agent belongs to, if any.
    pub fn group_of(&self, agent: AgentId) -> Option<String> {
        self.nodes
            .read()
            .get(&Node::Agent(agent))
            .and_then(|n| n.live.lock().limits.group.clone())
    }

    /// Adds spend recorded before this start.
    pub fn load_spent(&self, node: Node, window: &str, micros: u64) {
        let path = self.node(node);
        path.live.lock().windows.entry(window.to_owned()).or_default().spent += micros;
    }

    /// Forgets a node (a deleted agent).
    pub fn remove(&self, node: &Node) {
        // The nodes' lock is let go before the paths' is taken: `path` takes the
        // two the other way round.
        self.nodes.write().remove(node);
        self.paths.write().clear();
    }

    pub fn limits(&self, node: &Node) -> QuotaLimits {
        self.nodes
            .read()
            .get(node)
            .map(|n| n.live.lock().limits.clone())
            .unwrap_or_default()
    }

    pub fn usage(&self, node: &Node) -> QuotaUsage {
        let nodes = self.nodes.read();
        let Some(n) = nodes.get(node) else {
            return QuotaUsage::default();
        };
        let live = n.live.lock();
        let (day, month) = windows(Utc::now());
        let window = |w: &str| live.windows.get(w).copied().unwrap_or_default();
        let usd = |micros: u64| micros as f64 / 1e6;
        QuotaUsage {
            spent_today_usd: usd(window(&day).spent),
            spent_this_month_usd: usd(window(&month).spent),
            reserved_usd: usd(window(&month).reserved),
            concurrent_ops: live.in_flight,
            rejected: n.rejected.load(Ordering::Relaxed),
            throttled: n.throttled.load(Ordering::Relaxed),
            warnings: n.warnings.load(Ordering::Relaxed),
        }
    }

    /// Every node that has limits or ops in flight, in order.
    pub fn nodes(&self) -> Vec<Node> {
        let mut nodes: Vec<Node> = self.nodes.read().keys().cloned().collect();
        nodes.sort();
        nodes
    }

    fn node(&self, node: Node) -> Arc<NodeQuota> {
        if let Some(n) = self.nodes.read().get(&node) {
            return n.clone();
        }
        let mut nodes = self.nodes.write();
        nodes
            .entry(node.clone())
            .or_insert_with(|| Arc::new(NodeQuota::new(&node, QuotaLimits::default(), Instant::now())))
            .clone()
    }

    /// The nodes on an agent's path, and the group it was resolved with.
    fn path(&self, tenant: &str, agent: AgentId) -> (Path, Option<String>) {
        if let Some(cached) = self.paths.read().get(&agent)
            && cached.tenant == tenant
        {
            return (cached.nodes.clone(), cached.group.clone());
        }
        // Each node is looked up (and its lock taken) on its own: no lock is held
        // across another here, so this cannot deadlock with `set`.
        let agent_node = self.node(Node::Agent(agent));
        let group = agent_node.live.lock().limits.group.clone();
        let mut nodes = vec![self.node(Node::Tenant(tenant.to_owned()))];
        if let Some(name) = &group {
            nodes.push(self.node(Node::Group {
                tenant: tenant.to_owned(),
                name: name.clone(),
            }));
        }
        nodes.push(agent_node);
        let path: Path = nodes.into();
        self.paths.write().insert(
            agent,
            CachedPath {
                tenant: tenant.to_owned(),
                group: group.clone(),
                nodes: path.clone(),
            },
        );
        (path, group)
    }

    /// Runs `f` with every node of the agent's path locked, root first. A path
    /// resolved before the agent changed group is dropped and resolved again:
    /// the check is made under the agent's own lock, which `set` also takes.
    fn locked<R>(
        &self,
        tenant: &str,
        agent: AgentId,
        mut f: impl FnMut(&[Arc<NodeQuota>], &mut [MutexGuard<'_, Live>]) -> R,
    ) -> R {
        loop {
            let (path, group) = self.path(tenant, agent);
            let mut guards: Vec<_> = path.iter().map(|n| n.live.lock()).collect();
            if guards.last().is_some_and(|agent| agent.limits.group == group) {
                return f(&path, &mut guards);
            }
            drop(guards);
            self.paths.write().remove(&agent);
        }
    }

    /// Takes `demand` from the rate limits of every node on the agent's path, or
    /// from none: the first limit it does not fit is returned, with when it would.
    /// Nodes past 80 % of a rate limit afterwards are reported.
    pub fn check_rates(
        &self,
        tenant: &str,
        agent: AgentId,
        demand: Demand,
        now: Instant,
    ) -> Result<Vec<Warning>, Exceeded> {
        self.locked(tenant, agent, |path, guards| {
            for (node, guard) in path.iter().zip(guards.iter_mut()) {
                let live: &mut Live = guard;
                let policy = live.policy();
                let wants = [
                    ("requests_per_second", live.requests.as_mut(), demand.ops),
                    ("tool_calls_per_minute", live.tool_calls.as_mut(), demand.tool_calls),
                ];
                for (limit, bucket, n) in wants {
                    let Some(bucket) = bucket else { continue };
                    if n == 0 {
                        continue;
                    }
                    if let Some(wait) = bucket.shortfall(f64::from(n), now) {
                        node.rejected.fetch_add(1, Ordering::Relaxed);
                        return Err(node.exceeded(policy, limit, bucket.capacity() as u64, wait));
                    }
                }
            }
            let mut warnings = Vec::new();
            for (node, guard) in path.iter().zip(guards.iter_mut()) {
                let live: &mut Live = guard;
                let takes = [
                    ("requests_per_second", live.requests.as_mut(), demand.ops),
                    ("tool_calls_per_minute", live.tool_calls.as_mut(), demand.tool_calls),
                ];
                for (limit, bucket, n) in takes {
                    let Some(bucket) = bucket else { continue };
                    let before = bucket.used_fraction();
                    bucket.take(f64::from(n), now);
                    // Reported when the bucket crosses 80 %, not for every op past it.
                    if n > 0 && before < 0.8 && bucket.used_fraction() >= 0.8 {
                        node.warnings.fetch_add(1, Ordering::Relaxed);
                        warnings.push(Warning {
                            node: node.name.clone(),
                            limit,
                        });
                    }
                }
            }
            Ok(warnings)
        })
    }

    /// Takes `demand` from the rate limits of every node on the agent's path even
    /// past them (the buckets go into debt), and says how long until the last of
    /// them allows it: the delay before ops queued by the `queue` action start.
    pub fn queue(&self, tenant: &str, agent: AgentId, demand: Demand, now: Instant) -> Duration {
        self.locked(tenant, agent, |_, guards| {
            let mut wait = Duration::ZERO;
            for guard in guards.iter_mut() {
                let live: &mut Live = guard;
                let buckets = [
                    (live.requests.as_mut(), demand.ops),
                    (live.tool_calls.as_mut(), demand.tool_calls),
                ];
                for (bucket, n) in buckets {
                    if let Some(bucket) = bucket
                        && n > 0
                    {
                        wait = wait.max(bucket.borrow(f64::from(n), now));
                    }
                }
            }
            wait
        })
    }

    /// Counts a submission that waited for its rate limits.
    pub fn note_throttled(&self, e: &Exceeded) {
        // A node's name is its key written out: one lookup, not a scan of all nodes.
        let Ok(node) = e.node.parse::<Node>() else { return };
        if let Some(quota) = self.nodes.read().get(&node) {
            quota.throttled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Claims `n` ops in flight on every node of the agent's path, or on none.
    pub fn acquire(&self, tenant: &str, agent: AgentId, n: u64) -> Result<(), Exceeded> {
        self.locked(tenant, agent, |path, guards| {
            for (node, live) in path.iter().zip(guards.iter()) {
                if let Some(limit) = live.limits.concurrent_ops
                    && live.in_flight + n > u64::from(limit)
                {
                    node.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(node.exceeded(
                        live.policy(),
                        "concurrent_ops",
                        u64::from(limit),
                        Some(CONCURRENCY_RETRY),
                    ));
                }
            }
            for live in guards.iter_mut() {
                live.in_flight += n;
            }
            Ok(())
        })
    }

    /// Claims ops in flight that were admitted before a restart: counted, never refused.
    pub fn reacquire(&self, tenant: &str, agent: AgentId, n: u64) {
        self.locked(tenant, agent, |_, guards| {
            for live in guards.iter_mut() {
                live.in_flight += n;
            }
        });
    }

    /// Gives back ops in flight when they complete.
    pub fn release(&self, tenant: &str, agent: AgentId, n: u64) {
        self.locked(tenant, agent, |_, guards| {
            for live in guards.iter_mut() {
                live.in_flight = live.in_flight.saturating_sub(n);
            }
        });
    }

    /// Reserves the most an op can spend on every node of its path, or on none:
    /// LLM tokens from the per-minute bucket, micro-dollars in the current day's and
    /// month's windows. The first limit it does not fit is returned.
    pub fn reserve(
        &self,
        tenant: &str,
        agent: AgentId,
        micros: u64,
        tokens: u64,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Result<Reservation, Exceeded> {
        let (day, month) = windows(wall);
        let mut crossed = Vec::new();
        let reserved = self.locked(tenant, agent, |path, guards| {
            for (node, guard) in path.iter().zip(guards.iter_mut()) {
                let live: &mut Live = guard;
                let policy = live.policy();
                if let Some(bucket) = live.llm_tokens.as_mut()
                    && tokens > 0
                    && let Some(wait) = bucket.shortfall(tokens as f64, now)
                {
                    node.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(node.exceeded(policy, "llm_tokens_per_minute", bucket.capacity() as u64, wait));
                }
                let budgets = [
                    ("cost_per_day_usd", live.limits.cost_per_day_usd, &day),
                    ("cost_per_month_usd", live.limits.cost_per_month_usd, &month),
                ];
                for (limit, usd, window) in budgets {
                    let Some(usd) = usd else { continue };
                    let held = live.windows.get(window).copied().unwrap_or_default();
                    if held.spent + held.reserved + micros > usd_to_micros(usd) {
                        node.rejected.fetch_add(1, Ordering::Relaxed);
                        // A budget cannot be waited for: it is always refused.
                        return Err(node.exceeded((QuotaAction::Reject, policy.1), limit, usd.ceil() as u64, None));
                    }
                }
            }
            for (node, guard) in path.iter().zip(guards.iter_mut()) {
                let live: &mut Live = guard;
                if let Some(bucket) = live.llm_tokens.as_mut() {
                    bucket.take(tokens as f64, now);
                }
                let budgets = [
                    ("cost_per_day_usd", live.limits.cost_per_day_usd, &day),
                    ("cost_per_month_usd", live.limits.cost_per_month_usd, &month),
                ];
                for (limit, usd, window) in budgets {
                    let held = live.windows.entry(window.clone()).or_default();
                    let before = held.spent + held.reserved;
                    held.reserved += micros;
                    // Counted once, when the window crosses 80 %: a warning per op
                    // past that point would only be noise.
                    let mark = usd.map(|usd| 0.8 * usd_to_micros(usd) as f64);
                    if mark.is_some_and(|mark| (before as f64) < mark && (before + micros) as f64 >= mark) {
                        node.warnings.fetch_add(1, Ordering::Relaxed);
                        crossed.push(Warning {
                            node: node.name.clone(),
                            limit,
                        });
                    }
                }
            }
            Ok(Reservation {
                micros,
                tokens,
                nodes: path.iter().map(|n| n.name.clone()).collect(),
                day: day.clone(),
                month: month.clone(),
            })
        });
        // Logged with no lock held: a slow log writer must not stall other ops.
        for warning in crossed {
            tracing::info!(node = %warning.node, limit = warning.limit, "budget past 80 %");
        }
        reserved
    }

    /// Holds a reservation made before a restart again (counted, never refused).
    pub fn rereserve(&self, tenant: &str, agent: AgentId, reservation: &Reservation) {
        self.locked(tenant, agent, |_, guards| {
            for live in guards.iter_mut() {
                for window in [&reservation.day, &reservation.month] {
                    live.windows.entry(window.clone()).or_default().reserved += reservation.micros;
                }
            }
        });
    }

    /// Turns a reservation into what the op spent (at most the reservation) and
    /// gives the unused LLM tokens back. Call it once the charge is durable.
    pub fn settle(&self, tenant: &str, agent: AgentId, reservation: &Reservation, micros: u64, tokens: u64) {
        let charged = micros.min(reservation.micros);
        self.locked(tenant, agent, |_, guards| {
            for live in guards.iter_mut() {
                for window in [&reservation.day, &reservation.month] {
                    let spend = live.windows.entry(window.clone()).or_default();
                    spend.reserved = spend.reserved.saturating_sub(reservation.micros);
                    spend.spent += charged;
                }
                if let Some(bucket) = live.llm_tokens.as_mut() {
                    bucket.refund(reservation.tokens.saturating_sub(tokens) as f64);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut QuotaLimits)) -> QuotaLimits {
        let mut l = QuotaLimits::default();
        f(&mut l);
        l
    }

    #[test]
    fn a_parent_limit_binds_every_child_and_a_refusal_takes_nothing() {
        let quotas = Quotas::new();
        let (a, b) = (AgentId::generate(), AgentId::generate());
        quotas
            .set(Node::Tenant("t".into()), limits(|l| l.requests_per_second = Some(3)))
            .unwrap();
        quotas
            .set(Node::Agent(a), limits(|l| l.requests_per_second = Some(100)))
            .unwrap();
        let now = Instant::now();
        let one = Demand { ops: 1, tool_calls: 0 };
        assert!(quotas.check_rates("t", a, one, now).is_ok());
        assert!(quotas.check_rates("t", b, one, now).is_ok());
        assert!(quotas.check_rates("t", a, one, now).is_ok());
        let refused = quotas.check_rates("t", b, one, now).unwrap_err();
        assert_eq!(refused.limit, "requests_per_second");
        assert_eq!(refused.node, "tenant/t");
        assert!(refused.retry_after.unwrap() <= Duration::from_millis(334));
        // The refused check took nothing from the agent: after the tenant refills,
        // a has used 2 of its 100.
        let later = now + Duration::from_secs(1);
        let warnings = quotas
            .check_rates("t", a, Demand { ops: 3, tool_calls: 0 }, later)
            .unwrap();
        assert!(warnings.iter().any(|w| w.node == "tenant/t"), "3 of 3 is past 80 %");
        assert_eq!(quotas.usage(&Node::Tenant("t".into())).rejected, 1);
    }

    #[test]
    fn tool_calls_count_only_tool_ops() {
        let quotas = Quotas::new();
        let a = AgentId::generate();
        quotas
            .set(Node::Agent(a), limits(|l| l.tool_calls_per_minute = Some(2)))
            .unwrap();
        let now = Instant::now();
        for _ in 0..10 {
            quotas
                .check_rates("t", a, Demand { ops: 1, tool_calls: 0 }, now)
                .unwrap();
        }
        let tools = Demand { ops: 1, tool_calls: 1 };
        quotas.check_rates("t", a, tools, now).unwrap();
        quotas.check_rates("t", a, tools, now).unwrap();
        let refused = quotas.check_rates("t", a, tools, now).unwrap_err();
        assert_eq!(refused.limit, "tool_calls_per_minute");
        // One call refills in 30 s.
        assert!(refused.retry_after.unwrap() > Duration::from_secs(29));
    }

    #[test]
    fn ops_in_flight_are_bounded_on_the_whole_path() {
        let quotas = Quotas::new();
        let (a, b) = (AgentId::generate(), AgentId::generate());
        quotas
            .set(Node::Tenant("t".into()), limits(|l| l.concurrent_ops = Some(3)))
            .unwrap();
        quotas.acquire("t", a, 2).unwrap();
        let refused = quotas.acquire("t", b, 2).unwrap_err();
        assert_eq!(refused.limit, "concurrent_ops");
        assert_eq!(quotas.usage(&Node::Agent(b)).concurrent_ops, 0, "nothing taken");
        quotas.acquire("t", b, 1).unwrap();
        quotas.release("t", a, 2);
        quotas.acquire("t", b, 2).unwrap();
        assert_eq!(quotas.usage(&Node::Tenant("t".into())).concurrent_ops, 3);
    }

    #[test]
    fn changing_limits_keeps_the_ops_in_flight() {
        let quotas = Quotas::new();
        let a = AgentId::generate();
        quotas.acquire("t", a, 4).unwrap();
        quotas
            .set(Node::Agent(a), limits(|l| l.concurrent_ops = Some(5)))
            .unwrap();
        assert!(quotas.acquire("t", a, 2).is_err());
        quotas.acquire("t", a, 1).unwrap();
    }

    #[test]
    fn budgets_hold_reservations_until_settled_and_reset_with_the_window() {
        let quotas = Quotas::new();
        let (a, b) = (AgentId::generate(), AgentId::generate());
        quotas
            .set(Node::Tenant("t".into()), limits(|l| l.cost_per_day_usd = Some(0.001)))
            .unwrap();
        let now = Instant::now();
        let day1 = DateTime::parse_from_rfc3339("2026-11-24T23:59:00Z").unwrap().to_utc();
        // 1000 micro-dollars a day for the tenant: two reservations of 600 cannot both be held.
        let first = quotas.reserve("t", a, 600, 0, now, day1).unwrap();
        let refused = quotas.reserve("t", b, 600, 0, now, day1).unwrap_err();
        assert_eq!(refused.limit, "cost_per_day_usd");
        assert_eq!(refused.node, "tenant/t");
        // Settled at what it spent, the rest is free again.
        quotas.settle("t", a, &first, 250, 0);
        let second = quotas.reserve("t", b, 600, 0, now, day1).unwrap();
        quotas.settle("t", b, &second, 10_000, 0);
        let usage = quotas.usage(&Node::Tenant("t".into()));
        assert_eq!(usage.reserved_usd, 0.0);
        assert!(
            quotas.reserve("t", a, 200, 0, now, day1).is_err(),
            "850 spent, a charge is capped at its reservation"
        );
        // A new day starts from nothing; the month keeps counting.
        let day2 = DateTime::parse_from_rfc3339("2026-11-25T00:00:01Z").unwrap().to_utc();
        let third = quotas.reserve("t", a, 900, 0, now, day2).unwrap();
        assert_eq!(third.day, "2026-11-25");
        assert_eq!(third.month, "2026-11");
    }

    #[test]
    fn llm_tokens_are_reserved_and_the_unused_given_back() {
        let quotas = Quotas::new();
        let a = AgentId::generate();
        quotas
            .set(Node::Agent(a), limits(|l| l.llm_tokens_per_minute = Some(1000)))
            .unwrap();
        let now = Instant::now();
        let wall = Utc::now();
        let r = quotas.reserve("t", a, 0, 800, now, wall).unwrap();
        assert_eq!(
            quotas.reserve("t", a, 0, 800, now, wall).unwrap_err().limit,
            "llm_tokens_per_minute"
        );
        quotas.settle("t", a, &r, 0, 100);
        assert!(
            quotas.reserve("t", a, 0, 800, now, wall).is_ok(),
            "700 unused tokens came back"
        );
    }

    proptest::proptest! {
        /// However reservations and settlements interleave, the spend of a window
        /// never passes its budget.
        #[test]
        fn spend_never_passes_the_budget(
            ops in proptest::collection::vec((1u64..400, 0u64..500, proptest::bool::ANY), 1..200),
        ) {
            let quotas = Quotas::new();
            let a = AgentId::generate();
            quotas.set(Node::Agent(a), limits(|l| l.cost_per_day_usd = Some(0.002))).unwrap();
            let (now, wall) = (Instant::now(), Utc::now());
            let mut held = Vec::new();
            for (max, spent, settle_first) in ops {
                if settle_first && let Some(r) = held.pop() {
                    quotas.settle("t", a, &r, spent, 0);
                }
                if let Ok(r) = quotas.reserve("t", a, max, 0, now, wall) {
                    held.push(r);
                }
                let usage = quotas.usage(&Node::Agent(a));
                proptest::prop_assert!(usage.spent_today_usd * 1e6 + usage.reserved_usd * 1e6 <= 2000.0 + 1e-6);
            }
        }
    }

    #[test]
    fn a_group_binds_its_members_and_no_one_else() {
        let quotas = Quotas::new();
        let (a, b, c) = (AgentId::generate(), AgentId::generate(), AgentId::generate());
        let group = Node::Group {
            tenant: "t".into(),
            name: "research".into(),
        };
        quotas
            .set(group.clone(), limits(|l| l.concurrent_ops = Some(2)))
            .unwrap();
        for member in [a, b] {
            quotas
                .set(Node::Agent(member), limits(|l| l.group = Some("research".into())))
                .unwrap();
        }
        quotas.acquire("t", a, 2).unwrap();
        let refused = quotas.acquire("t", b, 1).unwrap_err();
        assert_eq!(refused.node, "group/t/research");
        quotas.acquire("t", c, 5).unwrap();
        assert_eq!(quotas.usage(&group).concurrent_ops, 2);
        // A member changes group only while it holds nothing.
        let leave = quotas.set(Node::Agent(a), QuotaLimits::default()).unwrap_err();
        assert_eq!(leave.code, ErrorCode::FailedPrecondition);
        quotas.release("t", a, 2);
        quotas.set(Node::Agent(a), QuotaLimits::default()).unwrap();
        quotas.acquire("t", a, 3).unwrap();
        assert_eq!(
            quotas.usage(&group).concurrent_ops,
            0,
            "a no longer counts in the group"
        );
        quotas.acquire("t", b, 2).unwrap();
        let reservation = quotas.reserve("t", b, 0, 0, Instant::now(), Utc::now()).unwrap();
        assert_eq!(
            reservation.nodes,
            ["tenant/t", "group/t/research", &format!("agent/{b}")]
        );
    }

    #[test]
    fn exceeded_limits_become_quota_errors_naming_the_limit() {
        let quotas = Quotas::new();
        let a = AgentId::generate();
        quotas
            .set(Node::Agent(a), limits(|l| l.concurrent_ops = Some(1)))
            .unwrap();
        quotas.acquire("t", a, 1).unwrap();
        let error: Error = quotas.acquire("t", a, 1).unwrap_err().into();
        assert_eq!(error.code, ErrorCode::QuotaExceeded);
        assert_eq!(error.details.unwrap()["limit"], "concurrent_ops");
    }
}
