//! The object header and the chunk geometry (docs/FORMAT.md, sections 2 and 3).
//!
//! ```text
//! offset size field
//!      0    4 magic "COFR"
//!      4    1 format version (1)
//!      5    1 suite (1 = HKDF-SHA256 + AES-256-GCM-SIV)
//!      6    1 log2 of the chunk size (12..=24)
//!      7    1 flags (0; any other value is refused)
//!      8   16 file id (random per object write)
//!     24   32 key commitment
//! ```
//! Then chunk 0..n-1, each `ciphertext || 16-byte tag`; every chunk but the last holds a
//! full chunk of plaintext, the last holds 1..=chunk bytes (0 only when the file is empty).

use std::ops::Range;

use super::CryptError;

pub const MAGIC: &[u8; 4] = b"COFR";
pub const VERSION: u8 = 1;
pub const SUITE_AES256_GCM_SIV: u8 = 1;
pub const HEADER_LEN: usize = 56;
pub const TAG_LEN: usize = 16;
pub const FILE_ID_LEN: usize = 16;
pub const DEFAULT_CHUNK_SHIFT: u8 = 16;
pub const MIN_CHUNK_SHIFT: u8 = 12;
pub const MAX_CHUNK_SHIFT: u8 = 24;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub chunk_shift: u8,
    pub file_id: [u8; FILE_ID_LEN],
    pub commitment: [u8; 32],
}

impl Header {
    /// The first 8 bytes (magic, version, suite, chunk size, flags), which key derivation
    /// binds as well as the AAD.
    pub fn prefix(chunk_shift: u8) -> [u8; 8] {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(MAGIC);
        p[4] = VERSION;
        p[5] = SUITE_AES256_GCM_SIV;
        p[6] = chunk_shift;
        p[7] = 0;
        p
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&Self::prefix(self.chunk_shift));
        b[8..24].copy_from_slice(&self.file_id);
        b[24..56].copy_from_slice(&self.commitment);
        b
    }

    /// Parses a header, refusing unknown versions, suites, flags and chunk sizes: every field
    /// that changes how the bytes are read is checked here and authenticated by every chunk.
    pub fn parse(b: &[u8]) -> Result<Header, CryptError> {
        if b.len() < HEADER_LEN {
            return Err(CryptError::BadHeader(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        if &b[..4] != MAGIC {
            return Err(CryptError::BadHeader("bad magic".into()));
        }
        if b[4] != VERSION {
            return Err(CryptError::UnsupportedVersion(b[4]));
        }
        if b[5] != SUITE_AES256_GCM_SIV {
            return Err(CryptError::BadHeader(format!("unknown suite {}", b[5])));
        }
        let shift = b[6];
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&shift) {
            return Err(CryptError::BadHeader(format!(
                "chunk size 2^{shift} out of range"
            )));
        }
        if b[7] != 0 {
            return Err(CryptError::BadHeader(format!("unknown flags {:#x}", b[7])));
        }
        Ok(Header {
            chunk_shift: shift,
            file_id: b[8..24].try_into().unwrap(),
            commitment: b[24..56].try_into().unwrap(),
        })
    }
}

/// How plaintext chunks map onto stored bytes: encrypted (header, tag per chunk) or plain
/// (for stores that rely on SSE alone, where the object body is the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub chunk: u64,
    pub encrypted: bool,
}

impl Geometry {
    pub fn encrypted(chunk_shift: u8) -> Self {
        Geometry {
            chunk: 1 << chunk_shift,
            encrypted: true,
        }
    }

    pub fn plain(chunk_shift: u8) -> Self {
        Geometry {
            chunk: 1 << chunk_shift,
            encrypted: false,
        }
    }

    pub fn header_len(&self) -> u64 {
        if self.encrypted { HEADER_LEN as u64 } else { 0 }
    }

    pub fn tag_len(&self) -> u64 {
        if self.encrypted { TAG_LEN as u64 } else { 0 }
    }

    /// Stored size of one full chunk.
    pub fn stored_chunk(&self) -> u64 {
        self.chunk + self.tag_len()
    }

    /// Number of chunks of a file of `plain` bytes (an empty encrypted file has one empty
    /// chunk, so that its end is authenticated too).
    pub fn chunk_count(&self, plain: u64) -> u64 {
        let n = plain.div_ceil(self.chunk);
        if self.encrypted { n.max(1) } else { n }
    }

    pub fn stored_size(&self, plain: u64) -> u64 {
        self.header_len() + plain + self.chunk_count(plain) * self.tag_len()
    }

    /// The plaintext size of an object of `stored` bytes, computable from a listing alone.
    /// Sizes no writer produces (shorter than a header and a tag, or with an empty last
    /// chunk) are refused.
    pub fn plain_size(&self, stored: u64) -> Result<u64, CryptError> {
        if !self.encrypted {
            return Ok(stored);
        }
        let body = stored
            .checked_sub(self.header_len() + self.tag_len())
            .ok_or(CryptError::BadSize(stored))?
            + self.tag_len();
        let n = body.div_ceil(self.stored_chunk());
        let plain = body - n * self.tag_len();
        if self.stored_size(plain) != stored {
            return Err(CryptError::BadSize(stored));
        }
        Ok(plain)
    }

    /// The chunks holding plaintext bytes `range` (clamped to `plain_size`).
    pub fn chunks_of(&self, range: Range<u64>, plain_size: u64) -> Range<u64> {
        let end = range.end.min(plain_size);
        if range.start >= end {
            return 0..0;
        }
        range.start / self.chunk..end.div_ceil(self.chunk)
    }

    /// Plaintext length of chunk `i` of a file of `plain_size` bytes.
    pub fn chunk_len(&self, i: u64, plain_size: u64) -> u64 {
        plain_size.saturating_sub(i * self.chunk).min(self.chunk)
    }

    /// Stored byte range of chunks `chunks`.
    pub fn stored_range(&self, chunks: Range<u64>, plain_size: u64) -> Range<u64> {
        let start = self.header_len() + chunks.start * self.stored_chunk();
        let end = if chunks.end >= self.chunk_count(plain_size) {
            self.stored_size(plain_size)
        } else {
            self.header_len() + chunks.end * self.stored_chunk()
        };
        start..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_invert() {
        for shift in [12u8, 16] {
            let g = Geometry::encrypted(shift);
            let c = g.chunk;
            for p in [0, 1, c - 1, c, c + 1, 3 * c, 3 * c + 7, 1 << 30] {
                let s = g.stored_size(p);
                assert_eq!(g.plain_size(s), Ok(p), "plain {p}");
            }
            // Sizes that imply an empty or negative last chunk are refused.
            assert!(g.plain_size(0).is_err());
            assert!(g.plain_size(HEADER_LEN as u64 + 15).is_err());
            assert!(g.plain_size(g.stored_size(c) + TAG_LEN as u64).is_err());
        }
        assert_eq!(Geometry::encrypted(16).stored_size(0), 72);
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let h = Header {
            chunk_shift: 16,
            file_id: [7; 16],
            commitment: [9; 32],
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b), Ok(h));
        for (i, v) in [(0usize, b'X'), (4, 2), (5, 2), (6, 30), (6, 5), (7, 1)] {
            let mut t = b;
            t[i] = v;
            assert!(Header::parse(&t).is_err(), "byte {i} = {v}");
        }
        assert!(Header::parse(&b[..55]).is_err());
    }
}
