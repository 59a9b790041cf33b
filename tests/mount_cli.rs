//! The command line around mounting: the first-run default store, detached mounts, keys
//! missing for some files, and reading a store without mounting it.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn first_run_creates_the_default_store_and_key() {
    require_fuse();
    let home = tempfile::tempdir().unwrap();
    let mnt = home.path().join("coffer");
    fs::create_dir(&mnt).unwrap();
    let log = home.path().join("mount.log");
    let mut child = Command::new(coffer_bin())
        .arg("mount")
        .arg(&mnt)
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the default mount", || is_mounted(&mnt));
    fs::write(mnt.join("hello.txt"), b"first run").unwrap();
    let key = home.path().join(".config/coffer/root.key");
    let store = home.path().join(".local/share/coffer/default");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for i in 0..3 {
        assert!(store.join(format!("replica-{i}/replica.json")).exists());
    }
    // SIGTERM commits and unmounts.
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(!is_mounted(&mnt));
    assert!(
        text.contains(key.to_str().unwrap()) && text.contains("losing it loses the data"),
        "{text}"
    );
    // The file is in the store, readable without mounting.
    let out = run(Command::new(coffer_bin())
        .arg("cat")
        .arg(&store)
        .arg("hello.txt")
        .env("HOME", home.path()));
    assert_eq!(out, "first run");
    let ls = run(Command::new(coffer_bin())
        .arg("ls")
        .arg(&store)
        .env("HOME", home.path()));
    assert!(ls.contains("9  hello.txt"), "{ls}");
}

