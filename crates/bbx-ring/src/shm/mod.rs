//! The shared-memory ring: a client on the same machine submits ops and reaps their
//! completions through a mapped file, with no system call while both sides are busy.
//!
//! The file holds a header page and two single-producer, single-consumer queues of
//! length-prefixed messages: submissions (client to kernel) and completions (kernel
//! to client). Each queue's head and tail sit on cache lines of their own and only
//! grow; a message that would straddle the end of the buffer is preceded by a wrap
//! marker and starts again at offset 0.
//!
//! A consumer with nothing to read spins for a moment, then announces that it sleeps
//! and waits on a futex word in the mapping. A producer makes the `futex_wake` system
//! call only when it sees that announcement, as io_uring's polling thread does with
//! `IORING_SQ_NEED_WAKEUP`. The announcement and the producer's publication are
//! ordered by `SeqCst` fences on both sides, so a wakeup is never lost.
//!
//! The kernel treats the mapping as hostile: every length read from it is checked,
//! and payloads are copied out before they are parsed. A bad frame closes the
//! session; it cannot make the kernel read outside the mapping.

use bbx_core::{Error, ErrorCode};
use memmap2::MmapMut;
use rustix::thread::futex;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

mod codec;
pub use codec::{decode_completion, decode_submission, encode_completion, encode_submission};

/// "BBXSHMR1": identifies a ring file.
const MAGIC: u64 = 0x3152_4d48_5358_4242;
/// The layout's version; a client refuses a file of another.
pub const VERSION: u32 = 2;
/// The header page: the shared fields, then the two queues' cursors.
const HEADER_BYTES: usize = 4096;
/// A frame's length prefix, padded so that frames stay 8-byte aligned.
const FRAME_HEADER: u64 = 8;
/// A length prefix that means "the rest of the buffer is skipped".
const WRAP: u32 = u32::MAX;
/// The smallest and largest queue a session may ask for.
pub const MIN_QUEUE_BYTES: u64 = 64 * 1024;
pub const MAX_QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// How long a consumer spins before it sleeps on the futex.
const SPIN: Duration = Duration::from_micros(50);

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("cannot set up the shared-memory ring at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a BBX shared-memory ring of version {VERSION}")]
    NotARing(String),
    #[error("the queue size must be a multiple of 8 from {MIN_QUEUE_BYTES} to {MAX_QUEUE_BYTES} bytes; got {0}")]
    QueueSize(u64),
    #[error("a message of {len} bytes does not fit a queue of {queue_bytes} bytes (at most half of it)")]
    TooLarge { len: usize, queue_bytes: u64 },
    #[error("the peer wrote a malformed frame at position {position}: {reason}")]
    Corrupt { position: u64, reason: &'static str },
}

impl From<ShmError> for Error {
    fn from(e: ShmError) -> Self {
        let code = match &e {
            ShmError::QueueSize(_) | ShmError::TooLarge { .. } => ErrorCode::InvalidArgument,
            ShmError::Io { .. } | ShmError::NotARing(_) | ShmError::Corrupt { .. } => ErrorCode::Unavailable,
        };
        Error::new(code, e.to_string())
    }
}

/// A queue's cursors, each on a cache line of its own so that the producer and the
/// consumer do not invalidate each other's line on every message.
#[repr(C, align(64))]
struct Padded<T>(T);

#[repr(C)]
struct QueueHeader {
    /// Bytes ever published; written by the producer only.
    tail: Padded<AtomicU64>,
    /// Bytes ever consumed; written by the consumer only.
    head: Padded<AtomicU64>,
    /// 1 while the consumer sleeps (or is about to) on this word.
    sleeping: Padded<AtomicU32>,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    /// The client's pid once it has attached; 0 before.
    client_pid: AtomicU32,
    queue_bytes: AtomicU64,
    /// Set by either side when it leaves.
    closed: AtomicU32,
    submissions: QueueHeader,
    completions: QueueHeader,
}

const _: () = assert!(size_of::<Header>() <= HEADER_BYTES);

