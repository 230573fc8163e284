//! `bbx journal verify` and `bbx journal repair`: the journal of a data directory,
//! checked record by record, offline or beside a running kernel.

use super::*;

/// What `bbx journal verify` and `bbx journal repair` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalCheck {
    pub directory: PathBuf,
    pub segments: usize,
    pub records: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    pub checkpoint_lsn: u64,
    /// The first bad record, if any.
    pub problem: Option<JournalProblem>,
    /// Whether this run changed the journal.
    pub repaired: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct JournalProblem {
    pub segment: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// A torn last write, which the kernel cuts off by itself when it starts.
    pub torn_tail: bool,
    /// Bytes from the bad record to the end: what a repair drops.
    pub bytes_after: u64,
}

/// Checks the journal of a data directory record by record; changes nothing, and is
/// safe while a kernel runs.
pub fn verify_journal(data_dir: &Path) -> Result<JournalCheck> {
    let dir = data_dir.join(JOURNAL_DIR);
    let report = bbx_journal::verify(&dir).map_err(|e| Error::unavailable(e.to_string()))?;
    Ok(journal_check(dir, report, false))
}

/// Truncates the journal at its first bad record so the kernel starts again. The
/// ops in the dropped records are lost, which is why this is an operator's decision
/// and never automatic. Refused while a kernel holds the data directory.
pub fn repair_journal(data_dir: &Path) -> Result<JournalCheck> {
    let _lock = bbx_store::open_database(&data_dir.join("db"))?;
    let dir = data_dir.join(JOURNAL_DIR);
    let report = bbx_journal::repair(&dir).map_err(|e| Error::unavailable(e.to_string()))?;
    let repaired = report.problem.is_some();
    Ok(journal_check(dir, report, repaired))
}

fn journal_check(directory: PathBuf, report: bbx_journal::VerifyReport, repaired: bool) -> JournalCheck {
    JournalCheck {
        directory,
        segments: report.segments,
        records: report.records,
        first_lsn: report.first_lsn,
        last_lsn: report.last_lsn,
        checkpoint_lsn: report.checkpoint_lsn,
        problem: report.problem.map(|p| JournalProblem {
            segment: p.segment,
            offset: p.offset,
            reason: p.reason,
            torn_tail: p.torn_tail,
            bytes_after: p.bytes_after,
        }),
        repaired,
    }
}
