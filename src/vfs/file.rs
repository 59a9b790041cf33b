//! The content of one regular file while the mount has it: clean (the committed object),
//! streaming (a sequential write of new content, uploaded as it arrives) or staged (changed
//! chunks kept sealed in a local staging file on top of the committed object).
//!
//! A sequential writer of a new or truncated file streams; anything else (a seek, a rewrite,
//! an append to an existing file, a read of a file being streamed) first commits what was
//! streamed, then stages. A commit of staged changes rewrites the object with a fresh data
//! key, streaming it chunk by chunk, so memory stays bounded for any file size.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::buffers::READ_BUFFERS;
use crate::cache::staging::{StagingFile, StagingKey};
use crate::cache::upload::StreamingWriter;
use crate::cache::{ChunkCache, CommittedObject};
use crate::crypt::Crypt;
use crate::error::{FsError, FsResult};
use crate::store::{GetOptions, Metadata, ObjectInfo, ObjectStore, PutOptions, Sse};

/// Plaintext of the committed object fetched at a time while a staged file is rewritten:
/// four read-ahead segments, so their gets run in parallel.
const REWRITE_WINDOW_BYTES: u64 = 8 << 20;

/// What a file operation needs from the mount.
pub struct FileCtx<'a> {
    pub store: &'a Arc<dyn ObjectStore>,
    pub crypt: &'a Crypt,
    pub cache: &'a Arc<ChunkCache>,
    pub staging_dir: &'a PathBuf,
    pub staging_key: &'a StagingKey,
    pub sse: &'a Sse,
    pub budget: &'a Option<Arc<crate::cache::memory::MemoryBudget>>,
}

enum Content {
    /// The content is the committed object.
    Clean,
    // Boxed: the writer is large next to the other variants.
    Streaming(Box<StreamingWriter>),
    Staged(Staged),
}

struct Staged {
    /// Bytes of the committed object that are still the file's (a truncate cuts them).
    base_valid: u64,
    size: u64,
    staging: Option<StagingFile>,
}

/// One sequential reader of a file (fio's parallel readers, or `cp` and a checksummer at
/// once, each keep their own): a read-ahead window that doubles while it reads on.
struct ReadStream {
    /// Where its next sequential read would start.
    next: u64,
    /// Bytes read sequentially so far.
    run: u64,
    window: u64,
    /// Prefetched (or being prefetched) up to here.
    fetched_to: u64,
    /// Prefetches in flight, oldest first.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// For replacing the least recently used stream.
    last_used: u64,
}

const READ_AHEAD_START: u64 = 1 << 20;
/// Most read-ahead per sequential reader, and at most this share of the chunk cache (the
/// read-ahead lands there, and a window larger than its share would be evicted before it
/// is read when several readers stream at once).
const READ_AHEAD_MAX: u64 = 48 << 20;
const READ_AHEAD_CACHE_SHARE: u64 = 4;
/// A stream not starting at 0 gets read-ahead once it has read this much in order, so random
/// reads of a few hundred KiB (which the kernel splits into several requests) fetch nothing
/// they do not need.
const READ_AHEAD_AFTER: u64 = 512 << 10;
/// Sequential streams tracked per file.
const MAX_STREAMS: usize = 8;
/// Prefetches in flight per stream.
const PREFETCHES_PER_STREAM: usize = 6;
/// A stream's read-ahead asks for more once this share (1 / REFILL_AT) of its window has
/// been read, so that gets stay in flight rather than coming in waves.
const REFILL_AT: u64 = 4;

/// What is left of a read once the file is released.
pub enum ReadPlan {
    Ready(Vec<u8>),
    /// Bytes `range` of the committed object.
    Committed(Arc<CommittedObject>, Range<u64>),
}

impl ReadPlan {
    pub async fn run(self, ctx: &FileCtx<'_>) -> FsResult<Vec<u8>> {
        match self {
            ReadPlan::Ready(data) => Ok(data),
            ReadPlan::Committed(obj, range) => obj.read(ctx.store.as_ref(), ctx.cache, range).await,
        }
    }
}

pub struct FileData {
    content: Content,
    streams: Vec<ReadStream>,
    reads: u64,
    /// The committed object, opened lazily for reads.
    committed: Option<Arc<CommittedObject>>,
    /// Size of the committed object's plaintext (0 if none).
    committed_size: u64,
    /// Whether the committed object exists in the store.
    pub exists: bool,
}

