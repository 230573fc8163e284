//! The journal on real files: round trips, crashes, torn tails, corruption, repair.

use bbx_journal::{Journal, JournalError, JournalOptions, Record, repair, verify};
use proptest::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};

/// Small appended-to segments: their files end where their records end.
fn small() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        preallocate: false,
    }
}

/// Small segments, zero-filled ahead of need.
fn small_preallocated() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        preallocate: true,
    }
}

/// Where a file's written bytes end (a preallocated file is zeros after them).
fn extent(path: &Path) -> u64 {
    let bytes = fs::read(path).unwrap();
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1)
}

/// Loses everything from `at` on, as a crash can: a file that ends with its records
/// is cut short, a preallocated one gets zeros back.
fn tear(path: &Path, at: u64) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    if extent(path) == len {
        file.set_len(at).unwrap();
    } else {
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; (len - at) as usize], at).unwrap();
    }
}

/// Segments large enough to hold many records, zero-filled ahead of need.
fn medium_preallocated() -> JournalOptions {
    JournalOptions {
        segment_bytes: 64 << 10,
        preallocate: true,
    }
}

/// Runs a journal in `dir` until its spare is ready, as a previous run would leave
/// it, so that the next one writes its first record into a preallocated segment.
fn leave_a_spare(dir: &Path, options: &JournalOptions) {
    let (journal, _) = Journal::open(dir, options.clone()).unwrap();
    wait_for_spare(dir);
    drop(journal);
}

/// Waits until the journal in `dir` has a spare segment ready.
fn wait_for_spare(dir: &Path) {
    let spare = dir.join("spare");
    for _ in 0..2000 {
        if spare.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no spare segment after 10 s");
}

fn payload(i: u64) -> Vec<u8> {
    format!("op-{i}-{}", "x".repeat((i % 97) as usize)).into_bytes()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    paths.sort();
    paths
}

fn write(dir: &Path, count: u64) -> Vec<Record> {
    write_with(dir, count, small())
}

fn write_with(dir: &Path, count: u64, options: JournalOptions) -> Vec<Record> {
    let (mut journal, _) = Journal::open(dir, options).unwrap();
    let mut written = Vec::new();
    for i in 1..=count {
        let lsn = journal.append(&payload(i)).unwrap();
        written.push(Record {
            lsn,
            payload: payload(i),
        });
        if i % 7 == 0 {
            journal.sync().unwrap();
        }
    }
    journal.sync().unwrap();
    written
}

#[test]
fn synced_records_come_back_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 500);
    assert!(segments(dir.path()).len() > 5, "small segments roll over");
    let (journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written);
    assert!(recovery.truncated_tail.is_none());
    assert_eq!(journal.status().next_lsn, 501);
    assert_eq!(journal.status().synced_lsn, 500);
}

#[test]
fn unsynced_records_are_not_invented_and_numbering_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), small()).unwrap();
    journal.append(b"durable").unwrap();
    journal.sync().unwrap();
    journal.append(b"lost in the crash").unwrap();
    drop(journal); // a crash: the buffer never reached the file
    let (mut journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(
        recovery.records,
        vec![Record {
            lsn: 1,
            payload: b"durable".to_vec()
        }]
    );
    assert_eq!(journal.append(b"next").unwrap(), 2);
}

#[test]
fn a_torn_tail_is_cut_off_and_the_journal_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 40);
    let last = segments(dir.path()).pop().unwrap();
    let full = fs::metadata(&last).unwrap().len();
    let last_record = 16 + written.last().unwrap().payload.len() as u64;
    for cut in [1, 5, 16, last_record - 1] {
        let copy = tempfile::tempdir().unwrap();
        for path in segments(dir.path()) {
            fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
        let torn = copy.path().join(last.file_name().unwrap());
        fs::OpenOptions::new()
            .write(true)
            .open(&torn)
            .unwrap()
            .set_len(full - cut)
            .unwrap();

        let (mut journal, recovery) = Journal::open(copy.path(), small()).unwrap();
        assert_eq!(recovery.records, written[..written.len() - 1], "cut {cut}");
        let tail = recovery.truncated_tail.expect("the torn record is reported");
        assert_eq!(tail.bytes, last_record - cut);
        assert_eq!(journal.append(b"after").unwrap(), 40, "the torn lsn is reused");
        // Enough more to roll into new segments after the repaired one.
        for i in 0..100 {
            journal.append(&payload(i)).unwrap();
        }
        journal.sync().unwrap();
        drop(journal);
        let (_, again) = Journal::open(copy.path(), small()).unwrap();
        assert_eq!(again.records.len(), 39 + 1 + 100);
        assert_eq!(again.records[39].payload, b"after");
        assert!(again.records.windows(2).all(|w| w[0].lsn + 1 == w[1].lsn));
        assert!(again.truncated_tail.is_none());
    }
}

