//! Record framing inside a segment.
//!
//! A segment starts with an 8-byte magic that names its format, then records, each
//! `len: u32 | crc: u32 | lsn: u64 | group: u64 | payload[len]`, little-endian, where
//! `group` is the lsn of the first record written by the same sync and `crc` is the
//! CRC-32 of lsn, group and payload. The lsn inside every record makes a record that
//! is intact but misplaced (a stale block, a skipped write) detectable, not just a
//! damaged one. The group tells recovery whether intact records after a damaged one
//! were written by the same sync (the pages of one unfinished write can reach a
//! preallocated file in any order, so that is a torn write) or by a later one (the
//! damaged record was synced: corruption). No record is all zeros (lsns start at 1),
//! so zeros where a record would start, up to the end of the file, are the end of the
//! segment: the unused part of a preallocated one.
//!
//! Segments of the first format ([`Format::V1`], without `group`) are still read.

pub const MAGIC: &[u8; 8] = b"BBXWAL\x00\x02";
pub const MAGIC_V1: &[u8; 8] = b"BBXWAL\x00\x01";
pub const HEADER: usize = 24;
const HEADER_V1: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Records without a group: every record counts as its own.
    V1,
    V2,
}

impl Format {
    /// The format a segment's first bytes name, if any.
    pub fn of(segment: &[u8]) -> Option<Self> {
        if segment.starts_with(MAGIC) {
            Some(Self::V2)
        } else if segment.starts_with(MAGIC_V1) {
            Some(Self::V1)
        } else {
            None
        }
    }

    pub fn header(self) -> usize {
        match self {
            Self::V1 => HEADER_V1,
            Self::V2 => HEADER,
        }
    }
}

/// Appends one framed record of the current format to `out`.
pub fn encode(lsn: u64, group: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("callers bound payloads to segment size");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(lsn, Some(group), payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The framed size of a record of the current format.
pub fn framed_len(payload_len: usize) -> usize {
    HEADER + payload_len
}

fn checksum(lsn: u64, group: Option<u64>, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    if let Some(group) = group {
        hasher.update(&group.to_le_bytes());
    }
    hasher.update(payload);
    hasher.finalize()
}

/// What lies at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Record {
        lsn: u64,
        /// The lsn of the first record of its sync (the record's own in V1).
        group: u64,
        payload: &'a [u8],
        next: usize,
    },
    /// The segment ends here: at the end of the file, or only zeros follow.
    End,
    /// Something that is not a valid record. `to_eof` tells whether it runs to the
    /// end of the file or only zeros follow it.
    Bad { reason: &'static str, to_eof: bool },
}

pub fn decode(format: Format, segment: &[u8], offset: usize) -> Decoded<'_> {
    let rest = &segment[offset..];
    if rest.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let header = format.header();
    if rest.len() < header {
        return Decoded::Bad {
            reason: "record header cut short",
            to_eof: true,
        };
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let lsn = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    let group = match format {
        Format::V1 => None,
        Format::V2 => Some(u64::from_le_bytes(rest[16..24].try_into().expect("8 bytes"))),
    };
    let Some(payload) = rest.get(header..header + len) else {
        return Decoded::Bad {
            reason: "record runs past the end of the segment",
            to_eof: true,
        };
    };
    if checksum(lsn, group, payload) != crc {
        let to_eof = rest[header + len..].iter().all(|&b| b == 0);
        return Decoded::Bad {
            reason: "checksum mismatch",
            to_eof,
        };
    }
    Decoded::Record {
        lsn,
        group: group.unwrap_or(lsn),
        payload,
        next: offset + header + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encoded_records_decode_to_themselves(lsn in 1u64.., payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = Vec::new();
            let group = lsn / 2 + 1;
            encode(lsn, group, &payload, &mut buf);
            prop_assert_eq!(buf.len(), framed_len(payload.len()));
            prop_assert_eq!(decode(Format::V2, &buf, 0), Decoded::Record { lsn, group, payload: &payload, next: buf.len() });
            prop_assert_eq!(decode(Format::V2, &buf, buf.len()), Decoded::End);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..256), bit in 0usize..8 * 272) {
            let mut buf = Vec::new();
            encode(7, 5, &payload, &mut buf);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            let intact = matches!(decode(Format::V2, &buf, 0), Decoded::Record { lsn: 7, group: 5, payload: p, .. } if p == payload.as_slice());
            prop_assert!(!intact);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128), offset in 0usize..128) {
            let offset = offset.min(bytes.len());
            let _ = decode(Format::V1, &bytes, offset);
            let _ = decode(Format::V2, &bytes, offset);
        }
    }

    #[test]
    fn zeros_are_the_end_and_a_record_torn_before_them_is_a_possible_torn_write() {
        let mut buf = Vec::new();
        encode(1, 1, b"hello world", &mut buf);
        let end = buf.len();
        buf.resize(end + 64, 0);
        assert_eq!(decode(Format::V2, &buf, end), Decoded::End);
        buf[end - 1] ^= 1;
        assert!(matches!(decode(Format::V2, &buf, 0), Decoded::Bad { to_eof: true, .. }));
        buf[end + 10] = 1;
        assert!(matches!(
            decode(Format::V2, &buf, 0),
            Decoded::Bad { to_eof: false, .. }
        ));
    }

    #[test]
    fn a_cut_record_is_a_possible_torn_write() {
        let mut buf = Vec::new();
        encode(1, 1, b"hello world", &mut buf);
        for cut in 1..buf.len() {
            assert!(
                matches!(decode(Format::V2, &buf[..cut], 0), Decoded::Bad { to_eof: true, .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn first_format_records_still_decode() {
        // len 2 | crc of (lsn 3, "hi") | lsn 3 | "hi"
        let mut buf = Vec::new();
        buf.extend_from_slice(&2u32.to_le_bytes());
        buf.extend_from_slice(&checksum(3, None, b"hi").to_le_bytes());
        buf.extend_from_slice(&3u64.to_le_bytes());
        buf.extend_from_slice(b"hi");
        assert_eq!(
            decode(Format::V1, &buf, 0),
            Decoded::Record {
                lsn: 3,
                group: 3,
                payload: b"hi",
                next: buf.len()
            }
        );
        assert!(matches!(decode(Format::V2, &buf, 0), Decoded::Bad { .. }));
    }
}