impl FileData {
    /// A file that exists in the store with `size` bytes.
    pub fn existing(size: u64) -> FileData {
        FileData {
            content: Content::Clean,
            streams: Vec::new(),
            reads: 0,
            committed: None,
            committed_size: size,
            exists: true,
        }
    }

    /// A new, empty file not yet in the store.
    pub fn new_empty() -> FileData {
        FileData {
            content: Content::Staged(Staged {
                base_valid: 0,
                size: 0,
                staging: None,
            }),
            streams: Vec::new(),
            reads: 0,
            committed: None,
            committed_size: 0,
            exists: false,
        }
    }

    pub fn is_dirty(&self) -> bool {
        !matches!(self.content, Content::Clean)
    }

    pub fn size(&self) -> u64 {
        match &self.content {
            Content::Clean => self.committed_size,
            Content::Streaming(w) => w.written(),
            Content::Staged(s) => s.size,
        }
    }

    /// Forgets the committed object (after it was changed behind this state, e.g. renamed).
    pub fn reset_committed(&mut self) {
        self.committed = None;
    }

    async fn committed(&mut self, ctx: &FileCtx<'_>, key: &str) -> FsResult<Arc<CommittedObject>> {
        if let Some(c) = &self.committed {
            return Ok(c.clone());
        }
        let get = GetOptions {
            sse: ctx.sse.clone(),
            version_id: None,
            if_match: None,
        };
        let hint = self.exists.then_some(self.committed_size);
        let (obj, _) =
            CommittedObject::open(ctx.store.as_ref(), ctx.crypt, ctx.cache, key, get, hint).await?;
        let obj = Arc::new(obj);
        self.committed = Some(obj.clone());
        Ok(obj)
    }

