//! BBX's write-ahead log.
//!
//! `bbx-journal` owns the files in a journal directory and one promise: a record
//! whose [`Journal::sync`] returned is on disk, and recovery gives back exactly the
//! synced records (plus any later ones that happened to reach disk whole), in order,
//! never a damaged one and never one twice.
//!
//! - **Segments.** Records go to segment files named by their first lsn
//!   (`00000000000000000001.wal`), written in order; a segment rolls over at
//!   `segment_bytes`.
//! - **Preallocation.** A background thread zero-fills the next segment ahead of need
//!   (the file `spare`), and a roll renames it into place. Overwriting blocks that
//!   already exist lets `fdatasync` skip the file system's metadata commit that an
//!   append (a growing file) needs: on ext4 here that halves the time of a sync.
//!   The zeros after the last record read as the end of the journal. A fresh journal
//!   starts on a plain segment and moves to a preallocated one as soon as the spare
//!   is ready; if preparing it fails, the journal goes on with plain segments.
//! - **Records.** Each carries its lsn, the lsn that began its sync's group, and a
//!   CRC-32 of both and the payload ([`record`]).
//! - **Group commit.** [`Journal::append`] only buffers; [`Journal::sync`] writes the
//!   buffer and calls `fdatasync` once, however many records it holds.
//! - **Recovery.** [`Journal::open`] checks every record. A bad record in the last
//!   segment after which no later sync's record follows is a write torn by a crash
//!   and is cut off; anything else bad stops the open with [`JournalError::Corrupt`],
//!   naming the file and offset, since silently skipping it would lose or reorder
//!   acknowledged work. [`verify`] reports
//!   without changing anything; [`repair`] truncates at the first bad record.
//! - **Checkpoints.** [`Journal::checkpoint`] records that records below an lsn are no
//!   longer needed (durably, in `checkpoint`), and deletes segments wholly below it, so
//!   the journal does not grow without bound.

pub mod record;

use record::{Decoded, Format};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// A log sequence number: records are numbered 1, 2, 3, ... without gaps.
pub type Lsn = u64;

const SEGMENT_SUFFIX: &str = ".wal";
const CHECKPOINT_FILE: &str = "checkpoint";
/// The next segment, zero-filled and synced; complete whenever it exists.
const SPARE_FILE: &str = "spare";
/// The spare while it is being filled.
const SPARE_TMP_FILE: &str = "spare.tmp";
/// Far beyond any real journal, and far from overflow.
const MAX_LSN: Lsn = u64::MAX / 2;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O failed on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "journal segment {segment} is corrupt at byte {offset}: {reason}; \
         `bbx journal verify` shows what is affected and `bbx journal repair` truncates the journal there"
    )]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("a record of {size} bytes does not fit in a {segment_bytes}-byte segment")]
    RecordTooLarge { size: usize, segment_bytes: u64 },
    #[error("the journal failed earlier and accepts nothing until it is reopened: {reason}")]
    Failed { reason: String },
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Size at which a segment rolls over (default 64 MiB).
    pub segment_bytes: u64,
    /// Zero-fill segments ahead of need (default on); off, segments are appended to.
    pub preallocate: bool,
    /// Keep segments behind the checkpoint (no longer replayed) for this long
    /// after their last write, as history ([`read_history`]): the redo records a
    /// point-in-time recovery replays. Zero (the default) keeps none.
    pub history: std::time::Duration,
    /// The most bytes of such history kept: the oldest segments go first.
    pub history_bytes: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            preallocate: true,
            history: std::time::Duration::ZERO,
            history_bytes: u64::MAX,
        }
    }
}

/// The largest payload one record can carry in segments of `segment_bytes`.
pub fn max_payload(segment_bytes: u64) -> usize {
    let capacity = segment_bytes.saturating_sub(record::MAGIC.len() as u64) as usize;
    capacity.saturating_sub(record::framed_len(0)).min(u32::MAX as usize)
}

