//! The AgentRing's policies and vocabulary, free of I/O so they can be tested
//! exhaustively, and the shared-memory ring that local clients submit through.
//!
//! This crate owns what the ring decides: how a submitted [`batch`] is checked
//! (dependency cycles, idempotency keys and digests), what the ring writes to the
//! journal ([`entry`]) and what executing a kind can do ([`Effects`]), which op runs
//! next ([`scheduler`]: four priorities with aging, per-agent fairness, a bounded
//! queue with load shedding), and when a target is protected by its [`breaker`].
//! [`shm`] is the one part that touches the operating system: the layout and the
//! lock-free queues of the shared-memory ring, used by both of its ends.
//! `bbx-kernel` wires these to the journal, the store and the executors.

pub mod batch;
pub mod breaker;
pub mod engine;
pub mod entry;
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod scheduler;
pub mod shm;

pub use bbx_core::op::Effects;
pub use breaker::{
    Admission, BreakerConfig, BreakerState, BreakerStats, Breakers, CircuitBreaker, Rejected, TargetStats, Tracked,
};
pub use entry::{Entry, Hold, Idempotency, OpRecord};
pub use metrics::RingMetrics;
pub use scheduler::{Next, Refused, Scheduler, SchedulerConfig};
