//! The local store's journal (group commit): what a write acknowledged through it survives,
//! how few fdatasyncs it costs, and that a checkpoint leaves the layout as the old
//! fsync-everything protocol did.
//!
//! A power cut is simulated by throwing away what a checkpoint has not synced: every file
//! and directory the writes created in the replicas' layout is removed or emptied, as a
//! kernel that never wrote those pages back would leave them, and the store is then
//! dropped without a checkpoint (as a killed process). The next open must bring every
//! acknowledged write back from the journal alone.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use coffer::store::local::scrub;
use coffer::store::local::{LocalStore, LocalStoreConfig};
use coffer::store::{CopyOptions, GetOptions, ObjectStore, PutOptions, StoreError};

fn config(dir: &Path, n: usize, versioning: bool) -> LocalStoreConfig {
    LocalStoreConfig {
        store_id: "journal-test".into(),
        replicas: (0..n).map(|i| dir.join(format!("r{i}"))).collect(),
        versioning,
        ..Default::default()
    }
}

/// A new store of `n` replicas in a temporary directory (removed when the guard drops).
fn fresh(n: usize, versioning: bool) -> (tempfile::TempDir, LocalStoreConfig, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), n, versioning);
    LocalStore::init(&cfg).unwrap();
    let store = LocalStore::open(&cfg).unwrap();
    (dir, cfg, store)
}

/// Puts `data` under `key`, with no metadata.
async fn put(store: &LocalStore, key: &str, data: Vec<u8>) {
    store.put(key, Bytes::from(data), &meta(&[])).await.unwrap();
}

/// Journal fdatasyncs of `store` so far.
fn syncs(store: &LocalStore) -> u64 {
    store.journal_stats().0
}

