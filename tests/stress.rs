//! Concurrency through a real mount, on a debug build (overflow checks and debug assertions
//! on, in the mounted `coffer` as in this test binary):
//! - many threads doing mixed operations on their own files and on shared ones, each checking
//!   what it reads against what it wrote, then everything checked again after a remount;
//! - readers of a file while another handle writes it, checked byte by byte;
//! - open handles interleaved (writers, readers, appenders, unlink and rename while open)
//!   compared with a tmpfs operation by operation.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proptest::prelude::*;

/// A small deterministic generator (the tests print their seeds).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Content that says what it is: 8 bytes of length, 8 of a seed, then bytes from the seed.
fn self_describing(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    v.extend_from_slice(&(len as u64).to_le_bytes());
    v.extend_from_slice(&seed.to_le_bytes());
    let mut r = Rng(seed | 1);
    v.extend((0..len).map(|_| r.next() as u8));
    v
}

/// Whether bytes are one whole self-describing content (not torn or mixed).
fn check_self_describing(d: &[u8]) -> Result<(), String> {
    if d.len() < 16 {
        return Err(format!("{} bytes, shorter than the header", d.len()));
    }
    let len = u64::from_le_bytes(d[..8].try_into().unwrap()) as usize;
    let seed = u64::from_le_bytes(d[8..16].try_into().unwrap());
    if d.len() != len + 16 || self_describing(seed, len) != d {
        let good = self_describing(seed, len);
        let first_bad = d.iter().zip(&good).position(|(a, b)| a != b);
        return Err(format!(
            "{} bytes that are not content {seed:#x} of {} bytes (first differing byte: {first_bad:?})",
            d.len(),
            len + 16
        ));
    }
    Ok(())
}

fn assert_debug_build() {
    if !cfg!(debug_assertions) {
        panic!(
            "the stress tests are meant for a debug build (overflow checks on): run `cargo test`"
        );
    }
}

/// One thread's view of its own directory.
#[derive(Default)]
struct OwnModel {
    files: BTreeMap<String, Vec<u8>>,
    subdirs: Vec<String>,
}

