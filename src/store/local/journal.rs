//! Group commit for the local store: one fdatasync makes many small writes durable.
//!
//! Without it, a put of a small file costs about five fsyncs on every replica (the data
//! file, the record, the versions directory and any new key directories), and a rename or an
//! attribute update three: backups of many small files were bound by them.
//!
//! With it, a small put, a copy (rename, attribute update, restore) and a delete marker are
//! first appended, as one entry holding everything they write, to the replica's journal
//! segment (`journal/<name>.log`), and made durable there by an fdatasync that every write
//! waiting at that moment shares. Then the write is acknowledged, and the same files as
//! before are written into the replica's layout, without any fsync, by the replica's layout
//! worker (see [`super::apply`]): that makes the version visible, from the page cache, to
//! every reader, each of which first waits for the workers. A checkpoint, about a second after a segment's first entry
//! (or once it is full), makes the layout durable with one `syncfs` per
//! replica, removes the versions those writes superseded, and keeps the segment for reuse.
//!
//! After a crash (or a power cut that lost unsynced layout writes), the next process to open
//! the store replays every segment no live process holds (each writer keeps its segments
//! locked with `flock`): every entry's files are compared with the entry and rewritten where
//! they are missing or differ, then the checkpoint runs. A torn entry at a segment's end is
//! an append that was never acknowledged, and is ignored.
//!
//! Segments are files of [`SEGMENT_BYTES`] written with zeros when created and reused after
//! each checkpoint: an entry then overwrites blocks that are already allocated, so its
//! fdatasync writes one data block and no allocation metadata (half the latency of an
//! append, and a third of the disk writes). A reused segment gets a new random generation
//! in its header, and every entry's checksum covers the generation, so entries left from
//! earlier uses end a replay like zeros do.
//!
//! Entry format, little-endian (docs/DESIGN.md):
//!
//! ```text
//! segment: "CFJRNL03" | u64 generation | zeros to 4 KiB | entry* | (zeros or stale entries)
//! entry:   u32 length of body | u32 CRC32C of (generation, body) | body
//! body:    u8 kind | u16 key length | key | u8 id length | id | u32 record length | record | data
//! kind 1 (inline data): data = u32 length | the whole `.d` file
//! kind 2 (linked data): data = u16 length | source key | u8 length | source version id
//! kind 3 (delete marker), kind 4 (cancel: the put of `key`/`id` failed): no data
//! group:   u8 5 | u16 count | (u32 length | body)*   several bodies under one checksum
//! ```
//!
//! A group is how a deferred rename (its copy and its delete marker) is logged: a torn
//! append loses both or neither. Version 02 segments (no groups) are still replayed.
//!
//! **Deferred writes.** A rename, a new directory or a symlink may be acknowledged before
//! its entry is durable ([`JournalWrite::log_deferred`]), as on ext4 they are durable at
//! the next journal commit rather than when they return. Three rules keep that safe:
//! - its layout files are written only once the entry is durable (the layout worker waits
//!   briefly for another write's fdatasync to cover it, then syncs itself:
//!   [`Journal::sync_hold`]), so after a crash the layout never shows half a rename that
//!   the journal does not hold whole;
//! - any later acknowledged write makes it durable first: a journaled write's fdatasync
//!   covers every entry before it in the segment, a segment is synced whole when the next
//!   one takes over ([`Journal::begin`], the checkpoint), and a write in place waits for the
//!   layout workers;
//! - `fsync` of a file or a directory, and unmount, make it durable ([`Journal::sync_all`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The directory of a replica that holds its journal segments.
pub const JOURNAL_DIR: &str = "journal";
const SEGMENT_MAGIC: &[u8; 8] = b"CFJRNL03";
/// The magic of segments written before groups: replayed the same way.
const SEGMENT_MAGIC_02: &[u8; 8] = b"CFJRNL02";
/// The header block of a segment: magic and generation, then zeros.
const SEGMENT_HEADER: usize = 4096;
/// Size of a segment file, written with zeros at creation. A segment is checkpointed when
/// the next entry might not fit.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Checkpointed segments kept for reuse.
const SPARE_SEGMENTS: usize = 2;
const SEGMENT_SUFFIX: &str = ".log";
/// Puts of bodies up to this size go through the journal (larger ones are fsync'd in
/// place: their data dominates, and writing it twice would cost more than the fsyncs).
pub const MAX_INLINE: usize = 1 << 20;
/// A segment is checkpointed this long after its first entry, or when it is full.
pub const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// The largest entry: an inline body, its checksums, a record and a key fit below it. A
/// segment with less room than this left takes no more entries.
const MAX_ENTRY: usize = MAX_INLINE + (1 << 20);

const KIND_INLINE: u8 = 1;
const KIND_LINK: u8 = 2;
const KIND_MARKER: u8 = 3;
const KIND_CANCEL: u8 = 4;
const KIND_GROUP: u8 = 5;

/// Where a journaled version's data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryData {
    /// The whole `.d` file (stored bytes, then the block checksums).
    Inline(Vec<u8>),
    /// A hard link to another version's `.d` file (a copy).
    Link { key: String, id: String },
    /// A delete marker: no data.
    Marker,
    /// The put of this version failed: replay must not bring it back.
    Cancel,
}

