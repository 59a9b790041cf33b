//! The local N-replica store: conformance, repair on read, corruption, crash safety, a full
//! disk, versions and scrub.

mod common;
#[path = "common/store_suite.rs"]
mod store_suite;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use coffer::store::local::layout::VersionLayout;
use coffer::store::local::scrub::{self, Damage};
use coffer::store::local::{LocalStore, LocalStoreConfig};
use coffer::store::memory::MemoryStore;
use coffer::store::{GetOptions, ListRequest, ObjectStore, PutOptions, StoreError};

/// Log lines of this test binary, for the checks that warnings name objects and replicas.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    let buffer = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        struct W;
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                logs().lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_writer(|| W)
            .with_ansi(false)
            .init();
    });
    buffer
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn new_store(dir: &Path, n: usize, versioning: bool) -> (LocalStore, LocalStoreConfig) {
    let cfg = LocalStoreConfig {
        store_id: "test".into(),
        replicas: (0..n).map(|i| dir.join(format!("r{i}"))).collect(),
        versioning,
        ..Default::default()
    };
    LocalStore::init(&cfg).unwrap();
    (LocalStore::open(&cfg).unwrap(), cfg)
}

/// The names in a directory, sorted (none if it is missing).
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn version_files(root: &Path, key: &str, ext: &str) -> Vec<PathBuf> {
    let dir = root.join("objects").join(key);
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Flips the bits `mask` of one byte of the file at `path`, chosen from its length.
fn flip_byte(path: &Path, at: impl FnOnce(usize) -> usize, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    let i = at(bytes.len());
    bytes[i] ^= mask;
    fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn memory_store_conforms() {
    store_suite::run_all(Arc::new(MemoryStore::new(true)), "").await;
    store_suite::run_all(Arc::new(MemoryStore::new(false)), "p/").await;
}

#[tokio::test]
async fn local_store_conforms() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = new_store(d.path(), 3, true);
    store_suite::run_all(Arc::new(s), "").await;
    let d = tempfile::tempdir().unwrap();
    let (s, _) = new_store(d.path(), 1, false);
    store_suite::run_all(Arc::new(s), "x/").await;
}

/// Stores made before the flat layout keep their versions in `%v` directories, and go on
/// doing so: the whole store suite on one, then where its files are, a prune, a replay of
/// a killed process's journal and a scrub.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_in_the_nested_layout_conforms_and_stays_nested() {
    for (n, versioning, prefix) in [(3, true, ""), (1, false, "x/")] {
        let d = tempfile::tempdir().unwrap();
        let cfg = LocalStoreConfig {
            store_id: "nested".into(),
            replicas: (0..n).map(|i| d.path().join(format!("r{i}"))).collect(),
            versioning,
            layout: VersionLayout::Nested,
            ..Default::default()
        };
        LocalStore::init(&cfg).unwrap();
        let s = LocalStore::open(&cfg).unwrap();
        store_suite::run_all(Arc::new(s.clone()), prefix).await;
        let large = vec![6u8; 100_000];
        for (key, body) in [("n/small", b"small".to_vec()), ("n/large", large.clone())] {
            for _ in 0..2 {
                s.put(key, Bytes::from(body.clone()), &PutOptions::default())
                    .await
                    .unwrap();
            }
        }
        s.copy("n/small", "n/copied", &Default::default())
            .await
            .unwrap();
        s.delete("n/small").await.unwrap();
        s.checkpoint().unwrap();
        let versions = if versioning { 3 } else { 0 };
        for r in &cfg.replicas {
            let key_dir = |k: &str| r.join("objects/n").join(k);
            for k in ["small", "large", "copied"] {
                let names = names_in(&key_dir(k));
                assert!(names.is_empty() || names == ["%v"], "{k}: {names:?}");
            }
            let files = |k: &str| names_in(&key_dir(k).join("%v"));
            assert!(files("large").iter().all(|f| !f.starts_with('%')));
            assert_eq!(files("large").len(), if versioning { 4 } else { 2 });
            assert_eq!(files("copied").len(), 1, "{:?}", files("copied"));
            assert_eq!(files("small").len(), versions, "{:?}", files("small"));
        }
        assert_eq!(
            &s.get("n/copied", None, &GetOptions::default())
                .await
                .unwrap()
                .body[..],
            b"small"
        );
        // A killed process's journal replays into the same layout.
        s.put(
            "n/late",
            Bytes::from_static(b"late"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
        s.abandon();
        let s = LocalStore::open(&cfg).unwrap();
        assert!(cfg.replicas[0].join("objects/n/late/%v").is_dir());
        assert_eq!(
            &s.get("n/late", None, &GetOptions::default())
                .await
                .unwrap()
                .body[..],
            b"late"
        );
        if versioning {
            assert_eq!(s.prune_versions("n/", 1, None).await.unwrap(), 4);
            assert!(!cfg.replicas[0].join("objects/n/small").exists());
        }
        let listed = s
            .list(&ListRequest {
                prefix: "n/".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let keys: Vec<&str> = listed.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["n/copied", "n/large", "n/late"]);
        let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
        assert!(report.damage.is_empty(), "{:?}", report.damage);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_on_read_fixes_a_missing_and_a_corrupt_replica() {
    logs();
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, true);
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
    s.put(
        "repairme",
        Bytes::from(data.clone()),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    // At rest: its layout files (written after the put returns) in place and synced.
    s.checkpoint().unwrap();
    // Replica 0 loses the object; replica 1 gets a flipped byte.
    for f in version_files(&cfg.replicas[0], "repairme", "d")
        .into_iter()
        .chain(version_files(&cfg.replicas[0], "repairme", "m"))
    {
        fs::remove_file(f).unwrap();
    }
    let d1 = &version_files(&cfg.replicas[1], "repairme", "d")[0];
    flip_byte(d1, |_| 1234, 0x10);

    let got = s
        .get("repairme", Some(0..500_000), &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &data[..]);
    s.wait_repairs().await;
    let log = log_text();
    assert!(
        log.contains("repairme: replica 0") && log.contains("missing"),
        "{log}"
    );
    assert!(
        log.contains("repairme: replica 1") && log.contains("corrupt"),
        "{log}"
    );
    // Both replicas are whole again: each alone serves the object.
    for i in 0..3 {
        let dfile = &version_files(&cfg.replicas[i], "repairme", "d")[0];
        let raw = fs::read(dfile).unwrap();
        assert_eq!(&raw[..data.len()], &data[..], "replica {i} not repaired");
    }
    let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread")]
async fn small_versions_live_in_their_record_and_are_repaired_copied_and_scrubbed() {
    logs();
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, false);
    let small: Vec<u8> = (0..5000u32).map(|i| (i % 241) as u8).collect();
    let limit = coffer::store::local::record::EMBED_MAX as usize;
    let put = |key: &'static str, body: Vec<u8>| {
        let s = &s;
        async move {
            s.put(key, Bytes::from(body), &PutOptions::default())
                .await
                .unwrap()
        }
    };
    put("small", small.clone()).await;
    put("edge", vec![3u8; limit]).await;
    put("over", vec![4u8; limit + 1]).await;
    s.checkpoint().unwrap();
    // One file per version up to the limit, a record and a data file past it.
    for r in &cfg.replicas {
        for (key, files) in [("small", 1), ("edge", 1), ("over", 2)] {
            let n = fs::read_dir(r.join("objects").join(key)).unwrap().count();
            assert_eq!(n, files, "{key} in {}", r.display());
        }
    }

    // Replica 0 loses the version, replica 1's copy of the data is damaged: a read answers
    // from replica 2 and repairs both.
    fs::remove_file(&version_files(&cfg.replicas[0], "small", "m")[0]).unwrap();
    let m1 = &version_files(&cfg.replicas[1], "small", "m")[0];
    flip_byte(m1, |n| n - 100, 0x08);
    let got = s.get("small", None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], &small[..]);
    let part = s
        .get("small", Some(4000..4100), &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&part.body[..], &small[4000..4100]);
    s.wait_repairs().await;
    let log = log_text();
    assert!(
        log.contains("small: replica 1") && log.contains("checksum mismatch"),
        "{log}"
    );
    let want = fs::read(&version_files(&cfg.replicas[2], "small", "m")[0]).unwrap();
    for r in &cfg.replicas[..2] {
        assert_eq!(fs::read(&version_files(r, "small", "m")[0]).unwrap(), want);
    }

    // A rename copies the bytes into the new key's record; the old key is gone for good.
    s.rename("small", "moved/small", &Default::default())
        .await
        .unwrap();
    s.checkpoint().unwrap();
    let got = s
        .get("moved/small", None, &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &small[..]);
    assert!(matches!(
        s.get("small", None, &GetOptions::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    // And reopened, after the journal is gone, everything still reads.
    drop(s);
    let s = LocalStore::open(&cfg).unwrap();
    let got = s
        .get("moved/small", None, &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &small[..]);
    assert_eq!(
        &s.get("edge", None, &GetOptions::default())
            .await
            .unwrap()
            .body[..],
        &vec![3u8; limit][..]
    );

    // Scrub checks the embedded bytes in full: one damaged copy is found and repaired.
    let m2 = &version_files(&cfg.replicas[2], "moved/small", "m")[0];
    flip_byte(m2, |n| n - 10, 0x01);
    let report = scrub::scrub(&s, true, &mut |_, _| {}).unwrap();
    assert!(
        matches!(&report.damage[..], [Damage::Corrupt { key, replica: 2, .. }] if key == "moved/small"),
        "{:?}",
        report.damage
    );
    let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_an_embedded_version_takes_its_bytes_from_a_good_replica() {
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 2, false);
    let body: Vec<u8> = (0..3000u32).map(|i| (i % 239) as u8).collect();
    s.put("src", Bytes::from(body.clone()), &PutOptions::default())
        .await
        .unwrap();
    s.checkpoint().unwrap();
    // Replica 0's copy of the source is damaged; the rename's layout worker there must not
    // copy the damage into the new version.
    let m0 = &version_files(&cfg.replicas[0], "src", "m")[0];
    flip_byte(m0, |n| n - 50, 0x02);
    s.rename("src", "dst", &Default::default()).await.unwrap();
    s.checkpoint().unwrap();
    let files: Vec<Vec<u8>> = cfg
        .replicas
        .iter()
        .map(|r| fs::read(&version_files(r, "dst", "m")[0]).unwrap())
        .collect();
    assert_eq!(files[0], files[1], "replica 0's copy differs");
    assert!(files[0].ends_with(&{
        let mut tail = body[body.len() - 10..].to_vec();
        tail.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        tail
    }));
    let got = s.get("dst", None, &GetOptions::default()).await.unwrap();
    assert_eq!(&got.body[..], &body[..]);
    let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread")]
async fn all_replicas_corrupt_is_an_error_with_no_bytes() {
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, true);
    s.put(
        "doomed",
        Bytes::from(vec![7u8; 200_000]),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    s.checkpoint().unwrap();
    for r in &cfg.replicas {
        let f = &version_files(r, "doomed", "d")[0];
        flip_byte(f, |_| 100_000, 1);
    }
    match s.get("doomed", None, &GetOptions::default()).await {
        Err(StoreError::Corrupt { key, detail }) => {
            assert_eq!(key, "doomed");
            assert!(
                detail.contains("replica 0") && detail.contains("replica 2"),
                "{detail}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A range that touches only good blocks still reads (block checksums are independent).
    let got = s
        .get("doomed", Some(0..1000), &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &[7u8; 1000][..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_read_of_a_large_object_reads_little() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = new_store(d.path(), 1, false);
    let mut up = s
        .create_upload("huge", &PutOptions::default())
        .await
        .unwrap();
    let part = Bytes::from(vec![3u8; 8 << 20]);
    for _ in 0..64 {
        up.put_part(part.clone()).await.unwrap(); // 512 MiB
    }
    up.complete().await.unwrap();
    // The read runs in a process of its own so that its I/O counter counts only it.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "small_read_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("COFFER_SMALL_READ_CHILD", d.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let read: u64 = text
        .lines()
        .find_map(|l| l.split("bytes read: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("child said: {text}{}", String::from_utf8_lossy(&out.stderr)))
        .parse()
        .unwrap();
    assert!(
        read < 1 << 20,
        "a 4 KiB read of a 512 MiB object read {read} bytes"
    );
}

/// The child side of the test above: one 4 KiB ranged get, and the bytes it read.
#[test]
fn small_read_child() {
    let Ok(root) = std::env::var("COFFER_SMALL_READ_CHILD") else {
        return;
    };
    let cfg = LocalStoreConfig {
        store_id: "test".into(),
        replicas: vec![PathBuf::from(root).join("r0")],
        versioning: false,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = LocalStore::open(&cfg).unwrap();
    let before = read_bytes_of_self();
    let got = rt
        .block_on(s.get(
            "huge",
            Some(300 << 20..(300 << 20) + 4096),
            &GetOptions::default(),
        ))
        .unwrap();
    let after = read_bytes_of_self();
    assert_eq!(&got.body[..], &[3u8; 4096][..]);
    println!("bytes read: {}", after - before);
}

fn read_bytes_of_self() -> u64 {
    // rchar counts bytes read by this process through read syscalls, cached or not.
    fs::read_to_string("/proc/self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_list_read_and_restore() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = new_store(d.path(), 3, true);
    for body in ["first", "second", "third", "fourth"] {
        s.put("doc", Bytes::from(body), &PutOptions::default())
            .await
            .unwrap();
    }
    s.delete("doc").await.unwrap();
    let list = s.list_versions("doc").await.unwrap();
    assert_eq!(list.len(), 5);
    assert!(list[0].is_delete_marker);
    assert_eq!(list.iter().filter(|v| !v.is_delete_marker).count(), 4);
    let second = list[3].version_id.clone();
    s.restore_version("doc", &second, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        &s.get("doc", None, &GetOptions::default())
            .await
            .unwrap()
            .body[..],
        b"second"
    );
    // Pruning keeps the newest two.
    let removed = s.prune_versions("", 2, None).await.unwrap();
    assert_eq!(removed, 4);
    assert_eq!(s.list_versions("doc").await.unwrap().len(), 2);
    assert_eq!(
        &s.get("doc", None, &GetOptions::default())
            .await
            .unwrap()
            .body[..],
        b"second"
    );
}

/// Mounts a tmpfs of `size` at `dir` (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        assert!(
            matches!(st, Ok(s) if s.success()),
            "mounting a tmpfs failed: this test needs root (CI runs as root) to fill a small filesystem"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_replica_fails_the_put_with_nospace_and_keeps_the_old_version() {
    let d = tempfile::tempdir().unwrap();
    let _small = Tmpfs::mount(&d.path().join("r2"), "3m");
    let (s, cfg) = new_store(d.path(), 3, false);
    let old = vec![1u8; 1 << 20];
    s.put("k", Bytes::from(old.clone()), &PutOptions::default())
        .await
        .unwrap();
    // Whole put and multipart upload both fail with NoSpace.
    let err = s
        .put("k", Bytes::from(vec![2u8; 4 << 20]), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err:?}");
    assert_eq!(err.errno(), libc::ENOSPC);
    let mut up = s.create_upload("k", &PutOptions::default()).await.unwrap();
    let mut failed = None;
    for _ in 0..4 {
        if let Err(e) = up.put_part(Bytes::from(vec![3u8; 1 << 20])).await {
            failed = Some(e);
            break;
        }
    }
    let err = match failed {
        Some(e) => e,
        None => up.complete().await.unwrap_err(),
    };
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err:?}");
    // The old version is intact and still the only one, on every replica.
    assert_eq!(
        &s.get("k", None, &GetOptions::default()).await.unwrap().body[..],
        &old[..]
    );
    for r in &cfg.replicas {
        assert_eq!(version_files(r, "k", "m").len(), 1, "{}", r.display());
        assert_eq!(
            fs::read_dir(r.join("tmp")).unwrap().count(),
            0,
            "leftovers in {}",
            r.display()
        );
    }
    let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_replica_failure_rolls_back_everywhere() {
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, true);
    s.put("k", Bytes::from_static(b"old"), &PutOptions::default())
        .await
        .unwrap();
    s.set_replica_fault(1, Some(coffer::store::faulty::FaultKind::Transient));
    assert!(
        s.put("k", Bytes::from_static(b"new"), &PutOptions::default())
            .await
            .is_err()
    );
    assert!(s.delete("k").await.is_err());
    s.set_replica_fault(1, None);
    assert_eq!(
        &s.get("k", None, &GetOptions::default()).await.unwrap().body[..],
        b"old"
    );
    for r in &cfg.replicas {
        assert_eq!(version_files(r, "k", "m").len(), 1);
    }
}

/// The child side of the crash test: writes two alternating 24 MiB versions of one object
/// as multipart uploads until killed.
#[test]
fn crash_child_put_loop() {
    let Ok(root) = std::env::var("COFFER_CRASH_CHILD") else {
        return;
    };
    let cfg = LocalStoreConfig {
        store_id: "test".into(),
        replicas: (0..3)
            .map(|i| PathBuf::from(&root).join(format!("r{i}")))
            .collect(),
        versioning: false,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = LocalStore::open(&cfg).unwrap();
        for round in 0u64.. {
            let fill = if round % 2 == 0 { 0xBB } else { 0xAA };
            let mut up = s
                .create_upload("big", &PutOptions::default())
                .await
                .unwrap();
            for _ in 0..6 {
                up.put_part(Bytes::from(vec![fill; 4 << 20])).await.unwrap();
            }
            up.complete().await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_puts_never_tears_an_object() {
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, false);
    s.put(
        "big",
        Bytes::from(vec![0xAAu8; 24 << 20]),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    drop(s);
    let exe = std::env::current_exe().unwrap();
    let kill_points = 30;
    for i in 0..kill_points {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_put_loop",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("COFFER_CRASH_CHILD", d.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill points spread over a few put cycles.
        std::thread::sleep(Duration::from_millis(150 + (i * 97) % 900));
        child.kill().unwrap();
        child.wait().unwrap();

        let s = LocalStore::open(&cfg).unwrap();
        // Every replica on its own holds a whole old or whole new version.
        for r in &cfg.replicas {
            let records = version_files(r, "big", "m");
            assert!(
                !records.is_empty(),
                "kill {i}: replica {} lost the object",
                r.display()
            );
        }
        s.clean_tmp().unwrap();
        let report = scrub::scrub(&s, true, &mut |_, _| {}).unwrap();
        assert!(
            !report
                .damage
                .iter()
                .any(|d| matches!(d, Damage::Corrupt { .. } | Damage::Lost { .. })),
            "kill {i}: {:?}",
            report.damage
        );
        let body = s
            .get("big", None, &GetOptions::default())
            .await
            .unwrap()
            .body;
        assert_eq!(body.len(), 24 << 20, "kill {i}");
        assert!(
            body.iter().all(|&b| b == body[0]) && (body[0] == 0xAA || body[0] == 0xBB),
            "kill {i}: torn object"
        );
        let again = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
        assert!(
            again.damage.is_empty(),
            "kill {i}: after repair: {:?}",
            again.damage
        );
    }
}

fn sse_c(b: u8) -> coffer::store::Sse {
    coffer::store::Sse::Customer(coffer::store::SseCustomerKey::new([b; 32]))
}

/// Every byte of every file below `dir`, concatenated (for "appears nowhere" checks).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.extend(fs::read(&p).unwrap());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_c_refuses_missing_and_wrong_keys_and_keeps_no_key() {
    use base64::Engine;
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, true);
    let key = sse_c(0x5a);
    let marker = b"SSE-C-PLAINTEXT-MARKER".repeat(5000);
    let opts = PutOptions {
        sse: key.clone(),
        ..Default::default()
    };
    s.put("secret", Bytes::from(marker.clone()), &opts)
        .await
        .unwrap();
    // Multipart with SSE-C too.
    let mut up = s.create_upload("secret-multi", &opts).await.unwrap();
    up.put_part(Bytes::from(marker.clone())).await.unwrap();
    up.put_part(Bytes::from(marker.clone())).await.unwrap();
    up.complete().await.unwrap();
    let with = GetOptions {
        sse: key.clone(),
        ..Default::default()
    };
    assert_eq!(
        &s.get("secret", None, &with).await.unwrap().body[..],
        &marker[..]
    );
    let got = s
        .get("secret-multi", Some(100_000..150_000), &with)
        .await
        .unwrap();
    assert_eq!(
        &got.body[..],
        &[marker.clone(), marker.clone()].concat()[100_000..150_000]
    );
    for bad in [
        GetOptions::default(),
        GetOptions {
            sse: sse_c(0x5b),
            ..Default::default()
        },
    ] {
        for k in ["secret", "secret-multi"] {
            assert!(
                matches!(s.get(k, None, &bad).await, Err(StoreError::WrongKey { .. })),
                "{k}"
            );
            assert!(
                matches!(s.head(k, &bad).await, Err(StoreError::WrongKey { .. })),
                "{k}"
            );
        }
    }
    // A wrong key is not damage: nothing was "repaired".
    let report = scrub::scrub(&s, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    // Copies: same key shares the data; another key re-encrypts.
    let copy = coffer::store::CopyOptions {
        source_sse: key.clone(),
        sse: key.clone(),
        ..Default::default()
    };
    s.copy("secret", "same-key", &copy).await.unwrap();
    assert_eq!(
        &s.get("same-key", None, &with).await.unwrap().body[..],
        &marker[..]
    );
    let other = sse_c(0x77);
    let copy = coffer::store::CopyOptions {
        source_sse: key.clone(),
        sse: other.clone(),
        ..Default::default()
    };
    s.copy("secret", "other-key", &copy).await.unwrap();
    let with_other = GetOptions {
        sse: other,
        ..Default::default()
    };
    assert_eq!(
        &s.get("other-key", None, &with_other).await.unwrap().body[..],
        &marker[..]
    );
    assert!(matches!(
        s.get("other-key", None, &with).await,
        Err(StoreError::WrongKey { .. })
    ));
    // Copying without the source key is refused.
    let nokey = coffer::store::CopyOptions {
        sse: key.clone(),
        ..Default::default()
    };
    assert!(matches!(
        s.copy("secret", "x", &nokey).await,
        Err(StoreError::WrongKey { .. })
    ));
    // Neither the key (raw, hex, base64) nor the plaintext is anywhere in the store.
    for r in &cfg.replicas {
        let bytes = all_bytes(r);
        let raw = [0x5au8; 32];
        assert!(!contains(&bytes, &raw), "raw key in {}", r.display());
        assert!(!contains(&bytes, hex::encode(raw).as_bytes()));
        assert!(!contains(
            &bytes,
            base64::engine::general_purpose::STANDARD
                .encode(raw)
                .as_bytes()
        ));
        assert!(
            !contains(&bytes, b"SSE-C-PLAINTEXT-MARKER"),
            "plaintext in {}",
            r.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_s3_and_the_encryption_policy() {
    let d = tempfile::tempdir().unwrap();
    let cfg = LocalStoreConfig {
        store_id: "test".into(),
        replicas: (0..2).map(|i| d.path().join(format!("r{i}"))).collect(),
        versioning: false,
        sse_store_key: Some(coffer::store::SseCustomerKey::new([0x33; 32])),
        require_encryption: true,
        ..Default::default()
    };
    LocalStore::init(&cfg).unwrap();
    let s = LocalStore::open(&cfg).unwrap();
    let plain = b"SSE-S3-PLAINTEXT-MARKER".repeat(1000);
    let err = s
        .put("k", Bytes::from(plain.clone()), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AccessDenied { .. }), "{err:?}");
    assert_eq!(err.errno(), libc::EACCES);
    let opts = PutOptions {
        sse: coffer::store::Sse::S3,
        ..Default::default()
    };
    s.put("k", Bytes::from(plain.clone()), &opts).await.unwrap();
    // SSE-S3 objects read without a customer key, like S3.
    let got = s
        .get("k", Some(5..20_000), &GetOptions::default())
        .await
        .unwrap();
    assert_eq!(&got.body[..], &plain[5..20_000]);
    for r in &cfg.replicas {
        assert!(!contains(&all_bytes(r), b"SSE-S3-PLAINTEXT-MARKER"));
    }
    // Without the store key, the object cannot be read.
    let no_key = LocalStore::open(&LocalStoreConfig {
        sse_store_key: None,
        ..cfg.clone()
    })
    .unwrap();
    assert!(matches!(
        no_key.get("k", None, &GetOptions::default()).await,
        Err(StoreError::AccessDenied { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_that_finds_a_replica_missing_a_version_repairs_it() {
    // A listing reads its entries' records on a thread pool of its own; the repair a read
    // starts must start from there too (it once panicked: no runtime on those threads).
    logs();
    let d = tempfile::tempdir().unwrap();
    let (s, cfg) = new_store(d.path(), 3, true);
    for name in ["dir/a", "dir/b"] {
        s.put(name, Bytes::from_static(b"hello"), &PutOptions::default())
            .await
            .unwrap();
    }
    s.checkpoint().unwrap();
    for f in version_files(&cfg.replicas[0], "dir/a", "m") {
        fs::remove_file(f).unwrap();
    }
    let page = s
        .list(&ListRequest {
            prefix: "dir/".into(),
            delimiter: Some('/'),
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["dir/a", "dir/b"]);
    assert!(page.objects.iter().all(|o| o.size == 5));
    s.wait_repairs().await;
    assert_eq!(
        version_files(&cfg.replicas[0], "dir/a", "m").len(),
        1,
        "replica 0 not repaired: {}",
        log_text()
    );
}
