//! Serving shared-memory sessions: a thread per session reads the client's
//! submissions from the mapped ring, submits them as the caller that opened the
//! session, dispatches at once on the same thread, and writes each op's completion
//! back, tagged as the client tagged the submission.
//!
//! While submissions keep coming the thread never sleeps and the client makes no
//! system call. An op that has to wait (for the journal's fdatasync, or a `sleep`)
//! completes on the kernel's runtime, whose completion wakes the thread through the
//! futex in the mapping.

use crate::Kernel;
use crate::ring::Sink;
use bbx_auth::{AuditEvent, AuditKind, Caller};
use bbx_core::op::{Completion, OpenShm, ShmSession, SubmitBatch, Submitted};
use bbx_core::{Error, ErrorCode, KeyId, Result};
use bbx_ring::shm::{self, KernelEnd};
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Sessions one kernel serves at once: each holds a thread and two queues.
pub(crate) const MAX_SESSIONS: usize = 64;
/// Sessions one key may hold, so that one client cannot take them all.
pub(crate) const MAX_SESSIONS_PER_KEY: usize = 8;
const DEFAULT_QUEUE_BYTES: u64 = 1024 * 1024;
/// How long a new session waits for its client to attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle session checks that its client and the kernel are still there.
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// Submissions taken before the session dispatches and writes completions.
const SUBMIT_BURST: usize = 256;
/// Submissions taken whose completions the client has not yet been handed: past
/// this, the session reads no more until the client reaps, so a client that never
/// reaps cannot make the kernel buffer completions without bound.
const MAX_OWED: usize = 8192;

/// What reaches a session's thread from elsewhere in the kernel.
enum Event {
    /// A submission that had to wait (for the journal) was answered.
    Submitted(u64, Result<Submitted>),
    Completed(u64, Arc<Completion>),
}

/// Creates the session's ring file and starts its thread.
pub(crate) fn open(kernel: &Arc<Kernel>, caller: &Caller, request: OpenShm) -> Result<ShmSession> {
    let queue_bytes = request.queue_bytes.unwrap_or(DEFAULT_QUEUE_BYTES);
    let seat = Seat::take(&kernel.shm_sessions, caller.key_id)?;
    let end = KernelEnd::create(queue_bytes)?;
    let path = end
        .path()
        .ok_or_else(|| Error::internal("a new shared-memory ring has no path"))?;
    let session = Session {
        kernel: kernel.clone(),
        caller: caller.clone(),
        events: crossbeam_channel::unbounded(),
        wake: Arc::new(end.waker()),
        end,
        backlog: VecDeque::new(),
        owed: 0,
    };
    let runtime = tokio::runtime::Handle::current();
    kernel.tasks.spawn_blocking(move || {
        let _entered = runtime.enter();
        session.serve();
        drop(seat);
    });
    Ok(ShmSession {
        path: path.display().to_string(),
        queue_bytes,
    })
}

struct Session {
    kernel: Arc<Kernel>,
    caller: Caller,
    end: KernelEnd,
    events: (Sender<Event>, Receiver<Event>),
    wake: Arc<dyn Fn() + Send + Sync>,
    /// Encoded completions waiting for the client to make room.
    backlog: VecDeque<Vec<u8>>,
    /// Submissions taken whose completion is not in the completion queue yet.
    owed: usize,
}

