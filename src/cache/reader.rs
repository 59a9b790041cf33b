//! Reading chunks of a committed object: ranged gets aligned to chunks, opened in parallel,
//! kept in the chunk cache.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::ChunkCache;
use super::buffers::READ_BUFFERS;
use super::memory::{MemoryBudget, Reservation};
use crate::crypt::{Crypt, ObjectCipher};
use crate::error::{FsError, FsResult};
use crate::store::{GetOptions, ObjectInfo, ObjectStore};

static NEXT_OBJECT: AtomicU64 = AtomicU64::new(1);

/// Most ciphertext per ranged get: a long read-ahead becomes several gets in flight at once
/// (S3 serves parallel gets faster than one long one) and its first chunks are usable while
/// later ones still arrive.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Objects up to this plaintext size are fetched whole when opened.
pub const WHOLE_OBJECT_BYTES: u64 = 1 << 20;
/// Gets in flight for one read.
pub const SEGMENTS_IN_FLIGHT: usize = 4;

/// An object version opened for reading: its cipher and plaintext size.
pub struct CommittedObject {
    pub key: String,
    /// Identity of this version in the chunk cache.
    pub cache_id: u64,
    pub plain_size: u64,
    pub cipher: Arc<ObjectCipher>,
    pub get: GetOptions,
    /// Chunks being fetched, each with a receiver that turns true (or closes) when its
    /// fetch ends: a read needing them waits instead of fetching them twice.
    inflight: Mutex<HashMap<u64, watch::Receiver<bool>>>,
    /// Halves of chunks that straddle a read-ahead segment's edge, each from the get of one
    /// side, waiting for the other (see [`Self::prefetch`]).
    halves: Mutex<HashMap<u64, Half>>,
}

/// One side of a chunk cut by a segment boundary.
struct Half {
    /// Whether these are the chunk's first bytes (from the segment before the boundary).
    left: bool,
    bytes: Vec<u8>,
}

/// Halves kept per object at most: a read-ahead leaves at most one waiting at each end of
/// what it fetched; more are from seeks, and dropping them costs only a get of the chunk.
const HALVES_KEPT: usize = 16;

/// Ends a claim on in-flight chunks however the fetch ends (done, failed or cancelled).
struct InFlightGuard<'a> {
    obj: &'a CommittedObject,
    run: Range<u64>,
    _done: watch::Sender<bool>,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self.obj.inflight.lock();
        for i in self.run.clone() {
            inflight.remove(&i);
        }
        // Dropping the sender wakes the waiters (their wait ends with an error, which they
        // take as "look in the cache again").
    }
}

