//! The files of one object version in a replica: its record, and its data file unless the
//! data is embedded in the record.
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
//!
//! A version of at most [`EMBED_MAX`] stored bytes written through the journal has no `.d`
//! file: its record starts with `"CFRE"` instead and is followed, in the same `.m` file, by
//! exactly what the `.d` file would hold (the bytes, then their block checksums). A small
//! file then costs one file in the layout instead of two, and one open to read.

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
/// The magic of a record followed by its version's data (see the module comment).
const EMBEDDED_MAGIC: &[u8; 4] = b"CFRE";
/// Versions of at most this many stored bytes written through the journal keep their data
/// in the record's file. Larger ones keep a `.d` file, which a copy (a rename) shares by a
/// hard link: an embedded version is copied, so this bounds what a rename rewrites.
pub const EMBED_MAX: u64 = 32 * 1024;
/// How much of a record file the first read takes: the whole record of every version but
/// those with large user metadata, and the data of most embedded ones.
const FIRST_READ: usize = 8 * 1024;
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
    /// The data follows the record in its file (told by the magic, not the JSON).
    #[serde(skip)]
    pub embedded: bool,
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
            embedded: false,
        }
    }
}

/// Whether encoded record `bytes` are followed by their version's data in the layout.
pub fn is_embedded(bytes: &[u8]) -> bool {
    bytes.starts_with(EMBEDDED_MAGIC)
}

pub fn encode_meta(rec: &MetaRecord) -> Vec<u8> {
    let json = serde_json::to_vec(rec).expect("a MetaRecord always serializes");
    let mut out = Vec::with_capacity(json.len() + 12);
    out.extend_from_slice(if rec.embedded {
        EMBEDDED_MAGIC
    } else {
        META_MAGIC
    });
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_meta(bytes: &[u8]) -> Result<MetaRecord, String> {
    let Some(len) = record_len(bytes)
        .filter(|_| bytes.len() >= 12)
        .map(|n| n - 12)
    else {
        return Err("metadata record: bad magic or too short".into());
    };
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
    let mut rec: MetaRecord =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| format!("metadata record: {e}"))?;
    rec.embedded = is_embedded(bytes);
    // Every writer uses BLOCK_SIZE; a reader allocates a block, so a damaged or planted
    // record must not name gigabytes.
    if !(512..=16 << 20).contains(&rec.block_size) {
        return Err(format!(
            "metadata record: block size {} is out of range",
            rec.block_size
        ));
    }
    if rec.embedded && (rec.deleted || rec.size > EMBED_MAX) {
        return Err(format!(
            "metadata record: embedded data of {} bytes (deleted: {}) is not allowed",
            rec.size, rec.deleted
        ));
    }
    Ok(rec)
}

/// Reads and verifies a `.m` file: the record, and that the file is as long as the record
/// says (a record with embedded data is followed by exactly that data and its checksums,
/// which [`read_verified_bytes`] and [`verify_full`] check). Returns the record and its
/// length, where embedded data starts.
pub fn read_meta(file: &File) -> io::Result<Result<(MetaRecord, usize), String>> {
    let file_len = file.metadata()?.len();
    let mut buf = vec![0u8; (file_len as usize).min(FIRST_READ)];
    file.read_exact_at(&mut buf, 0)?;
    if let Some(record_len) = record_len(&buf)
        && record_len > buf.len()
        && record_len <= MAX_META_RECORD + 12
        && record_len as u64 <= file_len
    {
        let have = buf.len();
        buf.resize(record_len, 0);
        file.read_exact_at(&mut buf[have..], have as u64)?;
    }
    Ok(decode_record_file(&buf, file_len))
}

