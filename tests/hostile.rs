//! Hostile input: objects planted in the store or the bucket by someone other than coffer.
//! Each case gives a clean error (EIO on the file, named in the log) or a safe listing that
//! leaves the entry out, never a panic, a hang, or a path outside the store.
//!
//! The catalogue (issue 8): random bytes, a valid header with a truncated body, a swapped
//! wrapped key, metadata over the size limits, keys with `..` and `/` runs, names that are
//! not UTF-8, names over 1,024 bytes, and symlinks pointing outside the mount.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coffer::store::memory::MemoryStore;
use coffer::store::{ObjectStore, PutOptions};
use coffer::vfs::attr::Kind;
use coffer::vfs::{ROOT, Vfs};
use common::{TestStore, require_fuse, sh, test_vfs};

/// What a walk of the whole mount found: every path with what reading it gave.
#[derive(Debug, Default)]
struct Walk {
    /// Relative path to "ok:<len>", "link:<target>", "dir" or "errno:<n>".
    seen: std::collections::BTreeMap<String, String>,
}

/// Walks a mounted tree with the kernel's view (lstat, readdir, read, readlink), in a
/// thread with a deadline so that a hang fails the test instead of stalling it.
fn walk_mount(root: &Path) -> Walk {
    fn go(root: &Path, rel: &Path, w: &mut Walk) {
        let dir = root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                w.seen
                    .insert(rel.display().to_string(), format!("errno:{e}"));
                return;
            }
        };
        for e in entries {
            let e = e.unwrap();
            let name = e.file_name();
            assert!(
                !name.is_empty() && name != "." && name != ".." && !name.as_bytes().contains(&b'/'),
                "unsafe name {name:?} listed in {}",
                dir.display()
            );
            assert!(name.len() <= 255, "name of {} bytes listed", name.len());
            let child = rel.join(&name);
            let path = root.join(&child);
            let key = child.display().to_string();
            let outcome = match fs::symlink_metadata(&path) {
                Err(e) => format!("errno:{}", e.raw_os_error().unwrap_or(0)),
                Ok(m) if m.is_dir() => {
                    go(root, &child, w);
                    "dir".to_string()
                }
                Ok(m) if m.file_type().is_symlink() => match fs::read_link(&path) {
                    Ok(t) => format!("link:{}", t.display()),
                    Err(e) => format!("errno:{}", e.raw_os_error().unwrap_or(0)),
                },
                Ok(_) => match fs::read(&path) {
                    Ok(d) => format!("ok:{}", d.len()),
                    Err(e) => format!("errno:{}", e.raw_os_error().unwrap_or(0)),
                },
            };
            w.seen.insert(key, outcome);
        }
    }
    let root = root.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut w = Walk::default();
        go(&root, Path::new(""), &mut w);
        let _ = tx.send(w);
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("walking the mount hung for 2 minutes")
}

fn eio() -> String {
    format!("errno:{}", libc::EIO)
}

