//! The filesystem, mounted for real: backup-tool round trips, persistence across remounts
//! and crashes, POSIX error semantics, memory bounds and the at-rest guarantees.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

#[test]
fn rsync_round_trip_is_exact_and_idempotent() {
    require_fuse();
    require_tool("rsync", "rsync");
    let s = TestStore::new(3);
    let src = s.dir.path().join("src");
    make_tree(&src, 200);
    let m = s.mount();
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    let again = sh(&format!(
        "rsync -a --itemize-changes '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    assert_eq!(
        again.trim(),
        "",
        "a second rsync transferred something:\n{again}"
    );
    let back = s.dir.path().join("back");
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        m.p("tree").display(),
        back.display()
    ));
    assert_trees_equal(&src, &back);
    // The same after a remount by a new process.
    m.unmount();
    let m = s.mount();
    let back2 = s.dir.path().join("back2");
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        m.p("tree").display(),
        back2.display()
    ));
    assert_trees_equal(&src, &back2);
    let again = sh(&format!(
        "rsync -a --itemize-changes '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    assert_eq!(
        again.trim(),
        "",
        "after a remount, rsync transferred something:\n{again}"
    );
}

#[test]
fn tar_round_trip_is_byte_identical() {
    require_fuse();
    let s = TestStore::new(3);
    let src = s.dir.path().join("src");
    make_tree(&src, 20);
    let m = s.mount();
    fs::create_dir(m.p("t")).unwrap();
    sh(&format!(
        "tar --format=posix -C '{}' -cf - . | tar -C '{}' -xpf -",
        src.display(),
        m.p("t").display()
    ));
    let out = s.dir.path().join("out");
    fs::create_dir(&out).unwrap();
    sh(&format!(
        "tar --format=posix -C '{}' -cf - . | tar -C '{}' -xpf -",
        m.p("t").display(),
        out.display()
    ));
    assert_trees_equal(&src, &out);
    // tar archives of both trees list the same entries with the same metadata.
    let list = |d: &Path| {
        sh(&format!(
            "cd '{}' && tar --sort=name -cvvf /dev/null . | sed 's/  */ /g'",
            d.display()
        ))
    };
    assert_eq!(list(&src), list(&m.p("t")));
}