/// The records kept behind the checkpoint as history, and after it, from `from`
/// on, in lsn order, read from the journal in `dir` (which a running kernel may
/// be appending to: a torn tail is where it stops). Corruption in the middle is
/// an error, as at recovery.
pub fn read_history(dir: &Path, from: Lsn) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    each_in_history(dir, from, |record| {
        records.push(record);
        Ok(true)
    })?;
    Ok(records)
}

/// [`read_history`] one record at a time, a segment in memory at a time:
/// `each` answers whether to go on.
pub fn each_in_history(dir: &Path, from: Lsn, mut each: impl FnMut(Record) -> Result<bool>) -> Result<()> {
    let segments = list_segments(dir)?;
    for (segment, next_first) in segments.iter().zip(next_firsts(&segments)) {
        if next_first.is_some_and(|next| next <= from) {
            continue;
        }
        let scan = scan_segment(segment, segment.first_lsn, next_first)?;
        if let Some(problem) = scan.problem
            && !(next_first.is_none() && problem.torn)
        {
            return Err(JournalError::Corrupt {
                segment: segment.path.clone(),
                offset: problem.offset,
                reason: problem.reason,
            });
        }
        for (lsn, payload) in scan.records.into_iter().filter(|(lsn, _)| *lsn >= from) {
            if !each(Record { lsn, payload })? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// For each segment, the first lsn of the one after it (none for the last).
fn next_firsts(segments: &[Segment]) -> Vec<Option<Lsn>> {
    segments
        .iter()
        .skip(1)
        .map(|s| Some(s.first_lsn))
        .chain([None])
        .collect()
}

/// A record as recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub payload: Vec<u8>,
}

/// What opening the journal found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Every record at or after the checkpoint, in lsn order.
    pub records: Vec<Record>,
    /// Bytes cut from the end of the last segment as a torn write, if any.
    pub truncated_tail: Option<TruncatedTail>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
}

/// The journal's shape, for `wal-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStatus {
    pub segments: usize,
    pub bytes: u64,
    /// The lsn the next record will get.
    pub next_lsn: Lsn,
    /// The highest lsn known to be on disk (0 if none).
    pub synced_lsn: Lsn,
    /// Records below this lsn are no longer needed.
    pub checkpoint_lsn: Lsn,
    /// Segments wholly behind the checkpoint, kept as history
    /// ([`JournalOptions::history`]), and their bytes.
    pub history_segments: usize,
    pub history_bytes: u64,
    /// How long history is kept, in seconds.
    pub history_secs: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    first_lsn: Lsn,
    path: PathBuf,
    /// Bytes in use: the magic and the records (a preallocated file is longer).
    bytes: u64,
    preallocated: bool,
    /// Records are appended only to a segment of the current format.
    format: Format,
}

