//! The crash harness: a workload runs through the mount (new files written and fsync'd or
//! closed, overwrites, renames, deletes) while the coffer process is killed with SIGKILL at
//! a random moment; the next mount must show every acknowledged operation exactly, the one
//! operation in flight either done or not (never torn or mixed), and nothing else. Runs over
//! the local store and over Garage; `coffer scrub` is clean at the end.
//!
//! COFFER_CRASH_LOCAL and COFFER_CRASH_S3 set the number of kill points (150 and 50).

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A small deterministic generator (xorshift64*): the harness prints its seed, so a failing
/// run can be replayed with COFFER_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        name: String,
        old: Option<Vec<u8>>,
        new: Vec<u8>,
    },
    Rename {
        from: String,
        to: String,
        content: Vec<u8>,
    },
    Delete {
        name: String,
        content: Vec<u8>,
    },
}

/// What the workload knows was acknowledged, and the operation it was in when it stopped.
#[derive(Default)]
struct Model {
    files: BTreeMap<String, Vec<u8>>,
    inflight: Option<Op>,
    acknowledged: u64,
    /// The errno that stopped the workload at each kill point (ENOTCONN or similar for the
    /// kill itself, ENOSPC where a replica was cut first).
    stopped_by: BTreeMap<i32, u64>,
}

const DIR: &str = "work";

/// Writes a file and reports success only once the kernel acknowledged it: after fsync, or
/// after a close whose result is checked (Rust's drop ignores it).
fn write_file(path: &Path, data: &[u8], fsync: bool) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    if fsync {
        f.sync_all()?;
    }
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just taken from the file, which no longer owns it.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs operations until one fails (the mount was killed).
fn workload(root: &Path, model: Arc<Mutex<Model>>, mut rng: Rng, iteration: u64) {
    let dir = root.join(DIR);
    let mut n = 0u64;
    loop {
        n += 1;
        let op = {
            let m = model.lock().unwrap();
            let names: Vec<String> = m.files.keys().cloned().collect();
            let pick = rng.below(10);
            if names.is_empty() || pick < 5 {
                // A new file: sizes around the 64 KiB chunk and over several chunks.
                let size = match rng.below(4) {
                    0 => rng.below(100) as usize,
                    1 => 65536 + rng.below(3) as usize - 1,
                    _ => rng.below(300_000) as usize,
                };
                Op::Write {
                    name: format!("f{iteration}-{n}"),
                    old: None,
                    new: rng.bytes(size),
                }
            } else {
                let victim = names[rng.below(names.len() as u64) as usize].clone();
                let content = m.files[&victim].clone();
                match pick {
                    5..=6 => Op::Write {
                        name: victim,
                        old: Some(content),
                        new: {
                            let size = rng.below(200_000) as usize;
                            rng.bytes(size)
                        },
                    },
                    7..=8 => Op::Rename {
                        from: victim,
                        to: format!("r{iteration}-{n}"),
                        content,
                    },
                    _ => Op::Delete {
                        name: victim,
                        content,
                    },
                }
            }
        };
        model.lock().unwrap().inflight = Some(op.clone());
        let result = match &op {
            Op::Write { name, new, .. } => write_file(&dir.join(name), new, rng.below(2) == 0),
            Op::Rename { from, to, .. } => fs::rename(dir.join(from), dir.join(to)),
            Op::Delete { name, .. } => fs::remove_file(dir.join(name)),
        };
        if let Err(e) = result {
            // Killed (or a replica cut): the operation stays in flight.
            *model
                .lock()
                .unwrap()
                .stopped_by
                .entry(e.raw_os_error().unwrap_or(-1))
                .or_default() += 1;
            return;
        }
        let mut m = model.lock().unwrap();
        match op {
            Op::Write { name, new, .. } => {
                m.files.insert(name, new);
            }
            Op::Rename { from, to, content } => {
                m.files.remove(&from);
                m.files.insert(to, content);
            }
            Op::Delete { name, .. } => {
                m.files.remove(&name);
            }
        }
        m.inflight = None;
        m.acknowledged += 1;
    }
}

