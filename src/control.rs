//! Live statistics of a running mount: a Unix socket that `coffer stats MOUNTPOINT` reads,
//! and an optional Prometheus endpoint on loopback.
//!
//! The socket lives outside the mount (a file inside it would be copied by rsync and tar):
//! `/run/coffer/` for root, `$XDG_RUNTIME_DIR/coffer/` for others, named by a hash of the
//! mount point's canonical path so `coffer stats` finds it from the path alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

use crate::vfs::Vfs;

/// The directory of the control sockets of this user's mounts.
fn socket_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/coffer");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("coffer"),
        None => PathBuf::from(format!("/tmp/coffer-{uid}")),
    }
}

/// The control socket of the mount at `mountpoint`.
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canon = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let digest = Sha256::digest(canon.as_os_str().as_encoded_bytes());
    socket_dir().join(format!("{}.sock", hex::encode(&digest[..8])))
}

/// The statistics as `name value` lines.
pub fn render(vfs: &Vfs, mountpoint: &Path) -> String {
    let mut out = format!("mountpoint {}\n", mountpoint.display());
    let pairs = vfs.stats_pairs();
    for (k, v) in &pairs {
        out.push_str(&format!("{k} {v}\n"));
    }
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map_or(0, |p| p.1);
    let (hits, misses) = (get("cache_hits"), get("cache_misses"));
    if hits + misses > 0 {
        out.push_str(&format!(
            "cache_hit_rate {:.3}\n",
            hits as f64 / (hits + misses) as f64
        ));
    }
    out
}

/// Binds the control socket (replacing one a dead mount left).
pub fn bind(mountpoint: &Path) -> Result<(tokio::net::UnixListener, PathBuf)> {
    let path = socket_path(mountpoint);
    let dir = path.parent().expect("a socket directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    Ok((listener, path))
}

/// Answers every connection with the statistics, until the task is aborted.
pub async fn serve(listener: tokio::net::UnixListener, vfs: Arc<Vfs>, mountpoint: PathBuf) {
    loop {
        match listener.accept().await {
            Ok((mut conn, _)) => {
                let text = render(&vfs, &mountpoint);
                let _ = conn.write_all(text.as_bytes()).await;
            }
            Err(e) => {
                warn!("control socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads the statistics of the mount at `mountpoint` (for `coffer stats`).
pub fn query(mountpoint: &Path) -> Result<String> {
    use std::io::Read;
    let path = socket_path(mountpoint);
    let mut conn = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow!(
            "no coffer mount answers for {} ({}: {e}); is it mounted by this user?",
            mountpoint.display(),
            path.display()
        )
    })?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}

/// The statistics in Prometheus' text format.
pub fn prometheus_text(vfs: &Vfs) -> String {
    let mut out = String::new();
    for (k, v) in vfs.stats_pairs() {
        let kind = if k.ends_with("bytes") && !k.starts_with("bytes_") {
            "gauge"
        } else {
            "counter"
        };
        out.push_str(&format!("# TYPE coffer_{k} {kind}\ncoffer_{k} {v}\n"));
    }
    out
}

/// Checks that a Prometheus address is on loopback: the figures are for this host only.
pub fn check_loopback(addr: &str) -> Result<SocketAddr> {
    let a: SocketAddr = addr
        .parse()
        .map_err(|_| anyhow!("--prometheus {addr}: not an address like 127.0.0.1:9464"))?;
    if !a.ip().is_loopback() {
        bail!("--prometheus {addr}: only loopback addresses are allowed");
    }
    Ok(a)
}

/// Serves `/metrics` (any path, in fact) over HTTP/1.1. Hand-written: one fixed answer per
/// connection needs no HTTP framework.
pub async fn serve_prometheus(listener: tokio::net::TcpListener, vfs: Arc<Vfs>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let vfs = vfs.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
            let body = prometheus_text(&vfs);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        });
    }
}
