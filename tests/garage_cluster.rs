//! Distributed S3: coffer on a three-node Garage cluster (replication factor 3) keeps
//! reading and writing while a node is down, and everything written reads back after the
//! node returns.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::time::{Duration, Instant};

use common::*;

/// Objects coffer stores for a tree: one per file, symlink and directory (its marker), and
/// the tree's own marker.
fn count_keys(root: &std::path::Path) -> usize {
    sh(&format!("find '{}' | wc -l", root.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_node_dies_during_a_one_gib_rsync_and_nothing_is_lost() {
    require_fuse();
    require_tool("rsync", "rsync");
    let cluster = s3::garage_cluster(3);
    let server = &cluster.server;
    let dir = tempfile::Builder::new()
        .prefix("coffer-cluster-")
        .tempdir()
        .unwrap();
    // About 1 GiB: the round-trip tree with a 200 MiB file, and four more of 200 MiB.
    let src = dir.path().join("src");
    make_tree(&src, 200);
    for i in 0..4 {
        sh(&format!(
            "head -c {} /dev/urandom > '{}/part-{i}.bin'",
            200 << 20,
            src.display()
        ));
    }
    let key = dir.path().join("root.key");
    let source = server.fresh_source("cluster");
    server.init(&source, &["--key", key.to_str().unwrap()]);
    let args = ["--key", key.to_str().unwrap()];
    let m = server.mount(&source, dir.path(), &args);
    let rsync = std::process::Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", m.p("tree").display()))
        .spawn()
        .unwrap();
    // Stop the third node once the copy is well under way.
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    cluster.nodes[2].kill();
    eprintln!(
        "node 3 killed {:.1} s into the rsync",
        started.elapsed().as_secs_f64()
    );
    let status = rsync.wait_with_output().unwrap();
    assert!(status.status.success(), "rsync failed with a node down");
    eprintln!(
        "rsync of 1 GiB done in {:.1} s with a node down",
        started.elapsed().as_secs_f64()
    );
    assert_trees_equal(&src, &m.p("tree"));
    m.unmount();
    // Still down: a fresh mount reads everything back.
    let m = server.mount(&source, dir.path(), &args);
    sh(&format!(
        "diff -r --no-dereference '{}' '{}'",
        src.display(),
        m.p("tree").display()
    ));
    m.unmount();
    // The node returns.
    cluster.nodes[2].start();
    // A returning node has missed the writes made without it, and Garage may answer
    // listings from its stale tables until they are synced (seen here: a listing of 28 keys
    // answered with 27). An operator runs a table repair; the test does, then waits until
    // listings are complete and stable, and says how long that took.
    let back = Instant::now();
    cluster.cli(0, &["repair", "-a", "--yes", "tables"]);
    let prefix = source
        .trim_start_matches(&format!("s3://{}/", server.bucket))
        .to_string();
    let stable = s3::boto3(
        server,
        &format!(
            r#"
import time
def keys():
    ks, token = [], None
    while True:
        kw = dict(Bucket=bucket, Prefix='{prefix}/')
        if token: kw['ContinuationToken'] = token
        r = s3.list_objects_v2(**kw)
        ks += [o['Key'] for o in r.get('Contents', [])]
        token = r.get('NextContinuationToken')
        if not token: return ks
def count():
    root = s3.list_objects_v2(Bucket=bucket, Prefix='{prefix}/', Delimiter='/')
    if len(root.get('CommonPrefixes', [])) != 2:  # tree/ and .coffer/
        return -1
    return len(keys())
want = {want} + 1  # and the volume config
good, start, seen = 0, time.time(), set()
while good < 50:
    c = count()
    seen.add(c)
    good = good + 1 if c == want else 0
    if time.time() - start > 120: raise SystemExit(f'listings never became complete: want {{want}}, saw {{sorted(seen)}}')
    time.sleep(0.1)
print(round(time.time() - start, 1))
"#,
            want = count_keys(&src)
        ),
    );
    eprintln!(
        "node 3 back; after a table repair, listings complete and stable within {} s ({:.1} s in all)",
        stable.trim(),
        back.elapsed().as_secs_f64()
    );
    // Listings are trusted for the whole check (no refresh while it runs).
    let long_ttl = ["--key", key.to_str().unwrap(), "--metadata-ttl", "3600"];
    let m = server.mount(&source, dir.path(), &long_ttl);
    assert_trees_equal(&src, &m.p("tree"));
    m.unmount();
}