/// One journaled write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub id: String,
    /// The encoded `.m` (or `.x`) record.
    pub record: Vec<u8>,
    pub data: EntryData,
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Encodes an entry whose inline data is given in pieces (the stored bytes and their
/// checksum table), so that the body is copied once, into the entry.
pub fn encode(key: &str, id: &str, record: &[u8], data: EntryRef<'_>) -> Vec<u8> {
    debug_assert!(key.len() <= u16::MAX as usize && id.len() <= u8::MAX as usize);
    let inline_len: usize = match &data {
        EntryRef::Inline(parts) => parts.iter().map(|p| p.len()).sum(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(8 + 16 + key.len() + id.len() + record.len() + inline_len);
    out.extend_from_slice(&[0u8; 8]);
    out.push(match data {
        EntryRef::Inline(_) => KIND_INLINE,
        EntryRef::Link { .. } => KIND_LINK,
        EntryRef::Marker => KIND_MARKER,
        EntryRef::Cancel => KIND_CANCEL,
    });
    put_str16(&mut out, key);
    put_str8(&mut out, id);
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
    match data {
        EntryRef::Inline(parts) => {
            out.extend_from_slice(&(inline_len as u32).to_le_bytes());
            for p in parts {
                out.extend_from_slice(p);
            }
        }
        EntryRef::Link { key, id } => {
            put_str16(&mut out, key);
            put_str8(&mut out, id);
        }
        EntryRef::Marker | EntryRef::Cancel => {}
    }
    // The checksum is left zero here: an append computes it, bound to its segment's
    // generation (see [`bind_crc`]).
    let body_len = (out.len() - 8) as u32;
    out[..4].copy_from_slice(&body_len.to_le_bytes());
    out
}

/// One entry holding `entries` (as [`encode`] returns them) under one checksum, so that a
/// torn append keeps all of them or none.
pub fn encode_group(entries: &[impl AsRef<[u8]>]) -> Vec<u8> {
    let len: usize = entries.iter().map(|e| e.as_ref().len() - 4).sum();
    let mut out = Vec::with_capacity(8 + 3 + len);
    out.extend_from_slice(&[0u8; 8]);
    out.push(KIND_GROUP);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for e in entries {
        let body = &e.as_ref()[8..];
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
    }
    let body_len = (out.len() - 8) as u32;
    out[..4].copy_from_slice(&body_len.to_le_bytes());
    out
}

/// The entries of one entry body: one, or a group's.
fn decode_bodies(body: &[u8]) -> Option<Vec<Entry>> {
    if body.first() != Some(&KIND_GROUP) {
        return decode_body(body).map(|e| vec![e]);
    }
    let mut f = Fields(&body[1..]);
    let count = f.u16()?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = f.u32()?;
        out.push(decode_body(f.take(n)?)?);
    }
    f.0.is_empty().then_some(out)
}

/// The checksum of an entry in a segment of `generation`: CRC32C of the generation, then the
/// body. (Computed over the body again on each append rather than combined from the body's
/// own CRC: `crc32c_combine` costs more than hashing a whole small entry.)
fn bind_crc(generation: u64, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), body)
}

/// The data of an entry being encoded, borrowed.
pub enum EntryRef<'a> {
    Inline(&'a [&'a [u8]]),
    Link { key: &'a str, id: &'a str },
    Marker,
    Cancel,
}

