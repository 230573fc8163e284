//! Ops held for approval: accepted and journaled with a [`crate::Hold`], they wait
//! until an approval is journaled (the record again, without its hold) or they
//! are denied (they end with `policy_denied`).

use super::*;

impl<H: Host> Engine<H> {
    /// Every op waiting for approval, with the moment its hold expires.
    pub fn held(&self) -> Vec<(OpId, DateTime<Utc>)> {
        self.live
            .iter()
            .filter(|(_, live)| live.waits_for_approval())
            .filter_map(|(id, live)| Some((*id, live.record.hold.as_ref()?.until)))
            .collect()
    }

    /// The record of a live op waiting for approval, for `owns` to check and the
    /// host to journal again without its hold. Not live: `not_found`; not held:
    /// `failed_precondition`.
    pub fn held_record(&self, id: &OpId, owns: &dyn Fn(&str) -> Result<()>) -> Result<Arc<OpRecord>> {
        let live = self.live.get(id).ok_or_else(|| Error::not_found("op", id))?;
        owns(&live.record.tenant)?;
        if !live.waits_for_approval() {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("op {id} is not waiting for approval"),
            ));
        }
        Ok(live.record.clone())
    }

    /// The op's approval is durable: its record without the hold, journaled at
    /// `lsn`. The op goes on as if it had never been held. Returns the journal
    /// records no longer needed (the held record, or the new one if the op ended
    /// or was approved meanwhile).
    pub fn approved(
        &mut self,
        id: &OpId,
        record: Arc<OpRecord>,
        lsn: Lsn,
        now: Instant,
        finish: &mut Vec<Finish<H>>,
    ) -> Vec<Lsn> {
        let Some(live) = self.live.get_mut(id).filter(|live| live.waits_for_approval()) else {
            return vec![lsn];
        };
        live.held = false;
        live.state = OpState::Blocked;
        live.record = record;
        let released = live.lsn.replace(lsn).into_iter().collect();
        self.release_if_ready(*id, now, finish);
        released
    }

    /// Ends an op waiting for approval with `policy_denied`; `None` if it is not
    /// waiting (approved, ended, or unknown).
    pub fn deny(&mut self, id: &OpId, why: &str) -> Option<Finish<H>> {
        let live = self.live.get(id).filter(|live| live.waits_for_approval())?;
        let hold = live.record.hold.as_ref()?;
        let error = Error::new(
            ErrorCode::PolicyDenied,
            format!("op {id} was held for approval and {why}"),
        )
        .with_details(serde_json::json!({ "held_by": hold.by, "reason": hold.reason }));
        Some(Finish::new(*id, CompletionStatus::Error, None, Some(error)))
    }
}

impl<H: Host> Live<H> {
    /// Held, acknowledged (an op not yet journaled is not yet the operator's to
    /// decide) and not ending.
    fn waits_for_approval(&self) -> bool {
        self.held && self.active && !self.finishing
    }
}
