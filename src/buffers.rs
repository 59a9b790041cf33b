//! Reused buffers: pools of idle buffers of one size, and `Bytes` that give their buffer
//! back to its pool when the last of them is dropped.
//!
//! Fresh from the allocator, a buffer of more than a few hundred KiB is a new mapping that
//! the kernel faults in page by page, zeroes and charges to the memory cgroup, and unmaps
//! again when it is freed (glibc's mmap threshold is fixed, see `mount::limit_heap_growth`).
//! On the bench machine that cost more than the work done in the buffer: in a cold read
//! from S3, zeroing fresh pages was a quarter of the mount's CPU and decryption a twentieth.
//! A pool keeps a few idle buffers of each size, so their memory is bounded and small; and
//! it gives them up when the memory budget needs the room ([`BufferPool::release`]) or when
//! nothing took one for a while ([`BufferPool::trim_if_unused`]), so an idle mount holds none.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

/// Bytes held by idle buffers in all pools.
static IDLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes held by idle buffers in all pools: memory the process holds that no reservation of
/// the memory budget accounts for.
pub fn idle_bytes() -> usize {
    IDLE_BYTES.load(Ordering::Relaxed)
}

/// A stack of idle buffers of at least `capacity` bytes.
pub struct BufferPool {
    capacity: usize,
    keep: usize,
    idle: Mutex<Vec<Vec<u8>>>,
    /// Whether a buffer was taken since the last [`Self::trim_if_unused`].
    used: AtomicBool,
}

impl BufferPool {
    pub const fn new(capacity: usize, keep: usize) -> BufferPool {
        BufferPool {
            capacity,
            keep,
            idle: Mutex::new(Vec::new()),
            used: AtomicBool::new(false),
        }
    }

    /// The size of the buffers this pool keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `len` bytes are worth one of this pool's buffers: they fit, and fill at least
    /// half of it (a small get in a pooled buffer would pin, and be charged for, all of it
    /// while its chunks are cached).
    pub fn suits(&self, len: usize) -> bool {
        len <= self.capacity && len >= self.capacity / 2
    }

    /// An empty buffer for `len` bytes: one of the pool's where [`Self::suits`] says so,
    /// else a new one of that size.
    pub fn for_len(&self, len: usize) -> Vec<u8> {
        if !self.suits(len) {
            return Vec::with_capacity(len);
        }
        let mut v = self.take();
        v.clear();
        v
    }

    /// A buffer with room for at least `capacity` bytes: empty, or as [`Self::give_filled`]
    /// gave it back.
    pub fn take(&self) -> Vec<u8> {
        self.used.store(true, Ordering::Relaxed);
        match self.idle.lock().pop() {
            Some(v) => {
                IDLE_BYTES.fetch_sub(v.capacity(), Ordering::Relaxed);
                v
            }
            None => Vec::with_capacity(self.capacity),
        }
    }

    /// Frees idle buffers until at least `bytes` are freed or none is left; returns the
    /// bytes freed.
    pub fn release(&self, bytes: usize) -> usize {
        let mut freed = 0;
        let mut idle = self.idle.lock();
        while freed < bytes {
            let Some(v) = idle.pop() else { break };
            freed += v.capacity();
        }
        IDLE_BYTES.fetch_sub(freed, Ordering::Relaxed);
        freed
    }

    /// Frees every idle buffer if none was taken since the last call: a pool that a burst of
    /// work filled does not hold its memory for good once the work is over.
    pub fn trim_if_unused(&self) {
        if !self.used.swap(false, Ordering::Relaxed) {
            self.release(usize::MAX);
        }
    }

    /// A buffer holding a copy of `data`, from the pool when `data` fits one.
    pub fn copy_of(&self, data: &[u8]) -> Vec<u8> {
        if data.len() > self.capacity {
            return data.to_vec();
        }
        let mut v = self.take();
        v.clear();
        v.extend_from_slice(data);
        v
    }

    /// Gives a buffer back for reuse (dropped if the pool is full or it is of another size:
    /// a buffer that grew stays out, so the pool's memory stays bounded).
    pub fn give(&self, mut v: Vec<u8>) {
        v.clear();
        self.give_filled(v);
    }

