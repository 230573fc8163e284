//! Store writes as journal records: the one write-ahead log behind the store.
//!
//! The committer does not `fdatasync` the store. It turns each group's staged
//! writes into redo records, appends them to the journal (sharing the journal's
//! group commit with op acceptances, so the disk sees one stream of syncs), and
//! applies them to the store only once they are durable there. The store therefore
//! never holds a write the journal lacks, and after a crash replaying the redo
//! records from the checkpoint on, in order, rebuilds exactly the acknowledged
//! state: each record sets keys to absolute values, so replaying one the store
//! already has changes nothing. The store is made durable in the background (a
//! checkpoint), and only then may the journal drop the records.
//!
//! A record opens with its own tag, which no ring entry starts with (a JSON entry
//! starts with `{`, a compact one with 1): then whether it starts and whether it
//! ends its group, and (in a group's first record) the time the group was
//! committed, in microseconds since the Unix epoch, then `(keyspace, key,
//! value or removal)` triples. The time is what a point-in-time recovery
//! replays history up to ([`history`]); records written before it existed
//! have none. A group larger than one record is split into
//! consecutive records; only a group whose records are all there is replayed. A
//! group can lack its end only because a crash tore it (a segment roll syncs the
//! first part of a group early); it was never acknowledged nor applied, so it is
//! dropped, even when records written after the restart follow it.

use bbx_core::{Error, Result};

/// The first byte of a redo record.
const TAG: u8 = 0xB5;
/// Header: tag and the group flags.
const HEADER: usize = 2;
/// The record starts its group.
const FIRST: u8 = 2;
/// The record ends its group.
const LAST: u8 = 1;
/// The record carries its group's commit time (8 bytes after the header).
const STAMPED: u8 = 4;

/// One staged write: keyspace index, key, and the new value (`None` removes it).
pub(crate) type RedoWrite = (u8, Vec<u8>, Option<Vec<u8>>);

/// Whether a journal record is a store redo record (and not a ring entry).
pub fn is_redo(payload: &[u8]) -> bool {
    payload.first() == Some(&TAG)
}

fn write_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn framed_len(key: &[u8], value: Option<&[u8]>) -> usize {
    1 + 4 + key.len() + 1 + value.map_or(0, |v| 4 + v.len())
}

/// Encodes a group's writes, committed at `stamp` (microseconds since the Unix
/// epoch), as records of about `part_bytes` each (a single write larger than
/// that gets a record of its own). Fails, touching nothing, if a write could not
/// fit in a record of `max_record` bytes.
pub(crate) fn encode<'a>(
    writes: impl Iterator<Item = (u8, &'a [u8], Option<&'a [u8]>)> + Clone,
    stamp: u64,
    part_bytes: usize,
    max_record: usize,
) -> Result<Vec<Vec<u8>>> {
    // Each record is sized once: grown by doubling, a group's record was
    // reallocated a dozen times, into memory the allocator had just taken from the
    // OS: zeroing those pages took a tenth of the committer's time in `bench ring`.
    let mut left: usize = writes.clone().map(|(_, key, value)| framed_len(key, value)).sum();
    let record = |flags: u8, left: usize| {
        let mut record = Vec::with_capacity(HEADER + left.min(part_bytes));
        record.extend_from_slice(&[TAG, flags]);
        record
    };
    let mut records = Vec::new();
    let mut current = record(FIRST | STAMPED, left + 8);
    current.extend_from_slice(&stamp.to_le_bytes());
    for (keyspace, key, value) in writes {
        let size = framed_len(key, value);
        if HEADER + 8 + size > max_record || key.len() > u32::MAX as usize {
            return Err(Error::new(
                bbx_core::ErrorCode::PayloadTooLarge,
                format!("a stored value of {size} bytes does not fit in a journal segment"),
            ));
        }
        if current.len() > body_start(&current) && current.len() + size > part_bytes {
            records.push(std::mem::replace(&mut current, record(0, left)));
        }
        left -= size;
        current.push(keyspace);
        write_len(&mut current, key.len());
        current.extend_from_slice(key);
        match value {
            Some(value) => {
                current.push(1);
                write_len(&mut current, value.len());
                current.extend_from_slice(value);
            }
            None => current.push(0),
        }
    }
    current[1] |= LAST;
    records.push(current);
    Ok(records)
}

