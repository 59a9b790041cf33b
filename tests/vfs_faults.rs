//! The vfs over the fault-injecting store: failures reach the caller as errnos at the right
//! operation, tampered content is refused, and other files keep working.

mod common;

use std::sync::Arc;

use coffer::store::ObjectStore;
use coffer::store::faulty::{FaultKind, FaultPlan, FaultyStore};
use coffer::store::memory::MemoryStore;
use coffer::vfs::{ROOT, Vfs};
use common::test_vfs;

async fn write_file(v: &Vfs, name: &str, data: &[u8]) -> Result<(), i32> {
    let (e, fh) = v
        .create(ROOT, name, 0o644, 0, 0)
        .await
        .map_err(|e| e.errno())?;
    v.write(e.ino, 0, data).await.map_err(|e| e.errno())?;
    v.release(e.ino, fh).await.map_err(|e| e.errno())
}

async fn read_file(v: &Vfs, name: &str) -> Result<Vec<u8>, i32> {
    let e = v.lookup(ROOT, name).await.map_err(|e| e.errno())?;
    let fh = v.open(e.ino, false).await.map_err(|e| e.errno())?;
    let r = v.read(e.ino, 0, 1 << 20).await.map_err(|e| e.errno());
    v.release(e.ino, fh).await.map_err(|e| e.errno())?;
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn store_failures_surface_as_errnos_and_other_files_keep_working() {
    let staging = tempfile::tempdir().unwrap();
    let mem = MemoryStore::new(false);
    let faulty = FaultyStore::new(Arc::new(mem.clone()));
    let v = test_vfs(Arc::new(faulty.clone()), staging.path(), "", 16, 1);
    write_file(&v, "good", b"good").await.unwrap();

    // The commit at close fails: the caller of close gets the errno.
    faulty.set_plan(FaultPlan {
        fail_every: Some(1),
        kind: Some(FaultKind::NoSpace),
        ..Default::default()
    });
    assert_eq!(write_file(&v, "full", b"x").await, Err(libc::ENOSPC));
    faulty.set_plan(FaultPlan {
        fail_every: Some(1),
        kind: Some(FaultKind::AccessDenied),
        ..Default::default()
    });
    assert_eq!(write_file(&v, "denied", b"x").await, Err(libc::EACCES));
    faulty.set_plan(FaultPlan::default());

    // Bytes corrupted on the way from the store: EIO, never wrong data.
    write_file(&v, "victim", &vec![3u8; 200_000]).await.unwrap();
    let fresh = test_vfs(Arc::new(faulty.clone()), staging.path(), "", 16, 1);
    faulty.set_plan(FaultPlan {
        corrupt_gets: true,
        ..Default::default()
    });
    assert_eq!(read_file(&fresh, "victim").await, Err(libc::EIO));
    faulty.set_plan(FaultPlan::default());
    assert_eq!(read_file(&fresh, "good").await.unwrap(), b"good");

    // An object tampered with at rest (a chunk rewritten, size unchanged): EIO.
    assert!(mem.tamper("victim", |b| b[100] ^= 1));
    let fresh = test_vfs(Arc::new(faulty.clone()), staging.path(), "", 16, 1);
    assert_eq!(read_file(&fresh, "victim").await, Err(libc::EIO));
    // Its envelope moved to another object: EIO too (commitment / file id checks).
    let good_meta = {
        let r = mem.get("good", None, &Default::default()).await.unwrap();
        r.info.metadata.unwrap()
    };
    assert!(mem.tamper_metadata("victim", |m| *m = good_meta.clone()));
    let fresh = test_vfs(Arc::new(faulty.clone()), staging.path(), "", 16, 1);
    assert_eq!(read_file(&fresh, "victim").await, Err(libc::EIO));
    assert_eq!(read_file(&fresh, "good").await.unwrap(), b"good");

    // Transient failures are counted by the wrapper.
    assert!(
        faulty
            .stats()
            .failed
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
}