/// Decodes the record at the start of a record file of `file_len` bytes, given the file's
/// first bytes (`head`, at least the whole record), and checks that the file is as long as
/// the record says. Returns the record and its length, where embedded data starts.
pub fn decode_record_file(head: &[u8], file_len: u64) -> Result<(MetaRecord, usize), String> {
    let Some(record_len) = record_len(head) else {
        return Err("metadata record: bad magic or too short".into());
    };
    if record_len > MAX_META_RECORD + 12 || record_len as u64 > file_len || record_len > head.len()
    {
        return Err(format!(
            "metadata record of {record_len} bytes does not fit its file of {file_len}"
        ));
    }
    let rec = decode_meta(&head[..record_len])?;
    let expected = record_len as u64
        + if rec.embedded {
            stored_len(rec.size, rec.block_size as u64)
        } else {
            0
        };
    if file_len != expected {
        return Err(format!(
            "record file is {file_len} bytes, expected {expected}"
        ));
    }
    Ok((rec, record_len))
}

/// The length of the record at the start of `bytes` (its header, JSON and CRC), from its
/// header alone; `None` without a record's magic.
fn record_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 8 || (&bytes[..4] != META_MAGIC && &bytes[..4] != EMBEDDED_MAGIC) {
        return None;
    }
    Some(12 + u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize)
}