/// Reads `len` bytes at `at`, moving it on.
fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8]> {
    let end = at
        .checked_add(len)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| Error::internal("a store redo record in the journal is cut short"))?;
    let taken = &bytes[*at..end];
    *at = end;
    Ok(taken)
}

fn take_len(bytes: &[u8], at: &mut usize) -> Result<usize> {
    let raw = take(bytes, at, 4)?;
    Ok(u32::from_le_bytes(raw.try_into().expect("four bytes")) as usize)
}

/// Where a record's writes start: after its header and its stamp, if any.
fn body_start(record: &[u8]) -> usize {
    if record[1] & STAMPED != 0 { HEADER + 8 } else { HEADER }
}

/// One decoded record.
pub(crate) struct Part {
    pub writes: Vec<RedoWrite>,
    pub first: bool,
    pub last: bool,
    pub stamp: Option<u64>,
}

/// Decodes one record.
pub(crate) fn decode(payload: &[u8]) -> Result<Part> {
    if payload.len() < HEADER || payload[0] != TAG || payload[1] & !(FIRST | LAST | STAMPED) != 0 {
        return Err(Error::internal("a journal record is not a store redo record"));
    }
    let (first, last) = (payload[1] & FIRST != 0, payload[1] & LAST != 0);
    let mut at = HEADER;
    let stamp = if payload[1] & STAMPED != 0 {
        Some(u64::from_le_bytes(
            take(payload, &mut at, 8)?.try_into().expect("eight bytes"),
        ))
    } else {
        None
    };
    let mut writes = Vec::new();
    while at < payload.len() {
        let keyspace = take(payload, &mut at, 1)?[0];
        let len = take_len(payload, &mut at)?;
        let key = take(payload, &mut at, len)?.to_vec();
        let value = match take(payload, &mut at, 1)?[0] {
            0 => None,
            1 => {
                let len = take_len(payload, &mut at)?;
                Some(take(payload, &mut at, len)?.to_vec())
            }
            _ => return Err(Error::internal("a store redo record has a bad write marker")),
        };
        writes.push((keyspace, key, value));
    }
    Ok(Part {
        writes,
        first,
        last,
        stamp,
    })
}

/// Collects whole groups from the journal's records, in order: each item is one
/// group's writes. A group without its end (torn by a crash, wherever later records
/// put it) is dropped: it was never acknowledged, nor applied to the store.
pub(crate) fn groups<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> Result<Vec<Vec<RedoWrite>>> {
    Ok(stamped_groups(payloads.map(|payload| (0, payload)))?
        .into_iter()
        .map(|group| group.writes)
        .collect())
}

/// One whole group of store writes, as the journal's history keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedoGroup {
    /// The lsn of its first record.
    pub lsn: bbx_journal::Lsn,
    /// When it was committed, in microseconds since the Unix epoch (none for a
    /// group journaled before groups carried their time).
    pub stamp: Option<u64>,
    /// (keyspace id, key, new value or `None` for a removal), in order.
    pub writes: Vec<(u8, Vec<u8>, Option<Vec<u8>>)>,
}

/// The whole groups of store writes among journal records (ring entries and
/// torn groups left out), in order: what a point-in-time recovery replays.
pub fn history(records: &[bbx_journal::Record]) -> Result<Vec<RedoGroup>> {
    stamped_groups(records.iter().map(|r| (r.lsn, r.payload.as_slice())))
}

fn stamped_groups<'a>(payloads: impl Iterator<Item = (bbx_journal::Lsn, &'a [u8])>) -> Result<Vec<RedoGroup>> {
    let mut reader = GroupReader::default();
    let mut groups = Vec::new();
    for (lsn, payload) in payloads {
        groups.extend(reader.push(lsn, payload)?);
    }
    Ok(groups)
}

/// Assembles whole groups from journal records fed one at a time.
#[derive(Default)]
pub struct GroupReader {
    open: Option<RedoGroup>,
}