fn body(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

async fn get(store: &LocalStore, key: &str) -> Result<Vec<u8>, StoreError> {
    store
        .get(key, None, &GetOptions::default())
        .await
        .map(|g| g.body.to_vec())
}

fn meta(pairs: &[(&str, &str)]) -> PutOptions {
    PutOptions {
        metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Every regular file below `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// A power cut over everything unsynced: `files_lost` of the layout's files vanish and the
/// rest are left empty (ext4 after a crash can show either).
fn cut_power(replicas: &[PathBuf]) -> usize {
    let mut n = 0;
    for r in replicas {
        let mut all = Vec::new();
        files(&r.join("objects"), &mut all);
        for (i, f) in all.iter().enumerate() {
            if i.is_multiple_of(2) {
                fs::remove_file(f).unwrap();
            } else {
                fs::write(f, b"").unwrap();
            }
            n += 1;
        }
        // Some directories too.
        let _ = fs::remove_dir_all(r.join("objects").join("gone-dir"));
    }
    n
}

/// What the store should hold after a workload: key to (body, a metadata value).
type Model = BTreeMap<String, (Vec<u8>, String)>;

/// Puts, overwrites, copies (renames and attribute updates) and deletes of small objects,
/// each acknowledged; returns what the store must hold.
async fn workload(store: &LocalStore) -> Model {
    let name = |i: usize| {
        if i.is_multiple_of(10) {
            format!("gone-dir/f{i}")
        } else {
            format!("d{}/f{i}", i % 4)
        }
    };
    let mut model = Model::new();
    for i in 0..60 {
        let key = name(i);
        let b = body(i, 100 + i * 997 % 70_000);
        store
            .put(
                &key,
                Bytes::from(b.clone()),
                &meta(&[("n", &i.to_string())]),
            )
            .await
            .unwrap();
        model.insert(key, (b, i.to_string()));
    }
    // Overwrites.
    for i in (1..60).step_by(7) {
        let key = name(i);
        let b = body(i + 1000, 5000);
        store
            .put(&key, Bytes::from(b.clone()), &meta(&[("n", "over")]))
            .await
            .unwrap();
        model.insert(key, (b, "over".into()));
    }
    // Renames: a copy then a delete of the source, or the two in one journal write (as
    // the vfs does).
    for (j, i) in (2..60).step_by(9).enumerate() {
        let from = name(i);
        let to = format!("renamed/f{i}");
        if j % 2 == 0 {
            store
                .rename(&from, &to, &CopyOptions::default())
                .await
                .unwrap();
        } else {
            store
                .copy(&from, &to, &CopyOptions::default())
                .await
                .unwrap();
            store.delete(&from).await.unwrap();
        }
        let v = model.remove(&from).unwrap();
        model.insert(to, v);
    }
    // rsync's pattern: a file written under a temporary name, renamed at once (its
    // layout files likely still queued), with new attributes.
    for i in 0..8 {
        let (tmp, to) = (format!("d1/.f{i}.tmp"), format!("d1/rsynced{i}"));
        let b = body(i + 2000, 3000);
        store
            .put(&tmp, Bytes::from(b.clone()), &meta(&[("n", "tmp")]))
            .await
            .unwrap();
        let opts = CopyOptions {
            metadata: Some(meta(&[("n", "rsynced")]).metadata),
            ..Default::default()
        };
        store.rename(&tmp, &to, &opts).await.unwrap();
        model.insert(to, (b, "rsynced".into()));
    }
    // Attribute updates: a copy onto itself with new metadata.
    for i in (3..60).step_by(11) {
        let key = name(i);
        let Some((b, _)) = model.get(&key).cloned() else {
            continue;
        };
        let opts = CopyOptions {
            metadata: Some(meta(&[("n", "chmod")]).metadata),
            ..Default::default()
        };
        store.copy(&key, &key, &opts).await.unwrap();
        model.insert(key, (b, "chmod".into()));
    }
    // Deletes.
    for i in (5..60).step_by(13) {
        let key = name(i);
        store.delete(&key).await.unwrap();
        model.remove(&key);
    }
    model
}

async fn check(store: &LocalStore, model: &Model) {
    for (key, (b, n)) in model {
        let got = store
            .get(key, None, &GetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(got.body[..] == b[..], "{key}: other bytes");
        let m = got.info.metadata.unwrap_or_default();
        assert_eq!(m.get("n"), Some(n), "{key}: metadata");
    }
    let listed = coffer::store::list_all(
        store,
        coffer::store::ListRequest {
            prefix: String::new(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let keys: Vec<&String> = listed.objects.iter().map(|o| &o.key).collect();
    let want: Vec<&String> = model.keys().collect();
    assert_eq!(keys, want, "listing");
}

async fn survives_a_power_cut(n: usize, versioning: bool) {
    let (_dir, cfg, store) = fresh(n, versioning);
    store.hold_checkpoints(true);
    let model = workload(&store).await;
    check(&store, &model).await;
    let (syncs, checkpoints) = store.journal_stats();
    assert_eq!(checkpoints, 0);
    assert!(syncs > 0);
    store.abandon();

    let damaged = cut_power(&cfg.replicas);
    assert!(damaged > 100, "only {damaged} files to damage");
    let store = LocalStore::open(&cfg).unwrap();
    check(&store, &model).await;
    for r in &cfg.replicas {
        assert_eq!(
            fs::read_dir(r.join("journal")).unwrap().count(),
            0,
            "replayed segments are removed"
        );
    }
    // Every replica is whole again, with nothing left for a scrub to find.
    let report = scrub::scrub(&store, false, &mut |_, _| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    // Without versioning, the replay's checkpoint left only the current versions.
    if !versioning {
        for (key, (b, _)) in &model {
            let versions = fs::read_dir(cfg.replicas[0].join("objects").join(key))
                .unwrap()
                .count();
            assert_eq!(
                versions,
                files_of_one_version(b.len()),
                "{key}: one record, and a data file unless embedded"
            );
        }
    }
    drop(store);
    // And it all stays after an ordinary close and open.
    let store = LocalStore::open(&cfg).unwrap();
    check(&store, &model).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_a_power_cut_on_one_replica() {
    survives_a_power_cut(1, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_a_power_cut_on_three_replicas_without_versioning() {
    survives_a_power_cut(3, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_replica_journal_is_covered_by_the_others() {
    let (_dir, cfg, store) = fresh(2, true);
    store.hold_checkpoints(true);
    let model = workload(&store).await;
    store.abandon();
    cut_power(&cfg.replicas);
    // Replica 1's disk loses its journal too: replica 0's replays, and reads repair 1.
    fs::remove_dir_all(cfg.replicas[1].join("journal")).unwrap();
    let store = LocalStore::open(&cfg).unwrap();
    check(&store, &model).await;
    let report = scrub::scrub(&store, true, &mut |_, _| {}).unwrap();
    let again = scrub::scrub(&store, false, &mut |_, _| {}).unwrap();
    assert!(
        again.damage.is_empty(),
        "after repairing {:?}: {:?}",
        report.damage,
        again.damage
    );
}

/// A rename's copy and delete marker share one fdatasync per replica: rsync renames every
/// file it writes, and this was the second of three flushes per file.
#[tokio::test(flavor = "multi_thread")]
async fn a_rename_costs_one_journal_fdatasync_per_replica() {
    let (_dir, _, store) = fresh(2, false);
    store.hold_checkpoints(true);
    for i in 0..20 {
        let tmp = format!(".f{i}.tmp");
        put(&store, &tmp, body(i, 4096)).await;
        let (before, _) = store.journal_stats();
        store
            .rename(&tmp, &format!("f{i}"), &CopyOptions::default())
            .await
            .unwrap();
        let (after, _) = store.journal_stats();
        assert_eq!(
            after - before,
            2,
            "rename {i}: one fdatasync on each of 2 replicas"
        );
    }
    for i in 0..20 {
        assert_eq!(get(&store, &format!("f{i}")).await.unwrap(), body(i, 4096));
        assert!(matches!(
            get(&store, &format!(".f{i}.tmp")).await,
            Err(StoreError::NotFound { .. })
        ));
    }
}

fn deferred() -> CopyOptions {
    CopyOptions {
        defer_durability: true,
        ..Default::default()
    }
}

/// A rename of a file (rsync renames every file it writes) is acknowledged before its
/// journal entry is durable, as ext4 acknowledges one before its next commit: the
/// fdatasync moves to the layout worker, which makes the entry durable before it writes
/// the layout files, and to `sync` (fsync), which makes it durable before it returns.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_rename_is_durable_before_its_layout_and_at_sync() {
    let (_dir, cfg, store) = fresh(2, true);
    store.hold_checkpoints(true);
    put(&store, ".a.tmp", body(1, 4096)).await;
    put(&store, ".b.tmp", body(2, 4096)).await;
    // Settled: the puts' layout files are written.
    assert_eq!(get(&store, ".a.tmp").await.unwrap(), body(1, 4096));

    // At the call: no fdatasync.
    store.hold_layout(true);
    let s0 = syncs(&store);
    store.rename(".a.tmp", "a", &deferred()).await.unwrap();
    let s1 = syncs(&store);
    assert_eq!(s1, s0, "a deferred rename waits for no fdatasync");
    // sync makes it durable on both replicas, once.
    store.sync().await.unwrap();
    let s2 = syncs(&store);
    assert_eq!(s2, s1 + 2, "sync: one fdatasync per replica");
    store.sync().await.unwrap();
    assert_eq!(syncs(&store), s2, "nothing left for a second sync");
    // Already durable: its layout files cost no more.
    store.hold_layout(false);
    assert_eq!(get(&store, "a").await.unwrap(), body(1, 4096));
    assert_eq!(syncs(&store), s2);

    // Without a sync, the layout worker makes it durable before writing the layout.
    store.hold_layout(true);
    store.rename(".b.tmp", "b", &deferred()).await.unwrap();
    let s3 = syncs(&store);
    assert_eq!(s3, s2);
    store.hold_layout(false);
    assert_eq!(get(&store, "b").await.unwrap(), body(2, 4096));
    assert_eq!(
        syncs(&store),
        s3 + 2,
        "each replica's worker synced its log before the layout"
    );
    store.sync().await.unwrap();
    assert_eq!(syncs(&store), s3 + 2, "and sync finds it durable");

    // A later durable write covers an earlier deferred one: its fdatasync syncs the log
    // up to its own entry, so the sync after it costs nothing.
    put(&store, ".c.tmp", body(3, 4096)).await;
    assert_eq!(get(&store, ".c.tmp").await.unwrap(), body(3, 4096));
    store.hold_layout(true);
    store.rename(".c.tmp", "c", &deferred()).await.unwrap();
    let s4 = syncs(&store);
    put(&store, "d", body(4, 100)).await;
    let s5 = syncs(&store);
    assert_eq!(s5, s4 + 2, "the put's own fdatasyncs");
    store.sync().await.unwrap();
    assert_eq!(syncs(&store), s5, "the put's fdatasync covered the rename");
    store.hold_layout(false);

    // And all of it comes back from the journal alone after a power cut.
    store.abandon();
    cut_power(&cfg.replicas);
    let store = LocalStore::open(&cfg).unwrap();
    for (key, want) in [
        ("a", body(1, 4096)),
        ("b", body(2, 4096)),
        ("c", body(3, 4096)),
    ] {
        assert_eq!(get(&store, key).await.unwrap(), want, "{key}");
    }
    assert_eq!(get(&store, "d").await.unwrap(), body(4, 100));
    for tmp in [".a.tmp", ".b.tmp", ".c.tmp"] {
        assert!(
            matches!(get(&store, tmp).await, Err(StoreError::NotFound { .. })),
            "{tmp} renamed away"
        );
    }
}

/// rsync's pattern: write a temporary file, rename it, next file. The layout worker waits a
/// little for the next close's fdatasync to cover a deferred rename instead of syncing it
/// itself: about one fdatasync per replica per file, not two.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_rename_shares_the_next_writes_fdatasync() {
    let (_dir, _, store) = fresh(2, true);
    store.hold_checkpoints(true);
    const FILES: usize = 40;
    let s0 = syncs(&store);
    for i in 0..FILES {
        let tmp = format!(".f{i}.tmp");
        put(&store, &tmp, body(i, 4096)).await;
        store
            .rename(&tmp, &format!("f{i}"), &deferred())
            .await
            .unwrap();
    }
    store.sync().await.unwrap();
    let syncs = syncs(&store) - s0;
    eprintln!("{FILES} puts and renames on 2 replicas: {syncs} journal fdatasyncs");
    // Each put costs one per replica; renames synced apart would double it.
    assert!(
        syncs < (FILES * 2 * 3 / 2) as u64,
        "{syncs} fdatasyncs for {FILES} files on 2 replicas"
    );
    for i in 0..FILES {
        assert_eq!(get(&store, &format!("f{i}")).await.unwrap(), body(i, 4096));
    }
}

/// A deferred put (a new directory's marker, a symlink) follows the same rules.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_put_is_durable_at_sync_and_after_a_power_cut() {
    let (_dir, cfg, store) = fresh(2, false);
    store.hold_checkpoints(true);
    store.hold_layout(true);
    let s0 = syncs(&store);
    let opts = PutOptions {
        defer_durability: true,
        ..meta(&[("kind", "dir")])
    };
    store.put("d", Bytes::new(), &opts).await.unwrap();
    store
        .put("link", Bytes::from_static(b"target"), &opts)
        .await
        .unwrap();
    assert_eq!(syncs(&store), s0, "no fdatasync at the call");
    store.sync().await.unwrap();
    assert_eq!(syncs(&store), s0 + 2, "one per replica at sync");
    store.hold_layout(false);
    assert_eq!(get(&store, "link").await.unwrap(), b"target");
    store.abandon();
    cut_power(&cfg.replicas);
    let store = LocalStore::open(&cfg).unwrap();
    assert_eq!(get(&store, "d").await.unwrap(), b"");
    assert_eq!(get(&store, "link").await.unwrap(), b"target");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_put_does_not_come_back_from_the_journal() {
    let (_dir, cfg, store) = fresh(2, true);
    store.hold_checkpoints(true);
    store
        .put("k", Bytes::from_static(b"old"), &PutOptions::default())
        .await
        .unwrap();
    store.set_replica_fault(1, Some(coffer::store::faulty::FaultKind::NoSpace));
    let e = store
        .put("k", Bytes::from_static(b"new"), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert_eq!(get(&store, "k").await.unwrap(), b"old");
    store.set_replica_fault(1, None);
    store.abandon();
    let store = LocalStore::open(&cfg).unwrap();
    assert_eq!(get(&store, "k").await.unwrap(), b"old");
    let versions = store.list_versions("k").await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn small_files_share_fdatasyncs_and_checkpoints_leave_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, false);
    LocalStore::init(&cfg).unwrap();
    let store = Arc::new(LocalStore::open(&cfg).unwrap());
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..WRITERS {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..EACH {
                let key = format!("w{t}/f{i}");
                store
                    .put(&key, Bytes::from(body(i, 4096)), &PutOptions::default())
                    .await
                    .unwrap();
                // Overwrite half, so the checkpoint has superseded versions to remove.
                if i.is_multiple_of(2) {
                    store
                        .put(&key, Bytes::from(body(i + 1, 4096)), &PutOptions::default())
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let puts = (WRITERS * EACH * 3 / 2) as u64;
    let (syncs, _) = store.journal_stats();
    eprintln!("{puts} puts on 2 replicas took {syncs} journal fdatasyncs");
    // Without group commit each put would cost one per replica, and the old protocol five.
    assert!(
        syncs < puts * 2,
        "{syncs} fdatasyncs for {puts} puts on 2 replicas"
    );
    store.checkpoint().unwrap();
    for r in &cfg.replicas {
        // One version of every key is left.
        for t in 0..WRITERS {
            for i in 0..EACH {
                let d = r.join("objects").join(format!("w{t}/f{i}"));
                assert_eq!(
                    fs::read_dir(&d).unwrap().count(),
                    files_of_one_version(4096),
                    "{}",
                    d.display()
                );
            }
        }
    }
    for t in 0..WRITERS {
        for i in 0..EACH {
            let want = body(if i.is_multiple_of(2) { i + 1 } else { i }, 4096);
            assert_eq!(get(&store, &format!("w{t}/f{i}")).await.unwrap(), want);
        }
    }
    // A deleted key's directories go at the checkpoint.
    store.delete("w0/f0").await.unwrap();
    assert!(matches!(
        get(&store, "w0/f0").await,
        Err(StoreError::NotFound { .. })
    ));
    store.checkpoint().unwrap();
    assert!(!cfg.replicas[0].join("objects/w0/f0").exists());
    // Closed cleanly, the store leaves no journal segment (the checkpointed ones were kept
    // only for reuse while it was open).
    drop(store);
    for r in &cfg.replicas {
        assert_eq!(fs::read_dir(r.join("journal")).unwrap().count(), 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_background_checkpoint_runs_by_itself() {
    let (_dir, cfg, store) = fresh(1, true);
    store
        .put("a", Bytes::from_static(b"x"), &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        fs::read_dir(cfg.replicas[0].join("journal"))
            .unwrap()
            .count(),
        1
    );
    for _ in 0..100 {
        if store.journal_stats().1 > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(store.journal_stats().1, 1, "no checkpoint within 5 s");
    drop(store);
    assert_eq!(
        fs::read_dir(cfg.replicas[0].join("journal"))
            .unwrap()
            .count(),
        0
    );
}

/// The files one live version of `len` bytes takes in its key's directory: its record, and
/// a data file unless the data is embedded in the record.
fn files_of_one_version(len: usize) -> usize {
    if len as u64 <= coffer::store::local::record::EMBED_MAX {
        1
    } else {
        2
    }
}

/// Data files (`.d`) of `key` in one replica.
fn data_files(replica: &Path, key: &str) -> usize {
    let mut out = Vec::new();
    files(&replica.join("objects").join(key), &mut out);
    out.iter()
        .filter(|p| p.extension().is_some_and(|e| e == "d"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_process_leaves_no_superseded_large_versions_in_an_unversioned_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, false);
    LocalStore::init(&cfg).unwrap();
    let big = 3 << 20; // past the journal's inline limit: stored in place, not journaled
    for round in 0..3 {
        let store = LocalStore::open(&cfg).unwrap();
        store.hold_checkpoints(true);
        for i in 0..3 {
            store
                .put(
                    "big",
                    Bytes::from(body(round * 10 + i, big)),
                    &PutOptions::default(),
                )
                .await
                .unwrap();
        }
        // Killed before any checkpoint ran.
        store.abandon();
    }
    let store = LocalStore::open(&cfg).unwrap();
    assert_eq!(get(&store, "big").await.unwrap(), body(22, big));
    for r in &cfg.replicas {
        assert_eq!(
            data_files(r, "big"),
            1,
            "{}: superseded versions left",
            r.display()
        );
    }

    // A journaled copy links from the old version: that one must stay until a checkpoint,
    // or the copy could not be replayed after a crash.
    store.hold_checkpoints(true);
    store
        .copy("big", "copy", &CopyOptions::default())
        .await
        .unwrap();
    store
        .put("big", Bytes::from(body(99, big)), &PutOptions::default())
        .await
        .unwrap();
    store.abandon();
    // The power cut takes the copy's unsynced layout (the big versions are fsync'd in
    // place); only the journal's link entry can bring it back.
    for r in &cfg.replicas {
        fs::remove_dir_all(r.join("objects").join("copy")).unwrap();
    }
    let store = LocalStore::open(&cfg).unwrap();
    assert_eq!(get(&store, "copy").await.unwrap(), body(22, big));
    assert_eq!(get(&store, "big").await.unwrap(), body(99, big));
    for r in &cfg.replicas {
        assert_eq!(data_files(r, "big"), 1, "{}", r.display());
    }
}

/// The layout files of a journaled write are written after it is acknowledged. When they
/// then fail to write on the only replica (an injected ENOSPC), the write stays durable in
/// the journal: reads of the key fail, naming it and the cause, instead of answering with
/// the older version; every checkpoint tries again and keeps the journal until one
/// succeeds; and a process killed meanwhile leaves the write to the next open's replay.
/// (What would refuse the files for good, such as a file planted where the key's
/// directory belongs, is refused before the acknowledgement: `tests/hostile.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn layout_files_that_fail_to_write_after_the_acknowledgement_are_retried_not_lost() {
    use coffer::store::faulty::FaultKind;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, false);
    LocalStore::init(&cfg).unwrap();
    for kill in [false, true] {
        let store = LocalStore::open(&cfg).unwrap();
        let key = format!("d-{kill}/f");
        store
            .put(&key, Bytes::from_static(b"old"), &PutOptions::default())
            .await
            .unwrap();
        store.checkpoint().unwrap();
        store.set_layout_fault(0, Some(FaultKind::NoSpace));
        store
            .put(&key, Bytes::from_static(b"new"), &PutOptions::default())
            .await
            .expect("acknowledged once in the journal");
        let e = get(&store, &key).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&key) && msg.contains("journal") && msg.contains("No space"),
            "the read names the key and the cause: {msg}"
        );
        assert!(
            store.checkpoint().is_err(),
            "the checkpoint retries and fails"
        );
        assert!(
            fs::read_dir(cfg.replicas[0].join("journal"))
                .unwrap()
                .count()
                > 0,
            "the journal is kept"
        );
        store.set_layout_fault(0, None);
        if !kill {
            // A newer write, in place this time, is the newest: reads answer with it
            // while the failed one waits for the checkpoint.
            store
                .put(&key, Bytes::from_static(b"newer"), &PutOptions::default())
                .await
                .unwrap();
            assert_eq!(get(&store, &key).await.unwrap(), b"newer");
        }
        if kill {
            store.abandon();
            let store = LocalStore::open(&cfg).unwrap();
            assert_eq!(get(&store, &key).await.unwrap(), b"new", "replayed");
        } else {
            store.checkpoint().expect("the retry succeeds");
            assert_eq!(get(&store, &key).await.unwrap(), b"newer");
            drop(store);
            let store = LocalStore::open(&cfg).unwrap();
            assert_eq!(get(&store, &key).await.unwrap(), b"newer", "and stays");
            assert!(
                fs::read_dir(cfg.replicas[0].join("journal"))
                    .unwrap()
                    .count()
                    == 0,
                "a store closed cleanly leaves no journal"
            );
        }
    }
}

