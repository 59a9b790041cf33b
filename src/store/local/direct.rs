//! The data file of a large put, written with `O_DIRECT` where the filesystem allows it.
//!
//! Copying a large upload into the page cache cost more CPU than sealing it (a quarter of
//! the mount's time in a 1 GiB write) and left dirty pages to bound and write back; with
//! `O_DIRECT` the disk reads the bytes from our buffer instead. Bytes are gathered in an
//! aligned buffer and written in whole buffers; the last, partial one is written padded to
//! the alignment and the file is cut to its length before the fsync. Filesystems without
//! `O_DIRECT` (tmpfs on older kernels, some FUSE and network filesystems) get buffered
//! writes with the old bound on dirty data.
//!
//! Large gets of a data file the page cache does not hold are read with `O_DIRECT` too
//! ([`read`]), into an aligned buffer inside an ordinary `Vec` that `Bytes` can own.
//!
//! Written by hand: no crate offers aligned-buffer direct writes of a stream.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use parking_lot::Mutex;

use crate::buffers::GET_BUFFERS;

/// Alignment of buffers, offsets and lengths of direct reads and writes: the largest logical
/// block size in common use (4Kn disks); 512-byte devices accept it too.
pub const ALIGN: usize = 4096;
/// Bytes gathered before each direct write.
const BUFFER: usize = 1 << 20;
/// Dirty data a buffered write may leave in the page cache before it waits for writeback.
const DIRTY_WINDOW: u64 = 32 << 20;

/// A zeroed, aligned heap buffer.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory, only reached through &self/&mut self.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn new(size: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(size, ALIGN).expect("a valid buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialized (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

enum Mode {
    /// Gathering into `buf` (`len` bytes so far), which goes to `offset` in the file.
    Direct {
        buf: AlignedBuf,
        len: usize,
        offset: u64,
    },
    /// Ordinary writes; `written` bytes so far.
    Buffered { written: u64 },
}

/// A data file being written. Appends are serialized by the caller (one upload writes its
/// parts in order); the lock only lets the replicas' threads share the handle.
pub struct DataFile {
    file: File,
    mode: Mutex<Mode>,
}

