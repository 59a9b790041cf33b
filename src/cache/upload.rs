//! Streaming upload: plaintext appended to a file is sealed in chunks and sent to the store
//! as multipart parts while it arrives. Memory is bounded: the unsealed tail (under one part)
//! plus at most [`PARTS_IN_FLIGHT`] sealed parts queued for the store. A file that ends
//! before its first part is full is stored with one single put instead, with the metadata
//! known at the end.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::buffers::{
    PART_BUFFER_BYTES, PART_BUFFERS, SEALED_BUFFER_BYTES, SEALED_BUFFERS, WRITE_BUFFERS,
};
use super::memory::{MemoryBudget, Reservation};
use crate::crypt::ObjectCipher;
use crate::crypt::format::Geometry;
use crate::store::{ObjectInfo, ObjectStore, PutOptions, StoreError, StoreLimits, StoreResult};

/// Sealed parts queued for the store while the writer fills the next (a part is sealed only
/// once there is room for it here).
pub const PARTS_IN_FLIGHT: usize = 1;
/// The largest [`StoreLimits::part_size`] of the stores: the pooled part buffers' size.
pub const BASE_PART: u64 = 8 << 20;
/// Plaintext sealed on the writer's own thread rather than the blocking pool.
const INLINE_SEAL_BYTES: usize = 64 << 10;
/// Parts of each size before the size doubles (so 10,000 parts reach far beyond 1 TiB).
const PARTS_PER_STEP: u64 = 1000;

/// Stored bytes in part `n` (from 0) of a multipart upload: the store's part size, doubling
/// every [`PARTS_PER_STEP`] parts (so 10,000 parts reach far beyond 1 TiB), within its limits.
///
/// Parts are cut from the stored byte stream at exactly these sizes, not at chunk boundaries
/// (a chunk that straddles a cut is sealed by both parts' jobs, which the deterministic
/// nonce makes the same bytes). Garage cuts every part into blocks of 1 MiB: parts of whole
/// chunks (5 MiB and 1,280 bytes of tags) each ended in a block of a few KiB, and no 1 MiB
/// boundary of the object fell on a block boundary, so every ranged get that started inside
/// a block made the server read, check and decompress that whole block once more.
pub fn part_stored(n: u64, limits: &StoreLimits) -> u64 {
    limits
        .part_size
        .saturating_mul(1 << (n / PARTS_PER_STEP).min(20))
        .max(limits.min_part_size)
        .min(limits.max_part_size)
}

/// Where the next part lies: its stored bytes, and the chunks whose stored bytes meet them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PartPlan {
    /// Stored bytes `start..end` of the object (the final part ends where the object does).
    start: u64,
    end: u64,
    /// Its first chunk (whose start may lie in the part before) and last chunk (whose end
    /// may lie in the part after).
    first_chunk: u64,
    last_chunk: u64,
}

impl PartPlan {
    /// Part `n`, starting at stored byte `start` with chunk `first_chunk`.
    fn new(n: u64, start: u64, first_chunk: u64, g: Geometry, limits: &StoreLimits) -> Self {
        // At least the header and one whole chunk, so every part moves the stream on.
        let len = part_stored(n, limits).max(g.header_len() + g.stored_chunk());
        let end = start + len;
        PartPlan {
            start,
            end,
            first_chunk,
            last_chunk: (end - 1).saturating_sub(g.header_len()) / g.stored_chunk(),
        }
    }

    /// Plaintext of the part when it is not the file's last: its chunks, all whole.
    fn plaintext_len(&self, g: Geometry) -> usize {
        ((self.last_chunk + 1 - self.first_chunk) * g.chunk) as usize
    }

    /// Whether the last chunk goes on into the next part (which then starts with it).
    fn last_straddles(&self, g: Geometry) -> bool {
        g.header_len() + (self.last_chunk + 1) * g.stored_chunk() > self.end
    }
}

/// A sealing task that panicked or was cancelled.
fn sealing_failed(key: &str, e: tokio::task::JoinError) -> StoreError {
    StoreError::invalid(key, format!("sealing task failed: {e}"))
}