    /// [`Self::give`], keeping the contents: for a taker that overwrites them (a memset of
    /// a whole buffer saved per use).
    pub fn give_filled(&self, v: Vec<u8>) {
        if !self.keeps(v.capacity()) {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.keep {
            IDLE_BYTES.fetch_add(v.capacity(), Ordering::Relaxed);
            idle.push(v);
        }
    }

    /// `v` as `Bytes` whose buffer comes back to this pool when the last `Bytes` sharing it
    /// (slices included) is dropped.
    pub fn shared(&'static self, v: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf: v, pool: self })
    }

    /// [`Self::shared`] for a buffer of this pool's size; any other is plain `Bytes` (which,
    /// unlike an owned buffer, can be taken back as mutable without a copy).
    pub fn bytes(&'static self, v: Vec<u8>) -> Bytes {
        if self.keeps(v.capacity()) {
            self.shared(v)
        } else {
            Bytes::from(v)
        }
    }

    /// `v` as `Bytes` that [`Self::reclaim`] can take back as a whole buffer: a get's
    /// ciphertext, which the reader then opens where it lies. (Bytes that give their buffer
    /// back to the pool on drop, as [`Self::shared`] makes, cannot be made mutable again;
    /// these, dropped unreclaimed, free their buffer instead.)
    pub fn reclaimable(&self, v: Vec<u8>) -> Bytes {
        Bytes::from(v)
    }

    /// The buffer of `bytes` to change in place, if nothing else holds it (see
    /// [`Self::reclaimable`]); else a copy of them, in one of the pool's buffers if they fit.
    pub fn reclaim(&self, bytes: Bytes) -> BytesMut {
        bytes.try_into_mut().unwrap_or_else(|shared| {
            Bytes::from(self.copy_of(&shared))
                .try_into_mut()
                .expect("a new buffer has no other holder")
        })
    }

    /// [`Self::shared`] for a reclaimed buffer (see [`Self::reclaim`]).
    pub fn shared_mut(&'static self, buf: BytesMut) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self })
    }

    /// Gives a reclaimed buffer back: all of it, whatever part of it `buf` still covers.
    pub fn give_mut(&self, mut buf: BytesMut) {
        // Emptied first: the conversion then moves no bytes to the front of the buffer.
        buf.clear();
        self.give(Vec::from(buf));
    }

    fn keeps(&self, capacity: usize) -> bool {
        (self.capacity..=2 * self.capacity).contains(&capacity)
    }
}

/// A buffer that `Bytes` own and give back to its pool when the last of them is dropped:
/// a whole one ([`BufferPool::shared`]) or a reclaimed one ([`BufferPool::shared_mut`]).
trait PoolBuffer: AsRef<[u8]> + Default + Send + 'static {
    fn give_back(self, pool: &BufferPool);
}

impl PoolBuffer for Vec<u8> {
    fn give_back(self, pool: &BufferPool) {
        pool.give_filled(self);
    }
}

impl PoolBuffer for BytesMut {
    fn give_back(self, pool: &BufferPool) {
        pool.give_mut(self);
    }
}

struct Pooled<B: PoolBuffer> {
    buf: B,
    pool: &'static BufferPool,
}

impl<B: PoolBuffer> AsRef<[u8]> for Pooled<B> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref()
    }
}

impl<B: PoolBuffer> Drop for Pooled<B> {
    fn drop(&mut self) {
        std::mem::take(&mut self.buf).give_back(self.pool);
    }
}