/// A mapped ring file.
struct Mapping {
    map: MmapMut,
    queue_bytes: u64,
}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long and page-aligned, and
        // Header holds only atomics and padding, valid for any bit pattern.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    fn queue(&self, which: Which) -> Queue<'_> {
        let header = self.header();
        let (cursors, index) = match which {
            Which::Submissions => (&header.submissions, 0),
            Which::Completions => (&header.completions, 1),
        };
        let start = HEADER_BYTES + index * self.queue_bytes as usize;
        // SAFETY: both queues lie inside the mapping (its length was checked
        // against queue_bytes when it was created or attached).
        let data = unsafe { self.map.as_ptr().add(start).cast_mut() };
        Queue {
            cursors,
            data,
            size: self.queue_bytes,
        }
    }

    fn close(&self) {
        self.header().closed.store(1, Ordering::SeqCst);
        for which in [Which::Submissions, Which::Completions] {
            let sleeping = &self.queue(which).cursors.sleeping.0;
            sleeping.store(0, Ordering::SeqCst);
            let _ = futex::wake(sleeping, futex::Flags::empty(), u32::MAX);
        }
    }

    fn is_closed(&self) -> bool {
        self.header().closed.load(Ordering::Acquire) != 0
    }
}

#[derive(Clone, Copy)]
enum Which {
    Submissions,
    Completions,
}

/// One direction of the ring, seen from either end.
struct Queue<'a> {
    cursors: &'a QueueHeader,
    data: *mut u8,
    size: u64,
}

impl Queue<'_> {
    /// Appends one message; `Ok(false)` if there is no room for it now.
    fn push(&self, message: &[u8]) -> Result<bool, ShmError> {
        if message.len() as u64 > self.size / 2 - FRAME_HEADER {
            return Err(ShmError::TooLarge {
                len: message.len(),
                queue_bytes: self.size,
            });
        }
        // Both cursors live in memory the peer can write: wrapping arithmetic and
        // the checks below keep a forged cursor from causing a panic or a write
        // outside the queue.
        let tail = self.cursors.tail.0.load(Ordering::Relaxed);
        let head = self.cursors.head.0.load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        if used > self.size || !tail.is_multiple_of(8) {
            return Err(ShmError::Corrupt {
                position: tail,
                reason: "a cursor is outside the queue or not frame-aligned",
            });
        }
        let frame = FRAME_HEADER + (message.len() as u64).next_multiple_of(8);
        let offset = tail % self.size;
        let (skip, at) = if frame > self.size - offset {
            (self.size - offset, 0)
        } else {
            (0, offset as usize)
        };
        if used + skip + frame > self.size {
            return Ok(false);
        }
        // SAFETY: offset < size and is 8-aligned, so the wrap marker fits; the frame
        // starts at `at` and ends at most at size (it either fits before the end, or
        // starts at 0 and is at most half the queue). The consumer reads these
        // bytes only after the tail's Release store.
        unsafe {
            if skip > 0 {
                self.data.add(offset as usize).cast::<u32>().write_volatile(WRAP);
            }
            self.data.add(at).cast::<u32>().write_volatile(message.len() as u32);
            std::ptr::copy_nonoverlapping(
                message.as_ptr(),
                self.data.add(at + FRAME_HEADER as usize),
                message.len(),
            );
        }
        self.cursors
            .tail
            .0
            .store(tail.wrapping_add(skip + frame), Ordering::Release);
        wake(&self.cursors.sleeping.0);
        Ok(true)
    }

    /// Copies the next message into `into` (cleared first); `Ok(false)` if the
    /// queue is empty.
    fn pop(&self, into: &mut Vec<u8>) -> Result<bool, ShmError> {
        // As in push: the peer can write both cursors, so nothing below trusts them.
        let mut head = self.cursors.head.0.load(Ordering::Relaxed);
        let tail = self.cursors.tail.0.load(Ordering::Acquire);
        loop {
            if head == tail {
                return Ok(false);
            }
            let corrupt = |reason| ShmError::Corrupt { position: head, reason };
            let published = tail.wrapping_sub(head);
            if published > self.size || !head.is_multiple_of(8) {
                return Err(corrupt("a cursor is outside the queue or not frame-aligned"));
            }
            let offset = head % self.size;
            // SAFETY: offset < size and both are multiples of 8, so the 4-byte
            // read lies inside the queue.
            let len = unsafe { self.data.add(offset as usize).cast::<u32>().read_volatile() };
            if len == WRAP {
                head = head.wrapping_add(self.size - offset);
                continue;
            }
            let frame = FRAME_HEADER + u64::from(len).next_multiple_of(8);
            if frame > self.size - offset || frame > published {
                return Err(corrupt("a frame runs past the published tail or the buffer's end"));
            }
            into.clear();
            into.reserve(len as usize);
            // SAFETY: the payload [offset + 8, offset + 8 + len) was checked to lie
            // inside the queue and before the tail the producer published.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data.add((offset + FRAME_HEADER) as usize),
                    into.as_mut_ptr(),
                    len as usize,
                );
                into.set_len(len as usize);
            }
            self.cursors.head.0.store(head.wrapping_add(frame), Ordering::Release);
            return Ok(true);
        }
    }

    fn is_empty(&self) -> bool {
        self.cursors.head.0.load(Ordering::Relaxed) == self.cursors.tail.0.load(Ordering::Acquire)
    }

    /// Waits until `ready` holds or `timeout` passes: spins first, then sleeps on
    /// the futex. `ready` must include this queue being non-empty.
    fn wait(&self, timeout: Duration, ready: impl Fn() -> bool) {
        let started = Instant::now();
        while started.elapsed() < SPIN.min(timeout) {
            if ready() {
                return;
            }
            std::hint::spin_loop();
        }
        let sleeping = &self.cursors.sleeping.0;
        sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !ready()
            && let Some(left) = timeout.checked_sub(started.elapsed())
        {
            let left = futex::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            // EAGAIN (a producer already cleared the word), EINTR and ETIMEDOUT
            // all mean "look again".
            let _ = futex::wait(sleeping, futex::Flags::empty(), 1, Some(&left));
        }
        sleeping.store(0, Ordering::Relaxed);
    }
}