#[test]
fn zeros_after_the_last_record_are_the_end_and_are_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 3);
    let last = segments(dir.path()).pop().unwrap();
    let mut file = fs::OpenOptions::new().append(true).open(&last).unwrap();
    // Zero-filled space after a crash can be large; recovery must not decode it byte
    // by byte.
    std::io::Write::write_all(&mut file, &vec![0u8; 8 << 20]).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written);
    assert!(recovery.truncated_tail.is_none());
    assert_eq!(journal.append(b"four").unwrap(), 4);
    journal.sync().unwrap();
    drop(journal);
    let (_, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records.len(), 4);
    assert_eq!(recovery.records[3].payload, b"four");
}

#[test]
fn records_go_to_preallocated_segments_once_a_spare_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let options = medium_preallocated();
    leave_a_spare(dir.path(), &options);
    let spare_made = fs::metadata(dir.path().join("spare")).unwrap().modified().unwrap();
    // A restart takes over the spare the last run left instead of making another.
    let (mut journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
    assert_eq!(
        fs::metadata(dir.path().join("spare")).unwrap().modified().unwrap(),
        spare_made
    );
    let mut written = Vec::new();
    for i in 1..=2000 {
        journal.append(&payload(i)).unwrap();
        written.push(payload(i));
        if i % 50 == 0 {
            journal.sync().unwrap();
            wait_for_spare(dir.path());
        }
    }
    journal.sync().unwrap();
    assert_eq!(
        journal.status().bytes,
        written.iter().map(|p| 16 + p.len() as u64).sum::<u64>() + 8 * journal.status().segments as u64
    );
    drop(journal);
    let all = segments(dir.path());
    assert!(all.len() > 2, "{} segments", all.len());
    for path in &all {
        assert_eq!(
            fs::metadata(path).unwrap().len(),
            64 << 10,
            "{} is preallocated",
            path.display()
        );
    }
    let (journal, recovery) = Journal::open(dir.path(), options).unwrap();
    let payloads: Vec<Vec<u8>> = recovery.records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, written);
    assert!(recovery.truncated_tail.is_none());
    assert_eq!(journal.status().next_lsn, 2001);
}

#[test]
fn without_a_spare_the_journal_goes_on_with_plain_segments() {
    let dir = tempfile::tempdir().unwrap();
    // Something that is not a file where the spare is made: every preparation fails.
    fs::create_dir_all(dir.path().join("spare.tmp/blocked")).unwrap();
    let options = JournalOptions {
        segment_bytes: 4096,
        preallocate: true,
    };
    let (mut journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
    let mut written = Vec::new();
    for i in 1..=300 {
        journal.append(&payload(i)).unwrap();
        written.push(payload(i));
        if i % 20 == 0 {
            journal.sync().unwrap();
        }
    }
    journal.sync().unwrap();
    drop(journal);
    assert!(
        segments(dir.path())
            .iter()
            .all(|p| fs::metadata(p).unwrap().len() < 4096)
    );
    // Once the obstacle is gone, the next roll's preparation succeeds.
    fs::remove_dir_all(dir.path().join("spare.tmp")).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), options.clone()).unwrap();
    let payloads: Vec<Vec<u8>> = recovery.records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, written);
    wait_for_spare(dir.path());
    journal.append(b"next").unwrap();
    journal.sync().unwrap();
    drop(journal);
    let last = segments(dir.path()).pop().unwrap();
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        4096,
        "the newest segment is preallocated"
    );
    assert_eq!(Journal::open(dir.path(), options).unwrap().1.records.len(), 301);
}

