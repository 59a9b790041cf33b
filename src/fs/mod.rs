//! The FUSE adapter: maps each kernel request to a vfs call, run on the FUSE thread up to its
//! first wait and on the tokio runtime from there, so that no FUSE thread waits on a remote
//! store.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::debug;

use crate::cache::buffers::{READ_BUFFERS, WRITE_BUFFERS};
use crate::error::FsError;
use crate::vfs::{Attr, Kind, SetAttr, Vfs};

/// How long the kernel may cache attributes and entries. Every change goes through this
/// mount (the local store is mounted by one process at a time), so a short TTL is only a
/// bound on staleness for other mounts of a shared bucket.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u64 = 4096;

pub struct CofferFs {
    vfs: Arc<Vfs>,
    rt: Handle,
}

impl CofferFs {
    pub fn new(vfs: Arc<Vfs>, rt: Handle) -> Self {
        CofferFs { vfs, rt }
    }

    /// Runs a request's vfs call on this FUSE thread up to its first wait, and on the runtime
    /// from there. Most requests never wait (the answer is in memory, or the local store
    /// answers at once on this thread, see [`crate::blocking`]) and are answered here: two
    /// thread switches fewer than a hand-off to a worker, and for a small file's create,
    /// write, flush and release, most of their latency. A call that does wait moves to the
    /// runtime as it is, not started again, and this thread goes back to the kernel.
    fn run<F>(&self, f: impl FnOnce(Arc<Vfs>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut call = Box::pin(f(self.vfs.clone()));
        let _runtime = self.rt.enter();
        // A no-op waker: if the call waits, the runtime polls it again as soon as it is
        // spawned, registering its own waker then.
        let mut cx = Context::from_waker(Waker::noop());
        if crate::blocking::allowed_here(|| call.as_mut().poll(&mut cx)).is_pending() {
            self.rt.spawn(call);
        }
    }

    /// [`Self::run`] of `call`, whose result `done` sends.
    fn answer<T, F>(
        &self,
        call: impl FnOnce(Arc<Vfs>) -> F + Send + 'static,
        done: impl FnOnce(T) + Send + 'static,
    ) where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.run(|vfs| async move { done(call(vfs).await) });
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_written(reply: ReplyWrite, r: Result<u32, FsError>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<crate::vfs::Entry, FsError>) {
    match r {
        Ok(e) => reply.entry(&TTL, &file_attr(e.ino, &e.attr), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn name_str(name: &OsStr) -> Result<String, Errno> {
    match std::str::from_utf8(name.as_bytes()) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => {
            debug!("refusing a name that is not UTF-8: {name:?}");
            Err(Errno::EINVAL)
        }
    }
}

pub fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    let kind = match a.kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(BLOCK) * (BLOCK / 512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind,
        perm: a.perm as u16,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 64 * 1024,
        flags: 0,
    }
}

fn time_of(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for CofferFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let vfs = self.vfs.clone();
        if let Err(e) = self.rt.block_on(vfs.flush_everything()) {
            tracing::error!("flushing at unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.answer(
            move |vfs| async move { vfs.lookup(parent.0, &name).await },
            |r| reply_entry(reply, r),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.answer(
            move |vfs| async move { vfs.getattr(ino.0).await },
            move |r| match r {
                Ok(a) => reply.attr(&TTL, &file_attr(ino.0, &a)),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            mtime: mtime.map(time_of),
            ctime,
        };
        self.run(|vfs| async move {
            match vfs.setattr(ino.0, s).await {
                Ok(a) => reply.attr(&TTL, &file_attr(ino.0, &a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(|vfs| async move {
            match vfs.readlink(ino.0).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Device nodes, fifos and sockets have no object form; regular files come by create.
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.run(|vfs| async move {
            let made = vfs.mkdir(parent.0, &name, mode & !umask & 0o7777, uid, gid);
            reply_entry(reply, made.await)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(|vfs| async move { reply_empty(reply, vfs.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.run(|vfs| async move { reply_empty(reply, vfs.rmdir(parent.0, &name).await) });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = match (name_str(link_name), name_str(target.as_os_str())) {
            (Ok(n), Ok(t)) => (n, t),
            _ => return reply.error(Errno::EINVAL),
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.run(|vfs| async move {
            reply_entry(reply, vfs.symlink(parent.0, &name, &target, uid, gid).await)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::EINVAL),
        };
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.run(|vfs| async move {
            match vfs
                .rename(parent.0, &name, newparent.0, &newname, noreplace)
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // One object per file leaves no place for a second name (documented).
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let pid = req.pid();
        self.run(|vfs| async move {
            match vfs.open_file(ino.0, truncate).await {
                Ok(o) => {
                    vfs.set_handle_owner(o.fh, pid);
                    let flags = if o.keep_cache {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(o.fh), flags)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(|vfs| async move {
            match vfs.read(ino.0, offset, size).await {
                Ok(d) => {
                    reply.data(&d);
                    READ_BUFFERS.give(d);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The ticket is taken here, in arrival order, before the task may be reordered.
        let ticket = self.vfs.write_ticket(ino.0);
        if let Some(result) = self.vfs.try_write_now(ino.0, offset, data, &ticket) {
            drop(ticket);
            return reply_written(reply, result);
        }
        let data = WRITE_BUFFERS.copy_of(data);
        self.run(|vfs| async move {
            let result = vfs.write_in_order(ino.0, offset, &data, ticket).await;
            WRITE_BUFFERS.give(data);
            reply_written(reply, result);
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let pid = req.pid();
        self.run(|vfs| async move { reply_empty(reply, vfs.flush_from(ino.0, fh.0, pid).await) });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run(|vfs| async move { reply_empty(reply, vfs.release(ino.0, fh.0).await) });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run(|vfs| async move { reply_empty(reply, vfs.fsync(ino.0).await) });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(|vfs| async move {
            match vfs.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.vfs.dir_entries(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let parent = self.vfs.parent_of(ino.0);
        let dots = [(ino.0, "."), (parent, "..")];
        let mut idx = offset as usize;
        while idx < entries.len() + 2 {
            let full = if idx < 2 {
                reply.add(
                    INodeNo(dots[idx].0),
                    (idx + 1) as u64,
                    FileType::Directory,
                    dots[idx].1,
                )
            } else {
                let (cino, name, attr) = &entries[idx - 2];
                reply.add(
                    INodeNo(*cino),
                    (idx + 1) as u64,
                    file_attr(*cino, attr).kind,
                    name,
                )
            };
            if full {
                break;
            }
            idx += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.vfs.dir_entries(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut idx = offset as usize;
        // `.` and `..` are not looked up by the kernel: they carry no entry reference.
        while idx < entries.len() + 2 {
            let full = if idx < 2 {
                let target = if idx == 0 {
                    ino.0
                } else {
                    self.vfs.parent_of(ino.0)
                };
                let a = Attr::new(Kind::Dir, 0o755, 0, 0);
                let mut fa = file_attr(target, &a);
                fa.ino = INodeNo(target);
                reply.add(
                    INodeNo(target),
                    (idx + 1) as u64,
                    if idx == 0 { "." } else { ".." },
                    &Duration::ZERO,
                    &fa,
                    Generation(0),
                )
            } else {
                let (cino, name, attr) = &entries[idx - 2];
                let current = self.vfs.current_attr(*cino);
                let attr = current.as_ref().unwrap_or(attr);
                // An entry whose attributes failed to load is not cached: the kernel looks
                // it up again, and that lookup reports the error.
                let ttl = if self.vfs.attr_known(*cino) {
                    TTL
                } else {
                    Duration::ZERO
                };
                let full = reply.add(
                    INodeNo(*cino),
                    (idx + 1) as u64,
                    name,
                    &ttl,
                    &file_attr(*cino, attr),
                    Generation(0),
                );
                if !full {
                    self.vfs.add_lookup(*cino);
                }
                full
            };
            if full {
                break;
            }
            idx += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.vfs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run(|vfs| async move { reply_empty(reply, vfs.fsyncdir(ino.0).await) });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(|vfs| async move {
            let (total, free) = vfs.store().space().await.unwrap_or((1 << 50, 1 << 50));
            let bs = BLOCK;
            reply.statfs(
                total / bs,
                free / bs,
                free / bs,
                1 << 32,
                1 << 32,
                bs as u32,
                255,
                bs as u32,
            );
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let value = value.to_vec();
        self.run(|vfs| async move {
            reply_empty(reply, vfs.setxattr(ino.0, &name, &value, flags).await)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(_) => return reply.error(Errno::from_i32(libc::ENODATA)),
        };
        self.answer(
            move |vfs| async move { vfs.getxattr(ino.0, &name).await },
            move |r| match r {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Ok(v) => reply.data(&v),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.run(|vfs| async move {
            match vfs.listxattr(ino.0).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(n.as_bytes());
                        buf.push(0);
                    }
                    if size == 0 {
                        reply.size(buf.len() as u32)
                    } else if buf.len() > size as usize {
                        reply.error(Errno::ERANGE)
                    } else {
                        reply.data(&buf)
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(_) => return reply.error(Errno::from_i32(libc::ENODATA)),
        };
        self.run(|vfs| async move { reply_empty(reply, vfs.removexattr(ino.0, &name).await) });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Regular files answer no ioctls (isatty() and friends ask).
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let (uid, gid, pid) = (req.uid(), req.gid(), req.pid());
        let vfs = self.vfs.clone();
        self.answer(
            move |vfs| async move {
                vfs.create(parent.0, &name, mode & !umask & 0o7777, uid, gid)
                    .await
            },
            move |r| match r {
                Ok((e, fh)) => {
                    vfs.set_handle_owner(fh, pid);
                    reply.created(
                        &TTL,
                        &file_attr(e.ino, &e.attr),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }
}
