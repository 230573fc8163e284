//! The AgentRing: how agent ops are scheduled and protected.
//!
//! This crate owns the ring's policies, kept free of I/O so that they can be tested
//! exhaustively: the [`scheduler`] (four priorities with aging, per-agent fairness,
//! a bounded queue with load shedding) and the per-target [`breaker`]s. The
//! submission path around them (journal, idempotency, workers, completions) is built
//! on `bbx-journal` and wired into the kernel next.

pub mod breaker;
pub mod scheduler;

pub use breaker::{Admission, BreakerConfig, BreakerState, BreakerStats, Breakers, CircuitBreaker, Rejected};
pub use scheduler::{Next, Refused, Scheduler, SchedulerConfig};