/// Reads fields off an entry body; every read is bounds-checked.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Option<usize> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    }
    fn str16(&mut self) -> Option<String> {
        let n = self.u16()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn str8(&mut self) -> Option<String> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<Entry> {
    let mut f = Fields(body);
    let kind = f.u8()?;
    let key = f.str16()?;
    let id = f.str8()?;
    let n = f.u32()?;
    let record = f.take(n)?.to_vec();
    let data = match kind {
        KIND_INLINE => {
            let n = f.u32()?;
            EntryData::Inline(f.take(n)?.to_vec())
        }
        KIND_LINK => EntryData::Link {
            key: f.str16()?,
            id: f.str8()?,
        },
        KIND_MARKER => EntryData::Marker,
        KIND_CANCEL => EntryData::Cancel,
        _ => return None,
    };
    f.0.is_empty().then_some(Entry {
        key,
        id,
        record,
        data,
    })
}

/// The entries of a segment's bytes, in order, and whether it is damaged (a header that is
/// not a segment's, or an entry cut off by the end of the file). The entries end at the
/// first block of zeros or the first entry that fails its checksum: a torn last append or
/// one left from an earlier use of the file, never acknowledged in this one.
pub fn decode_segment(bytes: &[u8]) -> (Vec<Entry>, bool) {
    let mut out = Vec::new();
    if bytes.len() < SEGMENT_HEADER
        || (&bytes[..8] != SEGMENT_MAGIC && &bytes[..8] != SEGMENT_MAGIC_02)
    {
        return (out, !bytes.is_empty());
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let mut rest = &bytes[SEGMENT_HEADER..];
    while rest.len() >= 8 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
        if len == 0 {
            break;
        }
        if len > MAX_ENTRY || rest.len() < 8 + len {
            return (out, true);
        }
        let body = &rest[8..8 + len];
        if bind_crc(generation, body) != crc {
            break;
        }
        match decode_bodies(body) {
            Some(e) => out.extend(e),
            None => break,
        }
        rest = &rest[8 + len..];
    }
    (out, false)
}

/// One replica's file of a segment.
struct Log {
    replica: usize,
    path: PathBuf,
    file: File,
    /// This use's generation (in the header and every entry's checksum).
    generation: u64,
    /// Bytes appended so far (whole entries only).
    end: Mutex<u64>,
    /// Bytes known durable.
    synced: Mutex<u64>,
    /// Notified after every fdatasync (a layout worker waits on it for a deferred entry).
    synced_cv: Condvar,
    /// Set when an append or a sync failed: what the file holds is then unknown, and
    /// every later write through this segment fails until a checkpoint starts a new one.
    broken: AtomicBool,
}

impl Log {
    /// The log of `file`, empty under `generation` (whose header the file holds).
    fn new(replica: usize, path: PathBuf, file: File, generation: u64) -> Log {
        Log {
            replica,
            path,
            file,
            generation,
            end: Mutex::new(SEGMENT_HEADER as u64),
            synced: Mutex::new(SEGMENT_HEADER as u64),
            synced_cv: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    fn broken_error(&self) -> io::Error {
        io::Error::other(format!(
            "journal {} failed earlier; writes resume after the next checkpoint",
            self.path.display()
        ))
    }

    fn append(&self, entry: &[u8]) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut end = self.end.lock();
        if self.broken.load(Ordering::Acquire) {
            return Err(self.broken_error());
        }
        if *end + entry.len() as u64 > SEGMENT_BYTES {
            return Err(io::Error::other(format!(
                "journal {} is full",
                self.path.display()
            )));
        }
        let crc = bind_crc(self.generation, &entry[8..]);
        // The checksum goes in its own small write first: the entry's 8-byte head is written
        // last, so a torn write never shows a length and checksum over bytes not there.
        let result = self
            .file
            .write_all_at(&entry[8..], *end + 8)
            .and_then(|()| {
                let mut head = [0u8; 8];
                head[..4].copy_from_slice(&entry[..4]);
                head[4..].copy_from_slice(&crc.to_le_bytes());
                self.file.write_all_at(&head, *end)
            });
        if let Err(e) = result {
            // Whatever part of the entry landed fails its checksum and ends a replay there;
            // but a later entry after it would be hidden too, so this segment takes no more.
            self.broken.store(true, Ordering::Release);
            return Err(e);
        }
        *end += entry.len() as u64;
        Ok(*end)
    }

    /// Makes everything appended so far durable.
    fn sync_all(&self, syncs: &AtomicU64) -> io::Result<()> {
        let end = *self.end.lock();
        self.sync_to(end, syncs)
    }

    /// Makes the file durable at least up to `upto`. Whoever syncs syncs everything
    /// appended so far, so writers that arrive meanwhile share the next fdatasync.
    fn sync_to(&self, upto: u64, syncs: &AtomicU64) -> io::Result<()> {
        let mut synced = self.synced.lock();
        if *synced >= upto {
            return Ok(());
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(self.broken_error());
        }
        let target = *self.end.lock();
        if let Err(e) = self.file.sync_data() {
            // After a failed fdatasync the kernel may have dropped the dirty pages: nothing
            // appended since the last good sync can be trusted.
            self.broken.store(true, Ordering::Release);
            return Err(e);
        }
        syncs.fetch_add(1, Ordering::Relaxed);
        *synced = target;
        self.synced_cv.notify_all();
        Ok(())
    }

    /// Waits up to `patience` for another writer's fdatasync to make the file durable up to
    /// `upto`, giving up at once when `hurry` says someone waits on the caller. True when
    /// it is durable.
    fn wait_synced(&self, upto: u64, patience: Duration, hurry: &dyn Fn() -> bool) -> bool {
        let deadline = Instant::now() + patience;
        let mut synced = self.synced.lock();
        while *synced < upto {
            if self.broken.load(Ordering::Acquire) || hurry() || Instant::now() >= deadline {
                return false;
            }
            // Short slices, so that `hurry` is asked again soon.
            self.synced_cv
                .wait_for(&mut synced, Duration::from_millis(1));
        }
        true
    }
}

/// The segment that writes are appended to: one file per online replica.
struct Segment {
    logs: Vec<Log>,
    /// Writes appended to this segment whose layout files are not all written yet.
    inflight: Mutex<usize>,
    idle: Condvar,
}

impl Segment {
    /// The segment emptied for reuse under a new generation: whatever its entries were,
    /// none of them counts from now on. A segment that cannot be reset is given back.
    fn reset(self) -> Result<Segment, Segment> {
        let mut logs = Vec::new();
        let mut failed = false;
        for l in self.logs {
            let generation = new_generation();
            if failed
                || l.broken.load(Ordering::Acquire)
                || write_header(&l.file, generation)
                    .and_then(|()| l.file.sync_data())
                    .is_err()
            {
                failed = true;
            }
            logs.push(Log::new(l.replica, l.path, l.file, generation));
        }
        let s = Segment {
            logs,
            inflight: Mutex::new(0),
            idle: Condvar::new(),
        };
        if failed { Err(s) } else { Ok(s) }
    }

    fn remove_files(&self) {
        for log in &self.logs {
            // Not synced: a segment that comes back after a crash is replayed again, which
            // changes nothing, or holds no entry of its current generation.
            let _ = fs::remove_file(&log.path);
        }
    }

    /// Whether every log has room for one more entry of any size.
    fn has_room(&self) -> bool {
        self.logs.iter().all(|l| {
            *l.end.lock() + MAX_ENTRY as u64 <= SEGMENT_BYTES && !l.broken.load(Ordering::Acquire)
        })
    }

    fn log(&self, replica: usize) -> io::Result<&Log> {
        self.logs
            .iter()
            .find(|l| l.replica == replica)
            .ok_or_else(|| io::Error::other(format!("no journal for replica {replica}")))
    }

    /// Makes every log durable up to what was appended so far.
    fn sync_all(&self, syncs: &AtomicU64) -> io::Result<()> {
        self.logs.iter().try_for_each(|l| l.sync_all(syncs))
    }

    fn wait_idle(&self) {
        let mut n = self.inflight.lock();
        while *n > 0 {
            self.idle.wait(&mut n);
        }
    }
}

/// A write in progress through the journal: appends its entry to each replica's log and
/// holds the segment open (not checkpointed) until its layout files are written (see
/// [`SegmentHold`]).
pub struct JournalWrite<'a> {
    journal: &'a Journal,
    hold: SegmentHold,
}

impl JournalWrite<'_> {
    /// Appends `entry` to replica `replica`'s log and waits until it is durable there.
    pub fn log(&self, replica: usize, entry: &[u8]) -> io::Result<()> {
        self.log_all(replica, &[entry])
    }

    /// Appends `entries`, in order, to replica `replica`'s log and waits until they are all
    /// durable there (one fdatasync for them all).
    pub fn log_all(&self, replica: usize, entries: &[impl AsRef<[u8]>]) -> io::Result<()> {
        let log = self.hold.0.log(replica)?;
        let mut end = 0;
        for entry in entries {
            end = log.append(entry.as_ref())?;
        }
        log.sync_to(end, &self.journal.syncs)
    }

    /// Appends `entries` to replica `replica`'s log as one entry (a group when there are
    /// several: a torn append keeps all or none), without waiting for it to be durable.
    /// Returns the offset it must be durable to before its layout files are written
    /// ([`Journal::sync_hold`]); a later durable write covers it (see the module docs).
    pub fn log_deferred(&self, replica: usize, entries: &[impl AsRef<[u8]>]) -> io::Result<u64> {
        let log = self.hold.0.log(replica)?;
        let end = match entries {
            [one] => log.append(one.as_ref()),
            _ => log.append(&encode_group(entries)),
        }?;
        self.journal.deferred.fetch_add(1, Ordering::AcqRel);
        Ok(end)
    }

    /// Whether this segment should be checkpointed now rather than on its timer.
    pub fn full(&self) -> bool {
        !self.hold.0.has_room()
    }

    /// The hold on the segment, for whoever writes the layout files later.
    pub fn into_hold(self) -> SegmentHold {
        self.hold
    }
}

