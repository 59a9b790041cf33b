//! The HTTP client of the S3 store: hyper-util's pooled HTTP/1.1 client over rustls, like
//! the SDK's own, with one change the SDK's client cannot make: every read from the socket
//! re-arms `TCP_QUICKACK`.
//!
//! Why: Garage (like any server that leaves Nagle's algorithm on) writes a response's head
//! and its body separately, and the body's last small segment waits until the head is
//! acknowledged. A pooled client connection that has fallen into delayed-ACK mode holds that
//! ACK for 40 ms, so most GETs took 40 ms more than they needed (seen with tcpdump; with a
//! `quickack 1` loopback route, 300 small-file reads went from 6.5 s to 0.39 s). Linux has
//! no lasting per-socket switch: `TCP_QUICKACK` holds until the next exchange, so it is set
//! again after each read. aws-smithy-http-client keeps its connector wrapping crate-private,
//! so this module builds the same stack around a TCP stream of its own (hand-written glue,
//! about what the SDK's adapter does: request and response conversion, error kinds for the
//! retry policy, connection capture so a failed connection is not reused).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::connection::{CaptureSmithyConnection, ConnectionMetadata};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::ErrorKind;
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{
    CaptureConnection, Connected, Connection, HttpConnector as TcpConnector, HttpInfo,
    capture_connection,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection is kept (the SDK's default).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The roots to trust: the system's, or exactly the certificates of a PEM bundle.
pub enum Roots {
    System,
    Bundle(Vec<u8>),
}

/// A client for the SDK whose connections ask for quick ACKs. It applies the SDK's connect
/// timeout; each attempt as a whole is bounded by the SDK's attempt timeout.
pub fn quick_ack_client(roots: Roots) -> Result<SharedHttpClient, String> {
    Ok(SharedHttpClient::new(QuickAckClient {
        tls: tls_config(roots)?,
        connectors: Mutex::new(HashMap::new()),
    }))
}

/// The SDK asks its client for a connector before every request: one connector (and so one
/// connection pool) is kept per connect timeout, or every request would open a connection.
#[derive(Debug)]
struct QuickAckClient {
    tls: Arc<rustls::ClientConfig>,
    connectors: Mutex<HashMap<Option<Duration>, SharedHttpConnector>>,
}

impl HttpClient for QuickAckClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        self.connector_for(settings.connect_timeout())
    }
}

impl QuickAckClient {
    fn connector_for(&self, timeout: Option<Duration>) -> SharedHttpConnector {
        self.connectors
            .lock()
            .entry(timeout)
            .or_insert_with(|| {
                SharedHttpConnector::new(QuickAckHttp::new(self.tls.clone(), timeout))
            })
            .clone()
    }
}

/// System roots are read once: loading them costs a few milliseconds per call.
static SYSTEM_ROOTS: LazyLock<Vec<CertificateDer<'static>>> = LazyLock::new(|| {
    let found = rustls_native_certs::load_native_certs();
    if !found.errors.is_empty() {
        tracing::warn!(
            "some system CA certificates could not be loaded: {:?}",
            found.errors
        );
    }
    found.certs
});

fn tls_config(roots: Roots) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::System => {
            store.add_parsable_certificates(SYSTEM_ROOTS.iter().cloned());
        }
        Roots::Bundle(pem) => {
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("unreadable PEM certificate: {e}"))?;
                store
                    .add(cert)
                    .map_err(|e| format!("unusable CA certificate: {e}"))?;
            }
            if store.is_empty() {
                return Err("no PEM certificate in the CA bundle".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // ALPN (http/1.1) is set by hyper-rustls's builder.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One pooled hyper client; cloning shares the pool.
#[derive(Clone)]
struct QuickAckHttp {
    client: Client<HttpsConnector<QuickAckConnector>, SdkBody>,
}

impl std::fmt::Debug for QuickAckHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuickAckHttp")
    }
}

impl QuickAckHttp {
    fn new(tls: Arc<rustls::ClientConfig>, connect_timeout: Option<Duration>) -> Self {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(connect_timeout);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(QuickAckConnector { tcp });
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(https);
        QuickAckHttp { client }
    }
}

impl HttpConnector for QuickAckHttp {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let mut request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        // Lets the SDK's retry policy poison a connection that failed mid-request.
        let captured = capture_connection(&mut request);
        if let Some(capture) = request.extensions().get::<CaptureSmithyConnection>() {
            capture.set_connection_retriever(move || connection_metadata(&captured));
        }
        let response = self.client.request(request);
        HttpConnectorFuture::new(async move {
            match response.await {
                Ok(response) => HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                    .map_err(|e| ConnectorError::other(e.into(), None)),
                Err(e) => Err(connector_error(e)),
            }
        })
    }
}

