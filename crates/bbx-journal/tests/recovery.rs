//! The journal on real files: round trips, crashes, torn tails, corruption, repair.

use bbx_journal::record::{Format, HEADER};
use bbx_journal::{Journal, JournalError, JournalOptions, Record, read_history, repair, verify};
use proptest::prelude::*;
use std::fs;
use std::path::{Path, PathBuf};

/// Small appended-to segments: their files end where their records end.
fn small() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        preallocate: false,
        ..Default::default()
    }
}

/// Small segments, zero-filled ahead of need.
fn small_preallocated() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        preallocate: true,
        ..Default::default()
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
        ..Default::default()
    }
}

/// Runs a journal in `dir` until its spare is ready, as a previous run would leave
/// it, so that the next one writes its first record into a preallocated segment.
fn leave_a_spare(dir: &Path, options: &JournalOptions) {
    let (mut journal, _) = Journal::open(dir, options.clone()).unwrap();
    wait_for_spare(&mut journal);
}

/// Waits until the journal has a spare segment ready.
fn wait_for_spare(journal: &mut Journal) {
    for _ in 0..2000 {
        if journal.spare_ready() {
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
    let last_record = (HEADER + written.last().unwrap().payload.len()) as u64;
    for cut in [1, 5, HEADER as u64, last_record - 1] {
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
            wait_for_spare(&mut journal);
        }
    }
    journal.sync().unwrap();
    assert_eq!(
        journal.status().bytes,
        written.iter().map(|p| (HEADER + p.len()) as u64).sum::<u64>() + 8 * journal.status().segments as u64
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
    let options = small_preallocated();
    let written = write_with(dir.path(), 300, options.clone());
    assert!(
        segments(dir.path())
            .iter()
            .all(|p| fs::metadata(p).unwrap().len() < 4096)
    );
    // Once the obstacle is gone, the next roll's preparation succeeds.
    fs::remove_dir_all(dir.path().join("spare.tmp")).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), options.clone()).unwrap();
    assert_eq!(recovery.records, written);
    wait_for_spare(&mut journal);
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
    let last_record = (HEADER + payload(10).len()) as u64;
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
    let offset = 8 + HEADER + payload(1).len() + HEADER + 4; // inside the second record's payload
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
    assert_eq!(*at, (8 + HEADER + payload(1).len()) as u64);
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
    let third = 8 + HEADER + payload(1).len() + HEADER + payload(2).len();
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

/// History: segments behind the checkpoint stay readable for as long as asked,
/// are not replayed (not even read) at open, and go once they age out or exceed
/// their byte budget, oldest first.
#[test]
fn history_keeps_what_recovery_no_longer_replays_until_it_ages_out() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 400);
    let keep = JournalOptions {
        history: std::time::Duration::from_secs(3600),
        ..small()
    };
    let before = segments(dir.path()).len();
    let (mut journal, _) = Journal::open(dir.path(), keep.clone()).unwrap();
    assert_eq!(journal.checkpoint(250).unwrap(), 0, "the history keeps every segment");
    drop(journal);
    let (mut journal, recovery) = Journal::open(dir.path(), keep.clone()).unwrap();
    assert_eq!(recovery.records, written[249..], "history is not replayed");
    assert_eq!(read_history(dir.path(), 1).unwrap(), written);
    assert_eq!(read_history(dir.path(), 120).unwrap(), written[119..]);
    // Appending goes on after a start that skipped the history.
    let lsn = journal.append(b"after").unwrap();
    journal.sync().unwrap();
    assert_eq!(lsn, 401);

    // An hour later the history has aged out: every segment behind the
    // checkpoint goes, and what is replayed is untouched.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3601);
    let pruned = journal.prune_history(later).unwrap();
    assert!(pruned > 0 && segments(dir.path()).len() == before - pruned);
    assert!(read_history(dir.path(), 1).unwrap()[0].lsn > 1);
    drop(journal);
    let (_, recovery) = Journal::open(dir.path(), keep).unwrap();
    assert_eq!(recovery.records[..151], written[249..]);

    // A byte budget keeps the newest history that fits.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 400);
    let budget = JournalOptions {
        history: std::time::Duration::from_secs(3600),
        history_bytes: 4096 * 2,
        ..small()
    };
    let (mut journal, _) = Journal::open(dir.path(), budget).unwrap();
    journal.checkpoint(350).unwrap();
    let kept = read_history(dir.path(), 1).unwrap();
    assert!(kept[0].lsn > 1 && kept[0].lsn < 350, "the newest history is kept");
    // The segments wholly behind the checkpoint: each but the one the checkpoint falls in.
    let files = segments(dir.path());
    let firsts: Vec<u64> = files
        .iter()
        .map(|path| {
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let behind: u64 = files
        .iter()
        .zip(firsts.iter().skip(1))
        .filter(|(_, next)| **next <= 350)
        .map(|(path, _)| fs::metadata(path).unwrap().len())
        .sum();
    assert!(behind <= 4096 * 2, "{behind} bytes of history kept");
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
    bytes[8 + HEADER] ^= 0xff;
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

/// How many of a segment's records, which ended at `ends` in its bytes `before`,
/// are still there byte for byte, in order from the first, in its bytes `after`.
fn unchanged_records(before: &[u8], after: &[u8], ends: &[usize]) -> usize {
    let starts = std::iter::once(8).chain(ends.iter().copied());
    starts
        .zip(ends)
        .take_while(|&(start, &end)| after.get(start..end) == Some(&before[start..end]))
        .count()
}

/// Offsets where the records of a segment's bytes end, in order.
fn record_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut offset = 8.min(bytes.len());
    while let bbx_journal::record::Decoded::Record { next, .. } = bbx_journal::record::decode(Format::V2, bytes, offset)
    {
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
        // A record whose lost bytes were zeros anyway (a group lsn's high bytes, at
        // the end of an empty record) lost nothing.
        let whole_before_cut = unchanged_records(&bytes, &fs::read(&last).unwrap(), &ends);

        let (_, recovery) = Journal::open(dir.path(), options).unwrap();
        prop_assert_eq!(recovery.records.len(), in_earlier_segments + whole_before_cut, "cut at {}", cut_at);
        for (i, record) in recovery.records.iter().enumerate() {
            prop_assert_eq!(record.lsn, i as u64 + 1);
            prop_assert_eq!(&record.payload, &written[i]);
        }
    }

    /// A sector of the last sync's write that never reached a preallocated segment,
    /// while the sectors after it did, costs exactly the records from the first one
    /// it damaged on, never a record of an earlier sync.
    #[test]
    fn a_lost_sector_of_the_last_sync_loses_that_sync_from_the_hole_on(
        groups in proptest::collection::vec(proptest::collection::vec(0usize..300, 1..12), 1..6),
        sector in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let options = medium_preallocated();
        leave_a_spare(dir.path(), &options);
        let (mut journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
        let mut written = Vec::new();
        for sizes in &groups {
            for size in sizes {
                let payload = vec![(written.len() % 250) as u8 + 1; *size];
                journal.append(&payload).unwrap();
                written.push(payload);
            }
            journal.sync().unwrap();
        }
        drop(journal);
        let segment = segments(dir.path()).pop().unwrap();
        let before = fs::read(&segment).unwrap();
        let ends = record_ends(&before);
        prop_assert_eq!(ends.len(), written.len(), "one preallocated segment holds them all");
        let earlier = written.len() - groups.last().unwrap().len();
        let last_sync_from = if earlier == 0 { 8 } else { ends[earlier - 1] };
        let last_sync_to = *ends.last().unwrap();
        // The sector's part inside the last sync's write: the rest of it held an
        // earlier sync's records, which were on disk already.
        let first_sector = last_sync_from / 512;
        let sectors = (last_sync_to - 1) / 512 - first_sector + 1;
        let lost = (first_sector + sector.index(sectors)) * 512;
        let from = lost.max(last_sync_from);
        zero(&segment, from, lost + 512 - from);
        let intact = unchanged_records(&before, &fs::read(&segment).unwrap(), &ends);

        let (_, recovery) = Journal::open(dir.path(), options).unwrap();
        prop_assert!(recovery.records.len() >= earlier);
        prop_assert_eq!(recovery.records.len(), intact);
        for (record, payload) in recovery.records.iter().zip(&written) {
            prop_assert_eq!(&record.payload, payload);
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

/// Writes `groups` syncs of `per_group` records of 100 bytes into one preallocated
/// segment; returns the segment and where each record starts.
fn write_groups(dir: &Path, groups: u64, per_group: u64) -> (PathBuf, Vec<usize>) {
    let options = medium_preallocated();
    leave_a_spare(dir, &options);
    let (mut journal, _) = Journal::open(dir, options).unwrap();
    for g in 0..groups {
        for i in 0..per_group {
            journal.append(&[b'a' + (g * per_group + i) as u8 % 26; 100]).unwrap();
        }
        journal.sync().unwrap();
    }
    drop(journal);
    let only = segments(dir).pop().unwrap();
    let bytes = fs::read(&only).unwrap();
    let mut starts = vec![8];
    starts.extend(record_ends(&bytes));
    starts.pop();
    (only, starts)
}

fn zero(path: &Path, from: usize, len: usize) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; len], from as u64).unwrap();
}

#[test]
fn a_sector_of_the_last_sync_that_never_arrived_is_a_torn_write_even_with_later_pages_intact() {
    let dir = tempfile::tempdir().unwrap();
    // One synced group of 5 records, then a group of 20 (~2.5 KiB) whose third
    // sector from its start never reached the disk, while the sectors after it did.
    let (segment, starts) = write_groups(dir.path(), 2, 20);
    let second_group = starts[20];
    let hole = (second_group / 512 + 2) * 512;
    zero(&segment, hole, 512);
    let first_damaged = starts.iter().rposition(|&s| s < hole).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), medium_preallocated()).unwrap();
    assert_eq!(
        recovery.records.len(),
        first_damaged,
        "everything before the hole, nothing after it"
    );
    assert!(recovery.records.len() >= 20, "the first sync is whole");
    assert_eq!(recovery.truncated_tail.unwrap().offset, starts[first_damaged] as u64);
    assert_eq!(journal.append(b"next").unwrap(), first_damaged as u64 + 1);
}

