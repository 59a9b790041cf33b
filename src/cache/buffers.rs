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
//!
//! Idle buffers are not lost memory: the memory budget counts them as spent and has them
//! freed ([`release_idle`]) when a reservation needs their room, and the mount frees every
//! pool that nothing used for a while ([`trim_unused`]).

use super::upload::BASE_PART;
pub use crate::buffers::BufferPool;
use crate::buffers::GET_BUFFERS;

/// Idle 1 MiB write buffers kept.
pub const WRITE_BUFFERS_KEPT: usize = 4;
/// Idle part buffers kept, of each of the two part pools: as many as an S3 upload has
/// parts in flight and one more, so that none of them is a fresh mapping. With one kept,
/// two of every three parts of a write to Garage faulted in new pages (15 % of the mount's
/// CPU); four cost 12 % less CPU per GiB at the same peak RSS (66 MiB on S3, 55-64 local).
pub const PART_BUFFERS_KEPT: usize = 4;

/// Room for a chunk beyond a base part: a part's stored bytes are cut inside a chunk, whose
/// plaintext both parts then hold (see [`super::upload::part_stored`]).
const STRADDLE: usize = 128 << 10;

/// Capacity of the pooled part buffers: a base part's plaintext and one more FUSE write.
pub const PART_BUFFER_BYTES: usize = BASE_PART as usize + STRADDLE + (1 << 20);

/// Buffers of FUSE write requests (1 MiB, the mount's `max_write`), and of what a streaming
/// write keeps for its next part: the bytes past the part and the chunk that straddles the
/// cut (a fresh buffer for those, one part in sixteen, had added 2-4 MiB to a write's
/// peak RSS).
pub static WRITE_BUFFERS: BufferPool = BufferPool::new((1 << 20) + STRADDLE, WRITE_BUFFERS_KEPT);

/// Buffers that FUSE read replies are gathered in (up to 1 MiB, the kernel's largest read):
/// a fresh 1 MiB buffer per read cost more in page faults than the copy into it.
pub static READ_BUFFERS: BufferPool = BufferPool::new(1 << 20, WRITE_BUFFERS_KEPT);

/// Part buffers given back after sealing, for the next part of any file.
pub static PART_BUFFERS: BufferPool = BufferPool::new(PART_BUFFER_BYTES, PART_BUFFERS_KEPT);

/// Sealed parts' buffers, given back once the store has a part.
pub static SEALED_BUFFERS: BufferPool = BufferPool::new(SEALED_BUFFER_BYTES, PART_BUFFERS_KEPT);

/// Capacity of the sealed parts' buffers: a base part, and the chunk sealed whole at its end
/// before the part is cut.
pub const SEALED_BUFFER_BYTES: usize = BASE_PART as usize + STRADDLE;

/// Every pool, largest buffers first (freed first when room is needed).
static POOLS: [&BufferPool; 5] = [
    &PART_BUFFERS,
    &SEALED_BUFFERS,
    &GET_BUFFERS,
    &WRITE_BUFFERS,
    &READ_BUFFERS,
];

/// Frees idle buffers of any pool until at least `bytes` are freed or none is left.
pub fn release_idle(bytes: usize) -> usize {
    let mut freed = 0;
    for pool in POOLS {
        if freed >= bytes {
            break;
        }
        freed += pool.release(bytes - freed);
    }
    freed
}

/// Frees the idle buffers of every pool that nothing took since the last call.
pub fn trim_unused() {
    for pool in POOLS {
        pool.trim_if_unused();
    }
}