/// Keeps a segment from being checkpointed while a write logged in it has layout files
/// still to write: a checkpoint waits until every hold is dropped, so that its syncfs
/// covers them all.
pub struct SegmentHold(Arc<Segment>);

impl Drop for SegmentHold {
    fn drop(&mut self) {
        let mut n = self.0.inflight.lock();
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The journal of one open store: the current segment on every online replica, the keys
/// whose superseded versions the next checkpoint removes, and its statistics.
pub struct Journal {
    /// (replica index, replica root) of each online replica.
    replicas: Vec<(usize, PathBuf)>,
    current: Mutex<Option<Arc<Segment>>>,
    /// Serializes checkpoints.
    checkpointing: Mutex<()>,
    /// Keys written since the last checkpoint that may have superseded versions to remove,
    /// each with the epoch of its latest write: a checkpoint prunes only the keys whose
    /// writes are in the segments it covers. (One that pruned a key whose newest version's
    /// layout files its worker had not written yet kept the old version, and dropped the
    /// key: the superseded version stayed for good.)
    to_prune: Mutex<BTreeMap<String, u64>>,
    /// Keys that journaled copies link their data from, each with the checkpoint epoch it
    /// was noted in: their older versions must stay until those copies are durable in place
    /// (a replay would link from them again).
    link_sources: Mutex<std::collections::HashMap<String, u64>>,
    /// Counts checkpoints begun; a source noted in epoch `e` is released by the first
    /// checkpoint of epoch `e` or later that succeeds.
    epoch: AtomicU64,
    /// When the oldest work not yet checkpointed appeared.
    since: Mutex<Option<Instant>>,
    /// Segments whose checkpoint failed, or that filled up before their checkpoint: kept
    /// (and locked) until a checkpoint succeeds.
    retry: Mutex<Vec<Arc<Segment>>>,
    /// Checkpointed segments, zeroed once, waiting to be reused.
    spares: Mutex<Vec<Segment>>,
    /// A checkpoint is scheduled (its thread is sleeping or running).
    pub scheduled: AtomicBool,
    /// Test hook: checkpoints do nothing while set, so a test can cut power (drop the
    /// unsynced layout) over writes only the journal holds.
    pub held: AtomicBool,
    syncs: AtomicU64,
    checkpoints: AtomicU64,
    /// Deferred appends so far, and how many of them [`Self::sync_all`] has made durable:
    /// an fsync with none outstanding costs nothing.
    deferred: AtomicU64,
    deferred_synced: AtomicU64,
}

impl Journal {
    pub fn new(replicas: Vec<(usize, PathBuf)>) -> Journal {
        Journal {
            replicas,
            current: Mutex::new(None),
            checkpointing: Mutex::new(()),
            to_prune: Mutex::new(BTreeMap::new()),
            link_sources: Mutex::new(std::collections::HashMap::new()),
            epoch: AtomicU64::new(0),
            since: Mutex::new(None),
            retry: Mutex::new(Vec::new()),
            spares: Mutex::new(Vec::new()),
            scheduled: AtomicBool::new(false),
            held: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            deferred_synced: AtomicU64::new(0),
        }
    }

    /// fdatasyncs of journal segments so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    /// Starts a journaled write; the second value is true when this created a new segment
    /// (the caller then schedules its checkpoint).
    pub fn begin(&self) -> io::Result<(JournalWrite<'_>, bool)> {
        let mut cur = self.current.lock();
        // Full: it waits for the checkpoint with the others, and writes go on in another
        // segment meanwhile.
        if let Some(full) = self.retire_current(&mut cur, |s| !s.has_room()) {
            self.retry.lock().push(full);
        }
        let created = cur.is_none();
        if created {
            let spare = self.spares.lock().pop();
            let segment = match spare {
                Some(s) => s,
                None => self.create_segment()?,
            };
            *cur = Some(Arc::new(segment));
            self.since.lock().get_or_insert_with(Instant::now);
        }
        let segment = cur.clone().expect("set above");
        *segment.inflight.lock() += 1;
        Ok((
            JournalWrite {
                journal: self,
                hold: SegmentHold(segment),
            },
            created,
        ))
    }

    /// Takes the current segment (`cur`, locked) out of use if `retire` says so. Its
    /// deferred entries are made durable first, while the lock keeps any write from
    /// beginning in the next segment: a write acknowledged there must not outlive them in a
    /// crash. A failure leaves the segment broken, for the checkpoint.
    fn retire_current(
        &self,
        cur: &mut Option<Arc<Segment>>,
        retire: impl FnOnce(&Arc<Segment>) -> bool,
    ) -> Option<Arc<Segment>> {
        let s = cur.take_if(|s| retire(s))?;
        let _ = s.sync_all(&self.syncs);
        Some(s)
    }

    /// Makes replica `replica`'s log of the held segment durable up to `upto` (a deferred
    /// entry's end, before its layout files are written). It first waits up to `patience`
    /// for a writer's fdatasync to cover it (the next small file's close, in a copy), unless
    /// `hurry`: one fdatasync then serves both.
    pub fn sync_hold(
        &self,
        hold: &SegmentHold,
        replica: usize,
        upto: u64,
        patience: Duration,
        hurry: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        let log = hold.0.log(replica)?;
        if log.wait_synced(upto, patience, hurry) {
            return Ok(());
        }
        log.sync_to(upto, &self.syncs)
    }

    /// Makes every entry appended so far durable, deferred ones included (`fsync` of a file
    /// or a directory).
    pub fn sync_all(&self) -> io::Result<()> {
        let seen = self.deferred.load(Ordering::Acquire);
        if self.deferred_synced.load(Ordering::Acquire) >= seen {
            return Ok(());
        }
        // A checkpoint running now has taken segments out of `current` and `retry`: its
        // syncfs covers them, so wait for it.
        let _one = self.checkpointing.lock();
        let segments: Vec<Arc<Segment>> = {
            let cur = self.current.lock();
            self.retry
                .lock()
                .iter()
                .cloned()
                .chain(cur.clone())
                .collect()
        };
        segments.iter().try_for_each(|s| s.sync_all(&self.syncs))?;
        self.deferred_synced.fetch_max(seen, Ordering::AcqRel);
        Ok(())
    }

    /// Notes that a journaled copy links from `key`'s data (call it after [`Self::begin`],
    /// before logging the entry).
    pub fn note_link_source(&self, key: &str) {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.link_sources.lock().insert(key.to_string(), epoch);
    }

    /// Whether a journaled copy not yet checkpointed may link from `key`'s data.
    pub fn is_link_source(&self, key: &str) -> bool {
        self.link_sources.lock().contains_key(key)
    }

    /// Notes that `key` may now have superseded versions for the next checkpoint to remove.
    /// Call it after the write's [`Self::begin`] (and, for a journaled write, after its
    /// entry is logged): the epoch read then places the write in a segment.
    pub fn defer_prune(&self, key: &str) {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.to_prune.lock().insert(key.to_string(), epoch);
        self.since.lock().get_or_insert_with(Instant::now);
    }

    /// Drops the current segments without a checkpoint (their files stay, unlocked, for
    /// a replay), as a process killed now would.
    pub fn forget_work(&self) {
        self.current.lock().take();
        self.retry.lock().clear();
        self.spares.lock().clear();
        self.to_prune.lock().clear();
        self.link_sources.lock().clear();
        *self.since.lock() = None;
    }

    /// Removes the checkpointed segments kept for reuse.
    pub fn remove_spares(&self) {
        for s in self.spares.lock().drain(..) {
            s.remove_files();
        }
    }

    /// Whether a checkpoint has anything to do.
    pub fn has_work(&self) -> bool {
        self.since.lock().is_some()
    }

    fn create_segment(&self) -> io::Result<Segment> {
        let name = format!(
            "{:016x}-{}-{:08x}{SEGMENT_SUFFIX}",
            super::now_ns(),
            std::process::id(),
            super::random_u32()
        );
        let mut logs = Vec::new();
        for (index, root) in &self.replicas {
            let dir = root.join(JOURNAL_DIR);
            match fs::create_dir(&dir) {
                Ok(()) => super::durable::sync_dir(root)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let path = dir.join(&name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            lock(&file, true)?;
            prefill(&file)?;
            let generation = new_generation();
            write_header(&file, generation)?;
            file.sync_all()?;
            // The segment's name must be durable before any entry in it counts.
            super::durable::sync_dir(&dir)?;
            logs.push(Log::new(*index, path, file, generation));
        }
        Ok(Segment {
            logs,
            inflight: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    /// How long until the work not yet checkpointed is due (zero if it is due now, or if
    /// there is none). A full segment is due at once.
    pub fn due_in(&self) -> Duration {
        let full = !self.retry.lock().is_empty()
            || self.current.lock().as_ref().is_some_and(|s| !s.has_room());
        match *self.since.lock() {
            Some(t) if !full => CHECKPOINT_AFTER.saturating_sub(t.elapsed()),
            _ => Duration::ZERO,
        }
    }

    /// Makes everything written so far durable in the layout, then removes superseded
    /// versions (`prune`, given the keys) and the segment. Writes go on meanwhile, into a
    /// new segment. `retry` runs once every write in the segments has dropped its hold,
    /// before the syncfs: it writes again the layout files that failed to write (an error
    /// keeps the segments, as a failed syncfs does).
    pub fn checkpoint(
        &self,
        retry: &dyn Fn() -> io::Result<()>,
        prune: &dyn Fn(&BTreeSet<String>) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.held.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.checkpointing.lock();
        // Before the segments are taken: a source noted in this epoch was noted after its
        // writer's `begin`, so its entry is in a segment this checkpoint covers.
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut segments = std::mem::take(&mut *self.retry.lock());
        segments.extend(self.retire_current(&mut self.current.lock(), |_| true));
        *self.since.lock() = None;
        for s in &segments {
            // Every write in the segment has written its layout files: the syncfs below
            // then covers them all.
            s.wait_idle();
        }
        // A key noted in this epoch or before was noted after its write's `begin` took a
        // segment this checkpoint covers, whose layout files are now written; a key noted
        // later may be in a segment begun since, and waits for the next checkpoint.
        let keys: BTreeSet<String> = {
            let mut waiting = self.to_prune.lock();
            let (now, later): (BTreeMap<_, _>, _) = std::mem::take(&mut *waiting)
                .into_iter()
                .partition(|(_, noted)| *noted <= epoch);
            *waiting = later;
            if !waiting.is_empty() {
                self.since.lock().get_or_insert_with(Instant::now);
            }
            now.into_keys().collect()
        };
        if segments.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let result = (|| {
            retry()?;
            self.syncfs_all()?;
            if !keys.is_empty() {
                prune(&keys)?;
                self.syncfs_all()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                for s in segments {
                    // Kept for reuse, under a new generation at once: a replay must never
                    // see its entries again, since versions they wrote may be pruned
                    // later. The rest are removed.
                    let mut spares = self.spares.lock();
                    match Arc::try_unwrap(s) {
                        Ok(s) if spares.len() < SPARE_SEGMENTS => match s.reset() {
                            Ok(s) => spares.push(s),
                            Err(s) => s.remove_files(),
                        },
                        Ok(s) => s.remove_files(),
                        Err(s) => s.remove_files(),
                    }
                }
                self.link_sources.lock().retain(|_, noted| *noted > epoch);
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // The segments stay on disk (and locked) for the next checkpoint, or for
                // the next process to replay; the keys are pruned next time.
                self.retry.lock().extend(segments);
                let mut waiting = self.to_prune.lock();
                for k in keys {
                    waiting.entry(k).or_insert(epoch);
                }
                self.since.lock().get_or_insert_with(Instant::now);
                Err(e)
            }
        }
    }

    fn syncfs_all(&self) -> io::Result<()> {
        for (_, root) in &self.replicas {
            syncfs(root)?;
        }
        Ok(())
    }
}

impl Drop for Journal {
    /// A store closed cleanly leaves no journal behind (its work was checkpointed first).
    fn drop(&mut self) {
        self.remove_spares();
    }
}

/// Writes a new segment full of zeros. Real zeros, not a sparse or fallocated file:
/// overwriting allocated, written blocks is what keeps an entry's fdatasync to one block.
/// And in 4 KiB writes: the page cache keeps what a write made, and a 1 MiB write makes a
/// 1 MiB folio, which every later entry in it dirties, and every fdatasync writes, whole
/// (measured: 1 MiB of disk writes per 600-byte entry). Without room for the zeros the
/// segment grows as entries arrive instead, as an ordinary append.
fn prefill(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let page = [0u8; 4096];
    let mut off = 0;
    while off < SEGMENT_BYTES {
        match file.write_all_at(&page, off) {
            Ok(()) => off += page.len() as u64,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
                file.set_len(0)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn new_generation() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    u64::from_le_bytes(b)
}

/// Writes a segment's header block: magic, generation, zeros.
fn write_header(file: &File, generation: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut header = [0u8; SEGMENT_HEADER];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    file.write_all_at(&header, 0)
}

/// Flushes every dirty page and inode of the filesystem holding `path`.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lock(file: &File, wait: bool) -> io::Result<bool> {
    let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A segment left by a process that is gone, opened and locked for replay.
pub struct DeadSegment {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
    pub torn: bool,
    _lock: File,
}

/// The segments in a replica's journal that no live process holds, oldest first. Segments
/// a live writer holds are left alone: it checkpoints them itself.
pub fn dead_segments(replica_root: &Path) -> io::Result<Vec<DeadSegment>> {
    let dir = replica_root.join(JOURNAL_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(SEGMENT_SUFFIX))
            && entry.file_type()?.is_file()
        {
            paths.push(entry.path());
        }
    }
    // Names start with the creation time: replay in the order they were written.
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !lock(&file, false)? {
            continue;
        }
        // Replayed and removed by another process between our listing and our lock.
        if !path.exists() {
            continue;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (entries, torn) = decode_segment(&bytes);
        out.push(DeadSegment {
            path,
            entries,
            torn,
            _lock: file,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment of `generation` holding `entries` (as [`encode`] returns them), then zeros.
    fn segment_of(generation: u64, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut s = vec![0u8; SEGMENT_HEADER];
        s[..8].copy_from_slice(SEGMENT_MAGIC);
        s[8..16].copy_from_slice(&generation.to_le_bytes());
        for e in entries {
            let mut e = e.clone();
            let crc = bind_crc(generation, &e[8..]);
            e[4..8].copy_from_slice(&crc.to_le_bytes());
            s.extend_from_slice(&e);
        }
        s.extend_from_slice(&[0u8; 4096]);
        s
    }

    #[test]
    fn entries_round_trip() {
        let a = encode("a/b", "0001", b"rec", EntryRef::Inline(&[b"data", b"crcs"]));
        let b = encode(
            "c",
            "0002",
            b"rec2",
            EntryRef::Link {
                key: "a/b",
                id: "0001",
            },
        );
        let c = encode("d", "0003", b"x", EntryRef::Marker);
        let d = encode("a/b", "0001", b"", EntryRef::Cancel);
        let (entries, torn) = decode_segment(&segment_of(7, &[a, b, c, d]));
        assert!(!torn);
        assert_eq!(
            entries,
            vec![
                Entry {
                    key: "a/b".into(),
                    id: "0001".into(),
                    record: b"rec".to_vec(),
                    data: EntryData::Inline(b"datacrcs".to_vec())
                },
                Entry {
                    key: "c".into(),
                    id: "0002".into(),
                    record: b"rec2".to_vec(),
                    data: EntryData::Link {
                        key: "a/b".into(),
                        id: "0001".into()
                    }
                },
                Entry {
                    key: "d".into(),
                    id: "0003".into(),
                    record: b"x".to_vec(),
                    data: EntryData::Marker
                },
                Entry {
                    key: "a/b".into(),
                    id: "0001".into(),
                    record: Vec::new(),
                    data: EntryData::Cancel
                },
            ]
        );
    }

    #[test]
    fn a_torn_or_damaged_tail_or_another_generation_ends_the_segment() {
        let a = encode("a", "1", b"r", EntryRef::Inline(&[b"0123456789"]));
        let b = encode("b", "2", b"r", EntryRef::Marker);
        let whole = segment_of(9, &[a.clone(), b.clone()]);
        let first_end = SEGMENT_HEADER + a.len();
        let second_end = first_end + b.len();
        // Cut anywhere inside the second entry (the rest zeros): the first stands alone.
        for cut in first_end..second_end {
            let mut torn = whole[..cut].to_vec();
            torn.resize(whole.len(), 0);
            let (entries, _) = decode_segment(&torn);
            assert_eq!(entries.len(), 1, "cut at {cut}");
        }
        // A flipped bit anywhere in an entry drops it and everything after it.
        for i in SEGMENT_HEADER..first_end {
            let mut bad = whole.clone();
            bad[i] ^= 0x10;
            let (entries, _) = decode_segment(&bad);
            assert!(entries.is_empty(), "flip at {i}");
        }
        // Entries of another generation (the file's previous use) do not count.
        let mut reused = whole.clone();
        reused[8..16].copy_from_slice(&10u64.to_le_bytes());
        assert_eq!(decode_segment(&reused), (Vec::new(), false));
        // Not a segment at all.
        assert_eq!(decode_segment(b"garbage!garbage"), (Vec::new(), true));
        assert_eq!(decode_segment(b""), (Vec::new(), false));
    }

    /// A deferred rename's copy and delete marker are one group entry: cut anywhere inside
    /// it, neither is replayed (a rename is atomic even when it was never made durable).
    #[test]
    fn a_torn_group_keeps_none_of_its_entries() {
        let a = encode("a", "1", b"r", EntryRef::Inline(&[b"0123456789"]));
        let copy = encode("b", "2", b"r", EntryRef::Link { key: "a", id: "1" });
        let marker = encode("a", "3", b"r", EntryRef::Marker);
        let group = encode_group(&[copy.clone(), marker.clone()]);
        let whole = segment_of(4, &[a.clone(), group.clone()]);
        let (entries, torn) = decode_segment(&whole);
        assert!(!torn);
        let keys: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.key.as_str(), e.id.as_str()))
            .collect();
        assert_eq!(keys, [("a", "1"), ("b", "2"), ("a", "3")]);
        assert_eq!(
            entries[1].data,
            EntryData::Link {
                key: "a".into(),
                id: "1".into()
            }
        );
        assert_eq!(entries[2].data, EntryData::Marker);
        let start = SEGMENT_HEADER + a.len();
        for cut in start..start + group.len() {
            let mut torn = whole[..cut].to_vec();
            torn.resize(whole.len(), 0);
            assert_eq!(decode_segment(&torn).0.len(), 1, "cut at {cut}");
        }
        // A group whose count does not match its bodies is damage, not a shorter group.
        let mut short = group.clone();
        short[9..11].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            decode_segment(&segment_of(4, &[a.clone(), short])).0.len(),
            1
        );
        let mut long = group;
        long[9..11].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(decode_segment(&segment_of(4, &[a, long])).0.len(), 1);
    }

    /// Segments from before groups (version 02) are replayed as they were written.
    #[test]
    fn version_02_segments_still_replay() {
        let a = encode("a", "1", b"r", EntryRef::Marker);
        let mut s = segment_of(3, &[a]);
        s[..8].copy_from_slice(SEGMENT_MAGIC_02);
        let (entries, torn) = decode_segment(&s);
        assert!(!torn);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, "a");
    }

    #[test]
    fn a_huge_length_is_refused_without_allocating() {
        let mut s = segment_of(1, &[]);
        s[SEGMENT_HEADER..SEGMENT_HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_segment(&s), (Vec::new(), true));
    }

    #[test]
    fn concurrent_writers_share_fdatasyncs() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::new(vec![(0, dir.path().to_path_buf())]));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let (w, _) = j.begin().unwrap();
                        let e = encode(&format!("k{t}-{i}"), "1", b"r", EntryRef::Marker);
                        w.log(0, &e).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 400 durable appends; with eight writers at once most share a sync.
        assert!(j.syncs() < 400, "{} syncs for 400 appends", j.syncs());
        let segs = dead_segments(dir.path()).unwrap();
        assert!(segs.is_empty(), "a live journal's segment is not dead");
        j.checkpoint(&|| Ok(()), &|_| Ok(())).unwrap();
        // The checkpointed segment is kept for reuse, with nothing in it that counts.
        let files: Vec<_> = fs::read_dir(dir.path().join(JOURNAL_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(fs::metadata(&files[0]).unwrap().len(), SEGMENT_BYTES);
        assert!(decode_segment(&fs::read(&files[0]).unwrap()).0.is_empty());
        // Reused: the next write goes into the same file.
        let (w, _) = j.begin().unwrap();
        w.log(0, &encode("again", "1", b"r", EntryRef::Marker))
            .unwrap();
        let (entries, _) = decode_segment(&fs::read(&files[0]).unwrap());
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, "again");
        drop(w);
        j.checkpoint(&|| Ok(()), &|_| Ok(())).unwrap();
        drop(j);
        assert_eq!(
            fs::read_dir(dir.path().join(JOURNAL_DIR)).unwrap().count(),
            0,
            "a journal closed cleanly leaves no file"
        );
    }

    /// The race a full test run found: a checkpoint waiting for the layout files of a write
    /// in its segment must not prune a key written meanwhile in the next segment, whose
    /// worker may not have put the new version in place yet (the prune would keep the old
    /// one and forget the key).
    #[test]
    fn a_checkpoint_prunes_only_the_keys_of_the_segments_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::new(vec![(0, dir.path().to_path_buf())]));
        // A write in the current segment, its layout files still to write.
        let (w, _) = j.begin().unwrap();
        w.log(0, &encode("old", "1", b"r", EntryRef::Marker))
            .unwrap();
        j.defer_prune("old");
        let hold = w.into_hold();
        let pruned = Arc::new(Mutex::new(Vec::new()));
        let checkpoint = {
            let (j, pruned) = (j.clone(), pruned.clone());
            std::thread::spawn(move || {
                j.checkpoint(&|| Ok(()), &|keys| {
                    pruned.lock().push(keys.iter().cloned().collect::<Vec<_>>());
                    Ok(())
                })
                .unwrap();
            })
        };
        // The checkpoint has taken the segment and waits for the hold: a write now goes
        // into a new segment, which this checkpoint does not cover.
        while j.current.lock().is_some() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (w2, created) = j.begin().unwrap();
        assert!(created, "the checkpoint took the old segment");
        w2.log(0, &encode("new", "1", b"r", EntryRef::Marker))
            .unwrap();
        j.defer_prune("new");
        let hold2 = w2.into_hold();
        drop(hold);
        checkpoint.join().unwrap();
        assert_eq!(*pruned.lock(), vec![vec!["old".to_string()]]);
        assert!(j.has_work(), "the key left waits for the next checkpoint");
        drop(hold2);
        j.checkpoint(&|| Ok(()), &|keys| {
            pruned.lock().push(keys.iter().cloned().collect::<Vec<_>>());
            Ok(())
        })
        .unwrap();
        assert_eq!(pruned.lock()[1], vec!["new".to_string()]);
    }

    #[test]
    fn a_segment_left_behind_is_found_for_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::new(vec![(0, dir.path().to_path_buf())]);
            let (w, created) = j.begin().unwrap();
            assert!(created);
            w.log(0, &encode("k", "1", b"r", EntryRef::Marker)).unwrap();
            // Dropped without a checkpoint, as a killed process would leave it.
        }
        let segs = dead_segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].entries.len(), 1);
        assert!(!segs[0].torn);
    }
}