fn worker(
    root: PathBuf,
    id: u64,
    iterations: u64,
    failures: Arc<AtomicU64>,
    stale: Arc<AtomicU64>,
) -> OwnModel {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let own = root.join(format!("t{id}"));
    fs::create_dir(&own).unwrap();
    let shared = root.join("shared");
    let mut m = OwnModel::default();
    let fail = |what: String| {
        failures.fetch_add(1, Ordering::Relaxed);
        eprintln!("thread {id}: {what}");
    };
    for it in 0..iterations {
        let names: Vec<String> = m.files.keys().cloned().collect();
        let pick = |rng: &mut Rng| -> Option<String> {
            (!names.is_empty()).then(|| names[rng.below(names.len() as u64) as usize].clone())
        };
        match rng.below(14) {
            // Write a new or existing file, sometimes fsync'd.
            0..=2 => {
                let name = format!("f{}", rng.below(12));
                let len = [0, 1, 4095, 4096, 65_537, 300_000][rng.below(6) as usize];
                let data = self_describing(rng.next(), len);
                let mut f = fs::File::create(own.join(&name)).unwrap();
                f.write_all(&data).unwrap();
                if rng.below(3) == 0 {
                    f.sync_all().unwrap();
                }
                m.files.insert(name, data);
            }
            // Read one back.
            3 | 4 => {
                if let Some(name) = pick(&mut rng) {
                    match fs::read(own.join(&name)) {
                        Ok(d) if d == m.files[&name] => {}
                        Ok(d) => fail(format!("{name}: read {} bytes that differ", d.len())),
                        Err(e) => fail(format!("{name}: {e}")),
                    }
                }
            }
            // Overwrite a range in place.
            5 => {
                if let Some(name) = pick(&mut rng) {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(own.join(&name))
                        .unwrap();
                    let d = m.files.get_mut(&name).unwrap();
                    let off = rng.below(d.len() as u64 + 1) as usize;
                    let patch = vec![(it as u8) | 1; rng.below(70_000) as usize];
                    f.write_all_at(&patch, off as u64).unwrap();
                    if d.len() < off + patch.len() {
                        d.resize(off + patch.len(), 0);
                    }
                    d[off..off + patch.len()].copy_from_slice(&patch);
                }
            }
            // Truncate.
            6 => {
                if let Some(name) = pick(&mut rng) {
                    let size = rng.below(200_000) as usize;
                    fs::OpenOptions::new()
                        .write(true)
                        .open(own.join(&name))
                        .unwrap()
                        .set_len(size as u64)
                        .unwrap();
                    m.files.get_mut(&name).unwrap().resize(size, 0);
                }
            }
            // Rename over another name (maybe an existing file).
            7 => {
                if let Some(name) = pick(&mut rng) {
                    let to = format!("f{}", rng.below(12));
                    fs::rename(own.join(&name), own.join(&to)).unwrap();
                    let d = m.files.remove(&name).unwrap();
                    m.files.insert(to, d);
                }
            }
            // Unlink.
            8 => {
                if let Some(name) = pick(&mut rng) {
                    fs::remove_file(own.join(&name)).unwrap();
                    m.files.remove(&name);
                }
            }
            // Directories, permissions and xattrs.
            9 => {
                let d = format!("d{}", rng.below(3));
                if let Some(pos) = m.subdirs.iter().position(|x| *x == d) {
                    fs::remove_dir(own.join(&d)).unwrap();
                    m.subdirs.remove(pos);
                } else {
                    fs::create_dir(own.join(&d)).unwrap();
                    m.subdirs.push(d);
                }
            }
            10 => {
                if let Some(name) = pick(&mut rng) {
                    let mode = [0o600, 0o644, 0o640][rng.below(3) as usize];
                    let p = own.join(&name);
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
                    let got = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                    if got != mode {
                        fail(format!("{name}: mode {got:o} after chmod {mode:o}"));
                    }
                }
            }
            // The listing matches the model.
            11 => {
                let mut listed: Vec<String> = fs::read_dir(&own)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                listed.sort();
                let mut want: Vec<String> =
                    m.files.keys().chain(m.subdirs.iter()).cloned().collect();
                want.sort();
                if listed != want {
                    fail(format!("listed {listed:?}, expected {want:?}"));
                }
            }
            // Publish a shared file the way editors and rsync do: temp file, rename over.
            12 => {
                let tmp = shared.join(format!(".tmp-{id}"));
                let mut f = fs::File::create(&tmp).unwrap();
                f.write_all(&self_describing(rng.next(), rng.below(100_000) as usize))
                    .unwrap();
                f.sync_all().unwrap();
                drop(f);
                fs::rename(&tmp, shared.join(format!("s{}", rng.below(4)))).unwrap();
            }
            // Read a shared file: whole versions only, never torn or mixed.
            _ => {
                let p = shared.join(format!("s{}", rng.below(4)));
                let read = || -> std::io::Result<(Vec<u8>, u64, u64)> {
                    let mut f = fs::File::open(&p)?;
                    let md = f.metadata()?;
                    let mut d = Vec::new();
                    f.read_to_end(&mut d)?;
                    use std::os::unix::fs::MetadataExt;
                    Ok((d, md.len(), md.ino()))
                };
                // Opening a name that another thread is renaming over, twice in a row, ends
                // in ESTALE (the kernel retries a stale open once): try again, as NFS clients
                // do. Torn or mixed content is never acceptable.
                let mut result = read();
                for _ in 0..5 {
                    if !matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ESTALE)) {
                        break;
                    }
                    stale.fetch_add(1, Ordering::Relaxed);
                    result = read();
                }
                match result {
                    Ok((d, size, ino)) => {
                        if let Err(e) = check_self_describing(&d) {
                            let again = read().map(|(d, s, i)| (d.len(), s, i));
                            fail(format!(
                                "{}: {e} (inode {ino}, size {size}; read again: {again:?})",
                                p.display()
                            ));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => fail(format!("{}: {e}", p.display())),
                }
            }
        }
    }
    m
}

fn verify_own(root: &Path, id: u64, m: &OwnModel) {
    let own = root.join(format!("t{id}"));
    for (name, data) in &m.files {
        let got = fs::read(own.join(name)).unwrap();
        assert!(got == *data, "t{id}/{name}: {} bytes differ", got.len());
    }
    let count = fs::read_dir(&own).unwrap().count();
    assert_eq!(count, m.files.len() + m.subdirs.len(), "t{id}: entries");
}

