//! Model-based tests: random sequences of create, write at offset, truncate, rename, unlink,
//! mkdir, rmdir and read, run (1) against the vfs over the memory store and an in-memory
//! model, with remounts between them, and (2) through a real mount and on a tmpfs, which
//! must agree operation by operation.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use coffer::store::ObjectStore;
use coffer::store::memory::MemoryStore;
use coffer::vfs::{Kind, ROOT, Vfs};
use proptest::prelude::*;

const FILES: &[&str] = &["a", "b", "d/a", "d/b", "e/c", "d/f/g"];
const DIRS: &[&str] = &["d", "e", "d/f"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        path: usize,
        off: u32,
        len: u16,
        byte: u8,
    },
    Truncate {
        path: usize,
        size: u32,
    },
    Rename {
        from: usize,
        to: usize,
    },
    RenameDir {
        from: usize,
        to: usize,
    },
    Unlink {
        path: usize,
    },
    Mkdir {
        dir: usize,
    },
    Rmdir {
        dir: usize,
    },
    Read {
        path: usize,
    },
    Remount,
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..FILES.len();
    let d = 0..DIRS.len();
    prop_oneof![
        4 => (f.clone(), 0u32..200_000, 1u16..20_000, any::<u8>()).prop_map(|(path, off, len, byte)| Op::Write { path, off, len, byte }),
        1 => (f.clone(), 0u32..150_000).prop_map(|(path, size)| Op::Truncate { path, size }),
        1 => (f.clone(), f.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (d.clone(), d.clone()).prop_map(|(from, to)| Op::RenameDir { from, to }),
        1 => f.clone().prop_map(|path| Op::Unlink { path }),
        2 => d.clone().prop_map(|dir| Op::Mkdir { dir }),
        1 => d.clone().prop_map(|dir| Op::Rmdir { dir }),
        2 => f.clone().prop_map(|path| Op::Read { path }),
        1 => Just(Op::Remount),
    ]
}

/// What an operation returned: an errno, or data for reads.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Data(Vec<u8>),
    Err(i32),
}

/// Applies an op to a directory tree on a real filesystem (tmpfs or the mount).
fn apply_fs(root: &Path, op: &Op) -> Outcome {
    let res: std::io::Result<Option<Vec<u8>>> = (|| match op {
        Op::Write {
            path,
            off,
            len,
            byte,
        } => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(root.join(FILES[*path]))?;
            f.seek(SeekFrom::Start(*off as u64))?;
            f.write_all(&vec![*byte; *len as usize])?;
            Ok(None)
        }
        Op::Truncate { path, size } => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(root.join(FILES[*path]))?;
            f.set_len(*size as u64)?;
            Ok(None)
        }
        Op::Rename { from, to } => {
            std::fs::rename(root.join(FILES[*from]), root.join(FILES[*to])).map(|_| None)
        }
        Op::RenameDir { from, to } => {
            std::fs::rename(root.join(DIRS[*from]), root.join(DIRS[*to])).map(|_| None)
        }
        Op::Unlink { path } => std::fs::remove_file(root.join(FILES[*path])).map(|_| None),
        Op::Mkdir { dir } => std::fs::create_dir(root.join(DIRS[*dir])).map(|_| None),
        Op::Rmdir { dir } => std::fs::remove_dir(root.join(DIRS[*dir])).map(|_| None),
        Op::Read { path } => {
            let mut v = Vec::new();
            std::fs::File::open(root.join(FILES[*path]))?.read_to_end(&mut v)?;
            Ok(Some(v))
        }
        Op::Remount => Ok(None),
    })();
    match res {
        Ok(None) => Outcome::Ok,
        Ok(Some(d)) => Outcome::Data(d),
        Err(e) => Outcome::Err(e.raw_os_error().unwrap_or(-1)),
    }
}

// ---- the in-memory model and the vfs driver ---------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Node {
    Dir,
    File(Vec<u8>),
}

struct Model(BTreeMap<String, Node>);

impl Model {
    fn parent_ok(&self, p: &str) -> Result<(), i32> {
        match p.rsplit_once('/') {
            None => Ok(()),
            Some((parent, _)) => match self.0.get(parent) {
                Some(Node::Dir) => Ok(()),
                Some(Node::File(_)) => Err(libc::ENOTDIR),
                None => Err(libc::ENOENT),
            },
        }
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match self.try_apply(op) {
            Ok(Some(d)) => Outcome::Data(d),
            Ok(None) => Outcome::Ok,
            Err(e) => Outcome::Err(e),
        }
    }

