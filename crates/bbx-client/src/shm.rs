//! The shared-memory path to a kernel on the same machine: ops go in and
//! completions come out through a mapped ring, with no system call while the kernel
//! keeps up (see [`bbx_ring::shm`]).

use bbx_core::op::{Completion, SubmitOp};
use bbx_core::{Error, ErrorCode, Result};
use bbx_ring::shm::{self, ClientEnd};
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

/// One completion reaped from the ring: the tag its submission got, and the op's
/// completion or the reason its submission was refused.
#[derive(Debug)]
pub struct ShmCompletion {
    pub tag: u64,
    pub outcome: Result<Completion>,
}

/// A client's end of a shared-memory session, opened with
/// [`crate::Client::open_shm`]. Not shared between threads: the ring has one
/// producer and one consumer on each side. Dropping it ends the session.
pub struct ShmClient {
    end: ClientEnd,
    next_tag: u64,
    message: Vec<u8>,
    /// Completions reaped by [`ShmClient::call`] for other tags.
    early: VecDeque<ShmCompletion>,
}

impl ShmClient {
    /// Attaches to the ring file of a session opened by `POST /v1/ring/shm`.
    pub fn attach(path: &Path) -> Result<Self> {
        Ok(Self {
            end: ClientEnd::attach(path)?,
            next_tag: 1,
            message: Vec::with_capacity(4096),
            early: VecDeque::new(),
        })
    }

    /// Queues an op and returns its tag, which its completion carries. A full
    /// submission queue is refused with `resource_exhausted`: reap, then retry.
    pub fn submit(&mut self, op: &SubmitOp) -> Result<u64> {
        if self.end.is_closed() {
            return Err(closed());
        }
        let tag = self.next_tag;
        shm::encode_submission(tag, op, &mut self.message);
        if !self.end.push_submission(&self.message)? {
            return Err(Error::resource_exhausted(
                "the shared-memory submission queue is full; reap completions first",
                Duration::from_millis(1),
            ));
        }
        self.next_tag += 1;
        Ok(tag)
    }

    /// The next completion, waiting up to `timeout` for one (spinning briefly,
    /// then asleep); `None` if none came.
    pub fn reap(&mut self, timeout: Duration) -> Result<Option<ShmCompletion>> {
        match self.early.pop_front() {
            Some(early) => Ok(Some(early)),
            None => self.reap_ring(timeout),
        }
    }

    /// The next completion from the ring itself, past those kept aside.
    fn reap_ring(&mut self, timeout: Duration) -> Result<Option<ShmCompletion>> {
        let started = Instant::now();
        loop {
            if self.end.pop_completion(&mut self.message)? {
                let (tag, outcome) = shm::decode_completion(&self.message)?;
                return Ok(Some(ShmCompletion { tag, outcome }));
            }
            if self.end.is_closed() {
                return Err(closed());
            }
            let Some(left) = timeout.checked_sub(started.elapsed()).filter(|left| !left.is_zero()) else {
                return Ok(None);
            };
            self.end.wait(left);
        }
    }

    /// Submits one op and waits up to `timeout` for its completion. Completions of
    /// other ops that arrive meanwhile are kept for [`ShmClient::reap`].
    pub fn call(&mut self, op: &SubmitOp, timeout: Duration) -> Result<Completion> {
        let tag = self.submit(op)?;
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match self.reap_ring(left)? {
                Some(done) if done.tag == tag => return done.outcome,
                Some(other) => self.early.push_back(other),
                None => {
                    return Err(Error::new(
                        ErrorCode::Timeout,
                        format!("no completion within {} ms", timeout.as_millis()),
                    ));
                }
            }
        }
    }
}

fn closed() -> Error {
    Error::unavailable("the kernel closed the shared-memory session")
}
