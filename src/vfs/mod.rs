//! POSIX semantics over objects: inodes, handles, directories, rename and attributes.
//!
//! A file is one object whose key is the mount's prefix plus its path; a directory is a key
//! prefix with a marker object (`path/`) that keeps it when empty and holds its attributes.
//! The vfs keeps an inode per name it has seen; directory contents come from one listing
//! (with sizes and metadata from the listing where the backend gives them) and are then kept
//! up to date by the mount's own operations.
//!
//! Locking: the inode table is a short-held mutex never kept across an await; each regular
//! file has an async mutex over its content; operations that need keys to stay put hold
//! the namespace lock for reading, and renames take it for writing.

pub mod attr;
mod attr_index;
pub mod file;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, RwLock};
use tracing::{error, warn};

use crate::cache::ChunkCache;
use crate::cache::staging::StagingKey;
use crate::crypt::Crypt;
use crate::error::{FsError, FsResult};
use crate::store::{
    CopyOptions, GetOptions, ListPage, ListRequest, Metadata, ObjectStore, PutOptions, Sse,
    StoreError, list_all, list_all_split,
};
pub use attr::{Attr, Defaults, Kind};
pub use attr_index::INDEX_DIR as ATTR_INDEX_DIR;
use attr_index::{AttrIndex, IndexEntry, Listed};
use file::{FileCtx, FileData};

pub const ROOT: u64 = 1;
const MAX_NAME: usize = 255;
/// The namespace of the extended attributes a mount stores.
pub const XATTR_NAMESPACE: &str = "user.";
/// Names outside [`XATTR_NAMESPACE`] (security.*, system.posix_acl_*, trusted.*) are not
/// stored: asking for one is "unsupported" (EOPNOTSUPP, as on a filesystem mounted without
/// ACLs), not "absent", so tools stop asking for them.
fn unsupported_xattr() -> FsError {
    FsError::new(libc::EOPNOTSUPP, "only user.* attributes are stored")
}
/// Largest value of one extended attribute.
const MAX_XATTR_VALUE: usize = 1024;

#[derive(Clone, Debug)]
pub struct VfsConfig {
    /// Object key prefix of the mount ("" or ending in `/`).
    pub prefix: String,
    pub defaults: Defaults,
    pub cache_bytes: usize,
    pub staging_dir: PathBuf,
    pub sse: Sse,
    pub read_only: bool,
    /// How often changed attributes are written back (they are also written on fsync,
    /// rename and unmount).
    pub meta_flush_interval: Duration,
    /// Memory for write buffers across all files; writers wait when it is spent.
    pub write_buffer_bytes: Option<usize>,
    /// How long a directory listing is trusted before it is listed again (`None`: for
    /// ever, for a store no one else writes to).
    pub metadata_ttl: Option<Duration>,
    /// A top-level name the mount hides and refuses to create (the store's own data).
    pub reserved_root_name: Option<String>,
}

/// Counters for `coffer stats` and the logs.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub files_committed: AtomicU64,
    pub errors: AtomicU64,
    /// Names the kernel looked up (entries a listing passed on with their attributes are
    /// not looked up again).
    pub lookups: AtomicU64,
    /// Extended attributes asked for outside the stored namespace (answered "unsupported").
    pub xattrs_unsupported: AtomicU64,
}

struct Inode {
    parent: u64,
    name: String,
    attr: Attr,
    /// Kernel references (lookup counts).
    lookups: u64,
    /// Directory entries, once listed.
    children: Option<BTreeMap<String, u64>>,
    /// Whether `attr` came from the store (a directory seen only as a prefix, or a file from
    /// a listing without metadata, needs a head first).
    attr_loaded: bool,
    xattrs: BTreeMap<String, Vec<u8>>,
    symlink: Option<String>,
    file: Option<Arc<AsyncMutex<FileData>>>,
    /// Attributes changed since they were last stored.
    meta_dirty: bool,
    open: u32,
    /// Unlinked while open: its object key is deleted when the last handle closes.
    pending_delete: Option<String>,
    /// Where the content of a file unlinked or replaced while open was moved (under
    /// [`OPEN_DELETED_DIR`]), so that its name can be reused and its readers still read it.
    moved_to: Option<String>,
    unlinked: bool,
    load_lock: Arc<AsyncMutex<()>>,
    /// When a directory was last listed (its entries are listed again after the metadata
    /// TTL, to see what other clients did).
    listed_at: Option<Instant>,
    /// The object's ETag as last listed, to tell a file changed by another client.
    etag: Option<String>,
    /// The ETag of the content the kernel's page cache may hold for this file, recorded at
    /// each open; `None` once this mount wrote or truncated it. An open that finds it equal
    /// to `etag` lets the kernel keep those pages (see [`Vfs::open_file`]).
    cached_etag: Option<String>,
    /// The metadata the object is stored with, as this mount last stored or read it
    /// (without the envelope): what the directory's attribute index records.
    stored_meta: Option<Metadata>,
    /// The stored version as a listing last showed it; `None` after this mount stored the
    /// object anew, until a listing shows the new version.
    listed: Option<Listed>,
    /// A directory whose attribute index is out of date, and when it last changed.
    index_stale_since: Option<Instant>,
    /// A metadata copy of this file is on its way: a listing may show the new version
    /// while `stored_meta` still holds the old attributes.
    meta_in_flight: bool,
}

impl Inode {
    fn new(parent: u64, name: String, attr: Attr) -> Inode {
        Inode {
            parent,
            name,
            attr,
            lookups: 0,
            children: None,
            attr_loaded: true,
            xattrs: BTreeMap::new(),
            symlink: None,
            file: None,
            meta_dirty: false,
            open: 0,
            pending_delete: None,
            moved_to: None,
            unlinked: false,
            load_lock: Arc::new(AsyncMutex::new(())),
            listed_at: None,
            etag: None,
            cached_etag: None,
            stored_meta: None,
            listed: None,
            index_stale_since: None,
            meta_in_flight: false,
        }
    }
}

struct Table {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
}

impl Table {
    fn get(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes
            .get(&ino)
            .ok_or_else(|| FsError::new(libc::ENOENT, format!("inode {ino} is gone")))
    }

    fn get_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| FsError::new(libc::ENOENT, format!("inode {ino} is gone")))
    }

    /// Path of an inode below the mount root ("" for the root).
    fn path(&self, ino: u64) -> FsResult<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let i = self.get(cur)?;
            parts.push(i.name.as_str());
            cur = i.parent;
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    fn insert(&mut self, parent: u64, name: &str, inode: Inode) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, inode);
        if let Some(c) = self
            .inodes
            .get_mut(&parent)
            .and_then(|p| p.children.as_mut())
        {
            c.insert(name.to_string(), ino);
        }
        ino
    }

    fn child(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        Ok(self
            .get(parent)?
            .children
            .as_ref()
            .and_then(|c| c.get(name).copied()))
    }

    /// Whether `ino` is `ancestor` or below it.
    fn is_within(&self, mut ino: u64, ancestor: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT {
                return false;
            }
            match self.inodes.get(&ino) {
                Some(i) => ino = i.parent,
                None => return false,
            }
        }
    }
}

/// Serves tickets in order: each request runs on its own task, and tasks can reach a file's
/// lock in another order than the kernel sent them; a sequential writer whose writes are
/// applied out of order would stop streaming and rewrite its file.
#[derive(Default)]
pub struct OrderGate {
    next: AtomicU64,
    serving: AtomicU64,
    turn: tokio::sync::Notify,
}

/// A place in a file's write order, taken when the request arrives.
pub struct WriteTicket {
    gate: Arc<OrderGate>,
    n: u64,
}

impl WriteTicket {
    /// Whether every write ahead of this one is done.
    fn is_turn(&self) -> bool {
        self.gate.serving.load(Ordering::Acquire) == self.n
    }

    async fn wait(&self) {
        loop {
            let notified = self.gate.turn.notified();
            if self.is_turn() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for WriteTicket {
    /// Passes the turn on, whether the write succeeded, failed or was dropped.
    fn drop(&mut self) {
        let _ = self.gate.serving.compare_exchange(
            self.n,
            self.n + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.gate.turn.notify_waiters();
    }
}

/// One entry of a directory listing: inode, name and attributes.
pub type DirEntry = (u64, String, Attr);

/// A directory entry as the kernel sees it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub ino: u64,
    pub attr: Attr,
}

/// An open file handle.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep the pages it cached of the file (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
}

/// Changes requested by setattr.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
}

pub struct Vfs {
    store: Arc<dyn ObjectStore>,
    crypt: Crypt,
    cache: Arc<ChunkCache>,
    staging_key: StagingKey,
    budget: Option<Arc<crate::cache::memory::MemoryBudget>>,
    cfg: VfsConfig,
    table: Mutex<Table>,
    namespace: RwLock<()>,
    /// Counts this mount's changes to names and objects (creates, commits, renames,
    /// removals): a listing during which it moved may predate them, and is not merged.
    changes: AtomicU64,
    /// Open file handles: inode, and the process that opened it (see [`Vfs::flush_from`]).
    handles: Mutex<HashMap<u64, (u64, Option<u32>)>>,
    /// Per-file order of writes, as the kernel sent them (see [`WriteTicket`]).
    write_order: Mutex<HashMap<u64, Arc<OrderGate>>>,
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    pub stats: Stats,
}

/// The hidden root directory where files unlinked or replaced while open keep their content
/// until their last close. A crash leaves them there; a mount deletes those older than
/// [`OPEN_DELETED_MAX_AGE`] (another mount may still hold younger ones open).
pub const OPEN_DELETED_DIR: &str = ".coffer-open-deleted";
const OPEN_DELETED_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn check_name(name: &str) -> FsResult<()> {
    if name.len() > MAX_NAME {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("name of {} bytes", name.len()),
        ));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::new(libc::EINVAL, format!("invalid name {name:?}")));
    }
    Ok(())
}