#[test]
fn daemon_mode_returns_once_ready_and_reports_failures() {
    require_fuse();
    let s = TestStore::new(1);
    let mnt = s.dir.path().join("m");
    fs::create_dir(&mnt).unwrap();
    let log = s.dir.path().join("daemon.log");
    let out = Command::new(coffer_bin())
        .arg("mount")
        .arg(&s.store)
        .arg(&mnt)
        .arg("--key")
        .arg(&s.key)
        .arg("-d")
        .arg("--log-file")
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ready when the command returned: no waiting.
    assert!(is_mounted(&mnt));
    fs::write(mnt.join("f"), b"daemon").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"daemon");
    run(Command::new("umount").arg(&mnt));
    wait_until("the daemon to exit", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("unmounted")
    });
    // A failure after detaching comes back to the caller, with its reason.
    let out = Command::new(coffer_bin())
        .arg("mount")
        .arg(&s.store)
        .arg(s.dir.path().join("no-such-dir"))
        .arg("--key")
        .arg(&s.key)
        .arg("-d")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_file_wrapped_by_a_key_the_mount_lacks_gives_eacces() {
    require_fuse();
    let s = TestStore::new(1);
    let m = s.mount();
    fs::write(m.p("old"), b"written with key A").unwrap();
    m.unmount();
    // Mount with a new key B first in the ring: new files are wrapped by B.
    let b = s.dir.path().join("b.key");
    run(Command::new(coffer_bin()).arg("key").arg("new").arg(&b));
    let mnt = s.dir.path().join("mb");
    fs::create_dir(&mnt).unwrap();
    let mb = Mount::start(&s.store, &mnt, &b, &["--key", s.key.to_str().unwrap()]);
    fs::write(mb.p("new"), b"written with key B").unwrap();
    assert_eq!(fs::read(mb.p("old")).unwrap(), b"written with key A");
    mb.unmount();
    // The store now expects A or B; a mount with only A reads the old file, and the new one
    // fails with EACCES and a log line naming the file and the missing key.
    let b_id = run(Command::new(coffer_bin()).arg("key").arg("id").arg(&b));
    let cfg = fs::read_to_string(s.store.join("coffer.toml")).unwrap();
    assert!(cfg.contains(b_id.trim()), "{cfg}");
    let m = s.mount();
    assert_eq!(fs::read(m.p("old")).unwrap(), b"written with key A");
    let e = fs::read(m.p("new")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    assert_eq!(
        fs::read(m.p("old")).unwrap(),
        b"written with key A",
        "mount stopped serving"
    );
    let log = m.unmount();
    assert!(log.contains("new") && log.contains("pass --key"), "{log}");
}

/// Runs `sh -c script` as user and group 65534 (nobody); returns whether it succeeded and
/// its standard error.
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn allow_other_with_default_permissions_checks_every_user() {
    require_fuse();
    require_tool("setpriv", "util-linux");
    let s = TestStore::new(1);
    // Other users must be able to reach the mount point.
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = s.mount_with(&["-o", "allow_other,default_permissions"]);
    fs::write(m.p("public"), b"everyone").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(m.p("private"), b"root only").unwrap();
    fs::set_permissions(m.p("private"), fs::Permissions::from_mode(0o600)).unwrap();
    let p = |n: &str| m.p(n).display().to_string();
    assert!(as_nobody(&format!("cat '{}'", p("public"))).0);
    let (ok, err) = as_nobody(&format!("cat '{}'", p("private")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("echo x > '{}'", p("public")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("touch '{}'", p("new")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    m.unmount();
    // Without allow_other, other users cannot enter the mount at all.
    let m = s.mount();
    let (ok, _) = as_nobody(&format!("cat '{}'", m.p("public").display()));
    assert!(!ok);
}

#[test]
fn a_public_key_mount_writes_but_cannot_read() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let (public, private) = (
        dir.path().join("backup.pub"),
        dir.path().join("backup.priv"),
    );
    run(Command::new(coffer_bin())
        .args(["key", "new"])
        .arg(&public)
        .arg("--pair")
        .arg(&private));
    let id = run(Command::new(coffer_bin()).args(["key", "id"]).arg(&public));
    assert_eq!(
        id,
        run(Command::new(coffer_bin()).args(["key", "id"]).arg(&private))
    );
    let store = dir.path().join("store");
    run(Command::new(coffer_bin())
        .arg("init")
        .arg(&store)
        .arg("--key")
        .arg(&public));
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // The backup host: only the public key.
    let m = Mount::start(&store, &mnt, &public, &[]);
    fs::write(m.p("first.txt"), b"written by the backup host").unwrap();
    fs::create_dir(m.p("docs")).unwrap();
    fs::write(m.p("docs/second.txt"), vec![7u8; 200_000]).unwrap();
    m.unmount();
    let m = Mount::start(&store, &mnt, &public, &[]);
    // Sizes and names show; contents do not.
    assert_eq!(fs::metadata(m.p("docs/second.txt")).unwrap().len(), 200_000);
    let e = fs::read(m.p("first.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    // New backups still go in, replacing old ones too.
    fs::write(m.p("third.txt"), b"another backup").unwrap();
    fs::write(m.p("first.txt"), b"replaced").unwrap();
    let log = m.unmount();
    assert!(log.contains("only the public key"), "{log}");
    // The restore host: the private key reads everything.
    let m = Mount::start(&store, &mnt, &private, &[]);
    assert_eq!(fs::read(m.p("first.txt")).unwrap(), b"replaced");
    assert_eq!(fs::read(m.p("third.txt")).unwrap(), b"another backup");
    assert_eq!(
        fs::read(m.p("docs/second.txt")).unwrap(),
        vec![7u8; 200_000]
    );
    m.unmount();
}

#[test]
fn encrypted_names_round_trip_and_never_reach_the_replicas() {
    require_fuse();
    require_tool("rsync", "rsync");
    let s = TestStore::with_args(&["--replicas", "2", "--encrypt-names"]);
    let src = s.dir.path().join("src");
    make_tree(&src, 1);
    let m = s.mount();
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    assert_trees_equal(&src, &m.p("tree"));
    // A directory rename re-encrypts every name below it (names are bound to their parent).
    fs::rename(m.p("tree/a"), m.p("moved")).unwrap();
    fs::rename(m.p("moved"), m.p("tree/a")).unwrap();
    m.unmount();
    let m = s.mount();
    assert_trees_equal(&src, &m.p("tree"));
    fs::remove_file(m.p("tree/one")).unwrap();
    m.unmount();
    // No plaintext name reaches the store's files.
    let stored = sh(&format!(
        "find '{}' '{}' -printf '%f\\n'",
        s.replica(0).display(),
        s.replica(1).display()
    ));
    for name in [
        "tree",
        "deep-empty",
        "run.sh",
        "with space",
        "ünïcødé",
        "odd-size",
        "nnnnnnnnnn",
    ] {
        assert!(!stored.contains(name), "{name:?} is stored in clear");
    }
    // Versions list under plaintext names, and a deleted file comes back.
    let key = s.key.to_str().unwrap();
    let store = s.store.to_str().unwrap();
    let versions =
        run(Command::new(coffer_bin()).args(["versions", store, "tree/one", "--key", key]));
    let id = versions
        .lines()
        .find(|l| l.contains("tree/one") && !l.contains("deleted"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no version of tree/one in {versions}"));
    run(Command::new(coffer_bin()).args(["restore", store, "tree/one", id, "--key", key]));
    let m = s.mount();
    assert_eq!(
        fs::read(m.p("tree/one")).unwrap(),
        fs::read(src.join("one")).unwrap()
    );
    m.unmount();
    // Without the root key the names cannot be read: the command fails and says why.
    let other = s.dir.path().join("other.key");
    run(Command::new(coffer_bin()).args(["key", "new"]).arg(&other));
    let other = other.to_str().unwrap();
    let out = Command::new(coffer_bin())
        .args(["ls", store, "--key", other])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs key"), "{err}");
    // Rotation rewraps the name key with the data keys: afterwards the new key alone reads
    // every name and file.
    run(Command::new(coffer_bin()).args(["key", "rotate", store, "--key", key, "--to", other]));
    let mnt = s.dir.path().join("mnt-rotated");
    fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&s.store, &mnt, Path::new(other), &[]);
    assert_trees_equal(&src, &m.p("tree"));
    m.unmount();
}

fn golden(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// The 100,000 bytes of `dir/large.bin` in the golden store.
fn golden_large() -> Vec<u8> {
    use sha2::Digest;
    (0..3125)
        .flat_map(|i: u32| sha2::Sha256::digest(i.to_string().as_bytes()).to_vec())
        .collect()
}

/// The names in `dir`, sorted.
fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Every file name under `dir`, recursively.
fn file_names(dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            file_names(&e.path(), out);
        } else {
            out.push(e.file_name().into_string().unwrap());
        }
    }
}

/// tests/golden/store-v29 is a store written by the coffer of stop 29 (two replicas, the
/// nested `%v` layout, small versions embedded in their records): `coffer init`, then
/// through a mount `small.txt` (its mtime set to 2020-01-02 03:04:05 UTC), `dir/large.bin`,
/// `dir/sub/empty`, the symlink `link`, `overwritten` written twice, `deleted` written and
/// removed, `before` renamed to `renamed` and chmod 600, and an unmount. This coffer reads
/// all of it, lists its old versions and restores one, writes into it in the same layout,
/// and scrubs it clean.
#[test]
fn a_store_written_by_an_earlier_coffer_reads_writes_and_keeps_its_layout() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    run(Command::new("cp")
        .arg("-a")
        .arg(golden("store-v29"))
        .arg(&store));
    // The config names the replicas by absolute path, and git keeps no empty directories.
    let toml = fs::read_to_string(store.join("coffer.toml")).unwrap();
    assert!(!toml.contains("layout"), "{toml}");
    fs::write(
        store.join("coffer.toml"),
        toml.replace("/tmp/gs/store", store.to_str().unwrap()),
    )
    .unwrap();
    for r in 0..2 {
        fs::create_dir_all(store.join(format!("replica-{r}/tmp"))).unwrap();
    }
    let key = dir.path().join("root.key");
    fs::copy(golden("store-v29.key"), &key).unwrap();
    for f in [&key, &store.join("sse-s3.key")] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let coffer = |args: &[&str]| run(Command::new(coffer_bin()).args(args).arg("--key").arg(&key));
    let s = store.to_str().unwrap();
    let versions = coffer(&["versions", s, "overwritten"]);
    assert_eq!(versions.lines().count(), 4, "{versions}");
    let deleted = coffer(&["versions", s, "deleted"]);
    let gone = deleted
        .lines()
        .find(|l| l.contains(" 4  deleted"))
        .unwrap_or_else(|| panic!("{deleted}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    coffer(&["restore", s, "deleted", &gone]);

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&store, &mnt, &key, &[]);
    let check_old = |m: &Mount| {
        assert_eq!(fs::read(m.p("dir/large.bin")).unwrap(), golden_large());
        assert_eq!(fs::read(m.p("dir/sub/empty")).unwrap(), b"");
        assert_eq!(
            fs::read_link(m.p("link")).unwrap(),
            Path::new("dir/large.bin")
        );
        assert_eq!(fs::read(m.p("link")).unwrap(), golden_large());
        assert_eq!(fs::read(m.p("renamed")).unwrap(), b"moved");
        assert_eq!(
            fs::metadata(m.p("renamed")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(m.p("deleted")).unwrap(), b"gone");
    };
    check_old(&m);
    assert_eq!(fs::read(m.p("small.txt")).unwrap(), b"a small file");
    let mtime = fs::metadata(m.p("small.txt")).unwrap().modified().unwrap();
    assert_eq!(
        mtime
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_577_934_245
    );
    assert_eq!(fs::read(m.p("overwritten")).unwrap(), b"second");
    assert_eq!(
        sorted_names(&m.path),
        [
            "deleted",
            "dir",
            "link",
            "overwritten",
            "renamed",
            "small.txt"
        ]
    );
    // Writes of every kind into the old store.
    fs::write(m.p("new.txt"), b"written now").unwrap();
    fs::write(m.p("dir/new-large"), vec![8u8; 50_000]).unwrap();
    fs::write(m.p("overwritten"), b"third").unwrap();
    fs::rename(m.p("small.txt"), m.p("dir/sub/small.txt")).unwrap();
    fs::create_dir(m.p("newdir")).unwrap();
    m.unmount();

    // They went where the nested layout puts them, and nothing in the flat one.
    for r in 0..2 {
        let objects = store.join(format!("replica-{r}/objects"));
        for (key, files) in [
            ("new.txt", 1),
            ("dir/new-large", 2),
            ("dir/sub/small.txt", 1),
        ] {
            let n = fs::read_dir(objects.join(key).join("%v")).unwrap().count();
            assert_eq!(n, files, "{key} on replica {r}");
        }
        let mut all = Vec::new();
        file_names(&objects, &mut all);
        assert!(
            all.iter().all(|n| !n.starts_with('%') || n == "%n"),
            "{all:?}"
        );
    }
    let report = run(Command::new(coffer_bin()).arg("scrub").arg(&store));
    assert!(
        report.contains("missing replicas: 0, corrupt replicas: 0, lost versions: 0"),
        "{report}"
    );
    let m = Mount::start(&store, &mnt, &key, &[]);
    check_old(&m);
    assert_eq!(fs::read(m.p("new.txt")).unwrap(), b"written now");
    assert_eq!(fs::read(m.p("dir/new-large")).unwrap(), vec![8u8; 50_000]);
    assert_eq!(fs::read(m.p("overwritten")).unwrap(), b"third");
    assert_eq!(fs::read(m.p("dir/sub/small.txt")).unwrap(), b"a small file");
    assert!(!m.p("small.txt").exists());
    assert!(m.p("newdir").is_dir());
    m.unmount();
    assert!(
        !fs::read_to_string(store.join("coffer.toml"))
            .unwrap()
            .contains("layout"),
        "the old store's config is left as it was"
    );
}

/// A new store says that it is flat in its config (so that an older coffer refuses it
/// rather than finding it empty) and keeps each version's files in its key's directory.
#[test]
fn a_new_store_is_flat_and_says_so() {
    require_fuse();
    let s = TestStore::new(1);
    let toml = fs::read_to_string(s.store.join("coffer.toml")).unwrap();
    assert!(toml.contains("layout = \"flat\""), "{toml}");
    let m = s.mount();
    fs::write(m.p("a"), b"small").unwrap();
    fs::write(m.p("b"), vec![1u8; 40_000]).unwrap();
    m.unmount();
    let objects = s.replica(0).join("objects");
    for (key, exts) in [("a", vec!["m"]), ("b", vec!["d", "m"])] {
        let found = sorted_names(&objects.join(key));
        assert_eq!(found.len(), exts.len(), "{found:?}");
        for (name, ext) in found.iter().zip(exts) {
            assert!(
                name.starts_with('%') && name.ends_with(&format!(".{ext}")),
                "{name}"
            );
        }
    }
}