fn connection_metadata(captured: &CaptureConnection) -> Option<ConnectionMetadata> {
    let connected = captured.connection_metadata();
    let connected = connected.as_ref()?;
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    let info = extras.get::<HttpInfo>();
    let poison = captured.clone();
    let mut builder = ConnectionMetadata::builder()
        .proxied(false)
        .poison_fn(move || {
            if let Some(c) = poison.connection_metadata().as_ref() {
                c.poison()
            }
        });
    builder
        .set_local_addr(info.map(|i| i.local_addr()))
        .set_remote_addr(info.map(|i| i.remote_addr()));
    Some(builder.build())
}

/// Sorts a hyper failure the way the SDK's client does, so that its retry policy retries
/// resets, refused connections and timeouts and nothing else.
fn connector_error(e: hyper_util::client::legacy::Error) -> ConnectorError {
    let has_io = source_of::<io::Error>(&e).is_some();
    let other: fn(BoxError) -> ConnectorError = |e| ConnectorError::other(e, None);
    let make: fn(BoxError) -> ConnectorError = if e.is_connect() {
        ConnectorError::io
    } else if let Some(h) = source_of::<hyper::Error>(&e) {
        if h.is_timeout() {
            ConnectorError::timeout
        } else if h.is_user() {
            ConnectorError::user
        } else if h.is_closed() || h.is_canceled() || has_io {
            ConnectorError::io
        } else if h.is_incomplete_message() {
            |e| ConnectorError::other(e, Some(ErrorKind::TransientError))
        } else {
            other
        }
    } else if has_io {
        ConnectorError::io
    } else {
        other
    };
    make(Box::new(e))
}

fn source_of<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

/// hyper-util's TCP connector, handing out [`QuickAckStream`]s.
#[derive(Clone)]
struct QuickAckConnector {
    tcp: TcpConnector,
}

impl tower::Service<Uri> for QuickAckConnector {
    type Response = QuickAckStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAckStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(QuickAckStream { inner })
        })
    }
}

/// A TCP stream that asks the kernel to acknowledge at once whatever it receives.
pub struct QuickAckStream {
    inner: TokioIo<TcpStream>,
}

/// Best effort: on failure the connection only loses the speed-up.
fn quick_ack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a pointer to a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Read for QuickAckStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            quick_ack(self.inner.inner());
        }
        read
    }
}

impl Write for QuickAckStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

impl Connection for QuickAckStream {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests share a connection pool: the connector is made once per connect timeout.
    #[tokio::test]
    async fn one_connector_per_connect_timeout() {
        let client = QuickAckClient {
            tls: tls_config(Roots::System).unwrap(),
            connectors: Mutex::new(HashMap::new()),
        };
        for _ in 0..3 {
            client.connector_for(Some(Duration::from_secs(10)));
        }
        assert_eq!(client.connectors.lock().len(), 1);
        client.connector_for(None);
        assert_eq!(client.connectors.lock().len(), 2);
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let e = tls_config(Roots::Bundle(b"not a certificate".to_vec())).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    fn quick_ack_of(stream: &TcpStream) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid descriptor, out-pointers to locals of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        value
    }

    /// A stream put into delayed-ACK mode is back in quick-ACK mode after a read (reading
    /// alone would leave it delayed until the 40 ms timer missed an ACK).
    #[tokio::test]
    async fn reads_re_arm_quick_ack() {
        use hyper::rt::Read as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            wait.await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"hello")
                .await
                .unwrap();
            s
        });
        let mut connector = QuickAckConnector {
            tcp: TcpConnector::new(),
        };
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let mut stream = tower::Service::call(&mut connector, uri).await.unwrap();
        let off: libc::c_int = 0;
        // SAFETY: valid descriptor and a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                stream.inner.inner().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        assert_eq!(quick_ack_of(stream.inner.inner()), 0, "delayed-ACK mode");
        go.send(()).unwrap();
        let _server_side = server.await.unwrap();
        let mut got = [std::mem::MaybeUninit::<u8>::uninit(); 5];
        let mut buf = hyper::rt::ReadBuf::uninit(&mut got);
        std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, buf.unfilled()))
            .await
            .unwrap();
        assert!(!buf.filled().is_empty());
        assert_eq!(
            quick_ack_of(stream.inner.inner()),
            1,
            "quick-ACK mode after a read"
        );
    }
}
