//! The local N-replica store: every object is written to N replica directories (ideally on
//! different disks) and a put returns only once every replica has it durably.
//!
//! Layout, record format and the write protocol are described in `docs/DESIGN.md`; in short:
//! the data of a put streams into a temporary file in each replica's `tmp/`, is fsync'd and
//! renamed into the key's directory as `%<version>.d`; then the metadata record
//! `%<version>.m`, the commit point, is written the same way, and the directory is
//! fsync'd (stores made before stop 30 keep these files in a `%v/` directory below,
//! [`layout::VersionLayout`]). Small versions written through the [`journal`] have no
//! `.d` file: their data follows the record in its file. A version is visible only once its record is; a put that fails on any replica
//! removes what it committed on the others, so the previous version stays the latest
//! everywhere. Reads take the newest version any replica has, verify every block they
//! return, and repair replicas that lack the version or fail verification from a good one.

mod apply;
pub mod direct;
pub mod durable;
pub mod journal;
mod key_dir;
pub mod layout;
pub mod record;
pub mod replica;
pub mod scrub;
pub mod sse;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::faulty::FaultKind;
use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, Metadata, ObjectInfo, ObjectStore,
    PutOptions, Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo, clamp_range,
    metadata_size,
};
use apply::{ApplyQueue, Job, Wake};
use journal::{EntryData, EntryRef, Journal, SegmentHold};
use key_dir::{key_dir_contents, listable_component, walk};
use layout::DirSync;
use record::{BLOCK_SIZE, DataChecksummer, MetaRecord};
use replica::{
    DATA_SUFFIX, DELETE_SUFFIX, META_SUFFIX, RecordFile, Replica, ReplicaError, VersionName,
};

/// How a local store is laid out, as kept in the store's config file.
#[derive(Clone, Debug, Default)]
pub struct LocalStoreConfig {
    pub store_id: String,
    pub replicas: Vec<PathBuf>,
    pub versioning: bool,
    /// The store-held key of SSE-S3 (kept apart from the replicas).
    pub sse_store_key: Option<super::SseCustomerKey>,
    /// Refuse puts without server-side encryption, like a bucket policy denying them.
    pub require_encryption: bool,
    /// Where the replicas keep a key's version files (the flat layout unless the store
    /// was made before it).
    pub layout: layout::VersionLayout,
}

/// The local N-replica store. Cheap to clone; dropping the last clone closes it.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
    /// Shared by the clones only, not by the store's own threads and uploads: its drop is
    /// the last handle's.
    _closer: Arc<Closer>,
}

/// Closes the store on the thread that drops its last handle. A background thread (the
/// timed checkpoint, a layout worker) may hold the store for a moment; left to the last
/// holder, the close ran there, after the drop had returned, and raced with the next open
/// of the same store (a test run saw the journal still on disk after a clean close).
struct Closer(std::sync::Weak<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.close();
        }
    }
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

struct Inner {
    store_id: String,
    replicas: Vec<Replica>,
    versioning: bool,
    /// Last version id's time part, to keep ids increasing within this process.
    clock: Mutex<u64>,
    repairs: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Replicas rewritten by repairs on read, for the statistics.
    repaired: std::sync::atomic::AtomicU64,
    /// Test hook: writes to these replicas fail with the given fault.
    replica_faults: Mutex<BTreeMap<usize, FaultKind>>,
    /// Test hook: the layout files of journaled writes fail to write on these replicas.
    layout_faults: Mutex<BTreeMap<usize, FaultKind>>,
    sse_store_key: Option<super::SseCustomerKey>,
    require_encryption: bool,
    /// Group commit of small writes (see [`journal`]).
    journal: Journal,
    /// Striped locks, by replica and key, between a write's layout files and a
    /// checkpoint's removal of that key's superseded versions and emptied directories.
    key_locks: Vec<Mutex<()>>,
    /// Per replica (by index), the layout files of journaled writes still to write.
    apply: Vec<Arc<ApplyQueue>>,
    /// Layout files that failed to write (the write is durable in the journal): written
    /// again by every checkpoint, which keeps the journal until they are.
    failed_applies: Mutex<Vec<FailedApply>>,
    /// Per key, the newest journaled version whose layout files some replica's worker has
    /// still to write, so that a copy or delete of a file just written (a rename, an
    /// attribute update) need not wait for them.
    pending: Mutex<HashMap<String, PendingVersion>>,
}

struct PendingVersion {
    newest: Arc<journal::Entry>,
    /// Jobs of this key queued and not yet written, over all replicas.
    jobs: usize,
}

/// A journaled write whose layout files failed to write on one replica.
struct FailedApply {
    replica: usize,
    entry: Arc<journal::Entry>,
    cause: String,
}

/// Stripes of [`Inner::key_locks`].
const KEY_LOCK_STRIPES: usize = 64;

/// How long a layout worker waits for another write's fdatasync to make a deferred entry
/// (a file's rename) durable before it syncs the journal itself. In a copy of many small
/// files the next close comes within a millisecond, and its fdatasync then serves both
/// (measured: the worker syncing at once took that close's turn and left it waiting).
const DEFERRED_PATIENCE: Duration = Duration::from_millis(10);

impl Drop for Inner {
    fn drop(&mut self) {
        // The workers cannot run without the store: what they had left is written here.
        for (i, q) in self.apply.iter().enumerate() {
            q.drain(&mut |job| self.apply_job(i, &job, false));
            q.close();
        }
        // The queues are empty now: the close's settle returns at once.
        self.close();
    }
}

impl LocalStore {
    /// Creates the replica directories of a new store.
    pub fn init(cfg: &LocalStoreConfig) -> io::Result<()> {
        for (i, root) in cfg.replicas.iter().enumerate() {
            let r = Replica::new(i, root.clone(), cfg.layout);
            if r.root.join(replica::MARKER_FILE).exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is already a coffer replica", r.root.display()),
                ));
            }
            r.init(&cfg.store_id)?;
        }
        Ok(())
    }

    /// Opens a store. Replicas whose directory is missing or is not this store's are marked
    /// offline (with an error in the log): reads are served by the others, writes fail.
    pub fn open(cfg: &LocalStoreConfig) -> StoreResult<LocalStore> {
        let mut replicas = Vec::new();
        for (i, root) in cfg.replicas.iter().enumerate() {
            let mut r = Replica::new(i, root.clone(), cfg.layout);
            if let Err(e) = r.check_marker(&cfg.store_id) {
                tracing::error!("replica {i} is offline: {e}");
                r.online = false;
            }
            replicas.push(r);
        }
        if !replicas.iter().any(|r| r.online) {
            return Err(StoreError::Unavailable {
                key: String::new(),
                detail: "no replica of the local store is online".into(),
            });
        }
        let journal = Journal::new(
            replicas
                .iter()
                .filter(|r| r.online)
                .map(|r| (r.index, r.root.clone()))
                .collect(),
        );
        let inner = Arc::new(Inner {
            store_id: cfg.store_id.clone(),
            replicas,
            versioning: cfg.versioning,
            clock: Mutex::new(0),
            repairs: Mutex::new(Vec::new()),
            repaired: Default::default(),
            replica_faults: Mutex::new(BTreeMap::new()),
            layout_faults: Mutex::new(BTreeMap::new()),
            sse_store_key: cfg.sse_store_key.clone(),
            require_encryption: cfg.require_encryption,
            journal,
            key_locks: (0..KEY_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            apply: (0..cfg.replicas.len()).map(|_| Arc::default()).collect(),
            failed_applies: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
        });
        let store = LocalStore {
            _closer: Arc::new(Closer(Arc::downgrade(&inner))),
            inner,
        };
        // Writes a crashed writer acknowledged may be only in its journal: put them back
        // in place before anything reads.
        if let Err(e) = store.inner.replay_journals() {
            tracing::error!(
                "local store: replaying the journal of an earlier process failed: {e}; \
                 what it holds is replayed at the next open"
            );
        }
        Ok(store)
    }

    /// Makes every acknowledged write durable in place and removes superseded versions now
    /// instead of within a second (unmount calls it; a later open would replay otherwise).
    pub fn checkpoint(&self) -> StoreResult<()> {
        self.inner
            .checkpoint()
            .map_err(|e| StoreError::io("", "checkpointing the journal", e))
    }

    /// Test hook: ends this store as a killed process would, without a checkpoint: its
    /// journal segments stay for the next open to replay.
    pub fn abandon(self) {
        // The journal keeps nothing in memory that a replay needs; what stops the final
        // checkpoint is taking its work away.
        let inner = self.inner;
        for q in &inner.apply {
            q.forget();
        }
        inner.pending.lock().clear();
        inner.journal.forget_work();
        drop(inner);
    }

    /// Test hook: while held, no checkpoint runs (writes stay in the journal only, their
    /// layout files unsynced).
    pub fn hold_checkpoints(&self, hold: bool) {
        self.inner
            .journal
            .held
            .store(hold, std::sync::atomic::Ordering::Release);
    }

    /// Test hook: while held, the layout files of journaled writes wait unwritten (and so
    /// does every read, which waits for them).
    pub fn hold_layout(&self, hold: bool) {
        for q in &self.inner.apply {
            q.pause(hold);
        }
    }

    /// fdatasyncs of the journal and checkpoints so far (for tests and statistics).
    pub fn journal_stats(&self) -> (u64, u64) {
        (self.inner.journal.syncs(), self.inner.journal.checkpoints())
    }

    /// Removes temporary files of puts that never completed (after a crash). Call only while
    /// no other process writes to the store.
    pub fn clean_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for r in self.inner.replicas.iter().filter(|r| r.online) {
            n += r.clean_tmp()?;
        }
        Ok(n)
    }

    pub fn replica_roots(&self) -> Vec<PathBuf> {
        self.inner.replicas.iter().map(|r| r.root.clone()).collect()
    }

    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// Test hook: make writes to replica `index` fail (or succeed again with `None`).
    pub fn set_replica_fault(&self, index: usize, fault: Option<FaultKind>) {
        set_fault(&self.inner.replica_faults, index, fault);
    }

    /// Test hook: make the layout files of journaled writes (written after the write is
    /// acknowledged) fail to write on replica `index`, or succeed again with `None`.
    pub fn set_layout_fault(&self, index: usize, fault: Option<FaultKind>) {
        set_fault(&self.inner.layout_faults, index, fault);
    }

    /// Waits for the repairs that reads have started in the background.
    pub async fn wait_repairs(&self) {
        loop {
            let handles: Vec<_> = std::mem::take(&mut *self.inner.repairs.lock());
            if handles.is_empty() {
                return;
            }
            for h in handles {
                let _ = h.await;
            }
        }
    }

    /// Deletes old versions: keeps the newest `keep` versions of every key under `prefix`,
    /// and of the rest deletes those older than `older_than` (all of them when `None`).
    /// Returns how many versions were removed.
    pub async fn prune_versions(
        &self,
        prefix: &str,
        keep: usize,
        older_than: Option<Duration>,
    ) -> StoreResult<usize> {
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        blocking(move || inner.prune(&prefix, keep, older_than)).await
    }

    pub(crate) fn repair_version(
        &self,
        key: &str,
        v: &VersionName,
        good: usize,
        bad: &[usize],
    ) -> io::Result<()> {
        self.inner.settle();
        self.inner.repair(key, v, good, bad)
    }
}