pub struct StreamingWriter {
    store: Arc<dyn ObjectStore>,
    opts: PutOptions,
    cipher: Arc<ObjectCipher>,
    limits: StoreLimits,
    key: String,
    /// Plaintext not yet sent, from the start of chunk `next_chunk` (which the last part
    /// sent may have begun to seal: see [`part_stored`]).
    pending: Vec<u8>,
    next_chunk: u64,
    parts_sent: u64,
    /// Stored bytes sent in parts so far: where the next part starts.
    part_start: u64,
    written: u64,
    tx: Option<mpsc::Sender<(JoinHandle<Vec<u8>>, Reservation)>>,
    uploader: Option<JoinHandle<StoreResult<ObjectInfo>>>,
    /// The global write-buffer budget, and what this writer holds of it for `pending`.
    budget: Option<Arc<MemoryBudget>>,
    held: Reservation,
}

impl StreamingWriter {
    /// Prepares a write of `key`; nothing reaches the store before the first part is full.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: &str,
        opts: PutOptions,
        cipher: ObjectCipher,
    ) -> StreamingWriter {
        StreamingWriter {
            limits: store.limits(),
            store,
            opts,
            cipher: Arc::new(cipher),
            key: key.to_string(),
            pending: Vec::new(),
            next_chunk: 0,
            parts_sent: 0,
            part_start: 0,
            written: 0,
            tx: None,
            uploader: None,
            budget: None,
            held: Reservation::none(),
        }
    }

    /// Counts this writer's buffers against a global budget.
    pub fn with_budget(mut self, budget: Option<Arc<MemoryBudget>>) -> Self {
        self.budget = budget;
        self
    }

    /// Starts the multipart upload and the task that feeds it parts.
    async fn start_upload(&mut self) -> StoreResult<()> {
        let mut upload = self.store.create_upload(&self.key, &self.opts).await?;
        let (tx, mut rx) = mpsc::channel::<(JoinHandle<Vec<u8>>, Reservation)>(PARTS_IN_FLIGHT);
        let key = self.key.clone();
        self.uploader = Some(tokio::spawn(async move {
            // Parts arrive in order, each still being sealed; each part's budget is returned
            // once the store has it.
            loop {
                // A free slot first: a part taken off the queue only to wait for one would
                // be one more part in memory, and the writer would seal the next meanwhile.
                if let Err(e) = upload.ready().await {
                    let _ = upload.abort().await;
                    return Err(e);
                }
                let Some((sealing, _reservation)) = rx.recv().await else {
                    break;
                };
                let part = match sealing.await {
                    // The buffer seals a later part once the store drops the last reference.
                    // The S3 store still sends the part after put_part returns: taking the
                    // buffer back here found it shared and freed it, so that every part
                    // faulted in and zeroed a fresh 8 MiB (a third of a write's CPU per GiB).
                    Ok(sealed) => SEALED_BUFFERS.bytes(sealed),
                    Err(e) => {
                        let _ = upload.abort().await;
                        return Err(sealing_failed(&key, e));
                    }
                };
                if let Err(e) = upload.put_part(part).await {
                    let _ = upload.abort().await;
                    return Err(e);
                }
            }
            upload.complete().await
        }));
        self.tx = Some(tx);
        Ok(())
    }

    /// Plaintext bytes accepted so far (the file size).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The part being filled.
    fn plan(&self) -> PartPlan {
        PartPlan::new(
            self.parts_sent,
            self.part_start,
            self.next_chunk,
            self.cipher.geometry(),
            &self.limits,
        )
    }

    /// Plaintext that completes the part being filled.
    fn part_size(&self) -> usize {
        self.plan().plaintext_len(self.cipher.geometry())
    }

    /// Appends plaintext. Seals and sends whole parts, always holding back at least one byte
    /// so that the final chunk is sealed with the last-chunk flag by [`Self::finish`].
    pub async fn append(&mut self, data: &[u8]) -> StoreResult<()> {
        if let Some(b) = &self.budget
            && self.held.bytes() == 0
        {
            // A whole part's budget at once (sealing doubles it for a moment, and one more
            // write may land before it is sent): a writer that waits holds nothing, so
            // writers never wait on each other's partial reservations.
            self.held = b.reserve(2 * (self.part_size() + (1 << 20))).await;
        }
        self.gather(data);
        let g = self.cipher.geometry();
        loop {
            let plan = self.plan();
            let size = plan.plaintext_len(g);
            if self.pending.len() <= size {
                break;
            }
            // A last chunk that goes on into the next part is sealed by both.
            let kept = if plan.last_straddles(g) {
                size - g.chunk as usize
            } else {
                size
            };
            // Only the tail, in a buffer of its size: a whole part buffer held while the
            // part waits for room in the queue would be one more part in memory. The next
            // write moves it into a part buffer.
            let rest = WRITE_BUFFERS.copy_of(&self.pending[kept..]);
            self.pending.truncate(size);
            let part = std::mem::replace(&mut self.pending, rest);
            self.send(part, false).await?;
        }
        Ok(())
    }

    /// [`Self::append`] when it needs no waiting: the writer holds its budget already and
    /// `data` does not complete a part. Returns false, having changed nothing, otherwise.
    pub fn try_append_now(&mut self, data: &[u8]) -> bool {
        if self.budget.is_some() && self.held.bytes() == 0
            || self.pending.len() + data.len() > self.part_size()
        {
            return false;
        }
        self.gather(data);
        true
    }

    /// Adds `data` to the part being filled.
    fn gather(&mut self, data: &[u8]) {
        let wanted = self.pending.len() + data.len();
        if wanted > self.pending.capacity() && wanted > 1 << 20 {
            // Past the first MiB the file is large: gather the part in a whole part buffer
            // rather than growing one by doubling (each doubling copies the part again and
            // faults in fresh pages).
            let mut part = self.part_buffer();
            part.extend_from_slice(&self.pending);
            WRITE_BUFFERS.give(std::mem::replace(&mut self.pending, part));
        }
        self.pending.extend_from_slice(data);
        self.written += data.len() as u64;
    }

    /// An empty buffer for a whole part and one more write, reused where possible.
    fn part_buffer(&self) -> Vec<u8> {
        let room = self.part_size() + (1 << 20);
        if room <= PART_BUFFER_BYTES {
            PART_BUFFERS.take()
        } else {
            Vec::with_capacity(room)
        }
    }

    async fn seal(&mut self, plaintext: Vec<u8>, ends_file: bool) -> StoreResult<Vec<u8>> {
        if plaintext.len() <= INLINE_SEAL_BYTES {
            // A small file's only chunk seals in microseconds: handing it to another
            // thread would cost more than sealing it here.
            return Ok(self.seal_job(plaintext, ends_file)());
        }
        self.start_seal(plaintext, ends_file)
            .await
            .map_err(|e| sealing_failed(&self.key, e))
    }

    /// Starts sealing the next part on the blocking pool and returns at once, so the writer
    /// takes the next writes while the part is sealed (the uploader waits for it in order).
    fn start_seal(&mut self, plaintext: Vec<u8>, ends_file: bool) -> JoinHandle<Vec<u8>> {
        tokio::task::spawn_blocking(self.seal_job(plaintext, ends_file))
    }

    /// Takes the next part's place in the object (its stored bytes, its chunks, the header
    /// if it is the first) and returns the work of sealing it. `plaintext` is the part's
    /// chunks from [`PartPlan::first_chunk`], all of the file's rest when `ends_file`.
    fn seal_job(
        &mut self,
        plaintext: Vec<u8>,
        ends_file: bool,
    ) -> impl FnOnce() -> Vec<u8> + Send + 'static {
        let cipher = self.cipher.clone();
        let g = cipher.geometry();
        let plan = self.plan();
        self.parts_sent += 1;
        self.part_start = plan.end;
        self.next_chunk = if plan.last_straddles(g) {
            plan.last_chunk
        } else {
            plan.last_chunk + 1
        };
        move || {
            let mut out = if plaintext.len() <= INLINE_SEAL_BYTES {
                // A small file's object, sized exactly: an idle part buffer is 8 MiB of
                // address space mapped and unmapped for each small file.
                Vec::with_capacity(g.stored_size(plaintext.len() as u64) as usize)
            } else if g.stored_size(plaintext.len() as u64) as usize <= SEALED_BUFFER_BYTES {
                SEALED_BUFFERS.take()
            } else {
                Vec::new()
            };
            let header = g.header_len();
            let first_start = header + plan.first_chunk * g.stored_chunk();
            // A reused buffer still holds its last part: sealed over, not zeroed first.
            if plan.start < header {
                // The first part: the header, then the chunks.
                cipher.seal_at(
                    plan.first_chunk,
                    &plaintext,
                    ends_file,
                    &mut out,
                    header as usize,
                );
                out[..header as usize].copy_from_slice(&cipher.header()[..header as usize]);
            } else if first_start < plan.start {
                // The first chunk began in the part before (whose job sealed it too, to the
                // same bytes, and never as the file's last): only its rest goes here.
                let c = g.chunk as usize;
                let mut head = Vec::with_capacity(g.stored_chunk() as usize);
                cipher.seal_at(plan.first_chunk, &plaintext[..c], false, &mut head, 0);
                out.clear();
                out.extend_from_slice(&head[(plan.start - first_start) as usize..]);
                // Never the file's end: a part is sent only once a byte follows it.
                debug_assert!(plaintext.len() > c);
                let at = out.len();
                cipher.seal_at(
                    plan.first_chunk + 1,
                    &plaintext[c..],
                    ends_file,
                    &mut out,
                    at,
                );
            } else {
                cipher.seal_at(plan.first_chunk, &plaintext, ends_file, &mut out, 0);
            }
            if !ends_file {
                // The last chunk's rest starts the next part.
                out.truncate((plan.end - plan.start) as usize);
            }
            PART_BUFFERS.give(plaintext);
            out
        }
    }

    async fn send(&mut self, plaintext: Vec<u8>, ends_file: bool) -> StoreResult<()> {
        if self.tx.is_none() {
            self.start_upload().await?;
        }
        let tx = self.tx.clone().expect("upload started above");
        // Room in the queue before the seal: a part that waits for the store waits as
        // plaintext, not as plaintext and its sealed copy.
        let Ok(room) = tx.reserve().await else {
            // The uploader stopped: its result says why.
            return Err(self
                .join()
                .await
                .err()
                .unwrap_or_else(|| StoreError::invalid(&self.key, "the upload ended early")));
        };
        let sealed = self.start_seal(plaintext, ends_file);
        // The part takes this writer's budget with it; the next part reserves anew.
        let reservation = std::mem::replace(&mut self.held, Reservation::none());
        room.send((sealed, reservation));
        Ok(())
    }

    async fn join(&mut self) -> StoreResult<ObjectInfo> {
        self.tx = None;
        match self.uploader.take() {
            Some(h) => h.await.unwrap_or_else(|e| {
                Err(StoreError::invalid(
                    &self.key,
                    format!("upload task failed: {e}"),
                ))
            }),
            None => Err(StoreError::invalid(&self.key, "the upload already ended")),
        }
    }

    /// Seals the final chunk, completes the upload and returns the stored object. A file
    /// that never filled a part is stored with one put, with `metadata` (when given) in
    /// place of the metadata the writer was created with.
    pub async fn finish(
        mut self,
        metadata: Option<crate::store::Metadata>,
    ) -> StoreResult<ObjectInfo> {
        let last = std::mem::take(&mut self.pending);
        if self.tx.is_none() {
            let body = self.seal(last, true).await?;
            let mut opts = self.opts.clone();
            if let Some(m) = metadata {
                opts.metadata = m;
            }
            opts.checksum = Some(crate::store::Checksum::crc32c_of(&body));
            return self.store.put(&self.key, Bytes::from(body), &opts).await;
        }
        self.send(last, true).await?;
        self.join().await
    }

    /// The metadata the object is stored with if it goes out as a multipart upload.
    pub fn metadata(&self) -> &crate::store::Metadata {
        &self.opts.metadata
    }

    /// Whether parts have already gone to the store (the metadata is then fixed).
    pub fn upload_started(&self) -> bool {
        self.tx.is_some()
    }

    /// Drops the upload; the previous object (if any) stays.
    pub async fn abort(mut self) {
        self.tx = None;
        if let Some(h) = self.uploader.take() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crypt::keys::{KeyProvider, KeyRing, RootKey};
    use crate::crypt::{Crypt, Mode, decrypt_all};
    use crate::store::memory::MemoryStore;
    use proptest::prelude::*;

    /// The header's length in an encrypted object.
    const H: u64 = crate::crypt::format::HEADER_LEN as u64;

    #[test]
    fn part_sizes_fit_a_tebibyte_in_s3_limits() {
        let l = StoreLimits::S3;
        let mut total = 0u64;
        for n in 0..l.max_parts {
            let p = part_stored(n, &l);
            assert!(p >= l.min_part_size);
            assert!(p <= l.max_part_size);
            total += p;
        }
        assert!(total > 1 << 40, "10,000 parts hold only {total} bytes");
    }

    fn crypt(encrypted: bool, chunk_shift: u8) -> Crypt {
        let mode = if encrypted {
            let ring: Arc<dyn KeyProvider> =
                Arc::new(KeyRing::new(vec![RootKey::generate()]).unwrap());
            Mode::Client(ring)
        } else {
            Mode::None
        };
        Crypt::new(mode, chunk_shift)
    }

    /// Writes `len` bytes in writes of `write` bytes through a store whose parts are
    /// `part` stored bytes; returns the store's part sizes (None for a single put).
    fn round_trip(
        encrypted: bool,
        chunk_shift: u8,
        part: u64,
        len: usize,
        write: usize,
    ) -> Option<Vec<u64>> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let limits = StoreLimits {
                min_part_size: part,
                part_size: part,
                ..StoreLimits::S3
            };
            let store = MemoryStore::with_limits(false, limits);
            let crypt = crypt(encrypted, chunk_shift);
            let (cipher, meta) = crypt.new_object().await.unwrap();
            let opts = PutOptions {
                metadata: meta.clone(),
                ..Default::default()
            };
            let mut w = StreamingWriter::new(Arc::new(store.clone()), "f", opts, cipher);
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            for piece in data.chunks(write.max(1)) {
                if !w.try_append_now(piece) {
                    w.append(piece).await.unwrap();
                }
            }
            let info = w.finish(None).await.unwrap();
            let body = store
                .get("f", None, &Default::default())
                .await
                .unwrap()
                .body;
            assert_eq!(info.size, body.len() as u64);
            assert_eq!(body.len() as u64, crypt.geometry().stored_size(len as u64));
            let plain = decrypt_all(&crypt, &meta, &body).await.unwrap();
            assert!(plain == data, "{len} bytes in writes of {write} differ");
            // The stream is what one seal of the whole file gives.
            if encrypted {
                let cipher = crypt.open_object(&meta, &body[..H as usize]).await.unwrap();
                let mut sealed = cipher.header().to_vec();
                sealed.extend_from_slice(&cipher.seal(0, &data, true));
                assert!(sealed[..] == body[..], "{len} bytes: not one stream");
            }
            store.upload_parts("f")
        })
    }

    #[test]
    fn parts_are_cut_at_exact_stored_sizes_inside_chunks() {
        // 4 KiB chunks; parts of 3 chunks and a bit, so that cuts fall inside chunks, and
        // at 2 chunks plus a tag's worth, so that they fall near chunk ends.
        for part in [3 * 4112 + 1000, 2 * 4112 + 16 + H, 4112 + H] {
            for len in [0, 1, 4095, 4096, 4097, 3 * 4096, 20_000, 50_000, 100_000] {
                for write in [1000, 4096, 65536] {
                    let Some(parts) = round_trip(true, 12, part, len, write) else {
                        continue;
                    };
                    let (last, whole) = parts.split_last().unwrap();
                    assert!(
                        whole.iter().all(|&p| p == part),
                        "{parts:?} for {len} of {part}"
                    );
                    assert!(*last <= part + 4112 && *last > 0, "{parts:?}");
                }
            }
        }
    }

    #[test]
    fn unencrypted_parts_are_exact_too() {
        let parts = round_trip(false, 12, 3 * 4096 + 100, 100_000, 3000).unwrap();
        let (_, whole) = parts.split_last().unwrap();
        assert!(whole.iter().all(|&p| p == 3 * 4096 + 100), "{parts:?}");
    }

    #[test]
    fn a_file_that_ends_on_a_part_boundary_or_inside_the_chunk_that_straddles_it() {
        // The first part ends 1000 bytes into chunk 3 (of 4,112 stored bytes each).
        let part = H + 3 * 4112 + 1000;
        for len in [
            3 * 4096,
            3 * 4096 + 1,
            3 * 4096 + 500,
            4 * 4096,
            4 * 4096 + 1,
        ] {
            round_trip(true, 12, part, len, 4096);
            round_trip(true, 12, part, len, 1);
        }
        // A part that ends exactly at a chunk's end.
        let parts = round_trip(true, 12, H + 2 * 4112, 2 * 4096 + 1, 4096);
        assert_eq!(parts, Some(vec![H + 2 * 4112, 17]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_file_in_any_writes_is_one_stream_in_exact_parts(
            len in 0usize..60_000,
            write in 1usize..9_000,
            part in (4112 + H)..40_000,
        ) {
            if let Some(parts) = round_trip(true, 12, part, len, write) {
                let (last, whole) = parts.split_last().unwrap();
                prop_assert!(whole.iter().all(|&p| p == part));
                prop_assert!(*last <= part + 4112);
            }
        }
    }
}
