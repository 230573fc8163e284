//! How an item's content is encoded in each tier: a block that names its
//! codec and carries the CRC32 of the content it decodes to, so a block that
//! was damaged is reported, never served as data.
//!
//! Layout: codec (1 byte), CRC32 of the content (4, little-endian), the
//! content's length (4, little-endian), the payload.

use bbx_core::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize};

/// Where an item is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// In memory, as it is.
    Hot,
    /// In memory, lz4.
    Warm,
    /// On disk, zstd.
    Cool,
    /// On disk, zstd at a higher level.
    Cold,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Hot, Tier::Warm, Tier::Cool, Tier::Cold];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Hot => "hot",
            Tier::Warm => "warm",
            Tier::Cool => "cool",
            Tier::Cold => "cold",
        }
    }
}

/// How a block's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Lz4,
    /// zstd at the COOL level.
    Zstd,
    /// zstd at the COLD level.
    ZstdHigh,
}

impl Codec {
    fn tag(self) -> u8 {
        match self {
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
            Codec::ZstdHigh => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            1 => Codec::Lz4,
            2 => Codec::Zstd,
            3 => Codec::ZstdHigh,
            _ => return None,
        })
    }

    /// The tier an item whose block on disk has this codec is in, when memory
    /// holds no copy of it.
    pub fn disk_tier(self) -> Tier {
        match self {
            Codec::Lz4 | Codec::Zstd => Tier::Cool,
            Codec::ZstdHigh => Tier::Cold,
        }
    }
}

const HEADER: usize = 9;

/// The most content a block may claim: the largest item the configuration
/// allows. A header claiming more is damaged, and no buffer is sized by it.
const MAX_CONTENT: usize = 64 * 1024 * 1024;

/// `content` as a block of `codec`; `level` is zstd's.
pub fn encode(content: &str, codec: Codec, level: i32) -> Result<Vec<u8>> {
    let mut block = Vec::with_capacity(HEADER + content.len() / 2);
    block.push(codec.tag());
    block.extend_from_slice(&crc32fast::hash(content.as_bytes()).to_le_bytes());
    let len = u32::try_from(content.len()).map_err(|_| Error::invalid_field("content", "is over 4 GiB"))?;
    block.extend_from_slice(&len.to_le_bytes());
    match codec {
        Codec::Lz4 => block.extend_from_slice(&lz4_flex::block::compress(content.as_bytes())),
        Codec::Zstd | Codec::ZstdHigh => {
            let compressed = zstd::bulk::compress(content.as_bytes(), level)
                .map_err(|e| Error::internal(format!("zstd could not compress an item: {e}")))?;
            block.extend_from_slice(&compressed);
        }
    }
    Ok(block)
}

fn corrupt(why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::Internal,
        format!("a stored context block is corrupt ({why}); it is not served"),
    )
}

/// The CRC32 of the content a block holds, as its header says: two blocks
/// of the same content have the same, whatever their codecs.
pub fn content_crc(block: &[u8]) -> Option<u32> {
    block.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// What the tag byte of a block kept in object storage says: the store keeps
/// only this stub (the block's header, then the object's name).
const REMOTE_TAG: u8 = 0x80;

/// A stub for `block`, kept in object storage under `name`: its header (the
/// content's CRC32 and length) and the name.
pub fn remote_stub(block: &[u8], name: &str) -> Vec<u8> {
    let mut stub = Vec::with_capacity(HEADER + name.len());
    stub.push(REMOTE_TAG);
    stub.extend_from_slice(block.get(1..HEADER).unwrap_or(&[0; HEADER - 1]));
    stub.extend_from_slice(name.as_bytes());
    stub
}

/// The object a stub names, or `None` for a block kept in place.
pub fn remote_name(block: &[u8]) -> Option<&str> {
    if block.first() != Some(&REMOTE_TAG) {
        return None;
    }
    std::str::from_utf8(block.get(HEADER..)?).ok()
}

/// The codec a block names.
pub fn codec_of(block: &[u8]) -> Result<Codec> {
    block
        .first()
        .and_then(|tag| Codec::from_tag(*tag))
        .ok_or_else(|| corrupt("unknown codec"))
}

/// The content a block holds, checked against its CRC32.
pub fn decode(block: &[u8]) -> Result<String> {
    if block.len() < HEADER {
        return Err(corrupt("too short"));
    }
    let codec = codec_of(block)?;
    let crc = u32::from_le_bytes([block[1], block[2], block[3], block[4]]);
    let len = u32::from_le_bytes([block[5], block[6], block[7], block[8]]) as usize;
    if len > MAX_CONTENT {
        return Err(corrupt("its length is impossible"));
    }
    let payload = &block[HEADER..];
    let bytes = match codec {
        Codec::Lz4 => lz4_flex::block::decompress(payload, len).map_err(corrupt)?,
        Codec::Zstd | Codec::ZstdHigh => zstd::bulk::decompress(payload, len).map_err(corrupt)?,
    };
    if bytes.len() != len || crc32fast::hash(&bytes) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))
}

#[cfg(test)]
mod stub_tests {
    use super::*;

    #[test]
    fn a_stub_names_its_object_and_keeps_the_blocks_checksum() {
        let block = encode("far away", Codec::ZstdHigh, 19).unwrap();
        let stub = remote_stub(&block, "a/1-ff");
        assert_eq!(remote_name(&stub), Some("a/1-ff"));
        assert_eq!(content_crc(&stub), content_crc(&block));
        assert_eq!(remote_name(&block), None);
        assert!(decode(&stub).is_err(), "a stub is never served as content");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_codec_reads_back_what_was_written(content in "\\PC{0,2000}", codec in prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd), Just(Codec::ZstdHigh)], level in 1i32..10) {
            let block = encode(&content, codec, level).unwrap();
            prop_assert_eq!(codec_of(&block).unwrap(), codec);
            prop_assert_eq!(decode(&block).unwrap(), content);
        }

        #[test]
        fn a_damaged_block_is_refused(content in "[a-z ]{1,500}", at in any::<prop::sample::Index>(), flip in 1u8..=255, codec in prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd)]) {
            let mut block = encode(&content, codec, 3).unwrap();
            let at = at.index(block.len());
            block[at] ^= flip;
            // Either refused, or (a flip in a tag that names another valid
            // codec, say) decoded to exactly the content: never other data.
            if let Ok(decoded) = decode(&block) {
                prop_assert_eq!(decoded, content);
            }
        }

        #[test]
        fn any_bytes_decode_to_an_error_or_checked_content(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn a_truncated_block_is_refused() {
        let block = encode("hello world, hello world", Codec::Zstd, 3).unwrap();
        assert!(decode(&block[..block.len() - 1]).is_err());
        assert!(decode(&block[..4]).is_err());
    }
}
