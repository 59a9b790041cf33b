//! The local N-replica store: every object is written to N replica directories (ideally on
//! different disks) and a put returns only once every replica has it durably.
//!
//! Layout, record format and the write protocol are described in `docs/DESIGN.md`; in short:
//! the data of a put streams into a temporary file in each replica's `tmp/`, is fsync'd and
//! renamed into the key's `%v/` directory as `<version>.d`; then the metadata record
//! `<version>.m`, the commit point, is written the same way, and the `%v/` directory is
//! fsync'd. A version is visible only once its record is; a put that fails on any replica
//! removes what it committed on the others, so the previous version stays the latest
//! everywhere. Reads take the newest version any replica has, verify every block they
//! return, and repair replicas that lack the version or fail verification from a good one.

pub mod durable;
pub mod layout;
pub mod record;
pub mod replica;
pub mod scrub;
pub mod sse;

use std::collections::{BTreeMap, BTreeSet};
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
use record::{BLOCK_SIZE, DataChecksummer, MetaRecord};
use replica::{DATA_SUFFIX, DELETE_SUFFIX, META_SUFFIX, Replica, ReplicaError, VersionName};

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
}

/// The local N-replica store. Cheap to clone.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
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
    sse_store_key: Option<super::SseCustomerKey>,
    require_encryption: bool,
}

