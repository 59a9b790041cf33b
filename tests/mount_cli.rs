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
