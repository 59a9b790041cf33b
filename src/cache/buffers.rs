//! Reused buffers for the write path.
//!
//! Every 1 MiB FUSE write is copied out of fuser's buffer before its task runs, every read
//! reply is gathered from cached chunks into one buffer, and every
//! 8 MiB part gathers its plaintext in a buffer of its own. Fresh from the allocator, each
//! such buffer is a new mapping that the kernel faults in page by page, zeroes and charges
//! to the memory cgroup: copying a 1 MiB write took 0.5 ms instead of 0.05, and that, not
//! sealing or the disk, bounded a sequential write. Keeping a few of each size for reuse
//! costs at most [`WRITE_BUFFERS_KEPT`] MiB and [`PART_BUFFERS_KEPT`] parts of idle memory,
//! where telling the allocator to keep everything it frees had cost a hundred MiB or more.

use parking_lot::Mutex;

/// Idle 1 MiB write buffers kept.
pub const WRITE_BUFFERS_KEPT: usize = 4;
/// Idle part buffers kept.
pub const PART_BUFFERS_KEPT: usize = 1;

/// A stack of idle buffers of at least `capacity` bytes.
pub struct BufferPool {
    capacity: usize,
    keep: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub const fn new(capacity: usize, keep: usize) -> BufferPool {
        BufferPool {
            capacity,
            keep,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A buffer with room for at least `capacity` bytes: empty, or as [`Self::give_filled`]
    /// gave it back.
    pub fn take(&self) -> Vec<u8> {
        match self.idle.lock().pop() {
            Some(v) => v,
            None => Vec::with_capacity(self.capacity),
        }
    }

    /// A buffer holding a copy of `data`, from the pool when `data` fits one.
    pub fn copy_of(&self, data: &[u8]) -> Vec<u8> {
        if data.len() > self.capacity {
            return data.to_vec();
        }
        let mut v = self.take();
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
        if v.capacity() < self.capacity || v.capacity() > 2 * self.capacity {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.keep {
            idle.push(v);
        }
    }
}

/// Buffers of FUSE write requests (1 MiB, the mount's `max_write`).
pub static WRITE_BUFFERS: BufferPool = BufferPool::new(1 << 20, WRITE_BUFFERS_KEPT);

/// Buffers that FUSE read replies are gathered in (up to 1 MiB, the kernel's largest read):
/// a fresh 1 MiB buffer per read cost more in page faults than the copy into it.
pub static READ_BUFFERS: BufferPool = BufferPool::new(1 << 20, WRITE_BUFFERS_KEPT);

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
}