impl CommittedObject {
    /// Opens an object: one ranged get of its header returns the metadata (with the
    /// envelope) too. With `version_id` in `get`, reads stay on that version.
    ///
    /// `size_hint` is the plaintext size the caller expects (from a listing): when it is at
    /// most [`WHOLE_OBJECT_BYTES`], the whole object is fetched by that one get and its chunks
    /// go to `cache`, so reading a small file costs one request instead of two (on S3 each
    /// is a round trip; the hint is only a guess, and a different size just skips that).
    pub async fn open(
        store: &dyn ObjectStore,
        crypt: &Crypt,
        cache: &ChunkCache,
        key: &str,
        get: GetOptions,
        size_hint: Option<u64>,
    ) -> FsResult<(CommittedObject, ObjectInfo)> {
        let header_len = crypt.header_len();
        let whole = size_hint
            .filter(|&n| n <= WHOLE_OBJECT_BYTES)
            .map(|n| crypt.geometry().stored_size(n))
            .filter(|&n| n > 0);
        let (info, body) = match whole {
            Some(n) => {
                let r = store.get(key, Some(0..n), &get).await?;
                (r.info, r.body)
            }
            None if header_len > 0 => {
                let r = store.get(key, Some(0..header_len), &get).await?;
                (r.info, r.body)
            }
            None => (store.head(key, &get).await?, Bytes::new()),
        };
        let plain_size = crypt.geometry().plain_size(info.size)?;
        let metadata = info.metadata.clone().unwrap_or_default();
        let header = body.slice(..(header_len as usize).min(body.len()));
        let cipher = crypt.open_object(&metadata, &header).await?;
        // Later reads stay on this version: by its id where the store has versions, else
        // by its ETag.
        let version_id = get.version_id.or(info.version_id.clone());
        let get = GetOptions {
            if_match: match &version_id {
                None if !info.etag.is_empty() => Some(info.etag.clone()),
                _ => None,
            },
            version_id,
            ..get
        };
        let obj = CommittedObject {
            key: key.to_string(),
            cache_id: NEXT_OBJECT.fetch_add(1, Ordering::Relaxed),
            plain_size,
            cipher: Arc::new(cipher),
            get,
            inflight: Mutex::new(HashMap::new()),
            halves: Mutex::new(HashMap::new()),
        };
        if whole.is_some() && body.len() as u64 == info.size && info.size > header_len {
            // A chunk that fails here fails again, with its error, when it is read; the
            // parts of the file that are whole stay readable.
            if let Err(e) = obj
                .fill_cache(cache, body.slice(header_len as usize..))
                .await
            {
                tracing::debug!("{key}: not cached at open: {e}");
            }
        }
        Ok((obj, info))
    }

    /// Opens every chunk of the object from `stored` (the object without its header) into
    /// the cache.
    async fn fill_cache(&self, cache: &ChunkCache, stored: Bytes) -> FsResult<()> {
        let run = 0..self.cipher.geometry().chunk_count(self.plain_size);
        self.open_into_cache(cache, run, stored).await.map(drop)
    }

    /// Opens the chunks `run` from their stored bytes on the blocking pool, in place, and
    /// puts each in the cache (as slices of one buffer).
    async fn open_into_cache(
        &self,
        cache: &ChunkCache,
        run: Range<u64>,
        stored: Bytes,
    ) -> FsResult<Vec<Bytes>> {
        let (cipher, plain_size, r) = (self.cipher.clone(), self.plain_size, run.clone());
        let (opened, buffer_len) =
            tokio::task::spawn_blocking(move || cipher.open_shared(r, plain_size, stored))
                .await
                .map_err(|e| FsError::new(libc::EIO, format!("decrypt task failed: {e}")))??;
        cache.insert_from_buffer(
            buffer_len,
            opened
                .iter()
                .enumerate()
                .map(|(j, data)| ((self.cache_id, run.start + j as u64), data.clone())),
        );
        Ok(opened)
    }

    /// Claims the chunks of `chunks` that are neither cached nor being fetched, as runs of at
    /// most [`SEGMENT_BYTES`] of ciphertext each. Returns what the cache has (by position in
    /// `chunks`), the claims, and a receiver per chunk another fetch is bringing in.
    /// `aligned` (read-ahead): runs lie inside one aligned segment each, and the chunks cut
    /// by a segment boundary are left to [`Self::fetch_aligned`]'s halves.
    fn claim(
        &self,
        cache: &ChunkCache,
        chunks: Range<u64>,
        aligned: bool,
    ) -> (
        Vec<Option<Bytes>>,
        Vec<InFlightGuard<'_>>,
        Vec<watch::Receiver<bool>>,
    ) {
        let g = self.cipher.geometry();
        let cached: Vec<Option<Bytes>> = chunks
            .clone()
            .map(|i| cache.get(&(self.cache_id, i)))
            .collect();
        let mut ours: Vec<Range<u64>> = Vec::new();
        let mut theirs: Vec<watch::Receiver<bool>> = Vec::new();
        let mut inflight = self.inflight.lock();
        let seg_chunks = (SEGMENT_BYTES / g.chunk).max(1);
        let segment = |i: u64| g.stored_range(i..i + 1, self.plain_size).start / SEGMENT_BYTES;
        for (j, i) in chunks.enumerate() {
            if cached[j].is_some() {
                continue;
            }
            if let Some(rx) = inflight.get(&i) {
                theirs.push(rx.clone());
                continue;
            }
            if self.straddles(i) {
                if aligned {
                    continue;
                }
                // A read-ahead get of a neighbouring segment brings a half of it: wait for
                // that rather than get the chunk again.
                let neighbour = [i.wrapping_sub(1), i + 1]
                    .iter()
                    .find_map(|n| inflight.get(n).cloned());
                if let Some(rx) = neighbour {
                    theirs.push(rx);
                    continue;
                }
            }
            match ours.last_mut() {
                Some(r) if aligned && r.end == i && segment(r.start) == segment(i) => r.end += 1,
                Some(r) if !aligned && r.end == i && r.end - r.start < seg_chunks => r.end += 1,
                _ => ours.push(i..i + 1),
            }
        }
        let guards = ours
            .into_iter()
            .map(|run| {
                let (tx, rx) = watch::channel(false);
                for i in run.clone() {
                    inflight.insert(i, rx.clone());
                }
                InFlightGuard {
                    obj: self,
                    run,
                    _done: tx,
                }
            })
            .collect();
        (cached, guards, theirs)
    }

