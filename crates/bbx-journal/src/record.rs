//! Record framing inside a segment.
//!
//! A segment starts with an 8-byte magic, then records, each
//! `len: u32 | crc: u32 | lsn: u64 | payload[len]`, little-endian, where `crc` is the
//! CRC-32 of the lsn bytes and the payload. The lsn inside every record makes a
//! record that is intact but misplaced (a stale block, a skipped write) detectable,
//! not just a damaged one. No record is all zeros (lsns start at 1), so zeros where a
//! record would start, up to the end of the file, are the end of the segment: the
//! unused part of a preallocated one.

pub const MAGIC: &[u8; 8] = b"BBXWAL\x00\x01";
pub const HEADER: usize = 16;

/// Appends one framed record to `out`.
pub fn encode(lsn: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("callers bound payloads to segment size");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn framed_len(payload_len: usize) -> usize {
    HEADER + payload_len
}

fn checksum(lsn: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// What lies at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Record {
        lsn: u64,
        payload: &'a [u8],
        next: usize,
    },
    /// The segment ends here: at the end of the file, or only zeros follow.
    End,
    /// Something that is not a valid record. `to_eof` tells whether it could be a
    /// write torn by a crash: it runs to the end of the file, or only zeros follow it.
    Bad {
        reason: &'static str,
        to_eof: bool,
    },
}

pub fn decode(segment: &[u8], offset: usize) -> Decoded<'_> {
    let rest = &segment[offset..];
    if rest.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    if rest.len() < HEADER {
        return Decoded::Bad {
            reason: "record header cut short",
            to_eof: true,
        };
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let lsn = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    let Some(payload) = rest.get(HEADER..HEADER + len) else {
        return Decoded::Bad {
            reason: "record runs past the end of the segment",
            to_eof: true,
        };
    };
    if checksum(lsn, payload) != crc {
        let to_eof = rest[HEADER + len..].iter().all(|&b| b == 0);
        return Decoded::Bad {
            reason: "checksum mismatch",
            to_eof,
        };
    }
    Decoded::Record {
        lsn,
        payload,
        next: offset + HEADER + len,
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
            encode(lsn, &payload, &mut buf);
            prop_assert_eq!(buf.len(), framed_len(payload.len()));
            prop_assert_eq!(decode(&buf, 0), Decoded::Record { lsn, payload: &payload, next: buf.len() });
            prop_assert_eq!(decode(&buf, buf.len()), Decoded::End);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..256), bit in 0usize..8 * 272) {
            let mut buf = Vec::new();
            encode(7, &payload, &mut buf);
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            let intact = matches!(decode(&buf, 0), Decoded::Record { lsn: 7, payload: p, .. } if p == payload.as_slice());
            prop_assert!(!intact);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128), offset in 0usize..128) {
            let offset = offset.min(bytes.len());
            let _ = decode(&bytes, offset);
        }
    }

    #[test]
    fn zeros_are_the_end_and_a_record_torn_before_them_is_a_possible_torn_write() {
        let mut buf = Vec::new();
        encode(1, b"hello world", &mut buf);
        let end = buf.len();
        buf.resize(end + 64, 0);
        assert_eq!(decode(&buf, end), Decoded::End);
        buf[end - 1] ^= 1;
        assert!(matches!(decode(&buf, 0), Decoded::Bad { to_eof: true, .. }));
        buf[end + 10] = 1;
        assert!(matches!(decode(&buf, 0), Decoded::Bad { to_eof: false, .. }));
    }

    #[test]
    fn a_cut_record_is_a_possible_torn_write() {
        let mut buf = Vec::new();
        encode(1, b"hello world", &mut buf);
        for cut in 1..buf.len() {
            assert!(
                matches!(decode(&buf[..cut], 0), Decoded::Bad { to_eof: true, .. }),
                "cut at {cut}"
            );
        }
    }
}