impl DataFile {
    /// Creates `path` (which must not exist).
    pub fn create(path: &Path) -> io::Result<DataFile> {
        let open = |flags| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        match open(libc::O_DIRECT) {
            Ok(file) => Ok(DataFile {
                file,
                mode: Mutex::new(Mode::Direct {
                    buf: AlignedBuf::new(BUFFER),
                    len: 0,
                    offset: 0,
                }),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(DataFile {
                file: open(0)?,
                mode: Mutex::new(Mode::Buffered { written: 0 }),
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(*self.mode.lock(), Mode::Direct { .. })
    }

    /// Appends bytes.
    pub fn append(&self, mut data: &[u8]) -> io::Result<()> {
        let mut mode = self.mode.lock();
        loop {
            match &mut *mode {
                Mode::Buffered { written } => {
                    let start = *written;
                    (&self.file).write_all(data)?;
                    *written += data.len() as u64;
                    bound_dirty_data(&self.file, start, *written);
                    return Ok(());
                }
                Mode::Direct { buf, len, offset } => {
                    while !data.is_empty() {
                        let take = (BUFFER - *len).min(data.len());
                        buf.as_mut_slice()[*len..*len + take].copy_from_slice(&data[..take]);
                        *len += take;
                        data = &data[take..];
                        if *len == BUFFER {
                            match self.file.write_all_at(buf.as_slice(), *offset) {
                                Ok(()) => {
                                    *offset += BUFFER as u64;
                                    *len = 0;
                                }
                                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                                    // The filesystem took O_DIRECT at open but wants other
                                    // alignments: go on buffered from here.
                                    let (pending, at) = (buf.as_slice()[..*len].to_vec(), *offset);
                                    self.to_buffered(&mut mode, &pending, at)?;
                                    break;
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    if matches!(*mode, Mode::Direct { .. }) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Switches to buffered writes, writing `pending` (gathered, not yet written) at `at`.
    fn to_buffered(&self, mode: &mut Mode, pending: &[u8], at: u64) -> io::Result<()> {
        set_direct(&self.file, false)?;
        self.file.write_all_at(pending, at)?;
        *mode = Mode::Buffered {
            written: at + pending.len() as u64,
        };
        // Appends in buffered mode go through the file position.
        use std::io::Seek;
        (&self.file).seek(io::SeekFrom::Start(at + pending.len() as u64))?;
        Ok(())
    }

    /// Appends `tail`, writes what is gathered and makes the file durable.
    pub fn finish(&self, tail: &[u8]) -> io::Result<()> {
        self.append(tail)?;
        let mut mode = self.mode.lock();
        if let Mode::Direct { buf, len, offset } = &mut *mode
            && *len > 0
        {
            let padded = len.div_ceil(ALIGN) * ALIGN;
            buf.as_mut_slice()[*len..padded].fill(0);
            let end = *offset + *len as u64;
            match self.file.write_all_at(&buf.as_slice()[..padded], *offset) {
                Ok(()) => self.file.set_len(end)?,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let (pending, at) = (buf.as_slice()[..*len].to_vec(), *offset);
                    self.to_buffered(&mut mode, &pending, at)?;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.sync_all()
    }
}

/// Whether the page cache holds all of `len` bytes at `start` (a file read back soon after
/// it was written: copying it from there beats the disk). Asked with cachestat(2), which
/// neither reads nor starts a read-ahead; false where the kernel has none (before 6.5).
/// Hand-written: libc has no wrapper for it on x86_64.
pub fn all_cached(file: &File, start: u64, len: usize) -> bool {
    /// The syscall's number, the same on every architecture since 6.5.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range {
        off: start,
        len: len as u64,
    };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live values of the layouts the syscall takes.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    // Counted in pages: 4 KiB here (larger pages only make the answer "no": a direct read).
    r == 0 && stat.nr_cache >= len.div_ceil(4096) as u64
}

/// A direct read of `want` bytes at the aligned `start`, or `None` where the filesystem or
/// device refuses one (tmpfs, odd block sizes): the caller reads through the page cache.
/// Hand-written: no crate does an aligned read into a buffer that `Bytes` can then own.
pub fn read(file: &File, start: u64, want: usize) -> io::Result<Option<(Vec<u8>, usize)>> {
    // The descriptor is this read's own (opened per get), so switching it to direct and back
    // changes nothing for anyone else.
    if set_direct(file, true).is_err() {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let len = want.next_multiple_of(ALIGN);
    let mut buf = GET_BUFFERS.for_len(len + ALIGN);
    let base = buf.as_ptr().align_offset(ALIGN);
    // The bytes before the aligned start are never read, but a Vec's bytes must be set.
    for b in &mut buf.spare_capacity_mut()[..base] {
        b.write(0);
    }
    let dst = buf.as_mut_ptr().wrapping_add(base);
    let mut done = 0;
    let result = loop {
        if done >= want {
            break Ok(());
        }
        // SAFETY: the destination lies in `buf`'s allocation: base + len <= its capacity.
        let n = unsafe {
            libc::pread(
                fd,
                dst.wrapping_add(done).cast(),
                len - done,
                (start + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break Err(e);
                }
            }
            0 => break Ok(()),
            n => done += n as usize,
        }
    };
    // Best effort: the descriptor is closed after this get anyway.
    let _ = set_direct(file, false);
    match result {
        Ok(()) => {
            // SAFETY: bytes [0, base) were zeroed and [base, base + done) read.
            unsafe { buf.set_len(base + done.min(want)) };
            Ok(Some((buf, base)))
        }
        // An alignment this device refuses, or a short read that left the next offset
        // unaligned: read it the ordinary way.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts writeback of bytes `start..end` of a file being written and waits for what is more
/// than [`DIRTY_WINDOW`] behind. Without this, a large upload leaves gigabytes of dirty pages
/// until its final fsync, and the kernel's dirty limit then stalls every writer on the
/// machine (other mounts' small fsyncs included). Failures here are only hints: the fsync at
/// commit is what makes the data durable and reports errors.
fn bound_dirty_data(f: &File, start: u64, end: u64) {
    let fd = f.as_raw_fd();
    // SAFETY: sync_file_range on an open descriptor with in-range offsets.
    unsafe {
        libc::sync_file_range(
            fd,
            start as i64,
            (end - start) as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        if end > DIRTY_WINDOW {
            let upto = end - DIRTY_WINDOW;
            libc::sync_file_range(
                fd,
                0,
                upto as i64,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn any_sizes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for (i, sizes) in [
            vec![0usize],
            vec![1],
            vec![4095, 1, 4097],
            vec![BUFFER - 1, 2, 3],
            vec![BUFFER, BUFFER],
            vec![3 * BUFFER + 12345],
            vec![100; 500],
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let f = DataFile::create(&path).unwrap();
            let all = bytes(sizes.iter().sum::<usize>() + 77);
            let mut off = 0;
            for n in &sizes {
                f.append(&all[off..off + n]).unwrap();
                off += n;
            }
            f.finish(&all[off..]).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), all, "sizes {sizes:?}");
        }
    }

    #[test]
    fn tmpfs_and_other_filesystems_fall_back_to_buffered_writes() {
        // /dev/shm is tmpfs: O_DIRECT is refused there on older kernels and taken on newer.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let path = dir.path().join("f");
        let f = DataFile::create(&path).unwrap();
        let all = bytes(BUFFER + 999);
        f.append(&all[..1000]).unwrap();
        f.finish(&all[1000..]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), all);
    }
}
