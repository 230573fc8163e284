//! `cargo bench -p bbx-ring`: the circuit breaker's closed path (admit + record a
//! success), against a bare atomic load and store measured in the same run.

use bbx_ring::{BreakerConfig, CircuitBreaker};
use hdrhistogram::Histogram;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

const BATCH: u32 = 1_000;
const BATCHES: u32 = 20_000;

/// Runs `op` in batches and records the mean nanoseconds per call of each batch.
fn measure(name: &str, mut op: impl FnMut()) {
    let mut per_call = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).expect("static bounds");
    let started = Instant::now();
    for _ in 0..BATCHES {
        let batch = Instant::now();
        for _ in 0..BATCH {
            op();
        }
        per_call.saturating_record((batch.elapsed().as_nanos() as u64 / BATCH as u64).max(1));
    }
    let calls = (BATCH * BATCHES) as f64;
    println!(
        "{name:<40} {:>12.0} calls/s   p50 {:>3} ns   p99 {:>3} ns   p99.9 {:>3} ns",
        calls / started.elapsed().as_secs_f64(),
        per_call.value_at_quantile(0.5),
        per_call.value_at_quantile(0.99),
        per_call.value_at_quantile(0.999),
    );
}

fn main() {
    let now = Instant::now();
    let breaker = CircuitBreaker::new(BreakerConfig::default());
    measure("breaker closed path (admit + success)", || {
        let admission = black_box(&breaker).admit(now).expect("closed");
        breaker.record(admission, true, now);
    });
    let counter = AtomicU32::new(0);
    measure("reference: atomic load + store", || {
        let value = black_box(&counter).load(Ordering::Acquire);
        counter.store(black_box(value), Ordering::Relaxed);
    });
}
