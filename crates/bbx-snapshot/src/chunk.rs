//! Content-defined chunks: a stream is cut where its content says (FastCDC), so
//! an edit moves only the cuts around it and every other chunk is found again,
//! byte for byte, in the next snapshot; a chunk is named by its BLAKE3 hash and
//! stored compressed with zstd (no timestamps in the frame: the same bytes
//! always give the same chunk).

use bbx_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// A chunk's name: the BLAKE3 hash of its bytes (uncompressed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &hex::encode(self.0)[..16])
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut id = [0; 32];
        hex::decode_to_slice(&text, &mut id).map_err(serde::de::Error::custom)?;
        Ok(Self(id))
    }
}

/// A chunk as a stream refers to it: its name and its length uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// Bytes one [`ChunkRef`] takes in a chunk list.
pub const REF_BYTES: usize = 36;

impl ChunkRef {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// The refs a chunk list's bytes hold.
    pub fn decode_list(bytes: &[u8]) -> Result<Vec<Self>> {
        if !bytes.len().is_multiple_of(REF_BYTES) {
            return Err(corrupt("a chunk list's length is not a whole number of entries"));
        }
        Ok(bytes
            .chunks_exact(REF_BYTES)
            .map(|entry| Self {
                id: ChunkId(entry[..32].try_into().expect("32 bytes")),
                len: u32::from_le_bytes(entry[32..].try_into().expect("4 bytes")),
            })
            .collect())
    }
}

/// Cuts a stream fed in pieces into content-defined chunks, exactly where
/// cutting the whole stream at once would: FastCDC finds a chunk's end from
/// its start alone, within its maximum size.
pub struct Chunker {
    buffer: Vec<u8>,
    /// Where the bytes not yet cut start in `buffer`.
    start: usize,
    min: usize,
    avg: usize,
    max: usize,
}

impl Chunker {
    /// Chunks of `avg` bytes on average (a power of two), from a quarter of it
    /// to four times it.
    pub fn new(avg: u32) -> Self {
        Self {
            buffer: Vec::new(),
            start: 0,
            min: avg as usize / 4,
            avg: avg as usize,
            max: avg as usize * 4,
        }
    }

    /// Adds bytes to the stream; `chunk` is called for each chunk completed.
    pub fn push(&mut self, bytes: &[u8], chunk: &mut impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.buffer.extend_from_slice(bytes);
        while self.buffer.len() - self.start >= self.max {
            self.cut(chunk)?;
        }
        if self.start > self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }

    /// Ends the stream, giving the chunks left.
    pub fn finish(mut self, chunk: &mut impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        while self.start < self.buffer.len() {
            self.cut(chunk)?;
        }
        Ok(())
    }

    fn cut(&mut self, chunk: &mut impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let rest = &self.buffer[self.start..];
        let len = fastcdc::v2020::FastCDC::new(rest, self.min, self.avg, self.max)
            .next()
            .map_or(rest.len(), |found| found.length);
        chunk(&rest[..len])?;
        self.start += len;
        Ok(())
    }
}

/// The chunk's bytes as stored.
pub fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    zstd::bulk::compress(raw, level).map_err(|e| Error::internal(format!("compressing a chunk failed: {e}")))
}

/// A stored chunk's bytes, checked against its name: anything else is an
/// error (a damaged or substituted chunk never reaches a restore).
pub fn decompress(reference: &ChunkRef, stored: &[u8]) -> Result<Vec<u8>> {
    let raw = zstd::bulk::decompress(stored, reference.len as usize)
        .map_err(|e| corrupt(&format!("chunk {:?} does not decompress: {e}", reference.id)))?;
    if raw.len() != reference.len as usize || ChunkId::of(&raw) != reference.id {
        return Err(corrupt(&format!("chunk {:?} does not match its hash", reference.id)));
    }
    Ok(raw)
}

pub(crate) fn corrupt(what: &str) -> Error {
    Error::new(
        bbx_core::ErrorCode::Internal,
        format!("snapshot data is damaged: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cut_whole(bytes: &[u8], avg: u32) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let chunker = Chunker::new(avg);
        let mut whole = chunker;
        whole
            .push(bytes, &mut |c: &[u8]| {
                chunks.push(c.to_vec());
                Ok(())
            })
            .unwrap();
        whole
            .finish(&mut |c: &[u8]| {
                chunks.push(c.to_vec());
                Ok(())
            })
            .unwrap();
        chunks
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    proptest! {
        #[test]
        fn pieces_cut_as_the_whole_stream_does(seed in any::<u64>(), len in 0usize..200_000, pieces in proptest::collection::vec(1usize..40_000, 1..20)) {
            let bytes = pseudo_random(len, seed);
            let whole = cut_whole(&bytes, 1024);
            let mut fed = Vec::new();
            let mut chunker = Chunker::new(1024);
            let mut at = 0;
            for piece in pieces.iter().cycle() {
                if at >= bytes.len() { break; }
                let end = (at + piece).min(bytes.len());
                chunker.push(&bytes[at..end], &mut |c: &[u8]| { fed.push(c.to_vec()); Ok(()) }).unwrap();
                at = end;
            }
            chunker.finish(&mut |c: &[u8]| { fed.push(c.to_vec()); Ok(()) }).unwrap();
            prop_assert_eq!(&fed, &whole);
            prop_assert_eq!(fed.concat(), bytes);
            prop_assert!(whole.iter().all(|c| c.len() <= 4096));
        }

        #[test]
        fn chunks_round_trip_and_damage_is_caught(seed in any::<u64>(), len in 1usize..20_000, flip in any::<usize>()) {
            let raw = pseudo_random(len, seed);
            let reference = ChunkRef { id: ChunkId::of(&raw), len: raw.len() as u32 };
            let stored = compress(&raw, 3).unwrap();
            prop_assert_eq!(decompress(&reference, &stored).unwrap(), raw.clone());
            let mut damaged = raw.clone();
            damaged[flip % len] ^= 1;
            let damaged = compress(&damaged, 3).unwrap();
            prop_assert!(decompress(&reference, &damaged).is_err());
        }
    }

    #[test]
    fn an_edit_in_the_middle_keeps_most_chunks() {
        let mut bytes = pseudo_random(1 << 20, 7);
        let before = cut_whole(&bytes, 8192);
        bytes[500_000..500_100].fill(0);
        let after = cut_whole(&bytes, 8192);
        let kept = after.iter().filter(|c| before.contains(c)).count();
        assert!(kept + 3 >= after.len(), "kept {kept} of {}", after.len());
    }

    #[test]
    fn chunk_lists_round_trip_and_refuse_a_ragged_length() {
        let refs: Vec<ChunkRef> = (0..5u8)
            .map(|i| ChunkRef {
                id: ChunkId::of(&[i]),
                len: i as u32 * 100,
            })
            .collect();
        let mut bytes = Vec::new();
        refs.iter().for_each(|r| r.encode(&mut bytes));
        assert_eq!(ChunkRef::decode_list(&bytes).unwrap(), refs);
        assert!(ChunkRef::decode_list(&bytes[1..]).is_err());
    }
}
