//! Decrypted chunks, kept in an LRU bounded by bytes (`--cache-size`).
//!
//! Chunks opened together from one ranged get are slices of that get's buffer (opened in
//! place, no copy per chunk). A slice keeps its whole buffer alive, so the cache charges the
//! whole buffer while any of its chunks is cached: what it counts is the memory it holds,
//! even when a few hot chunks outlive the rest of their buffer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

/// Identifies one chunk of one committed object version: `object` is unique per version the
/// vfs has opened, so a new version never sees an old version's chunks.
pub type ChunkKey = (u64, u64);

pub struct ChunkCache {
    inner: Mutex<Inner>,
    capacity: usize,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// The buffer behind cached chunks, with its size. The cache holds one `Arc` per cached
/// chunk and hands none out, so the strong count is its chunks still cached.
struct Buffer(usize);

struct Entry {
    data: Bytes,
    buffer: Arc<Buffer>,
}

struct Inner {
    lru: LruCache<ChunkKey, Entry>,
    bytes: usize,
}

impl Inner {
    /// Uncharges a removed entry's buffer if it was the buffer's last cached chunk.
    fn removed(&mut self, e: Entry) {
        if Arc::strong_count(&e.buffer) == 1 {
            self.bytes -= e.buffer.0;
        }
    }

    fn put(&mut self, key: ChunkKey, e: Entry) {
        if let Some(old) = self.lru.put(key, e) {
            self.removed(old);
        }
    }

    fn shrink_to(&mut self, target: usize) {
        while self.bytes > target {
            match self.lru.pop_lru() {
                Some((_, e)) => self.removed(e),
                None => break,
            }
        }
    }
}

impl ChunkCache {
    pub fn new(capacity_bytes: usize) -> Self {
        ChunkCache {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity: capacity_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        let found = self.inner.lock().lru.get(key).map(|e| e.data.clone());
        match &found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// Caches one chunk in a buffer of its own.
    pub fn insert(&self, key: ChunkKey, data: Bytes) {
        let len = data.len();
        self.insert_from_buffer(len, [(key, data)]);
    }

    /// Caches chunks that are slices of one buffer of `buffer_len` bytes, charged once.
    pub fn insert_from_buffer(
        &self,
        buffer_len: usize,
        chunks: impl IntoIterator<Item = (ChunkKey, Bytes)>,
    ) {
        if buffer_len > self.capacity {
            return;
        }
        let buffer = Arc::new(Buffer(buffer_len));
        let mut inner = self.inner.lock();
        inner.bytes += buffer_len;
        for (key, data) in chunks {
            let buffer = buffer.clone();
            inner.put(key, Entry { data, buffer });
        }
        // Charged above for the entries; uncharged here if none of them stayed (the `Arc`
        // held here is the last one).
        if Arc::strong_count(&buffer) == 1 {
            inner.bytes -= buffer_len;
        }
        drop(buffer);
        let cap = self.capacity;
        inner.shrink_to(cap);
    }

    /// Drops every chunk of one object version.
    pub fn forget_object(&self, object: u64) {
        let mut inner = self.inner.lock();
        let keys: Vec<ChunkKey> = inner
            .lru
            .iter()
            .filter(|(k, _)| k.0 == object)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(e) = inner.lru.pop(&k) {
                inner.removed(e);
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Shrinks to at most `target` bytes (used when memory runs short).
    pub fn shrink_to(&self, target: usize) {
        self.inner.lock().shrink_to(target);
    }
}

impl Default for ChunkCache {
    fn default() -> Self {
        ChunkCache::new(256 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_bytes() {
        let c = ChunkCache::new(10);
        c.insert((1, 0), Bytes::from(vec![0; 4]));
        c.insert((1, 1), Bytes::from(vec![0; 4]));
        assert!(c.get(&(1, 0)).is_some()); // now most recent
        c.insert((1, 2), Bytes::from(vec![0; 4]));
        assert_eq!(c.bytes(), 8);
        assert!(c.get(&(1, 1)).is_none(), "least recently used chunk stays");
        assert!(c.get(&(1, 0)).is_some());
        c.forget_object(1);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_shared_buffer_is_charged_until_its_last_chunk_goes() {
        let c = ChunkCache::new(60);
        let buf = Bytes::from(vec![7u8; 40]);
        let slice = |i: u64| buf.slice(i as usize * 10..(i as usize + 1) * 10);
        c.insert_from_buffer(40, (0..4).map(|i| ((1, i), slice(i))));
        assert_eq!(c.bytes(), 40, "the buffer, once");
        // Keep chunk 3 hot while others push the rest out: the buffer stays charged whole,
        // so only two more chunks fit beside it.
        for i in 0..5 {
            assert!(c.get(&(1, 3)).is_some());
            c.insert((2, i), Bytes::from(vec![0; 10]));
        }
        assert!(c.get(&(1, 0)).is_none());
        assert!(c.get(&(2, 2)).is_none());
        assert!(c.get(&(1, 3)).is_some());
        assert_eq!(
            c.bytes(),
            40 + 20,
            "a hot chunk pins, and is charged, its whole buffer"
        );
        // Once the hot chunk is the least recent, pressure evicts it and frees the buffer.
        for i in 5..10 {
            c.insert((2, i), Bytes::from(vec![0; 10]));
        }
        assert!(c.get(&(1, 3)).is_none());
        assert_eq!(c.bytes(), 50);
        c.forget_object(2);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_replaced_chunk_is_uncharged() {
        let c = ChunkCache::new(100);
        c.insert((1, 0), Bytes::from(vec![0; 30]));
        c.insert((1, 0), Bytes::from(vec![0; 20]));
        assert_eq!(c.bytes(), 20);
        // Too big for the cache: nothing charged.
        c.insert_from_buffer(200, [((1, 1), Bytes::from(vec![0; 10]))]);
        assert_eq!(c.bytes(), 20);
    }
}