impl LocalStore {
    /// Creates the replica directories of a new store.
    pub fn init(cfg: &LocalStoreConfig) -> io::Result<()> {
        for (i, root) in cfg.replicas.iter().enumerate() {
            let r = Replica::new(i, root.clone());
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
            let mut r = Replica::new(i, root.clone());
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
        Ok(LocalStore {
            inner: Arc::new(Inner {
                store_id: cfg.store_id.clone(),
                replicas,
                versioning: cfg.versioning,
                clock: Mutex::new(0),
                repairs: Mutex::new(Vec::new()),
                repaired: Default::default(),
                replica_faults: Mutex::new(BTreeMap::new()),
                sse_store_key: cfg.sse_store_key.clone(),
                require_encryption: cfg.require_encryption,
            }),
        })
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
        let mut f = self.inner.replica_faults.lock();
        match fault {
            Some(k) => f.insert(index, k),
            None => f.remove(&index),
        };
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
        self.inner.repair(key, v, good, bad)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::invalid("", format!("store task failed: {e}"))))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random_u32() -> u32 {
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

/// Dirty data a write may leave in the page cache before it waits for writeback.
const DIRTY_WINDOW: u64 = 32 << 20;

/// Starts writeback of bytes `start..end` of a file being written and waits for what is more
/// than [`DIRTY_WINDOW`] behind. Without this, a large upload leaves gigabytes of dirty pages
/// until its final fsync, and the kernel's dirty limit then stalls every writer on the
/// machine (other mounts' small fsyncs included). Failures here are only hints: the fsync at
/// commit is what makes the data durable and reports errors.
fn bound_dirty_data(f: &File, start: u64, end: u64) {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: sync_file_range on an open descriptor with in-range offsets.
    unsafe {
        libc::sync_file_range(
            fd,
            start as i64,
            (end - start) as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        if end > DIRTY_WINDOW {
            let upto = end - DIRTY_WINDOW;
            libc::sync_file_range(
                fd,
                0,
                upto as i64,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
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

/// A write in progress on every replica: one temporary data file each.
struct PendingWrite {
    key: String,
    id: String,
    files: Vec<(usize, File, PathBuf)>,
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
        match self.replica_faults.lock().get(&index) {
            None => Ok(()),
            Some(FaultKind::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Some(FaultKind::AccessDenied) => Err(io::Error::from_raw_os_error(libc::EACCES)),
            Some(FaultKind::Transient) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

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
            let f = self.injected(r.index).and_then(|()| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
            });
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
        let start = w.written;
        w.written += data.len() as u64;
        w.sums.update(data);
        let end = w.written;
        let results = for_each_parallel(&w.files, |(i, f, _)| {
            self.injected(*i)?;
            (&*f).write_all(data)?;
            bound_dirty_data(f, start, end);
            Ok(())
        });
        let errors = failures(results, w.files.iter().map(|(i, _, _)| *i));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(worst(&w.key, errors))
        }
    }

    /// Finishes a write on every replica; on any failure removes it from all of them.
    fn commit(&self, w: PendingWrite) -> StoreResult<ObjectInfo> {
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
        let rec = MetaRecord {
            key: key.clone(),
            deleted: false,
            size,
            block_size: BLOCK_SIZE,
            etag: digest[..32].to_string(),
            blake3: digest,
            mtime_ns: now_ns(),
            metadata,
            sse: sse.map(|(r, _)| r),
        };
        let meta_bytes = record::encode_meta(&rec);
        let v = VersionName {
            id: id.clone(),
            deleted: false,
        };
        let results = for_each_parallel(&files, |(i, f, tmp_path)| {
            let r = &self.replicas[*i];
            self.injected(*i)?;
            (&*f).write_all(&table)?;
            f.sync_all()?;
            let dir = layout::create_key_dirs(&r.objects, &key)?;
            fs::rename(tmp_path, dir.join(format!("{id}{DATA_SUFFIX}")))?;
            self.write_record(r, &dir, &v, &meta_bytes)
        });
        let errors = failures(results, files.iter().map(|(i, _, _)| *i));
        let tmp_files: Vec<PathBuf> = files.iter().map(|(_, _, p)| p.clone()).collect();
        self.finish_commit(&key, &v, errors, &tmp_files)?;
        Ok(info_of(&rec, &id))
    }

    /// Writes a version's record into `dir` (a `%v` directory) via `tmp/`, then fsyncs `dir`.
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
        fs::rename(&tmp, dir.join(format!("{}{suffix}", v.id)))?;
        durable::sync_dir(dir)
    }

    /// After a write on every replica: if any failed, takes the version back out of all of
    /// them (record first, so it is never visible half-removed) and reports the failure;
    /// otherwise prunes older versions of an unversioned store.
    fn finish_commit(
        &self,
        key: &str,
        v: &VersionName,
        errors: Vec<(usize, io::Error)>,
        tmp_files: &[PathBuf],
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
            self.prune_key(key, 1, None)
                .map_err(|e| StoreError::io(key, "removing the previous version", e))?;
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

    /// Reads a version from the first replica that serves it verified, collecting the
    /// replicas that are missing or fail verification. `read` runs on one replica's copy.
    fn read_version<T>(
        self: &Arc<Self>,
        key: &str,
        id: Option<&str>,
        read: impl Fn(&Replica, &VersionName, &MetaRecord) -> Result<T, ReplicaError>,
    ) -> StoreResult<(MetaRecord, String, T)> {
        let Some((v, have)) = self.resolve(key, id)? else {
            return Err(StoreError::not_found(key));
        };
        let mut bad: Vec<(usize, String)> = self
            .online()
            .filter(|r| !have.contains(&r.index))
            .map(|r| (r.index, "missing".to_string()))
            .collect();
        let mut found = None;
        for &i in &have {
            let r = &self.replicas[i];
            let result = r.read_record(key, &v).and_then(|rec| {
                let out = if rec.deleted {
                    None
                } else {
                    Some(read(r, &v, &rec)?)
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
        let handle =
            tokio::task::spawn_blocking(move || match inner.repair(&key, &v, good, &bad) {
                Ok(()) => {
                    inner
                        .repaired
                        .fetch_add(bad.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    warn!("{key}: repaired replicas {bad:?} from replica {good}")
                }
                Err(e) => tracing::error!("{key}: repair of replicas {bad:?} failed: {e}"),
            });
        let mut repairs = self.repairs.lock();
        repairs.retain(|h| !h.is_finished());
        repairs.push(handle);
    }

    /// Copies version `v` of `key` from replica `good` (verified in full first) onto `bad`.
    fn repair(&self, key: &str, v: &VersionName, good: usize, bad: &[usize]) -> io::Result<()> {
        let src = &self.replicas[good];
        let rec = src
            .read_record(key, v)
            .map_err(|e| io::Error::other(format!("source replica {good} is {e}")))?;
        let record_bytes = fs::read(src.record_path(key, v))?;
        if !v.deleted {
            let data = File::open(src.data_path(key, &v.id))?;
            if let Err(e) = record::verify_full(&data, &rec)? {
                return Err(io::Error::other(format!(
                    "source replica {good} is corrupt: {e}"
                )));
            }
        }
        for &i in bad {
            let dst = &self.replicas[i];
            let dir = layout::create_key_dirs(&dst.objects, key)?;
            if !v.deleted {
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
                fs::rename(&tmp, dir.join(format!("{}{DATA_SUFFIX}", v.id)))?;
            }
            self.write_record(dst, &dir, v, &record_bytes)?;
        }
        Ok(())
    }

    fn put_marker(&self, key: &str) -> StoreResult<()> {
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
        };
        let bytes = record::encode_meta(&rec);
        let replicas: Vec<&Replica> = self.online().collect();
        let results = for_each_parallel(&replicas, |r| {
            self.injected(r.index)?;
            let dir = layout::create_key_dirs(&r.objects, key)?;
            self.write_record(r, &dir, &v, &bytes)
        });
        let errors = failures(results, replicas.iter().map(|r| r.index));
        // A marker that did not land everywhere is taken back everywhere, like a put.
        self.finish_commit(key, &v, errors, &[])
    }

    /// Removes every version of `key` but the newest `keep` ones (and, with `older_than`,
    /// only those older than that), on every online replica.
    fn prune_key(&self, key: &str, keep: usize, older_than: Option<Duration>) -> io::Result<usize> {
        let cutoff = older_than.map(|d| now_ns().saturating_sub(d.as_nanos() as u64));
        let mut removed = BTreeSet::new();
        for r in self.online() {
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
                durable::sync_dir(&dir)?;
                remove_empty_dirs(&r.objects, key);
            }
        }
        Ok(removed.len())
    }

    fn prune(&self, prefix: &str, keep: usize, older_than: Option<Duration>) -> StoreResult<usize> {
        let keys = self.walk_keys(prefix, true)?;
        let mut n = 0;
        for key in keys {
            n += self
                .prune_key(&key, keep, older_than)
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
            walk(&dir, &base, Some(&partial), &mut |key, latest| {
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
    fn list_level(&self, prefix: &str) -> StoreResult<BTreeMap<String, (bool, bool)>> {
        let mut out: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        for r in self.online() {
            let (dir, base, partial) = layout::prefix_dir(&r.objects, prefix);
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(prefix, "listing", e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(prefix, "listing", e))?;
                let name = entry.file_name();
                let Some(comp) = listable_component(&dir, &entry, &name)
                    .map_err(|e| StoreError::io(prefix, "listing", e))?
                else {
                    continue;
                };
                if !comp.starts_with(&partial) {
                    continue;
                }
                let path = entry.path();
                let has_versions = path.join(layout::VERSIONS_DIR).is_dir();
                let slot = out.entry(format!("{base}{comp}")).or_default();
                slot.0 |= has_versions;
                if !slot.1 {
                    slot.1 = subtree_has_live(&path)
                        .map_err(|e| StoreError::io(prefix, "listing", e))?;
                }
            }
        }
        // Liveness of objects is decided across replicas (newest version anywhere).
        let mut result = BTreeMap::new();
        for (key, (has_versions, subtree)) in out {
            let live = has_versions && self.resolve(&key, None)?.is_some_and(|(v, _)| !v.deleted);
            if live || subtree {
                result.insert(key, (live, subtree));
            }
        }
        Ok(result)
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
            let read = self.read_version(src, Some(src_id), |rep, v, rec| {
                let file =
                    File::open(rep.data_path(src, &v.id)).map_err(|e| replica_err(src, e))?;
                record::read_verified(&file, rec, r.clone())?.map_err(ReplicaError::Corrupt)
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
        let (rec, id, ()) = self.read_version(key, id, |_, _, _| Ok(()))?;
        Ok(info_of(&rec, &id))
    }
}

/// Total and available bytes of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Rejects keys no backend should accept.
fn validate_key(key: &str) -> StoreResult<()> {
    if key.is_empty() || key.len() > StoreLimits::S3.max_key_bytes || key.contains('\0') {
        return Err(StoreError::invalid(key, "invalid key"));
    }
    Ok(())
}

/// Whether a component directory's subtree (below its own versions) holds a live object.
fn subtree_has_live(dir: &Path) -> io::Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == layout::VERSIONS_DIR || name == layout::NAME_FILE {
            continue;
        }
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let path = entry.path();
        let versions = replica::versions_in(&path.join(layout::VERSIONS_DIR))?;
        if versions.last().is_some_and(|v| !v.deleted) || subtree_has_live(&path)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The key component of a replica directory entry, or `None` for entries no key maps to:
/// the store's own files, and what something else planted there (names that are not UTF-8,
/// symlinks, plain files, damaged long-name files), which is skipped with a warning rather
/// than followed or allowed to fail the whole listing.
fn listable_component(
    dir: &Path,
    entry: &fs::DirEntry,
    name: &std::ffi::OsStr,
) -> io::Result<Option<String>> {
    let Some(name) = name.to_str() else {
        warn!(
            "{}: skipping an entry whose name is not UTF-8",
            entry.path().display()
        );
        return Ok(None);
    };
    if name == layout::VERSIONS_DIR || name == layout::NAME_FILE {
        return Ok(None);
    }
    if !layout::is_real_dir(entry)? {
        warn!(
            "{}: skipping an entry that is not a directory of the store",
            entry.path().display()
        );
        return Ok(None);
    }
    match layout::component_of(dir, name) {
        Ok(c) => Ok(c),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::NotFound
            ) =>
        {
            warn!(
                "{}: skipping a damaged long name: {e}",
                entry.path().display()
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Walks a replica's directory tree below `dir` (whose key prefix is `base`), calling `f`
/// with each key that has versions and its newest version. `partial` filters the first level.
fn walk(
    dir: &Path,
    base: &str,
    partial: Option<&str>,
    f: &mut dyn FnMut(String, Option<&VersionName>),
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(comp) = listable_component(dir, &entry, &name)? else {
            continue;
        };
        if partial.is_some_and(|p| !comp.starts_with(p)) {
            continue;
        }
        let key = format!("{base}{comp}");
        let path = entry.path();
        let versions = replica::versions_in(&path.join(layout::VERSIONS_DIR))?;
        if !versions.is_empty() {
            f(key.clone(), versions.last());
        }
        walk(&path, &format!("{key}/"), None, f)?;
    }
    Ok(())
}

/// Removes the now-empty directories of a key, bottom up (best effort).
fn remove_empty_dirs(objects: &Path, key: &str) {
    let mut dir = layout::key_dir(objects, key);
    let _ = fs::remove_dir(dir.join(layout::VERSIONS_DIR));
    while dir != objects && dir.starts_with(objects) {
        if layout::is_hashed(dir.file_name().and_then(|n| n.to_str()).unwrap_or(""))
            && fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 1
        {
            let _ = fs::remove_file(dir.join(layout::NAME_FILE));
        }
        if fs::remove_dir(&dir).is_err() {
            break;
        }
        if let Some(parent) = dir.parent() {
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
        vec![(
            "replicas_repaired",
            self.inner
                .repaired
                .load(std::sync::atomic::Ordering::Relaxed),
        )]
    }

    fn limits(&self) -> StoreLimits {
        StoreLimits {
            min_part_size: 1,
            max_part_size: 1 << 30,
            max_parts: u64::MAX,
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
        blocking(move || {
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
            // The key is checked against the record first: a wrong key is the caller's
            // error, never a reason to think a replica is damaged.
            let (rec, _, ()) = inner.read_version(&k, id.as_deref(), |_, _, _| Ok(()))?;
            let obj_key = sse::for_get(&k, rec.sse.as_ref(), &sse_req, inner.store_key())?;
            let (rec, vid, (r, mut data)) =
                inner.read_version(&k, id.as_deref(), |rep, v, rec| {
                    let r = clamp_range(range.clone(), rec.size);
                    let file =
                        File::open(rep.data_path(&k, &v.id)).map_err(|e| replica_err(&k, e))?;
                    let data = record::read_verified(&file, rec, r.clone())?
                        .map_err(ReplicaError::Corrupt)?;
                    Ok((r, data))
                })?;
            if let Some(key) = &obj_key {
                key.apply(r.start, &mut data);
            }
            Ok((rec, vid, (r, data)))
        })
        .await?;
        Ok(GetResult {
            info: info_of(&rec, &id),
            range: r,
            body: Bytes::from(body),
        })
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        let inner = self.inner.clone();
        let k = key.to_string();
        let id = opts.version_id.clone();
        let sse_req = opts.sse.clone();
        blocking(move || {
            let (rec, id, ()) = inner.read_version(&k, id.as_deref(), |_, _, _| Ok(()))?;
            sse::for_get(&k, rec.sse.as_ref(), &sse_req, inner.store_key())?;
            Ok(info_of(&rec, &id))
        })
        .await
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        let inner = self.inner.clone();
        let req = req.clone();
        blocking(move || {
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
                req.continuation.as_deref(),
                if req.max_keys == 0 {
                    usize::MAX
                } else {
                    req.max_keys
                },
                keys.into_iter(),
            );
            let mut objects = Vec::with_capacity(page.objects.len());
            for key in page.objects {
                match inner.head_latest(&key, None) {
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
            let Some((latest, _)) = inner.resolve(&key, None)? else {
                return Ok(());
            };
            if inner.versioning {
                if latest.deleted {
                    return Ok(());
                }
                inner.put_marker(&key)
            } else {
                inner
                    .prune_key(&key, 0, None)
                    .map(|_| ())
                    .map_err(|e| StoreError::io(&key, "deleting", e))
            }
        })
        .await
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        validate_key(dst)?;
        let put = PutOptions {
            metadata: opts.metadata.clone().unwrap_or_default(),
            sse: opts.sse.clone(),
            checksum: None,
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
        let (src_sse, dst_sse) = (opts.source_sse.clone(), opts.sse.clone());
        blocking(move || {
            // Find a verified record of the source; the data file is shared by a hard link,
            // so a copy moves no data (rename and metadata updates cost one small write).
            let (rec, id, ()) = inner.read_version(&src, src_id.as_deref(), |_, _, _| Ok(()))?;
            let src_key = sse::for_get(&src, rec.sse.as_ref(), &src_sse, inner.store_key())?;
            if !sse::same_encryption(rec.sse.as_ref(), &dst_sse) {
                let metadata = new_meta.unwrap_or(rec.metadata.clone());
                return inner.copy_reencrypting(&src, &id, &rec, src_key, &dst, metadata, &dst_sse);
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
            let replicas: Vec<&Replica> = inner.online().collect();
            let results = for_each_parallel(&replicas, |r| {
                inner.injected(r.index)?;
                let dir = layout::create_key_dirs(&r.objects, &dst)?;
                let target = dir.join(format!("{}{DATA_SUFFIX}", v.id));
                match fs::hard_link(r.data_path(&src, &id), &target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // This replica lacks the source: copy it from one that has it.
                        let good = replicas
                            .iter()
                            .find(|g| g.data_path(&src, &id).exists())
                            .ok_or_else(|| io::Error::other("no replica has the source data"))?;
                        let tmp = r
                            .tmp
                            .join(format!("{}-{:08x}{DATA_SUFFIX}", v.id, random_u32()));
                        {
                            let mut from = File::open(good.data_path(&src, &id))?;
                            let mut to = File::create(&tmp)?;
                            io::copy(&mut from, &mut to)?;
                            to.sync_all()?;
                        }
                        fs::rename(&tmp, &target)?;
                    }
                    Err(e) => return Err(e),
                }
                inner.write_record(r, &dir, &v, &bytes)
            });
            let errors = failures(results, replicas.iter().map(|r| r.index));
            inner.finish_commit(&dst, &v, errors, &[])?;
            Ok(info_of(&new, &v.id))
        })
        .await
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
        .map_err(|e| StoreError::invalid("", format!("store task failed: {e}")))?;
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