#[test]
fn a_hole_in_a_sync_that_a_later_sync_follows_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, starts) = write_groups(dir.path(), 3, 20);
    // A sector inside the second group: the third group was written after the second
    // one's sync returned, so the second group had been acknowledged.
    let hole = (starts[25] / 512 + 1) * 512;
    assert!(hole + 512 < starts[40]);
    zero(&segment, hole, 512);
    let err = Journal::open(dir.path(), medium_preallocated())
        .err()
        .expect("acknowledged records follow");
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
}

#[test]
fn damage_without_a_hole_in_the_last_sync_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, starts) = write_groups(dir.path(), 1, 20);
    // One flipped byte in the fifth record of the only sync: its pages all arrived,
    // so this is damage to acknowledged records, not a torn write.
    let mut bytes = fs::read(&segment).unwrap();
    bytes[starts[4] + HEADER + 10] ^= 0x40;
    fs::write(&segment, &bytes).unwrap();
    let err = Journal::open(dir.path(), medium_preallocated())
        .err()
        .expect("records 6-20 must not be dropped");
    assert!(
        matches!(err, JournalError::Corrupt { offset, .. } if offset == starts[4] as u64),
        "{err}"
    );
}

#[test]
fn stray_bytes_in_the_unused_end_of_a_full_segment_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let written = write(dir.path(), 200);
    let all = segments(dir.path());
    assert!(all.len() > 2);
    // Past the records of a segment that the next one continues.
    let mut bytes = fs::read(&all[0]).unwrap();
    assert!(bytes.len() < 4095);
    bytes.resize(4096, 0);
    bytes[4095] = 0x11;
    fs::write(&all[0], &bytes).unwrap();
    let (_, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records, written);
    assert!(verify(dir.path()).unwrap().problem.is_none());
}

