//! Mounts of S3 stores against real servers on loopback: rsync and tar round trips on Garage
//! in client-side and SSE-C modes, objects readable by boto3 with the customer key, listings
//! with bounded requests, versions on moto, TLS with a CA bundle.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::fs;
use std::path::Path;

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("coffer-s3-test-")
        .tempdir()
        .unwrap()
}

/// rsync in, a second rsync that changes nothing, rsync out, tar out: all exact, and again
/// after a remount.
fn round_trips(server: &s3::S3Server, source: &str, dir: &Path, mount_args: &[&str]) {
    let src = dir.join("src");
    make_tree(&src, 24);
    let m = server.mount(source, dir, mount_args);
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    let again = sh(&format!(
        "rsync -a --itemize-changes '{}/' '{}/'",
        src.display(),
        m.p("tree").display()
    ));
    assert_eq!(again.trim(), "", "a second rsync transferred:\n{again}");
    let back = dir.join("back");
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        m.p("tree").display(),
        back.display()
    ));
    assert_trees_equal(&src, &back);
    fs::create_dir(m.p("t")).unwrap();
    sh(&format!(
        "tar --format=posix -C '{}' -cf - . | tar -C '{}' -xpf -",
        src.display(),
        m.p("t").display()
    ));
    m.unmount();
    let m = server.mount(source, dir, mount_args);
    let out = dir.join("out");
    fs::create_dir(&out).unwrap();
    sh(&format!(
        "tar --format=posix -C '{}' -cf - . | tar -C '{}' -xpf -",
        m.p("t").display(),
        out.display()
    ));
    assert_trees_equal(&src, &out);
    let back2 = dir.join("back2");
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        m.p("tree").display(),
        back2.display()
    ));
    assert_trees_equal(&src, &back2);
    // The store's own config stays hidden and cannot be created.
    let root: Vec<_> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!root.iter().any(|n| n == ".coffer"), "{root:?}");
    assert_eq!(
        fs::create_dir(m.p(".coffer")).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    m.unmount();
}

#[test]
fn rsync_and_tar_round_trip_on_garage_with_client_side_encryption() {
    require_fuse();
    require_tool("rsync", "rsync");
    let g = s3::garage();
    let dir = tmp();
    let key = dir.path().join("root.key");
    let source = g.fresh_source("client");
    g.init(&source, &["--key", key.to_str().unwrap()]);
    round_trips(g, &source, dir.path(), &["--key", key.to_str().unwrap()]);
    // Without the key: a clear refusal.
    let out = g.coffer("mount", &source).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_sse_c_keys(dir: &Path, keys: &[[u8; 32]]) -> std::path::PathBuf {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("sse-c-{}.keys", rand_suffix()));
    let text: String = keys
        .iter()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(k) + "\n")
        .collect();
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn rsync_and_tar_round_trip_on_garage_with_sse_c() {
    require_fuse();
    require_tool("rsync", "rsync");
    let g = s3::garage();
    let dir = tmp();
    let keyfile = write_sse_c_keys(dir.path(), &[[0x5a; 32]]);
    let source = g.fresh_source("ssec");
    g.init(&source, &["--encryption", "sse-c"]);
    round_trips(
        g,
        &source,
        dir.path(),
        &["--sse-c-key", keyfile.to_str().unwrap()],
    );
}

