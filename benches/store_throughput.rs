//! Local store put and get throughput with 1 and 3 replicas, against `dd conv=fsync` of the
//! same bytes to the same disk, as ratios. `cargo bench --bench store_throughput`
//! (COFFER_BENCH_MIB sets the size, COFFER_BENCH_DIR the directory; page caches are
//! dropped before reads when running as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use coffer::store::local::{LocalStore, LocalStoreConfig};
use coffer::store::{GetOptions, ObjectStore, PutOptions};

/// Best effort: without root the reads are warm, as the header says.
fn drop_caches() {
    let _ = coffer::store::throughput::drop_page_cache();
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn dd_write(dir: &Path, mib: u64) -> f64 {
    let out = dir.join("dd.bin");
    let t = Instant::now();
    let st = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .args([
            "bs=1M",
            &format!("count={mib}"),
            "conv=fsync",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(st.success());
    let secs = t.elapsed().as_secs_f64();
    mbps(mib << 20, secs)
}

fn dd_read(dir: &Path, mib: u64) -> f64 {
    drop_caches();
    let t = Instant::now();
    let st = Command::new("dd")
        .arg(format!("if={}", dir.join("dd.bin").display()))
        .args(["of=/dev/null", "bs=1M", "status=none"])
        .status()
        .expect("dd");
    assert!(st.success());
    mbps(mib << 20, t.elapsed().as_secs_f64())
}

async fn store_run(dir: &Path, n: usize, mib: u64) -> (f64, f64) {
    let cfg = LocalStoreConfig {
        store_id: "bench".into(),
        replicas: (0..n).map(|i| dir.join(format!("n{n}-r{i}"))).collect(),
        versioning: false,
        ..Default::default()
    };
    LocalStore::init(&cfg).unwrap();
    let s = LocalStore::open(&cfg).unwrap();
    let part: Vec<u8> = (0..8u64 << 20)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect();
    let part = Bytes::from(part);
    let t = Instant::now();
    let mut up = s
        .create_upload("bench/object", &PutOptions::default())
        .await
        .unwrap();
    for _ in 0..mib / 8 {
        up.put_part(part.clone()).await.unwrap();
    }
    up.complete().await.unwrap();
    let put = mbps(mib << 20, t.elapsed().as_secs_f64());
    drop_caches();
    let t = Instant::now();
    let mut off = 0;
    while off < mib << 20 {
        let r = s
            .get(
                "bench/object",
                Some(off..off + (8 << 20)),
                &GetOptions::default(),
            )
            .await
            .unwrap();
        off += r.body.len() as u64;
    }
    let get = mbps(mib << 20, t.elapsed().as_secs_f64());
    (put, get)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too, on a small size.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("COFFER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 16 } else { 1024 });
    let base = std::env::var_os("COFFER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = tempfile::Builder::new()
        .prefix("store-bench-")
        .tempdir_in(&base)
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dd_w = dd_write(dir.path(), mib);
    let dd_r = dd_read(dir.path(), mib);
    let (p1, g1) = rt.block_on(store_run(dir.path(), 1, mib));
    let (p3, g3) = rt.block_on(store_run(dir.path(), 3, mib));
    println!(
        "local store throughput, {mib} MiB object, {}",
        dir.path().display()
    );
    println!("{:<28} {:>10} {:>14}", "", "MB/s", "ratio to dd");
    println!(
        "{:<28} {:>10.0} {:>14}",
        "dd conv=fsync write", dd_w, "1.00"
    );
    println!("{:<28} {:>10.0} {:>14.2}", "put, 1 replica", p1, p1 / dd_w);
    println!("{:<28} {:>10.0} {:>14.2}", "put, 3 replicas", p3, p3 / dd_w);
    println!("{:<28} {:>10.0} {:>14}", "dd read (cold)", dd_r, "1.00");
    println!("{:<28} {:>10.0} {:>14.2}", "get, 1 replica", g1, g1 / dd_r);
    println!("{:<28} {:>10.0} {:>14.2}", "get, 3 replicas", g3, g3 / dd_r);
    println!(
        "{{\"bench\":\"store\",\"mib\":{mib},\"dd_write\":{dd_w:.1},\"dd_read\":{dd_r:.1},\"put1\":{p1:.1},\"put3\":{p3:.1},\"get1\":{g1:.1},\"get3\":{g3:.1},\"put1_ratio\":{:.3},\"put3_ratio\":{:.3}}}",
        p1 / dd_w,
        p3 / dd_w
    );
}
