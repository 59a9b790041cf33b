//! Plain PUT and GET throughput of a backend through the store layer alone (no FUSE, no
//! encryption): the ceiling the benchmark compares mounts with (`coffer store-throughput`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;

use super::{GetOptions, ObjectStore, PutOptions, StoreResult};

/// Ranged-GET size and GETs in flight: what a mount uses for a large file (parts are the
/// store's own part size, as a mount's are).
const GET_SIZE: u64 = 8 << 20;
const GETS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bytes: u64,
    pub put_secs: f64,
    pub get_secs: f64,
}

impl Throughput {
    pub fn put_mbps(&self) -> f64 {
        self.bytes as f64 / self.put_secs / 1e6
    }
    pub fn get_mbps(&self) -> f64 {
        self.bytes as f64 / self.get_secs / 1e6
    }
}

/// Every block of this many bytes of the measured object is unique: it starts with its own
/// offset. A server that stores blocks by their hash (Garage does, by 1 MiB block of each
/// part) would otherwise keep one copy of a repeated part, write almost nothing, and serve
/// the reads from the few blocks it kept in memory: a ceiling no mount writing ciphertext
/// could approach (a repeated 5 MiB part measured 350 MB/s of PUT on Garage, where the
/// server's own copy of unique blocks to its disk was a third of its CPU).
const STAMP_EVERY: u64 = 4096;

/// Uploads `bytes` of data that no two blocks share to `key` as a multipart upload of the
/// store's part size, runs `before_get` (which may drop the page cache, so the reads are
/// cold as a mount's cold read is), reads it back with ranged GETs of 8 MiB, checks it, and
/// deletes it.
pub async fn measure(
    store: Arc<dyn ObjectStore>,
    key: &str,
    bytes: u64,
    before_get: impl FnOnce() -> std::io::Result<()>,
) -> StoreResult<Throughput> {
    let part_size = store.limits().part_size;
    let mut base = vec![0u8; part_size as usize];
    getrandom::fill(&mut base).expect("the OS random source works");
    let mut spare: Option<Vec<u8>> = None;
    let t = Instant::now();
    let mut up = store.create_upload(key, &PutOptions::default()).await?;
    let mut sent = 0;
    while sent < bytes {
        let n = part_size.min(bytes - sent) as usize;
        let mut part = spare.take().unwrap_or_default();
        part.resize(n, 0);
        fill(&mut part, sent, &base);
        let part = Bytes::from(part);
        up.put_part(part.clone()).await?;
        // The store is done with the part: its buffer makes the next one.
        spare = part.try_into_mut().ok().map(Vec::from);
        sent += n as u64;
    }
    up.complete().await?;
    let put_secs = t.elapsed().as_secs_f64();
    before_get().map_err(|e| super::StoreError::io(key, "before the reads", e))?;
    let t = Instant::now();
    let ranges: Vec<_> = (0..bytes.div_ceil(GET_SIZE))
        .map(|i| i * GET_SIZE..((i + 1) * GET_SIZE).min(bytes))
        .collect();
    let store2 = store.clone();
    let mut gets = futures::stream::iter(ranges)
        .map(|r| {
            let store = store2.clone();
            async move {
                store
                    .get(key, Some(r.clone()), &GetOptions::default())
                    .await
                    .map(|g| (r, g.body))
            }
        })
        .buffered(GETS_IN_FLIGHT);
    let mut expected = Vec::new();
    while let Some(got) = gets.next().await {
        let (r, body) = got?;
        expected.resize((r.end - r.start) as usize, 0);
        fill(&mut expected, r.start, &base);
        if body[..] != expected[..] {
            return Err(super::StoreError::corrupt(key, "read back different bytes"));
        }
    }
    let get_secs = t.elapsed().as_secs_f64();
    store.delete(key).await?;
    Ok(Throughput {
        bytes,
        put_secs,
        get_secs,
    })
}

/// Fills `buf` with the measured object's bytes from offset `start`: `base` repeated, with
/// every [`STAMP_EVERY`]-byte block starting with its offset (as far as `buf` holds it).
fn fill(buf: &mut [u8], start: u64, base: &[u8]) {
    let mut at = (start % base.len() as u64) as usize;
    let mut done = 0;
    while done < buf.len() {
        let n = (base.len() - at).min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&base[at..at + n]);
        done += n;
        at = 0;
    }
    // Every stamp that overlaps `buf`, the one it starts inside of too.
    let end = start + buf.len() as u64;
    let mut block = start / STAMP_EVERY * STAMP_EVERY;
    while block < end {
        let (from, to) = (block.max(start), (block + 8).min(end));
        if from < to {
            let stamp = block.to_le_bytes();
            buf[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&stamp[(from - block) as usize..(to - block) as usize]);
        }
        block += STAMP_EVERY;
    }
}

/// Writes the dirty pages out and drops the page cache (root only), so that the reads after
/// it come from the disk.
pub fn drop_page_cache() -> std::io::Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// The in-memory store has S3's 5 MiB parts, which 8 MiB GETs straddle (this panicked
    /// once parts stopped being 8 MiB).
    #[tokio::test]
    async fn measures_a_store_whose_parts_are_not_the_get_size() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(false));
        assert_ne!(store.limits().part_size, GET_SIZE);
        let t = measure(store.clone(), "t", 21 << 20, || Ok(()))
            .await
            .unwrap();
        assert_eq!(t.bytes, 21 << 20);
        assert!(
            store.head("t", &GetOptions::default()).await.is_err(),
            "deleted"
        );
    }

    #[test]
    fn no_two_blocks_of_the_object_are_alike_and_any_range_is_the_same_bytes() {
        let base: Vec<u8> = (0..3 * STAMP_EVERY as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut whole = vec![0u8; 10 * STAMP_EVERY as usize + 100];
        fill(&mut whole, 0, &base);
        let blocks: std::collections::HashSet<&[u8]> = whole.chunks(STAMP_EVERY as usize).collect();
        assert_eq!(blocks.len(), whole.len().div_ceil(STAMP_EVERY as usize));
        // A range starting anywhere (inside a stamp too) is the same bytes as in the whole.
        for start in [0usize, 1, 5, 4095, 4096, 4100, 12_290] {
            let mut part = vec![0u8; 9_000];
            fill(&mut part, start as u64, &base);
            assert!(part[..] == whole[start..start + 9_000], "from {start}");
        }
    }

    #[tokio::test]
    async fn the_hook_runs_between_the_upload_and_the_reads() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(false));
        let seen = std::sync::Mutex::new(None);
        measure(store.clone(), "t", 6 << 20, || {
            *seen.lock().unwrap() = Some(futures::executor::block_on(
                store.head("t", &GetOptions::default()),
            ));
            Ok(())
        })
        .await
        .unwrap();
        let head = seen.lock().unwrap().take().expect("the hook ran");
        assert_eq!(head.unwrap().size, 6 << 20, "after the upload completed");
        let failing = measure(store.clone(), "u", 1 << 20, || {
            Err(std::io::Error::other("no permission"))
        })
        .await;
        assert!(failing.is_err(), "a failing hook fails the measurement");
    }
}
