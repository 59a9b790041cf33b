//! The local key service: a store whose data keys come from `coffer kms serve`, a disabled
//! key that stops reads and writes with an error naming it, rotation, per-uid policy, and
//! the audit log.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Service {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_service(root: &Path) -> Service {
    let master = root.join("master.key");
    run(Command::new(coffer_bin()).args(["key", "new"]).arg(&master));
    let dir = root.join("kms");
    let socket = root.join("kms.sock");
    let child = Command::new(coffer_bin())
        .args(["kms", "serve", "--dir"])
        .arg(&dir)
        .arg("--master-key")
        .arg(&master)
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the key service did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Service { child, dir, socket }
}

fn kms(svc: &Service, args: &[&str]) -> String {
    run(Command::new(coffer_bin())
        .arg("kms")
        .args(args)
        .arg("--socket")
        .arg(&svc.socket))
}

#[test]
fn a_disabled_key_stops_reads_and_writes_and_every_use_is_audited() {
    require_fuse();
    let dir = tempfile::tempdir().unwrap();
    let svc = start_service(dir.path());
    kms(&svc, &["create", "backup"]);
    let spec = format!("kms:{}#backup", svc.socket.display());
    let store = dir.path().join("store");
    run(Command::new(coffer_bin())
        .arg("init")
        .arg(&store)
        .args(["--key", &spec]));
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let key = Path::new(&spec);
    let m = Mount::start(&store, &mnt, key, &[]);
    for i in 0..3 {
        fs::write(m.p(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    m.unmount();
    let audit = |what: &str| -> usize {
        run(Command::new(coffer_bin())
            .args(["kms", "audit", "--dir"])
            .arg(&svc.dir))
        .lines()
        .filter(|l| l.contains(what))
        .count()
    };
    assert_eq!(audit("op=generate_data_key key=backup version=1"), 3);

    kms(&svc, &["disable", "backup"]);
    let m = Mount::start(&store, &mnt, key, &[]);
    let e = fs::read(m.p("f0")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = fs::write(m.p("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let log = m.unmount();
    assert!(log.contains("\"backup\" is disabled"), "{log}");
    assert!(audit("result=disabled") >= 2);

    kms(&svc, &["enable", "backup"]);
    let rotated = kms(&svc, &["rotate", "backup"]);
    assert!(rotated.contains("version 2"), "{rotated}");
    let m = Mount::start(&store, &mnt, key, &[]);
    for i in 0..3 {
        assert_eq!(
            fs::read_to_string(m.p(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    fs::write(m.p("after-rotation"), b"new version").unwrap();
    m.unmount();
    assert_eq!(audit("op=generate_data_key key=backup version=2"), 1);
    assert!(audit("op=decrypt key=backup version=1") >= 3);
    // One line per use, each with the caller's uid and pid and the object's id.
    let all = run(Command::new(coffer_bin())
        .args(["kms", "audit", "--dir"])
        .arg(&svc.dir));
    for l in all
        .lines()
        .filter(|l| l.contains("op=decrypt") && l.contains("result=ok"))
    {
        assert!(
            l.contains(" uid=0 ") && l.contains(" pid=") && !l.contains("object=-"),
            "{l}"
        );
    }
    let m = Mount::start(&store, &mnt, key, &[]);
    assert_eq!(fs::read(m.p("after-rotation")).unwrap(), b"new version");
    m.unmount();
    // The key material never reaches the audit log or the store's config.
    assert!(!all.contains("plaintext"));
}

#[test]
fn other_uids_follow_the_key_policy() {
    require_tool("setpriv", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    // Other users reach the socket (the key store's own directory stays 0700).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let svc = start_service(dir.path());
    kms(&svc, &["create", "shared", "--decrypt-uid", "65534"]);
    kms(&svc, &["create", "private"]);
    let ask = |req: &str| -> String {
        let script = format!(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect('{}')\ns.sendall(b'{}\\n')\nsys.stdout.write(s.makefile().readline())",
            svc.socket.display(),
            req
        );
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let generate =
        |key: &str| format!(r#"{{"op":"generate_data_key","key":"{key}","context":"00"}}"#);
    assert!(ask(&generate("shared")).contains("may not encrypt"));
    assert!(ask(&generate("private")).contains("may not encrypt"));
    let dec =
        |key: &str| format!(r#"{{"op":"decrypt","key":"{key}","blob":"AAAA","context":"00"}}"#);
    // Allowed to decrypt "shared" (the bogus blob then fails), not "private".
    let shared = ask(&dec("shared"));
    assert!(
        shared.contains("does not open") || shared.contains("too short"),
        "{shared}"
    );
    assert!(ask(&dec("private")).contains("may not decrypt"));
    assert!(ask(r#"{"op":"disable","key":"shared"}"#).contains("may not administer"));
}

#[test]
fn a_passphrase_seals_the_service_keys() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("kms");
    let socket = dir.path().join("kms.sock");
    let serve = |pass: &str| {
        let _ = fs::remove_file(&socket);
        Command::new(coffer_bin())
            .args([
                "kms",
                "serve",
                "--passphrase-env",
                "COFFER_TEST_PASS",
                "--dir",
            ])
            .arg(&kdir)
            .arg("--socket")
            .arg(&socket)
            .env("COFFER_TEST_PASS", pass)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_socket = || {
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut child = serve("a long enough passphrase");
    wait_socket();
    run(Command::new(coffer_bin())
        .args(["kms", "create", "backup", "--socket"])
        .arg(&socket));
    child.kill().unwrap();
    child.wait().unwrap();
    let sealed = fs::read(kdir.join("keys.sealed")).unwrap();
    assert!(!sealed.windows(6).any(|w| w == b"backup"));
    // A wrong passphrase cannot open the store: the service refuses to start, saying why.
    let out = serve("not the passphrase at all")
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not open"),
        "{err}"
    );
    // The right one serves the key created before.
    let mut child = serve("a long enough passphrase");
    wait_socket();
    let list = run(Command::new(coffer_bin())
        .args(["kms", "list", "--socket"])
        .arg(&socket));
    assert!(list.contains("backup"), "{list}");
    child.kill().unwrap();
    child.wait().unwrap();
    // Passphrases are never taken from the command line.
    let out = Command::new(coffer_bin())
        .args(["kms", "serve", "--passphrase", "x", "--dir"])
        .arg(&kdir)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
