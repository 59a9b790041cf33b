//! Streaming upload: plaintext appended to a file is sealed in chunks and sent to the store
//! as multipart parts while it arrives. Memory is bounded: the unsealed tail (under one part)
//! plus at most [`PARTS_IN_FLIGHT`] sealed parts queued for the store. A file that ends
//! before its first part is full is stored with one single put instead, with the metadata
//! known at the end.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::buffers::{PART_BUFFER_BYTES, PART_BUFFERS, SEALED_BUFFERS, WRITE_BUFFERS};
use super::memory::{MemoryBudget, Reservation};
use crate::crypt::ObjectCipher;
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

/// Plaintext bytes in part `n` (from 0): a whole number of chunks, at least the store's
/// minimum part size, starting at its part size and doubling every [`PARTS_PER_STEP`]
/// parts, at most its maximum.
pub fn part_plaintext(n: u64, chunk: u64, limits: &StoreLimits) -> u64 {
    let grown = limits
        .part_size
        .saturating_mul(1 << (n / PARTS_PER_STEP).min(20));
    let size = grown
        .max(limits.min_part_size)
        .min(limits.max_part_size - chunk);
    (size / chunk).max(1) * chunk
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
    /// Plaintext not yet sealed.
    pending: Vec<u8>,
    next_chunk: u64,
    parts_sent: u64,
    header_sent: bool,
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
            header_sent: false,
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

    fn part_size(&self) -> usize {
        part_plaintext(self.parts_sent, self.cipher.geometry().chunk, &self.limits) as usize
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
        while self.pending.len() > self.part_size() {
            let size = self.part_size();
            // Only the tail, in a buffer of its size: a whole part buffer held while the
            // part waits for room in the queue would be one more part in memory. The next
            // write moves it into a part buffer.
            let rest = WRITE_BUFFERS.copy_of(&self.pending[size..]);
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

    /// Takes the next part's place in the object (its chunk indices, the header if it is
    /// the first) and returns the work of sealing it.
    fn seal_job(
        &mut self,
        plaintext: Vec<u8>,
        ends_file: bool,
    ) -> impl FnOnce() -> Vec<u8> + Send + 'static {
        let cipher = self.cipher.clone();
        let first = self.next_chunk;
        let chunk = cipher.geometry().chunk;
        self.next_chunk += (plaintext.len() as u64).div_ceil(chunk).max(1);
        let with_header = !self.header_sent;
        self.header_sent = true;
        self.parts_sent += 1;
        move || {
            let mut out = if plaintext.len() <= INLINE_SEAL_BYTES {
                // A small file's object, sized exactly: an idle part buffer is 8 MiB of
                // address space mapped and unmapped for each small file.
                Vec::with_capacity(cipher.geometry().stored_size(plaintext.len() as u64) as usize)
            } else if plaintext.len() <= BASE_PART as usize {
                SEALED_BUFFERS.take()
            } else {
                Vec::new()
            };
            // A reused buffer still holds its last part: sealed over, not zeroed first.
            let at = if with_header {
                cipher.header().len()
            } else {
                0
            };
            cipher.seal_at(first, &plaintext, ends_file, &mut out, at);
            out[..at].copy_from_slice(&cipher.header()[..at]);
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

    #[test]
    fn part_sizes_fit_a_tebibyte_in_s3_limits() {
        let chunk = 65536;
        let l = StoreLimits::S3;
        let mut total = 0u64;
        for n in 0..l.max_parts {
            let p = part_plaintext(n, chunk, &l);
            assert_eq!(p % chunk, 0);
            assert!(p + p / chunk * 16 >= l.min_part_size);
            assert!(p + p / chunk * 16 + 56 <= l.max_part_size);
            total += p;
        }
        assert!(total > 1 << 40, "10,000 parts hold only {total} bytes");
    }
}