    /// Starts a read: what staged content and streaming writes need is done here (with the
    /// file held); a read of the committed object is returned as a plan to run after the
    /// file is released, so parallel readers of one file do not queue behind each other.
    pub async fn plan_read(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        meta: impl FnOnce() -> Metadata,
        offset: u64,
        len: u64,
    ) -> FsResult<ReadPlan> {
        if matches!(self.content, Content::Streaming(_)) {
            // Read-your-writes: make what was streamed readable first.
            self.commit(ctx, key, meta()).await?;
        }
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(ReadPlan::Ready(Vec::new()));
        }
        match &self.content {
            Content::Clean => {
                let obj = self.committed(ctx, key).await?;
                self.read_ahead(ctx, &obj, offset, end);
                Ok(ReadPlan::Committed(obj, offset..end))
            }
            Content::Staged(_) => {
                let chunk = ctx.crypt.geometry().chunk;
                let mut out = match (end - offset) as usize {
                    n if n <= 1 << 20 => READ_BUFFERS.take(),
                    n => Vec::with_capacity(n),
                };
                let chunks = offset / chunk..end.div_ceil(chunk);
                let base = self.base_chunks(ctx, key, chunks.clone()).await?;
                for (i, b) in chunks.zip(base) {
                    let data = self.chunk_content(ctx, key, i, b).await?;
                    let base = i * chunk;
                    let from = offset.saturating_sub(base) as usize;
                    let to = (end - base).min(chunk) as usize;
                    out.extend_from_slice(&data[from..to]);
                }
                Ok(ReadPlan::Ready(out))
            }
            Content::Streaming(_) => unreachable!("committed above"),
        }
    }

    /// After a read of `offset..end`: finds the sequential stream it continues (or starts
    /// one), and keeps that stream's window fetched ahead into the chunk cache in the
    /// background, refilling when less than half of it is left ahead of the reader.
    fn read_ahead(&mut self, ctx: &FileCtx<'_>, obj: &Arc<CommittedObject>, offset: u64, end: u64) {
        self.reads += 1;
        let now = self.reads;
        // Requests of one reader may arrive a little out of order (the kernel has several
        // in flight): near the stream's position counts as continuing it.
        let near = |s: &ReadStream| offset.abs_diff(s.next) <= READ_AHEAD_START;
        let s = match self.streams.iter().position(near) {
            Some(i) => {
                let s = &mut self.streams[i];
                s.run += end - offset;
                s.next = s.next.max(end);
                s
            }
            None => {
                let fresh = ReadStream {
                    next: end,
                    run: if offset == 0 {
                        READ_AHEAD_AFTER
                    } else {
                        end - offset
                    },
                    window: 0,
                    fetched_to: end,
                    tasks: Vec::new(),
                    last_used: now,
                };
                if self.streams.len() < MAX_STREAMS {
                    self.streams.push(fresh);
                    self.streams.last_mut().expect("just pushed")
                } else {
                    let lru = (0..self.streams.len())
                        .min_by_key(|&i| self.streams[i].last_used)
                        .expect("streams is full");
                    self.streams[lru] = fresh;
                    &mut self.streams[lru]
                }
            }
        };
        s.last_used = now;
        if s.run < READ_AHEAD_AFTER {
            return;
        }
        s.tasks.retain(|t| !t.is_finished());
        let ahead = s.fetched_to.saturating_sub(end);
        if ahead >= s.window - s.window / REFILL_AT && s.window > 0
            || s.tasks.len() >= PREFETCHES_PER_STREAM
        {
            return;
        }
        let most = READ_AHEAD_MAX.min(ctx.cache.capacity() as u64 / READ_AHEAD_CACHE_SHARE);
        s.window = (s.window * 2).min(most).max(READ_AHEAD_START);
        let from = s.fetched_to.max(end);
        let to = (end + s.window).min(obj.plain_size);
        if from >= to {
            return;
        }
        let g = obj.cipher.geometry();
        let chunks = g.chunks_of(from..to, obj.plain_size);
        // Whole segments of the stored object (see CommittedObject::prefetch).
        let chunks = chunks.start..obj.aligned_end(chunks);
        s.fetched_to = (chunks.end * g.chunk).min(obj.plain_size).max(to);
        // The window is what was asked for: the next refill then starts when a quarter of
        // it has been read, in time for the get of the segment after it (whose first bytes
        // complete this window's last chunk).
        s.window = s.window.max(s.fetched_to - from);
        let (obj, store, cache) = (obj.clone(), ctx.store.clone(), ctx.cache.clone());
        let budget = ctx.budget.clone();
        s.tasks.push(tokio::spawn(async move {
            obj.prefetch(store.as_ref(), &cache, chunks, budget.as_deref())
                .await;
        }));
    }

    /// The current plaintext of chunk `i` of a staged file (zeros past the base's valid
    /// bytes), as long as the file's size makes it.
    /// `base` is the committed object's chunk `i` if [`Self::base_chunks`] fetched it.
    async fn chunk_content(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        i: u64,
        base: Option<Bytes>,
    ) -> FsResult<Vec<u8>> {
        let chunk = ctx.crypt.geometry().chunk;
        let Content::Staged(s) = &self.content else {
            unreachable!("chunk_content on a staged file only")
        };
        let want = s.size.saturating_sub(i * chunk).min(chunk) as usize;
        let mut data = match &s.staging {
            Some(st) if st.contains(i) => st.read_chunk(ctx.staging_key, i)?,
            _ => {
                let base_valid = s.base_valid;
                let start = i * chunk;
                if start < base_valid && self.exists {
                    let mut d = match base {
                        Some(b) => b.to_vec(),
                        None => {
                            let obj = self.committed(ctx, key).await?;
                            obj.read(ctx.store.as_ref(), ctx.cache, start..start + chunk)
                                .await?
                        }
                    };
                    d.truncate((base_valid - start) as usize);
                    d
                } else {
                    Vec::new()
                }
            }
        };
        data.resize(want, 0);
        Ok(data)
    }

    /// The committed object's plaintext of those of `chunks` that a staged file still reads
    /// from it (not staged, below the base's valid bytes), in one read that fetches whole
    /// segments in parallel: a get per 64 KiB chunk made a read of a changed file, and the
    /// rewrite of a large file at commit, wait on thousands of small gets. `None` where a
    /// chunk needs nothing from the object.
    async fn base_chunks(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        chunks: Range<u64>,
    ) -> FsResult<Vec<Option<Bytes>>> {
        let chunk = ctx.crypt.geometry().chunk;
        let Content::Staged(s) = &self.content else {
            unreachable!("base_chunks on a staged file only")
        };
        let mut out = vec![None; (chunks.end - chunks.start) as usize];
        let needed: Vec<u64> = chunks
            .clone()
            .filter(|&i| {
                self.exists
                    && i * chunk < s.base_valid
                    && !s.staging.as_ref().is_some_and(|st| st.contains(i))
            })
            .collect();
        let (Some(&first), Some(&last)) = (needed.first(), needed.last()) else {
            return Ok(out);
        };
        let obj = self.committed(ctx, key).await?;
        let data = obj
            .read_chunks(ctx.store.as_ref(), ctx.cache, first..last + 1)
            .await?;
        for (i, d) in (first..).zip(data) {
            if needed.binary_search(&i).is_ok() {
                out[(i - chunks.start) as usize] = Some(d);
            }
        }
        Ok(out)
    }

    fn staged_mut(&mut self) -> &mut Staged {
        match &mut self.content {
            Content::Staged(s) => s,
            _ => unreachable!("staged_mut on a staged file only"),
        }
    }

    /// Turns a clean file into a staged one over its committed object.
    fn stage(&mut self) {
        if matches!(self.content, Content::Clean) {
            self.content = Content::Staged(Staged {
                base_valid: self.committed_size,
                size: self.committed_size,
                staging: None,
            });
        }
    }

    /// [`Self::write`] of a write that continues a streaming file, when it needs no waiting
    /// (see [`StreamingWriter::try_append_now`]); false, having changed nothing, otherwise.
    pub fn try_write_now(&mut self, offset: u64, data: &[u8]) -> bool {
        match &mut self.content {
            Content::Streaming(w) if w.written() == offset => w.try_append_now(data),
            _ => false,
        }
    }

    pub async fn write(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        meta: impl FnOnce() -> Metadata,
        offset: u64,
        data: &[u8],
        allow_stream: bool,
    ) -> FsResult<()> {
        // A new or emptied file written from the start streams. That includes an empty
        // file already committed: cp, dd and fio create the file, close or flush it, and
        // only then write, and staging 1 GiB to rewrite it at close ran at a fifth of the
        // speed.
        let empty = match &self.content {
            Content::Staged(s) => {
                s.size == 0
                    && s.staging
                        .as_ref()
                        .is_none_or(|st| st.indices().next().is_none())
            }
            Content::Clean => self.committed_size == 0,
            Content::Streaming(_) => false,
        };
        if empty && allow_stream && offset == 0 {
            let (cipher, mut metadata) = ctx.crypt.new_object().await?;
            metadata.extend(meta());
            let opts = PutOptions {
                metadata,
                sse: ctx.sse.clone(),
                checksum: None,
                defer_durability: false,
            };
            let w = StreamingWriter::new(ctx.store.clone(), key, opts, cipher)
                .with_budget(ctx.budget.clone());
            self.content = Content::Streaming(Box::new(w));
            if let Content::Streaming(w) = &mut self.content {
                return w.append(data).await.map_err(FsError::from);
            }
        }
        if let Content::Streaming(w) = &mut self.content {
            if w.written() == offset {
                return w.append(data).await.map_err(FsError::from);
            }
            // Not sequential: commit what was streamed, then stage on top of it. The
            // metadata is only needed by the commit, never by the staged write.
            tracing::info!(
                "{key}: write at {offset} while streaming at {}: committing, then staging changes",
                w.written()
            );
            self.commit(ctx, key, Metadata::new()).await?;
        }
        self.stage();
        let chunk = ctx.crypt.geometry().chunk;
        let end = offset + data.len() as u64;
        {
            let s = self.staged_mut();
            if s.staging.is_none() {
                s.staging = Some(StagingFile::create(ctx.staging_dir, chunk as usize)?);
            }
            s.size = s.size.max(end);
        }
        let size = self.size();
        for i in offset / chunk..end.div_ceil(chunk) {
            let base = i * chunk;
            let from = offset.max(base);
            let to = end.min(base + chunk);
            let new_bytes = &data[(from - offset) as usize..(to - offset) as usize];
            // A chunk the write covers to its end in the file needs none of its old
            // content: fetching it from the store made a sequential overwrite of a large
            // file one get per chunk, at a tenth of the speed of a fresh write.
            let merged;
            let content = if from == base && to == size.min(base + chunk) {
                new_bytes
            } else {
                let mut old = self.chunk_content(ctx, key, i, None).await?;
                old[(from - base) as usize..(to - base) as usize].copy_from_slice(new_bytes);
                merged = old;
                &merged
            };
            let s = self.staged_mut();
            s.staging
                .as_mut()
                .expect("created above")
                .write_chunk(ctx.staging_key, i, content)?;
        }
        Ok(())
    }

    pub async fn truncate(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        meta: impl FnOnce() -> Metadata,
        new_size: u64,
    ) -> FsResult<()> {
        if new_size == self.size() {
            return Ok(());
        }
        match std::mem::replace(&mut self.content, Content::Clean) {
            Content::Streaming(w) if new_size == 0 => {
                w.abort().await;
                self.content = Content::Staged(Staged {
                    base_valid: 0,
                    size: 0,
                    staging: None,
                });
                return Ok(());
            }
            Content::Streaming(w) => {
                self.content = Content::Streaming(w);
                self.commit(ctx, key, meta()).await?;
            }
            other => self.content = other,
        }
        self.stage();
        let chunk = ctx.crypt.geometry().chunk;
        // A partial last chunk keeps only the bytes below the new size.
        let last = new_size / chunk;
        let partial = !new_size.is_multiple_of(chunk);
        let keep_last = if partial && new_size < self.size() {
            let mut c = self.chunk_content(ctx, key, last, None).await?;
            c.truncate((new_size % chunk) as usize);
            Some(c)
        } else {
            None
        };
        let s = self.staged_mut();
        s.base_valid = s.base_valid.min(new_size);
        s.size = new_size;
        if let Some(st) = s.staging.as_mut() {
            st.drop_from(new_size.div_ceil(chunk));
        }
        if let Some(c) = keep_last {
            if s.staging.is_none() {
                s.staging = Some(StagingFile::create(ctx.staging_dir, chunk as usize)?);
            }
            s.staging
                .as_mut()
                .expect("created above")
                .write_chunk(ctx.staging_key, last, &c)?;
        }
        Ok(())
    }

    /// Makes the content durable in the store under `key` with `metadata` (attributes and
    /// xattrs; the envelope is added here). A no-op for a clean file.
    pub async fn commit(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        metadata: Metadata,
    ) -> FsResult<Option<ObjectInfo>> {
        let info = match std::mem::replace(&mut self.content, Content::Clean) {
            Content::Clean => return Ok(None),
            Content::Streaming(w) => {
                let size = w.written();
                // The envelope was made with the writer; the attributes are today's.
                let mut final_meta = w.metadata().clone();
                final_meta.extend(metadata);
                let result = w.finish(Some(final_meta)).await;
                match result {
                    Ok(info) => {
                        self.committed_size = size;
                        info
                    }
                    Err(e) => {
                        // The streamed bytes are gone with the failed upload; the file is
                        // back to its committed state.
                        self.committed = None;
                        return Err(e.into());
                    }
                }
            }
            Content::Staged(s) => {
                let size = s.size;
                self.content = Content::Staged(s);
                let info = self.rewrite(ctx, key, metadata).await?;
                self.content = Content::Clean;
                self.committed_size = size;
                info
            }
        };
        if let Some(old) = self.committed.take() {
            ctx.cache.forget_object(old.cache_id);
        }
        self.exists = true;
        Ok(Some(info))
    }

    /// Writes the staged file's whole content as a new object.
    async fn rewrite(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        metadata: Metadata,
    ) -> FsResult<ObjectInfo> {
        let (cipher, mut meta) = ctx.crypt.new_object().await?;
        meta.extend(metadata);
        let opts = PutOptions {
            metadata: meta,
            sse: ctx.sse.clone(),
            checksum: None,
            defer_durability: false,
        };
        let mut w = StreamingWriter::new(ctx.store.clone(), key, opts, cipher)
            .with_budget(ctx.budget.clone());
        let chunk = ctx.crypt.geometry().chunk;
        let n = self.size().div_ceil(chunk);
        let window = (REWRITE_WINDOW_BYTES / chunk).max(1);
        for start in (0..n).step_by(window as usize) {
            let chunks = start..(start + window).min(n);
            if let Err(e) = self.rewrite_window(ctx, key, &mut w, chunks).await {
                w.abort().await;
                return Err(e);
            }
        }
        Ok(w.finish(None).await?)
    }

    /// Appends the content of `chunks` to the rewrite `w`.
    async fn rewrite_window(
        &mut self,
        ctx: &FileCtx<'_>,
        key: &str,
        w: &mut StreamingWriter,
        chunks: Range<u64>,
    ) -> FsResult<()> {
        let base = self.base_chunks(ctx, key, chunks.clone()).await?;
        for (i, b) in chunks.zip(base) {
            let data = self.chunk_content(ctx, key, i, b).await?;
            w.append(&data).await?;
        }
        Ok(())
    }

    /// Drops uncommitted changes (the file was unlinked).
    pub async fn discard(&mut self) {
        if let Content::Streaming(w) = std::mem::replace(&mut self.content, Content::Clean) {
            w.abort().await;
        }
    }
}