/// Wakes a consumer that announced it sleeps on `sleeping`; a load and nothing
/// more when it does not.
fn wake(sleeping: &AtomicU32) {
    fence(Ordering::SeqCst);
    if sleeping.load(Ordering::Relaxed) == 1 && sleeping.swap(0, Ordering::SeqCst) == 1 {
        let _ = futex::wake(sleeping, futex::Flags::empty(), 1);
    }
}

/// The kernel's end: it creates the file, reads submissions and writes completions.
pub struct KernelEnd {
    /// Shared with the wakers the ring holds for this session's ops.
    mapping: Arc<Mapping>,
    /// The memfd, open until the client has attached.
    file: Option<File>,
}

impl KernelEnd {
    /// Creates a ring in a new memfd, sealed so that its size can never change: a
    /// client that truncated a plain file would crash the kernel with SIGBUS on its
    /// next access. The client opens it through [`KernelEnd::path`], which only a
    /// process allowed to inspect the kernel's (same user, by default) can open,
    /// and which goes away with [`KernelEnd::forget_path`].
    pub fn create(queue_bytes: u64) -> Result<Self, ShmError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        if !(MIN_QUEUE_BYTES..=MAX_QUEUE_BYTES).contains(&queue_bytes) || !queue_bytes.is_multiple_of(8) {
            return Err(ShmError::QueueSize(queue_bytes));
        }
        let io = |source: std::io::Error| ShmError::Io {
            path: "a memfd".into(),
            source,
        };
        let fd = rustix::fs::memfd_create("bbx-ring", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| io(e.into()))?;
        rustix::fs::ftruncate(&fd, HEADER_BYTES as u64 + 2 * queue_bytes).map_err(|e| io(e.into()))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| io(e.into()))?;
        let file = File::from(fd);
        // SAFETY: the memfd is new and ours, and its size is sealed; the client maps
        // it too, which is the point, and every access to the shared bytes goes
        // through atomics or the checked copies above.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        let mapping = Mapping { map, queue_bytes };
        let header = mapping.header();
        header.queue_bytes.store(queue_bytes, Ordering::Relaxed);
        header.version.store(VERSION, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok(Self {
            mapping: Arc::new(mapping),
            file: Some(file),
        })
    }

    /// Where a client opens the ring, until [`KernelEnd::forget_path`].
    pub fn path(&self) -> Option<PathBuf> {
        let file = self.file.as_ref()?;
        Some(PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        )))
    }

    /// Closes the descriptor behind [`KernelEnd::path`]: once the client has
    /// mapped the ring, nobody else needs to find it. The mapping stays.
    pub fn forget_path(&mut self) {
        self.file = None;
    }

    /// Copies the next submission into `into`; `Ok(false)` if there is none.
    pub fn pop_submission(&self, into: &mut Vec<u8>) -> Result<bool, ShmError> {
        self.mapping.queue(Which::Submissions).pop(into)
    }

    /// The largest message a queue of this ring takes.
    pub fn max_message(&self) -> usize {
        (self.mapping.queue_bytes / 2 - FRAME_HEADER) as usize
    }

    /// Appends a completion; `Ok(false)` if the client has not made room for it.
    pub fn push_completion(&self, message: &[u8]) -> Result<bool, ShmError> {
        self.mapping.queue(Which::Completions).push(message)
    }

    /// Waits until a submission arrives, `ready` holds (other work), the client
    /// leaves, or `timeout` passes.
    pub fn wait(&self, timeout: Duration, ready: impl Fn() -> bool) {
        let queue = self.mapping.queue(Which::Submissions);
        queue.wait(timeout, || !queue.is_empty() || self.mapping.is_closed() || ready());
    }

    /// A handle that wakes [`KernelEnd::wait`] from another thread, cheaply when
    /// the kernel's end is not asleep.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let mapping = self.mapping.clone();
        move || wake(&mapping.header().submissions.sleeping.0)
    }

    /// The client's pid once it has attached.
    pub fn client_pid(&self) -> Option<u32> {
        Some(self.mapping.header().client_pid.load(Ordering::Acquire)).filter(|pid| *pid != 0)
    }

    /// False once the attached client's process is gone (it died without closing
    /// the session); true before a client attaches.
    pub fn client_alive(&self) -> bool {
        let Some(pid) = self.client_pid() else { return true };
        let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
            return false;
        };
        // EPERM means it exists, under another user.
        !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
    }

    pub fn is_closed(&self) -> bool {
        self.mapping.is_closed()
    }

    /// Tells the client that the kernel has left.
    pub fn close(&self) {
        self.mapping.close();
    }
}