impl LocalStore {
    /// A server-side copy of `src` to `dst`, and with `delete_src` a delete marker for `src`
    /// written with it (see [`ObjectStore::rename`]).
    async fn copy_then_delete(
        &self,
        src: &str,
        dst: &str,
        opts: &CopyOptions,
        delete_src: bool,
    ) -> StoreResult<ObjectInfo> {
        validate_key(dst)?;
        let put = PutOptions {
            metadata: opts.metadata.clone().unwrap_or_default(),
            sse: opts.sse.clone(),
            checksum: None,
            defer_durability: false,
        };
        if opts.metadata.is_some() {
            self.inner.validate_put(dst, &put)?;
        } else {
            self.inner.check_writable(dst)?;
        }
        let inner = self.inner.clone();
        let (src, dst) = (src.to_string(), dst.to_string());
        let new_meta = opts.metadata.clone();
        let src_id = opts.source_version_id.clone();
        let if_match = opts.source_if_match.clone();
        let (src_sse, dst_sse) = (opts.source_sse.clone(), opts.sse.clone());
        let deferred = opts.defer_durability;
        blocking(move || {
            // Find a verified record of the source; the data file is shared by a hard link,
            // so a copy moves no data (rename and metadata updates cost one small write).
            // A source just written is copied from its journal entry: the copy's own entry
            // queues behind the source's layout files on every replica.
            let (rec, id) = inner.record_of(&src, src_id.as_deref())?;
            let src_key = sse::for_get(&src, rec.sse.as_ref(), &src_sse, inner.store_key())?;
            crate::store::check_source_etag(&src, &rec.etag, if_match.as_deref())?;
            if !sse::same_encryption(rec.sse.as_ref(), &dst_sse) {
                inner.settle();
                let metadata = new_meta.unwrap_or(rec.metadata.clone());
                let info =
                    inner.copy_reencrypting(&src, &id, &rec, src_key, &dst, metadata, &dst_sse)?;
                if delete_src {
                    inner.put_marker(&src)?;
                }
                return Ok(info);
            }
            let v = VersionName {
                id: inner.next_version_id(),
                deleted: false,
            };
            let new = MetaRecord {
                key: dst.clone(),
                mtime_ns: now_ns(),
                metadata: new_meta.unwrap_or(rec.metadata.clone()),
                ..rec.clone()
            };
            let bytes = record::encode_meta(&new);
            // An embedded source too: its entry stays small (a metadata update's fdatasync
            // writes one block), and the layout worker copies the bytes.
            let copy = JournaledVersion {
                key: &dst,
                v: &v,
                record: &bytes,
                layout: Layout::Link { key: &src, id: &id },
            };
            if delete_src {
                let (marker_v, marker) = inner.marker(&src);
                inner.write_journaled_with(
                    &[
                        copy,
                        JournaledVersion {
                            key: &src,
                            v: &marker_v,
                            record: &marker,
                            layout: Layout::Marker,
                        },
                    ],
                    deferred,
                )?;
            } else {
                inner.write_journaled_with(&[copy], deferred)?;
            }
            Ok(info_of(&new, &v.id))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    crate::blocking::run(f)
        .await
        .unwrap_or_else(|e| Err(task_failed(e)))
}

/// A store task that panicked or was cancelled: a bug or a shutdown, not the caller's
/// request, so an I/O error (EIO), not EINVAL.
fn task_failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        key: String::new(),
        context: "store task failed".into(),
        source: io::Error::other(e.to_string()),
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source works");
    u32::from_le_bytes(b)
}

/// Runs `f` for each item, on scoped threads when there is more than one (replicas sit on
/// different disks, and their fsyncs should overlap).
fn for_each_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|it| s.spawn(|| f(it))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("replica worker panicked"))
            .collect()
    })
}

/// Picks the error to report from per-replica failures: no space first (it has its own
/// errno), then any other.
fn worst(key: &str, errors: Vec<(usize, io::Error)>) -> StoreError {
    let detail = errors
        .iter()
        .map(|(i, e)| format!("replica {i}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    let nospace = errors
        .iter()
        .any(|(_, e)| matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)));
    if nospace {
        StoreError::NoSpace {
            key: key.to_string(),
            detail,
        }
    } else {
        let first = errors.into_iter().next().map(|(_, e)| e).unwrap();
        StoreError::Io {
            key: key.to_string(),
            context: detail,
            source: first,
        }
    }
}

/// A copy of `e` for a second report of the same failure (its errno kept: [`worst`] tells
/// ENOSPC by it).
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Pairs per-replica results with replica indices and keeps the failures.
fn failures(
    results: Vec<io::Result<()>>,
    indices: impl Iterator<Item = usize>,
) -> Vec<(usize, io::Error)> {
    results
        .into_iter()
        .zip(indices)
        .filter_map(|(r, i)| r.err().map(|e| (i, e)))
        .collect()
}

fn info_of(rec: &MetaRecord, id: &str) -> ObjectInfo {
    ObjectInfo {
        key: rec.key.clone(),
        size: rec.size,
        mtime: UNIX_EPOCH + Duration::from_nanos(rec.mtime_ns),
        etag: rec.etag.clone(),
        version_id: Some(id.to_string()),
        metadata: Some(rec.metadata.clone()),
    }
}

/// One version written through the journal (see [`Inner::write_journaled_all`]).
struct JournaledVersion<'a> {
    key: &'a str,
    v: &'a VersionName,
    record: &'a [u8],
    layout: Layout<'a>,
}

/// What a journaled version writes into a replica's layout besides its record.
enum Layout<'a> {
    /// A new data file: the stored bytes, then their block checksums.
    Inline { stored: &'a [u8], table: &'a [u8] },
    /// A hard link to the data file of version `id` of `key` (a copy).
    Link { key: &'a str, id: &'a str },
    /// A delete marker: no data file.
    Marker,
}

/// The stored bytes and block checksums of embedded version `id` of `key`, verified in full,
/// from replica `r` or else from the first of `replicas` that holds them intact: what a copy
/// of that version writes after its own record.
fn embedded_source(r: &Replica, key: &str, id: &str, replicas: &[&Replica]) -> io::Result<Vec<u8>> {
    let v = VersionName {
        id: id.to_string(),
        deleted: false,
    };
    let mut why = Vec::new();
    for rep in std::iter::once(r).chain(replicas.iter().copied().filter(|g| g.index != r.index)) {
        let read = rep.open_record(key, &v).and_then(|(rec, file)| {
            if !rec.embedded {
                return Err(ReplicaError::Corrupt("its data is not embedded".into()));
            }
            let data = rep.open_data(key, &v, &rec, file)?;
            record::read_all_verified(&data, &rec)?.map_err(ReplicaError::Corrupt)
        });
        match read {
            Ok(stored) => return Ok(stored),
            Err(e) => why.push(format!("replica {} {e}", rep.index)),
        }
    }
    Err(io::Error::other(why.join("; ")))
}

/// Writes `bytes` to `path` through a file in `tmp` and a rename, replacing any file there.
fn write_replacing(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let t = tmp.join(format!("replay-{:08x}", random_u32()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&t)?;
        f.write_all(bytes)?;
    }
    fs::rename(&t, path)
}

/// A write in progress on every replica: one temporary data file each.
struct PendingWrite {
    key: String,
    id: String,
    files: Vec<(usize, direct::DataFile, PathBuf)>,
    sums: DataChecksummer,
    metadata: Metadata,
    /// Server-side encryption of the stored bytes, and how many were written.
    sse: Option<(record::SseRecord, sse::ObjectKey)>,
    written: u64,
}

impl Inner {
    fn online(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.online)
    }

    fn next_version_id(&self) -> String {
        let mut last = self.clock.lock();
        let t = now_ns().max(*last + 1);
        *last = t;
        format!("{t:016x}{:08x}", random_u32())
    }

    fn check_writable(&self, key: &str) -> StoreResult<()> {
        if let Some(r) = self.replicas.iter().find(|r| !r.online) {
            return Err(StoreError::Unavailable {
                key: key.to_string(),
                detail: format!(
                    "replica {} ({}) is offline; writes need every replica",
                    r.index,
                    r.root.display()
                ),
            });
        }
        Ok(())
    }

    fn injected(&self, index: usize) -> io::Result<()> {
        fault_error(self.replica_faults.lock().get(&index))
    }

    fn injected_in_layout(&self, index: usize) -> io::Result<()> {
        fault_error(self.layout_faults.lock().get(&index))
    }
}

/// Sets (or with `None` clears) the injected fault of replica `index` in `faults`.
fn set_fault(faults: &Mutex<BTreeMap<usize, FaultKind>>, index: usize, fault: Option<FaultKind>) {
    let mut f = faults.lock();
    match fault {
        Some(k) => f.insert(index, k),
        None => f.remove(&index),
    };
}

