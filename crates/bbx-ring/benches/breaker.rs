//! `cargo bench -p bbx-ring`: the circuit breaker's closed path (admit + record a
//! success), against the floor of what it does, two atomic loads, measured in the
//! same run. A single call is too short to time, so each sample is the mean per call
//! of a batch of 1000 calls; percentiles are over those batch means.

use bbx_ring::{BreakerConfig, CircuitBreaker};
use hdrhistogram::Histogram;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

const BATCH: u32 = 1_000;
const BATCHES: u32 = 20_000;

/// Runs `op` in batches and records the mean time per call of each batch, in tenths
/// of a nanosecond.
fn measure(name: &str, mut op: impl FnMut()) {
    let mut per_call = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("static bounds");
    let started = Instant::now();
    for _ in 0..BATCHES {
        let batch = Instant::now();
        for _ in 0..BATCH {
            op();
        }
        per_call.saturating_record((batch.elapsed().as_nanos() as u64 * 10 / BATCH as u64).max(1));
    }
    let calls = (BATCH * BATCHES) as f64;
    let ns = |q: f64| per_call.value_at_quantile(q) as f64 / 10.0;
    println!(
        "{name:<40} {:>12.0} calls/s   p50 {:>5.1} ns   p99 {:>5.1} ns   p99.9 {:>5.1} ns",
        calls / started.elapsed().as_secs_f64(),
        ns(0.5),
        ns(0.99),
        ns(0.999),
    );
}

fn main() {
    let now = Instant::now();
    let breaker = CircuitBreaker::new(BreakerConfig::default());
    measure("breaker closed path (admit + success)", || {
        let admission = black_box(&breaker).admit(now).expect("closed");
        breaker.record(admission, true, now);
    });
    let (state, failures) = (AtomicU32::new(0), AtomicU32::new(0));
    measure("reference: two atomic loads", || {
        black_box(black_box(&state).load(Ordering::Acquire));
        black_box(black_box(&failures).load(Ordering::Relaxed));
    });
}