    fn try_apply(&mut self, op: &Op) -> Result<Option<Vec<u8>>, i32> {
        match op {
            Op::Write {
                path,
                off,
                len,
                byte,
            } => {
                let p = FILES[*path];
                self.parent_ok(p)?;
                match self
                    .0
                    .entry(p.to_string())
                    .or_insert(Node::File(Vec::new()))
                {
                    Node::Dir => return Err(libc::EISDIR),
                    Node::File(d) => {
                        let end = *off as usize + *len as usize;
                        if d.len() < end {
                            d.resize(end, 0);
                        }
                        d[*off as usize..end].fill(*byte);
                    }
                }
                Ok(None)
            }
            Op::Truncate { path, size } => {
                let p = FILES[*path];
                self.parent_ok(p)?;
                match self.0.get_mut(p) {
                    Some(Node::File(d)) => d.resize(*size as usize, 0),
                    Some(Node::Dir) => return Err(libc::EISDIR),
                    None => return Err(libc::ENOENT),
                }
                Ok(None)
            }
            Op::Read { path } => {
                let p = FILES[*path];
                self.parent_ok(p)?;
                match self.0.get(p) {
                    Some(Node::File(d)) => Ok(Some(d.clone())),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    None => Err(libc::ENOENT),
                }
            }
            Op::Unlink { path } => {
                let p = FILES[*path];
                self.parent_ok(p)?;
                match self.0.get(p) {
                    Some(Node::File(_)) => {
                        self.0.remove(p);
                        Ok(None)
                    }
                    Some(Node::Dir) => Err(libc::EISDIR),
                    None => Err(libc::ENOENT),
                }
            }
            Op::Mkdir { dir } => {
                let p = DIRS[*dir];
                self.parent_ok(p)?;
                if self.0.contains_key(p) {
                    return Err(libc::EEXIST);
                }
                self.0.insert(p.to_string(), Node::Dir);
                Ok(None)
            }
            Op::Rmdir { dir } => {
                let p = DIRS[*dir];
                self.parent_ok(p)?;
                match self.0.get(p) {
                    Some(Node::Dir) => {
                        let prefix = format!("{p}/");
                        if self.0.keys().any(|k| k.starts_with(&prefix)) {
                            return Err(libc::ENOTEMPTY);
                        }
                        self.0.remove(p);
                        Ok(None)
                    }
                    Some(Node::File(_)) => Err(libc::ENOTDIR),
                    None => Err(libc::ENOENT),
                }
            }
            Op::Rename { from, to } => self.rename(FILES[*from], FILES[*to]),
            Op::RenameDir { from, to } => self.rename(DIRS[*from], DIRS[*to]),
            Op::Remount => Ok(None),
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<Option<Vec<u8>>, i32> {
        self.parent_ok(from)?;
        let src = self.0.get(from).cloned().ok_or(libc::ENOENT)?;
        self.parent_ok(to)?;
        if from == to {
            return Ok(None);
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(libc::EINVAL);
        }
        match (&src, self.0.get(to)) {
            (Node::Dir, Some(Node::File(_))) => return Err(libc::ENOTDIR),
            (Node::File(_), Some(Node::Dir)) => return Err(libc::EISDIR),
            (Node::Dir, Some(Node::Dir)) => {
                let prefix = format!("{to}/");
                if self.0.keys().any(|k| k.starts_with(&prefix)) {
                    return Err(libc::ENOTEMPTY);
                }
            }
            _ => {}
        }
        let from_prefix = format!("{from}/");
        let moved: Vec<(String, Node)> = self
            .0
            .iter()
            .filter(|(k, _)| *k == from || k.starts_with(&from_prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, _) in &moved {
            self.0.remove(k);
        }
        for (k, v) in moved {
            self.0.insert(format!("{to}{}", &k[from.len()..]), v);
        }
        Ok(None)
    }
}

async fn resolve(vfs: &Vfs, path: &str) -> Result<u64, i32> {
    let mut ino = ROOT;
    for c in path.split('/') {
        ino = vfs.lookup(ino, c).await.map_err(|e| e.errno())?.ino;
    }
    Ok(ino)
}

async fn parent_of(vfs: &Vfs, path: &str) -> Result<(u64, String), i32> {
    match path.rsplit_once('/') {
        None => Ok((ROOT, path.to_string())),
        Some((p, n)) => {
            let ino = resolve(vfs, p).await?;
            if vfs.getattr(ino).await.map_err(|e| e.errno())?.kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            Ok((ino, n.to_string()))
        }
    }
}

async fn apply_vfs(vfs: &Vfs, op: &Op) -> Outcome {
    let r: Result<Option<Vec<u8>>, i32> = async {
        let e = |e: coffer::error::FsError| e.errno();
        match op {
            Op::Write {
                path,
                off,
                len,
                byte,
            } => {
                let (parent, name) = parent_of(vfs, FILES[*path]).await?;
                let (ino, fh) = match vfs.lookup(parent, &name).await {
                    Ok(entry) => (entry.ino, vfs.open(entry.ino, false).await.map_err(e)?),
                    Err(err) if err.errno() == libc::ENOENT => {
                        let (entry, fh) =
                            vfs.create(parent, &name, 0o644, 0, 0).await.map_err(e)?;
                        (entry.ino, fh)
                    }
                    Err(err) => return Err(err.errno()),
                };
                let w = vfs
                    .write(ino, *off as u64, &vec![*byte; *len as usize])
                    .await;
                let rel = vfs.release(ino, fh).await;
                w.map_err(e)?;
                rel.map_err(e)?;
                Ok(None)
            }
            Op::Truncate { path, size } => {
                let ino = resolve(vfs, FILES[*path]).await?;
                let fh = vfs.open(ino, false).await.map_err(e)?;
                let r = vfs
                    .setattr(
                        ino,
                        coffer::vfs::SetAttr {
                            size: Some(*size as u64),
                            ..Default::default()
                        },
                    )
                    .await;
                vfs.release(ino, fh).await.map_err(e)?;
                r.map_err(e)?;
                Ok(None)
            }
            Op::Read { path } => {
                let ino = resolve(vfs, FILES[*path]).await?;
                let fh = vfs.open(ino, false).await.map_err(e)?;
                let mut out = Vec::new();
                loop {
                    let d = vfs.read(ino, out.len() as u64, 65536).await.map_err(e)?;
                    if d.is_empty() {
                        break;
                    }
                    out.extend_from_slice(&d);
                }
                vfs.release(ino, fh).await.map_err(e)?;
                Ok(Some(out))
            }
            Op::Unlink { path } => {
                let (parent, name) = parent_of(vfs, FILES[*path]).await?;
                vfs.unlink(parent, &name).await.map_err(e)?;
                Ok(None)
            }
            Op::Mkdir { dir } => {
                let (parent, name) = parent_of(vfs, DIRS[*dir]).await?;
                vfs.mkdir(parent, &name, 0o755, 0, 0).await.map_err(e)?;
                Ok(None)
            }
            Op::Rmdir { dir } => {
                let (parent, name) = parent_of(vfs, DIRS[*dir]).await?;
                vfs.rmdir(parent, &name).await.map_err(e)?;
                Ok(None)
            }
            Op::Rename { from, to } | Op::RenameDir { from, to } => {
                let list = if matches!(op, Op::Rename { .. }) {
                    FILES
                } else {
                    DIRS
                };
                let (p1, n1) = parent_of(vfs, list[*from]).await?;
                let (p2, n2) = parent_of(vfs, list[*to]).await?;
                vfs.rename(p1, &n1, p2, &n2, false).await.map_err(e)?;
                Ok(None)
            }
            Op::Remount => Ok(None),
        }
    }
    .await;
    match r {
        Ok(None) => Outcome::Ok,
        Ok(Some(d)) => Outcome::Data(d),
        Err(e) => Outcome::Err(e),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn vfs_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let staging = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(true));
        rt.block_on(async {
            let mut vfs = common::test_vfs(store.clone(), staging.path(), "m/", 12, 5);
            let mut model = Model(BTreeMap::new());
            for (i, op) in ops.iter().enumerate() {
                if matches!(op, Op::Remount) {
                    vfs.flush_everything().await.unwrap();
                    vfs = common::test_vfs(store.clone(), staging.path(), "m/", 12, 5);
                }
                let want = model.apply(op);
                let got = apply_vfs(&vfs, op).await;
                prop_assert_eq!(&got, &want, "op {} {:?}", i, op);
            }
            // Everything reads back after a final remount.
            vfs.flush_everything().await.unwrap();
            let vfs = common::test_vfs(store.clone(), staging.path(), "m/", 12, 5);
            for (i, _) in FILES.iter().enumerate() {
                let op = Op::Read { path: i };
                prop_assert_eq!(apply_vfs(&vfs, &op).await, model.apply(&op), "final read of {}", FILES[i]);
            }
            Ok(())
        })?;
    }
}

/// The same random sequences through a real mount and on a tmpfs, compared op by op.
#[test]
fn mount_agrees_with_tmpfs() {
    common::require_fuse();
    let s = common::TestStore::new(1);
    let reference = s.dir.path().join("tmpfs");
    std::fs::create_dir(&reference).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&reference)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs for the reference needs root (CI runs as root)"
    );
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Umount(&reference);
    let m = s.mount();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let a = reference.join(format!("c{n}"));
            let b = m.p(&format!("c{n}"));
            std::fs::create_dir(&a).unwrap();
            std::fs::create_dir(&b).unwrap();
            for (i, op) in ops.iter().enumerate() {
                let want = apply_fs(&a, op);
                let got = apply_fs(&b, op);
                prop_assert_eq!(&got, &want, "op {} {:?}", i, op);
            }
            Ok(())
        })
        .unwrap();
}