/// The error an injected fault stands for.
fn fault_error(fault: Option<&FaultKind>) -> io::Result<()> {
    match fault {
        None => Ok(()),
        Some(FaultKind::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        Some(FaultKind::AccessDenied) => Err(io::Error::from_raw_os_error(libc::EACCES)),
        Some(FaultKind::Transient) => Err(io::Error::from_raw_os_error(libc::EIO)),
    }
}

impl Inner {
    fn validate_put(&self, key: &str, opts: &PutOptions) -> StoreResult<()> {
        validate_key(key)?;
        if metadata_size(&opts.metadata) > StoreLimits::S3.max_metadata_bytes {
            return Err(StoreError::invalid(
                key,
                format!(
                    "user metadata of {} bytes is over the limit of {}",
                    metadata_size(&opts.metadata),
                    StoreLimits::S3.max_metadata_bytes
                ),
            ));
        }
        if self.require_encryption && opts.sse.is_none() {
            return Err(StoreError::AccessDenied {
                key: key.to_string(),
                detail: "the store's policy refuses writes without server-side encryption".into(),
            });
        }
        self.check_writable(key)
    }

    fn store_key(&self) -> Option<&[u8; 32]> {
        self.sse_store_key.as_ref().map(|k| k.bytes())
    }

    fn begin(&self, key: &str, metadata: Metadata, sse_req: &Sse) -> StoreResult<PendingWrite> {
        let sse = sse::for_put(key, sse_req, self.store_key())?;
        let id = self.next_version_id();
        let mut files = Vec::new();
        for r in self.online() {
            let path = r
                .tmp
                .join(format!("{id}-{:08x}{DATA_SUFFIX}", random_u32()));
            let f = self
                .injected(r.index)
                .and_then(|()| direct::DataFile::create(&path));
            match f {
                Ok(f) => files.push((r.index, f, path)),
                Err(e) => {
                    for (_, _, p) in &files {
                        let _ = fs::remove_file(p);
                    }
                    return Err(worst(key, vec![(r.index, e)]));
                }
            }
        }
        Ok(PendingWrite {
            key: key.to_string(),
            id,
            files,
            sums: DataChecksummer::new(BLOCK_SIZE),
            metadata,
            sse,
            written: 0,
        })
    }

    fn write(&self, w: &mut PendingWrite, data: &[u8]) -> StoreResult<()> {
        let encrypted;
        let data = match &w.sse {
            Some((_, k)) => {
                let mut buf = data.to_vec();
                k.apply(w.written, &mut buf);
                encrypted = buf;
                &encrypted[..]
            }
            None => data,
        };
        w.written += data.len() as u64;
        w.sums.update(data);
        let results = for_each_parallel(&w.files, |(i, f, _)| {
            self.injected(*i)?;
            f.append(data)
        });
        let errors = failures(results, w.files.iter().map(|(i, _, _)| *i));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(worst(&w.key, errors))
        }
    }

    /// A whole put of a small body through the journal: one shared fdatasync per replica
    /// instead of the data, record and directory fsyncs of [`Self::commit`]; `deferred`,
    /// acknowledged before it (see [`Self::write_journaled_with`]).
    fn put_journaled(
        self: &Arc<Self>,
        key: &str,
        body: &[u8],
        metadata: Metadata,
        sse_req: &Sse,
        deferred: bool,
    ) -> StoreResult<ObjectInfo> {
        let sse = sse::for_put(key, sse_req, self.store_key())?;
        let encrypted;
        let stored = match &sse {
            Some((_, k)) => {
                let mut buf = body.to_vec();
                k.apply(0, &mut buf);
                encrypted = buf;
                &encrypted[..]
            }
            None => body,
        };
        let mut sums = DataChecksummer::new(BLOCK_SIZE);
        sums.update(stored);
        let (table, digest, size) = sums.finish();
        let id = self.next_version_id();
        let mut rec = MetaRecord::live(key, size, digest, metadata, sse.map(|(r, _)| r));
        rec.embedded = size <= record::EMBED_MAX;
        let v = VersionName {
            id: id.clone(),
            deleted: false,
        };
        let layout = Layout::Inline {
            stored,
            table: &table,
        };
        let write = JournaledVersion {
            key,
            v: &v,
            record: &record::encode_meta(&rec),
            layout,
        };
        self.write_journaled_with(&[write], deferred)?;
        Ok(info_of(&rec, &id))
    }

    /// Finishes a write on every replica; on any failure removes it from all of them.
    fn commit(self: &Arc<Self>, w: PendingWrite) -> StoreResult<ObjectInfo> {
        // In place and in order with the journaled writes before it.
        self.settle();
        let PendingWrite {
            key,
            id,
            files,
            sums,
            metadata,
            sse,
            ..
        } = w;
        let (table, digest, size) = sums.finish();
        let rec = MetaRecord::live(&key, size, digest, metadata, sse.map(|(r, _)| r));
        let meta_bytes = record::encode_meta(&rec);
        let v = VersionName {
            id: id.clone(),
            deleted: false,
        };
        let results = for_each_parallel(&files, |(i, f, tmp_path)| {
            let r = &self.replicas[*i];
            self.injected(*i)?;
            f.finish(&table)?;
            let _locked = self.key_lock(*i, &key);
            let dir = r.create_key_dirs(&key, DirSync::Now)?;
            fs::rename(tmp_path, dir.join(r.layout.file_name(&id, DATA_SUFFIX)))?;
            self.write_record(r, &dir, &v, &meta_bytes)
        });
        let errors = failures(results, files.iter().map(|(i, _, _)| *i));
        let tmp_files: Vec<PathBuf> = files.iter().map(|(_, _, p)| p.clone()).collect();
        self.finish_commit(&key, &v, errors, &tmp_files, false)?;
        Ok(info_of(&rec, &id))
    }

    /// Writes a version's record into `dir` (its key's versions directory on `r`) via
    /// `tmp/`, then fsyncs `dir`.
    fn write_record(
        &self,
        r: &Replica,
        dir: &Path,
        v: &VersionName,
        bytes: &[u8],
    ) -> io::Result<()> {
        let suffix = if v.deleted {
            DELETE_SUFFIX
        } else {
            META_SUFFIX
        };
        let tmp = r.tmp.join(format!("{}-{:08x}{suffix}", v.id, random_u32()));
        durable::write_file_synced(&tmp, bytes)?;
        fs::rename(&tmp, dir.join(r.layout.file_name(&v.id, suffix)))?;
        durable::sync_dir(dir)
    }

    /// After a write on every replica: if any failed, takes the version back out of all of
    /// them (record first, so it is never visible half-removed) and reports the failure;
    /// otherwise prunes older versions of an unversioned store. `journaled`: the version is
    /// durable through the journal only, not yet in place.
    fn finish_commit(
        self: &Arc<Self>,
        key: &str,
        v: &VersionName,
        errors: Vec<(usize, io::Error)>,
        tmp_files: &[PathBuf],
        journaled: bool,
    ) -> StoreResult<()> {
        if !errors.is_empty() {
            for tmp in tmp_files {
                let _ = durable::remove_file_if_exists(tmp);
            }
            for r in self.online() {
                let _ = durable::remove_file_if_exists(&r.record_path(key, v));
                let _ = durable::remove_file_if_exists(&r.data_path(key, &v.id));
                let _ = durable::sync_dir(&r.versions_dir(key));
            }
            return Err(worst(key, errors));
        }
        if !self.versioning {
            if !journaled && !self.journal.is_link_source(key) {
                // Durable in place already, and no journaled copy needs the old data: pruned
                // now. (Left to a checkpoint, a process killed first would leave the old
                // version for good: only journaled keys are pruned by a replay.)
                match self.prune_key(key, 1, None, false) {
                    Ok(_) => return Ok(()),
                    Err(e) => warn!("{key}: removing superseded versions: {e}; retried later"),
                }
            }
            // Removed at the next checkpoint, once the new version is durable in place and
            // no journaled copy can need the old version's data file.
            self.journal.defer_prune(key);
            self.schedule_checkpoint();
        }
        Ok(())
    }

    fn abort(&self, w: PendingWrite) {
        for (_, _, p) in &w.files {
            let _ = fs::remove_file(p);
        }
    }

    /// The newest version of `key` that any online replica has (or `id` if given), with the
    /// replicas that have it.
    fn resolve(
        &self,
        key: &str,
        id: Option<&str>,
    ) -> StoreResult<Option<(VersionName, Vec<usize>)>> {
        let mut per_replica = Vec::new();
        for r in self.online() {
            let versions = r.versions(key).map_err(|e| {
                StoreError::io(key, format!("listing versions on replica {}", r.index), e)
            })?;
            per_replica.push((r.index, versions));
        }
        let target = match id {
            Some(id) => per_replica
                .iter()
                .flat_map(|(_, vs)| vs.iter())
                .find(|v| v.id == id)
                .cloned(),
            None => per_replica
                .iter()
                .filter_map(|(_, vs)| vs.last())
                .max()
                .cloned(),
        };
        Ok(target.map(|t| {
            let have = per_replica
                .iter()
                .filter(|(_, vs)| vs.contains(&t))
                .map(|(i, _)| *i)
                .collect();
            (t, have)
        }))
    }

    /// The record and version id of `key`'s version `id`, or of its newest. A version just
    /// written whose layout files are still queued is taken from its journal entry, without
    /// waiting for the workers: a rename's head and copy of the file just closed (rsync's
    /// pattern) would otherwise wait for that file's layout files every time.
    fn record_of(
        self: &Arc<Self>,
        key: &str,
        id: Option<&str>,
    ) -> StoreResult<(MetaRecord, String)> {
        if id.is_none()
            && let Some(e) = self.pending_version(key)
        {
            if e.data == EntryData::Marker {
                return Err(StoreError::not_found(key));
            }
            let rec = record::decode_meta(&e.record)
                .map_err(|d| StoreError::corrupt(key, format!("journal entry: {d}")))?;
            return Ok((rec, e.id.clone()));
        }
        self.settle_for_read(key, id)?;
        let (rec, id, ()) = self.read_version(key, id, |_, _, _, _| Ok(()))?;
        Ok((rec, id))
    }

    /// Reads a version from the first replica that serves it verified, collecting the
    /// replicas that are missing or fail verification. `read` runs on one replica's copy,
    /// given the record's file still open (see [`Replica::open_data`]).
    fn read_version<T>(
        self: &Arc<Self>,
        key: &str,
        id: Option<&str>,
        read: impl Fn(&Replica, &VersionName, &MetaRecord, RecordFile) -> Result<T, ReplicaError>,
    ) -> StoreResult<(MetaRecord, String, T)> {
        let Some((v, have)) = self.resolve(key, id)? else {
            return Err(StoreError::not_found(key));
        };
        // A replica whose layout files of this key are still queued is not missing it: the
        // version was acknowledged between the caller's settle and this read. Repaired, its
        // worker then found the files there and logged the write as failed.
        let queued = self.pending.lock().contains_key(key);
        let mut bad: Vec<(usize, String)> = self
            .online()
            .filter(|r| !have.contains(&r.index) && !queued)
            .map(|r| (r.index, "missing".to_string()))
            .collect();
        let mut found = None;
        for &i in &have {
            let r = &self.replicas[i];
            let result = r.open_record(key, &v).and_then(|(rec, file)| {
                let out = if rec.deleted {
                    None
                } else {
                    Some(read(r, &v, &rec, file)?)
                };
                Ok((rec, out))
            });
            match result {
                Ok((rec, out)) => {
                    found = Some((i, rec, out));
                    break;
                }
                Err(e) => bad.push((i, e.to_string())),
            }
        }
        let Some((good, rec, out)) = found else {
            let detail = bad
                .iter()
                .map(|(i, e)| format!("replica {i} {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(
                "{key}: no replica holds a good copy of version {}: {detail}",
                v.id
            );
            return Err(StoreError::corrupt(
                key,
                format!("no good replica of version {}: {detail}", v.id),
            ));
        };
        if !bad.is_empty() {
            for (i, why) in &bad {
                warn!(
                    "{key}: replica {i} ({}) is {why}; repairing it from replica {good}",
                    self.replicas[*i].root.display()
                );
            }
            self.spawn_repair(key, &v, good, bad.into_iter().map(|(i, _)| i).collect());
        }
        match out {
            Some(out) => Ok((rec, v.id, out)),
            None => Err(StoreError::not_found(key)),
        }
    }

    fn spawn_repair(self: &Arc<Self>, key: &str, v: &VersionName, good: usize, bad: Vec<usize>) {
        let inner = self.clone();
        let key = key.to_string();
        let v = v.clone();
        let repair = move || match inner.repair(&key, &v, good, &bad) {
            Ok(()) => {
                inner
                    .repaired
                    .fetch_add(bad.len() as u64, std::sync::atomic::Ordering::Relaxed);
                warn!("{key}: repaired replicas {bad:?} from replica {good}")
            }
            Err(e) => tracing::error!("{key}: repair of replicas {bad:?} failed: {e}"),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // A caller outside any runtime (none in coffer today) waits for the repair.
            return repair();
        };
        let handle = runtime.spawn_blocking(repair);
        let mut repairs = self.repairs.lock();
        repairs.retain(|h| !h.is_finished());
        repairs.push(handle);
    }

    /// Copies version `v` of `key` from replica `good` (verified in full first) onto `bad`.
    fn repair(&self, key: &str, v: &VersionName, good: usize, bad: &[usize]) -> io::Result<()> {
        let src = &self.replicas[good];
        let (rec, file) = src
            .open_record(key, v)
            .map_err(|e| io::Error::other(format!("source replica {good} is {e}")))?;
        let record_bytes = fs::read(src.record_path(key, v))?;
        if !v.deleted {
            let data = src.open_data(key, v, &rec, file)?;
            if let Err(e) = record::verify_full(&data, &rec)? {
                return Err(io::Error::other(format!(
                    "source replica {good} is corrupt: {e}"
                )));
            }
        }
        for &i in bad {
            let dst = &self.replicas[i];
            let dir = dst.create_key_dirs(key, DirSync::Now)?;
            // An embedded version's data is in `record_bytes`, read whole above.
            if !v.deleted && !rec.embedded {
                let tmp = dst
                    .tmp
                    .join(format!("{}-{:08x}{DATA_SUFFIX}", v.id, random_u32()));
                {
                    let mut from = File::open(src.data_path(key, &v.id))?;
                    let mut to = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    io::copy(&mut from, &mut to)?;
                    to.sync_all()?;
                }
                fs::rename(&tmp, dir.join(dst.layout.file_name(&v.id, DATA_SUFFIX)))?;
            }
            self.write_record(dst, &dir, v, &record_bytes)?;
        }
        Ok(())
    }

    fn put_marker(self: &Arc<Self>, key: &str) -> StoreResult<()> {
        let (v, bytes) = self.marker(key);
        self.write_journaled(key, &v, &bytes, Layout::Marker)
    }

    /// A new delete marker of `key`: its version and encoded record.
    fn marker(&self, key: &str) -> (VersionName, Vec<u8>) {
        let v = VersionName {
            id: self.next_version_id(),
            deleted: true,
        };
        let rec = MetaRecord {
            key: key.to_string(),
            deleted: true,
            size: 0,
            block_size: BLOCK_SIZE,
            blake3: String::new(),
            etag: String::new(),
            mtime_ns: now_ns(),
            metadata: Metadata::new(),
            sse: None,
            embedded: false,
        };
        (v, record::encode_meta(&rec))
    }

    /// The lock between writes of `key`'s files on replica `replica` and a checkpoint's
    /// pruning of that key there.
    fn key_lock(&self, replica: usize, key: &str) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (replica, key).hash(&mut h);
        self.key_locks[h.finish() as usize % self.key_locks.len()].lock()
    }

    /// Writes one version through the journal: its entry, durably, on every replica first
    /// (one fdatasync shared with every write waiting at the same moment), then its files
    /// into each replica's layout without an fsync (the checkpoint syncs them, and a replay
    /// after a crash rewrites whatever did not reach the disk). If any replica fails, the
    /// version is cancelled in the journals and taken out of every replica.
    fn write_journaled(
        self: &Arc<Self>,
        key: &str,
        v: &VersionName,
        record: &[u8],
        layout: Layout<'_>,
    ) -> StoreResult<()> {
        self.write_journaled_all(&[JournaledVersion {
            key,
            v,
            record,
            layout,
        }])
    }

    /// [`Self::write_journaled`] of several versions at once: their entries are appended in
    /// order and made durable by one fdatasync per replica (a rename's copy and delete
    /// marker). Replay stops at the first entry a crash tore, so what survives unacknowledged
    /// is a prefix: a rename leaves the copy alone, never the delete alone. If any replica
    /// fails, every one of them is cancelled.
    fn write_journaled_all(self: &Arc<Self>, writes: &[JournaledVersion<'_>]) -> StoreResult<()> {
        self.write_journaled_with(writes, false)
    }

    /// [`Self::write_journaled_all`], or with `deferred` acknowledged before the entries are
    /// durable (one atomic entry, see [`journal`]'s deferred writes): the layout workers
    /// make them durable before writing their files, and any later durable write first.
    fn write_journaled_with(
        self: &Arc<Self>,
        writes: &[JournaledVersion<'_>],
        deferred: bool,
    ) -> StoreResult<()> {
        let Some(first) = writes.first() else {
            return Ok(());
        };
        let entries: Vec<Vec<u8>> = writes
            .iter()
            .map(|w| {
                let inline;
                journal::encode(
                    w.key,
                    &w.v.id,
                    w.record,
                    match &w.layout {
                        Layout::Inline { stored, table } => {
                            inline = [*stored, *table];
                            EntryRef::Inline(&inline)
                        }
                        Layout::Link { key, id } => EntryRef::Link { key, id },
                        Layout::Marker => EntryRef::Marker,
                    },
                )
            })
            .collect();
        // Checked now, while the caller can still be told: the layout files are written
        // after the acknowledgement.
        self.check_space(first.key, entries.iter().map(Vec::len).sum())?;
        let (w, created) = self
            .journal
            .begin()
            .map_err(|e| worst(first.key, vec![(0, e)]))?;
        if created {
            self.schedule_checkpoint();
        }
        for write in writes {
            if let Layout::Link { key: src, .. } = &write.layout {
                self.journal.note_link_source(src);
            }
        }
        let replicas: Vec<&Replica> = self.online().collect();
        let results = for_each_parallel(&replicas, |r| {
            self.injected(r.index)?;
            // What would refuse the layout files is refused now, while the caller can be
            // told.
            for write in writes {
                layout::check_key_dirs(&r.objects, write.key, r.layout)?;
            }
            if deferred {
                w.log_deferred(r.index, &entries).map(Some)
            } else {
                w.log_all(r.index, &entries).map(|()| None)
            }
        });
        let mut durable_at = vec![None; self.replicas.len()];
        let results: Vec<io::Result<()>> = results
            .into_iter()
            .zip(&replicas)
            .map(|(res, r)| res.map(|end| durable_at[r.index] = end))
            .collect();
        let errors = failures(results, replicas.iter().map(|r| r.index));
        if !errors.is_empty() {
            for write in writes {
                let cancel = journal::encode(write.key, &write.v.id, b"", EntryRef::Cancel);
                for r in &replicas {
                    let _ = w.log(r.index, &cancel);
                }
            }
            drop(w);
            let mut first_error = None;
            for write in writes {
                let errors = errors.iter().map(|(i, e)| (*i, copy_error(e))).collect();
                if let Err(e) = self.finish_commit(write.key, write.v, errors, &[], true) {
                    first_error.get_or_insert(e);
                }
            }
            return Err(first_error.expect("a failed write has an error"));
        }
        let full = w.full();
        let hold = Arc::new(w.into_hold());
        for write in writes {
            let data = match &write.layout {
                Layout::Inline { stored, table } => EntryData::Inline([*stored, *table].concat()),
                Layout::Link { key, id } => EntryData::Link {
                    key: key.to_string(),
                    id: id.to_string(),
                },
                Layout::Marker => EntryData::Marker,
            };
            let entry = journal::Entry {
                key: write.key.to_string(),
                id: write.v.id.clone(),
                record: write.record.to_vec(),
                data,
            };
            self.queue_layout(entry, hold.clone(), &durable_at);
        }
        if full {
            self.schedule_checkpoint();
        }
        for write in writes {
            self.finish_commit(write.key, write.v, Vec::new(), &[], true)?;
        }
        Ok(())
    }

    /// Refuses a journaled write of `bytes` when a replica lacks the space (or inodes) for
    /// its layout files and those of the writes queued before it.
    fn check_space(&self, key: &str, bytes: usize) -> StoreResult<()> {
        for r in self.online() {
            let Some(free) = free_space(&r.root) else {
                continue;
            };
            let (jobs, queued) = self.apply[r.index].backlog();
            let need = (bytes + queued) as u64 + SPACE_MARGIN;
            let inodes = INODES_PER_WRITE * (jobs as u64 + 1);
            if free.bytes < need || free.inodes.is_some_and(|n| n < inodes) {
                return Err(StoreError::NoSpace {
                    key: key.to_string(),
                    detail: format!(
                        "replica {} ({}) has {} bytes{} free",
                        r.index,
                        r.root.display(),
                        free.bytes,
                        free.inodes
                            .map(|n| format!(" and {n} inodes"))
                            .unwrap_or_default()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Hands a logged entry's layout files to every online replica's worker.
    /// `durable_at`: per replica index, where a deferred entry's log must be durable to
    /// before its files are written.
    fn queue_layout(
        self: &Arc<Self>,
        entry: journal::Entry,
        hold: Arc<SegmentHold>,
        durable_at: &[Option<u64>],
    ) {
        let entry = Arc::new(entry);
        let jobs = self.online().count();
        self.pending
            .lock()
            .entry(entry.key.clone())
            .and_modify(|p| {
                p.jobs += jobs;
                if entry.id > p.newest.id {
                    p.newest = entry.clone();
                }
            })
            .or_insert_with(|| PendingVersion {
                newest: entry.clone(),
                jobs,
            });
        for r in self.online() {
            let q = &self.apply[r.index];
            let job = Job {
                entry: entry.clone(),
                hold: hold.clone(),
                durable_at: durable_at[r.index],
            };
            if q.push(job) {
                self.start_worker(r.index);
            }
        }
    }

    fn start_worker(self: &Arc<Self>, index: usize) {
        let weak = Arc::downgrade(self);
        let q = self.apply[index].clone();
        let spawned = std::thread::Builder::new()
            .name(format!("coffer-apply-{index}"))
            .spawn(move || {
                // Holds the store only while it writes a job, and lets go before the job
                // counts as done: a caller that settled and then dropped the store's last
                // handle has closed it by the time the drop returns (the drop writes what
                // is left, then closes the queue, which ends this thread).
                loop {
                    match q.wait_for_work(Duration::from_secs(1)) {
                        Wake::Closed => return,
                        Wake::Idle if weak.strong_count() == 0 => return,
                        Wake::Idle => continue,
                        Wake::Job => {}
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    let Some(job) = q.try_pop() else { continue };
                    let n = job.bytes();
                    inner.apply_job(index, &job, true);
                    // The store first, then the hold: a checkpoint or settle that returns
                    // has this thread off the store, so that dropping its last handle then
                    // closes it at once, on the dropping thread.
                    drop(inner);
                    drop(job);
                    q.finish(n);
                }
            });
        if let Err(e) = spawned {
            warn!("local store: starting the layout writer of replica {index}: {e}");
            let q = &self.apply[index];
            q.drain(&mut |job| self.apply_job(index, &job, false));
            q.worker_failed_to_start();
        }
    }

    /// Writes one queued entry's layout files on replica `index`. A failure is logged and
    /// kept for the checkpoints to retry: the write is durable in the journal already.
    fn apply_job(&self, index: usize, job: &Job, patient: bool) {
        let r = &self.replicas[index];
        let e = &job.entry;
        // On the worker, a deferred entry first waits a little for the next write's
        // fdatasync to cover it, unless someone waits on the worker; the drop's drain does
        // not wait.
        let patience = if patient {
            DEFERRED_PATIENCE
        } else {
            Duration::ZERO
        };
        let q = &self.apply[index];
        if let Some(end) = job.durable_at
            && let Err(err) = self
                .journal
                .sync_hold(&job.hold, index, end, patience, &|| q.waited_on())
        {
            // Written all the same: the caller was told it is done, and the checkpoint's
            // syncfs makes the layout durable (a crash before it may show half of it).
            warn!(
                "{}: replica {index}: making a deferred journal entry durable: {err}",
                e.key
            );
        }
        let v = VersionName {
            id: e.id.clone(),
            deleted: e.data == EntryData::Marker,
        };
        let layout = match &e.data {
            EntryData::Inline(d) => Layout::Inline {
                stored: d,
                table: &[],
            },
            EntryData::Link { key, id } => Layout::Link { key, id },
            EntryData::Marker | EntryData::Cancel => Layout::Marker,
        };
        let replicas: Vec<&Replica> = self.online().collect();
        let result = {
            let _locked = self.key_lock(index, &e.key);
            // A panic here would end the worker with its job never counted done, and every
            // later settle (so every read) would wait for it: it is a failed write instead.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.injected_in_layout(index)
                    .and_then(|()| self.write_layout(r, &e.key, &v, &e.record, &layout, &replicas))
            }))
            .unwrap_or_else(|_| Err(io::Error::other("the layout writer panicked")))
        };
        if let Err(err) = result {
            tracing::error!(
                "{}: writing version {} in place on replica {index} ({}): {err}; it is \
                 durable in the journal, and written again at the next checkpoint",
                e.key,
                e.id,
                r.root.display()
            );
            self.failed_applies.lock().push(FailedApply {
                replica: index,
                entry: e.clone(),
                cause: err.to_string(),
            });
        }
        {
            let mut pending = self.pending.lock();
            if let Some(p) = pending.get_mut(&e.key) {
                p.jobs -= 1;
                if p.jobs == 0 {
                    pending.remove(&e.key);
                }
            }
        }
    }

    /// The newest version of `key` if its layout files are still queued on some replica.
    /// It is then the key's newest version: a version written in place waits for the
    /// queue first (see [`Self::commit`]); only a put of the same key racing this one could
    /// be newer, and of two racing writes either may win.
    fn pending_version(&self, key: &str) -> Option<Arc<journal::Entry>> {
        self.pending.lock().get(key).map(|p| p.newest.clone())
    }

    /// Waits until the layout files of every journaled write acknowledged before this
    /// call are written, so that what follows sees them.
    fn settle(&self) {
        for q in &self.apply {
            q.settle();
        }
    }

    /// What closing the last handle does: every queued layout file written, the journal
    /// checkpointed and its segments removed. The store stays usable by whoever still holds
    /// it (a write then starts a new segment, which the final drop checkpoints).
    fn close(&self) {
        self.settle();
        if self.journal.has_work()
            && let Err(e) = self.checkpoint()
        {
            tracing::error!("local store: final journal checkpoint failed: {e}");
        }
        self.journal.remove_spares();
    }

    /// [`Self::settle`] before a read of `key` (of version `id`, or of the newest), and an
    /// error if the newest version is acknowledged but in place nowhere.
    fn settle_for_read(&self, key: &str, id: Option<&str>) -> StoreResult<()> {
        self.settle();
        if id.is_none() {
            self.check_in_place(key)?;
        }
        Ok(())
    }

    /// Writes again the layout files that failed to write (a checkpoint's first step).
    fn retry_failed_applies(&self) -> io::Result<()> {
        let failed = std::mem::take(&mut *self.failed_applies.lock());
        if failed.is_empty() {
            return Ok(());
        }
        let mut left = Vec::new();
        let mut first = None;
        for f in failed {
            let r = &self.replicas[f.replica];
            let result = {
                let _locked = self.key_lock(f.replica, &f.entry.key);
                self.injected_in_layout(f.replica)
                    .and_then(|()| self.replay_entry(r, &f.entry))
            };
            match result {
                Ok(_) => tracing::info!(
                    "{}: version {} is in place on replica {} now",
                    f.entry.key,
                    f.entry.id,
                    f.replica
                ),
                Err(e) => {
                    first.get_or_insert(e);
                    left.push(f);
                }
            }
        }
        let n = left.len();
        self.failed_applies.lock().extend(left);
        match first {
            None => Ok(()),
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("{n} journaled writes are not in place yet: {e}"),
            )),
        }
    }

    /// An error if the newest version of `key` is acknowledged but on no replica in place
    /// (its layout files failed to write everywhere): a read must not answer with an
    /// older version as if it were the newest.
    fn check_in_place(&self, key: &str) -> StoreResult<()> {
        let failed = self.failed_applies.lock();
        let mine: Vec<&FailedApply> = failed.iter().filter(|f| f.entry.key == key).collect();
        let Some(last) = mine.iter().max_by(|a, b| a.entry.id.cmp(&b.entry.id)) else {
            return Ok(());
        };
        let everywhere = self.online().all(|r| {
            mine.iter()
                .any(|f| f.replica == r.index && f.entry.id == last.entry.id)
        });
        let (last_id, cause) = (last.entry.id.clone(), last.cause.clone());
        drop(failed);
        // A newer version written since (in place) is the newest: reads answer with it.
        let superseded = || {
            self.resolve(key, None)
                .ok()
                .flatten()
                .is_some_and(|(v, _)| v.id > last_id)
        };
        if everywhere && !superseded() {
            return Err(StoreError::Io {
                key: key.to_string(),
                context: format!(
                    "its newest version {last_id} is durable in the journal but could not be \
                     written in place ({cause}); retried at every checkpoint"
                ),
                source: io::Error::other(cause),
            });
        }
        Ok(())
    }

    /// A journaled version's files in one replica's layout, written without fsync. The
    /// record goes last, through `tmp/` and a rename, so readers see all of it or nothing.
    fn write_layout(
        &self,
        r: &Replica,
        key: &str,
        v: &VersionName,
        record: &[u8],
        layout: &Layout<'_>,
        replicas: &[&Replica],
    ) -> io::Result<()> {
        let dir = r.create_key_dirs(key, DirSync::Later)?;
        let target = dir.join(r.layout.file_name(&v.id, DATA_SUFFIX));
        let embedded = record::is_embedded(record);
        let mut copied = Vec::new();
        match layout {
            Layout::Inline { .. } if embedded => {}
            // An embedded version has no data file to link: its copy's record file holds
            // the source's bytes again.
            Layout::Link { key: src, id } if embedded => {
                copied = embedded_source(r, src, id, replicas)?;
            }
            Layout::Inline { stored, table } => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)?;
                f.write_all(stored)?;
                f.write_all(table)?;
            }
            Layout::Link { key: src, id } => match fs::hard_link(r.data_path(src, id), &target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // This replica lacks the source: copy it, durably (a replay could not
                    // link it either), from one that has it.
                    let good = replicas
                        .iter()
                        .find(|g| g.data_path(src, id).exists())
                        .ok_or_else(|| io::Error::other("no replica has the source data"))?;
                    let tmp = r
                        .tmp
                        .join(format!("{}-{:08x}{DATA_SUFFIX}", v.id, random_u32()));
                    {
                        let mut from = File::open(good.data_path(src, id))?;
                        let mut to = File::create(&tmp)?;
                        io::copy(&mut from, &mut to)?;
                        to.sync_all()?;
                    }
                    fs::rename(&tmp, &target)?;
                    durable::sync_dir(&dir)?;
                }
                Err(e) => return Err(e),
            },
            Layout::Marker => {}
        }
        let suffix = if v.deleted {
            DELETE_SUFFIX
        } else {
            META_SUFFIX
        };
        let tmp = r.tmp.join(format!("{}-{:08x}{suffix}", v.id, random_u32()));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            match layout {
                // One write: the record file is the whole version.
                Layout::Inline { stored, table } if embedded => {
                    f.write_all(&[record, stored, table].concat())?
                }
                Layout::Link { .. } if embedded => f.write_all(&[record, &copied].concat())?,
                _ => f.write_all(record)?,
            }
        }
        fs::rename(&tmp, dir.join(r.layout.file_name(&v.id, suffix)))
    }

    /// Starts the background checkpoint if none is waiting: it runs once the oldest work
    /// not yet checkpointed is [`journal::CHECKPOINT_AFTER`] old, or at once for a full
    /// segment.
    fn schedule_checkpoint(self: &Arc<Self>) {
        if self
            .journal
            .scheduled
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("coffer-checkpoint".into())
            .spawn(move || {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let wait = inner.journal.due_in();
                    if wait.is_zero() {
                        inner
                            .journal
                            .scheduled
                            .store(false, std::sync::atomic::Ordering::Release);
                        if let Err(e) = inner.checkpoint() {
                            tracing::error!("local store: journal checkpoint failed: {e}");
                        }
                        // Work that arrived during the checkpoint schedules its own.
                        return;
                    }
                    drop(inner);
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            });
        if spawned.is_err() {
            self.journal
                .scheduled
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Makes the layout durable, prunes what the writes since the last checkpoint
    /// superseded, and drops the journal segments they were in.
    fn checkpoint(&self) -> io::Result<()> {
        self.journal
            .checkpoint(&|| self.retry_failed_applies(), &|keys| {
                for key in keys {
                    self.prune_key(key, 1, None, false)?;
                }
                Ok(())
            })
    }

    /// Replays the journal segments that processes now gone left in any replica: each
    /// entry's files are rewritten where they are missing or differ; then the layout is
    /// synced, superseded versions are removed, and the segments deleted.
    fn replay_journals(&self) -> io::Result<()> {
        let mut segments = Vec::new();
        let mut keys = BTreeSet::new();
        let mut restored = 0u64;
        let mut entries = 0u64;
        for r in self.online() {
            for seg in journal::dead_segments(&r.root)? {
                if seg.torn {
                    warn!(
                        "{}: ends in a torn or damaged entry (a write that was never \
                         acknowledged); replaying the entries before it",
                        seg.path.display()
                    );
                }
                let cancelled: BTreeSet<(String, String)> = seg
                    .entries
                    .iter()
                    .filter(|e| e.data == EntryData::Cancel)
                    .map(|e| (e.key.clone(), e.id.clone()))
                    .collect();
                for e in &seg.entries {
                    if e.data == EntryData::Cancel
                        || cancelled.contains(&(e.key.clone(), e.id.clone()))
                    {
                        continue;
                    }
                    entries += 1;
                    match self.replay_entry(r, e) {
                        Ok(changed) => restored += changed as u64,
                        Err(err) => {
                            tracing::error!(
                                "{}: replaying version {} of {}: {err}",
                                seg.path.display(),
                                e.id,
                                e.key
                            );
                            return Err(err);
                        }
                    }
                    keys.insert(e.key.clone());
                    if let EntryData::Link { key: source, .. } = &e.data {
                        // A source whose superseded version stayed for this copy.
                        keys.insert(source.clone());
                    }
                }
                segments.push(seg);
            }
        }
        if segments.is_empty() {
            return Ok(());
        }
        for r in self.online() {
            journal::syncfs(&r.root)?;
        }
        if !self.versioning {
            for key in &keys {
                self.prune_key(key, 1, None, false)?;
            }
            for r in self.online() {
                journal::syncfs(&r.root)?;
            }
        }
        for seg in &segments {
            let _ = fs::remove_file(&seg.path);
        }
        if entries == 0 {
            // Segments kept for reuse by a process that then died: nothing in them counts.
            return Ok(());
        }
        tracing::info!(
            "local store: replayed {} journal segments left by an earlier process: {entries} \
             writes, {restored} of them rewritten in place",
            segments.len()
        );
        Ok(())
    }

    /// Puts one journal entry's files in place on replica `r` if they are not already
    /// there intact; returns whether anything was rewritten.
    fn replay_entry(&self, r: &Replica, e: &journal::Entry) -> io::Result<bool> {
        let rec = record::decode_meta(&e.record).map_err(io::Error::other)?;
        let deleted = e.data == EntryData::Marker;
        let v = VersionName {
            id: e.id.clone(),
            deleted,
        };
        let dir = r.create_key_dirs(&e.key, DirSync::Replay)?;
        let data_path = dir.join(r.layout.file_name(&e.id, DATA_SUFFIX));
        let mut changed = false;
        let record_path = r.record_path(&e.key, &v);
        // An embedded version's record file holds its data too.
        let record_file = match &e.data {
            EntryData::Inline(bytes) if rec.embedded => [&e.record[..], bytes].concat(),
            EntryData::Link { key, id } if rec.embedded => {
                let have = fs::read(&record_path).ok();
                let intact = have.as_deref().filter(|b| {
                    b.strip_prefix(&e.record[..])
                        .is_some_and(|data| record::verify_stored(data, &rec).is_ok())
                });
                // In place already (its source may be pruned since): nothing to copy.
                if let Some(intact) = intact {
                    intact.to_vec()
                } else {
                    let replicas: Vec<&Replica> = self.online().collect();
                    match embedded_source(r, key, id, &replicas) {
                        Ok(copied) => [&e.record[..], &copied].concat(),
                        Err(err) => {
                            // Left as it is: reads find the copy missing or damaged here and
                            // repair it from a replica that has it.
                            warn!(
                                "{}: the source of copied version {} ({key} version {id}) is \
                                 not readable on any replica: {err}",
                                e.key, e.id
                            );
                            return Ok(false);
                        }
                    }
                }
            }
            _ => e.record.clone(),
        };
        match &e.data {
            EntryData::Inline(_) | EntryData::Link { .. } if rec.embedded => {}
            EntryData::Inline(bytes) => {
                if fs::read(&data_path).ok().as_deref() != Some(&bytes[..]) {
                    write_replacing(&r.tmp, &data_path, bytes)?;
                    changed = true;
                }
            }
            EntryData::Link { key, id } => {
                let intact = File::open(&data_path)
                    .and_then(|f| {
                        record::verify_full(&record::StoredData { file: f, base: 0 }, &rec)
                    })
                    .is_ok_and(|v| v.is_ok());
                if !intact {
                    let src = r.data_path(key, id);
                    if src.exists() {
                        durable::remove_file_if_exists(&data_path)?;
                        fs::hard_link(&src, &data_path)?;
                        changed = true;
                    } else {
                        // Reads find it missing here and repair it from another replica.
                        warn!(
                            "{}: the source of copied version {} ({key} version {id}) is not \
                             on replica {}",
                            e.key, e.id, r.index
                        );
                    }
                }
            }
            EntryData::Marker | EntryData::Cancel => {}
        }
        if fs::read(&record_path).ok().as_deref() != Some(&record_file[..]) {
            write_replacing(&r.tmp, &record_path, &record_file)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Removes every version of `key` but the newest `keep` ones (and, with `older_than`,
    /// only those older than that), on every online replica.
    fn prune_key(
        &self,
        key: &str,
        keep: usize,
        older_than: Option<Duration>,
        sync: bool,
    ) -> io::Result<usize> {
        let cutoff = older_than.map(|d| now_ns().saturating_sub(d.as_nanos() as u64));
        let mut removed = BTreeSet::new();
        for r in self.online() {
            let _locked = self.key_lock(r.index, key);
            let versions = r.versions(key)?;
            let n = versions.len().saturating_sub(keep);
            let dir = r.versions_dir(key);
            let mut changed = false;
            for v in &versions[..n] {
                let time = u64::from_str_radix(&v.id[..16.min(v.id.len())], 16).unwrap_or(0);
                if cutoff.is_some_and(|c| time >= c) {
                    continue;
                }
                durable::remove_file_if_exists(&r.record_path(key, v))?;
                durable::remove_file_if_exists(&r.data_path(key, &v.id))?;
                removed.insert(v.id.clone());
                changed = true;
            }
            // A delete marker that is the only version left hides nothing: drop it, and the
            // key's directories with it when they are empty.
            let rest = r.versions(key)?;
            if rest.len() == 1 && rest[0].deleted && keep <= 1 && cutoff.is_none() {
                durable::remove_file_if_exists(&r.record_path(key, &rest[0]))?;
                removed.insert(rest[0].id.clone());
                changed = true;
            }
            if changed {
                if sync {
                    durable::sync_dir(&dir)?;
                }
                remove_empty_dirs(r, key, sync);
            }
        }
        Ok(removed.len())
    }

    fn prune(&self, prefix: &str, keep: usize, older_than: Option<Duration>) -> StoreResult<usize> {
        self.settle();
        let keys = self.walk_keys(prefix, true)?;
        let mut n = 0;
        for key in keys {
            n += self
                .prune_key(&key, keep, older_than, true)
                .map_err(|e| StoreError::io(&key, "pruning versions", e))?;
        }
        Ok(n)
    }

    /// Every key under `prefix` with at least one version (`with_deleted`) or whose newest
    /// version is live, in no particular order.
    fn walk_keys(&self, prefix: &str, with_deleted: bool) -> StoreResult<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        for r in self.online() {
            let (dir, base, partial) = layout::prefix_dir(&r.objects, prefix);
            walk(&dir, &base, Some(&partial), r.layout, &mut |key, latest| {
                if with_deleted || latest.is_some_and(|v| !v.deleted) {
                    keys.insert(key);
                }
            })
            .map_err(|e| StoreError::io(prefix, "listing", e))?;
        }
        if !with_deleted {
            // A key live on one replica may be deleted on another that has a newer marker.
            let mut live = BTreeSet::new();
            for k in keys {
                if let Some((v, _)) = self.resolve(&k, None)?
                    && !v.deleted
                {
                    live.insert(k);
                }
            }
            return Ok(live);
        }
        Ok(keys)
    }

    /// The children of a listed directory level: names, with whether each is a live object
    /// and whether it has a subtree holding a live object.
    fn list_level(self: &Arc<Self>, prefix: &str) -> StoreResult<BTreeMap<String, (bool, bool)>> {
        // The names first (one directory read per replica), then what each entry holds, on
        // the listing pool: a few small reads per entry, each a wait on the disk when cold.
        let mut found: Vec<(String, PathBuf, layout::VersionLayout)> = Vec::new();
        for r in self.online() {
            let (dir, base, partial) = layout::prefix_dir(&r.objects, prefix);
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(prefix, "listing", e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(prefix, "listing", e))?;
                let Some(comp) = listable_component(&dir, &entry, r.layout)
                    .map_err(|e| StoreError::io(prefix, "listing", e))?
                else {
                    continue;
                };
                if comp.starts_with(&partial) {
                    found.push((format!("{base}{comp}"), entry.path(), r.layout));
                }
            }
        }
        let held: Vec<(bool, bool)> = on_listing_pool(&found, |(_, path, versions)| {
            key_dir_contents(path, *versions)
        })
        .into_iter()
        .collect::<io::Result<_>>()
        .map_err(|e| StoreError::io(prefix, "listing", e))?;
        let mut out: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        for ((key, _, _), (has_versions, subtree)) in found.into_iter().zip(held) {
            let slot = out.entry(key).or_default();
            slot.0 |= has_versions;
            slot.1 |= subtree;
        }
        // Liveness of objects is decided across replicas (newest version anywhere).
        let out: Vec<(String, (bool, bool))> = out.into_iter().collect();
        let this = self.clone();
        let live: Vec<bool> = on_listing_pool(&out, move |(key, (has_versions, _))| {
            Ok(*has_versions && this.resolve(key, None)?.is_some_and(|(v, _)| !v.deleted))
        })
        .into_iter()
        .collect::<StoreResult<_>>()?;
        Ok(out
            .into_iter()
            .zip(live)
            .filter(|((_, (_, subtree)), live)| *live || *subtree)
            .map(|((key, (_, subtree)), live)| (key, (live, subtree)))
            .collect())
    }

    /// A copy whose encryption differs from the source's: the data is read (verified),
    /// decrypted and written again, a block at a time.
    #[allow(clippy::too_many_arguments)]
    fn copy_reencrypting(
        self: &Arc<Self>,
        src: &str,
        src_id: &str,
        rec: &MetaRecord,
        src_key: Option<sse::ObjectKey>,
        dst: &str,
        metadata: Metadata,
        dst_sse: &Sse,
    ) -> StoreResult<ObjectInfo> {
        const STEP: u64 = 8 << 20;
        let mut w = self.begin(dst, metadata, dst_sse)?;
        let mut off = 0;
        while off < rec.size {
            let r = off..(off + STEP).min(rec.size);
            let read = self.read_version(src, Some(src_id), |rep, v, rec, file| {
                let data = rep
                    .open_data(src, v, rec, file)
                    .map_err(|e| replica_err(src, e))?;
                record::read_verified(&data, rec, r.clone())?.map_err(ReplicaError::Corrupt)
            });
            let mut data = match read {
                Ok((_, _, d)) => d,
                Err(e) => {
                    self.abort(w);
                    return Err(e);
                }
            };
            if let Some(k) = &src_key {
                k.apply(off, &mut data);
            }
            if let Err(e) = self.write(&mut w, &data) {
                self.abort(w);
                return Err(e);
            }
            off = r.end;
        }
        self.commit(w)
    }

    fn head_latest(self: &Arc<Self>, key: &str, id: Option<&str>) -> StoreResult<ObjectInfo> {
        let (rec, id, ()) = self.read_version(key, id, |_, _, _, _| Ok(()))?;
        Ok(info_of(&rec, &id))
    }
}

/// Threads that read a listing's entries. A cold listing reads a few small directories and
/// one record per entry, each a wait on the disk: one at a time, 10,000 entries took 4 s
/// here; many at once keep the disk's queue full. They wait rather than compute, so there
/// are more of them than cores.
const LISTING_THREADS: usize = 16;

/// `f` of each of `items`, in order, on the caller and up to [`LISTING_THREADS`] - 1 helpers
/// from tokio's blocking pool (the caller's runtime's; without one, on the caller alone).
/// A read that finds a damaged replica spawns its repair on that runtime.
///
/// Not rayon: its idle workers spin in `sched_yield` before they sleep, and sixteen of them
/// doing so after every small listing took 60 % of the mount's CPU samples during an
/// `rsync -a` out of it (855 directories), on two cores that rsync and the FUSE threads
/// needed. Nor threads started per call: 15,800 of them made the same copy 2.5 times
/// slower. The blocking pool keeps its threads and parks them without spinning.
fn on_listing_pool<T, R, F>(items: &[T], f: F) -> Vec<R>
where
    T: Clone + Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(&T) -> R + Send + Sync + 'static,
{
    let helpers = items.len().min(LISTING_THREADS).saturating_sub(1);
    let runtime = tokio::runtime::Handle::try_current().ok();
    let Some(runtime) = runtime.filter(|_| helpers > 0) else {
        return items.iter().map(f).collect();
    };
    let batch = Arc::new(ListingBatch {
        items: items.to_vec(),
        next: std::sync::atomic::AtomicUsize::new(0),
        results: Mutex::new((
            std::iter::repeat_with(|| None).take(items.len()).collect(),
            0,
        )),
        all_done: parking_lot::Condvar::new(),
    });
    let f = Arc::new(f);
    for _ in 0..helpers {
        let (batch, f) = (batch.clone(), f.clone());
        // A helper that starts late finds nothing left and ends: the caller waits only for
        // entries a helper has taken, so a saturated pool cannot hold it up.
        drop(runtime.spawn_blocking(move || batch.run(&*f)));
    }
    batch.run(&*f);
    let mut results = batch.results.lock();
    while results.1 < items.len() {
        batch.all_done.wait(&mut results);
    }
    std::mem::take(&mut results.0)
        .into_iter()
        .map(|r| match r.expect("every entry is done") {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect()
}

/// The shared state of one [`on_listing_pool`] call.
struct ListingBatch<T, R> {
    items: Vec<T>,
    /// The next entry to take.
    next: std::sync::atomic::AtomicUsize,
    /// Each entry's result (or the panic it raised), and how many are in.
    results: Mutex<(Vec<Option<std::thread::Result<R>>>, usize)>,
    all_done: parking_lot::Condvar,
}

impl<T, R> ListingBatch<T, R> {
    /// Takes and runs entries until none is left, then hands in their results at once (a
    /// lock per entry made sixteen threads queue on it).
    fn run(&self, f: &(impl Fn(&T) -> R + ?Sized)) {
        let mut done = Vec::new();
        loop {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(item) = self.items.get(i) else {
                break;
            };
            done.push((
                i,
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item))),
            ));
        }
        if done.is_empty() {
            return;
        }
        let mut results = self.results.lock();
        results.1 += done.len();
        for (i, r) in done {
            results.0[i] = Some(r);
        }
        if results.1 == self.items.len() {
            self.all_done.notify_all();
        }
    }
}

/// Bytes kept free on a replica's filesystem beyond what queued writes need.
const SPACE_MARGIN: u64 = 1 << 20;
/// Inodes a journaled write's layout may take (two directories, two files, a temporary).
const INODES_PER_WRITE: u64 = 8;

/// What a write may still use of a filesystem.
struct FreeSpace {
    bytes: u64,
    /// `None` where the filesystem does not count inodes.
    inodes: Option<u64>,
}

/// Free space of the filesystem holding `path`, as this process may use it (root may use
/// the blocks reserved for it).
fn free_space(path: &Path) -> Option<FreeSpace> {
    let st = raw_statvfs(path)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (blocks, inodes) = if root {
        (st.bfree, st.ffree)
    } else {
        (st.bavail, st.favail)
    };
    Some(FreeSpace {
        bytes: blocks * st.frsize,
        inodes: (st.files > 0).then_some(inodes),
    })
}

/// The counts of statvfs(3) that the store uses, widened to u64.
struct Statvfs {
    frsize: u64,
    blocks: u64,
    bfree: u64,
    bavail: u64,
    files: u64,
    ffree: u64,
    favail: u64,
}

/// The statvfs(3) of the filesystem holding `path`.
fn raw_statvfs(path: &Path) -> Option<Statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(Statvfs {
        frsize: st.f_frsize as u64,
        blocks: st.f_blocks as u64,
        bfree: st.f_bfree as u64,
        bavail: st.f_bavail as u64,
        files: st.f_files as u64,
        ffree: st.f_ffree as u64,
        favail: st.f_favail as u64,
    })
}

/// Total and available bytes of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let st = raw_statvfs(path)?;
    Some((st.blocks * st.frsize, st.bavail * st.frsize))
}

