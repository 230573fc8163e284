//! Expiry: completions and idempotency keys forgotten once past their retention.

use super::*;

/// How often the ring forgets old completions.
const EXPIRY_EVERY: Duration = Duration::from_secs(600);
/// Completions removed per committer group when sweeping.
const EXPIRY_STEP: usize = 1024;

impl Ring {
    /// Forgets the completions (and idempotency keys) of ops that completed more
    /// than `ring.retention_secs` before `now`, in bounded groups; returns how many.
    /// Never one whose records the journal would still replay (see
    /// [`JournalWriter::replay_horizon`]): recovery would run it again. An op in
    /// doubt is kept until an operator settles it. The ring runs this every ten
    /// minutes; `now` is a parameter so that tests can run it later.
    pub async fn expire_completions(&self, now: DateTime<Utc>) -> Result<usize> {
        let retention = chrono::Duration::seconds(self.config.retention_secs as i64);
        let before = (now - retention).min(self.journal.replay_horizon());
        let mut expired = 0;
        let mut after = None;
        loop {
            let step = Write::ExpireOps {
                before,
                max: EXPIRY_STEP,
                after,
            };
            let step: store::Expired = self.store.write(step).await?.into_output()?;
            expired += step.count;
            match step.resume {
                Some(resume) => after = Some(resume),
                None => return Ok(expired),
            }
        }
    }

    /// Expires old completions now and every ten minutes.
    pub(super) async fn expire_every(self: Arc<Self>) {
        loop {
            if let Err(e) = self.expire_completions(Utc::now()).await {
                tracing::warn!(error = %e, "expiring old completions failed; trying again later");
            }
            tokio::select! {
                () = self.stopping.cancelled() => return,
                () = tokio::time::sleep(EXPIRY_EVERY) => {}
            }
        }
    }
}