/// FUSE writes that continue a streaming file are done at once from the caller's buffer
/// (`Vfs::try_write_now`); a write whose turn has not come, or that is not where the stream
/// is, is refused that way and goes through `write_in_order`. Either way the file holds
/// every write in order.
#[tokio::test(flavor = "multi_thread")]
async fn writes_done_at_once_and_writes_that_wait_make_the_same_file() {
    let staging = tempfile::tempdir().unwrap();
    let mem = MemoryStore::new(false);
    let v = common::test_vfs(Arc::new(mem.clone()), staging.path(), "", 16, 1);
    let (e, fh) = v.create(ROOT, "f", 0o644, 0, 0).await.unwrap();
    let piece = |k: u8| vec![k; 100_000];
    let mut expected = Vec::new();
    // The first write starts the stream (a data key, a budget): it waits.
    let t = v.write_ticket(e.ino);
    assert!(v.try_write_now(e.ino, 0, &piece(0), &t).is_none());
    v.write_in_order(e.ino, 0, &piece(0), t).await.unwrap();
    expected.extend(piece(0));
    let mut at_once = 0;
    for k in 1..100u8 {
        let (a, b) = (piece(k), piece(k + 100));
        let off = expected.len() as u64;
        let t = v.write_ticket(e.ino);
        let next = v.write_ticket(e.ino);
        // Where the stream is, but the write ahead of it has not been done.
        assert!(
            v.try_write_now(e.ino, off, &b, &next).is_none(),
            "a write was done before the one ahead of it"
        );
        match v.try_write_now(e.ino, off, &a, &t) {
            Some(r) => {
                assert_eq!(r.unwrap(), a.len() as u32);
                drop(t);
                at_once += 1;
            }
            None => {
                v.write_in_order(e.ino, off, &a, t).await.unwrap();
            }
        }
        expected.extend(&a);
        v.write_in_order(e.ino, expected.len() as u64, &b, next)
            .await
            .unwrap();
        expected.extend(&b);
    }
    let t = v.write_ticket(e.ino);
    assert!(
        v.try_write_now(e.ino, 5, b"x", &t).is_none(),
        "not where the stream is"
    );
    drop(t);
    assert!(
        at_once > 50,
        "only {at_once} of 99 writes were done at once"
    );
    assert_eq!(v.getattr(e.ino).await.unwrap().size, expected.len() as u64);
    v.release(e.ino, fh).await.unwrap();

    let fresh = common::test_vfs(Arc::new(mem), staging.path(), "", 16, 1);
    let e = fresh.lookup(ROOT, "f").await.unwrap();
    let fh = fresh.open(e.ino, false).await.unwrap();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let part = fresh.read(e.ino, got.len() as u64, 1 << 20).await.unwrap();
        assert!(!part.is_empty());
        got.extend(part);
    }
    fresh.release(e.ino, fh).await.unwrap();
    assert!(got == expected, "the file differs from the writes");
}