/// The open journal: one writer at a time.
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    /// Oldest first; the last one is being appended to.
    segments: Vec<Segment>,
    file: File,
    buffer: Vec<u8>,
    next_lsn: Lsn,
    synced_lsn: Lsn,
    checkpoint_lsn: Lsn,
    /// The lsn of the first record in `buffer`: every record of one sync carries it.
    group: Lsn,
    /// Set by the first failed write or sync. What reached the file is then unknown
    /// (a retried fdatasync may report success for pages the kernel already dropped),
    /// so the journal refuses everything until `open` has checked the files again.
    failed: Option<String>,
    /// `None` when preallocation is off.
    spare: Option<Spare>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, recovering what is there.
    pub fn open(dir: &Path, options: JournalOptions) -> Result<(Self, Recovery)> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let checkpoint_lsn = read_checkpoint(dir)?;
        let mut segments = list_segments(dir)?;
        let mut recovery = Recovery::default();
        let mut expected = segments.first().map_or(1, |s| s.first_lsn);
        let next_firsts = next_firsts(&segments);
        for (segment, next_first) in segments.iter_mut().zip(next_firsts) {
            let last = next_first.is_none();
            segment.preallocated = segment.bytes >= options.segment_bytes;
            // History behind the checkpoint is not replayed: not even read, so a
            // long history costs a start nothing. Its records are checked when
            // history is read.
            if let Some(next) = next_first.filter(|next| *next <= checkpoint_lsn) {
                expected = next;
                continue;
            }
            let scan = scan_segment(segment, expected, next_first)?;
            segment.format = scan.format;
            for (lsn, payload) in &scan.records {
                if *lsn >= checkpoint_lsn {
                    recovery.records.push(Record {
                        lsn: *lsn,
                        payload: payload.clone(),
                    });
                }
            }
            expected = segment.first_lsn + scan.records.len() as u64;
            if let Some(problem) = scan.problem {
                if !(last && problem.torn) {
                    return Err(JournalError::Corrupt {
                        segment: segment.path.clone(),
                        offset: problem.offset,
                        reason: problem.reason,
                    });
                }
                cut_off(&segment.path, problem.offset, scan.extent)?;
                recovery.truncated_tail = Some(TruncatedTail {
                    segment: segment.path.clone(),
                    offset: problem.offset,
                    bytes: scan.extent.saturating_sub(problem.offset),
                    reason: problem.reason,
                });
            }
            segment.bytes = scan.end;
        }
        // A segment torn while it was being created has not even its magic: it held
        // nothing, so it goes, and a fresh one starts at the same lsn. So does an
        // empty one of an older format, which takes no new records.
        let empty = |s: &Segment| s.bytes == 0 || (s.format != Format::V2 && s.bytes == record::MAGIC.len() as u64);
        if segments.last().is_some_and(empty) {
            let torn = segments.pop().expect("checked above");
            fs::remove_file(&torn.path).map_err(io_error(&torn.path))?;
            sync_dir(dir)?;
        }
        if segments.is_empty() {
            expected = expected.max(checkpoint_lsn).max(1);
            segments.push(create_segment(dir, expected)?);
        }
        let current = segments.last().expect("at least one segment");
        let file = OpenOptions::new()
            .write(true)
            .open(&current.path)
            .map_err(io_error(&current.path))?;
        let spare = options.preallocate.then(|| Spare::start(dir, options.segment_bytes));
        let journal = Self {
            dir: dir.to_path_buf(),
            options,
            segments,
            file,
            buffer: Vec::new(),
            next_lsn: expected,
            synced_lsn: expected - 1,
            checkpoint_lsn,
            group: expected,
            failed: None,
            spare,
        };
        Ok((journal, recovery))
    }

    /// Buffers a record and returns its lsn. Nothing is durable until [`Self::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<Lsn> {
        self.check_healthy()?;
        let size = record::framed_len(payload.len());
        let capacity = self.options.segment_bytes.saturating_sub(record::MAGIC.len() as u64);
        if size as u64 > capacity || payload.len() > u32::MAX as usize {
            return Err(JournalError::RecordTooLarge {
                size,
                segment_bytes: self.options.segment_bytes,
            });
        }
        let current = self.segments.last().expect("at least one segment");
        let holds_records = current.bytes > record::MAGIC.len() as u64 || !self.buffer.is_empty();
        let full = current.bytes + (self.buffer.len() + size) as u64 > self.options.segment_bytes;
        let plain = !current.preallocated;
        let old_format = current.format != Format::V2;
        if (holds_records && full) || old_format || (plain && self.spare.as_mut().is_some_and(Spare::ready)) {
            self.roll()?;
        }
        let lsn = self.next_lsn;
        if self.buffer.is_empty() {
            self.group = lsn;
        }
        record::encode(lsn, self.group, payload, &mut self.buffer);
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Writes everything buffered and makes it durable with one `fdatasync`.
    /// Returns the highest lsn now on disk.
    pub fn sync(&mut self) -> Result<Lsn> {
        self.check_healthy()?;
        if !self.buffer.is_empty() {
            let current = self.segments.last().expect("at least one segment");
            let written = self
                .file
                .write_all_at(&self.buffer, current.bytes)
                .and_then(|()| self.file.sync_data())
                .map_err(io_error(&current.path));
            self.poison_on_error(written)?;
            self.segments.last_mut().expect("at least one segment").bytes += self.buffer.len() as u64;
            self.buffer.clear();
        }
        self.synced_lsn = self.next_lsn - 1;
        Ok(self.synced_lsn)
    }

    /// Syncs the current segment and starts the next one, from the spare if it is
    /// ready. A current segment without records is replaced (it has the same name).
    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let path = segment_path(&self.dir, self.next_lsn);
        let segment = match self.spare.as_mut().map(|spare| spare.take(&path)) {
            Some(true) => sync_dir(&self.dir).map(|()| Segment {
                first_lsn: self.next_lsn,
                path,
                bytes: record::MAGIC.len() as u64,
                preallocated: true,
                format: Format::V2,
            }),
            Some(false) | None => create_segment(&self.dir, self.next_lsn),
        };
        let segment = self.poison_on_error(segment)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&segment.path)
            .map_err(io_error(&segment.path));
        self.file = self.poison_on_error(file)?;
        if self.segments.last().is_some_and(|s| s.path == segment.path) {
            self.segments.pop();
        }
        self.segments.push(segment);
        Ok(())
    }

    fn check_healthy(&self) -> Result<()> {
        match &self.failed {
            Some(reason) => Err(JournalError::Failed { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn poison_on_error<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Declares records below `upto` no longer needed and deletes the segments that
    /// hold only such records. Returns how many segments were deleted.
    pub fn checkpoint(&mut self, upto: Lsn) -> Result<usize> {
        self.check_healthy()?;
        let upto = upto.min(self.synced_lsn + 1);
        if upto <= self.checkpoint_lsn {
            // History still ages out.
            return self.prune_history(std::time::SystemTime::now());
        }
        write_checkpoint(&self.dir, upto)?;
        self.checkpoint_lsn = upto;
        self.prune_history(std::time::SystemTime::now())
    }

    /// Deletes the segments behind the checkpoint that history no longer keeps:
    /// last written longer ago than [`JournalOptions::history`], or past
    /// [`JournalOptions::history_bytes`], oldest first. Returns how many.
    pub fn prune_history(&mut self, now: std::time::SystemTime) -> Result<usize> {
        let done = self.done_segments();
        let mut kept_bytes: u64 = self.segments[..done].iter().map(|s| s.bytes).sum();
        let mut expired = 0;
        for segment in &self.segments[..done] {
            let written = fs::metadata(&segment.path)
                .and_then(|m| m.modified())
                .map_err(io_error(&segment.path))?;
            let age = now.duration_since(written).unwrap_or_default();
            if age < self.options.history && kept_bytes <= self.options.history_bytes {
                break;
            }
            kept_bytes -= segment.bytes;
            expired += 1;
        }
        for segment in self.segments.drain(..expired) {
            fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
        }
        if expired > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(expired)
    }

    /// Whether a preallocated segment is ready for the next roll (never, with
    /// preallocation off).
    pub fn spare_ready(&mut self) -> bool {
        self.spare.as_mut().is_some_and(Spare::ready)
    }

    /// The largest payload [`Self::append`] takes.
    pub fn max_payload(&self) -> usize {
        max_payload(self.options.segment_bytes)
    }

    /// Segments behind the checkpoint: a segment is done when the next one
    /// starts at or below it.
    fn done_segments(&self) -> usize {
        self.segments
            .windows(2)
            .take_while(|pair| pair[1].first_lsn <= self.checkpoint_lsn)
            .count()
    }

    pub fn status(&self) -> JournalStatus {
        let done = self.done_segments();
        JournalStatus {
            segments: self.segments.len(),
            bytes: self.segments.iter().map(|s| s.bytes).sum::<u64>() + self.buffer.len() as u64,
            next_lsn: self.next_lsn,
            synced_lsn: self.synced_lsn,
            checkpoint_lsn: self.checkpoint_lsn,
            history_segments: done,
            history_bytes: self.segments[..done].iter().map(|s| s.bytes).sum(),
            history_secs: self.options.history.as_secs(),
        }
    }
}

struct Problem {
    offset: u64,
    reason: String,
    /// Could be a write torn by a crash (only valid in the last segment).
    torn: bool,
}

struct Scan {
    records: Vec<(Lsn, Vec<u8>)>,
    problem: Option<Problem>,
    /// Where the valid records end (the problem's offset, if there is one).
    end: u64,
    /// Where the written bytes end: only zeros follow.
    extent: u64,
    /// What the magic names (the current format if there is none).
    format: Format,
}

/// Reads a segment's records, from `expected_first` on, up to the first problem.
/// `next_first` is where the next segment starts (`None` for the last one): when it
/// continues the numbering, bad bytes after this segment's records lie in space it
/// never used, and are no problem.
fn scan_segment(segment: &Segment, expected_first: Lsn, next_first: Option<Lsn>) -> Result<Scan> {
    let bytes = fs::read(&segment.path).map_err(io_error(&segment.path))?;
    let mut scan = Scan {
        records: Vec::new(),
        problem: None,
        end: 0,
        extent: written_extent(&bytes),
        format: Format::V2,
    };
    let problem = |offset: usize, reason: String, torn: bool| {
        Some(Problem {
            offset: offset as u64,
            reason,
            torn,
        })
    };
    let Some(format) = Format::of(&bytes) else {
        // Part of the magic, or none, and then only zeros: the segment was being made.
        let written = &bytes[..scan.extent as usize];
        let torn = written.len() < record::MAGIC.len() && record::MAGIC.starts_with(written);
        scan.problem = problem(0, "the segment does not start with the journal's magic".into(), torn);
        return Ok(scan);
    };
    scan.format = format;
    if segment.first_lsn != expected_first {
        scan.problem = problem(
            0,
            format!(
                "segment starts at lsn {} but {expected_first} was expected",
                segment.first_lsn
            ),
            false,
        );
        return Ok(scan);
    }
    let mut offset = record::MAGIC.len();
    let mut expected = expected_first;
    loop {
        match record::decode(format, &bytes, offset) {
            Decoded::End => break,
            Decoded::Record { lsn, payload, next, .. } => {
                if lsn != expected {
                    scan.problem = problem(
                        offset,
                        format!("record has lsn {lsn} where {expected} was expected"),
                        false,
                    );
                    break;
                }
                scan.records.push((lsn, payload.to_vec()));
                expected += 1;
                offset = next;
            }
            Decoded::Bad { reason, to_eof } => {
                let torn = torn_write(format, &bytes, offset, expected, to_eof);
                scan.problem = problem(offset, reason.to_owned(), torn);
                break;
            }
        }
    }
    if next_first == Some(expected) {
        scan.problem = None;
    }
    scan.end = offset as u64;
    Ok(scan)
}

fn file_extent(path: &Path) -> Result<u64> {
    fs::read(path)
        .map(|bytes| written_extent(&bytes))
        .map_err(io_error(path))
}

/// The length of `bytes` without its trailing zeros.
fn written_extent(bytes: &[u8]) -> u64 {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last as u64 + 1)
}

/// Whether the bad bytes at `offset`, where record `expected` should start, can be
/// a write torn by a crash: cutting them off then loses nothing acknowledged.
///
/// A torn write is the last sync's, so no record of a later sync follows it.
/// Within that sync, the pages of the write can reach the disk in any order (in a
/// preallocated file nothing orders them), so intact records of the same sync may
/// follow, but then a sector where the damage starts holds nothing at all: it never
/// arrived. A bad record followed by intact records of its own sync and no such hole
/// is damage to a synced record (the sync returned before anything later was
/// written, but only later syncs prove that): corruption. Records of the first
/// format do not say their sync: there, a torn write is the last thing in the file.
fn torn_write(format: Format, bytes: &[u8], offset: usize, expected: Lsn, to_eof: bool) -> bool {
    let later = intact_records_after(format, bytes, offset, expected);
    match format {
        Format::V1 => to_eof && later.first_at.is_none(),
        Format::V2 => {
            let damaged_to = later.first_at.unwrap_or(written_extent(bytes) as usize);
            !later.of_a_later_sync && (lost_sector(bytes, offset, damaged_to) || (to_eof && later.first_at.is_none()))
        }
    }
}

struct Later {
    /// Where the first intact record numbered `expected` or later starts.
    first_at: Option<usize>,
    /// Whether one of them was written by a later sync than record `expected`.
    of_a_later_sync: bool,
}

/// The intact records numbered `expected` or later after `offset`. Only run on
/// recovery, when something is already wrong. A candidate's lsn field is checked
/// before it is decoded, so runs of zeros (and most garbage) are passed over
/// without decoding at every byte.
fn intact_records_after(format: Format, bytes: &[u8], offset: usize, expected: Lsn) -> Later {
    let mut later = Later {
        first_at: None,
        of_a_later_sync: false,
    };
    let Some(last_nonzero) = bytes.iter().rposition(|&b| b != 0) else {
        return later;
    };
    let plausible = |at: usize| {
        let lsn = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        (expected..=MAX_LSN).contains(&lsn)
    };
    for at in (offset + 1..=last_nonzero.min(bytes.len().saturating_sub(format.header()))).filter(|&at| plausible(at)) {
        if let Decoded::Record { group, .. } = record::decode(format, bytes, at) {
            later.first_at.get_or_insert(at);
            // In the first format every record is its own group.
            if group > expected || format == Format::V1 {
                later.of_a_later_sync = true;
                break;
            }
        }
    }
    later
}

/// Whether a 512-byte sector that `[from, to)` overlaps holds only zeros from `from`
/// on: a sector of a write that never reached the disk.
fn lost_sector(bytes: &[u8], from: usize, to: usize) -> bool {
    const SECTOR: usize = 512;
    let first = from / SECTOR * SECTOR;
    (first..to.min(bytes.len())).step_by(SECTOR).any(|sector| {
        bytes[sector.max(from)..(sector + SECTOR).min(bytes.len())]
            .iter()
            .all(|&b| b == 0)
    })
}

fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("{first_lsn:020}{SEGMENT_SUFFIX}"))
}

