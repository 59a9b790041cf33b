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

pub use crate::buffers::BufferPool;

/// Idle 1 MiB write buffers kept.
pub const WRITE_BUFFERS_KEPT: usize = 4;
/// Idle part buffers kept.
pub const PART_BUFFERS_KEPT: usize = 1;

/// Buffers of FUSE write requests (1 MiB, the mount's `max_write`).
pub static WRITE_BUFFERS: BufferPool = BufferPool::new(1 << 20, WRITE_BUFFERS_KEPT);

/// Buffers that FUSE read replies are gathered in (up to 1 MiB, the kernel's largest read):
/// a fresh 1 MiB buffer per read cost more in page faults than the copy into it.
pub static READ_BUFFERS: BufferPool = BufferPool::new(1 << 20, WRITE_BUFFERS_KEPT);