#[test]
fn many_threads_mixed_operations_through_the_mount() {
    assert_debug_build();
    common::require_fuse();
    let threads: u64 = std::env::var("COFFER_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let iterations = 150;
    let s = common::TestStore::new(2);
    let m = s.mount();
    fs::create_dir(m.p("shared")).unwrap();
    let failures = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(AtomicU64::new(0));
    let t = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|id| {
            let root = m.path.clone();
            let failures = failures.clone();
            let stale = stale.clone();
            std::thread::spawn(move || worker(root, id, iterations, failures, stale))
        })
        .collect();
    let models: Vec<OwnModel> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!(
        "{threads} threads x {iterations} mixed operations in {:?}, {} failures, {} stale opens retried",
        t.elapsed(),
        failures.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed)
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    for (id, model) in models.iter().enumerate() {
        verify_own(&m.path, id as u64, model);
    }
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
    // Everything again from the store alone.
    let m = s.mount();
    for (id, model) in models.iter().enumerate() {
        verify_own(&m.path, id as u64, model);
    }
    for e in fs::read_dir(m.p("shared")).unwrap() {
        let p = e.unwrap().path();
        check_self_describing(&fs::read(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    m.unmount();
}

/// The byte at `offset` of the growing file.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 11)) as u8
}

#[test]
fn readers_of_a_file_being_written_see_only_its_bytes() {
    assert_debug_build();
    common::require_fuse();
    let s = common::TestStore::new(1);
    let m = s.mount();
    let path = m.p("growing");
    let total: u64 = std::env::var("COFFER_GROWING_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
        << 20;
    let done = Arc::new(AtomicBool::new(false));
    let mut writer = fs::File::create(&path).unwrap();
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let path = path.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(r + 7);
                let (mut reads, mut bytes) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) {
                    let f = fs::File::open(&path).unwrap();
                    let size = f.metadata().unwrap().len();
                    let off = rng.below(size.max(1));
                    let mut buf = vec![0u8; 1 + rng.below(1 << 20) as usize];
                    let n = f.read_at(&mut buf, off).unwrap();
                    if let Some(i) = (0..n).find(|&i| buf[i] != pattern(off + i as u64)) {
                        let at = off + i as u64;
                        let now = f.metadata().unwrap().len();
                        let mut again = [0u8; 1];
                        let n2 = f.read_at(&mut again, at).unwrap();
                        let fresh = fs::File::open(&path).unwrap();
                        let n3 = fresh.read_at(&mut again, at).unwrap();
                        panic!(
                            "reader {r}: byte {at} is {} not {} (read {n} at {off}, size {size} \
                             then {now}; again on the handle: {n2} bytes; on a new one: {n3} \
                             bytes, {})",
                            buf[i],
                            pattern(at),
                            again[0]
                        );
                    }
                    reads += 1;
                    bytes += n as u64;
                }
                (reads, bytes)
            })
        })
        .collect();
    let mut rng = Rng(99);
    let mut off = 0u64;
    while off < total {
        let len = (1 + rng.below(300_000)).min(total - off);
        let buf: Vec<u8> = (off..off + len).map(pattern).collect();
        writer.write_all(&buf).unwrap();
        off += len;
        if rng.below(40) == 0 {
            writer.sync_all().unwrap();
        }
    }
    writer.sync_all().unwrap();
    drop(writer);
    done.store(true, Ordering::Relaxed);
    for (i, r) in readers.into_iter().enumerate() {
        let (reads, bytes) = r.join().unwrap();
        eprintln!("reader {i}: {reads} reads, {bytes} bytes checked");
        assert!(reads > 0);
    }
    let mut all = Vec::new();
    fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all.len() as u64, total);
    assert!(all.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
    m.unmount();
}

// ---- open handles interleaved, compared with tmpfs ----------------------------------------

const NAMES: &[&str] = &["f", "g"];
const SLOTS: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Read,
    ReadWrite,
    Append,
}

