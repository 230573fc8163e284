//! The AgentRing's policies and vocabulary, free of I/O so they can be tested
//! exhaustively.
//!
//! This crate owns what the ring decides: how a submitted [`batch`] is checked
//! (dependency cycles, idempotency keys and digests), what the ring writes to the
//! journal ([`entry`]) and what executing a kind can do ([`Effects`]), which op runs
//! next ([`scheduler`]: four priorities with aging, per-agent fairness, a bounded
//! queue with load shedding), and when a target is protected by its [`breaker`].
//! `bbx-kernel` wires these to the journal, the store and the executors.

pub mod batch;
pub mod breaker;
pub mod entry;
pub mod scheduler;

pub use breaker::{Admission, BreakerConfig, BreakerState, BreakerStats, Breakers, CircuitBreaker, Rejected};
pub use entry::{Effects, Entry, Idempotency, OpRecord};
pub use scheduler::{Next, Refused, Scheduler, SchedulerConfig};