/// What the stored bytes of `size` take with their block checksums.
fn stored_len(size: u64, block_size: u64) -> u64 {
    // Saturating: a record's size is read from disk, and may be anything.
    size.saturating_add(blocks(size, block_size.max(1)).saturating_mul(4))
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

/// A version's stored bytes and their block checksums: a whole `.d` file, or what follows
/// the record in an embedded version's `.m` file.
pub struct StoredData {
    pub file: File,
    /// Where the stored bytes start in `file`.
    pub base: u64,
}

impl StoredData {
    /// Checks that the file holds exactly the stored bytes and checksums `rec` describes.
    fn check_len(&self, rec: &MetaRecord) -> io::Result<Result<(), String>> {
        let file_len = self.file.metadata()?.len();
        let expected_len = self.base + stored_len(rec.size, rec.block_size as u64);
        if file_len != expected_len {
            let what = if rec.embedded { "record" } else { "data" };
            return Ok(Err(format!(
                "{what} file is {file_len} bytes, expected {expected_len}"
            )));
        }
        Ok(Ok(()))
    }
}

/// Reads `range` of a version's data (already clamped to the data size), verifying the CRC
/// of every block it touches. `Err(Ok(detail))` means the replica is corrupt.
pub fn read_verified(
    data: &StoredData,
    rec: &MetaRecord,
    range: Range<u64>,
) -> io::Result<Result<Vec<u8>, String>> {
    Ok(read_verified_bytes(data, rec, range)?.map(|b| b.to_vec()))
}

/// [`read_verified`] without moving the bytes: the whole blocks read stay in one buffer and
/// the result is the requested slice of it (ranged reads of sealed chunks never start on
/// a block boundary, and moving every read's bytes down cost a copy of each).
pub fn read_verified_bytes(
    stored: &StoredData,
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
    if let Err(e) = stored.check_len(rec)? {
        return Ok(Err(e));
    }
    let (file, at) = (&stored.file, stored.base);
    let b0 = range.start / bs;
    let b1 = (range.end - 1) / bs;
    let mut table = vec![0u8; 4 * (b1 - b0 + 1) as usize];
    file.read_exact_at(&mut table, at + rec.size + 4 * b0)?;
    let start = b0 * bs;
    let end = ((b1 + 1) * bs).min(rec.size);
    let want = (end - start) as usize;
    let (data, base) = read_span(file, at + start, want)?;
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

/// Verifies a version's whole data: every block checksum and the BLAKE3 digest. Memory
/// stays at one block.
pub fn verify_full(data: &StoredData, rec: &MetaRecord) -> io::Result<Result<(), String>> {
    let bs = rec.block_size as u64;
    if bs == 0 {
        return Ok(Err("block size 0".into()));
    }
    if let Err(e) = data.check_len(rec)? {
        return Ok(Err(e));
    }
    let (file, at) = (&data.file, data.base);
    let mut sums = DataChecksummer::new(rec.block_size);
    let mut buf = vec![0u8; bs as usize];
    let mut off = 0;
    while off < rec.size {
        let n = bs.min(rec.size - off) as usize;
        file.read_exact_at(&mut buf[..n], at + off)?;
        sums.update(&buf[..n]);
        off += n as u64;
    }
    let mut stored = vec![0u8; (stored_len(rec.size, bs) - rec.size) as usize];
    file.read_exact_at(&mut stored, at + rec.size)?;
    Ok(check_sums(sums, &stored, rec))
}

/// Compares the checksums computed over a version's bytes with the table stored after them
/// and the record's BLAKE3 digest.
fn check_sums(sums: DataChecksummer, stored_table: &[u8], rec: &MetaRecord) -> Result<(), String> {
    let (table, digest, _) = sums.finish();
    if stored_table != table {
        let bad = table
            .chunks(4)
            .zip(stored_table.chunks(4))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!("block {bad} checksum mismatch"));
    }
    if digest != rec.blake3 {
        return Err("BLAKE3 digest mismatch".into());
    }
    Ok(())
}

/// A version's whole data as stored (the bytes, then their block checksums), verified in
/// full: a copy of an embedded version writes it after its own record. Read once and checked
/// in memory, so what is returned is what was checked.
pub fn read_all_verified(
    data: &StoredData,
    rec: &MetaRecord,
) -> io::Result<Result<Vec<u8>, String>> {
    if let Err(e) = data.check_len(rec)? {
        return Ok(Err(e));
    }
    let mut buf = vec![0u8; stored_len(rec.size, rec.block_size as u64) as usize];
    data.file.read_exact_at(&mut buf, data.base)?;
    Ok(verify_stored(&buf, rec).map(|()| buf))
}

/// Checks a version's whole data as stored (the bytes, then their block checksums) against
/// its record: length, every block checksum and the BLAKE3 digest.
pub fn verify_stored(stored: &[u8], rec: &MetaRecord) -> Result<(), String> {
    if rec.block_size == 0 {
        return Err("block size 0".into());
    }
    if stored.len() as u64 != stored_len(rec.size, rec.block_size as u64) {
        return Err(format!(
            "{} bytes of data and checksums, expected {}",
            stored.len(),
            stored_len(rec.size, rec.block_size as u64)
        ));
    }
    let (bytes, table) = stored.split_at(rec.size as usize);
    let mut sums = DataChecksummer::new(rec.block_size);
    sums.update(bytes);
    check_sums(sums, table, rec)
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
            embedded: false,
        };
        let bytes = encode_meta(&rec);
        assert_eq!(decode_meta(&bytes).unwrap(), rec);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode_meta(&b).is_err(), "flip at {i} not detected");
        }
        assert!(decode_meta(&bytes[..bytes.len() - 1]).is_err());
        // A block size a reader would allocate is bounded, checksum or not.
        for bs in [0, 1 << 30] {
            let bad = encode_meta(&MetaRecord {
                block_size: bs,
                ..rec.clone()
            });
            assert!(
                decode_meta(&bad).unwrap_err().contains("block size"),
                "{bs}"
            );
        }
        // A record file must be as long as its record says.
        assert_eq!(
            decode_record_file(&bytes, bytes.len() as u64).unwrap().1,
            bytes.len()
        );
        assert!(decode_record_file(&bytes, bytes.len() as u64 + 1).is_err());
    }

    /// The golden version files (written by `scripts/golden_local.py`, a second
    /// implementation) in a directory of their own, opened.
    fn golden(name: &str) -> (tempfile::TempDir, File) {
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(name),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        let file = File::open(dir.path().join(name)).unwrap();
        (dir, file)
    }

    #[test]
    fn golden_records_of_every_layout_still_read() {
        // A version with its own data file: every version before embedding.
        let (_d, m) = golden("local-record.m");
        let (rec, _) = read_meta(&m).unwrap().unwrap();
        assert_eq!(
            (rec.key.as_str(), rec.size, rec.embedded),
            ("docs/big.bin", 70_000, false)
        );
        assert_eq!(rec.metadata["coffer-mode"], "33188");
        let (_d2, d) = golden("local-record.d");
        let data = StoredData { file: d, base: 0 };
        verify_full(&data, &rec).unwrap().unwrap();
        let want: Vec<u8> = (0..70_000u64)
            .map(|i| ((i * 2_654_435_761) >> 13) as u8)
            .collect();
        let got = read_verified(&data, &rec, 65_530..70_000).unwrap().unwrap();
        assert_eq!(got, want[65_530..]);

        // A small version embedded in its record's file.
        let (_d3, m) = golden("local-embedded.m");
        let (rec, len) = read_meta(&m).unwrap().unwrap();
        assert_eq!(
            (rec.key.as_str(), rec.size, rec.embedded),
            ("docs/small.txt", 14, true)
        );
        let data = StoredData {
            file: m,
            base: len as u64,
        };
        verify_full(&data, &rec).unwrap().unwrap();
        assert_eq!(
            read_verified(&data, &rec, 0..14).unwrap().unwrap(),
            b"hello, coffer\n"
        );
        let all = read_all_verified(&data, &rec).unwrap().unwrap();
        assert_eq!(&all[..14], b"hello, coffer\n");
        assert_eq!(all.len(), 14 + 4);

        // A delete marker.
        let (_d4, x) = golden("local-marker.x");
        let (rec, _) = read_meta(&x).unwrap().unwrap();
        assert!(rec.deleted && !rec.embedded && rec.key == "docs/gone");

        // This implementation writes the same bytes the second one did.
        for name in ["local-record.m", "local-embedded.m", "local-marker.x"] {
            let (_d, f) = golden(name);
            let all = std::fs::read(_d.path().join(name)).unwrap();
            let (rec, _) = read_meta(&f).unwrap().unwrap();
            let enc = encode_meta(&rec);
            assert_eq!(enc[..], all[..enc.len()], "{name}");
        }
    }

    #[test]
    fn damage_to_an_embedded_version_is_caught() {
        let (dir, _) = golden("local-embedded.m");
        let path = dir.path().join("local-embedded.m");
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8]| -> Result<(), String> {
            std::fs::write(&path, bytes).unwrap();
            let file = File::open(&path).unwrap();
            let (rec, len) = read_meta(&file).unwrap()?;
            let data = StoredData {
                file,
                base: len as u64,
            };
            verify_full(&data, &rec).unwrap()?;
            read_verified(&data, &rec, 0..rec.size).unwrap()?;
            read_all_verified(&data, &rec).unwrap().map(|_| ())
        };
        check(&good).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(check(&b).is_err(), "a flip at byte {i} went unnoticed");
        }
        for n in [0, 3, 8, 100, good.len() - 1] {
            let err = check(&good[..n]).unwrap_err();
            assert!(!err.is_empty(), "cut at {n}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(&longer).unwrap_err().contains("expected"));
        // A record with the embedded magic over data too large to embed is refused.
        let mut rec = decode_meta(&good[..good.len() - 18]).unwrap();
        rec.size = EMBED_MAX + 1;
        assert!(
            decode_meta(&encode_meta(&rec))
                .unwrap_err()
                .contains("embedded")
        );
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
            embedded: false,
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
                let got = read_verified_bytes(
                    &StoredData {
                        file: open(cached),
                        base: 0,
                    },
                    &rec,
                    r.clone(),
                )
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
        let err = read_verified_bytes(
            &StoredData {
                file: open("none"),
                base: 0,
            },
            &rec,
            0..size,
        )
        .unwrap()
        .unwrap_err();
        assert!(err.contains("block 16 checksum mismatch"), "{err}");
    }
}