impl GroupReader {
    /// Takes the next record; gives the group it completes, if any.
    pub fn push(&mut self, lsn: bbx_journal::Lsn, payload: &[u8]) -> Result<Option<RedoGroup>> {
        if !is_redo(payload) {
            self.open = None;
            return Ok(None);
        }
        let part = decode(payload)?;
        if part.first {
            self.open = Some(RedoGroup {
                lsn,
                stamp: part.stamp,
                writes: Vec::new(),
            });
        }
        // A continuation with no group open belongs to a torn group whose start
        // was dropped: it goes too.
        let Some(group) = self.open.as_mut() else {
            return Ok(None);
        };
        group.writes.extend(part.writes);
        Ok(if part.last { self.open.take() } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STAMP: u64 = 1_765_000_000_000_000;

    fn staged() -> impl Strategy<Value = RedoWrite> {
        (
            0u8..10,
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        )
    }

    fn encode_all(writes: &[RedoWrite], part_bytes: usize) -> Vec<Vec<u8>> {
        encode(
            writes
                .iter()
                .map(|(k, key, value)| (*k, key.as_slice(), value.as_deref())),
            STAMP,
            part_bytes,
            1 << 20,
        )
        .unwrap()
    }

    proptest! {
        #[test]
        fn groups_round_trip_whatever_the_part_size(
            first in proptest::collection::vec(staged(), 0..30),
            second in proptest::collection::vec(staged(), 1..30),
            part_bytes in 16usize..2048,
        ) {
            let mut records = encode_all(&first, part_bytes);
            records.push(b"{\"entry\":\"accepted\"}".to_vec());
            records.extend(encode_all(&second, part_bytes));
            prop_assert!(records.iter().all(|r| r.len() <= part_bytes.max(HEADER + 8 + 1 + 4 + 40 + 1 + 4 + 300)));
            let replayed = groups(records.iter().map(Vec::as_slice)).unwrap();
            prop_assert_eq!(replayed, vec![first, second]);
        }

        #[test]
        fn a_group_torn_at_the_end_is_dropped(writes in proptest::collection::vec(staged(), 2..30), cut in 1usize..8) {
            let records = encode_all(&writes, 64);
            prop_assume!(records.len() > 1);
            let kept = records.len() - cut.min(records.len() - 1);
            let replayed = groups(records[..kept].iter().map(Vec::as_slice)).unwrap();
            prop_assert!(replayed.is_empty());
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut payload = vec![TAG];
            payload.extend(bytes);
            let _ = decode(&payload);
        }
    }

    #[test]
    fn history_gives_each_group_its_first_lsn_and_commit_time() {
        let writes: Vec<RedoWrite> = (0..6)
            .map(|i| (1, vec![i; 30], (i % 2 == 0).then(|| vec![i; 30])))
            .collect();
        let mut records: Vec<bbx_journal::Record> = Vec::new();
        for (group, stamp) in [(&writes[..3], STAMP), (&writes[3..], STAMP + 7)] {
            let encoded = encode(
                group
                    .iter()
                    .map(|(k, key, value)| (*k, key.as_slice(), value.as_deref())),
                stamp,
                80,
                1 << 20,
            )
            .unwrap();
            for payload in encoded {
                records.push(bbx_journal::Record {
                    lsn: records.len() as u64 + 10,
                    payload,
                });
            }
        }
        let groups = history(&records).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].lsn, groups[0].stamp), (10, Some(STAMP)));
        assert_eq!(groups[1].stamp, Some(STAMP + 7));
        assert!(groups[1].lsn > groups[0].lsn);
        assert_eq!(groups[0].writes, writes[..3]);
        assert_eq!(groups[1].writes, writes[3..]);
    }

    #[test]
    fn a_torn_group_followed_by_later_records_is_dropped_and_later_groups_kept() {
        let torn: Vec<RedoWrite> = (0..10).map(|i| (1, vec![i; 30], Some(vec![i; 30]))).collect();
        let torn = encode_all(&torn, 80);
        assert!(torn.len() > 2);
        let later: Vec<RedoWrite> = vec![(2, b"k".to_vec(), Some(b"v".to_vec()))];
        // Written after a restart: a ring entry, or at once the next group.
        for between in [Some(b"{}".to_vec()), None] {
            let mut records = torn[..2].to_vec();
            records.extend(between.clone());
            records.extend(encode_all(&later, 80));
            let replayed = groups(records.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(replayed, vec![later.clone()], "between: {between:?}");
        }
        // The tail of a torn group, its start already dropped, goes too.
        let replayed = groups(torn[1..].iter().map(Vec::as_slice)).unwrap();
        assert!(replayed.is_empty());
    }

    #[test]
    fn a_write_larger_than_a_segment_is_refused() {
        let big = vec![0u8; 5000];
        let refused = encode(
            [(1u8, b"k".as_slice(), Some(big.as_slice()))].into_iter(),
            STAMP,
            1024,
            4096,
        );
        assert_eq!(refused.unwrap_err().code, bbx_core::ErrorCode::PayloadTooLarge);
    }
}
