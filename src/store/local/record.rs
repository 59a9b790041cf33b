//! The two files of one object version in a replica.
//!
//! `<version>.d` holds the stored bytes followed by a table of CRC32C values, one per block
//! of [`BLOCK_SIZE`] bytes, so that a ranged read verifies only the blocks it touches.
//! `<version>.m` is the metadata record, written last and so the commit point of a put:
//!
//! ```text
//! "CFRM" | u32 LE length of the JSON | JSON (MetaRecord) | u32 LE CRC32C of all before
//! ```
//!
//! The record carries the data size, the BLAKE3 digest of the whole data (checked by scrub),
//! the etag, the mtime and the user metadata; its own CRC covers the user metadata.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::direct;
use crate::buffers::GET_BUFFERS;
use crate::store::Metadata;

pub const BLOCK_SIZE: u32 = 64 * 1024;
const META_MAGIC: &[u8; 4] = b"CFRM";
/// A metadata record larger than this is refused as corrupt (user metadata is capped far
/// below it), so a damaged length field cannot make a reader allocate without bound.
const MAX_META_RECORD: usize = 1 << 20;

/// How the stored bytes are encrypted at rest by the store itself (SSE).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SseRecord {
    /// "customer" (SSE-C) or "store" (SSE-S3).
    pub mode: String,
    /// Random salt (hex) from which the object's data key is derived.
    pub salt: String,
    /// SSE-C only: HMAC-SHA256 of the customer key under the salt (hex), to check the key
    /// of later requests without keeping the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hmac: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetaRecord {
    pub key: String,
    #[serde(default)]
    pub deleted: bool,
    pub size: u64,
    pub block_size: u32,
    /// BLAKE3 of the stored bytes, hex.
    pub blake3: String,
    pub etag: String,
    pub mtime_ns: u64,
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse: Option<SseRecord>,
}

impl MetaRecord {
    /// The record of a new live version of `key`: `size` bytes in [`BLOCK_SIZE`] blocks with
    /// the BLAKE3 `digest` (whose first 32 hex digits are the ETag), written now.
    pub fn live(
        key: &str,
        size: u64,
        digest: String,
        metadata: Metadata,
        sse: Option<SseRecord>,
    ) -> MetaRecord {
        MetaRecord {
            key: key.to_string(),
            deleted: false,
            size,
            block_size: BLOCK_SIZE,
            etag: digest[..32].to_string(),
            blake3: digest,
            mtime_ns: super::now_ns(),
            metadata,
            sse,
        }
    }
}