#[test]
fn a_torn_write_into_a_preallocated_segment_is_cut_off_and_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let options = medium_preallocated();
    leave_a_spare(dir.path(), &options);
    let (mut journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
    for i in 1..=10 {
        journal.append(&payload(i)).unwrap();
    }
    journal.sync().unwrap();
    drop(journal);
    let only = segments(dir.path()).pop().unwrap();
    assert_eq!(fs::metadata(&only).unwrap().len(), 64 << 10);
    // The last record's second half never reached the disk.
    let end = extent(&only);
    let last_record = 16 + payload(10).len() as u64;
    tear(&only, end - last_record / 2);
    let (mut journal, recovery) = Journal::open(dir.path(), options.clone()).unwrap();
    assert_eq!(recovery.records.len(), 9);
    let tail = recovery.truncated_tail.expect("the torn record is reported");
    assert_eq!(tail.offset, end - last_record);
    // Counted to the last byte that is not zero (here, in the record's header).
    assert!(
        tail.bytes > 0 && tail.bytes <= last_record - last_record / 2,
        "{tail:?}"
    );
    assert_eq!(
        fs::metadata(&only).unwrap().len(),
        64 << 10,
        "the segment stays preallocated"
    );
    assert_eq!(journal.append(b"ten again").unwrap(), 10);
    journal.sync().unwrap();
    drop(journal);
    let (_, recovery) = Journal::open(dir.path(), options).unwrap();
    assert_eq!(recovery.records.len(), 10);
    assert_eq!(recovery.records[9].payload, b"ten again");
    assert!(recovery.truncated_tail.is_none());
}

#[test]
fn corruption_in_the_middle_stops_the_open_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 300);
    let first = segments(dir.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    let offset = 8 + 16 + payload(1).len() + 20; // inside the second record's payload
    bytes[offset] ^= 0xff;
    fs::write(&first, &bytes).unwrap();

    let err = Journal::open(dir.path(), small())
        .err()
        .expect("a corrupt middle is refused");
    let JournalError::Corrupt {
        segment, offset: at, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(segment, &first);
    assert_eq!(*at, (8 + 16 + payload(1).len()) as u64);
    assert!(err.to_string().contains("bbx journal repair"));

    let report = verify(dir.path()).unwrap();
    let problem = report.problem.expect("verify names the problem");
    assert!(!problem.torn_tail);
    assert_eq!(report.records, 1, "one record precedes the damage");
    assert!(problem.bytes_after > 0);
    assert_eq!(
        verify(dir.path()).unwrap().segments,
        segments(dir.path()).len(),
        "verify changes nothing"
    );

    repair(dir.path()).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written[..1]);
    assert_eq!(journal.append(b"resumed").unwrap(), 2);
    assert!(verify(dir.path()).unwrap().problem.is_none());
}

#[test]
fn a_damaged_length_in_the_last_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
    for i in 1..=10 {
        journal.append(&payload(i)).unwrap();
    }
    journal.sync().unwrap();
    drop(journal);
    let only = segments(dir.path()).remove(0);
    let mut bytes = fs::read(&only).unwrap();
    // The third record's length field now claims far more than the file holds.
    let third = 8 + 16 + payload(1).len() + 16 + payload(2).len();
    bytes[third + 3] = 0x7f;
    fs::write(&only, &bytes).unwrap();
    let err = Journal::open(dir.path(), JournalOptions::default())
        .err()
        .expect("records 4-10 must not be dropped silently");
    assert!(
        matches!(err, JournalError::Corrupt { offset, .. } if offset == third as u64),
        "{err}"
    );
    assert!(!verify(dir.path()).unwrap().problem.unwrap().torn_tail);
}

#[test]
fn checkpoints_recycle_segments_and_hide_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 400);
    let before = segments(dir.path()).len();
    let (mut journal, _) = Journal::open(dir.path(), small()).unwrap();
    let removed = journal.checkpoint(250).unwrap();
    assert!(removed > 0 && segments(dir.path()).len() == before - removed);
    assert_eq!(journal.status().checkpoint_lsn, 250);
    // Checkpoints never pass what is synced, and never go back.
    assert_eq!(journal.checkpoint(100).unwrap(), 0);
    drop(journal);
    let (journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written[249..]);
    assert_eq!(journal.status().checkpoint_lsn, 250);
}

