//! Packs: many chunks in one object, so a snapshot is a handful of writes (one
//! `fdatasync` each) instead of one per chunk, and an object store sees few,
//! large objects. A pack is its chunks, compressed, one after another, then
//! an index of them and its length:
//!
//! `chunk bytes… | (id 32, offset u64, stored u32, len u32)… | count u32 | "BBXPACK1"`
//!
//! Packs are named by a UUIDv7, so listing them in name order lists them in
//! the order they were written: where two hold the same chunk (a repair), the
//! later one is read.

use crate::chunk::{ChunkId, ChunkRef, corrupt};
use bbx_core::Result;
use bytes::Bytes;

const MAGIC: &[u8; 8] = b"BBXPACK1";
const ENTRY: usize = 48;
/// The count and the magic.
pub const TAIL: u64 = 12;
/// A pack is sealed once its chunks reach this size.
pub const PACK_BYTES: usize = 16 << 20;

/// Where a chunk is kept in a store.
#[derive(Debug, Clone)]
pub struct Location {
    pub pack: std::sync::Arc<str>,
    pub offset: u64,
    pub stored: u32,
    pub len: u32,
}

/// A pack being filled.
#[derive(Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<(ChunkRef, u64, u32)>,
}

impl PackBuilder {
    pub fn add(&mut self, reference: ChunkRef, stored: &[u8]) {
        self.entries
            .push((reference, self.bytes.len() as u64, stored.len() as u32));
        self.bytes.extend_from_slice(stored);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.bytes.len() >= PACK_BYTES
    }

    /// The pack's object name and bytes, and where each chunk is in it.
    pub fn seal(mut self) -> SealedPack {
        let name: std::sync::Arc<str> = format!("packs/{}.pack", uuid::Uuid::now_v7().simple()).into();
        let mut locations = Vec::with_capacity(self.entries.len());
        for (reference, offset, stored) in &self.entries {
            self.bytes.extend_from_slice(&reference.id.0);
            self.bytes.extend_from_slice(&offset.to_le_bytes());
            self.bytes.extend_from_slice(&stored.to_le_bytes());
            self.bytes.extend_from_slice(&reference.len.to_le_bytes());
            locations.push((
                reference.id,
                Location {
                    pack: name.clone(),
                    offset: *offset,
                    stored: *stored,
                    len: reference.len,
                },
            ));
        }
        self.bytes.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(MAGIC);
        SealedPack {
            name,
            bytes: self.bytes.into(),
            locations,
        }
    }
}

pub struct SealedPack {
    pub name: std::sync::Arc<str>,
    pub bytes: Bytes,
    pub locations: Vec<(ChunkId, Location)>,
}

/// How many entries a pack's tail says its index has, and where the index
/// starts, for a pack of `size` bytes.
pub fn index_range(tail: &[u8], size: u64) -> Result<std::ops::Range<u64>> {
    if tail.len() as u64 != TAIL || &tail[4..] != MAGIC {
        return Err(corrupt("a pack does not end in its magic"));
    }
    let count = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    let index = count * ENTRY as u64;
    if index + TAIL > size {
        return Err(corrupt("a pack's index is longer than the pack"));
    }
    Ok(size - TAIL - index..size - TAIL)
}

/// The chunks a pack's index lists.
pub fn read_index(pack: &std::sync::Arc<str>, index: &[u8], data_end: u64) -> Result<Vec<(ChunkId, Location)>> {
    index
        .chunks_exact(ENTRY)
        .map(|entry| {
            let id = ChunkId(entry[..32].try_into().expect("32 bytes"));
            let offset = u64::from_le_bytes(entry[32..40].try_into().expect("8 bytes"));
            let stored = u32::from_le_bytes(entry[40..44].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(entry[44..].try_into().expect("4 bytes"));
            if offset.checked_add(stored as u64).is_none_or(|end| end > data_end) {
                return Err(corrupt("a pack's index points past its chunks"));
            }
            Ok((
                id,
                Location {
                    pack: pack.clone(),
                    offset,
                    stored,
                    len,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_pack_indexes_its_chunks() {
        let mut builder = PackBuilder::default();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10 + i as usize]).collect();
        for chunk in &chunks {
            let reference = ChunkRef {
                id: ChunkId::of(chunk),
                len: chunk.len() as u32,
            };
            builder.add(reference, chunk);
        }
        let sealed = builder.seal();
        let size = sealed.bytes.len() as u64;
        let range = index_range(&sealed.bytes[(size - TAIL) as usize..], size).unwrap();
        let index = read_index(
            &sealed.name,
            &sealed.bytes[range.start as usize..range.end as usize],
            range.start,
        )
        .unwrap();
        assert_eq!(index.len(), 3);
        for ((id, location), chunk) in index.iter().zip(&chunks) {
            assert_eq!(*id, ChunkId::of(chunk));
            let at = location.offset as usize;
            assert_eq!(&sealed.bytes[at..at + location.stored as usize], chunk.as_slice());
        }
        assert!(index_range(b"garbage12345", size).is_err());
    }
}
