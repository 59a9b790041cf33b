//! A fault-injecting HTTP proxy between coffer and an S3 server: it answers a share of the
//! requests with 503 SlowDown, resets a share of the connections (before the request
//! reaches the server, or after, while the answer is on its way), and can stall answers.
//! Written here because the faults must be placed per request, which generic TCP fault
//! tools do not do.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Fault rates in parts per thousand, changeable while the proxy runs.
#[derive(Default)]
pub struct Faults {
    pub slowdown_permille: AtomicU64,
    pub reset_permille: AtomicU64,
    pub stall_ms: AtomicU64,
    /// Requests whose path contains this stall (with `stall_ms`); empty: none.
    pub stall_match: parking_lot::Mutex<String>,
}

#[derive(Default, Debug)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub slowdowns: AtomicU64,
    pub resets_before: AtomicU64,
    pub resets_after: AtomicU64,
    pub stalls: AtomicU64,
    /// PUTs with a body, by whether SigV4 signed its SHA-256 or said UNSIGNED-PAYLOAD.
    pub signed_puts: AtomicU64,
    pub unsigned_puts: AtomicU64,
}

impl ProxyStats {
    pub fn line(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} requests, {} answered 503 SlowDown, {} connections reset before the server saw the request, {} reset while answering, {} stalled",
            l(&self.requests),
            l(&self.slowdowns),
            l(&self.resets_before),
            l(&self.resets_after),
            l(&self.stalls)
        )
    }
}

pub struct Proxy {
    pub endpoint: String,
    pub faults: Arc<Faults>,
    pub stats: Arc<ProxyStats>,
}

/// Starts a proxy to `upstream` (host:port) on its own thread and runtime.
pub fn start(upstream: &str) -> Proxy {
    let upstream: SocketAddr = upstream.parse().unwrap();
    let faults = Arc::new(Faults::default());
    let stats = Arc::new(ProxyStats::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (f, s) = (faults.clone(), stats.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (f, s) = (f.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, f, s).await;
                });
            }
        });
    });
    let addr = rx.recv().unwrap();
    Proxy {
        endpoint: format!("http://{addr}"),
        faults,
        stats,
    }
}

fn roll(permille: u64) -> bool {
    if permille == 0 {
        return false;
    }
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).unwrap();
    (u16::from_le_bytes(b) as u64 % 1000) < permille
}

fn reset(stream: TcpStream) {
    // A zero linger turns the close into a TCP reset (and never blocks: nothing lingers).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Where a request's body starts: just past the blank line that ends its head.
fn body_start(request: &[u8]) -> Option<usize> {
    request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// Reads one request head (through the blank line) and its Content-Length body.
async fn read_request(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    let head_end = loop {
        if let Some(p) = body_start(buf) {
            break p;
        }
        let mut chunk = [0u8; 16384];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = vec![0u8; 1 << 20];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = buf.split_off(head_end + len);
    let request = std::mem::replace(buf, rest);
    Ok(Some(request))
}

/// Counts a PUT with a body as signed or unsigned (its `x-amz-content-sha256`).
fn count_payload_signing(request: &[u8], stats: &ProxyStats) {
    let Some(body) = body_start(request) else {
        return;
    };
    let head = String::from_utf8_lossy(&request[..body]).to_ascii_lowercase();
    if !head.starts_with("put ") || request.len() == body {
        return;
    }
    let hash = head
        .lines()
        .find_map(|l| l.strip_prefix("x-amz-content-sha256:"));
    match hash.map(str::trim) {
        Some("unsigned-payload") => stats.unsigned_puts.fetch_add(1, Ordering::Relaxed),
        _ => stats.signed_puts.fetch_add(1, Ordering::Relaxed),
    };
}

/// The request with `Connection: close`, so that the server's answer ends at its EOF.
fn with_connection_close(request: &[u8]) -> Vec<u8> {
    let head_end = body_start(request).unwrap();
    let head = String::from_utf8_lossy(&request[..head_end - 4]);
    let mut out = String::new();
    for line in head.split("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&request[head_end..]);
    bytes
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    faults: Arc<Faults>,
    stats: Arc<ProxyStats>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let Some(request) = read_request(&mut client, &mut buf).await? else {
        return Ok(());
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    count_payload_signing(&request, &stats);
    let first_line = String::from_utf8_lossy(&request[..request.len().min(300)])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if roll(faults.reset_permille.load(Ordering::Relaxed)) {
        if roll(500) {
            stats.resets_before.fetch_add(1, Ordering::Relaxed);
            reset(client);
            return Ok(());
        }
        // The server does the work, the client never hears of it.
        let mut up = TcpStream::connect(upstream).await?;
        up.write_all(&with_connection_close(&request)).await?;
        let mut sink = Vec::new();
        let _ = up.read_to_end(&mut sink).await;
        stats.resets_after.fetch_add(1, Ordering::Relaxed);
        let half = sink.len() / 2;
        let _ = client.write_all(&sink[..half.min(100)]).await;
        reset(client);
        return Ok(());
    }
    if roll(faults.slowdown_permille.load(Ordering::Relaxed)) {
        stats.slowdowns.fetch_add(1, Ordering::Relaxed);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let answer = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            if first_line.starts_with("HEAD ") {
                0
            } else {
                body.len()
            },
            if first_line.starts_with("HEAD ") {
                ""
            } else {
                body
            }
        );
        client.write_all(answer.as_bytes()).await?;
        client.shutdown().await?;
        return Ok(());
    }
    let stall = faults.stall_ms.load(Ordering::Relaxed);
    let pattern = faults.stall_match.lock().clone();
    if stall > 0 && !pattern.is_empty() && first_line.contains(&pattern) {
        stats.stalls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(stall)).await;
    }
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&with_connection_close(&request)).await?;
    tokio::io::copy(&mut up, &mut client).await?;
    client.shutdown().await?;
    Ok(())
}