#[test]
fn repair_below_the_checkpoint_keeps_new_records_visible() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 400);
    let (mut journal, _) = Journal::open(dir.path(), small()).unwrap();
    journal.checkpoint(250).unwrap();
    drop(journal);
    // Damage the first record of the oldest remaining segment, which precedes lsn 250.
    let oldest = segments(dir.path()).remove(0);
    let mut bytes = fs::read(&oldest).unwrap();
    bytes[8 + 16] ^= 0xff;
    fs::write(&oldest, &bytes).unwrap();
    assert!(Journal::open(dir.path(), small()).is_err());

    repair(dir.path()).unwrap();
    let (mut journal, _) = Journal::open(dir.path(), small()).unwrap();
    let lsn = journal.append(b"new").unwrap();
    journal.sync().unwrap();
    drop(journal);
    let (_, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(
        recovery.records,
        vec![Record {
            lsn,
            payload: b"new".to_vec()
        }]
    );
}

#[test]
fn oversized_records_are_refused_without_effect() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), small()).unwrap();
    assert!(matches!(
        journal.append(&vec![0; 5000]),
        Err(JournalError::RecordTooLarge { .. })
    ));
    assert_eq!(journal.append(b"fits").unwrap(), 1);
}

#[test]
fn a_segment_torn_at_creation_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 5);
    // A crash right after creating the next segment, before its magic was written.
    fs::write(dir.path().join(format!("{:020}.wal", 6)), b"BBX").unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written);
    assert_eq!(journal.append(b"six").unwrap(), 6);
    journal.sync().unwrap();
    drop(journal);
    assert_eq!(Journal::open(dir.path(), small()).unwrap().1.records.len(), 6);
}

/// Offsets where the records of a segment's bytes end, in order.
fn record_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut offset = 8.min(bytes.len());
    while let bbx_journal::record::Decoded::Record { next, .. } = bbx_journal::record::decode(bytes, offset) {
        ends.push(next);
        offset = next;
    }
    ends
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Cutting the journal anywhere gives back exactly the records that ended before
    /// the cut: never fewer, never a damaged, reordered or invented one.
    #[test]
    fn any_truncation_recovers_exactly_the_whole_records(
        sizes in proptest::collection::vec(0usize..300, 1..60),
        cut in any::<prop::sample::Index>(),
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let options = if preallocate { small_preallocated() } else { small() };
        let (mut journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
        let written: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, n)| vec![i as u8; *n]).collect();
        for p in &written {
            journal.append(p).unwrap();
        }
        journal.sync().unwrap();
        drop(journal);
        let last = segments(dir.path()).pop().unwrap();
        let bytes = fs::read(&last).unwrap();
        let ends = record_ends(&bytes);
        let cut_at = cut.index(extent(&last) as usize + 1);
        tear(&last, cut_at as u64);
        let in_earlier_segments = written.len() - ends.len();
        let whole_before_cut = ends.iter().filter(|&&end| end <= cut_at).count();

        let (_, recovery) = Journal::open(dir.path(), options).unwrap();
        prop_assert_eq!(recovery.records.len(), in_earlier_segments + whole_before_cut, "cut at {}", cut_at);
        for (i, record) in recovery.records.iter().enumerate() {
            prop_assert_eq!(record.lsn, i as u64 + 1);
            prop_assert_eq!(&record.payload, &written[i]);
        }
    }

    /// A flipped byte anywhere is either refused or, at the very end, cut off as a
    /// torn write; a changed payload never comes back as if it were valid.
    #[test]
    fn a_flipped_byte_is_never_served(
        count in 2u64..80,
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let options = if preallocate { small_preallocated() } else { small() };
        let written = write_with(dir.path(), count, options.clone());
        let all = segments(dir.path());
        let sizes: Vec<u64> = all.iter().map(|p| extent(p)).collect();
        let mut at = position.index(sizes.iter().sum::<u64>() as usize) as u64;
        let mut target = 0;
        while at >= sizes[target] {
            at -= sizes[target];
            target += 1;
        }
        let mut bytes = fs::read(&all[target]).unwrap();
        bytes[at as usize] ^= 1 << bit;
        fs::write(&all[target], &bytes).unwrap();

        match Journal::open(dir.path(), options) {
            Err(JournalError::Corrupt { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error: {}", other),
                        Ok((_, recovery)) => {
                // Only a damaged last record may be taken for a torn write.
                prop_assert!(recovery.records.len() + 1 >= written.len());
                prop_assert_eq!(&recovery.records[..], &written[..recovery.records.len()]);
            }
        }
    }
}