#[test]
fn fsynced_files_survive_sigkill() {
    require_fuse();
    let s = TestStore::new(3);
    let m = s.mount();
    let mut expected = Vec::new();
    for i in 0..20 {
        let p = m.p(&format!("f{i}"));
        let data: Vec<u8> = (0..(i * 7919 + 1)).map(|b| (b * 31 + i) as u8).collect();
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        expected.push((format!("f{i}"), data));
    }
    // Renamed and fsync'd, and one rewritten in place.
    fs::rename(m.p("f0"), m.p("renamed")).unwrap();
    expected[0].0 = "renamed".into();
    let mut f = fs::OpenOptions::new().write(true).open(m.p("f1")).unwrap();
    f.seek(SeekFrom::Start(3)).unwrap();
    f.write_all(b"XYZ").unwrap();
    f.sync_all().unwrap();
    expected[1].1.splice(3..6, *b"XYZ");
    // Written but never fsync'd nor closed when the process dies: may be lost, never torn.
    let mut open = fs::File::create(m.p("unsynced")).unwrap();
    open.write_all(&vec![1u8; 300_000]).unwrap();
    m.kill();
    drop(open);
    let m = s.mount();
    for (name, data) in &expected {
        assert_eq!(&fs::read(m.p(name)).unwrap(), data, "{name} after SIGKILL");
    }
    if let Ok(d) = fs::read(m.p("unsynced")) {
        assert!(
            d.is_empty() || d == vec![1u8; 300_000],
            "torn file of {} bytes",
            d.len()
        );
    }
    assert!(!m.p("f0").exists());
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> i32 {
    let a = CString::new(from.as_os_str().as_bytes()).unwrap();
    let b = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings; renameat2 has no other preconditions.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
fn posix_errors_match_local_filesystems() {
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    // Run the same checks on tmpfs-like local disk and on the mount: errnos must agree.
    let local = s.dir.path().join("local");
    fs::create_dir(&local).unwrap();
    for root in [local.as_path(), m.path.as_path()] {
        let p = |r: &str| root.join(r);
        fs::create_dir(p("d")).unwrap();
        fs::write(p("d/f"), b"x").unwrap();
        fs::write(p("file"), b"y").unwrap();
        let got = vec![
            ("rmdir non-empty", errno_of(fs::remove_dir(p("d")))),
            ("mkdir existing", errno_of(fs::create_dir(p("d")))),
            (
                "create_new existing",
                errno_of(
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(p("file")),
                ),
            ),
            ("file as dir", errno_of(fs::File::create(p("file/x")))),
            ("unlink dir", errno_of(fs::remove_file(p("d")))),
            ("rmdir file", errno_of(fs::remove_dir(p("file")))),
            ("long name", errno_of(fs::File::create(p(&"x".repeat(256))))),
            ("open missing", errno_of(fs::File::open(p("missing")))),
            (
                "rename dir onto file",
                errno_of(fs::rename(p("d"), p("file"))),
            ),
            (
                "rename file onto dir",
                errno_of(fs::rename(p("file"), p("d"))),
            ),
            (
                "rename into itself",
                errno_of(fs::rename(p("d"), p("d/sub"))),
            ),
            (
                "noreplace",
                renameat2(&p("file"), &p("d/f"), libc::RENAME_NOREPLACE),
            ),
            ("read dir", errno_of(fs::read(p("d")))),
        ];
        let expected = vec![
            ("rmdir non-empty", libc::ENOTEMPTY),
            ("mkdir existing", libc::EEXIST),
            ("create_new existing", libc::EEXIST),
            ("file as dir", libc::ENOTDIR),
            ("unlink dir", libc::EISDIR),
            ("rmdir file", libc::ENOTDIR),
            ("long name", libc::ENAMETOOLONG),
            ("open missing", libc::ENOENT),
            ("rename dir onto file", libc::ENOTDIR),
            ("rename file onto dir", libc::EISDIR),
            ("rename into itself", libc::EINVAL),
            ("noreplace", libc::EEXIST),
            ("read dir", libc::EISDIR),
        ];
        assert_eq!(got, expected, "on {}", root.display());
    }
    // Hard links are refused (one object per file), documented.
    assert_eq!(
        errno_of(fs::hard_link(m.p("file"), m.p("link"))),
        libc::EPERM
    );
    // Truncate up and down, sparse writes, append.
    let f = m.p("sparse");
    let mut h = fs::File::create(&f).unwrap();
    h.seek(SeekFrom::Start(200_000)).unwrap();
    h.write_all(b"end").unwrap();
    drop(h);
    let d = fs::read(&f).unwrap();
    assert_eq!(d.len(), 200_003);
    assert!(d[..200_000].iter().all(|&b| b == 0));
    let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
    h.set_len(70_000).unwrap();
    h.set_len(140_000).unwrap();
    drop(h);
    let mut h = fs::OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b"tail").unwrap();
    drop(h);
    let d = fs::read(&f).unwrap();
    assert_eq!(d.len(), 140_004);
    assert!(d[..140_000].iter().all(|&b| b == 0));
    assert_eq!(&d[140_000..], b"tail");
    // chmod, chown, utimens with nanoseconds, xattrs persist across a remount.
    fs::set_permissions(m.p("file"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("file"), Some(1234), Some(5678)).unwrap();
    sh(&format!(
        "touch -d '2003-04-05 06:07:08.987654321' '{}'",
        m.p("file").display()
    ));
    sh(&format!(
        "setfattr -n user.color -v blue '{}'",
        m.p("file").display()
    ));
    sh(&format!(
        "setfattr -n user.note -v 'x y' '{}'",
        m.p("d").display()
    ));
    m.unmount();
    let m = s.mount();
    let md = fs::metadata(m.p("file")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1049522828, 987654321));
    let x = sh(&format!(
        "getfattr --only-values -n user.color '{}'",
        m.p("file").display()
    ));
    assert_eq!(x, "blue");
    let x = sh(&format!(
        "getfattr --only-values -n user.note '{}'",
        m.p("d").display()
    ));
    assert_eq!(x, "x y");
    sh(&format!(
        "setfattr -x user.color '{}'",
        m.p("file").display()
    ));
    assert!(
        sh(&format!("getfattr -d '{}'", m.p("file").display()))
            .trim()
            .is_empty()
    );
    // Other namespaces are not stored: unsupported (as on a filesystem without ACLs, so that
    // ls stops asking), not absent, and refused when set.
    for name in ["security.selinux", "system.posix_acl_access", "trusted.x"] {
        let path = CString::new(m.p("file").as_os_str().as_bytes()).unwrap();
        let cname = CString::new(name).unwrap();
        let mut buf = [0u8; 64];
        let r = unsafe {
            libc::getxattr(
                path.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let err = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((r, err), (-1, Some(libc::EOPNOTSUPP)), "getxattr {name}");
    }
    let set = std::process::Command::new("setfattr")
        .args(["-n", "trusted.x", "-v", "1"])
        .arg(m.p("file"))
        .output()
        .unwrap();
    assert!(!set.status.success());
    assert!(
        String::from_utf8_lossy(&set.stderr).contains("not supported"),
        "{set:?}"
    );
}

#[test]
fn large_sequential_write_has_bounded_memory() {
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    let mut f = fs::File::create(m.p("big")).unwrap();
    let block: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    for _ in 0..2048 {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let peak = m.peak_rss_kib();
    assert!(peak < 300 * 1024, "peak RSS {peak} KiB while writing 2 GiB");
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), 2 << 30);
    // Spot-check content at a few offsets.
    let mut f = fs::File::open(m.p("big")).unwrap();
    for off in [0u64, (1 << 30) + 12345, (2 << 30) - 100] {
        let mut buf = [0u8; 100];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut buf).unwrap();
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(*b, ((off + i as u64) % (1 << 20) % 251) as u8);
        }
    }
    eprintln!("peak RSS while writing 2 GiB: {} MiB", peak / 1024);
}