/// Buffers of store gets: a read-ahead segment of ciphertext (8 MiB of plaintext and its
/// tags), with room for the local store's whole checksum blocks around it and the
/// alignment of a direct read. Each holds chunks in the chunk cache until they are
/// evicted, then serves the next get.
pub const GET_BUFFER_BYTES: usize = (8 << 20) + (256 << 10);
/// Idle get buffers kept: gets take them as fast as the cache gives them back.
pub const GET_BUFFERS_KEPT: usize = 4;
pub static GET_BUFFERS: BufferPool = BufferPool::new(GET_BUFFER_BYTES, GET_BUFFERS_KEPT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_stays_bounded() {
        let pool = BufferPool::new(1024, 2);
        let a = pool.copy_of(b"abc");
        assert_eq!(a, b"abc");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the same buffer came back");
        // Too large to copy into a pooled buffer: a plain copy.
        assert_eq!(pool.copy_of(&[7u8; 4096]).len(), 4096);
        // At most two idle buffers; odd sizes are not kept.
        for _ in 0..5 {
            pool.give(Vec::with_capacity(1024));
        }
        pool.give(Vec::with_capacity(10));
        assert_eq!(pool.idle.lock().len(), 2);
    }

    /// A buffer of `pool` holding `len` bytes `byte`, and where it is.
    fn taken_and_filled(pool: &BufferPool, byte: u8, len: usize) -> (Vec<u8>, *const u8) {
        let mut v = pool.take();
        v.clear();
        v.resize(len, byte);
        let ptr = v.as_ptr();
        (v, ptr)
    }

    /// Drops `whole` while a slice of it lives (the buffer stays out of the pool), then the
    /// slice: the buffer at `ptr` is the pool's next. Returns the slice's bytes and the buffer.
    fn back_after_last_slice(
        pool: &BufferPool,
        whole: Bytes,
        ptr: *const u8,
    ) -> (Vec<u8>, Vec<u8>) {
        let part = whole.slice(4..8);
        drop(whole);
        assert!(pool.idle.lock().is_empty(), "a slice still holds it");
        let bytes = part.to_vec();
        drop(part);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "the same buffer came back");
        (bytes, again)
    }

    #[test]
    fn shared_bytes_give_their_buffer_back_when_the_last_slice_goes() {
        static POOL: BufferPool = BufferPool::new(64, 2);
        let (v, ptr) = taken_and_filled(&POOL, 9, 40);
        let (part, again) = back_after_last_slice(&POOL, POOL.shared(v), ptr);
        assert_eq!(part, [9u8; 4]);
        assert_eq!(again.len(), 40, "with its contents, to be overwritten");
        // A small get gets a buffer of its own size, plain Bytes, never a pooled one.
        assert!(!POOL.suits(31) && POOL.suits(32) && POOL.suits(64) && !POOL.suits(65));
        assert_eq!(POOL.for_len(8).capacity(), 8);
        let small = POOL.bytes(POOL.for_len(8));
        assert!(small.try_into_mut().is_ok(), "mutable again without a copy");
    }

    #[test]
    fn a_reclaimed_buffer_is_changed_in_place_and_comes_back_whole() {
        static POOL: BufferPool = BufferPool::new(64, 2);
        let (v, ptr) = taken_and_filled(&POOL, 1, 48);
        // A get hands out a slice of its buffer (the local store's checksum blocks around it).
        let got = POOL.reclaimable(v).slice(8..40);
        let mut buf = POOL.reclaim(got);
        assert_eq!(buf.as_ptr(), ptr.wrapping_add(8), "in place: no copy");
        buf.fill(2);
        let (part, again) = back_after_last_slice(&POOL, POOL.shared_mut(buf), ptr);
        assert_eq!(part, [2u8; 4]);
        assert!(again.capacity() >= 64, "the whole buffer");
        // Held elsewhere too: a copy, which leaves the other holder's bytes alone.
        let (v, _) = taken_and_filled(&POOL, 3, 40);
        let got = POOL.reclaimable(v);
        let other = got.clone();
        let mut copy = POOL.reclaim(got);
        assert_ne!(copy.as_ptr(), other.as_ptr());
        copy.fill(4);
        assert_eq!(&other[..], &[3u8; 40]);
        POOL.give_mut(copy);
        assert_eq!(
            POOL.idle.lock().len(),
            1,
            "the copy's pooled buffer came back"
        );
    }

    #[test]
    fn idle_buffers_are_released_on_demand_and_when_unused() {
        let pool = BufferPool::new(1000, 3);
        for _ in 0..3 {
            pool.give(Vec::with_capacity(1000));
        }
        assert_eq!(pool.idle.lock().len(), 3);
        // Asked for 1,500 bytes: two buffers go, one stays.
        assert_eq!(pool.release(1500), 2000);
        assert_eq!(pool.idle.lock().len(), 1);
        // Taken since the last trim: kept; then a trim with no take in between frees it.
        let v = pool.take();
        pool.give(v);
        pool.trim_if_unused();
        assert_eq!(pool.idle.lock().len(), 1);
        pool.trim_if_unused();
        assert!(pool.idle.lock().is_empty());
        assert_eq!(pool.release(1), 0, "nothing left to free");
    }
}