#[test]
fn a_half_made_or_wrong_sized_spare_is_made_again() {
    for leftover in ["spare.tmp", "spare"] {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(leftover), b"BBXWAL").unwrap();
        let (mut journal, _) = Journal::open(dir.path(), medium_preallocated()).unwrap();
        wait_for_spare(&mut journal);
        assert_eq!(
            fs::metadata(dir.path().join("spare")).unwrap().len(),
            64 << 10,
            "{leftover}"
        );
        assert!(!dir.path().join("spare.tmp").exists());
        journal.append(b"one").unwrap();
        journal.sync().unwrap();
        drop(journal);
        assert_eq!(
            Journal::open(dir.path(), medium_preallocated())
                .unwrap()
                .1
                .records
                .len(),
            1
        );
    }
}

#[test]
fn a_journal_of_the_first_format_is_read_and_continued_in_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    // The first format: magic ...\x01, records `len | crc(lsn, payload) | lsn | payload`.
    let mut old = bbx_journal::record::MAGIC_V1.to_vec();
    for lsn in 1..=3u64 {
        let payload = format!("old-{lsn}");
        let mut crc = crc32fast::Hasher::new();
        crc.update(&lsn.to_le_bytes());
        crc.update(payload.as_bytes());
        old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc.finalize().to_le_bytes());
        old.extend_from_slice(&lsn.to_le_bytes());
        old.extend_from_slice(payload.as_bytes());
    }
    fs::write(dir.path().join(format!("{:020}.wal", 1)), &old).unwrap();
    let (mut journal, recovery) = Journal::open(dir.path(), small()).unwrap();
    let payloads: Vec<_> = recovery.records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, [b"old-1".to_vec(), b"old-2".to_vec(), b"old-3".to_vec()]);
    assert_eq!(journal.append(b"new-4").unwrap(), 4);
    journal.sync().unwrap();
    drop(journal);
    assert_eq!(
        segments(dir.path()).len(),
        2,
        "new records go to a segment of the current format"
    );
    assert_eq!(
        fs::read(&segments(dir.path())[0]).unwrap(),
        old,
        "the old segment is left as it was"
    );
    let (_, recovery) = Journal::open(dir.path(), small()).unwrap();
    assert_eq!(recovery.records.len(), 4);
    assert_eq!(recovery.records[3].payload, b"new-4");
}