    /// The chunks of `chunks` clamped to the object.
    fn clamp(&self, chunks: Range<u64>) -> Range<u64> {
        let count = self.cipher.geometry().chunk_count(self.plain_size);
        chunks.start..chunks.end.min(count)
    }

    /// The plaintext of `chunks` (clamped to the object), one buffer per chunk: from the
    /// cache where it has them, by waiting for a fetch already in flight (a read-ahead) where
    /// one covers them, and otherwise with ranged gets of at most [`SEGMENT_BYTES`] each,
    /// several in flight at once and opened on the blocking pool.
    pub async fn read_chunks(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        chunks: Range<u64>,
    ) -> FsResult<Vec<Bytes>> {
        let chunks = self.clamp(chunks);
        let (mut out, guards, theirs) = self.claim(cache, chunks.clone(), false);
        // Fetch ours, a few segments at a time.
        // Each claim ends with its own get, so a reader waiting on the first segment of a
        // long read-ahead goes on as soon as that segment is in.
        // (Collected first: a closure kept inside the stream across awaits trips the
        // compiler's Send check on the callers' futures.)
        let fetches: Vec<_> = guards
            .into_iter()
            .map(|guard| async move {
                let data = self.fetch_run(store, cache, guard.run.clone()).await?;
                Ok::<_, FsError>((guard.run.start, data))
            })
            .collect();
        let fetched: Vec<(u64, Vec<Bytes>)> = futures::stream::iter(fetches)
            .buffer_unordered(SEGMENTS_IN_FLIGHT)
            .try_collect()
            .await?;
        for (start, data) in fetched {
            for (k, d) in data.into_iter().enumerate() {
                out[(start - chunks.start) as usize + k] = Some(d);
            }
        }
        // Wait for the others' fetches; whatever they did not leave in the cache (failed,
        // or evicted already) is fetched here.
        for mut rx in theirs {
            let _ = rx.wait_for(|done| *done).await;
        }
        for (j, i) in chunks.clone().enumerate() {
            if out[j].is_none() {
                out[j] = match cache.get(&(self.cache_id, i)) {
                    Some(d) => Some(d),
                    None => Some(self.fetch_run(store, cache, i..i + 1).await?.remove(0)),
                };
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every chunk filled"))
            .collect())
    }

    /// Read-ahead: brings the chunks of `chunks` that are neither cached nor in flight into
    /// the cache, keeping nothing itself (a long read-ahead that held its chunks until the
    /// last arrived would hold them past the cache's eviction). Each get first takes its
    /// bytes from `budget`, and the read-ahead stops where the budget is spent: the chunks
    /// not fetched are fetched by the read that needs them. Errors end it quietly, since the
    /// read reports its own.
    ///
    /// Its gets are aligned segments of the stored object ([`Self::fetch_aligned`]), which
    /// `chunks` should cover whole (see [`Self::aligned_end`]).
    pub async fn prefetch(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        chunks: Range<u64>,
        budget: Option<&MemoryBudget>,
    ) {
        let (_, guards, _) = self.claim(cache, self.clamp(chunks), true);
        // Each reservation is taken as its get starts, so at most SEGMENTS_IN_FLIGHT are
        // held; the first refused ends the stream, and with it the claims not started.
        let fetches: Vec<_> = guards
            .into_iter()
            .map(|guard| async move {
                let bytes = self.aligned_range(guard.run.clone());
                let _reservation = match budget {
                    Some(b) => b
                        .try_reserve((bytes.end - bytes.start) as usize)
                        .ok_or(())?,
                    None => Reservation::none(),
                };
                self.fetch_aligned(store, cache, guard.run.clone())
                    .await
                    .map_err(drop)
            })
            .collect();
        let _ = futures::stream::iter(fetches)
            .buffer_unordered(SEGMENTS_IN_FLIGHT)
            .try_for_each(|()| async { Ok(()) })
            .await;
    }

    /// The end of `chunks` moved on to the end of the aligned segment it ends in, so that a
    /// read-ahead window gets whole segments: one that ended inside a segment would make
    /// the next window's first get start inside a block of the server's.
    pub fn aligned_end(&self, chunks: Range<u64>) -> u64 {
        let chunks = self.clamp(chunks);
        if chunks.is_empty() {
            return chunks.end;
        }
        let g = self.cipher.geometry();
        let last = g.stored_range(chunks.end - 1..chunks.end, self.plain_size);
        let boundary = (last.start / SEGMENT_BYTES + 1) * SEGMENT_BYTES;
        // The first chunk that does not end inside the segment (a straddler, or the next
        // segment's first), at most the object's end.
        let count = g.chunk_count(self.plain_size);
        let stored_chunk = g.stored_chunk();
        let whole = boundary.saturating_sub(g.header_len()) / stored_chunk;
        whole.clamp(chunks.end, count)
    }

    /// Whether chunk `i`'s stored bytes are cut by a segment boundary.
    fn straddles(&self, i: u64) -> bool {
        let r = self
            .cipher
            .geometry()
            .stored_range(i..i + 1, self.plain_size);
        r.start / SEGMENT_BYTES != (r.end - 1) / SEGMENT_BYTES
    }

    /// The stored bytes a read-ahead get of `run` (whole chunks inside one segment) asks
    /// for: the run's own, reaching out to the segment's edges where the run does, so that
    /// the halves of the chunks cut there come along.
    fn aligned_range(&self, run: Range<u64>) -> Range<u64> {
        let g = self.cipher.geometry();
        let own = g.stored_range(run.clone(), self.plain_size);
        let start = if run.start > 0 && self.straddles(run.start - 1) {
            own.start / SEGMENT_BYTES * SEGMENT_BYTES
        } else {
            own.start
        };
        let end = if run.end < g.chunk_count(self.plain_size) && self.straddles(run.end) {
            (own.end / SEGMENT_BYTES + 1) * SEGMENT_BYTES
        } else {
            own.end
        };
        start..end
    }

    /// One read-ahead get of `run` and the halves of the chunks cut at its segment's edges:
    /// `run`'s chunks are opened and cached, each half waits for its other half (from the
    /// neighbouring segment's get), and a chunk whose halves are both in is opened too.
    ///
    /// Why aligned: S3 servers store objects in blocks (Garage: 1 MiB, from the start of
    /// each part, which the writer cuts at whole MiB, see [`crate::cache::upload`]) and
    /// read whole blocks for any range. Gets cut at chunk boundaries each started and ended
    /// inside a block, which the server then read, checked and decompressed for both gets.
    async fn fetch_aligned(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        run: Range<u64>,
    ) -> FsResult<()> {
        let g = self.cipher.geometry();
        let own = g.stored_range(run.clone(), self.plain_size);
        let range = self.aligned_range(run.clone());
        let lead = (own.start - range.start) as usize;
        let tail = (range.end - own.end) as usize;
        let body = self.get_range(store, range).await?;
        if lead > 0 {
            self.half_arrived(cache, run.start - 1, false, &body[..lead]);
        }
        if tail > 0 {
            self.half_arrived(cache, run.end, true, &body[body.len() - tail..]);
        }
        // The halves are copied out: the run's own bytes are then the buffer's only holder,
        // and are opened where they lie.
        let own_bytes = body.slice(lead..body.len() - tail);
        drop(body);
        self.open_into_cache(cache, run, own_bytes).await.map(drop)
    }

    /// Keeps one half of straddling chunk `i`; with both in, opens the chunk into `cache`.
    /// A chunk that fails to open is left out: the read that needs it fetches it and
    /// reports the error.
    fn half_arrived(&self, cache: &ChunkCache, i: u64, left: bool, bytes: &[u8]) {
        let key = (self.cache_id, i);
        if cache.get(&key).is_some() {
            return;
        }
        let stored = {
            let mut halves = self.halves.lock();
            match halves.remove(&i) {
                Some(other) if other.left != left => {
                    let (first, second) = if left {
                        (bytes, &other.bytes[..])
                    } else {
                        (&other.bytes[..], bytes)
                    };
                    [first, second].concat()
                }
                _ => {
                    if halves.len() >= HALVES_KEPT {
                        halves.clear();
                    }
                    halves.insert(
                        i,
                        Half {
                            left,
                            bytes: bytes.to_vec(),
                        },
                    );
                    return;
                }
            }
        };
        // One chunk: opened here, where a hand-off to the blocking pool would cost more.
        match self
            .cipher
            .open_shared(i..i + 1, self.plain_size, Bytes::from(stored))
        {
            Ok((opened, held)) => {
                cache.insert_from_buffer(held, opened.into_iter().map(|d| (key, d)));
            }
            Err(e) => tracing::debug!("{}: chunk {i} from two gets: {e}", self.key),
        }
    }

    /// One ranged get of the chunks `run`, opened and put in the cache.
    async fn fetch_run(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        run: Range<u64>,
    ) -> FsResult<Vec<Bytes>> {
        let range = self
            .cipher
            .geometry()
            .stored_range(run.clone(), self.plain_size);
        let body = self.get_range(store, range).await?;
        self.open_into_cache(cache, run, body).await
    }

    /// Stored bytes `range` of this version, refused unless the store answered that range.
    async fn get_range(&self, store: &dyn ObjectStore, range: Range<u64>) -> FsResult<Bytes> {
        let got = store.get(&self.key, Some(range.clone()), &self.get).await?;
        if got.range != range {
            return Err(FsError::Crypt(crate::crypt::CryptError::BadSize(
                got.info.size,
            )));
        }
        Ok(got.body)
    }

    /// Plaintext bytes `range` of the object.
    pub async fn read(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        range: Range<u64>,
    ) -> FsResult<Vec<u8>> {
        let g = self.cipher.geometry();
        let chunks = g.chunks_of(range.clone(), self.plain_size);
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.read_chunks(store, cache, chunks.clone()).await?;
        let end = range.end.min(self.plain_size);
        let mut out = match (end - range.start) as usize {
            n if n <= 1 << 20 => READ_BUFFERS.take(),
            n => Vec::with_capacity(n),
        };
        for (j, chunk) in data.iter().enumerate() {
            let base = (chunks.start + j as u64) * g.chunk;
            let from = range.start.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(chunk.len());
            if from < to {
                out.extend_from_slice(&chunk[from..to]);
            }
        }
        Ok(out)
    }
}