/// The layout workers outlive an idle spell (they poll once a second for their store's
/// end): a write after one is still written, and a read of it answers.
#[tokio::test(flavor = "multi_thread")]
async fn writes_after_an_idle_spell_still_reach_the_layout() {
    let (_dir, _, store) = fresh(2, false);
    for i in 0..2 {
        let key = format!("idle/f{i}");
        store
            .put(&key, Bytes::from(body(i, 100)), &PutOptions::default())
            .await
            .unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), get(&store, &key))
            .await
            .expect("the read answers")
            .unwrap();
        assert_eq!(got, body(i, 100));
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        store.checkpoint().unwrap()
    })
    .await
    .expect("the checkpoint answers");
}

/// Through the vfs: a file's rename and a new directory wait for no fdatasync, and `fsync`
/// of a directory (as `fsync` of a file) makes them durable before it returns (it answered
/// at once before, when every change was durable at its call).
#[tokio::test(flavor = "multi_thread")]
async fn the_vfs_defers_renames_and_new_directories_until_an_fsync() {
    const ROOT: u64 = 1;
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, true);
    LocalStore::init(&cfg).unwrap();
    let store = Arc::new(LocalStore::open(&cfg).unwrap());
    store.hold_checkpoints(true);
    let v = common::test_vfs(store.clone(), staging.path(), "", 16, 1);
    for name in ["f", "g"] {
        let (e, fh) = v.create(ROOT, name, 0o644, 0, 0).await.unwrap();
        v.write(e.ino, 0, name.as_bytes()).await.unwrap();
        v.release(e.ino, fh).await.unwrap();
    }
    // Settled (a read waits for the layout workers), then held.
    assert!(get(&store, "none").await.is_err());
    store.hold_layout(true);
    let s0 = syncs(&store);
    v.rename(ROOT, "f", ROOT, "f2", false).await.unwrap();
    let d = v.mkdir(ROOT, "d", 0o755, 0, 0).await.unwrap();
    assert_eq!(syncs(&store), s0, "no fdatasync at the calls");
    v.fsyncdir(d.ino).await.unwrap();
    assert_eq!(syncs(&store), s0 + 1, "one at fsyncdir");
    v.fsyncdir(ROOT).await.unwrap();
    assert_eq!(syncs(&store), s0 + 1, "none left for the next");
    store.hold_layout(false);
    assert!(get(&store, "none").await.is_err());
    store.hold_layout(true);
    let g = v.lookup(ROOT, "g").await.unwrap();
    v.rename(ROOT, "g", ROOT, "g2", false).await.unwrap();
    assert_eq!(syncs(&store), s0 + 1);
    v.fsync(g.ino).await.unwrap();
    assert_eq!(syncs(&store), s0 + 2, "and one at a file's fsync");
    store.hold_layout(false);
    let names: Vec<String> = v
        .readdir(ROOT)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, n, _)| n)
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, ["d", "f2", "g2"]);
}