/// Metadata as the attribute index keeps it: the wrapped data key stays with its object.
fn without_envelope(mut m: Metadata) -> Metadata {
    m.remove(crate::crypt::envelope::METADATA_KEY);
    m
}

/// Whether every entry of `current` is in `stored` with the same value.
fn metadata_covers(stored: &Metadata, current: &Metadata, ignore_times: bool) -> bool {
    current.iter().all(|(k, v)| {
        stored.get(k) == Some(v) || ignore_times && attr::TIME_KEYS.contains(&k.as_str())
    })
}

impl Vfs {
    pub fn new(store: Arc<dyn ObjectStore>, crypt: Crypt, cfg: VfsConfig) -> Arc<Vfs> {
        let d = cfg.defaults;
        let mut root = Inode::new(
            ROOT,
            String::new(),
            Attr::new(Kind::Dir, d.dir_perm, d.uid, d.gid),
        );
        root.lookups = 1;
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, root);
        Arc::new(Vfs {
            cache: Arc::new(ChunkCache::new(cfg.cache_bytes)),
            store,
            crypt,
            staging_key: StagingKey::generate(),
            budget: cfg
                .write_buffer_bytes
                .map(crate::cache::memory::MemoryBudget::new),
            cfg,
            table: Mutex::new(Table {
                inodes,
                next_ino: ROOT + 1,
            }),
            namespace: RwLock::new(()),
            changes: AtomicU64::new(0),
            handles: Mutex::new(HashMap::new()),
            write_order: Mutex::new(HashMap::new()),
            dir_handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stats: Stats::default(),
        })
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn ctx(&self) -> FileCtx<'_> {
        FileCtx {
            store: &self.store,
            crypt: &self.crypt,
            cache: &self.cache,
            staging_dir: &self.cfg.staging_dir,
            staging_key: &self.staging_key,
            sse: &self.cfg.sse,
            budget: &self.budget,
        }
    }

    fn get_opts(&self) -> GetOptions {
        GetOptions {
            sse: self.cfg.sse.clone(),
            version_id: None,
            if_match: None,
        }
    }

    fn file_key(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.prefix)
    }

    fn dir_prefix(&self, path: &str) -> String {
        if path.is_empty() {
            self.cfg.prefix.clone()
        } else {
            format!("{}{path}/", self.cfg.prefix)
        }
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            return Err(FsError::new(libc::EROFS, "mounted read-only"));
        }
        Ok(())
    }

    fn check_key_len(&self, key: &str) -> FsResult<()> {
        if key.len() + 1 > self.store.limits().max_key_bytes {
            return Err(FsError::new(
                libc::ENAMETOOLONG,
                format!(
                    "object key of {} bytes is over the store's limit",
                    key.len()
                ),
            ));
        }
        Ok(())
    }

    /// Stores a directory's marker object (empty, with the directory's attributes);
    /// `deferred`: durable with the store's next commit or at
    /// an fsync rather than before it returns (a new directory, as on ext4).
    async fn put_dir_marker(
        &self,
        key: &str,
        metadata: Metadata,
        deferred: bool,
    ) -> Result<crate::store::ObjectInfo, StoreError> {
        let opts = PutOptions {
            metadata,
            sse: self.cfg.sse.clone(),
            checksum: None,
            defer_durability: deferred,
        };
        self.store.put(key, bytes::Bytes::new(), &opts).await
    }

    /// The metadata an inode is stored with: its attributes and xattrs.
    fn metadata_of(inode: &Inode) -> Metadata {
        let mut m = Metadata::new();
        inode.attr.to_metadata(&mut m);
        attr::xattrs_to_metadata(&inode.xattrs, &mut m);
        m
    }

    // ---- directories -------------------------------------------------------------------

    /// Whether a directory's entries must be listed (again).
    fn needs_listing(&self, i: &Inode) -> bool {
        i.children.is_none()
            || self
                .cfg
                .metadata_ttl
                .is_some_and(|ttl| i.listed_at.is_none_or(|t| t.elapsed() >= ttl))
    }

    /// Lists a directory from the store: once, or again after the metadata TTL.
    async fn ensure_loaded(&self, dir: u64) -> FsResult<()> {
        let (lock, path) = {
            let t = self.table.lock();
            let i = t.get(dir)?;
            if i.attr.kind != Kind::Dir {
                return Err(FsError::new(libc::ENOTDIR, "not a directory"));
            }
            if !self.needs_listing(i) {
                return Ok(());
            }
            (i.load_lock.clone(), t.path(dir)?)
        };
        let _guard = lock.lock().await;
        let refresh = {
            let t = self.table.lock();
            let i = t.get(dir)?;
            if !self.needs_listing(i) {
                return Ok(());
            }
            i.children.is_some()
        };
        let prefix = self.dir_prefix(&path);
        let changes_before = self.changes.load(Ordering::Acquire);
        let (page, index) = self.list_dir(&prefix).await?;
        let without_metadata = page.objects.iter().filter(|o| o.metadata.is_none()).count();
        let mut index = match index {
            Some(read) => read,
            None if without_metadata >= attr_index::MIN_ENTRIES => {
                self.load_attr_index(&prefix).await
            }
            None => None,
        };
        let mut index_misses = 0;
        let g = self.crypt.geometry();
        let d = self.cfg.defaults;
        let mut entries: BTreeMap<String, Inode> = BTreeMap::new();
        let mut own_marker = None;
        let reserved = |name: &str| self.is_reserved(dir, name);
        for p in &page.common_prefixes {
            let name = p[prefix.len()..].trim_end_matches('/');
            if reserved(name) {
                continue;
            }
            if check_name(name).is_err() {
                warn!("{p}: skipping a prefix whose name no file can have");
                continue;
            }
            let mut inode = Inode::new(
                dir,
                name.to_string(),
                Attr::new(Kind::Dir, d.dir_perm, d.uid, d.gid),
            );
            inode.attr_loaded = false;
            entries.insert(name.to_string(), inode);
        }
        for o in page.objects {
            let name = &o.key[prefix.len()..];
            if name.is_empty() {
                own_marker = Some(o);
                continue;
            }
            if reserved(name) {
                continue;
            }
            if check_name(name).is_err() {
                warn!("{}: skipping an object whose name no file can have", o.key);
                continue;
            }
            if entries.contains_key(name) {
                warn!("{}: hidden by a directory of the same name", o.key);
                continue;
            }
            let listed = Listed::new(&o.etag, o.size, o.mtime);
            let metadata = o.metadata.clone().or_else(|| {
                let found = index.as_mut().and_then(|x| x.take(name, &listed));
                index_misses += usize::from(found.is_none());
                found
            });
            let mut attr = Attr::from_metadata(
                Kind::File,
                metadata.as_ref().unwrap_or(&Metadata::new()),
                o.mtime,
                &d,
            );
            attr.size = g.plain_size(o.size).unwrap_or_else(|e| {
                warn!("{}: {e}; reads will fail", o.key);
                0
            });
            let mut inode = Inode::new(dir, name.to_string(), attr);
            inode.etag = Some(o.etag.clone());
            inode.listed = Some(listed);
            if let Some(m) = &metadata {
                inode.xattrs = attr::xattrs_from_metadata(m);
            } else {
                inode.attr_loaded = false;
            }
            inode.stored_meta = metadata.and_then(|m| self.for_index(m));
            inode.file = Some(Arc::new(AsyncMutex::new(FileData::existing(
                inode.attr.size,
            ))));
            entries.insert(name.to_string(), inode);
        }
        let mut t = self.table.lock();
        if let Some(m) = own_marker.and_then(|o| o.metadata.map(|m| (m, o.mtime)))
            && let Ok(i) = t.get_mut(dir)
            && !i.attr_loaded
        {
            i.attr = Attr::from_metadata(Kind::Dir, &m.0, m.1, &d);
            i.xattrs = attr::xattrs_from_metadata(&m.0);
            i.attr_loaded = true;
        }
        if refresh {
            if self.changes.load(Ordering::Acquire) != changes_before {
                // This mount changed names or objects while the listing ran: it may show
                // states older than the table's. Listed again at the next look.
                return Ok(());
            }
            Self::merge_listing(&mut t, dir, entries)?;
        } else {
            t.get_mut(dir)?.children = Some(BTreeMap::new());
            for (name, inode) in entries {
                t.insert(dir, &name, inode);
            }
        }
        let i = t.get_mut(dir)?;
        i.listed_at = Some(Instant::now());
        if index_misses >= attr_index::MIN_ENTRIES {
            // The heads that fill these in make the index worth writing.
            i.index_stale_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Every entry of the directory with key prefix `prefix`, and its attribute index where
    /// it was read on the way (`Some(None)`: read and found missing or unusable).
    ///
    /// A directory of more than a page on a store whose listings lack metadata reads its
    /// index after the first page (the attributes need it anyway), and lists the rest as
    /// ranges between the split points the index names (about a page each), all at once.
    #[allow(clippy::type_complexity)]
    async fn list_dir(&self, prefix: &str) -> FsResult<(ListPage, Option<Option<AttrIndex>>)> {
        let req = ListRequest {
            prefix: prefix.to_string(),
            delimiter: Some('/'),
            ..Default::default()
        };
        let mut page = self.store.list(&req).await?;
        let Some(token) = page.next.take() else {
            return Ok((page, None));
        };
        let limits = self.store.limits();
        let last = [
            page.objects.last().map(|o| &o.key),
            page.common_prefixes.last(),
        ]
        .into_iter()
        .flatten()
        .max()
        .cloned();
        let (rest, index) = match last {
            Some(after) if limits.lists_after_a_key && !limits.listing_has_metadata => {
                // A head of the index gives its split points at once; the index itself (a
                // few MB for 10,000 files) is fetched and parsed while the ranges list.
                let key = attr_index::index_key(&self.cfg.prefix, prefix);
                let head = self.store.head(&key, &self.get_opts()).await;
                let splits = match &head {
                    Ok(info) => attr_index::splits_after(info.metadata.as_ref(), prefix, &after),
                    Err(_) => Vec::new(),
                };
                let req = ListRequest {
                    start_after: Some(after),
                    ..req
                };
                let index = async {
                    match head {
                        Err(StoreError::NotFound { .. }) => None,
                        _ => self.load_attr_index(prefix).await,
                    }
                };
                let (rest, index) =
                    tokio::join!(list_all_split(self.store.as_ref(), &req, &splits), index);
                (rest?, Some(index))
            }
            _ => {
                let req = ListRequest {
                    continuation: Some(token),
                    ..req
                };
                (list_all(self.store.as_ref(), req).await?, None)
            }
        };
        page.append(rest);
        Ok((page, index))
    }

    /// Applies a new listing of a directory listed before: entries other clients added
    /// appear, those they removed go, files they changed are read afresh. Nothing this
    /// mount holds open or has not stored yet is touched.
    fn merge_listing(t: &mut Table, dir: u64, mut listed: BTreeMap<String, Inode>) -> FsResult<()> {
        let current = t.get(dir)?.children.clone().unwrap_or_default();
        for (name, ino) in current {
            let Some(i) = t.inodes.get_mut(&ino) else {
                continue;
            };
            let busy = i.open > 0 || i.meta_dirty || i.pending_delete.is_some();
            match listed.remove(&name) {
                None if busy || (i.attr.kind == Kind::Dir && i.children.is_some()) => {}
                None => {
                    if let Some(c) = t.get_mut(dir)?.children.as_mut() {
                        c.remove(&name);
                    }
                }
                Some(new) => {
                    let changed = i.attr.kind == Kind::File
                        && new.attr.kind == Kind::File
                        && i.etag.is_some()
                        && new.etag != i.etag;
                    if changed && !busy {
                        i.attr = new.attr;
                        i.attr_loaded = new.attr_loaded;
                        i.xattrs = new.xattrs;
                        i.file = new.file;
                        i.etag = new.etag;
                        i.stored_meta = new.stored_meta;
                        i.listed = new.listed;
                    }
                }
            }
        }
        for (name, inode) in listed {
            t.insert(dir, &name, inode);
        }
        Ok(())
    }

    /// Loads the attributes of an inode seen only in a listing (a head of its object or
    /// directory marker).
    async fn ensure_attr(&self, ino: u64) -> FsResult<()> {
        let (kind, key) = {
            let t = self.table.lock();
            let i = t.get(ino)?;
            if i.attr_loaded {
                return Ok(());
            }
            let path = t.path(ino)?;
            let key = match i.attr.kind {
                Kind::Dir => self.dir_prefix(&path),
                _ => self.file_key(&path),
            };
            (i.attr.kind, key)
        };
        let d = self.cfg.defaults;
        let head = self.store.head(&key, &self.get_opts()).await;
        let (attr, xattrs, stored) = match head {
            Ok(info) => {
                let m = info.metadata.clone().unwrap_or_default();
                let mut a = Attr::from_metadata(kind, &m, info.mtime, &d);
                if kind != Kind::Dir {
                    a.size = self.crypt.geometry().plain_size(info.size).unwrap_or(0);
                }
                (a, attr::xattrs_from_metadata(&m), Some((info.etag, m)))
            }
            Err(StoreError::NotFound { .. }) if kind == Kind::Dir => (
                Attr::new(Kind::Dir, d.dir_perm, d.uid, d.gid),
                BTreeMap::new(),
                None,
            ),
            Err(e) => return Err(e.into()),
        };
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        if !i.attr_loaded {
            i.attr = attr;
            i.xattrs = xattrs;
            i.attr_loaded = true;
            // Recorded for the index only if the head found the version the listing showed.
            if let Some((etag, m)) = stored
                && i.etag.as_deref() == Some(etag.as_str())
            {
                i.stored_meta = self.for_index(without_envelope(m));
                // A directory whose heads are still coming is not quiet yet.
                let parent = i.parent;
                if let Ok(p) = t.get_mut(parent)
                    && p.index_stale_since.is_some()
                {
                    p.index_stale_since = Some(Instant::now());
                }
            }
        }
        Ok(())
    }

    // ---- attribute indexes (see attr_index) ---------------------------------------------

    /// An index's stored bytes parsed on the blocking pool: an index of 10,000 files takes
    /// about 0.1 s, which the listing of the directory's ranges goes on through meanwhile.
    async fn parse_index(body: bytes::Bytes, dir_prefix: &str) -> Result<AttrIndex, String> {
        let dir = dir_prefix.to_string();
        tokio::task::spawn_blocking(move || AttrIndex::parse(&body, &dir))
            .await
            .unwrap_or_else(|e| Err(format!("parse failed: {e}")))
    }

    /// The stored attribute index of a directory, if there is a usable one.
    async fn load_attr_index(&self, dir_prefix: &str) -> Option<AttrIndex> {
        let key = attr_index::index_key(&self.cfg.prefix, dir_prefix);
        match self.store.get(&key, None, &self.get_opts()).await {
            Ok(got) => match Self::parse_index(got.body, dir_prefix).await {
                Ok(index) => Some(index),
                Err(e) => {
                    warn!("{key}: attribute index of {dir_prefix:?} not used: {e}");
                    None
                }
            },
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => {
                warn!("{key}: attribute index of {dir_prefix:?} not read: {e}");
                None
            }
        }
    }

    /// Stored metadata as an inode keeps it for its directory's index: only where there are
    /// indexes (a copy per file would otherwise cost memory for nothing).
    fn for_index(&self, m: Metadata) -> Option<Metadata> {
        (!self.store.limits().listing_has_metadata).then_some(m)
    }

    /// After this mount stored a file's object anew (its data, its metadata, or a rename's
    /// copy into `dir`): the metadata its index entry is to record, known once a listing
    /// shows the new version, and `dir`'s index out of date.
    fn note_stored(&self, t: &mut Table, ino: u64, dir: u64, meta: Metadata) {
        if let Ok(i) = t.get_mut(ino) {
            i.stored_meta = self.for_index(meta);
            i.listed = None;
        }
        self.note_index_stale(t, dir);
    }

    /// Marks a directory's index out of date (on stores whose listings lack metadata).
    fn note_index_stale(&self, t: &mut Table, dir: u64) {
        if self.store.limits().listing_has_metadata {
            return;
        }
        if let Ok(d) = t.get_mut(dir) {
            d.index_stale_since = Some(Instant::now());
        }
    }

    /// Writes the indexes of the directories out of date for at least `quiet` (every one at
    /// unmount; periodically only those a while unchanged, so that a directory being filled
    /// is not indexed again and again). Failures are logged: an index only spares heads.
    pub async fn write_attr_indexes(&self, quiet: Duration) {
        if self.cfg.read_only || self.store.limits().listing_has_metadata {
            return;
        }
        let due: Vec<u64> = self
            .table
            .lock()
            .inodes
            .iter()
            .filter(|(_, i)| {
                i.children.is_some()
                    && !i.unlinked
                    && i.index_stale_since.is_some_and(|t| t.elapsed() >= quiet)
            })
            .map(|(ino, _)| *ino)
            .collect();
        for dir in due {
            if let Err(e) = self.write_attr_index(dir).await {
                // The next change of the directory tries again; the others wait for then
                // too, rather than each waiting out the same failure.
                warn!("writing an attribute index: {e}");
                break;
            }
        }
    }

    async fn write_attr_index(&self, dir: u64) -> FsResult<()> {
        let prefix = {
            let mut t = self.table.lock();
            let path = t.path(dir)?;
            t.get_mut(dir)?.index_stale_since = None;
            self.dir_prefix(&path)
        };
        // A fresh listing gives each object's last-modified time, which a put does not
        // return; the inodes give the metadata this mount stored or read for that version.
        let page = list_all(
            self.store.as_ref(),
            ListRequest {
                prefix: prefix.clone(),
                delimiter: Some('/'),
                ..Default::default()
            },
        )
        .await?;
        if !(attr_index::MIN_ENTRIES..=attr_index::MAX_ENTRIES).contains(&page.objects.len()) {
            return Ok(());
        }
        let mut index = AttrIndex::new(&prefix);
        {
            let mut t = self.table.lock();
            if t.get(dir)?.index_stale_since.is_some() {
                // Changed while the listing ran: written once it has been quiet again. The
                // listing must not be kept as any inode's either: a file stored anew
                // meanwhile would take its older time, and the next index would leave that
                // file out as changed by another client (its next cold mount paid a head).
                return Ok(());
            }
            let Some(children) = t.get(dir)?.children.clone() else {
                return Ok(());
            };
            for o in &page.objects {
                let name = &o.key[prefix.len()..];
                let Some(i) = children.get(name).and_then(|ino| t.inodes.get_mut(ino)) else {
                    continue;
                };
                let current = i.attr.kind == Kind::File
                    && !i.meta_dirty
                    && !i.meta_in_flight
                    && i.open == 0
                    && i.etag.as_deref() == Some(o.etag.as_str());
                let Some(meta) = i.stored_meta.as_ref().filter(|_| current) else {
                    continue;
                };
                let listed = Listed::new(&o.etag, o.size, o.mtime);
                match &i.listed {
                    // Stored anew by this mount: this is its first listing.
                    None => i.listed = Some(listed.clone()),
                    // The same ETag at another time: another client copied it (a metadata
                    // change); its attributes are not the ones this mount knows.
                    Some(known) if *known != listed => continue,
                    Some(_) => {}
                }
                index.entries.insert(
                    name.to_string(),
                    IndexEntry {
                        listed,
                        meta: meta.clone(),
                    },
                );
            }
        }
        if self.table.lock().get(dir)?.index_stale_since.is_some() {
            // Changed since: written once it has been quiet again. (A change that the
            // listing shows but the inodes do not yet is not taken: its ETag or time
            // differs, or its copy is in flight.)
            return Ok(());
        }
        if index.entries.len() < attr_index::MIN_ENTRIES {
            return Ok(());
        }
        let key = attr_index::index_key(&self.cfg.prefix, &prefix);
        let names: Vec<&str> = page
            .objects
            .iter()
            .map(|o| &o.key[prefix.len()..])
            .collect();
        let opts = PutOptions {
            metadata: attr_index::splits_value(&names)
                .map(|v| Metadata::from([(attr_index::SPLITS_KEY.to_string(), v)]))
                .unwrap_or_default(),
            sse: self.cfg.sse.clone(),
            checksum: None,
            defer_durability: false,
        };
        // A refused or failed put is not retried until the directory changes again (a
        // policy that refuses unencrypted writes refuses this one every time).
        self.store
            .put(&key, index.to_bytes().into(), &opts)
            .await
            .map_err(FsError::from)?;
        Ok(())
    }

    /// The inode of an existing entry of a directory (ENOENT if there is none).
    async fn existing_child(&self, parent: u64, name: &str) -> FsResult<u64> {
        check_name(name)?;
        self.ensure_loaded(parent).await?;
        self.table
            .lock()
            .child(parent, name)?
            .ok_or_else(|| FsError::new(libc::ENOENT, "no such file"))
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Entry> {
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let ino = self.existing_child(parent, name).await?;
        self.ensure_attr(ino).await?;
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        i.lookups += 1;
        Ok(Entry {
            ino,
            attr: i.attr.clone(),
        })
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let mut t = self.table.lock();
        let Some(i) = t.inodes.get_mut(&ino) else {
            return;
        };
        i.lookups = i.lookups.saturating_sub(n);
        if i.lookups == 0 && i.unlinked && i.open == 0 && ino != ROOT {
            t.inodes.remove(&ino);
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.ensure_attr(ino).await?;
        Ok(self.table.lock().get(ino)?.attr.clone())
    }

    /// Entries of a directory, without `.` and `..`, with their attributes.
    pub async fn readdir(&self, dir: u64) -> FsResult<Vec<DirEntry>> {
        use futures::StreamExt;
        self.ensure_loaded(dir).await?;
        // Entries seen only in the listing (subdirectories, objects listed without
        // metadata) need their attributes before readdirplus hands them to the kernel.
        let unloaded: Vec<u64> = {
            let t = self.table.lock();
            let children = t.get(dir)?.children.clone().unwrap_or_default();
            children
                .values()
                .filter(|ino| t.inodes.get(ino).is_some_and(|i| !i.attr_loaded))
                .copied()
                .collect()
        };
        let mut heads = futures::stream::iter(unloaded)
            .map(|ino| async move { (ino, self.ensure_attr(ino).await) })
            .buffer_unordered(32);
        // One damaged entry must not make its whole directory unlistable: it is listed
        // with what the listing said, and a stat or read of it gives the error.
        while let Some((ino, r)) = heads.next().await {
            if let Err(e) = r {
                error!("{}: {e}", self.describe(ino));
            }
        }
        let t = self.table.lock();
        let children = t.get(dir)?.children.clone().unwrap_or_default();
        Ok(children
            .into_iter()
            .filter_map(|(name, ino)| t.inodes.get(&ino).map(|i| (ino, name, i.attr.clone())))
            .collect())
    }

    pub async fn opendir(&self, dir: u64) -> FsResult<u64> {
        let entries = self.readdir(dir).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dir_handles.lock().insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// The snapshot of a directory taken at opendir (so offsets stay stable).
    pub fn dir_entries(&self, fh: u64) -> Option<Arc<Vec<DirEntry>>> {
        self.dir_handles.lock().get(&fh).cloned()
    }

    pub fn releasedir(&self, fh: u64) {
        self.dir_handles.lock().remove(&fh);
    }

    /// An inode's attributes as they are now (readdirplus must not hand the kernel the
    /// attributes of its opendir snapshot: a setattr since then would be undone in the
    /// kernel's cache).
    /// Whether an inode's attributes are known (not only guessed from a listing): the
    /// kernel may cache only those.
    pub fn attr_known(&self, ino: u64) -> bool {
        self.table
            .lock()
            .inodes
            .get(&ino)
            .is_some_and(|i| i.attr_loaded)
    }

    pub fn current_attr(&self, ino: u64) -> Option<Attr> {
        self.table.lock().inodes.get(&ino).map(|i| i.attr.clone())
    }

    /// Counts a kernel reference made by readdirplus.
    pub fn add_lookup(&self, ino: u64) {
        if let Some(i) = self.table.lock().inodes.get_mut(&ino) {
            i.lookups += 1;
        }
    }

    pub fn parent_of(&self, ino: u64) -> u64 {
        self.table
            .lock()
            .inodes
            .get(&ino)
            .map_or(ROOT, |i| i.parent)
    }

    /// Reserves `name` in `parent` for a new inode, failing with EEXIST if taken.
    /// Also refuses a name whose object key would be too long for the store.
    fn reserve(&self, parent: u64, name: &str, inode: Inode) -> FsResult<(u64, String)> {
        self.check_not_reserved(parent, name)?;
        self.changes.fetch_add(1, Ordering::AcqRel);
        let mut t = self.table.lock();
        if t.get(parent)?.unlinked {
            return Err(FsError::new(libc::ENOENT, "directory was removed"));
        }
        if t.child(parent, name)?.is_some() {
            return Err(FsError::new(libc::EEXIST, "file exists"));
        }
        let path = match t.path(parent)?.as_str() {
            "" => name.to_string(),
            p => format!("{p}/{name}"),
        };
        self.check_key_len(&match inode.attr.kind {
            Kind::Dir => self.dir_prefix(&path),
            _ => self.file_key(&path),
        })?;
        let ino = t.insert(parent, name, inode);
        t.get_mut(ino)?.lookups = 1;
        Ok((ino, path))
    }

    /// Whether `name` in `parent` is one of the store's own names the mount hides.
    fn is_reserved(&self, parent: u64, name: &str) -> bool {
        parent == ROOT
            && (self.cfg.reserved_root_name.as_deref() == Some(name)
                || name == OPEN_DELETED_DIR
                || name == attr_index::INDEX_DIR)
    }

    fn check_not_reserved(&self, parent: u64, name: &str) -> FsResult<()> {
        if self.is_reserved(parent, name) {
            return Err(FsError::new(
                libc::EPERM,
                format!("{name} is reserved for the store's own data"),
            ));
        }
        Ok(())
    }

    fn unreserve(&self, parent: u64, name: &str, ino: u64) {
        let mut t = self.table.lock();
        if let Some(c) = t.inodes.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.remove(name);
        }
        t.inodes.remove(&ino);
    }

    fn touch_dir(&self, dir: u64) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        if let Some(i) = self.table.lock().inodes.get_mut(&dir) {
            let now = SystemTime::now();
            i.attr.mtime = now;
            i.attr.ctime = now;
        }
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &str,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Entry> {
        self.check_writable()?;
        check_name(name)?;
        self.ensure_loaded(parent).await?;
        let _ns = self.namespace.read().await;
        let attr = Attr::new(Kind::Dir, perm, uid, gid);
        let mut inode = Inode::new(parent, name.to_string(), attr.clone());
        inode.children = Some(BTreeMap::new());
        let (ino, path) = self.reserve(parent, name, inode)?;
        let key = self.dir_prefix(&path);
        let mut meta = Metadata::new();
        attr.to_metadata(&mut meta);
        if let Err(e) = self.put_dir_marker(&key, meta, true).await {
            self.unreserve(parent, name, ino);
            return Err(e.into());
        }
        self.touch_dir(parent);
        Ok(Entry { ino, attr })
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &str,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Entry, u64)> {
        self.check_writable()?;
        check_name(name)?;
        self.ensure_loaded(parent).await?;
        let attr = Attr::new(Kind::File, perm, uid, gid);
        let mut inode = Inode::new(parent, name.to_string(), attr.clone());
        inode.file = Some(Arc::new(AsyncMutex::new(FileData::new_empty())));
        inode.open = 1;
        let (ino, _) = self.reserve(parent, name, inode)?;
        self.touch_dir(parent);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, (ino, None));
        Ok((Entry { ino, attr }, fh))
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> FsResult<Entry> {
        self.check_writable()?;
        check_name(name)?;
        if target.is_empty() || target.len() > 4096 {
            return Err(FsError::new(libc::ENAMETOOLONG, "symlink target length"));
        }
        self.ensure_loaded(parent).await?;
        let _ns = self.namespace.read().await;
        let mut attr = Attr::new(Kind::Symlink, 0o777, uid, gid);
        attr.size = target.len() as u64;
        let mut inode = Inode::new(parent, name.to_string(), attr.clone());
        inode.symlink = Some(target.to_string());
        let (ino, path) = self.reserve(parent, name, inode)?;
        let key = self.file_key(&path);
        let result = async {
            let (body, mut meta) =
                crate::crypt::encrypt_all(&self.crypt, target.as_bytes()).await?;
            attr.to_metadata(&mut meta);
            let opts = PutOptions {
                checksum: Some(crate::store::Checksum::crc32c_of(&body)),
                // Durable with the next commit or at an fsync, as on ext4.
                defer_durability: true,
                metadata: meta,
                sse: self.cfg.sse.clone(),
            };
            self.store.put(&key, body.into(), &opts).await?;
            Ok::<_, FsError>(())
        }
        .await;
        if let Err(e) = result {
            self.unreserve(parent, name, ino);
            return Err(e);
        }
        self.touch_dir(parent);
        Ok(Entry { ino, attr })
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let key = {
            let t = self.table.lock();
            let i = t.get(ino)?;
            if i.attr.kind != Kind::Symlink {
                return Err(FsError::new(libc::EINVAL, "not a symlink"));
            }
            if let Some(target) = &i.symlink {
                return Ok(target.clone());
            }
            self.file_key(&t.path(ino)?)
        };
        let got = self.store.get(&key, None, &self.get_opts()).await?;
        let meta = got.info.metadata.clone().unwrap_or_default();
        let plain = crate::crypt::decrypt_all(&self.crypt, &meta, &got.body)
            .await
            .inspect_err(|e| error!("{key}: reading the symlink target: {e}"))?;
        let target = String::from_utf8(plain)
            .map_err(|_| FsError::new(libc::EIO, format!("{key}: symlink target is not UTF-8")))?;
        if let Ok(i) = self.table.lock().get_mut(ino) {
            i.symlink = Some(target.clone());
        }
        Ok(target)
    }

    /// Removes a name: files and symlinks (`dir == false`) or empty directories.
    async fn remove(&self, parent: u64, name: &str, dir: bool) -> FsResult<()> {
        self.check_writable()?;
        let ino = self.existing_child(parent, name).await?;
        if dir {
            self.ensure_loaded(ino).await?;
        }
        let _ns = self.namespace.read().await;
        self.changes.fetch_add(1, Ordering::AcqRel);
        let (key, file) = {
            let t = self.table.lock();
            let i = t.get(ino)?;
            match (dir, i.attr.kind == Kind::Dir) {
                (true, false) => return Err(FsError::new(libc::ENOTDIR, "not a directory")),
                (false, true) => return Err(FsError::new(libc::EISDIR, "is a directory")),
                _ => {}
            }
            if dir && i.children.as_ref().is_some_and(|c| !c.is_empty()) {
                return Err(FsError::new(libc::ENOTEMPTY, "directory not empty"));
            }
            let path = t.path(ino)?;
            let key = if dir {
                self.dir_prefix(&path)
            } else {
                self.file_key(&path)
            };
            (key, i.file.clone())
        };
        // The file stays locked until the name is gone: an attribute flush that waited for
        // it then finds it unlinked, where one that went on between this and the delete
        // copied the object again after its delete (the file came back).
        let mut locked = None;
        let exists = match &file {
            Some(f) => {
                let fd = locked.insert(f.lock().await);
                let open = self.table.lock().get(ino)?.open;
                if open > 0 {
                    // Still open: readers and writers keep its content, moved aside so that
                    // the name is free at once; the moved object goes at the last close.
                    if fd.is_dirty() && fd.exists {
                        fd.commit(&self.ctx(), &key, Metadata::new()).await?;
                    }
                    if fd.exists {
                        self.move_aside(ino, &key, fd).await?;
                    }
                    self.table.lock().get_mut(ino)?.unlinked = true;
                    fd.exists
                } else {
                    fd.discard().await;
                    fd.exists
                }
            }
            None => true,
        };
        if exists {
            self.store.delete(&key).await?;
        }
        if dir && !self.store.limits().listing_has_metadata {
            // Best effort: a left-over index matches nothing a new directory lists.
            let index = attr_index::index_key(&self.cfg.prefix, &key);
            if let Err(e) = self.store.delete(&index).await {
                warn!("{index}: deleting the attribute index of {key:?}: {e}");
            }
        }
        let mut t = self.table.lock();
        if let Some(c) = t.inodes.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.remove(name);
        }
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.unlinked = true;
            if i.lookups == 0 && i.open == 0 {
                t.inodes.remove(&ino);
            }
        }
        drop(t);
        drop(locked);
        self.touch_dir(parent);
        Ok(())
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.remove(parent, name, false).await
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.remove(parent, name, true).await
    }

    pub async fn open(&self, ino: u64, truncate: bool) -> FsResult<u64> {
        self.open_file(ino, truncate).await.map(|o| o.fh)
    }

    /// Opens a file, and tells whether the kernel may keep the pages it cached of it: only
    /// when they are of the committed version this open finds (the same ETag as at the
    /// last open, no write or truncation through this mount since, and no change by another
    /// client that a listing showed). Without it every open dropped the file's pages, and a
    /// file read again, or read at random after a sequential pass, went to the store.
    pub async fn open_file(&self, ino: u64, truncate: bool) -> FsResult<Opened> {
        let (file, keep_cache) = {
            // Not in the middle of a rename: one that replaces this file either saw it open
            // (and moved its content aside) or detached it before (and this open is stale).
            let _ns = self.namespace.read().await;
            let mut t = self.table.lock();
            let i = t.get_mut(ino)?;
            match i.attr.kind {
                Kind::Dir => return Err(FsError::new(libc::EISDIR, "is a directory")),
                Kind::Symlink => return Err(FsError::new(libc::ELOOP, "is a symlink")),
                Kind::File => {}
            }
            // Looked up before a rename or unlink took its name and not open then: its
            // content is gone from the store. ESTALE makes the kernel look the path up again
            // and open what is there now, instead of reading a successor's bytes as its own.
            if i.unlinked && i.moved_to.is_none() && i.open == 0 {
                return Err(FsError::new(
                    libc::ESTALE,
                    "the file was replaced or removed since it was looked up",
                ));
            }
            i.open += 1;
            let keep_cache = !truncate
                && !i.unlinked
                && i.moved_to.is_none()
                && i.etag.as_deref().is_some_and(|e| !e.is_empty())
                && i.cached_etag == i.etag;
            i.cached_etag = i.etag.clone();
            (i.file.clone(), keep_cache)
        };
        if truncate
            && let Some(f) = file
            && let Err(e) = self.truncate_file(ino, &f, 0).await
        {
            self.table.lock().get_mut(ino)?.open -= 1;
            return Err(e);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, (ino, None));
        Ok(Opened { fh, keep_cache })
    }

    /// The kernel's cached pages of `ino` are no longer known to be a committed version's:
    /// the next open drops them.
    fn forget_cached_pages(&self, ino: u64) {
        if let Ok(i) = self.table.lock().get_mut(ino) {
            i.cached_etag = None;
        }
    }

    fn file_of(&self, ino: u64) -> FsResult<(Arc<AsyncMutex<FileData>>, String, Metadata, bool)> {
        let t = self.table.lock();
        let i = t.get(ino)?;
        let f = i
            .file
            .clone()
            .ok_or_else(|| FsError::new(libc::EISDIR, "not a regular file"))?;
        let key = match &i.moved_to {
            Some(k) => k.clone(),
            None => self.file_key(&t.path(ino).unwrap_or_default()),
        };
        Ok((f, key, Self::metadata_of(i), i.unlinked))
    }

    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let _ns = self.namespace.read().await;
        let (f, key, meta, _) = self.file_of(ino)?;
        let ctx = self.ctx();
        let plan = f
            .lock()
            .await
            .plan_read(&ctx, &key, || meta, offset, size as u64)
            .await;
        let data = async { plan?.run(&ctx).await }.await.inspect_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            error!("{key}: read at {offset}: {e}");
        })?;
        self.stats
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Takes the next place in a file's write order; call it on the thread that received
    /// the request, before handing the write to another task.
    pub fn write_ticket(&self, ino: u64) -> WriteTicket {
        let gate = self.write_order.lock().entry(ino).or_default().clone();
        let n = gate.next.fetch_add(1, Ordering::AcqRel);
        WriteTicket { gate, n }
    }

    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let ticket = self.write_ticket(ino);
        self.write_in_order(ino, offset, data, ticket).await
    }

    /// A write applied in its ticket's turn.
    pub async fn write_in_order(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        ticket: WriteTicket,
    ) -> FsResult<u32> {
        ticket.wait().await;
        let result = self.write_now(ino, offset, data).await;
        drop(ticket);
        result
    }

    /// A write done at once on the calling thread, from the caller's buffer, where it is
    /// its ticket's turn and the write needs no waiting (it continues a streaming file
    /// without completing a part); `None` if it must go through [`Self::write_in_order`].
    /// Copying every FUSE write out of fuser's buffer first, for a task that might wait,
    /// was 7 % of the mount's CPU in a sequential write; seven writes in eight need not.
    pub fn try_write_now(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        ticket: &WriteTicket,
    ) -> Option<FsResult<u32>> {
        if !ticket.is_turn() || self.check_writable().is_err() {
            return None;
        }
        let _ns = self.namespace.try_read().ok()?;
        let f = {
            let t = self.table.lock();
            let i = t.get(ino).ok()?;
            if i.unlinked {
                return None;
            }
            i.file.clone()?
        };
        let mut fd = f.try_lock().ok()?;
        self.forget_cached_pages(ino);
        if !fd.try_write_now(offset, data) {
            return None;
        }
        let size = fd.size();
        drop(fd);
        Some(self.note_written(ino, size, data.len()))
    }

    async fn write_now(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.check_writable()?;
        self.forget_cached_pages(ino);
        let _ns = self.namespace.read().await;
        let (f, key, meta, unlinked) = self.file_of(ino)?;
        let mut fd = f.lock().await;
        // An unlinked file must never stream to its old key: it stages instead.
        fd.write(&self.ctx(), &key, || meta, offset, data, !unlinked)
            .await
            .inspect_err(|e| {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                error!("{key}: write at {offset}: {e}");
            })?;
        let size = fd.size();
        drop(fd);
        self.note_written(ino, size, data.len())
    }

    /// A write's effect on the inode: its size and times.
    fn note_written(&self, ino: u64, size: u64, len: usize) -> FsResult<u32> {
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        let now = SystemTime::now();
        i.attr.size = size;
        i.attr.mtime = now;
        i.attr.ctime = now;
        self.stats
            .bytes_written
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(len as u32)
    }

    async fn truncate_file(
        &self,
        ino: u64,
        f: &Arc<AsyncMutex<FileData>>,
        size: u64,
    ) -> FsResult<()> {
        self.check_writable()?;
        self.forget_cached_pages(ino);
        let _ns = self.namespace.read().await;
        let (_, key, meta, _) = self.file_of(ino)?;
        let mut fd = f.lock().await;
        fd.truncate(&self.ctx(), &key, || meta, size).await?;
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        let now = SystemTime::now();
        i.attr.size = size;
        i.attr.mtime = now;
        i.attr.ctime = now;
        Ok(())
    }

    /// Commits a file's content (flush, fsync, release). Unlinked files are never written.
    async fn commit(&self, ino: u64) -> FsResult<()> {
        let _ns = self.namespace.read().await;
        self.commit_locked(ino).await
    }

    /// [`Self::commit`] for a caller that holds the namespace lock.
    async fn commit_locked(&self, ino: u64) -> FsResult<()> {
        let (f, key, meta, unlinked) = self.file_of(ino)?;
        if unlinked {
            return Ok(());
        }
        let mut fd = f.lock().await;
        if !fd.is_dirty() {
            return Ok(());
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
        match fd.commit(&self.ctx(), &key, meta.clone()).await {
            Ok(Some(info)) => {
                self.changes.fetch_add(1, Ordering::AcqRel);
                self.stats.files_committed.fetch_add(1, Ordering::Relaxed);
                let stored = info.metadata.unwrap_or_default();
                let mut t = self.table.lock();
                if let Ok(i) = t.get_mut(ino) {
                    i.attr.size = fd.size();
                    i.etag = Some(info.etag.clone());
                    // Attributes stored with the data are current unless they changed since
                    // the upload began. Where storing them anew copies the whole object (S3),
                    // the times that the writes themselves moved on are left as the upload's
                    // start stored them: a copy of a large file that was just uploaded
                    // doubled the cost of writing it. Times set explicitly (touch, rsync,
                    // tar) mark the inode dirty and are stored.
                    let now_meta = Self::metadata_of(i);
                    let ignore_times =
                        self.store.limits().metadata_change_copies_data && !i.meta_dirty;
                    i.meta_dirty = !metadata_covers(&stored, &now_meta, ignore_times);
                    let parent = i.parent;
                    self.note_stored(&mut t, ino, parent, without_envelope(stored));
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                error!("{key}: committing the file failed: {e}");
                let mut t = self.table.lock();
                let parent = t.get_mut(ino).map(|i| {
                    i.attr.size = fd.size();
                    // What the store holds now (perhaps another client's version: a
                    // concurrent upload of the same key can win) is read afresh at the
                    // next listing, which comes at the next lookup.
                    i.etag = Some(String::new());
                    i.parent
                });
                if let Ok(p) = parent
                    && let Ok(dir) = t.get_mut(p)
                {
                    dir.listed_at = None;
                }
                Err(e)
            }
        }
    }

    pub async fn flush(&self, ino: u64) -> FsResult<()> {
        self.commit(ino).await
    }

    /// Records the process that opened a handle.
    pub fn set_handle_owner(&self, fh: u64, pid: u32) {
        if let Some(h) = self.handles.lock().get_mut(&fh) {
            h.1 = Some(pid);
        }
    }

    /// A flush (a close of one descriptor of the handle) by process `pid`. Only the process
    /// that opened the handle commits: a child that inherited the descriptor across fork
    /// closes it at exec, and committing then would cut a streaming write short every time
    /// the writer runs a command. The last close (release) always commits.
    pub async fn flush_from(&self, ino: u64, fh: u64, pid: u32) -> FsResult<()> {
        let owner = self.handles.lock().get(&fh).and_then(|h| h.1);
        match owner {
            Some(p) if p != pid => Ok(()),
            _ => self.commit(ino).await,
        }
    }

    /// A file's content and attributes durable, and every change the store acknowledged
    /// before it (renames are durable with the store's next commit otherwise).
    pub async fn fsync(&self, ino: u64) -> FsResult<()> {
        self.commit(ino).await?;
        self.flush_metadata(ino).await?;
        Ok(self.store.sync().await?)
    }

    /// A directory's attributes durable, and every entry change in it (and anywhere else)
    /// that the store acknowledged before.
    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        self.flush_metadata(ino).await?;
        Ok(self.store.sync().await?)
    }

    pub async fn release(&self, ino: u64, fh: u64) -> FsResult<()> {
        self.handles.lock().remove(&fh);
        let result = self.commit(ino).await;
        let pending = {
            let mut t = self.table.lock();
            let Ok(i) = t.get_mut(ino) else { return result };
            i.open = i.open.saturating_sub(1);
            if i.open > 0 {
                None
            } else {
                let p = i.pending_delete.take();
                if i.unlinked && i.lookups == 0 {
                    t.inodes.remove(&ino);
                }
                p
            }
        };
        if let Some(key) = pending {
            self.store.delete(&key).await?;
        }
        result
    }

    pub async fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        self.ensure_attr(ino).await?;
        if s.perm.is_some()
            || s.uid.is_some()
            || s.gid.is_some()
            || s.size.is_some()
            || s.mtime.is_some()
        {
            self.check_writable()?;
        }
        if let Some(size) = s.size {
            let (f, _, _, _) = self.file_of(ino)?;
            self.truncate_file(ino, &f, size).await?;
            // truncate(2) with no open handle must be durable like a close.
            if self.table.lock().get(ino)?.open == 0 {
                self.commit(ino).await?;
            }
        }
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        let before = i.attr.clone();
        if let Some(p) = s.perm {
            i.attr.perm = p & 0o7777;
        }
        if let Some(u) = s.uid {
            i.attr.uid = u;
        }
        if let Some(g) = s.gid {
            i.attr.gid = g;
        }
        if let Some(m) = s.mtime {
            i.attr.mtime = m;
        }
        if i.attr != before || s.ctime.is_some() {
            i.attr.ctime = s.ctime.unwrap_or_else(SystemTime::now);
            i.meta_dirty = true;
        }
        Ok(i.attr.clone())
    }

    /// Writes an inode's changed attributes to the store (a metadata-only copy for files, a
    /// new marker for directories). Files with uncommitted content carry them at commit.
    async fn flush_metadata(&self, ino: u64) -> FsResult<()> {
        let _ns = self.namespace.read().await;
        self.flush_metadata_locked(ino).await
    }

    async fn flush_metadata_locked(&self, ino: u64) -> FsResult<()> {
        let (kind, key, meta, file) = {
            let mut t = self.table.lock();
            let path = t.path(ino)?;
            let i = t.get_mut(ino)?;
            if !i.meta_dirty || i.unlinked || ino == ROOT {
                return Ok(());
            }
            // The flag is cleared only once the store has the attributes (below): a flush
            // cut short (an aborted flusher at unmount) must leave them to the next one.
            let key = match i.attr.kind {
                Kind::Dir => self.dir_prefix(&path),
                _ => self.file_key(&path),
            };
            (i.attr.kind, key, Self::metadata_of(i), i.file.clone())
        };
        let written = meta.clone();
        let result = match kind {
            Kind::Dir => self.put_dir_marker(&key, meta, false).await.map(|_| ()),
            _ => {
                // The file stays locked until the copy is stored: the copy takes the
                // envelope of the version it read, and a commit of new content between that
                // read and the copy made an object whose envelope belonged to the old
                // content (unreadable, found by the stress test).
                let mut fd = match &file {
                    Some(f) => Some(f.lock().await),
                    None => None,
                };
                if self.table.lock().get(ino).map_or(true, |i| i.unlinked) {
                    // Removed while this waited for the file (see `remove`).
                    return Ok(());
                }
                if fd.as_ref().is_some_and(|fd| fd.is_dirty() || !fd.exists) {
                    // The commit will store the attributes with the data.
                    if let Ok(i) = self.table.lock().get_mut(ino) {
                        i.meta_dirty = true;
                    }
                    return Ok(());
                }
                if let Ok(i) = self.table.lock().get_mut(ino) {
                    i.meta_in_flight = true;
                }
                let copied = self.copy_with_metadata(&key, &key, meta).await.map(|_| ());
                if copied.is_ok()
                    && let Some(fd) = fd.as_mut()
                {
                    // The copy is a new version of the same content: the one open
                    // readers were pinned to may be pruned now.
                    fd.reset_committed();
                }
                drop(fd);
                let mut t = self.table.lock();
                if let Ok(i) = t.get_mut(ino) {
                    i.meta_in_flight = false;
                    let parent = i.parent;
                    if copied.is_ok() {
                        self.note_stored(&mut t, ino, parent, written.clone());
                    }
                }
                copied
            }
        };
        match &result {
            Ok(()) => {
                // Clean only if nothing changed while the attributes were being written.
                if let Ok(i) = self.table.lock().get_mut(ino)
                    && Self::metadata_of(i) == written
                {
                    i.meta_dirty = false;
                }
            }
            Err(e) => error!("{key}: storing attributes failed: {e}"),
        }
        result.map_err(FsError::from)
    }

    async fn copy_with_metadata(
        &self,
        src: &str,
        dst: &str,
        meta: Metadata,
    ) -> Result<crate::store::ObjectInfo, StoreError> {
        let opts = self.copy_keeping_envelope(src, meta).await?;
        self.store
            .copy(src, dst, &opts)
            .await
            .map_err(changed_since_read)
    }

    /// The options of a copy of `src` that replaces its metadata with `meta`, keeping its
    /// envelope (a metadata replace must keep it). The copy fails if `src` changes after
    /// the envelope is read (see [`changed_since_read`]).
    async fn copy_keeping_envelope(
        &self,
        src: &str,
        meta: Metadata,
    ) -> Result<CopyOptions, StoreError> {
        let current = self.store.head(src, &self.get_opts()).await?;
        let mut full = meta;
        if let Some(env) = current
            .metadata
            .as_ref()
            .and_then(|m| m.get(crate::crypt::envelope::METADATA_KEY))
        {
            full.insert(crate::crypt::envelope::METADATA_KEY.into(), env.clone());
        }
        Ok(CopyOptions {
            metadata: Some(full),
            source_sse: self.cfg.sse.clone(),
            sse: self.cfg.sse.clone(),
            source_version_id: None,
            // Only the content whose envelope this is: a copy of whatever is newest by
            // then could pair that envelope with other content. Changed since (by another
            // client), the copy fails and the attributes stay to be stored again.
            source_if_match: (!current.etag.is_empty()).then_some(current.etag),
            defer_durability: false,
        })
    }

    /// Writes every pending attribute change (periodically, and at unmount).
    pub async fn flush_all_metadata(&self) -> FsResult<()> {
        let dirty: Vec<u64> = self
            .table
            .lock()
            .inodes
            .iter()
            .filter(|(_, i)| i.meta_dirty)
            .map(|(ino, _)| *ino)
            .collect();
        let mut first_err = None;
        for ino in dirty {
            if let Err(e) = self.flush_metadata(ino).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Commits every file with uncommitted content and every attribute change (unmount).
    pub async fn flush_everything(&self) -> FsResult<()> {
        let files: Vec<u64> = self
            .table
            .lock()
            .inodes
            .iter()
            .filter(|(_, i)| i.file.is_some())
            .map(|(ino, _)| *ino)
            .collect();
        let mut first_err = None;
        for ino in files {
            if let Err(e) = self.commit(ino).await {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.flush_all_metadata().await {
            first_err.get_or_insert(e);
        }
        if first_err.is_none() {
            // Only a cache: not tried against a store that just failed (it would only make
            // the unmount wait for its retries).
            self.write_attr_indexes(Duration::ZERO).await;
        }
        if let Err(e) = self.store.flush().await {
            first_err.get_or_insert(e.into());
        }
        first_err.map_or(Ok(()), Err)
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        check_name(name)?;
        check_name(newname)?;
        self.check_not_reserved(newparent, newname)?;
        self.ensure_loaded(parent).await?;
        self.ensure_loaded(newparent).await?;
        let _ns = self.namespace.write().await;
        self.changes.fetch_add(1, Ordering::AcqRel);
        let (ino, target) = {
            let t = self.table.lock();
            let ino = t
                .child(parent, name)?
                .ok_or_else(|| FsError::new(libc::ENOENT, "no such file"))?;
            (ino, t.child(newparent, newname)?)
        };
        if target == Some(ino) {
            return Ok(());
        }
        let src_kind = self.table.lock().get(ino)?.attr.kind;
        if src_kind == Kind::Dir && self.table.lock().is_within(newparent, ino) {
            return Err(FsError::new(
                libc::EINVAL,
                "cannot move a directory into itself",
            ));
        }
        if let Some(t_ino) = target {
            if noreplace {
                return Err(FsError::new(libc::EEXIST, "target exists"));
            }
            let t_kind = self.table.lock().get(t_ino)?.attr.kind;
            match (src_kind == Kind::Dir, t_kind == Kind::Dir) {
                (true, false) => {
                    return Err(FsError::new(libc::ENOTDIR, "target is not a directory"));
                }
                (false, true) => return Err(FsError::new(libc::EISDIR, "target is a directory")),
                (true, true) => {
                    self.ensure_loaded(t_ino).await?;
                    if self
                        .table
                        .lock()
                        .get(t_ino)?
                        .children
                        .as_ref()
                        .is_some_and(|c| !c.is_empty())
                    {
                        return Err(FsError::new(libc::ENOTEMPTY, "target directory not empty"));
                    }
                }
                (false, false) => {}
            }
        }
        let (old_path, new_path) = {
            let t = self.table.lock();
            let np = t.path(newparent)?;
            let new_path = if np.is_empty() {
                newname.to_string()
            } else {
                format!("{np}/{newname}")
            };
            (t.path(ino)?, new_path)
        };
        if src_kind == Kind::Dir {
            self.check_key_len(&self.dir_prefix(&new_path))?;
            // The (empty) target's marker goes first: the moved directory's marker takes
            // its key.
            if target.is_some() {
                self.store.delete(&self.dir_prefix(&new_path)).await?;
            }
            self.rename_dir_objects(ino, &old_path, &new_path).await?;
            if let Some(t_ino) = target {
                self.detach(newparent, newname, t_ino);
            }
            // The new marker was copied with the rest; attributes go with it.
        } else {
            let old_key = self.file_key(&old_path);
            let new_key = self.file_key(&new_path);
            self.check_key_len(&new_key)?;
            self.commit_locked(ino).await?;
            if let Some(t_ino) = target {
                self.move_aside_if_open(t_ino, &new_key).await?;
            }
            let (meta, file) = {
                let t = self.table.lock();
                let i = t.get(ino)?;
                (Self::metadata_of(i), i.file.clone())
            };
            let exists = match &file {
                Some(f) => f.lock().await.exists,
                None => true,
            };
            if exists {
                let stored = meta.clone();
                let mut opts = self.copy_keeping_envelope(&old_key, meta).await?;
                // Atomic now, durable with the store's next commit or at an fsync (as on
                // ext4): rsync renames every file it writes.
                opts.defer_durability = true;
                let copied = self
                    .store
                    .rename(&old_key, &new_key, &opts)
                    .await
                    .map_err(changed_since_read)?;
                if let Some(f) = &file {
                    f.lock().await.reset_committed();
                }
                // The copy is what listings show from now on: not a change by another client.
                let mut t = self.table.lock();
                if let Ok(i) = t.get_mut(ino) {
                    i.etag = Some(copied.etag);
                }
                self.note_stored(&mut t, ino, newparent, stored);
            }
            if let Some(t_ino) = target {
                self.detach(newparent, newname, t_ino);
            }
            if let Ok(i) = self.table.lock().get_mut(ino) {
                i.meta_dirty = false;
            }
        }
        let mut t = self.table.lock();
        if let Some(c) = t.inodes.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.remove(name);
        }
        if let Some(c) = t
            .inodes
            .get_mut(&newparent)
            .and_then(|p| p.children.as_mut())
        {
            c.insert(newname.to_string(), ino);
        }
        let i = t.get_mut(ino)?;
        i.parent = newparent;
        i.name = newname.to_string();
        i.attr.ctime = SystemTime::now();
        drop(t);
        self.touch_dir(parent);
        self.touch_dir(newparent);
        Ok(())
    }

    /// Before a file that is open is replaced by a rename: its content moves aside, so that
    /// its readers keep reading it and not the file that takes its name.
    async fn move_aside_if_open(&self, ino: u64, key: &str) -> FsResult<()> {
        let Some(f) = ({
            let t = self.table.lock();
            let i = t.get(ino)?;
            (i.open > 0 && i.moved_to.is_none())
                .then(|| i.file.clone())
                .flatten()
        }) else {
            return Ok(());
        };
        self.commit_locked(ino).await?;
        let mut fd = f.lock().await;
        if fd.exists {
            self.move_aside(ino, key, &mut fd).await?;
        }
        Ok(())
    }

    /// Copies an open file's object under [`OPEN_DELETED_DIR`] and points the inode at it
    /// (the caller then removes or overwrites `key`); the copy is deleted at the last close.
    async fn move_aside(&self, ino: u64, key: &str, fd: &mut FileData) -> FsResult<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let aside = format!("{}{OPEN_DELETED_DIR}/{nanos}-{ino}", self.cfg.prefix);
        let meta = Self::metadata_of(self.table.lock().get(ino)?);
        self.copy_with_metadata(key, &aside, meta)
            .await
            .inspect_err(|e| error!("{key}: moving the open file aside failed: {e}"))?;
        fd.reset_committed();
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        i.moved_to = Some(aside.clone());
        i.pending_delete = Some(aside);
        Ok(())
    }

    /// Deletes what crashed mounts left under [`OPEN_DELETED_DIR`] (older than a day: a
    /// younger one may be open in another mount). Returns how many went.
    pub async fn clean_open_deleted(&self) -> FsResult<usize> {
        let prefix = format!("{}{OPEN_DELETED_DIR}/", self.cfg.prefix);
        let page = list_all(
            self.store.as_ref(),
            ListRequest {
                prefix: prefix.clone(),
                ..Default::default()
            },
        )
        .await?;
        let mut n = 0;
        for o in page.objects {
            let age = SystemTime::now()
                .duration_since(o.mtime)
                .unwrap_or_default();
            if age > OPEN_DELETED_MAX_AGE {
                self.store.delete(&o.key).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes a replaced inode out of the namespace (its object was overwritten or removed).
    fn detach(&self, parent: u64, name: &str, ino: u64) {
        let mut t = self.table.lock();
        if let Some(c) = t.inodes.get_mut(&parent).and_then(|p| p.children.as_mut()) {
            c.remove(name);
        }
        if let Some(i) = t.inodes.get_mut(&ino) {
            i.unlinked = true;
            if i.moved_to.is_none() {
                i.pending_delete = None;
            }
            if i.lookups == 0 && i.open == 0 {
                t.inodes.remove(&ino);
            }
        }
    }

    /// Moves every object below a directory to the new path: a server-side copy then a
    /// delete per object. Not atomic: a crash part-way leaves both trees partly there, and
    /// nothing is lost.
    async fn rename_dir_objects(&self, ino: u64, old_path: &str, new_path: &str) -> FsResult<()> {
        // Content still being written below the directory goes to the old keys first.
        let files: Vec<u64> = {
            let t = self.table.lock();
            t.inodes
                .iter()
                .filter(|(i, n)| n.file.is_some() && t.is_within(**i, ino))
                .map(|(i, _)| *i)
                .collect()
        };
        for f in files {
            self.commit_locked(f).await?;
            self.flush_metadata_locked(f).await?;
        }
        self.flush_metadata_locked(ino).await?;
        let old_prefix = self.dir_prefix(old_path);
        let new_prefix = self.dir_prefix(new_path);
        let all = list_all(
            self.store.as_ref(),
            ListRequest {
                prefix: old_prefix.clone(),
                ..Default::default()
            },
        )
        .await?;
        let mut keys: Vec<String> = all.objects.into_iter().map(|o| o.key).collect();
        if !keys.contains(&old_prefix) {
            // An implicit directory: give the new one a marker with its attributes.
            let meta = Self::metadata_of(self.table.lock().get(ino)?);
            self.put_dir_marker(&new_prefix, meta, false).await?;
        }
        keys.sort();
        for key in &keys {
            let dst = format!("{new_prefix}{}", &key[old_prefix.len()..]);
            let opts = CopyOptions {
                metadata: None,
                source_sse: self.cfg.sse.clone(),
                sse: self.cfg.sse.clone(),
                source_version_id: None,
                source_if_match: None,
                defer_durability: false,
            };
            self.store.copy(key, &dst, &opts).await?;
        }
        for key in keys.iter().rev() {
            self.store.delete(key).await?;
        }
        // Open files below now read from their new keys.
        let files: Vec<Arc<AsyncMutex<FileData>>> = {
            let t = self.table.lock();
            t.inodes
                .iter()
                .filter(|(i, n)| n.file.is_some() && t.is_within(**i, ino))
                .filter_map(|(_, n)| n.file.clone())
                .collect()
        };
        for f in files {
            f.lock().await.reset_committed();
        }
        Ok(())
    }

    // ---- extended attributes ------------------------------------------------------------

    pub async fn getxattr(&self, ino: u64, name: &str) -> FsResult<Vec<u8>> {
        // Answered before anything that could wait, so on the FUSE thread that read the
        // request: `ls -l` asks the first entries for security.selinux and
        // system.posix_acl_access, and the kernel asks for security.capability before every
        // write (it takes "unsupported" as "none").
        if !name.starts_with(XATTR_NAMESPACE) {
            self.stats
                .xattrs_unsupported
                .fetch_add(1, Ordering::Relaxed);
            return Err(unsupported_xattr());
        }
        self.ensure_attr(ino).await?;
        let t = self.table.lock();
        t.get(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| FsError::new(libc::ENODATA, "no such attribute"))
    }

    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<String>> {
        self.ensure_attr(ino).await?;
        Ok(self.table.lock().get(ino)?.xattrs.keys().cloned().collect())
    }

    pub async fn setxattr(&self, ino: u64, name: &str, value: &[u8], flags: i32) -> FsResult<()> {
        self.check_writable()?;
        if !name.starts_with(XATTR_NAMESPACE) {
            return Err(unsupported_xattr());
        }
        if value.len() > MAX_XATTR_VALUE || name.len() > 255 {
            return Err(FsError::new(libc::E2BIG, "attribute too large"));
        }
        self.ensure_attr(ino).await?;
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        let exists = i.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::new(libc::EEXIST, "attribute exists"));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::new(libc::ENODATA, "no such attribute"));
        }
        let mut trial = i.xattrs.clone();
        trial.insert(name.to_string(), value.to_vec());
        let mut m = Metadata::new();
        i.attr.to_metadata(&mut m);
        attr::xattrs_to_metadata(&trial, &mut m);
        // Room for the envelope too.
        if crate::store::metadata_size(&m) + 200 > self.store.limits().max_metadata_bytes {
            return Err(FsError::new(
                libc::ENOSPC,
                "no room left for extended attributes",
            ));
        }
        i.xattrs = trial;
        i.attr.ctime = SystemTime::now();
        i.meta_dirty = true;
        Ok(())
    }

    pub async fn removexattr(&self, ino: u64, name: &str) -> FsResult<()> {
        self.check_writable()?;
        if !name.starts_with(XATTR_NAMESPACE) {
            return Err(unsupported_xattr());
        }
        self.ensure_attr(ino).await?;
        let mut t = self.table.lock();
        let i = t.get_mut(ino)?;
        if i.xattrs.remove(name).is_none() {
            return Err(FsError::new(libc::ENODATA, "no such attribute"));
        }
        i.attr.ctime = SystemTime::now();
        i.meta_dirty = true;
        Ok(())
    }

    /// The mount's counters, one line.
    /// Every counter of the mount, by name: the vfs, the chunk cache, memory, and the
    /// store's requests (for the log, `coffer stats` and Prometheus).
    pub fn stats_pairs(&self) -> Vec<(String, u64)> {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v: Vec<(String, u64)> = vec![
            ("bytes_read".into(), c(&self.stats.bytes_read)),
            ("bytes_written".into(), c(&self.stats.bytes_written)),
            ("files_committed".into(), c(&self.stats.files_committed)),
            ("errors".into(), c(&self.stats.errors)),
            ("lookups".into(), c(&self.stats.lookups)),
            (
                "xattrs_unsupported".into(),
                c(&self.stats.xattrs_unsupported),
            ),
            ("cache_hits".into(), c(&self.cache.hits)),
            ("cache_misses".into(), c(&self.cache.misses)),
            ("cache_bytes".into(), self.cache.bytes() as u64),
            (
                "write_buffer_bytes".into(),
                self.budget.as_ref().map_or(0, |b| b.in_use() as u64),
            ),
            ("resident_bytes".into(), resident_bytes()),
        ];
        v.extend(
            self.store
                .request_stats()
                .into_iter()
                .map(|(k, n)| (k.to_string(), n)),
        );
        v
    }

    pub fn stats_line(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "stats: read {} bytes, wrote {} bytes, committed {} files, {} errors; chunk cache {} hits, {} misses, {} bytes held; lookups {}; xattrs_unsupported {}",
            c(&self.stats.bytes_read),
            c(&self.stats.bytes_written),
            c(&self.stats.files_committed),
            c(&self.stats.errors),
            c(&self.cache.hits),
            c(&self.cache.misses),
            self.cache.bytes(),
            c(&self.stats.lookups),
            c(&self.stats.xattrs_unsupported),
        ) + &self
            .store
            .request_stats()
            .iter()
            .map(|(k, v)| format!("; {k} {v}"))
            .collect::<String>()
    }

    /// The path of an inode, for log messages.
    pub fn describe(&self, ino: u64) -> String {
        self.table
            .lock()
            .path(ino)
            .map(|p| format!("/{p}"))
            .unwrap_or_else(|_| format!("inode {ino}"))
    }
}

/// Resident memory of this process, from /proc (0 where unknown).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// A copy that keeps the envelope it read found its source rewritten since (by another
/// client): EIO, saying so, rather than the EEXIST a failed precondition means elsewhere.
fn changed_since_read(e: StoreError) -> StoreError {
    match e {
        StoreError::PreconditionFailed { key, detail } => StoreError::Io {
            key,
            context: "rewritten by another client while its attributes were being stored".into(),
            source: std::io::Error::other(detail),
        },
        e => e,
    }
}
