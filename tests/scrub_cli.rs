//! `coffer scrub` on a store of 10,000 objects: finds a planted corruption, repairs it, a
//! second scrub is clean; the progress bar shows on a terminal and not in a pipe.

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use coffer::store::local::LocalStore;
use coffer::store::{ObjectStore, PutOptions};
use coffer::volume::VolumeConfig;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn scrub_finds_and_repairs_a_corruption_among_10000_objects() {
    require_tool("script", "bsdutils");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    run(Command::new(coffer_bin())
        .arg("init")
        .arg(&store)
        .arg("--no-encryption")
        .arg("--no-versioning"));
    let cfg = VolumeConfig::read(&store).unwrap();
    let s = Arc::new(LocalStore::open(&cfg.local_store_config(&store).unwrap()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let s = s.clone();
        tasks.spawn(async move {
            for i in (t..10_000).step_by(16) {
                let key = format!("d{}/obj{i:05}", i % 50);
                s.put(
                    &key,
                    Bytes::from(format!("object {i}")),
                    &PutOptions::default(),
                )
                .await
                .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    drop(s);
    // Plant a corruption in one replica of one object. Small objects keep their data in
    // the record's file, after the record: "object 4257", then one block checksum.
    let vdir = store.join("replica-1/objects/d7/obj04257");
    let files: Vec<_> = fs::read_dir(&vdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "a small object is one file: {files:?}");
    let mut b = fs::read(&files[0]).unwrap();
    let n = b.len();
    assert!(b[..n - 4].ends_with(b"object 4257"), "{b:?}");
    b[n - 4 - 2] ^= 0x20;
    fs::write(&files[0], b).unwrap();

    // In a pipe: no progress bar, a report naming the damage, a failing status.
    let out = Command::new(coffer_bin())
        .arg("scrub")
        .arg(&store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "scrub passed with damage: {stdout}");
    assert!(
        err.contains("d7/obj04257") && err.contains("replica: 1"),
        "{err}"
    );
    assert!(
        stdout.contains("10000 keys") && stdout.contains("corrupt replicas: 1"),
        "{stdout}"
    );
    assert!(
        !err.contains("keys ("),
        "progress bar drawn into a pipe: {err}"
    );

    // On a terminal, with --repair: the bar shows and the damage is repaired.
    let tty = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} scrub {} --repair",
            coffer_bin().display(),
            store.display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("keys ("),
        "no progress bar on a terminal: {shown}"
    );
    assert!(shown.contains("repaired: 1"), "{shown}");

    let again = Command::new(coffer_bin())
        .arg("scrub")
        .arg(&store)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        stdout.contains("corrupt replicas: 0") && stdout.contains("missing replicas: 0"),
        "{stdout}"
    );
}