/// The segments in `dir`, oldest first; `bytes` is each file's length until a scan
/// says how much of it is in use.
fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let Some(first_lsn) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let path = entry.path();
        if first_lsn == 0 || first_lsn > MAX_LSN {
            let reason = "the segment's name is not a valid first lsn".to_owned();
            return Err(JournalError::Corrupt {
                segment: path,
                offset: 0,
                reason,
            });
        }
        let bytes = entry.metadata().map_err(io_error(&path))?.len();
        segments.push(Segment {
            first_lsn,
            path,
            bytes,
            preallocated: false,
            format: Format::V2,
        });
    }
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

fn create_segment(dir: &Path, first_lsn: Lsn) -> Result<Segment> {
    let path = segment_path(dir, first_lsn);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error(&path))?;
    let written = file
        .write_all(record::MAGIC)
        .and_then(|()| file.sync_data())
        .map_err(io_error(&path));
    if let Err(e) = written.and_then(|()| sync_dir(dir)) {
        // A half-made segment would make every later attempt fail on its name.
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(Segment {
        first_lsn,
        path,
        bytes: record::MAGIC.len() as u64,
        preallocated: false,
        format: Format::V2,
    })
}

/// Makes the segment end at `offset`, where its written bytes ended at `extent`: a
/// file with nothing after them is cut short; a preallocated one keeps its length
/// and gets zeros (which read as the end) over the bytes given up.
fn cut_off(path: &Path, offset: u64, extent: u64) -> Result<()> {
    let file = OpenOptions::new().write(true).open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    if extent >= len {
        file.set_len(offset).map_err(io_error(path))?;
        return file.sync_all().map_err(io_error(path));
    }
    let zeros = vec![0; extent.saturating_sub(offset) as usize];
    file.write_all_at(&zeros, offset)
        .and_then(|()| file.sync_data())
        .map_err(io_error(path))
}