impl Session {
    fn serve(mut self) {
        let opened = Instant::now();
        let mut message = Vec::new();
        let mut last_check = Instant::now();
        let stopping = self.kernel.ring.stopping();
        loop {
            if self.end.is_closed() || stopping.is_cancelled() {
                break;
            }
            if self.end.path().is_some() {
                if self.end.client_pid().is_some() {
                    // Attached: nobody else needs to find the ring any more.
                    self.end.forget_path();
                } else if opened.elapsed() > ATTACH_TIMEOUT {
                    tracing::info!("no client attached to a shared-memory session");
                    break;
                }
            }
            let mut worked = false;
            for _ in 0..SUBMIT_BURST.min(MAX_OWED - self.owed) {
                match self.end.pop_submission(&mut message) {
                    Ok(true) => {
                        worked = true;
                        self.owed += 1;
                        self.submit(&message);
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "closing a shared-memory session");
                        self.end.close();
                        break;
                    }
                }
            }
            if worked {
                self.kernel.ring.dispatch_once();
            }
            while let Ok(event) = self.events.1.try_recv() {
                worked = true;
                match event {
                    Event::Submitted(tag, submitted) => self.accepted(tag, submitted),
                    Event::Completed(tag, completion) => self.reply(tag, Ok(&completion)),
                }
            }
            self.flush();
            if !worked {
                // A full completion queue is drained by the client without telling
                // us: look again soon rather than sleep for the idle interval.
                let timeout = if self.backlog.is_empty() && self.owed < MAX_OWED {
                    IDLE_CHECK
                } else {
                    Duration::from_millis(1)
                };
                if self.owed >= MAX_OWED {
                    // Waiting submissions are not ours to take yet, so they must
                    // not wake us: only the client's reaping can free us.
                    std::thread::sleep(timeout);
                } else {
                    let events = &self.events.1;
                    self.end.wait(timeout, || !events.is_empty());
                }
            }
            // Busy or not, now and then: the client may have died without closing,
            // and the key that opened the session may have been revoked.
            if last_check.elapsed() >= IDLE_CHECK {
                last_check = Instant::now();
                if !self.end.client_alive() {
                    break;
                }
                if !self.kernel.credential_valid(&self.caller) {
                    tracing::info!(key = %self.caller.key_id, "ending a shared-memory session: its key was revoked");
                    break;
                }
            }
        }
        self.end.close();
    }

    /// Submits one op as the session's caller. Ops that need no journal are
    /// admitted on this thread; one that must wait for the journal's fdatasync goes
    /// on waiting on the kernel's runtime and reports back as an event.
    fn submit(&mut self, message: &[u8]) {
        let (tag, op) = match shm::decode_submission(message) {
            Ok(decoded) => decoded,
            Err((tag, error)) => return self.reply(tag.unwrap_or(0), Err(&error)),
        };
        let kernel = self.kernel.clone();
        let caller = self.caller.clone();
        let batch = SubmitBatch {
            ops: vec![op],
            wait_ms: None,
        };
        let sink = self.sink(tag);
        let mut submitting = Box::pin(async move { kernel.submit_with(&caller, batch, Some(&sink)).await });
        match submitting.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(submitted) => self.accepted(tag, submitted),
            Poll::Pending => {
                let events = self.events.0.clone();
                let wake = self.wake.clone();
                self.kernel.tasks.spawn(async move {
                    let submitted = submitting.await;
                    let _ = events.send(Event::Submitted(tag, submitted));
                    wake();
                });
            }
        }
    }

    /// Answers a refused submission; an accepted op answers through its sink.
    fn accepted(&mut self, tag: u64, submitted: Result<Submitted>) {
        if let Err(error) = submitted {
            if error.code == ErrorCode::PermissionDenied {
                let event = AuditEvent::new(AuditKind::Denied, Some(&self.caller), "shm submit", &error.message);
                self.kernel.audit(event.from(self.caller.source.clone()));
            }
            self.reply(tag, Err(&error));
        }
    }

    fn sink(&self, tag: u64) -> Sink {
        let events = self.events.0.clone();
        let wake = self.wake.clone();
        Arc::new(move |completion| {
            let _ = events.send(Event::Completed(tag, completion));
            wake();
        })
    }

    fn reply(&mut self, tag: u64, outcome: std::result::Result<&Completion, &Error>) {
        let mut message = Vec::new();
        shm::encode_completion(tag, outcome, &mut message);
        if message.len() > self.end.max_message()
            && let Ok(completion) = outcome
        {
            // The op did run: say so, and where to read its completion, so that a
            // client does not take this for a refusal and submit it again.
            let error = Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "op {} completed ({}) but its completion is larger than half the completion queue; \
                     read it with GET /v1/ops/{}",
                    completion.op_id,
                    completion.status.as_str(),
                    completion.op_id
                ),
            )
            .with_details(serde_json::json!({ "op_id": completion.op_id, "status": completion.status }));
            shm::encode_completion(tag, Err(&error), &mut message);
        }
        self.backlog.push_back(message);
    }

    /// Writes waiting completions while the client has room for them.
    fn flush(&mut self) {
        while let Some(message) = self.backlog.front() {
            match self.end.push_completion(message) {
                Ok(true) => {
                    self.backlog.pop_front();
                    self.owed -= 1;
                }
                Ok(false) => return,
                // `reply` keeps messages small enough, so this is a forged cursor.
                Err(e) => {
                    tracing::warn!(error = %e, "closing a shared-memory session");
                    self.end.close();
                    self.backlog.clear();
                    return;
                }
            }
        }
    }
}

impl Kernel {
    /// Opens a shared-memory session for a client on this machine; see
    /// [`bbx_ring::shm`].
    pub fn open_shm(self: &Arc<Self>, caller: &Caller, request: OpenShm) -> Result<ShmSession> {
        caller.may(bbx_auth::Action::Act)?;
        let access = bbx_auth::Access::new("ring.shm", Some(bbx_auth::Action::Act), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        open(self, caller, request)
    }
}

/// Sessions in progress, in all and per key, shared by the kernel and its
/// session threads.
#[derive(Default)]
pub(crate) struct Sessions {
    total: AtomicUsize,
    per_key: parking_lot::Mutex<HashMap<KeyId, usize>>,
}

impl Sessions {
    pub(crate) fn count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One session's place in [`Sessions`], given back when dropped.
struct Seat {
    sessions: Arc<Sessions>,
    key: KeyId,
}

impl Seat {
    fn take(sessions: &Arc<Sessions>, key: KeyId) -> Result<Self> {
        let mut per_key = sessions.per_key.lock();
        let mine = per_key.entry(key).or_default();
        let refused = if sessions.total.load(Ordering::Acquire) >= MAX_SESSIONS {
            Some(format!(
                "the kernel serves at most {MAX_SESSIONS} shared-memory sessions at once"
            ))
        } else if *mine >= MAX_SESSIONS_PER_KEY {
            Some(format!(
                "a key may hold at most {MAX_SESSIONS_PER_KEY} shared-memory sessions at once"
            ))
        } else {
            None
        };
        if let Some(message) = refused {
            if *mine == 0 {
                per_key.remove(&key);
            }
            return Err(Error::resource_exhausted(message, Duration::from_secs(1)));
        }
        *mine += 1;
        sessions.total.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            sessions: sessions.clone(),
            key,
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut per_key = self.sessions.per_key.lock();
        if let Some(mine) = per_key.get_mut(&self.key) {
            *mine -= 1;
            if *mine == 0 {
                per_key.remove(&self.key);
            }
        }
        self.sessions.total.fetch_sub(1, Ordering::AcqRel);
    }
}
