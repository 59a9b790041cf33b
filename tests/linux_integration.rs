//! coffer as a Linux filesystem tool: the Debian package and its mount helper, fstab lines
//! in a private mount namespace, systemd units, man pages and completions, the config file,
//! live statistics, and a new mount over the corpse of a killed one.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn require_root() {
    // SAFETY: getuid cannot fail.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "these tests install a package and mount in a private namespace: run them as root (CI does)"
    );
}

/// Removes the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-r", "coffer"]).output();
    }
}

#[test]
fn the_package_installs_and_its_helper_mounts_from_fstab() {
    require_root();
    require_fuse();
    require_tool("dpkg-deb", "dpkg");
    require_tool("systemd-analyze", "systemd");
    require_tool("man", "man-db");
    require_tool("rsync", "rsync");
    let dir = tempfile::Builder::new()
        .prefix("coffer-pkg-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = sh(&format!(
        "'{}/scripts/package' --binary '{}' --out '{}'",
        repo.display(),
        coffer_bin().display(),
        d.join("deb").display()
    ));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb"), "{deb}");
    sh(&format!("dpkg -i '{deb}'"));
    let _installed = Installed;
    for f in [
        "/usr/bin/coffer",
        "/usr/sbin/mount.fuse.coffer",
        "/usr/lib/systemd/system/coffer@.service",
        "/usr/share/man/man1/coffer-mount.1.gz",
        "/usr/share/bash-completion/completions/coffer",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }

    // The units pass systemd's own check (the examples under the names they need).
    let units = d.join("units");
    fs::create_dir(&units).unwrap();
    for u in ["mnt-backup.mount", "mnt-backup.automount"] {
        fs::copy(repo.join("packaging/examples").join(u), units.join(u)).unwrap();
    }
    sh(&format!(
        "cd '{}' && systemd-analyze verify coffer@backup.service ./mnt-backup.mount ./mnt-backup.automount",
        units.display()
    ));

    // The man page renders; completions load in bash.
    let page = sh("MANWIDTH=80 man -l /usr/share/man/man1/coffer-mount.1.gz | col -b");
    assert!(
        page.contains("coffer-mount") && page.contains("--sse-c-key"),
        "{page}"
    );
    let comp =
        sh("bash -c 'source /usr/share/bash-completion/completions/coffer && complete -p coffer'");
    assert!(comp.contains("_coffer"), "{comp}");

    // A local store mounted through an fstab line, in a private mount namespace whose
    // /etc/fstab is ours; then `mount -t fuse.coffer` with the options inline.
    let store = d.join("store");
    let key = d.join("root.key");
    run(Command::new("/usr/bin/coffer")
        .arg("init")
        .arg(&store)
        .arg("--key")
        .arg(&key));
    let (mnt, mnt2) = (d.join("mnt"), d.join("mnt2"));
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&mnt2).unwrap();
    let src = d.join("src");
    make_tree(&src, 2);
    let script = format!(
        r#"set -e
cp /etc/fstab '{d}/fstab'
echo '{store} {mnt} fuse.coffer nofail,_netdev,key={key},cache_size=64 0 0' >> '{d}/fstab'
mount --bind '{d}/fstab' /etc/fstab
mount '{mnt}'
grep -q ' {mnt} ' /proc/self/mounts
rsync -a '{src}/' '{mnt}/tree/'
coffer stats '{mnt}' > '{d}/stats'
umount '{mnt}'
! grep -q ' {mnt} ' /proc/self/mounts
mount -t fuse.coffer '{store}' '{mnt2}' -o key={key},ro
rsync -a '{mnt2}/tree/' '{d}/back/'
umount '{mnt2}'
"#,
        d = d.display(),
        store = store.display(),
        mnt = mnt.display(),
        mnt2 = mnt2.display(),
        key = key.display(),
        src = src.display(),
    );
    sh(&format!(
        "unshare -m --propagation private bash -c {}",
        shell_quote(&script)
    ));
    assert_trees_equal(&src, &d.join("back"));
    // `coffer stats` answered while mounted, with the rsync's traffic in it.
    let stats = fs::read_to_string(d.join("stats")).unwrap();
    let value = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{stats}"))
    };
    assert!(value("bytes_written") > 2 << 20, "{stats}");
    assert!(value("files_committed") > 10, "{stats}");
    assert!(value("resident_bytes") > 0, "{stats}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn config_files_hold_mount_options_and_reject_unknown_keys() {
    require_fuse();
    let s = TestStore::new(1);
    let d = s.dir.path();
    let mnt = d.join("cfg-mnt");
    fs::create_dir(&mnt).unwrap();
    let cfg = d.join("vault.toml");
    fs::write(
        &cfg,
        format!(
            "source = \"{}\"\nmountpoint = \"{}\"\nkey = [\"{}\"]\noptions = [\"noatime\"]\ncache_size = 32\nlog = \"debug\"\n",
            s.store.display(),
            mnt.display(),
            s.key.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(coffer_bin());
    cmd.arg("mount").arg("--config").arg(&cfg);
    let m = Mount::start_cmd(cmd, &mnt);
    fs::write(m.p("a.txt"), b"from a config file").unwrap();
    let log = m.unmount();
    // The file's `log = "debug"` took effect.
    assert!(log.contains("DEBUG"), "{log}");
    // A mistyped key is an error naming it and its line; nothing is mounted.
    fs::write(
        &cfg,
        "source = \"/x\"\nmountpoint = \"/y\"\ncache_sise = 3\n",
    )
    .unwrap();
    let out = Command::new(coffer_bin())
        .args(["mount", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("cache_sise"),
        "{err}"
    );
    // Every mount option also works as -o name=value.
    let m = s.mount_with(&["-o", "cache_size=16,noatime,log=debug"]);
    assert_eq!(fs::read(m.p("a.txt")).unwrap(), b"from a config file");
    assert!(m.unmount().contains("DEBUG"));
}

#[test]
fn a_killed_mount_is_replaced_on_the_same_mount_point() {
    require_fuse();
    let s = TestStore::new(1);
    let mnt = s.dir.path().join("same");
    fs::create_dir(&mnt).unwrap();
    let m = Mount::start(&s.store, &mnt, &s.key, &[]);
    fs::write(m.p("kept.txt"), b"survives").unwrap();
    m.kill_leaving_stale_mount();
    let e = fs::metadata(&mnt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let m = Mount::start(&s.store, &mnt, &s.key, &[]);
    assert_eq!(fs::read(m.p("kept.txt")).unwrap(), b"survives");
    assert!(m.log_text().contains("stale mount"));
    m.unmount();
}

#[test]
fn prometheus_figures_and_log_reopening() {
    use std::io::{Read, Write};
    require_fuse();
    let s = TestStore::new(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = s.dir.path().join("coffer.log");
    let addr = format!("127.0.0.1:{port}");
    let m = s.mount_with(&["--prometheus", &addr, "--log-file", log.to_str().unwrap()]);
    fs::write(m.p("x"), vec![1u8; 100_000]).unwrap();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("# TYPE coffer_bytes_written counter"),
        "{answer}"
    );
    assert!(answer.contains("coffer_bytes_written 100000"), "{answer}");
    // logrotate moves the file away; SIGHUP makes coffer write to a new one.
    fs::rename(&log, s.dir.path().join("coffer.log.1")).unwrap();
    sh(&format!("kill -HUP {}", m.pid()));
    let start = std::time::Instant::now();
    while !log.exists() {
        assert!(
            start.elapsed().as_secs() < 10,
            "no new log file after SIGHUP"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    m.unmount();
    assert!(fs::read_to_string(&log).unwrap().contains("unmounted"));
    // Only loopback addresses are served.
    let out = Command::new(coffer_bin())
        .arg("mount")
        .arg(&s.store)
        .arg(s.dir.path())
        .args([
            "--key",
            s.key.to_str().unwrap(),
            "--prometheus",
            "0.0.0.0:9464",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