#[derive(Clone, Debug)]
enum HOp {
    Open {
        slot: usize,
        name: usize,
        mode: Mode,
        create: bool,
        trunc: bool,
    },
    Close {
        slot: usize,
    },
    Write {
        slot: usize,
        off: u32,
        len: u32,
        byte: u8,
    },
    Read {
        slot: usize,
        off: u32,
        len: u32,
    },
    Fsync {
        slot: usize,
    },
    Ftruncate {
        slot: usize,
        size: u32,
    },
    Fstat {
        slot: usize,
    },
    Stat {
        name: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Unlink {
        name: usize,
    },
    ReadWhole {
        name: usize,
    },
}

fn hop() -> impl Strategy<Value = HOp> {
    let s = 0..SLOTS;
    let n = 0..NAMES.len();
    let mode = prop_oneof![Just(Mode::Read), Just(Mode::ReadWrite), Just(Mode::Append)];
    prop_oneof![
        3 => (s.clone(), n.clone(), mode, any::<bool>(), prop::bool::weighted(0.15))
            .prop_map(|(slot, name, mode, create, trunc)| HOp::Open { slot, name, mode, create, trunc }),
        1 => s.clone().prop_map(|slot| HOp::Close { slot }),
        5 => (s.clone(), 0u32..300_000, 1u32..150_000, any::<u8>())
            .prop_map(|(slot, off, len, byte)| HOp::Write { slot, off, len, byte }),
        5 => (s.clone(), 0u32..400_000, 1u32..200_000)
            .prop_map(|(slot, off, len)| HOp::Read { slot, off, len }),
        1 => s.clone().prop_map(|slot| HOp::Fsync { slot }),
        1 => (s.clone(), 0u32..300_000).prop_map(|(slot, size)| HOp::Ftruncate { slot, size }),
        1 => s.clone().prop_map(|slot| HOp::Fstat { slot }),
        1 => n.clone().prop_map(|name| HOp::Stat { name }),
        1 => (n.clone(), n.clone()).prop_map(|(from, to)| HOp::Rename { from, to }),
        1 => n.clone().prop_map(|name| HOp::Unlink { name }),
        1 => n.clone().prop_map(|name| HOp::ReadWhole { name }),
    ]
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Size(u64),
    /// Bytes read: their count and a hash (the test prints them on a mismatch).
    Data(usize, u64),
    Err(i32),
    NoHandle,
}

fn digest(d: &[u8]) -> Outcome {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    d.hash(&mut h);
    Outcome::Data(d.len(), h.finish())
}

/// One side (tmpfs or the mount): a directory and the handles open in it.
struct Side {
    dir: PathBuf,
    slots: [Option<fs::File>; SLOTS],
}

impl Side {
    fn apply(&mut self, op: &HOp) -> Outcome {
        let errno = |e: std::io::Error| Outcome::Err(e.raw_os_error().unwrap_or(-1));
        let handle = |slots: &mut [Option<fs::File>; SLOTS], slot: usize| slots[slot].take();
        match *op {
            HOp::Open {
                slot,
                name,
                mode,
                create,
                trunc,
            } => {
                let mut o = fs::OpenOptions::new();
                match mode {
                    Mode::Read => o.read(true),
                    Mode::ReadWrite => o.read(true).write(true).create(create).truncate(trunc),
                    Mode::Append => o.append(true).create(create),
                };
                match o.open(self.dir.join(NAMES[name])) {
                    Ok(f) => {
                        self.slots[slot] = Some(f);
                        Outcome::Ok
                    }
                    Err(e) => errno(e),
                }
            }
            HOp::Close { slot } => match handle(&mut self.slots, slot) {
                Some(f) => {
                    // close(2) itself, so that its error is seen.
                    use std::os::fd::IntoRawFd;
                    let rc = unsafe { libc::close(f.into_raw_fd()) };
                    if rc == 0 {
                        Outcome::Ok
                    } else {
                        errno(std::io::Error::last_os_error())
                    }
                }
                None => Outcome::NoHandle,
            },
            HOp::Write {
                slot,
                off,
                len,
                byte,
            } => match &mut self.slots[slot] {
                Some(f) => {
                    let buf = vec![byte; len as usize];
                    // pwrite on append handles writes at the end on Linux, like write.
                    match f.write_all_at(&buf, off as u64) {
                        Ok(()) => Outcome::Ok,
                        Err(e) => errno(e),
                    }
                }
                None => Outcome::NoHandle,
            },
            HOp::Read { slot, off, len } => match &self.slots[slot] {
                Some(f) => {
                    let mut buf = vec![0u8; len as usize];
                    let mut got = 0;
                    loop {
                        match f.read_at(&mut buf[got..], off as u64 + got as u64) {
                            Ok(0) => break,
                            Ok(n) => {
                                got += n;
                                if got == buf.len() {
                                    break;
                                }
                            }
                            Err(e) => return errno(e),
                        }
                    }
                    digest(&buf[..got])
                }
                None => Outcome::NoHandle,
            },
            HOp::Fsync { slot } => match &self.slots[slot] {
                Some(f) => f.sync_all().map_or_else(errno, |_| Outcome::Ok),
                None => Outcome::NoHandle,
            },
            HOp::Ftruncate { slot, size } => match &self.slots[slot] {
                Some(f) => f.set_len(size as u64).map_or_else(errno, |_| Outcome::Ok),
                None => Outcome::NoHandle,
            },
            HOp::Fstat { slot } => match &self.slots[slot] {
                Some(f) => f.metadata().map_or_else(errno, |m| Outcome::Size(m.len())),
                None => Outcome::NoHandle,
            },
            HOp::Stat { name } => fs::metadata(self.dir.join(NAMES[name]))
                .map_or_else(errno, |m| Outcome::Size(m.len())),
            HOp::Rename { from, to } => {
                fs::rename(self.dir.join(NAMES[from]), self.dir.join(NAMES[to]))
                    .map_or_else(errno, |_| Outcome::Ok)
            }
            HOp::Unlink { name } => {
                fs::remove_file(self.dir.join(NAMES[name])).map_or_else(errno, |_| Outcome::Ok)
            }
            HOp::ReadWhole { name } => {
                fs::read(self.dir.join(NAMES[name])).map_or_else(errno, |d| digest(&d))
            }
        }
    }
}

#[test]
fn interleaved_handles_agree_with_tmpfs() {
    assert_debug_build();
    common::require_fuse();
    let s = common::TestStore::new(1);
    let reference = s.dir.path().join("tmpfs");
    fs::create_dir(&reference).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
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
    let cases = std::env::var("COFFER_HANDLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&proptest::collection::vec(hop(), 1..60), |ops| {
            let n = case.fetch_add(1, Ordering::Relaxed);
            let mk = |root: &Path| {
                let dir = root.join(format!("c{n}"));
                fs::create_dir(&dir).unwrap();
                Side {
                    dir,
                    slots: Default::default(),
                }
            };
            let mut want_side = mk(&reference);
            let mut got_side = mk(&m.path);
            for (i, op) in ops.iter().enumerate() {
                let want = want_side.apply(op);
                let got = got_side.apply(op);
                prop_assert_eq!(&got, &want, "op {} {:?}", i, op);
            }
            Ok(())
        })
        .unwrap();
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn files_replaced_while_open_keep_their_content_and_their_successors_survive() {
    common::require_fuse();
    let s = common::TestStore::new(1);
    let m = s.mount();
    let old = self_describing(1, 300_000);
    let new = self_describing(2, 200_000);
    // Unlinked while open, then the name reused.
    fs::write(m.p("f"), &old).unwrap();
    let reader = fs::File::open(m.p("f")).unwrap();
    let mut head = vec![0u8; 1000];
    reader.read_exact_at(&mut head, 0).unwrap();
    fs::remove_file(m.p("f")).unwrap();
    fs::write(m.p("f"), &new).unwrap();
    let mut all = vec![0u8; old.len()];
    reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == old, "the unlinked file's reader saw other bytes");
    drop(reader);
    assert!(
        fs::read(m.p("f")).unwrap() == new,
        "closing the old file hurt the new one"
    );
    // Replaced by a rename while open.
    fs::write(m.p("g"), &old).unwrap();
    let reader = fs::File::open(m.p("g")).unwrap();
    reader.read_exact_at(&mut head, 0).unwrap();
    fs::write(m.p("g.tmp"), &new).unwrap();
    fs::rename(m.p("g.tmp"), m.p("g")).unwrap();
    reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == old, "the replaced file's reader saw other bytes");
    drop(reader);
    assert!(fs::read(m.p("g")).unwrap() == new);
    // Nothing shows of what was moved aside, and nothing is left once closed.
    let names: Vec<_> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    m.unmount();
    let aside = s.replica(0).join("objects/%.coffer-open-deleted");
    let left = sh_count_versions(&aside);
    assert_eq!(left, 0, "moved-aside objects left after the last close");
    let m = s.mount();
    assert!(fs::read(m.p("f")).unwrap() == new);
    assert!(fs::read(m.p("g")).unwrap() == new);
    m.unmount();
}

/// Live objects under a local replica's directory (versions whose newest is not deleted).
fn sh_count_versions(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| {
            // A key's records are `%<version>.m` (live) and `.x` (deleted) in its directory.
            let mut names: Vec<String> = fs::read_dir(e.ok()?.path())
                .ok()?
                .filter_map(|x| x.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with('%') && (n.ends_with(".m") || n.ends_with(".x")))
                .collect();
            names.sort();
            names.last().filter(|n| !n.ends_with(".x")).map(|_| ())
        })
        .count()
}
