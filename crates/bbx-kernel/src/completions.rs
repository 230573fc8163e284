//! Completion queues: how an in-process client reaps its own ops.

use crate::ring::Sink;
use bbx_core::op::Completion;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The completions of the ops submitted through it ([`crate::Kernel::submit_to`]),
/// in the order they complete: the ring's completion queue for a client in the
/// kernel's process. Unlike the kernel's event stream, which carries every
/// completion to every subscriber, it carries only its submitter's and never drops
/// one. Each entry of an accepted batch brings one completion (an op named twice,
/// by one idempotency key, comes twice); an entry whose op cannot be followed
/// (a deduplicated op that vanished in a storage failure) brings an `unavailable`
/// error naming it. It holds what its owner has not reaped yet: reap as you submit.
pub struct CompletionQueue {
    sink: Sink,
    completions: mpsc::UnboundedReceiver<Arc<Completion>>,
}

impl CompletionQueue {
    pub fn new() -> Self {
        let (sender, completions) = mpsc::unbounded_channel();
        Self {
            sink: Arc::new(move |completion| {
                // The receiver lives as long as the queue that holds this sender.
                let _ = sender.send(completion);
            }),
            completions,
        }
    }

    pub(crate) fn sink(&self) -> &Sink {
        &self.sink
    }

    /// Waits for at least one completion, then moves up to `max` (at least one) of
    /// those waiting into `into`; returns how many it moved.
    pub async fn reap(&mut self, into: &mut Vec<Arc<Completion>>, max: usize) -> usize {
        self.completions.recv_many(into, max.max(1)).await
    }
}

impl Default for CompletionQueue {
    fn default() -> Self {
        Self::new()
    }
}