/// Checks the mount against the model and resolves the operation in flight into it.
fn verify(root: &Path, model: &mut Model, context: &str) {
    let dir = root.join(DIR);
    let mut listed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{context}: listing: {e}")) {
        let name = e.unwrap().file_name().into_string().unwrap();
        let data = fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{context}: {name}: {e}"));
        listed.insert(name, data);
    }
    let inflight = model.inflight.take();
    let mut expected = model.files.clone();
    // The names the operation in flight may have left either way.
    match &inflight {
        None => {}
        Some(Op::Write { name, old, new }) => {
            let got = listed.get(name);
            let ok = got == Some(new) || got == old.as_ref();
            assert!(
                ok,
                "{context}: {name} is torn or mixed after a crash during its write ({} bytes; old {:?}, new {})",
                got.map_or(0, |g| g.len()),
                old.as_ref().map(|o| o.len()),
                new.len()
            );
            match got {
                Some(g) => expected.insert(name.clone(), g.clone()),
                None => expected.remove(name),
            };
        }
        Some(Op::Rename { from, to, content }) => {
            let (f, t) = (listed.get(from), listed.get(to));
            // Renames are a copy then a delete of the source: a crash between them leaves
            // both names, each whole.
            assert!(
                (f == Some(content) || f.is_none())
                    && (t == Some(content) || t.is_none())
                    && (f.is_some() || t.is_some()),
                "{context}: a crash during the rename of {from} to {to} lost or damaged it"
            );
            for (n, g) in [(from, f), (to, t)] {
                match g {
                    Some(g) => expected.insert(n.clone(), g.clone()),
                    None => expected.remove(n),
                };
            }
        }
        Some(Op::Delete { name, content }) => {
            let got = listed.get(name);
            assert!(
                got.is_none() || got == Some(content),
                "{context}: {name} damaged by a crash during its deletion"
            );
            match got {
                Some(g) => expected.insert(name.clone(), g.clone()),
                None => expected.remove(name),
            };
        }
    }
    for (name, data) in &expected {
        let got = listed.get(name).unwrap_or_else(|| {
            panic!(
                "{context}: {name} ({} bytes) was acknowledged and is gone",
                data.len()
            )
        });
        assert!(
            got == data,
            "{context}: {name} reads back different bytes ({} instead of {})",
            got.len(),
            data.len()
        );
    }
    for name in listed.keys() {
        assert!(
            expected.contains_key(name),
            "{context}: {name} appeared without being written"
        );
    }
    model.files = expected;
}

