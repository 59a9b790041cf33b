//! Decrypted chunks, kept in an LRU bounded by bytes (`--cache-size`).

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

struct Inner {
    lru: LruCache<ChunkKey, Bytes>,
    bytes: usize,
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
        let found = self.inner.lock().lru.get(key).cloned();
        match &found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    pub fn insert(&self, key: ChunkKey, data: Bytes) {
        if data.len() > self.capacity {
            return;
        }
        let mut inner = self.inner.lock();
        inner.bytes += data.len();
        if let Some(old) = inner.lru.put(key, data) {
            inner.bytes -= old.len();
        }
        while inner.bytes > self.capacity {
            match inner.lru.pop_lru() {
                Some((_, v)) => inner.bytes -= v.len(),
                None => break,
            }
        }
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
            if let Some(v) = inner.lru.pop(&k) {
                inner.bytes -= v.len();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Shrinks to at most `target` bytes (used when memory runs short).
    pub fn shrink_to(&self, target: usize) {
        let mut inner = self.inner.lock();
        while inner.bytes > target {
            match inner.lru.pop_lru() {
                Some((_, v)) => inner.bytes -= v.len(),
                None => break,
            }
        }
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
}
