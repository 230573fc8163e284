//! Running: ops handed out in scheduler order, attempts ended (retried or
//! finished), cancels, start marks, and the journal's copy-forward of
//! long-running ops.

use super::*;

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Ok(Value),
    Failed(Error),
    TimedOut,
    Cancelled,
}

impl Attempt {
    /// Whether the attempt failed in a way worth retrying, which is also what
    /// counts against its target's circuit breaker.
    pub fn transient(&self) -> bool {
        match self {
            Self::TimedOut => true,
            Self::Failed(e) => matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout),
            Self::Ok(_) | Self::Cancelled => false,
        }
    }
}

/// An attempt that ended, with what its op holds until its completion is durable.
pub struct Ended<H: Host> {
    pub id: OpId,
    pub attempt: Attempt,
    pub took: Duration,
    pub held: Option<H::Held>,
    /// At least this long before a retry (an open breaker says how long).
    pub retry_after: Option<Duration>,
    /// What components said of a successful attempt's result.
    pub labels: Vec<String>,
}

/// What cancelling a live op does.
pub enum Cancelled<H: Host> {
    /// It is running: stop it with this, if it can be stopped; it ends when its
    /// attempt does.
    Running(Option<H::Cancel>),
    /// It had not started: it ends now.
    Ends(Finish<H>),
    /// Not yet acknowledged: it ends as soon as it is.
    Later,
}

/// A live op whose journal records are older than a floor, to copy forward.
pub struct Old {
    pub id: OpId,
    pub record: Arc<OpRecord>,
    /// Its accepted record and start mark when picked.
    pub before: (Option<Lsn>, Option<Lsn>),
    /// Its start mark's reservation, if it has a start mark.
    pub started: Option<Option<Reservation>>,
}