pub fn encode_meta(rec: &MetaRecord) -> Vec<u8> {
    let json = serde_json::to_vec(rec).expect("a MetaRecord always serializes");
    let mut out = Vec::with_capacity(json.len() + 12);
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_meta(bytes: &[u8]) -> Result<MetaRecord, String> {
    if bytes.len() < 12 || &bytes[..4] != META_MAGIC {
        return Err("metadata record: bad magic or too short".into());
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    if len > MAX_META_RECORD || bytes.len() != 12 + len {
        return Err(format!(
            "metadata record: length {len} does not match file size {}",
            bytes.len()
        ));
    }
    let crc = u32::from_le_bytes(bytes[8 + len..].try_into().unwrap());
    if crc32c::crc32c(&bytes[..8 + len]) != crc {
        return Err("metadata record: checksum mismatch".into());
    }
    serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| format!("metadata record: {e}"))
}

/// Reads and verifies a `.m` file.
pub fn read_meta(file: &File) -> io::Result<Result<MetaRecord, String>> {
    let len = file.metadata()?.len() as usize;
    if len > MAX_META_RECORD + 12 {
        return Ok(Err(format!("metadata record of {len} bytes is too large")));
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(decode_meta(&buf))
}

/// Computes the block checksums and digest of data as it streams in.
pub struct DataChecksummer {
    block_size: u64,
    crcs: Vec<u8>,
    cur_crc: u32,
    cur_len: u64,
    hasher: blake3::Hasher,
    total: u64,
}

impl DataChecksummer {
    pub fn new(block_size: u32) -> Self {
        DataChecksummer {
            block_size: block_size as u64,
            crcs: Vec::new(),
            cur_crc: 0,
            cur_len: 0,
            hasher: blake3::Hasher::new(),
            total: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.hasher.update(data);
        self.total += data.len() as u64;
        while !data.is_empty() {
            let room = (self.block_size - self.cur_len) as usize;
            let take = room.min(data.len());
            self.cur_crc = crc32c::crc32c_append(self.cur_crc, &data[..take]);
            self.cur_len += take as u64;
            data = &data[take..];
            if self.cur_len == self.block_size {
                self.crcs.extend_from_slice(&self.cur_crc.to_le_bytes());
                self.cur_crc = 0;
                self.cur_len = 0;
            }
        }
    }

    /// The CRC table to append after the data, the BLAKE3 digest (hex) and the data size.
    pub fn finish(mut self) -> (Vec<u8>, String, u64) {
        if self.cur_len > 0 {
            self.crcs.extend_from_slice(&self.cur_crc.to_le_bytes());
        }
        (
            self.crcs,
            self.hasher.finalize().to_hex().to_string(),
            self.total,
        )
    }
}

fn blocks(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}

/// Reads `range` of a `.d` file (already clamped to the data size), verifying the CRC of
/// every block it touches. `Err(Ok(detail))` means the replica is corrupt.
pub fn read_verified(
    file: &File,
    rec: &MetaRecord,
    range: Range<u64>,
) -> io::Result<Result<Vec<u8>, String>> {
    Ok(read_verified_bytes(file, rec, range)?.map(|b| b.to_vec()))
}

/// [`read_verified`] without moving the bytes: the whole blocks read stay in one buffer and
/// the result is the requested slice of it (ranged reads of sealed chunks never start on
/// a block boundary, and moving every read's bytes down cost a copy of each).
pub fn read_verified_bytes(
    file: &File,
    rec: &MetaRecord,
    range: Range<u64>,
) -> io::Result<Result<bytes::Bytes, String>> {
    if range.start >= range.end {
        return Ok(Ok(bytes::Bytes::new()));
    }
    let bs = rec.block_size as u64;
    if bs == 0 {
        return Ok(Err("block size 0".into()));
    }
    let file_len = file.metadata()?.len();
    let expected_len = rec.size + 4 * blocks(rec.size, bs);
    if file_len != expected_len {
        return Ok(Err(format!(
            "data file is {file_len} bytes, expected {expected_len}"
        )));
    }
    let b0 = range.start / bs;
    let b1 = (range.end - 1) / bs;
    let mut table = vec![0u8; 4 * (b1 - b0 + 1) as usize];
    file.read_exact_at(&mut table, rec.size + 4 * b0)?;
    let start = b0 * bs;
    let end = ((b1 + 1) * bs).min(rec.size);
    let want = (end - start) as usize;
    let (data, base) = read_span(file, start, want)?;
    let span = &data[base..];
    if span.len() != want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "data file shorter than its record",
        ));
    }
    for (i, block) in span.chunks(bs as usize).enumerate() {
        let want = u32::from_le_bytes(table[4 * i..4 * i + 4].try_into().unwrap());
        if crc32c::crc32c(block) != want {
            return Ok(Err(format!("block {} checksum mismatch", b0 + i as u64)));
        }
    }
    let from = (range.start - start) as usize;
    let to = from + (range.end - range.start) as usize;
    if (to - from) * 3 / 2 < data.len() {
        // A small range that straddles checksum blocks (one 64 KiB chunk and its tag span
        // two): a copy of just the range, or a cache holding its slice would keep both
        // blocks alive (and charge them).
        let out = bytes::Bytes::copy_from_slice(&span[from..to]);
        GET_BUFFERS.give(data);
        return Ok(Ok(out));
    }
    Ok(Ok(GET_BUFFERS
        .reclaimable(data)
        .slice(base + from..base + to)))
}

/// Spans at least this long that the page cache does not hold are read around it
/// (O_DIRECT): a cold sequential read of a large file otherwise spends a quarter of its store
/// thread's time copying out of the page cache, which it fills with ciphertext the chunk
/// cache holds decrypted anyway.
const DIRECT_READ_MIN: usize = 1 << 20;

/// Reads `want` bytes of `file` at `start`: the bytes are `buffer[base..]` (a direct read's
/// buffer starts at an aligned address inside the allocation). Fewer bytes than `want` only
/// at the end of the file.
fn read_span(file: &File, start: u64, want: usize) -> io::Result<(Vec<u8>, usize)> {
    if want >= DIRECT_READ_MIN
        && start.is_multiple_of(direct::ALIGN as u64)
        && !direct::all_cached(file, start, want)
        && let Some(read) = direct::read(file, start, want)?
    {
        return Ok(read);
    }
    // Read into spare capacity: zeroing a multi-MiB buffer first would cost as much as the
    // checksums.
    use std::io::{Read, Seek};
    let mut data = GET_BUFFERS.for_len(want);
    let mut f = file;
    f.seek(io::SeekFrom::Start(start))?;
    f.take(want as u64).read_to_end(&mut data)?;
    Ok((data, 0))
}

