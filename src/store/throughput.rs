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

/// Uploads `bytes` of random data to `key` as a multipart upload of the store's part size,
/// reads it back with ranged GETs of 8 MiB, checks it, and deletes it.
pub async fn measure(
    store: Arc<dyn ObjectStore>,
    key: &str,
    bytes: u64,
) -> StoreResult<Throughput> {
    let part_size = store.limits().part_size;
    let mut part = vec![0u8; part_size as usize];
    getrandom::fill(&mut part).expect("the OS random source works");
    let part = Bytes::from(part);
    let t = Instant::now();
    let mut up = store.create_upload(key, &PutOptions::default()).await?;
    let mut sent = 0;
    while sent < bytes {
        let n = part_size.min(bytes - sent);
        up.put_part(part.slice(..n as usize)).await?;
        sent += n;
    }
    up.complete().await?;
    let put_secs = t.elapsed().as_secs_f64();
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
    while let Some(got) = gets.next().await {
        let (r, body) = got?;
        if body.len() as u64 != r.end - r.start || !is_repeated(&body, r.start, &part) {
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

/// Whether `body`, read from offset `start`, is what an object of `part` repeated holds
/// there (GET ranges need not fall on part boundaries).
fn is_repeated(body: &[u8], start: u64, part: &[u8]) -> bool {
    let mut at = (start % part.len() as u64) as usize;
    let mut rest = body;
    while !rest.is_empty() {
        let n = (part.len() - at).min(rest.len());
        if rest[..n] != part[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = 0;
    }
    true
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
        let t = measure(store.clone(), "t", 21 << 20).await.unwrap();
        assert_eq!(t.bytes, 21 << 20);
        assert!(
            store.head("t", &GetOptions::default()).await.is_err(),
            "deleted"
        );
    }

    #[test]
    fn repeated_parts_are_checked_across_their_boundaries() {
        let part = [1u8, 2, 3];
        assert!(is_repeated(&[3, 1, 2, 3, 1], 2, &part));
        assert!(!is_repeated(&[3, 1, 2, 2, 1], 2, &part));
        assert!(is_repeated(&[], 7, &part));
    }
}