impl<H: Host> Engine<H> {
    /// Up to `max` ops to start, in scheduler order, marked running; and whether
    /// more remain queued.
    pub fn next(&mut self, max: usize, now: Instant) -> (Vec<Start<H>>, bool) {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(next) = self.scheduler.pop(now) else { break };
            let Some(live) = self.live.get_mut(&next.item) else {
                continue;
            };
            if live.finishing {
                continue;
            }
            live.state = OpState::Running;
            live.attempts += 1;
            live.first_start.get_or_insert(now);
            let cancel = H::canceller(&live.exec);
            live.cancel = cancel.clone();
            batch.push(Start {
                id: next.item,
                record: live.record.clone(),
                exec: live.exec.clone(),
                cancel,
            });
        }
        (batch, !self.scheduler.is_empty())
    }

    /// Ends attempts: each op is retried after its backoff (returned, for the host
    /// to requeue when it has passed, holding nothing meanwhile) or completes.
    pub fn attempts_ended(&mut self, ended: Vec<Ended<H>>, out: &mut Outbox<H>) -> Vec<(OpId, Duration)> {
        let mut retrying = Vec::new();
        let mut finish = Vec::with_capacity(ended.len());
        for Ended {
            id,
            attempt,
            took,
            held,
            retry_after,
            labels,
        } in ended
        {
            let Some(live) = self.live.get_mut(&id) else { continue };
            live.exec_time += took;
            live.cancel = None;
            if live.reservation.is_some() {
                // A call that timed out or was dropped may still be billed: it
                // counts at the most it could have cost.
                let spent = match &attempt {
                    Attempt::Ok(result) => H::spent(&live.exec, result),
                    Attempt::TimedOut | Attempt::Cancelled => live.attempt_max,
                    Attempt::Failed(e) if e.code == ErrorCode::Timeout => live.attempt_max,
                    Attempt::Failed(_) => Spend::default(),
                };
                live.spent.micros += spent.micros;
                live.spent.tokens += spent.tokens;
            }
            if attempt.transient()
                && !live.cancel_requested
                && let Some(policy) = live.record.retries
                && live.attempts <= policy.count
            {
                live.state = OpState::Backoff;
                self.metrics.retries.inc();
                retrying.push((id, policy.backoff(live.attempts).max(retry_after.unwrap_or_default())));
                continue;
            }
            let mut ends = match attempt {
                Attempt::Ok(result) => Finish::new(id, CompletionStatus::Ok, Some(result), None),
                // A tool that enforces a deadline of its own reports it as a timeout.
                Attempt::Failed(error) if error.code == ErrorCode::Timeout => {
                    Finish::new(id, CompletionStatus::Timeout, None, Some(error))
                }
                Attempt::Failed(error) => Finish::new(id, CompletionStatus::Error, None, Some(error)),
                Attempt::TimedOut => Finish::new(
                    id,
                    CompletionStatus::Timeout,
                    None,
                    Some(Error::new(ErrorCode::Timeout, "the op timed out")),
                ),
                Attempt::Cancelled => Finish::cancelled(id, "cancelled while running"),
            };
            ends.held = held;
            ends.labels = labels;
            finish.push(ends);
        }
        self.finish(finish, out);
        retrying
    }

    /// Puts an op back in the queue after its backoff; its end if it was
    /// cancelled meanwhile.
    pub fn requeue(&mut self, id: OpId, now: Instant) -> Option<Finish<H>> {
        let live = self.live.get_mut(&id)?;
        if live.finishing {
            return None;
        }
        if live.cancel_requested {
            return Some(Finish::cancelled(id, "cancelled while waiting to retry"));
        }
        live.state = OpState::Queued;
        let (agent, priority) = (live.record.agent, live.record.priority);
        self.scheduler.readmit(agent);
        self.scheduler.enqueue(agent, priority, id, now);
        None
    }

    /// Cancels a live op; `None` if it is not live. An op whose effect is being
    /// applied with its completion cannot be cancelled. `owns` checks that the
    /// caller may see the op's tenant.
    pub fn cancel(&mut self, id: &OpId, owns: &dyn Fn(&str) -> Result<()>) -> Result<Option<Cancelled<H>>> {
        let Some(live) = self.live.get_mut(id) else {
            return Ok(None);
        };
        owns(&live.record.tenant)?;
        if live.finishing || (live.state == OpState::Running && H::applies_with_completion(&live.exec)) {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("op {id} is already being completed"),
            ));
        }
        live.cancel_requested = true;
        Ok(Some(match live.state {
            OpState::Running => Cancelled::Running(live.cancel.clone()),
            // Queued ops leave the scheduler lazily: `next` skips them.
            OpState::Queued | OpState::Backoff => Cancelled::Ends(Finish::cancelled(*id, "cancelled before it ran")),
            OpState::Blocked | OpState::PendingApproval if live.active => {
                Cancelled::Ends(Finish::cancelled(*id, "cancelled before it started"))
            }
            OpState::Blocked | OpState::PendingApproval | OpState::Done => Cancelled::Later,
        }))
    }

    /// Whether a live op with external effects still needs its start mark.
    pub fn needs_start_mark(&self, id: &OpId) -> bool {
        self.live.get(id).is_some_and(|live| live.started.is_none())
    }

    /// Notes a live op's durable start mark, with the budget it reserved and what
    /// one attempt can spend at most; false if the op is gone (the host then gives
    /// both back).
    pub fn started(&mut self, id: &OpId, mark: Lsn, reservation: Option<Reservation>, attempt_max: Spend) -> bool {
        let Some(live) = self.live.get_mut(id) else {
            return false;
        };
        live.started = Some(mark);
        live.reservation = reservation;
        live.attempt_max = attempt_max;
        true
    }

    /// The live ops whose journal records are older than `floor`, to journal again
    /// so that the checkpoint can move on while they run.
    pub fn old_records(&self, floor: Lsn) -> Vec<Old> {
        self.live
            .iter()
            .filter(|(id, live)| {
                let old = live.lsn.is_some_and(|lsn| lsn < floor) || live.started.is_some_and(|lsn| lsn < floor);
                old && !live.finishing && !self.resolving.contains(id)
            })
            .map(|(id, live)| Old {
                id: *id,
                record: live.record.clone(),
                before: (live.lsn, live.started),
                started: live.started.map(|_| live.reservation.clone()),
            })
            .collect()
    }

    /// Swaps an op's records for their copies (accepted, then the start mark if it
    /// has one) if it is unchanged since it was picked; returns the records no
    /// longer needed (the originals, or the copies if the op moved on).
    pub fn copied(&mut self, old: &Old, copies: Vec<Lsn>) -> Vec<Lsn> {
        let mut released = Vec::new();
        match (self.live.get_mut(&old.id), copies.first()) {
            (Some(live), Some(&accepted)) if (live.lsn, live.started) == old.before && !live.finishing => {
                released.extend(live.lsn.replace(accepted));
                if let Some(&started) = copies.get(1) {
                    released.extend(live.started.replace(started));
                }
            }
            // Ended (its settling released what it held) or changed: the copies
            // are not needed.
            _ => released.extend(copies),
        }
        released
    }
}