#[test]
fn sse_c_objects_read_with_boto3_and_the_key_only() {
    require_fuse();
    s3::require_moto(); // boto3
    let g = s3::garage();
    let dir = tmp();
    let (old, new) = ([0x11u8; 32], [0x22u8; 32]);
    let source = g.fresh_source("ssec-boto");
    g.init(&source, &["--encryption", "sse-c"]);
    let prefix = source.trim_start_matches(&format!("s3://{}/", g.bucket));
    let old_keys = write_sse_c_keys(dir.path(), &[old]);
    let m = g.mount(
        &source,
        dir.path(),
        &["--sse-c-key", old_keys.to_str().unwrap()],
    );
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.p("doc.bin"), &content).unwrap();
    m.unmount();
    // boto3 with the same customer key gets the plain file; without it Garage refuses.
    let script = format!(
        "import base64\n\
         key = bytes([0x11]*32)\n\
         body = s3.get_object(Bucket=bucket, Key='{prefix}/doc.bin', SSECustomerAlgorithm='AES256', SSECustomerKey=key)['Body'].read()\n\
         sys.stdout.write(body.hex())\n\
         try:\n    s3.get_object(Bucket=bucket, Key='{prefix}/doc.bin')\n    print('\\nREAD WITHOUT KEY')\n\
         except botocore.exceptions.ClientError as e:\n    print('\\nrefused', e.response['Error']['Code'])\n"
    );
    let out = s3::boto3(g, &script);
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap(), hex::encode(&content));
    let refusal = lines.next().unwrap();
    assert!(refusal.starts_with("refused"), "{refusal}");
    // A key history: the new key writes, the old one still reads older objects.
    let history = write_sse_c_keys(dir.path(), &[new, old]);
    let m = g.mount(
        &source,
        dir.path(),
        &["--sse-c-key", history.to_str().unwrap()],
    );
    assert_eq!(fs::read(m.p("doc.bin")).unwrap(), content);
    fs::write(m.p("new.txt"), b"under the new key").unwrap();
    m.unmount();
    // A mount with only a wrong key says so at once.
    let wrong = write_sse_c_keys(dir.path(), &[[0x33; 32]]);
    let mnt = dir.path().join("wrong");
    fs::create_dir(&mnt).unwrap();
    let out = g
        .coffer("mount", &source)
        .arg(&mnt)
        .args(["--sse-c-key", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SSE-C key"), "{err}");
    // Key files readable by others are refused.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o644)).unwrap();
    let out = g
        .coffer("mount", &source)
        .arg(&mnt)
        .args(["--sse-c-key", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("readable by others"));
}

#[test]
fn versions_through_the_mount_on_moto() {
    require_fuse();
    let server = s3::moto();
    let dir = tmp();
    let key = dir.path().join("root.key");
    let source = server.fresh_source("versions");
    server.init(&source, &["--key", key.to_str().unwrap()]);
    let k = ["--key", key.to_str().unwrap()];
    let m = server.mount(&source, dir.path(), &k);
    fs::write(m.p("notes.txt"), b"first").unwrap();
    fs::write(m.p("notes.txt"), b"second, longer").unwrap();
    fs::write(m.p("gone.txt"), b"deleted later").unwrap();
    fs::remove_file(m.p("gone.txt")).unwrap();
    m.unmount();
    let list = server.run({
        let mut c = std::process::Command::new(coffer_bin());
        c.arg("versions")
            .arg(&source)
            .arg("notes.txt")
            .args(server.args());
        c
    });
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines.len() >= 2, "{list}");
    assert!(lines[0].contains("latest"), "{list}");
    // The oldest version of notes.txt holds "first" (5 bytes).
    let oldest = lines
        .iter()
        .rev()
        .find(|l| l.split_whitespace().nth(2) == Some("5"))
        .unwrap_or_else(|| panic!("no 5-byte version:\n{list}"));
    let version = oldest.split_whitespace().next().unwrap();
    server.run({
        let mut c = std::process::Command::new(coffer_bin());
        c.args(["restore", &source, "notes.txt", version])
            .args(server.args());
        c
    });
    let gone = server.run({
        let mut c = std::process::Command::new(coffer_bin());
        c.arg("versions")
            .arg(&source)
            .arg("gone.txt")
            .args(server.args());
        c
    });
    assert!(gone.contains("(deleted)"), "{gone}");
    let old = gone
        .lines()
        .find(|l| !l.contains("(deleted)"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    server.run({
        let mut c = std::process::Command::new(coffer_bin());
        c.args(["restore", &source, "gone.txt", &old])
            .args(server.args());
        c
    });
    let m = server.mount(&source, dir.path(), &k);
    assert_eq!(fs::read(m.p("notes.txt")).unwrap(), b"first");
    assert_eq!(fs::read(m.p("gone.txt")).unwrap(), b"deleted later");
    m.unmount();
    // On Garage, without versioning, the commands say so.
    let g = s3::garage();
    let gsource = g.fresh_source("noversions");
    g.init(&gsource, &["--encryption", "none"]);
    let out = g.coffer("versions", &gsource).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not keep versions"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_mount_needs_the_ca_bundle() {
    require_fuse();
    let server = s3::moto_tls();
    let dir = tmp();
    let key = dir.path().join("root.key");
    let source = server.fresh_source("tls");
    server.init(&source, &["--key", key.to_str().unwrap()]);
    let m = server.mount(&source, dir.path(), &["--key", key.to_str().unwrap()]);
    fs::write(m.p("over-tls.txt"), b"sealed twice").unwrap();
    m.unmount();
    let m = server.mount(&source, dir.path(), &["--key", key.to_str().unwrap()]);
    assert_eq!(fs::read(m.p("over-tls.txt")).unwrap(), b"sealed twice");
    m.unmount();
    // The same mount without --ca-bundle fails, and says it is the certificate.
    let mnt = dir.path().join("untrusted");
    fs::create_dir(&mnt).unwrap();
    let out = std::process::Command::new(coffer_bin())
        .args(["mount", &source])
        .arg(&mnt)
        .args(["--endpoint-url", &server.endpoint, "--path-style"])
        .args(["--key", key.to_str().unwrap()])
        .envs(server.env())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    assert!(err.contains("certificate"), "{err}");
}