/// Rejects keys no backend should accept.
fn validate_key(key: &str) -> StoreResult<()> {
    if key.is_empty() || key.len() > StoreLimits::S3.max_key_bytes || key.contains('\0') {
        return Err(StoreError::invalid(key, "invalid key"));
    }
    Ok(())
}

/// Removes the now-empty directories of a key, bottom up (best effort).
fn remove_empty_dirs(r: &Replica, key: &str, sync: bool) {
    let objects = &r.objects;
    let mut dir = layout::key_dir(objects, key);
    if r.layout == layout::VersionLayout::Nested {
        let _ = fs::remove_dir(dir.join(layout::VERSIONS_DIR));
    }
    while dir != *objects && dir.starts_with(objects) {
        if layout::is_hashed(dir.file_name().and_then(|n| n.to_str()).unwrap_or(""))
            && fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 1
        {
            let _ = fs::remove_file(dir.join(layout::NAME_FILE));
        }
        if fs::remove_dir(&dir).is_err() {
            break;
        }
        if sync && let Some(parent) = dir.parent() {
            let _ = durable::sync_dir(parent);
        }
        dir.pop();
    }
}

fn replica_err(key: &str, e: io::Error) -> ReplicaError {
    debug!("{key}: {e}");
    ReplicaError::from(e)
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!(
            "local store ({} replicas: {})",
            self.inner.replicas.len(),
            self.inner
                .replicas
                .iter()
                .map(|r| r.root.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn request_stats(&self) -> Vec<(&'static str, u64)> {
        let (syncs, checkpoints) = self.journal_stats();
        vec![
            (
                "replicas_repaired",
                self.inner
                    .repaired
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            ("journal_syncs", syncs),
            ("journal_checkpoints", checkpoints),
        ]
    }

    async fn sync(&self) -> StoreResult<()> {
        let inner = self.inner.clone();
        blocking(move || {
            inner
                .journal
                .sync_all()
                .map_err(|e| StoreError::io("", "making deferred journal entries durable", e))
        })
        .await
    }

    async fn flush(&self) -> StoreResult<()> {
        let inner = self.inner.clone();
        blocking(move || {
            inner
                .checkpoint()
                .map_err(|e| StoreError::io("", "checkpointing the journal", e))
        })
        .await
    }

    fn limits(&self) -> StoreLimits {
        StoreLimits {
            min_part_size: 1,
            max_part_size: 1 << 30,
            // Larger parts keep the disk busier between the writer's waits for a part.
            part_size: 8 << 20,
            max_parts: u64::MAX,
            // A copy is a hard link and a new record.
            metadata_change_copies_data: false,
            listing_has_metadata: true,
            lists_after_a_key: true,
            ..StoreLimits::S3
        }
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.inner.validate_put(key, opts)?;
        if let Some(c) = &opts.checksum
            && !c.verify(&body)
        {
            return Err(StoreError::corrupt(
                key,
                "the request body does not match its checksum",
            ));
        }
        let inner = self.inner.clone();
        let key = key.to_string();
        let metadata = opts.metadata.clone();
        let sse_req = opts.sse.clone();
        let deferred = opts.defer_durability;
        blocking(move || {
            if body.len() <= journal::MAX_INLINE {
                return inner.put_journaled(&key, &body, metadata, &sse_req, deferred);
            }
            let mut w = inner.begin(&key, metadata, &sse_req)?;
            if let Err(e) = inner.write(&mut w, &body) {
                inner.abort(w);
                return Err(e);
            }
            inner.commit(w)
        })
        .await
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        self.inner.validate_put(key, opts)?;
        let inner = self.inner.clone();
        let k = key.to_string();
        let metadata = opts.metadata.clone();
        let sse_req = opts.sse.clone();
        let w = blocking(move || inner.begin(&k, metadata, &sse_req)).await?;
        Ok(Box::new(LocalUpload {
            inner: self.inner.clone(),
            write: Some(w),
        }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        let inner = self.inner.clone();
        let k = key.to_string();
        let id = opts.version_id.clone();
        let sse_req = opts.sse.clone();
        let (rec, id, (r, body)) = blocking(move || {
            inner.settle_for_read(&k, id.as_deref())?;
            // The key is checked against the record before the data is read, and a wrong
            // one is answered as the caller's error (`Ok(Err)`), never as a reason to think
            // the replica damaged. One pass over the version, not a first one for the key:
            // each resolves the version and reads its record, which doubled a random read's
            // metadata calls.
            let (rec, vid, read) = inner.read_version(&k, id.as_deref(), |rep, v, rec, file| {
                let checked = sse::for_get(&k, rec.sse.as_ref(), &sse_req, inner.store_key());
                let obj_key = match checked {
                    Ok(obj_key) => obj_key,
                    Err(e) => return Ok(Err(e)),
                };
                let r = clamp_range(range.clone(), rec.size);
                let file = rep
                    .open_data(&k, v, rec, file)
                    .map_err(|e| replica_err(&k, e))?;
                let data = record::read_verified_bytes(&file, rec, r.clone())?
                    .map_err(ReplicaError::Corrupt)?;
                Ok(Ok((r, data, obj_key)))
            })?;
            let (r, data, obj_key) = read?;
            let data = match &obj_key {
                Some(key) => {
                    let mut plain = data.to_vec();
                    key.apply(r.start, &mut plain);
                    Bytes::from(plain)
                }
                None => data,
            };
            Ok((rec, vid, (r, data)))
        })
        .await?;
        Ok(GetResult {
            info: info_of(&rec, &id),
            range: r,
            body,
        })
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        let inner = self.inner.clone();
        let k = key.to_string();
        let id = opts.version_id.clone();
        let sse_req = opts.sse.clone();
        blocking(move || {
            let (rec, id) = inner.record_of(&k, id.as_deref())?;
            sse::for_get(&k, rec.sse.as_ref(), &sse_req, inner.store_key())?;
            Ok(info_of(&rec, &id))
        })
        .await
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        let inner = self.inner.clone();
        let req = req.clone();
        blocking(move || {
            inner.settle();
            let mut keys: Vec<String> = Vec::new();
            if req.delimiter == Some('/') {
                for (key, (live, subtree)) in inner.list_level(&req.prefix)? {
                    if live {
                        keys.push(key.clone());
                    }
                    if subtree {
                        keys.push(format!("{key}/"));
                    }
                }
            } else {
                keys.extend(inner.walk_keys(&req.prefix, false)?);
            }
            keys.sort();
            let page = super::paginate_keys(
                &req.prefix,
                req.delimiter,
                req.continuation.as_deref().or(req.start_after.as_deref()),
                if req.max_keys == 0 {
                    usize::MAX
                } else {
                    req.max_keys
                },
                keys.into_iter(),
            );
            let heads = {
                let inner = inner.clone();
                on_listing_pool(&page.objects, move |key| inner.head_latest(key, None))
            };
            let mut objects = Vec::with_capacity(page.objects.len());
            for (key, head) in page.objects.into_iter().zip(heads) {
                match head {
                    Ok(info) => objects.push(info),
                    // Deleted since the names were read: leave it out.
                    Err(StoreError::NotFound { .. }) => {}
                    // Damaged: list it without metadata, so that the damage shows (a stat
                    // or read of it fails, naming the cause) instead of the file silently
                    // vanishing from backups made through the mount.
                    Err(e) => {
                        warn!("listing: {e}");
                        objects.push(ObjectInfo {
                            key,
                            size: 0,
                            mtime: UNIX_EPOCH,
                            etag: String::new(),
                            version_id: None,
                            metadata: None,
                        });
                    }
                }
            }
            Ok(ListPage {
                objects,
                common_prefixes: page.common_prefixes,
                next: page.next,
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.inner.check_writable(key)?;
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            if let Some(e) = inner.pending_version(&key) {
                return match e.data {
                    EntryData::Marker => Ok(()),
                    _ => inner.put_marker(&key),
                };
            }
            inner.settle();
            let Some((latest, _)) = inner.resolve(&key, None)? else {
                return Ok(());
            };
            if latest.deleted {
                return Ok(());
            }
            // Without versioning too: the marker hides the key at once, and the next
            // checkpoint removes it with every version it hides.
            inner.put_marker(&key)
        })
        .await
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.copy_then_delete(src, dst, opts, false).await
    }

    /// The copy and the source's delete marker go into the journal together, made durable
    /// by one fdatasync per replica: a file's rename (rsync renames every file it writes)
    /// waits for one disk flush, not two, and a crash leaves the file under both names or
    /// under the new one, never only the old.
    async fn rename(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        if src == dst {
            return self.copy(src, dst, opts).await;
        }
        validate_key(src)?;
        self.inner.check_writable(src)?;
        self.copy_then_delete(src, dst, opts, true).await
    }

    async fn versioning_enabled(&self) -> StoreResult<bool> {
        Ok(self.inner.versioning)
    }

    /// The smallest replica bounds what can be stored.
    async fn space(&self) -> Option<(u64, u64)> {
        self.inner
            .online()
            .filter_map(|r| statvfs(&r.root))
            .min_by_key(|(_, free)| *free)
    }

    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>> {
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            inner.settle();
            let mut out = Vec::new();
            for key in inner.walk_keys(&prefix, true)? {
                let mut all: BTreeMap<VersionName, Option<MetaRecord>> = BTreeMap::new();
                for r in inner.online() {
                    let versions = r
                        .versions(&key)
                        .map_err(|e| StoreError::io(&key, "listing versions", e))?;
                    for v in versions {
                        let slot = all.entry(v.clone()).or_default();
                        if slot.is_none() {
                            *slot = r.read_record(&key, &v).ok();
                        }
                    }
                }
                for (i, (v, rec)) in all.into_iter().rev().enumerate() {
                    // Without versioning, superseded versions and delete markers wait only
                    // for the next checkpoint to remove them: they are not versions.
                    if !inner.versioning && (i > 0 || v.deleted) {
                        break;
                    }
                    let Some(rec) = rec else {
                        warn!(
                            "{key}: version {} has no readable record on any replica",
                            v.id
                        );
                        continue;
                    };
                    out.push(VersionInfo {
                        key: key.clone(),
                        version_id: v.id.clone(),
                        is_latest: i == 0,
                        is_delete_marker: v.deleted,
                        size: rec.size,
                        mtime: UNIX_EPOCH + Duration::from_nanos(rec.mtime_ns),
                        etag: rec.etag.clone(),
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn restore_version(
        &self,
        key: &str,
        version_id: &str,
        _sse: &Sse,
    ) -> StoreResult<ObjectInfo> {
        let opts = CopyOptions {
            source_version_id: Some(version_id.to_string()),
            ..Default::default()
        };
        self.copy(key, key, &opts).await
    }
}

struct LocalUpload {
    inner: Arc<Inner>,
    write: Option<PendingWrite>,
}

#[async_trait]
impl Upload for LocalUpload {
    async fn put_part(&mut self, part: Bytes) -> StoreResult<()> {
        let inner = self.inner.clone();
        let mut w = self.write.take().expect("upload used after failure");
        let (w, result) = tokio::task::spawn_blocking(move || {
            let r = inner.write(&mut w, &part);
            (w, r)
        })
        .await
        .map_err(task_failed)?;
        if result.is_err() {
            self.inner.abort(w);
            return result;
        }
        self.write = Some(w);
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> StoreResult<ObjectInfo> {
        let w = self.write.take().expect("upload used after failure");
        let inner = self.inner.clone();
        blocking(move || inner.commit(w)).await
    }

    async fn abort(mut self: Box<Self>) -> StoreResult<()> {
        if let Some(w) = self.write.take() {
            self.inner.abort(w);
        }
        Ok(())
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if let Some(w) = self.write.take() {
            self.inner.abort(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_listing_pool_keeps_order_and_passes_panics_on() {
        let items: Vec<usize> = (0..1000).collect();
        let out = tokio::task::spawn_blocking(move || {
            on_listing_pool(&items, |i| {
                // Some entries wait, as cold reads do, so that helpers take part.
                if i % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                i * 2
            })
        })
        .await
        .unwrap();
        assert_eq!(out, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
        // Without a runtime: on the caller alone.
        let plain = std::thread::spawn(|| on_listing_pool(&[1, 2, 3], |i| i + 1))
            .join()
            .unwrap();
        assert_eq!(plain, [2, 3, 4]);
        // A panic in any entry reaches the caller (a store task turns it into EIO).
        let r: StoreResult<Vec<usize>> = blocking(|| {
            Ok(on_listing_pool(&(0..100).collect::<Vec<usize>>(), |i| {
                assert_ne!(*i, 77, "a bug in a listing");
                *i
            }))
        })
        .await;
        assert_eq!(r.unwrap_err().errno(), libc::EIO);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_task_that_panics_is_an_io_error_not_the_callers() {
        let r: StoreResult<()> = blocking(|| panic!("a bug in a store task")).await;
        let e = r.unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(e.to_string().contains("store task failed"), "{e}");
    }
}
