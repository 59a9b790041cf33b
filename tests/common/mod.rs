//! Shared helpers of the integration tests: a store in a temporary directory, and a real
//! FUSE mount of it by the `coffer` binary.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn coffer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coffer"))
}

/// Fails (never skips) when this machine cannot mount FUSE, saying how to fix it.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount for real; run them where FUSE is available"
    );
    let ok = Command::new("fusermount3")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "fusermount3 is missing: install it with `apt-get install fuse3` (scripts/test does)"
    );
}

pub fn require_tool(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{tool} is missing: install it with `apt-get install {package}` (scripts/test does)"
    );
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str) -> String {
    run(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script))
}

/// A local store with its key, in a temporary directory.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub key: PathBuf,
}

impl TestStore {
    pub fn new(replicas: usize) -> TestStore {
        Self::with_args(&["--replicas", &replicas.to_string()])
    }

    pub fn with_args(args: &[&str]) -> TestStore {
        let dir = tempfile::Builder::new()
            .prefix("coffer-test-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        let key = dir.path().join("root.key");
        run(Command::new(coffer_bin())
            .arg("init")
            .arg(&store)
            .arg("--key")
            .arg(&key)
            .args(args));
        TestStore { dir, store, key }
    }

    pub fn mount(&self) -> Mount {
        self.mount_with(&[])
    }

    pub fn mount_with(&self, extra: &[&str]) -> Mount {
        let mnt = self.dir.path().join(format!("mnt-{}", rand_suffix()));
        fs::create_dir_all(&mnt).unwrap();
        Mount::start(&self.store, &mnt, &self.key, extra)
    }

    pub fn replica(&self, i: usize) -> PathBuf {
        self.store.join(format!("replica-{i}"))
    }
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn is_mounted(path: &Path) -> bool {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let target = canon.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
}

/// A running `coffer mount`, unmounted (and waited for) on drop.
pub struct Mount {
    pub path: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Mount {
    pub fn start(store: &Path, mnt: &Path, key: &Path, extra: &[&str]) -> Mount {
        let mut cmd = Command::new(coffer_bin());
        cmd.arg("mount")
            .arg(store)
            .arg(mnt)
            .arg("--key")
            .arg(key)
            .args(extra);
        Mount::start_cmd(cmd, mnt)
    }

    /// Runs a prepared `coffer mount` command (arguments and environment set) and waits
    /// until the mount answers.
    pub fn start_cmd(mut cmd: Command, mnt: &Path) -> Mount {
        let log = mnt.with_extension("log");
        let logf = fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("starting coffer mount");
        let mut m = Mount {
            path: mnt.to_path_buf(),
            child: Some(child),
            log,
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&mut self) {
        let start = Instant::now();
        // Mounted and answering (a stale mount of a killed process is in the table too).
        while !(is_mounted(&self.path) && fs::metadata(&self.path).is_ok()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("coffer mount exited with {status}:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmounts cleanly and waits for the process; panics if it failed.
    pub fn unmount(mut self) -> String {
        self.do_unmount();
        self.log_text()
    }

    fn do_unmount(&mut self) {
        if let Some(mut child) = self.child.take() {
            if is_mounted(&self.path) {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg(&self.path)
                    .status();
            }
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "coffer mount exited with {status}:\n{}",
                        self.log_text()
                    );
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    let _ = child.kill();
                    panic!(
                        "coffer mount did not exit after unmount:\n{}",
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the mount process with SIGKILL and clears the dead mount point.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.path)
                .status();
        }
    }

    /// Kills the mount process with SIGKILL and leaves its dead mount behind ("Transport
    /// endpoint is not connected"), as a crash does.
    pub fn kill_leaving_stale_mount(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Peak resident memory of the mount process so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            if std::thread::panicking() {
                if let Some(mut c) = self.child.take() {
                    let _ = Command::new("fusermount3")
                        .arg("-uz")
                        .arg(&self.path)
                        .status();
                    let _ = c.kill();
                    let _ = c.wait();
                }
                eprintln!("mount log:\n{}", self.log_text());
            } else {
                self.do_unmount();
            }
        }
    }
}

/// Builds the tree the round-trip tests copy: nested directories, symlinks, empty files,
/// a large file, odd names (spaces, unicode, 255-byte names), varied modes and mtimes.
pub fn make_tree(root: &Path, big_mib: usize) {
    fs::create_dir_all(root).unwrap();
    let long = "n".repeat(255);
    let long_unicode = "é".repeat(127); // 254 bytes
    sh(&format!(
        r#"
cd '{root}'
mkdir -p a/b/c/d empty 'dir with space' 'ünïcødé dir'
echo one > one
: > emptyfile
: > a/b/c/d/deep-empty
echo spaced > 'with space'
echo uni > 'ünïcødé.txt'
echo long > '{long}'
echo longer > '{long_unicode}'
echo 'exec me' > a/run.sh && chmod 755 a/run.sh
echo secret > a/private && chmod 600 a/private
chmod 751 a/b
chmod 700 empty
ln -s one link-to-one
ln -s a/b/c link-to-dir
ln -s /nonexistent/target dangling
ln -s '../with space' a/up-link
head -c {big} /dev/urandom > a/b/big.bin
head -c 100000 /dev/urandom > a/b/c/odd-size.bin
# rsync compares times in whole seconds: an entry created in the same second as its source
# would keep its own nanoseconds. Give every entry an old time first.
find . -mindepth 1 -exec touch -h -d '2020-01-02 03:04:05.678901234' {{}} +
touch -h -d '2001-02-03 04:05:06.123456789' one link-to-one
touch -d '1999-12-31 23:59:59.999999999' a/private
touch -d '2030-01-01 00:00:00.5' 'with space'
touch -d '2010-06-15 12:00:00.000000001' a/b/c
"#,
        root = root.display(),
        big = big_mib << 20,
    ));
}

/// Compares two trees: contents, and mode, mtime (ns), owner and symlink targets of
/// every entry.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    sh(&format!(
        "diff -r --no-dereference '{}' '{}'",
        a.display(),
        b.display()
    ));
    let listing = |root: &Path| {
        sh(&format!(
            "cd '{}' && find . -mindepth 1 -printf '%p\\t%M\\t%u\\t%g\\t%s\\t%l\\t%T@\\n' | LC_ALL=C sort",
            root.display()
        ))
    };
    let (la, lb) = (listing(a), listing(b));
    // Directory sizes differ between filesystems; compare everything else.
    let norm = |s: &str| {
        s.lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                if f[1].starts_with('d') {
                    let mut g = f.clone();
                    g[4] = "-";
                    g.join("\t")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(norm(&la), norm(&lb), "trees differ in attributes");
}

/// A counter from the stats line a mount logs at unmount, e.g. `stat(log, "committed ")`.
pub fn stat(log: &str, after: &str) -> u64 {
    log.lines()
        .find_map(|l| l.split(after).nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim_end_matches([';', ',']).parse().ok())
        .unwrap_or_else(|| panic!("no {after:?} in the mount's stats line:\n{log}"))
}

/// A vfs over `store` for tests that drive it without FUSE: one root key of `key_byte`s,
/// chunks of 2^`chunk_shift` bytes, objects under `prefix`, a 1 MiB chunk cache.
pub fn test_vfs(
    store: std::sync::Arc<dyn coffer::store::ObjectStore>,
    staging: &Path,
    prefix: &str,
    chunk_shift: u8,
    key_byte: u8,
) -> std::sync::Arc<coffer::vfs::Vfs> {
    test_vfs_with_cache(store, staging, prefix, chunk_shift, key_byte, 1 << 20)
}

/// [`test_vfs`] with a chunk cache of `cache_bytes`.
pub fn test_vfs_with_cache(
    store: std::sync::Arc<dyn coffer::store::ObjectStore>,
    staging: &Path,
    prefix: &str,
    chunk_shift: u8,
    key_byte: u8,
    cache_bytes: usize,
) -> std::sync::Arc<coffer::vfs::Vfs> {
    use coffer::crypt::keys::{KeyRing, RootKey};
    use coffer::crypt::{Crypt, Mode};
    use coffer::vfs::{Defaults, Vfs, VfsConfig};
    let key = RootKey::from_bytes(zeroize::Zeroizing::new([key_byte; 32]));
    let ring = KeyRing::new(vec![key]).unwrap();
    Vfs::new(
        store,
        Crypt::new(Mode::Client(std::sync::Arc::new(ring)), chunk_shift),
        VfsConfig {
            prefix: prefix.to_string(),
            defaults: Defaults {
                uid: 0,
                gid: 0,
                file_perm: 0o644,
                dir_perm: 0o755,
            },
            cache_bytes,
            staging_dir: staging.to_path_buf(),
            sse: Default::default(),
            read_only: false,
            meta_flush_interval: Duration::from_secs(1),
            write_buffer_bytes: None,
            metadata_ttl: None,
            reserved_root_name: None,
        },
    )
}