/// Copies a directory tree (the object directories of one key in a replica).
fn copy_tree(from: &Path, to: &Path) {
    // Paths as bytes: some planted names are not UTF-8.
    common::run(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The single version's file with extension `ext` in an object directory.
fn version_file(obj: &Path, ext: &str) -> PathBuf {
    fs::read_dir(obj)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .unwrap_or_else(|| panic!("no .{ext} file in {}", obj.display()))
}

/// Cuts the file at `path` to the length `to` chooses from its length.
fn cut(path: &Path, to: impl FnOnce(u64) -> u64) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(to(len))
        .unwrap();
}

#[test]
fn objects_planted_in_local_replicas_give_clean_errors_and_safe_listings() {
    require_fuse();
    let s = TestStore::new(2);
    let outside = s.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"outside the store").unwrap();

    let m = s.mount();
    fs::write(m.p("good"), vec![7u8; 100_000]).unwrap();
    fs::write(m.p("other"), vec![9u8; 100_000]).unwrap();
    // Small enough that its data is embedded in its record's file.
    fs::write(m.p("tiny"), b"a small file").unwrap();
    symlink(outside.join("secret"), m.p("abs-link")).unwrap();
    symlink("../../../../../../etc/passwd", m.p("up-link")).unwrap();
    m.unmount();

    for i in 0..2 {
        let objects = s.replica(i).join("objects");
        let good = objects.join("good");
        // Random bytes as an object's record and data.
        let random = objects.join("random");
        fs::create_dir_all(&random).unwrap();
        let junk: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let id = version_file(&good, "m");
        let id = id.file_stem().unwrap().to_str().unwrap();
        fs::write(random.join(format!("{id}.m")), &junk).unwrap();
        fs::write(random.join(format!("{id}.d")), &junk).unwrap();
        // A valid record with its data cut in half.
        copy_tree(&good, &objects.join("truncated"));
        cut(&version_file(&objects.join("truncated"), "d"), |len| {
            len / 2
        });
        // The data of one file under the record (wrapped key, checksums) of another.
        copy_tree(&good, &objects.join("swapped"));
        fs::copy(
            version_file(&objects.join("other"), "m"),
            version_file(&objects.join("swapped"), "m"),
        )
        .unwrap();
        // A record over the size limit (its length field says 64 MiB).
        copy_tree(&good, &objects.join("bigmeta"));
        let mut rec = fs::read(version_file(&objects.join("bigmeta"), "m")).unwrap();
        rec[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
        rec.resize(rec.len() + (2 << 20), b' ');
        fs::write(version_file(&objects.join("bigmeta"), "m"), rec).unwrap();
        // A name that is not UTF-8, holding a valid object.
        copy_tree(
            &good,
            &objects.join(std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-name")),
        );
        // Long names kept in `%n` files: one over 1,024 bytes, one holding `..`/`/`, one
        // not UTF-8. Each holds a valid object.
        for (dir, name) in [
            ("%#long", "L".repeat(1100).into_bytes()),
            ("%#dots", b"../../escape".to_vec()),
            ("%#nonutf8", b"\xff\xfe".to_vec()),
        ] {
            copy_tree(&good, &objects.join(dir));
            fs::write(objects.join(dir).join("%n"), name).unwrap();
        }
        // A symlink inside the replica leading out of it, to a valid-looking object.
        copy_tree(&good, &outside.join("planted"));
        symlink(&outside, objects.join("escape")).unwrap();
        symlink(outside.join("planted"), objects.join("escape-obj")).unwrap();
        // A small version's record file cut inside its embedded data, and one whose data
        // was changed after the record.
        let tiny = objects.join("tiny");
        assert_eq!(
            fs::read_dir(&tiny).unwrap().count(),
            1,
            "no data file beside the record"
        );
        copy_tree(&tiny, &objects.join("tiny-truncated"));
        cut(&version_file(&objects.join("tiny-truncated"), "m"), |len| {
            len - 6
        });
        copy_tree(&tiny, &objects.join("tiny-altered"));
        let m_file = version_file(&objects.join("tiny-altered"), "m");
        let mut b = fs::read(&m_file).unwrap();
        let n = b.len();
        b[n - 5] ^= 1;
        fs::write(&m_file, b).unwrap();
        // A plain file where a directory should be.
        fs::write(objects.join("plainfile"), b"not a directory").unwrap();
        // In the flat layout, a directory where the newest version's record should be,
        // and files whose names are close to a version's but are none (so not versions,
        // and not keys either).
        copy_tree(&good, &objects.join("dir-record"));
        fs::create_dir(objects.join("dir-record/%ffffffffffffffff00000000.m")).unwrap();
        for name in ["%zz.m", "%FFFF.m", "%1.q", "1.m"] {
            fs::write(objects.join("other").join(name), b"planted").unwrap();
        }
    }

    let m = s.mount();
    let w = walk_mount(&m.path);
    let seen = |k: &str| w.seen.get(k).cloned();
    assert_eq!(seen("good"), Some("ok:100000".into()), "{w:?}");
    assert_eq!(seen("other"), Some("ok:100000".into()));
    assert_eq!(
        seen("abs-link"),
        Some(format!("link:{}", outside.join("secret").display()))
    );
    assert_eq!(
        seen("up-link"),
        Some("link:../../../../../../etc/passwd".into())
    );
    assert_eq!(seen("tiny"), Some("ok:12".into()), "{w:?}");
    for bad in [
        "random",
        "truncated",
        "swapped",
        "bigmeta",
        "tiny-truncated",
        "tiny-altered",
        "dir-record",
    ] {
        assert_eq!(seen(bad), Some(eio()), "{bad}: {w:?}");
    }
    let names: BTreeSet<&str> = w.seen.keys().map(|k| k.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "good",
        "other",
        "abs-link",
        "up-link",
        "random",
        "truncated",
        "swapped",
        "bigmeta",
        "tiny",
        "tiny-truncated",
        "tiny-altered",
        "dir-record",
    ]
    .into();
    assert_eq!(
        names, expected,
        "entries planted outside the layout were listed"
    );

    // A name the planted symlink holds cannot be written through it.
    // (Through fsync: Rust's close drops the error close returns.)
    let e = {
        let mut f = fs::File::create(m.p("escape")).unwrap();
        std::io::Write::write_all(&mut f, b"through the symlink").unwrap();
        f.sync_all().unwrap_err()
    };
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        fs::read_dir(&outside).unwrap().count() == 2,
        "a write went through the planted symlink"
    );
    // rsync copies the mount's symlinks as symlinks and never reaches what they point to.
    let copy = s.dir.path().join("copy");
    let out = std::process::Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", m.path.display()))
        .arg(&copy)
        .output()
        .unwrap();
    // rsync reports the damaged files (exit 23) and copies the rest.
    assert_eq!(out.status.code(), Some(23), "{out:?}");
    assert_eq!(fs::read(copy.join("good")).unwrap(), vec![7u8; 100_000]);
    assert!(
        fs::symlink_metadata(copy.join("abs-link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Removing everything through the mount leaves what the symlinks point to alone.
    let listing = |d: &Path| -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let planted = listing(&outside.join("planted"));
    let _ = sh(&format!("rm -rf '{}'/* || true", m.path.display()));
    assert_eq!(
        fs::read(outside.join("secret")).unwrap(),
        b"outside the store"
    );
    assert_eq!(listing(&outside.join("planted")), planted);
    assert!(!planted.is_empty());

    let log = m.unmount();
    for name in ["random", "truncated", "swapped", "bigmeta", "dir-record"] {
        assert!(
            log.lines().any(|l| l.contains(name) && l.contains("ERROR")),
            "the log does not name {name}:\n{log}"
        );
    }
    assert!(log.contains("not UTF-8"), "{log}");
    assert!(log.contains("not a directory of the store"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn objects_planted_in_a_bucket_give_clean_errors_and_safe_listings() {
    require_fuse();
    s3::require_moto(); // boto3
    let g = s3::garage();
    let dir = tempfile::tempdir().unwrap();
    let source = g.fresh_source("hostile");
    let key = dir.path().join("root.key");
    let key_args = ["--key", key.to_str().unwrap()];
    g.init(&source, &key_args);
    let m = g.mount(&source, dir.path(), &key_args);
    fs::write(m.p("good"), vec![7u8; 100_000]).unwrap();
    fs::write(m.p("other"), vec![9u8; 100_000]).unwrap();
    symlink("/etc/passwd", m.p("abs-link")).unwrap();
    m.unmount();
    let p = source.trim_start_matches(&format!("s3://{}/", g.bucket));
    let out = s3::boto3(
        g,
        &format!(
            "import os\n\
             p = '{p}'\n\
             def get(k):\n    r = s3.get_object(Bucket=bucket, Key=p + '/' + k)\n    return r['Body'].read(), r['Metadata']\n\
             good, gm = get('good')\n\
             other, om = get('other')\n\
             def put(k, body, meta={{}}):\n    s3.put_object(Bucket=bucket, Key=p + '/' + k, Body=body, Metadata=meta)\n\
             put('random', os.urandom(5000))\n\
             put('random-meta', os.urandom(5000), {{k: 'garbage' for k in gm}})\n\
             put('truncated', good[:len(good) // 2], gm)\n\
             put('swapped', good, om)\n\
             big = dict(gm)\n\
             big['zz-padding'] = 'x' * (2000 - sum(len(k) + len(v) for k, v in gm.items()))\n\
             put('bigmeta', good, big)\n\
             for k in ['..', '../escape', 'a/../b', '/double', 'd//e', './dot', 'f/./g', 'h/']:\n    put(k, good, gm)\n\
             put('n/' + 'N' * 300, good, gm)\n\
             print(sorted(gm))\n"
        ),
    );
    // Keys over 1,024 bytes cannot be planted here: S3 refuses them and Garage's LMDB keys
    // stop near 500 bytes. They are planted in a local replica and a memory store instead.
    eprintln!("planted next to objects with metadata keys {out}");

    let m = g.mount(&source, dir.path(), &key_args);
    let w = walk_mount(&m.path);
    let seen = |k: &str| w.seen.get(k).cloned();
    assert_eq!(seen("good"), Some("ok:100000".into()), "{w:?}");
    assert_eq!(seen("abs-link"), Some("link:/etc/passwd".into()));
    for bad in ["random", "random-meta", "truncated", "swapped"] {
        assert_eq!(seen(bad), Some(eio()), "{bad}: {w:?}");
    }
    // Metadata at the size limit with unknown keys: the file itself is intact.
    assert_eq!(seen("bigmeta"), Some("ok:100000".into()), "{w:?}");
    // Keys with `..`, `.` and `/` runs: their directories show, the unsafe parts do not,
    // and an object under a real directory name (`h/`) is that directory's marker.
    for d in ["a", "d", "f", "h", "n"] {
        assert_eq!(seen(d), Some("dir".into()), "{d}: {w:?}");
    }
    let names: BTreeSet<&str> = w.seen.keys().map(|k| k.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "good",
        "other",
        "abs-link",
        "random",
        "random-meta",
        "truncated",
        "swapped",
        "bigmeta",
        "a",
        "d",
        "f",
        "h",
        "n",
    ]
    .into();
    assert_eq!(names, expected, "{w:?}");
    // The mount still writes and reads.
    fs::write(m.p("after"), b"still serving").unwrap();
    assert_eq!(fs::read(m.p("after")).unwrap(), b"still serving");
    let log = m.unmount();
    for name in ["random", "truncated", "swapped"] {
        assert!(
            log.lines().any(|l| l.contains(name) && l.contains("ERROR")),
            "the log does not name {name}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}

async fn vfs_read(v: &Vfs, name: &str) -> Result<Vec<u8>, i32> {
    let e = v.lookup(ROOT, name).await.map_err(|e| e.errno())?;
    let fh = v.open(e.ino, false).await.map_err(|e| e.errno())?;
    let r = v.read(e.ino, 0, 1 << 20).await.map_err(|e| e.errno());
    v.release(e.ino, fh).await.map_err(|e| e.errno())?;
    r
}

/// Metadata far over any backend's limit (which a store's own checks would refuse on the way
/// in) and hostile keys, planted behind the vfs's back in a memory store.
#[tokio::test(flavor = "multi_thread")]
async fn oversize_metadata_and_hostile_keys_in_a_store_never_panic() {
    let staging = tempfile::tempdir().unwrap();
    let mem = MemoryStore::new(false);
    let v = test_vfs(Arc::new(mem.clone()), staging.path(), "", 16, 1);
    let (e, fh) = v.create(ROOT, "good", 0o644, 0, 0).await.unwrap();
    v.write(e.ino, 0, &[7u8; 70_000]).await.unwrap();
    v.release(e.ino, fh).await.unwrap();
    let good = mem.get("good", None, &Default::default()).await.unwrap();
    let meta = good.info.metadata.clone().unwrap();
    let put = |k: &'static str| {
        let mem = mem.clone();
        let body = good.body.clone();
        let meta = meta.clone();
        async move {
            mem.put(
                k,
                body,
                &PutOptions {
                    metadata: meta,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    };
    for k in ["huge-values", "many-keys", "junk-values"] {
        put(k).await;
    }
    assert!(mem.tamper_metadata("huge-values", |m| {
        for v in m.values_mut() {
            *v = "A".repeat(1 << 20);
        }
    }));
    assert!(mem.tamper_metadata("many-keys", |m| {
        for i in 0..100_000 {
            m.insert(format!("k{i}"), "v".into());
        }
    }));
    assert!(mem.tamper_metadata("junk-values", |m| {
        for v in m.values_mut() {
            *v = "\u{0}\u{fffd}%%%".into();
        }
    }));
    for k in ["..", "../up", "x/../../up", "//", "y//z", ".", "./w", "q/."] {
        put(k).await;
    }

    let fresh = test_vfs(Arc::new(mem.clone()), staging.path(), "", 16, 1);
    let listed = tokio::time::timeout(Duration::from_secs(30), fresh.readdir(ROOT))
        .await
        .expect("readdir hung")
        .unwrap();
    let names: BTreeSet<String> = listed.iter().map(|(_, n, _)| n.clone()).collect();
    let expected: BTreeSet<String> = [
        "good",
        "huge-values",
        "many-keys",
        "junk-values",
        "x",
        "y",
        "q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, expected);
    for (ino, name, attr) in &listed {
        if attr.kind == Kind::Dir {
            let inner = fresh.readdir(*ino).await.unwrap();
            assert!(
                inner
                    .iter()
                    .all(|(_, n, _)| n != ".." && n != "." && !n.is_empty()),
                "{name}: {inner:?}"
            );
        }
    }
    assert_eq!(vfs_read(&fresh, "good").await.unwrap(), vec![7u8; 70_000]);
    // Values that are not an envelope: a clean error. Unknown keys, however many, are
    // ignored and the (intact) file reads back.
    for bad in ["huge-values", "junk-values"] {
        let r = tokio::time::timeout(Duration::from_secs(30), vfs_read(&fresh, bad))
            .await
            .expect("read hung");
        assert!(
            matches!(r, Err(e) if e == libc::EIO || e == libc::EACCES),
            "{bad}: {:?}",
            r.map(|d| d.len())
        );
    }
    assert_eq!(
        vfs_read(&fresh, "many-keys").await.unwrap(),
        vec![7u8; 70_000]
    );
    let many = fresh.lookup(ROOT, "many-keys").await.unwrap().ino;
    assert!(fresh.listxattr(many).await.unwrap().len() < 100_000);
}