/// The client's end: it attaches to a file the kernel created, writes submissions
/// and reads completions.
pub struct ClientEnd {
    mapping: Mapping,
}

impl ClientEnd {
    /// Maps the ring file at `path`, checks its layout, and announces this process.
    pub fn attach(path: &Path) -> Result<Self, ShmError> {
        let io = |source| ShmError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::options().read(true).write(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_BYTES as u64 {
            return Err(ShmError::NotARing(path.display().to_string()));
        }
        // SAFETY: as in KernelEnd::create; the length is checked before any queue
        // is touched.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        let mut mapping = Mapping { map, queue_bytes: 0 };
        let header = mapping.header();
        let queue_bytes = header.queue_bytes.load(Ordering::Relaxed);
        if header.magic.load(Ordering::Acquire) != MAGIC
            || header.version.load(Ordering::Relaxed) != VERSION
            || !(MIN_QUEUE_BYTES..=MAX_QUEUE_BYTES).contains(&queue_bytes)
            || len != HEADER_BYTES as u64 + 2 * queue_bytes
        {
            return Err(ShmError::NotARing(path.display().to_string()));
        }
        header.client_pid.store(std::process::id(), Ordering::Release);
        mapping.queue_bytes = queue_bytes;
        Ok(Self { mapping })
    }

    /// Appends a submission; `Ok(false)` if the kernel has not made room for it.
    pub fn push_submission(&self, message: &[u8]) -> Result<bool, ShmError> {
        self.mapping.queue(Which::Submissions).push(message)
    }

    /// Copies the next completion into `into`; `Ok(false)` if there is none.
    pub fn pop_completion(&self, into: &mut Vec<u8>) -> Result<bool, ShmError> {
        self.mapping.queue(Which::Completions).pop(into)
    }

    /// Waits until a completion arrives, the kernel leaves, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let queue = self.mapping.queue(Which::Completions);
        queue.wait(timeout, || !queue.is_empty() || self.mapping.is_closed());
    }

    pub fn is_closed(&self) -> bool {
        self.mapping.is_closed()
    }
}

impl Drop for ClientEnd {
    fn drop(&mut self) {
        self.mapping.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn pair(queue_bytes: u64) -> (KernelEnd, ClientEnd) {
        let kernel = KernelEnd::create(queue_bytes).unwrap();
        let client = ClientEnd::attach(&kernel.path().unwrap()).unwrap();
        (kernel, client)
    }

    #[test]
    fn attach_checks_the_layout_and_announces_the_client() {
        assert!(matches!(KernelEnd::create(1000), Err(ShmError::QueueSize(1000))));
        let mut kernel = KernelEnd::create(MIN_QUEUE_BYTES).unwrap();
        let path = kernel.path().unwrap();
        assert_eq!(kernel.client_pid(), None);
        // Its size is sealed: a client cannot shrink it under the kernel's feet.
        let file = File::options().write(true).open(&path).unwrap();
        assert!(file.set_len(4096).is_err(), "the ring's size is sealed");
        let client = ClientEnd::attach(&path).unwrap();
        assert_eq!(kernel.client_pid(), Some(std::process::id()));
        kernel.forget_path();
        assert!(kernel.path().is_none());
        drop(client);
        assert!(kernel.is_closed());

        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, vec![0u8; 8192]).unwrap();
        assert!(matches!(ClientEnd::attach(&other), Err(ShmError::NotARing(_))));
    }

