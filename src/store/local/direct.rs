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
//! Written by hand: no crate offers aligned-buffer direct writes of a stream.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use parking_lot::Mutex;

/// Alignment of buffers, offsets and lengths of direct writes: the largest logical block
/// size in common use (4Kn disks); 512-byte devices accept it too.
const ALIGN: usize = 4096;
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