/// Verifies a whole `.d` file: every block checksum and the BLAKE3 digest. Memory stays at
/// one block.
pub fn verify_full(file: &File, rec: &MetaRecord) -> io::Result<Result<(), String>> {
    let bs = rec.block_size as u64;
    if bs == 0 {
        return Ok(Err("block size 0".into()));
    }
    let file_len = file.metadata()?.len();
    let expected_len = rec.size + 4 * blocks(rec.size, bs);
    if file_len != expected_len {
        return Ok(Err(format!(
            "data file is {file_len} bytes, expected {expected_len}"
        )));
    }
    let mut sums = DataChecksummer::new(rec.block_size);
    let mut buf = vec![0u8; bs as usize];
    let mut off = 0;
    while off < rec.size {
        let n = bs.min(rec.size - off) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        sums.update(&buf[..n]);
        off += n as u64;
    }
    let (table, digest, _) = sums.finish();
    let mut stored = vec![0u8; table.len()];
    file.read_exact_at(&mut stored, rec.size)?;
    if stored != table {
        let bad = table
            .chunks(4)
            .zip(stored.chunks(4))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Ok(Err(format!("block {bad} checksum mismatch")));
    }
    if digest != rec.blake3 {
        return Ok(Err("BLAKE3 digest mismatch".into()));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_tamper() {
        let rec = MetaRecord {
            key: "a/b".into(),
            deleted: false,
            size: 3,
            block_size: BLOCK_SIZE,
            blake3: "00".into(),
            etag: "e".into(),
            mtime_ns: 5,
            metadata: [("mode".to_string(), "33188".to_string())].into(),
            sse: None,
        };
        let bytes = encode_meta(&rec);
        assert_eq!(decode_meta(&bytes).unwrap(), rec);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode_meta(&b).is_err(), "flip at {i} not detected");
        }
        assert!(decode_meta(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn checksummer_blocks() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut a = DataChecksummer::new(BLOCK_SIZE);
        a.update(&data[..7]);
        a.update(&data[7..100_000]);
        a.update(&data[100_000..]);
        let mut b = DataChecksummer::new(BLOCK_SIZE);
        b.update(&data);
        let (ta, da, na) = a.finish();
        let (tb, db, nb) = b.finish();
        assert_eq!((ta.len(), na), (16, 200_000));
        assert_eq!((ta, da, na), (tb, db, nb));
    }

    #[test]
    fn large_ranges_read_around_the_page_cache_are_whole_and_verified() {
        let size = 3 * (1 << 20) + 12_345;
        let data: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut ck = DataChecksummer::new(BLOCK_SIZE);
        ck.update(&data);
        let (table, blake3, n) = ck.finish();
        let mut body = data.clone();
        body.extend_from_slice(&table);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.d");
        std::fs::write(&path, &body).unwrap();
        let rec = MetaRecord {
            key: "k".into(),
            deleted: false,
            size: n,
            block_size: BLOCK_SIZE,
            blake3,
            etag: "e".into(),
            mtime_ns: 0,
            metadata: Default::default(),
            sse: None,
        };
        let size = size as u64;
        let ranges = [
            0..size,
            65_536..size,
            100..(2 << 20) + 7,
            (1 << 20)..(3 << 20),
            (2 << 20) + 5..size,
        ];
        // The file's pages dropped from the page cache (all of them, or all but the first
        // MiB), so that reads go to the disk, directly where this filesystem allows it.
        let open = |cached: &str| {
            let file = File::open(&path).unwrap();
            if cached != "all" {
                use std::os::fd::AsRawFd;
                file.sync_all().unwrap();
                // SAFETY: an open descriptor, no pointers.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                if cached == "first MiB" {
                    let mut b = vec![0u8; 1 << 20];
                    file.read_exact_at(&mut b, 0).unwrap();
                }
            }
            file
        };
        for cached in ["all", "none", "first MiB"] {
            for r in ranges.clone() {
                let got = read_verified_bytes(&open(cached), &rec, r.clone())
                    .unwrap()
                    .unwrap();
                assert!(
                    got[..] == data[r.start as usize..r.end as usize],
                    "{r:?}, cached: {cached}"
                );
            }
            // The read itself, asked for more than the file holds: it ends short, at the
            // end of the file.
            if let Some((buf, base)) = direct::read(&open(cached), 0, body.len() + 100).unwrap() {
                assert!(buf[base..] == body[..], "cached: {cached}");
            }
        }
        // A flipped bit is caught on the direct path as on the other.
        body[(1 << 20) + 3] ^= 1;
        std::fs::write(&path, &body).unwrap();
        let err = read_verified_bytes(&open("none"), &rec, 0..size)
            .unwrap()
            .unwrap_err();
        assert!(err.contains("block 16 checksum mismatch"), "{err}");
    }
}