    #[test]
    fn a_corrupt_frame_is_reported_not_followed() {
        let (kernel, client) = pair(MIN_QUEUE_BYTES);
        assert!(client.push_submission(b"hello").unwrap());
        // The client overwrites the length prefix with one that runs past the tail.
        let queue = client.mapping.queue(Which::Submissions);
        unsafe { queue.data.cast::<u32>().write_volatile(4000) };
        let mut buf = Vec::new();
        assert!(matches!(kernel.pop_submission(&mut buf), Err(ShmError::Corrupt { .. })));
        // A tail beyond the queue's size is refused too.
        queue.cursors.tail.0.store(10 * MIN_QUEUE_BYTES, Ordering::Release);
        assert!(matches!(kernel.pop_submission(&mut buf), Err(ShmError::Corrupt { .. })));
        // Forged cursors near the end of the u64 range or off the frame grid
        // neither panic nor reach outside the queue, on either side.
        for (head, tail) in [(u64::MAX - 7, 16), (u64::MAX - 3, u64::MAX), (3, 11), (0, u64::MAX)] {
            queue.cursors.head.0.store(head, Ordering::Release);
            queue.cursors.tail.0.store(tail, Ordering::Release);
            let _ = kernel.pop_submission(&mut buf);
            let completions = client.mapping.queue(Which::Completions);
            completions.cursors.head.0.store(head, Ordering::Release);
            completions.cursors.tail.0.store(tail, Ordering::Release);
            let _ = kernel.push_completion(&[7; 100]);
        }
    }

    #[test]
    fn oversized_messages_are_refused_and_a_full_queue_says_so() {
        let (kernel, client) = pair(MIN_QUEUE_BYTES);
        let big = vec![1u8; MIN_QUEUE_BYTES as usize];
        assert!(matches!(client.push_submission(&big), Err(ShmError::TooLarge { .. })));
        let message = vec![2u8; 1000];
        let mut pushed = 0;
        while client.push_submission(&message).unwrap() {
            pushed += 1;
        }
        assert_eq!(pushed, MIN_QUEUE_BYTES as usize / 1008);
        let mut buf = Vec::new();
        assert!(kernel.pop_submission(&mut buf).unwrap());
        assert_eq!(buf, message);
        assert!(client.push_submission(&message).unwrap(), "a popped frame makes room");
    }

    #[test]
    fn a_sleeping_consumer_is_woken_by_the_producer() {
        let (kernel, client) = pair(MIN_QUEUE_BYTES);
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = Vec::new();
            while got.len() < 100 {
                if kernel.pop_submission(&mut buf).unwrap() {
                    got.push(buf.clone());
                } else {
                    kernel.wait(Duration::from_secs(10), || false);
                }
            }
            got
        });
        for i in 0..100u32 {
            // Pauses long enough that the consumer goes to sleep between messages.
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            while !client.push_submission(&i.to_le_bytes()).unwrap() {}
        }
        let got = consumer.join().unwrap();
        let expected: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
        assert_eq!(got, expected);
    }

    proptest! {
        /// Any interleaving of pushes and pops delivers exactly the pushed messages,
        /// in order, across wrap-arounds; a full queue refuses without losing any.
        #[test]
        fn the_queue_behaves_like_a_fifo(steps in proptest::collection::vec((any::<bool>(), 0usize..9000), 1..400)) {
            let (kernel, client) = pair(MIN_QUEUE_BYTES);
            let mut model = VecDeque::new();
            let mut buf = Vec::new();
            for (n, (push, len)) in steps.into_iter().enumerate() {
                if push {
                    let message = vec![n as u8; len];
                    if client.push_submission(&message).unwrap() {
                        model.push_back(message);
                    } else {
                        let used: u64 = model.iter().map(|m: &Vec<u8>| 8 + (m.len() as u64).next_multiple_of(8)).sum();
                        prop_assert!(used + 8 + (len as u64).next_multiple_of(8) > MIN_QUEUE_BYTES - 8 - 9000);
                    }
                } else {
                    let popped = kernel.pop_submission(&mut buf).unwrap();
                    prop_assert_eq!(popped, !model.is_empty());
                    if popped {
                        prop_assert_eq!(&buf, &model.pop_front().unwrap());
                    }
                }
            }
            while let Some(expected) = model.pop_front() {
                prop_assert!(kernel.pop_submission(&mut buf).unwrap());
                prop_assert_eq!(&buf, &expected);
            }
            prop_assert!(!kernel.pop_submission(&mut buf).unwrap());
        }
    }
}