#[test]
fn no_plaintext_at_rest() {
    require_fuse();
    let s = TestStore::new(3);
    let cache = s.dir.path().join("cache");
    let m = s.mount_with(&["--cache-dir", cache.to_str().unwrap()]);
    let marker = "COFFER-PLAINTEXT-MARKER-7f3a";
    let text = format!("{marker}\n").repeat(10_000);
    fs::write(m.p("seq.txt"), &text).unwrap();
    // A random write goes through the staging cache.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m.p("seq.txt"))
        .unwrap();
    f.seek(SeekFrom::Start(50_000)).unwrap();
    f.write_all(marker.as_bytes()).unwrap();
    f.seek(SeekFrom::Start(5)).unwrap();
    f.write_all(marker.as_bytes()).unwrap();
    // Check the cache while the staged file is open, then again after the commit.
    let grep = |dir: &Path| {
        std::process::Command::new("grep")
            .args(["-r", "-a", "-l", marker])
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(
        grep(&cache).stdout.is_empty(),
        "plaintext in the cache directory"
    );
    drop(f);
    m.unmount();
    let out = grep(&s.store);
    assert!(
        out.stdout.is_empty(),
        "plaintext in the store: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(grep(&cache).stdout.is_empty());
}

#[test]
fn damaged_objects_give_eio_and_the_mount_keeps_serving() {
    require_fuse();
    let s = TestStore::new(3);
    let m = s.mount();
    fs::write(m.p("good"), b"good data").unwrap();
    fs::write(m.p("bad"), vec![5u8; 100_000]).unwrap();
    m.unmount();
    // Flip a byte of the data file of "bad" in every replica.
    for i in 0..3 {
        let dir = s.replica(i).join("objects/bad");
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "d") {
                let mut d = fs::read(&p).unwrap();
                d[1000] ^= 0xff;
                fs::write(&p, d).unwrap();
            }
        }
    }
    let m = s.mount();
    let e = fs::read(m.p("bad")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert_eq!(fs::read(m.p("good")).unwrap(), b"good data");
    let log = m.unmount();
    assert!(
        log.contains("bad") && log.contains("corrupt"),
        "log does not name the file and cause:\n{log}"
    );
}

#[test]
fn mount_names_the_missing_key() {
    require_fuse();
    let s = TestStore::new(1);
    let other = s.dir.path().join("other.key");
    run(std::process::Command::new(coffer_bin())
        .arg("key")
        .arg("new")
        .arg(&other));
    let mnt = s.dir.path().join("m");
    fs::create_dir(&mnt).unwrap();
    let out = std::process::Command::new(coffer_bin())
        .arg("mount")
        .arg(&s.store)
        .arg(&mnt)
        .arg("--key")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let cfg = fs::read_to_string(s.store.join("coffer.toml")).unwrap();
    let id = cfg
        .split('"')
        .find(|w| {
            w.len() == 16
                && w.chars().all(|c| c.is_ascii_hexdigit())
                && !cfg.contains(&format!("store_id = \"{w}\""))
        })
        .unwrap();
    assert!(err.contains("needs key") && err.contains(id), "{err}");
    // A key file others can read is refused.
    fs::set_permissions(&s.key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(coffer_bin())
        .arg("mount")
        .arg(&s.store)
        .arg(&mnt)
        .arg("--key")
        .arg(&s.key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn a_writer_that_forks_keeps_streaming() {
    require_fuse();
    let s = TestStore::with_args(&["--replicas", "1", "--no-versioning"]);
    let m = s.mount();
    let mut f = fs::File::create(m.p("log")).unwrap();
    let block = vec![7u8; 1 << 20];
    for _ in 0..24 {
        f.write_all(&block).unwrap();
        // Each child inherits the descriptor and closes it at exec: a FUSE flush from
        // another process, which must not commit (and so end the stream) each time.
        run(&mut std::process::Command::new("true"));
    }
    drop(f);
    let log = m.unmount();
    let committed = stat(&log, "committed ");
    assert_eq!(
        committed, 1,
        "the file was committed {committed} times:\n{log}"
    );
    assert!(!log.contains("while streaming"), "{log}");
}

#[test]
fn background_scrub_repairs_a_corrupt_replica_while_mounted() {
    require_fuse();
    let s = TestStore::new(2);
    // A scrub every 1.8 seconds.
    let m = s.mount_with(&["--scrub-interval", "0.0005"]);
    fs::write(m.p("precious"), vec![9u8; 300_000]).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let dir = s.replica(1).join("objects/precious");
    let data = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "d"))
        .unwrap();
    let mut b = fs::read(&data).unwrap();
    b[7] ^= 0x40;
    fs::write(&data, b).unwrap();
    let start = std::time::Instant::now();
    while !m.log_text().contains("corrupt replicas: 1") {
        assert!(
            start.elapsed().as_secs() < 30,
            "no background scrub found the damage:\n{}",
            m.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = m.unmount();
    assert!(
        log.contains("precious") && log.contains("repaired: 1"),
        "{log}"
    );
    let out = run(std::process::Command::new(coffer_bin())
        .arg("scrub")
        .arg(&s.store));
    assert!(out.contains("corrupt replicas: 0"), "{out}");
}

#[test]
fn sequential_reads_are_served_by_read_ahead() {
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    let data: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 253) as u8).collect();
    fs::write(m.p("seq"), &data).unwrap();
    m.unmount();
    let m = s.mount();
    let mut back = Vec::new();
    let mut f = fs::File::open(m.p("seq")).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == data, "sequential read returned different bytes");
    drop(f);
    let log = m.unmount();
    let hits = stat(&log, "chunk cache ");
    // Without read-ahead every chunk of a first read is a miss.
    assert!(
        hits > 48 * 16 / 4,
        "only {hits} of 768 chunks came from read-ahead:\n{log}"
    );
}

#[test]
fn an_unchanged_file_keeps_its_cached_pages_across_opens() {
    use std::os::unix::fs::FileExt;
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    let bytes_read = || -> u64 {
        let stats = run(std::process::Command::new(coffer_bin())
            .arg("stats")
            .arg(&m.path));
        stats
            .lines()
            .find_map(|l| l.strip_prefix("bytes_read "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no bytes_read in:\n{stats}"))
    };
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(m.p("f"), &data).unwrap();
    // The first open after the write drops what the write left in the page cache.
    assert!(fs::read(m.p("f")).unwrap() == data);
    let first = bytes_read();
    assert!(
        first >= data.len() as u64,
        "the first read came from the mount"
    );
    // Opened again, unchanged: the kernel answers from its pages.
    assert!(fs::read(m.p("f")).unwrap() == data);
    assert_eq!(bytes_read(), first, "the second read reached the mount");
    // Changed through the mount, size kept: the next open drops the pages again.
    let f = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
    f.write_all_at(b"CHANGED", 1000).unwrap();
    drop(f);
    let mut want = data.clone();
    want[1000..1007].copy_from_slice(b"CHANGED");
    assert!(fs::read(m.p("f")).unwrap() == want);
    assert!(
        bytes_read() > first,
        "the read after a change reached the mount"
    );
    m.unmount();
}

#[test]
fn many_large_files_written_at_once_stay_within_the_memory_limit() {
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount_with(&["--memory-limit", "96", "--cache-size", "16"]);
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let p = m.p(&format!("w{i}"));
            std::thread::spawn(move || {
                let mut f = fs::File::create(&p).unwrap();
                let block = vec![i as u8; 1 << 20];
                for _ in 0..64 {
                    f.write_all(&block).unwrap();
                }
                f.sync_all().unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let after_writes = m.peak_rss_kib();
    // Then all six open at once for reading (sequential read-ahead on each), twice over.
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let p = m.p(&format!("w{i}"));
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let d = fs::read(&p).unwrap();
                    assert!(
                        d.len() == 64 << 20 && d.iter().all(|&b| b == i as u8),
                        "file {i}"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let peak = m.peak_rss_kib();
    eprintln!(
        "peak RSS under a 96 MiB limit and a 16 MiB cache: {} MiB after 6 writers of 64 MiB, {} MiB after 6 readers",
        after_writes / 1024,
        peak / 1024
    );
    // The limit covers buffers and caches; the process itself adds some tens of MiB.
    assert!(
        peak < 160 * 1024,
        "peak RSS {} MiB under a 96 MiB limit",
        peak / 1024
    );
    // Read-ahead lands in the 16 MiB cache and takes its gets' buffers from the budget the
    // writers have returned: six readers add at most about the cache (which the writers
    // left empty) to what the writers peaked at (a read-ahead that held its chunks until its
    // last get came in added 50 MiB here).
    assert!(
        peak < after_writes + 20 * 1024,
        "six readers took RSS from {} to {} MiB",
        after_writes / 1024,
        peak / 1024
    );
}

#[test]
fn a_cold_ls_l_takes_every_attribute_from_the_listing() {
    // Every entry's attributes come with the listing (readdirplus, with a TTL): a lookup
    // per entry would be a FUSE round trip each, and on S3 a HEAD each if the listing's
    // attributes were not trusted.
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..2000 {
        fs::write(m.p(&format!("many/f{i:05}")), b"x").unwrap();
    }
    m.unmount();
    let m = s.mount();
    let out = std::process::Command::new("ls")
        .arg("-l")
        .arg(m.p("many"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("-rw")).count(),
        2000
    );
    let log = m.unmount();
    let lookups = stat(&log, "lookups ");
    assert!(
        lookups < 10,
        "{lookups} lookups for a cold ls -l of 2,000 files"
    );
    // Nor does ls ask every entry for its SELinux label and ACL: "unsupported" once, and it
    // stops asking (it asked both of every entry while they were answered "absent").
    let xattrs = stat(&log, "xattrs_unsupported ");
    assert!(
        xattrs < 10,
        "{xattrs} xattr requests for a cold ls -l of 2,000 files"
    );
}