/// The zero-filled file that becomes the next segment, prepared on a thread of its
/// own so that a roll costs a rename.
struct Spare {
    path: PathBuf,
    segment_bytes: u64,
    state: SpareState,
}

enum SpareState {
    Ready,
    Preparing(Preparing),
    /// The last preparation failed.
    Missing,
}

struct Preparing {
    thread: JoinHandle<io::Result<()>>,
    cancel: Arc<AtomicBool>,
}

impl Spare {
    /// Takes over a spare left by an earlier run, or starts preparing one.
    fn start(dir: &Path, segment_bytes: u64) -> Self {
        let path = dir.join(SPARE_FILE);
        let complete = fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == segment_bytes);
        let mut spare = Self {
            path,
            segment_bytes,
            state: SpareState::Ready,
        };
        if !complete {
            spare.prepare();
        }
        spare
    }

    /// Starts filling a new spare. A failure here only means the next segment is
    /// a plain one, so it is not an error of the journal's.
    fn prepare(&mut self) {
        let dir = self.path.parent().expect("the spare lives in the journal's directory");
        let tmp = dir.join(SPARE_TMP_FILE);
        let cancel = Arc::new(AtomicBool::new(false));
        let (path, stop, segment_bytes) = (self.path.clone(), cancel.clone(), self.segment_bytes);
        let thread = std::thread::Builder::new()
            .name("bbx-journal-spare".into())
            .spawn(move || fill_spare(&tmp, &path, segment_bytes, &stop));
        self.state = match thread {
            Ok(thread) => SpareState::Preparing(Preparing { thread, cancel }),
            Err(_) => SpareState::Missing,
        };
    }

    /// Whether the spare can be taken now (no system call: checked on appends).
    fn ready(&mut self) -> bool {
        if let SpareState::Preparing(preparing) = &self.state
            && preparing.thread.is_finished()
        {
            let SpareState::Preparing(finished) = std::mem::replace(&mut self.state, SpareState::Missing) else {
                unreachable!("matched above")
            };
            if matches!(finished.thread.join(), Ok(Ok(()))) {
                self.state = SpareState::Ready;
            }
        }
        matches!(self.state, SpareState::Ready)
    }

    /// Renames the spare to `segment` if it is ready, and starts the next one. After
    /// a failed preparation it starts another and answers `false`: the caller makes
    /// a plain segment this time.
    fn take(&mut self, segment: &Path) -> bool {
        if !self.ready() {
            if matches!(self.state, SpareState::Missing) {
                self.prepare();
            }
            return false;
        }
        // Nothing changed if the rename failed: the caller makes a plain segment.
        let taken = fs::rename(&self.path, segment).is_ok();
        self.prepare();
        taken
    }
}

