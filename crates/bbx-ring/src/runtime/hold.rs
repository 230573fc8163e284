//! Ops held for approval: approved (their record journaled again without the
//! hold, then they run), denied, or denied when their hold expires.

use super::*;

impl Ring {
    /// Approves an op held for approval: its record is journaled again without
    /// the hold (so a crash from then on recovers it approved), then it runs.
    pub async fn approve(self: &Arc<Self>, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        let held = self.held_record(caller, id)?;
        let mut approved = OpRecord::clone(&held);
        approved.hold = None;
        let lsn = self.journal.append(vec![approved.encode_accepted()]).await?[0];
        let mut finish = Vec::new();
        let released = self
            .lock()
            .approved(id, Arc::new(approved), lsn, Instant::now(), &mut finish);
        self.journal.release(released);
        self.work.notify_one();
        self.finish_all(finish);
        self.info(caller, id)
    }

    /// Denies an op held for approval: it ends with `policy_denied`, naming
    /// `reason`.
    pub async fn deny(self: &Arc<Self>, caller: &Caller, id: &OpId, reason: &str) -> Result<OpInfo> {
        self.held_record(caller, id)?;
        self.deny_held(id, &format!("was denied: {reason}"));
        self.wait(caller, id, Duration::from_secs(5)).await
    }

    /// The record of an op the caller may see that waits for approval; an op that
    /// is done is no longer waiting (409), one the caller cannot see is not found.
    fn held_record(&self, caller: &Caller, id: &OpId) -> Result<Arc<OpRecord>> {
        let owns = |tenant: &str| caller.check_owner(tenant, "op", id);
        let held = self.lock().held_record(id, &owns);
        match held {
            Err(e) if e.code == ErrorCode::NotFound => {
                let info = self.info(caller, id)?;
                let status = info.completion.as_ref().map_or("done", |c| c.status.as_str());
                Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} is not waiting for approval: it has completed ({status})"),
                ))
            }
            held => held,
        }
    }

    fn deny_held(self: &Arc<Self>, id: &OpId, why: &str) {
        let denied = self.lock().deny(id, why);
        self.finish_all(denied.into_iter().collect());
    }

    /// Denies the op at `until` if it is still held then.
    pub(super) fn expire_hold(self: &Arc<Self>, id: OpId, until: DateTime<Utc>) {
        let ring = self.clone();
        let stopping = self.stopping.clone();
        let wait = (until - Utc::now()).to_std().unwrap_or_default();
        self.tasks.spawn(async move {
            tokio::select! {
                () = stopping.cancelled() => {}
                () = tokio::time::sleep(wait) => ring.deny_held(&id, "was not approved in time"),
            }
        });
    }
}