fn kill_points(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `points` kill points with `mount` making each mount.
fn harness(points: u64, label: &str, mount: impl FnMut() -> Mount) -> (u64, u64) {
    let (acked, torn, _) = harness_with(points, label, mount, |_, _| {}, || {});
    (acked, torn)
}

/// [`harness`], with `before_kill` run at each kill point (with its index) just before the
/// kill, and `after_kill` right after it.
fn harness_with(
    points: u64,
    label: &str,
    mut mount: impl FnMut() -> Mount,
    mut before_kill: impl FnMut(u64, &mut Rng),
    mut after_kill: impl FnMut(),
) -> (u64, u64, BTreeMap<i32, u64>) {
    let seed = std::env::var("COFFER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{label}: seed {seed} (COFFER_CRASH_SEED replays it)");
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut torn_checks = 0;
    {
        let m = mount();
        fs::create_dir(m.p(DIR)).unwrap();
        m.unmount();
    }
    for i in 0..points {
        let m = mount();
        let context = format!("{label}, kill point {i} (seed {seed})");
        if model.inflight.is_some() {
            torn_checks += 1;
        }
        verify(&m.path, &mut model, &context);
        let shared = Arc::new(Mutex::new(std::mem::take(&mut model)));
        let worker = {
            let (root, shared, rng) = (m.path.clone(), shared.clone(), Rng(rng.next() | 1));
            std::thread::spawn(move || workload(&root, shared, rng, i))
        };
        // Kill early in some rounds (mid-first-write) and later in others.
        std::thread::sleep(Duration::from_millis(5 + rng.below(400)));
        before_kill(i, &mut rng);
        m.kill();
        after_kill();
        worker.join().unwrap();
        model = Arc::try_unwrap(shared).ok().unwrap().into_inner().unwrap();
    }
    let m = mount();
    verify(&m.path, &mut model, &format!("{label}, final"));
    m.unmount();
    eprintln!(
        "{label}: {points} kill points, {} operations acknowledged, {torn_checks} crashes in the middle of an operation, {} files verified at the end",
        model.acknowledged,
        model.files.len()
    );
    (model.acknowledged, torn_checks, model.stopped_by)
}

#[test]
fn kills_on_the_local_store_lose_nothing_acknowledged() {
    require_fuse();
    let s = TestStore::new(2);
    let points = kill_points("COFFER_CRASH_LOCAL", 150);
    let (acked, torn) = harness(points, "local store", || s.mount());
    assert!(
        acked > points,
        "the workload hardly ran: {acked} operations"
    );
    assert!(torn > points / 2, "few kills landed mid-operation: {torn}");
    // Nothing a crash leaves behind is damage that scrub cannot clear.
    let store = s.store.to_str().unwrap();
    run(Command::new(coffer_bin()).args(["scrub", store, "--repair"]));
    let report = run(Command::new(coffer_bin()).args(["scrub", store]));
    eprintln!("scrub after repair: {report}");
}

#[test]
fn kills_on_garage_lose_nothing_acknowledged() {
    require_fuse();
    let server = s3::garage();
    let dir = tempfile::Builder::new()
        .prefix("coffer-crash-")
        .tempdir()
        .unwrap();
    let key = dir.path().join("root.key");
    let source = server.fresh_source("crash");
    server.init(&source, &["--key", key.to_str().unwrap()]);
    let points = kill_points("COFFER_CRASH_S3", 50);
    let args = ["--key", key.to_str().unwrap(), "--metadata-ttl", "0"];
    let (acked, _) = harness(points, "garage", || {
        server.mount(&source, dir.path(), &args)
    });
    assert!(
        acked > points,
        "the workload hardly ran: {acked} operations"
    );
}

/// Replica 2 of 3 lives on its own tmpfs, which is filled up at every other kill point while
/// the workload runs (writes to that replica are cut: ENOSPC), then the mount is killed and
/// the space comes back. Writes that failed were never acknowledged; those that
/// were must all read back, and scrub must be clean after repair.
#[test]
fn kills_with_a_replica_cut_lose_nothing_acknowledged() {
    require_fuse();
    let s = TestStore::new(3);
    let replica = s.replica(2);
    let saved = s.dir.path().join("replica-2-init");
    run(Command::new("cp").arg("-a").arg(&replica).arg(&saved));
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512m", "tmpfs"])
        .arg(&replica)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs replica needs root (CI runs as root)"
    );
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Umount(replica.clone());
    sh(&format!(
        "cp -a '{}'/. '{}'/",
        saved.display(),
        replica.display()
    ));
    // The cut: the tmpfs filled up (a read-only remount is refused while coffer has files
    // open for writing there), so every write to that replica fails with ENOSPC.
    let filler = replica.join("filler");
    let fill = || {
        sh(&format!(
            "fallocate -l $(df --output=avail -B1 '{0}' | tail -1) '{1}' || \
             dd if=/dev/zero of='{1}' bs=1M 2>/dev/null || true",
            replica.display(),
            filler.display()
        ));
    };
    let unfill = || {
        let _ = fs::remove_file(&filler);
    };
    let points = kill_points("COFFER_CRASH_CUT", 40);
    let cuts = std::cell::Cell::new(0u64);
    let (acked, _, stopped_by) = harness_with(
        points,
        "local store, replica cut",
        || s.mount(),
        |i, rng| {
            if i % 2 == 0 {
                fill();
                cuts.set(cuts.get() + 1);
                // Let the workload run into the cut before the kill.
                std::thread::sleep(Duration::from_millis(5 + rng.below(200)));
            }
        },
        unfill,
    );
    let nospace = stopped_by.get(&libc::ENOSPC).copied().unwrap_or(0);
    eprintln!(
        "replica writes cut at {} of {points} kill points; the workload stopped by errno: {stopped_by:?}",
        cuts.get()
    );
    assert!(
        nospace * 2 >= cuts.get(),
        "the cut replica stopped only {nospace} of {} cut rounds with ENOSPC",
        cuts.get()
    );
    assert!(
        acked > points / 2,
        "the workload hardly ran: {acked} operations"
    );
    let store = s.store.to_str().unwrap();
    run(Command::new(coffer_bin()).args(["scrub", store, "--repair"]));
    let report = run(Command::new(coffer_bin()).args(["scrub", store]));
    eprintln!("scrub after repair: {report}");
}