impl Drop for Spare {
    /// Stops a preparation midway, so nothing writes in the directory afterwards.
    fn drop(&mut self) {
        if let SpareState::Preparing(preparing) = std::mem::replace(&mut self.state, SpareState::Missing) {
            preparing.cancel.store(true, Ordering::Relaxed);
            let _ = preparing.thread.join();
        }
    }
}

/// Writes the magic and zeros up to `segment_bytes` to `tmp`, syncs it and renames it
/// to `spare`: a spare exists only whole.
fn fill_spare(tmp: &Path, spare: &Path, segment_bytes: u64, cancel: &AtomicBool) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    // Synced every few chunks, so that dropping the journal waits for at most that
    // much, and the disk never has the whole segment queued in front of the
    // journal's own syncs.
    const CHUNKS_PER_SYNC: u64 = 8;
    // Whatever an earlier run left half-made or of another size.
    for stale in [tmp, spare] {
        match fs::remove_file(stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let mut file = File::create(tmp)?;
    file.write_all(record::MAGIC)?;
    let zeros = vec![0; CHUNK];
    let mut left = segment_bytes.saturating_sub(record::MAGIC.len() as u64);
    let mut chunks = 0u64;
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            drop(file);
            return fs::remove_file(tmp);
        }
        let n = left.min(CHUNK as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
        chunks += 1;
        if chunks.is_multiple_of(CHUNKS_PER_SYNC) {
            file.sync_data()?;
        }
    }
    file.sync_all()?;
    fs::rename(tmp, spare)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

fn read_checkpoint(dir: &Path) -> Result<Lsn> {
    let path = dir.join(CHECKPOINT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| JournalError::Corrupt {
            segment: path.clone(),
            offset: 0,
            reason: format!("checkpoint file holds {:?}, not an lsn", text.trim()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// Temp file, fsync, rename, fsync the directory: the checkpoint is old or new,
/// never half-written.
fn write_checkpoint(dir: &Path, lsn: Lsn) -> Result<()> {
    let path = dir.join(CHECKPOINT_FILE);
    let tmp = dir.join("checkpoint.tmp");
    let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(format!("{lsn}\n").as_bytes()).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_error(&path))?;
    sync_dir(dir)
}

/// What [`verify`] found, without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    pub checkpoint_lsn: Lsn,
    /// The first bad record, if any, and what lies beyond it.
    pub problem: Option<VerifyProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// A torn write at the very end, which opening the journal cuts off by itself.
    pub torn_tail: bool,
    /// Bytes from the bad record to the end of the journal: what `repair` drops.
    pub bytes_after: u64,
}

/// Checks every segment and record; changes nothing.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let segments = list_segments(dir)?;
    let mut report = VerifyReport {
        segments: segments.len(),
        records: 0,
        first_lsn: None,
        last_lsn: None,
        checkpoint_lsn: read_checkpoint(dir)?,
        problem: None,
    };
    let mut expected = segments.first().map_or(1, |s| s.first_lsn);
    for index in 0..segments.len() {
        let segment = &segments[index];
        let next_first = segments.get(index + 1).map(|s| s.first_lsn);
        let scan = scan_segment(segment, expected, next_first)?;
        if let (Some(first), Some(last)) = (scan.records.first(), scan.records.last()) {
            report.first_lsn.get_or_insert(first.0);
            report.last_lsn = Some(last.0);
        }
        report.records += scan.records.len() as u64;
        expected = segment.first_lsn + scan.records.len() as u64;
        if let Some(problem) = scan.problem {
            let mut later = 0;
            for segment in &segments[index + 1..] {
                later += file_extent(&segment.path)?;
            }
            report.problem = Some(VerifyProblem {
                segment: segment.path.clone(),
                offset: problem.offset,
                reason: problem.reason,
                torn_tail: problem.torn && index + 1 == segments.len(),
                bytes_after: scan.extent.saturating_sub(problem.offset) + later,
            });
            break;
        }
    }
    Ok(report)
}

/// Truncates the journal at its first bad record, deleting every later segment, so
/// that it opens again. Returns what [`verify`] saw before the repair.
pub fn repair(dir: &Path) -> Result<VerifyReport> {
    let report = verify(dir)?;
    if let Some(problem) = &report.problem {
        cut_off(&problem.segment, problem.offset, file_extent(&problem.segment)?)?;
        for segment in list_segments(dir)?.into_iter().filter(|s| s.path > problem.segment) {
            fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
        }
        if problem.offset == 0 {
            // Nothing of that segment was readable: drop it and let the journal start
            // a fresh one where the valid records end.
            fs::remove_file(&problem.segment).map_err(io_error(&problem.segment))?;
        }
        // New records continue after the last valid one; a checkpoint beyond it would
        // hide them on the next open.
        let resume_at = match report.last_lsn {
            Some(lsn) => lsn + 1,
            None => list_segments(dir)?.first().map_or(1, |s| s.first_lsn),
        };
        if report.checkpoint_lsn > resume_at {
            write_checkpoint(dir, resume_at)?;
        }
        sync_dir(dir)?;
    }
    Ok(report)
}
