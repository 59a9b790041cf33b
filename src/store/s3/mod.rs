//! The S3 backend: [`ObjectStore`] over any S3-compatible service through `aws-sdk-s3`.
//!
//! The store is rooted at `s3://bucket/prefix`: keys above are relative to the prefix.
//! Every put carries a flexible checksum (CRC32C, or SHA-256) that the server verifies;
//! gets ask for the stored checksum and the SDK verifies whole-object answers; a body that
//! fails it is fetched once more, then reported corrupt. The SDK retries throttling, 5xx,
//! timeouts and resets with exponential backoff and jitter; what still fails maps to a
//! typed error (see `errors`). Multipart parts are uploaded several at once, with the number
//! in flight bounded, so memory stays bounded too.

pub mod config;
mod errors;
mod http;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketVersioningStatus, ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload,
    CompletedPart, MetadataDirective, ServerSideEncryption,
};
use aws_smithy_runtime_api::box_error::BoxError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use tokio::task::JoinSet;
use tracing::{debug, warn};

pub use config::{S3Location, S3Options, WireChecksum};

use crate::buffers::GET_BUFFERS;
use errors::{Op, map_err};

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, Metadata, ObjectInfo, ObjectStore,
    PutOptions, Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo, metadata_size,
};

/// Objects larger than this are copied part by part (UploadPartCopy): S3's CopyObject stops
/// at 5 GiB.
const MAX_SINGLE_COPY: u64 = 5 << 30;
/// Size of each UploadPartCopy range.
const COPY_PART: u64 = 1 << 30;

/// A response body gathered into one pooled buffer (see [`crate::buffers`]), each frame
/// dropped as soon as it is copied: collected whole by the SDK instead, the frames kept
/// hyper's read buffers alive until the end, so every read went to a fresh mapping, and
/// the gathered copy to another (zeroing those pages was a quarter of the mount's CPU in a
/// cold read).
async fn collect_body(
    mut body: ByteStream,
    length: usize,
) -> Result<Bytes, aws_sdk_s3::primitives::ByteStreamError> {
    let mut buf = GET_BUFFERS.for_len(length);
    while let Some(frame) = body.try_next().await? {
        buf.extend_from_slice(&frame);
    }
    Ok(GET_BUFFERS.reclaimable(buf))
}

/// Marks a checksum mismatch on a multipart object (see [`S3Store::get_once`]).
const MULTIPART_MISMATCH: &str = "multipart object: ";

/// Requests sent, by kind, and attempts (requests plus the SDK's retries).
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub head: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub copy: AtomicU64,
    pub multipart: AtomicU64,
    pub attempts: AtomicU64,
    pub failed: AtomicU64,
}

impl RequestCounts {
    fn bump(&self, op: Op) {
        let c = match op {
            Op::Get => &self.get,
            Op::Put => &self.put,
            Op::Head => &self.head,
            Op::List => &self.list,
            Op::Delete => &self.delete,
            Op::Copy => &self.copy,
            Op::Multipart | Op::Bucket => &self.multipart,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        [
            &self.get,
            &self.put,
            &self.head,
            &self.list,
            &self.delete,
            &self.copy,
            &self.multipart,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn summary(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let requests = self.requests();
        vec![
            ("requests", requests),
            ("get", l(&self.get)),
            ("put", l(&self.put)),
            ("head", l(&self.head)),
            ("list", l(&self.list)),
            ("delete", l(&self.delete)),
            ("copy", l(&self.copy)),
            ("multipart", l(&self.multipart)),
            ("retries", l(&self.attempts).saturating_sub(requests)),
            ("failed", l(&self.failed)),
        ]
    }
}

/// Counts every attempt the SDK makes, so that retries show in the figures.
#[derive(Debug)]
struct AttemptCounter(Arc<RequestCounts>);

impl Intercept for AttemptCounter {
    fn name(&self) -> &'static str {
        "coffer-attempt-counter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.attempts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Cheap to clone: clones share the client and the counters.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    location: S3Location,
    checksum: WireChecksum,
    /// Whether puts sign their body (SigV4's SHA-256 of the payload): only where it crosses
    /// a network in the clear. Over TLS, or to this host, the flexible checksum that the
    /// server verifies guards the body, as in the AWS CLI's default for S3 over HTTPS; the
    /// signed hash cost a SHA-256 of every byte on both ends (about 1.2 CPU-seconds per GiB
    /// written on the bench machine, which the client shares with Garage).
    sign_payloads: bool,
    parts_in_flight: usize,
    counts: Arc<RequestCounts>,
}

/// Sends a put's request builder, without the payload's SHA-256 in its signature unless
/// `$sign` (see [`S3Store::sign_payloads`]).
macro_rules! send_put {
    ($req:expr, $sign:expr) => {{
        let req = $req;
        if $sign {
            req.send().await
        } else {
            req.customize().disable_payload_signing().send().await
        }
    }};
}

/// The three SSE-C header values: algorithm, key and key MD5 (base64).
fn sse_c_headers(sse: &Sse) -> Option<(String, String, String)> {
    use md5::Digest;
    match sse {
        Sse::Customer(k) => Some((
            "AES256".to_string(),
            B64.encode(k.bytes()),
            B64.encode(md5::Md5::digest(k.bytes())),
        )),
        _ => None,
    }
}

/// Applies SSE parameters to a request builder: `sse_c!` for requests that read or write a
/// body (SSE-C headers only), `sse_all!` for those that create an object (SSE-S3, SSE-KMS
/// or SSE-C).
macro_rules! sse_c {
    ($b:expr, $sse:expr) => {{
        let b = $b;
        match sse_c_headers($sse) {
            Some((alg, key, md5)) => b
                .sse_customer_algorithm(alg)
                .sse_customer_key(key)
                .sse_customer_key_md5(md5),
            None => b,
        }
    }};
}

macro_rules! sse_all {
    ($b:expr, $sse:expr) => {{
        let b = sse_c!($b, $sse);
        match $sse {
            Sse::S3 => b.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms { key_id } => {
                let b = b.server_side_encryption(ServerSideEncryption::AwsKms);
                match key_id {
                    Some(id) => b.ssekms_key_id(id.clone()),
                    None => b,
                }
            }
            _ => b,
        }
    }};
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn etag_of(e: Option<&str>) -> String {
    e.unwrap_or("").trim_matches('"').to_string()
}

/// An ETag as S3's conditional headers take it (quoted; ETags are kept unquoted here).
fn quoted(etag: &Option<String>) -> Option<String> {
    etag.as_ref().map(|e| format!("\"{e}\""))
}

fn metadata_of(m: Option<&std::collections::HashMap<String, String>>) -> Metadata {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// The total size in a `Content-Range: bytes a-b/total` answer.
fn total_from_content_range(v: Option<&str>) -> Option<u64> {
    v?.rsplit('/').next()?.parse().ok()
}

fn is_sse_c(sse: &Sse) -> bool {
    matches!(sse, Sse::Customer(_))
}

impl S3Store {
    pub async fn connect(location: S3Location, opts: &S3Options) -> StoreResult<S3Store> {
        let counts = Arc::new(RequestCounts::default());
        let client = opts.client().await?;
        let conf = client
            .config()
            .to_builder()
            .interceptor(AttemptCounter(counts.clone()))
            .build();
        Ok(S3Store {
            client: Client::from_conf(conf),
            location,
            checksum: opts.checksum,
            sign_payloads: opts.is_plain_http_to_remote(),
            parts_in_flight: opts.parts_in_flight.max(1),
            counts,
        })
    }

    pub fn location(&self) -> &S3Location {
        &self.location
    }

    pub fn counts(&self) -> &Arc<RequestCounts> {
        &self.counts
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.location.prefix)
    }

    fn relative<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(&self.location.prefix).unwrap_or(full)
    }

    fn note(&self, op: Op) {
        self.counts.bump(op);
    }

    fn fail(&self, e: StoreError) -> StoreError {
        self.counts.failed.fetch_add(1, Ordering::Relaxed);
        warn!("{}: {e}", self.location);
        e
    }

    /// Whether the bucket answers (and the credentials work).
    pub async fn check_bucket(&self) -> StoreResult<()> {
        self.note(Op::Bucket);
        self.client
            .head_bucket()
            .bucket(&self.location.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(
                |e| match map_err(&self.location.bucket, Op::Bucket, e, false) {
                    StoreError::NotFound { key } => StoreError::Invalid {
                        key,
                        detail: "the bucket does not exist".into(),
                    },
                    e => e,
                },
            )
    }

    /// Aborts the multipart uploads under this store's prefix that were started more than
    /// `older_than` ago (left by crashed writers); returns how many.
    pub async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> StoreResult<usize> {
        let cutoff = SystemTime::now() - older_than;
        let mut aborted = 0;
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            self.note(Op::Multipart);
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.location.bucket)
                .prefix(&self.location.prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| map_err(&self.location.prefix, Op::Multipart, e, false))?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                if to_system_time(u.initiated()) > cutoff {
                    continue;
                }
                self.note(Op::Multipart);
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.location.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(|e| map_err(key, Op::Multipart, e, false))?;
                aborted += 1;
            }
            if page.is_truncated() == Some(true) {
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(aborted)
    }

    async fn get_once(
        &self,
        key: &str,
        range: Option<&Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        match self.get_checked(key, range, opts, true).await {
            // S3 gives multipart objects a composite checksum that the SDK cannot check and
            // skips; a service that presents a part's checksum as the whole object's (moto)
            // would fail every read. A multipart object is read without it then.
            Err(StoreError::Corrupt { detail, .. }) if detail.starts_with(MULTIPART_MISMATCH) => {
                debug!("{key}: {detail}; reading without the checksum");
                self.get_checked(key, range, opts, false).await
            }
            r => r,
        }
    }

    async fn get_checked(
        &self,
        key: &str,
        range: Option<&Range<u64>>,
        opts: &GetOptions,
        verify: bool,
    ) -> StoreResult<GetResult> {
        self.note(Op::Get);
        let mut req = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .set_version_id(opts.version_id.clone())
            .set_if_match(quoted(&opts.if_match));
        if verify {
            req = req.checksum_mode(ChecksumMode::Enabled);
        }
        if let Some(r) = range {
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let resp = sse_c!(req, &opts.sse).send().await.map_err(|e| {
            match map_err(key, Op::Get, e, is_sse_c(&opts.sse)) {
                StoreError::PreconditionFailed { key, .. } if opts.if_match.is_some() => {
                    StoreError::Changed { key }
                }
                e => e,
            }
        })?;
        let info = ObjectInfo {
            key: key.to_string(),
            size: total_from_content_range(resp.content_range())
                .or(resp.content_length().map(|l| l.max(0) as u64))
                .unwrap_or(0),
            mtime: to_system_time(resp.last_modified()),
            etag: etag_of(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
            metadata: Some(metadata_of(resp.metadata())),
        };
        let start = range.map_or(0, |r| r.start);
        let length = resp.content_length().unwrap_or(0).max(0) as usize;
        let body = collect_body(resp.body, length).await.map_err(|e| {
            let text = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e));
            if text.to_ascii_lowercase().contains("checksum") {
                let multipart = if info.etag.contains('-') {
                    MULTIPART_MISMATCH
                } else {
                    ""
                };
                StoreError::corrupt(key, format!("{multipart}GetObject: {text}"))
            } else {
                StoreError::Unavailable {
                    key: key.to_string(),
                    detail: format!("GetObject body: {text}"),
                }
            }
        })?;
        Ok(GetResult {
            range: start..start + body.len() as u64,
            info,
            body,
        })
    }

    async fn put_once(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.note(Op::Put);
        let req = self
            .client
            .put_object()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .set_metadata(Some(opts.metadata.clone().into_iter().collect()))
            .content_length(body.len() as i64);
        // The caller's checksum is checked here too: not every service verifies it.
        if let Some(c) = &opts.checksum
            && !c.verify(&body)
        {
            return Err(StoreError::corrupt(
                key,
                "the body does not match its checksum",
            ));
        }
        let req = match self.checksum {
            WireChecksum::Crc32c => {
                let crc = match opts.checksum {
                    Some(super::Checksum::Crc32c(c)) => c,
                    None => crc32c::crc32c(&body),
                };
                req.checksum_crc32_c(B64.encode(crc.to_be_bytes()))
            }
            WireChecksum::Sha256 => {
                use sha2::Digest;
                req.checksum_sha256(B64.encode(sha2::Sha256::digest(&body)))
            }
        };
        let req = sse_all!(req, &opts.sse).body(ByteStream::from(body.clone()));
        let resp = send_put!(req, self.sign_payloads)
            .map_err(|e| map_err(key, Op::Put, e, is_sse_c(&opts.sse)))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: body.len() as u64,
            mtime: SystemTime::now(),
            etag: etag_of(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
            metadata: Some(opts.metadata.clone()),
        })
    }

    fn check_metadata(&self, key: &str, m: &Metadata) -> StoreResult<()> {
        if metadata_size(m) > StoreLimits::S3.max_metadata_bytes {
            return Err(StoreError::invalid(
                key,
                format!(
                    "{} bytes of user metadata (S3 allows {})",
                    metadata_size(m),
                    StoreLimits::S3.max_metadata_bytes
                ),
            ));
        }
        if let Some((k, _)) = m.iter().find(|(k, v)| {
            !k.bytes().all(|b| b.is_ascii_graphic()) || !v.bytes().all(|b| (32..127).contains(&b))
        }) {
            return Err(StoreError::invalid(
                key,
                format!("metadata {k:?} is not printable ASCII"),
            ));
        }
        Ok(())
    }

    fn check_key(&self, key: &str) -> StoreResult<()> {
        let full = self.location.prefix.len() + key.len();
        if key.is_empty() || full > StoreLimits::S3.max_key_bytes {
            return Err(StoreError::invalid(
                key,
                format!("a key of {full} bytes (S3 allows 1 to 1024)"),
            ));
        }
        Ok(())
    }

    async fn copy_multipart(
        &self,
        src: &str,
        dst: &str,
        size: u64,
        source: &str,
        metadata: Metadata,
        opts: &CopyOptions,
    ) -> StoreResult<ObjectInfo> {
        self.note(Op::Multipart);
        let created = sse_all!(
            self.client
                .create_multipart_upload()
                .bucket(&self.location.bucket)
                .key(self.full(dst))
                .set_metadata(Some(metadata.clone().into_iter().collect())),
            &opts.sse
        )
        .send()
        .await
        .map_err(|e| map_err(dst, Op::Multipart, e, is_sse_c(&opts.sse)))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let mut parts = Vec::new();
        let result: StoreResult<()> = async {
            let mut off = 0;
            let mut n = 1;
            while off < size {
                let end = (off + COPY_PART).min(size);
                self.note(Op::Multipart);
                let mut req = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.location.bucket)
                    .key(self.full(dst))
                    .upload_id(&upload_id)
                    .part_number(n)
                    .copy_source(source)
                    .set_copy_source_if_match(quoted(&opts.source_if_match))
                    .copy_source_range(format!("bytes={off}-{}", end - 1));
                if let Some((alg, key, md5)) = sse_c_headers(&opts.source_sse) {
                    req = req
                        .copy_source_sse_customer_algorithm(alg)
                        .copy_source_sse_customer_key(key)
                        .copy_source_sse_customer_key_md5(md5);
                }
                let resp = sse_c!(req, &opts.sse)
                    .send()
                    .await
                    .map_err(|e| map_err(src, Op::Copy, e, true))?;
                let etag = resp
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .unwrap_or_default();
                parts.push(CompletedPart::builder().part_number(n).e_tag(etag).build());
                off = end;
                n += 1;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.abort(dst, &upload_id).await;
            return Err(e);
        }
        self.note(Op::Multipart);
        let done = sse_c!(
            self.client
                .complete_multipart_upload()
                .bucket(&self.location.bucket)
                .key(self.full(dst))
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build()
                ),
            &opts.sse
        )
        .send()
        .await
        .map_err(|e| map_err(dst, Op::Multipart, e, false))?;
        Ok(ObjectInfo {
            key: dst.to_string(),
            size,
            mtime: SystemTime::now(),
            etag: etag_of(done.e_tag()),
            version_id: done.version_id().map(str::to_string),
            metadata: Some(metadata),
        })
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        self.note(Op::Multipart);
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .upload_id(upload_id)
            .send()
            .await
        {
            warn!(
                "{key}: aborting multipart upload {upload_id}: {} (`coffer gc` removes it later)",
                map_err(key, Op::Multipart, e, false)
            );
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("S3 store {}", self.location)
    }

    fn limits(&self) -> StoreLimits {
        StoreLimits {
            max_key_bytes: StoreLimits::S3.max_key_bytes - self.location.prefix.len(),
            ..StoreLimits::S3
        }
    }

    fn request_stats(&self) -> Vec<(&'static str, u64)> {
        self.counts.summary()
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.check_key(key)?;
        self.check_metadata(key, &opts.metadata)?;
        // A checksum the server rejected may be a body damaged on the way: send it once more.
        match self.put_once(key, body.clone(), opts).await {
            Err(StoreError::Corrupt { detail, .. }) => {
                warn!(
                    "{key}: the server rejected the body's checksum ({detail}); sending it again"
                );
                self.put_once(key, body, opts).await
            }
            r => r,
        }
        .map_err(|e| self.fail(e))
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        self.check_key(key)?;
        self.check_metadata(key, &opts.metadata)?;
        self.note(Op::Multipart);
        let algorithm = match self.checksum {
            WireChecksum::Crc32c => ChecksumAlgorithm::Crc32C,
            WireChecksum::Sha256 => ChecksumAlgorithm::Sha256,
        };
        let created = sse_all!(
            self.client
                .create_multipart_upload()
                .bucket(&self.location.bucket)
                .key(self.full(key))
                .checksum_algorithm(algorithm)
                .set_metadata(Some(opts.metadata.clone().into_iter().collect())),
            &opts.sse
        )
        .send()
        .await
        .map_err(|e| self.fail(map_err(key, Op::Multipart, e, is_sse_c(&opts.sse))))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::invalid(key, "CreateMultipartUpload: no upload id"))?
            .to_string();
        debug!("{key}: multipart upload {upload_id} started");
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: key.to_string(),
            upload_id,
            sse: opts.sse.clone(),
            metadata: opts.metadata.clone(),
            next_part: 1,
            size: 0,
            in_flight: JoinSet::new(),
            parts: Vec::new(),
            finished: false,
        }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        if let Some(r) = &range
            && r.start >= r.end
        {
            // An empty range: S3 has no way to ask for one. Answer from a HEAD.
            let info = self.head(key, opts).await?;
            let at = r.start.min(info.size);
            return Ok(GetResult {
                info,
                range: at..at,
                body: Bytes::new(),
            });
        }
        let attempt = |range: Option<Range<u64>>| async move {
            match self.get_once(key, range.as_ref(), opts).await {
                // 416: the range starts at or past the end; S3 does not cut it for us.
                Err(StoreError::Invalid { detail, .. }) if detail.contains("HTTP 416") => {
                    let info = self.head(key, opts).await?;
                    let at = range.map_or(0, |r| r.start).min(info.size);
                    Ok(GetResult {
                        info,
                        range: at..at,
                        body: Bytes::new(),
                    })
                }
                r => r,
            }
        };
        match attempt(range.clone()).await {
            Err(StoreError::Corrupt { detail, .. }) => {
                warn!("{key}: {detail}; reading it once more");
                attempt(range).await
            }
            r => r,
        }
        .map_err(|e| self.fail(e))
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        self.note(Op::Head);
        let resp = sse_c!(
            self.client
                .head_object()
                .bucket(&self.location.bucket)
                .key(self.full(key))
                .set_version_id(opts.version_id.clone()),
            &opts.sse
        )
        .send()
        .await
        .map_err(|e| match map_err(key, Op::Head, e, is_sse_c(&opts.sse)) {
            e @ StoreError::NotFound { .. } => e,
            e => self.fail(e),
        })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: resp.content_length().unwrap_or(0).max(0) as u64,
            mtime: to_system_time(resp.last_modified()),
            etag: etag_of(resp.e_tag()),
            version_id: resp.version_id().map(str::to_string),
            metadata: Some(metadata_of(resp.metadata())),
        })
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        self.note(Op::List);
        let resp = self
            .client
            .list_objects_v2()
            .bucket(&self.location.bucket)
            .prefix(self.full(&req.prefix))
            .set_delimiter(req.delimiter.map(|d| d.to_string()))
            .set_continuation_token(req.continuation.clone())
            .set_start_after(req.start_after.as_deref().map(|k| self.full(k)))
            .set_max_keys((req.max_keys > 0).then(|| req.max_keys.min(1000) as i32))
            .send()
            .await
            .map_err(|e| self.fail(map_err(&req.prefix, Op::List, e, false)))?;
        let objects = resp
            .contents()
            .iter()
            .filter_map(|o| {
                let full = o.key()?;
                Some(ObjectInfo {
                    key: self.relative(full).to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    mtime: to_system_time(o.last_modified()),
                    etag: etag_of(o.e_tag()),
                    version_id: None,
                    metadata: None,
                })
            })
            .collect();
        let common_prefixes = resp
            .common_prefixes()
            .iter()
            .filter_map(|p| Some(self.relative(p.prefix()?).to_string()))
            .collect();
        Ok(ListPage {
            objects,
            common_prefixes,
            next: if resp.is_truncated() == Some(true) {
                resp.next_continuation_token().map(str::to_string)
            } else {
                None
            },
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.note(Op::Delete);
        self.client
            .delete_object()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .send()
            .await
            .map(|_| ())
            .or_else(|e| match map_err(key, Op::Delete, e, false) {
                StoreError::NotFound { .. } => Ok(()),
                e => Err(self.fail(e)),
            })
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.check_key(dst)?;
        if let Some(m) = &opts.metadata {
            self.check_metadata(dst, m)?;
        }
        let head_opts = GetOptions {
            sse: opts.source_sse.clone(),
            version_id: opts.source_version_id.clone(),
            if_match: None,
        };
        // The size decides between CopyObject and UploadPartCopy; the metadata is what a
        // part-by-part copy must carry over itself.
        let source_info = self.head(src, &head_opts).await?;
        // Checked here too: a part-by-part copy's first part would otherwise be the first
        // to find out, after the upload was started.
        super::check_source_etag(src, &source_info.etag, opts.source_if_match.as_deref())?;
        let mut source = format!(
            "{}/{}",
            self.location.bucket,
            urlencode_key(&self.full(src))
        );
        if let Some(v) = &opts.source_version_id {
            source.push_str(&format!("?versionId={}", urlencode_key(v)));
        }
        let metadata = opts
            .metadata
            .clone()
            .unwrap_or_else(|| source_info.metadata.clone().unwrap_or_default());
        if source_info.size > MAX_SINGLE_COPY {
            return self
                .copy_multipart(src, dst, source_info.size, &source, metadata, opts)
                .await
                .map_err(|e| self.fail(e));
        }
        self.note(Op::Copy);
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.location.bucket)
            .key(self.full(dst))
            .copy_source(&source)
            .set_copy_source_if_match(quoted(&opts.source_if_match))
            // Always replace: the same call then also serves src == dst (S3 refuses a copy
            // onto itself that changes nothing), and the metadata is the one chosen above.
            .metadata_directive(MetadataDirective::Replace)
            .set_metadata(Some(metadata.clone().into_iter().collect()));
        if let Some((alg, key, md5)) = sse_c_headers(&opts.source_sse) {
            req = req
                .copy_source_sse_customer_algorithm(alg)
                .copy_source_sse_customer_key(key)
                .copy_source_sse_customer_key_md5(md5);
        }
        let resp = sse_all!(req, &opts.sse).send().await.map_err(|e| {
            self.fail(map_err(
                src,
                Op::Copy,
                e,
                is_sse_c(&opts.source_sse) || is_sse_c(&opts.sse),
            ))
        })?;
        Ok(ObjectInfo {
            key: dst.to_string(),
            size: source_info.size,
            mtime: resp
                .copy_object_result()
                .map(|r| to_system_time(r.last_modified()))
                .unwrap_or_else(SystemTime::now),
            etag: etag_of(resp.copy_object_result().and_then(|r| r.e_tag())),
            version_id: resp.version_id().map(str::to_string),
            metadata: Some(metadata),
        })
    }

    async fn versioning_enabled(&self) -> StoreResult<bool> {
        self.note(Op::Bucket);
        match self
            .client
            .get_bucket_versioning()
            .bucket(&self.location.bucket)
            .send()
            .await
        {
            Ok(r) => Ok(r.status() == Some(&BucketVersioningStatus::Enabled)),
            // Some services (moto) answer 200 under another XML root than S3's; the status
            // element is the same.
            Err(aws_sdk_s3::error::SdkError::ServiceError(se))
                if se.raw().status().as_u16() == 200 =>
            {
                let body = se.raw().body().bytes().unwrap_or_default();
                Ok(body.windows(24).any(|w| w == b"<Status>Enabled</Status>"))
            }
            Err(e) => match map_err(&self.location.bucket, Op::Bucket, e, false) {
                // Services without versioning (Garage) may not know the call at all.
                StoreError::Invalid { detail, .. } if detail.contains("NotImplemented") => {
                    Ok(false)
                }
                StoreError::Unavailable { detail, .. } if detail.contains("HTTP 501") => Ok(false),
                e => Err(e),
            },
        }
    }

    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            self.note(Op::List);
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.location.bucket)
                .prefix(self.full(prefix))
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.fail(map_err(prefix, Op::List, e, false)))?;
            for v in page.versions() {
                out.push(VersionInfo {
                    key: self.relative(v.key().unwrap_or_default()).to_string(),
                    version_id: v.version_id().unwrap_or("null").to_string(),
                    is_latest: v.is_latest() == Some(true),
                    is_delete_marker: false,
                    size: v.size().unwrap_or(0).max(0) as u64,
                    mtime: to_system_time(v.last_modified()),
                    etag: etag_of(v.e_tag()),
                });
            }
            for m in page.delete_markers() {
                out.push(VersionInfo {
                    key: self.relative(m.key().unwrap_or_default()).to_string(),
                    version_id: m.version_id().unwrap_or("null").to_string(),
                    is_latest: m.is_latest() == Some(true),
                    is_delete_marker: true,
                    size: 0,
                    mtime: to_system_time(m.last_modified()),
                    etag: String::new(),
                });
            }
            if page.is_truncated() == Some(true) && page.next_key_marker().is_some() {
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_version_id_marker().map(str::to_string);
            } else {
                break;
            }
        }
        // Newest first per key (versions and markers come in two lists).
        out.sort_by(|a, b| {
            a.key
                .cmp(&b.key)
                .then(b.is_latest.cmp(&a.is_latest))
                .then(b.mtime.cmp(&a.mtime))
        });
        Ok(out)
    }
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/` (S3 expects the key's slashes
/// as they are).
fn urlencode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The ETag S3 gives a completed multipart object: the MD5 of the parts' MD5s, then `-N`.
/// `None` when a part's ETag is not an MD5 (some services use other ETags).
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for p in parts {
        let raw = hex::decode(p.e_tag()?.trim_matches('"')).ok()?;
        if raw.len() != 16 {
            return None;
        }
        all.update(&raw);
    }
    Some(format!("{}-{}", hex::encode(all.finalize()), parts.len()))
}

/// A multipart upload with up to `parts_in_flight` parts uploading at once.
struct S3Upload {
    store: S3Store,
    key: String,
    upload_id: String,
    sse: Sse,
    metadata: Metadata,
    next_part: i32,
    size: u64,
    in_flight: JoinSet<StoreResult<CompletedPart>>,
    parts: Vec<CompletedPart>,
    finished: bool,
}

impl S3Upload {
    async fn send_part(
        store: S3Store,
        key: String,
        upload_id: String,
        sse: Sse,
        n: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        let mut tries = 0;
        loop {
            tries += 1;
            store.note(Op::Multipart);
            let req = store
                .client
                .upload_part()
                .bucket(&store.location.bucket)
                .key(store.full(&key))
                .upload_id(&upload_id)
                .part_number(n)
                .content_length(body.len() as i64);
            let (req, crc, sha) = match store.checksum {
                WireChecksum::Crc32c => {
                    let c = B64.encode(crc32c::crc32c(&body).to_be_bytes());
                    (req.checksum_crc32_c(c.clone()), Some(c), None)
                }
                WireChecksum::Sha256 => {
                    use sha2::Digest;
                    let c = B64.encode(sha2::Sha256::digest(&body));
                    (req.checksum_sha256(c.clone()), None, Some(c))
                }
            };
            let req = sse_c!(req, &sse).body(ByteStream::from(body.clone()));
            match send_put!(req, store.sign_payloads)
                .map_err(|e| map_err(&key, Op::Multipart, e, is_sse_c(&sse)))
            {
                Ok(resp) => {
                    return Ok(CompletedPart::builder()
                        .part_number(n)
                        .e_tag(resp.e_tag().unwrap_or_default())
                        .set_checksum_crc32_c(crc)
                        .set_checksum_sha256(sha)
                        .build());
                }
                Err(StoreError::Corrupt { detail, .. }) if tries == 1 => {
                    warn!("{key}: part {n}: checksum rejected ({detail}); sending it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn reap_one(&mut self) -> StoreResult<()> {
        if let Some(done) = self.in_flight.join_next().await {
            let part = done.map_err(|e| StoreError::Unavailable {
                key: self.key.clone(),
                detail: format!("part upload task: {e}"),
            })??;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn fail(&mut self, e: StoreError) -> StoreError {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        self.finished = true;
        self.store.abort(&self.key, &self.upload_id).await;
        self.store.fail(e)
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn ready(&mut self) -> StoreResult<()> {
        while self.in_flight.len() >= self.store.parts_in_flight {
            if let Err(e) = self.reap_one().await {
                return Err(self.fail(e).await);
            }
        }
        Ok(())
    }

    async fn put_part(&mut self, part: Bytes) -> StoreResult<()> {
        self.ready().await?;
        let n = self.next_part;
        self.next_part += 1;
        self.size += part.len() as u64;
        self.in_flight.spawn(Self::send_part(
            self.store.clone(),
            self.key.clone(),
            self.upload_id.clone(),
            self.sse.clone(),
            n,
            part,
        ));
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> StoreResult<ObjectInfo> {
        while !self.in_flight.is_empty() {
            if let Err(e) = self.reap_one().await {
                return Err(self.fail(e).await);
            }
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let expected_etag = multipart_etag(&parts);
        self.store.note(Op::Multipart);
        let result = sse_c!(
            self.store
                .client
                .complete_multipart_upload()
                .bucket(&self.store.location.bucket)
                .key(self.store.full(&self.key))
                .upload_id(&self.upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build()
                ),
            &self.sse
        )
        .send()
        .await;
        match result {
            Ok(done) => {
                self.finished = true;
                Ok(ObjectInfo {
                    key: self.key.clone(),
                    size: self.size,
                    mtime: SystemTime::now(),
                    etag: etag_of(done.e_tag()),
                    version_id: done.version_id().map(str::to_string),
                    metadata: Some(self.metadata.clone()),
                })
            }
            Err(e) => {
                let e = map_err(&self.key, Op::Multipart, e, false);
                // A completion that succeeded but whose answer was lost is retried by the
                // SDK and then finds no upload: the object itself tells whether it is ours.
                if matches!(e, StoreError::NotFound { .. })
                    && let Some(expected) = &expected_etag
                {
                    let head = GetOptions {
                        sse: self.sse.clone(),
                        version_id: None,
                        if_match: None,
                    };
                    if let Ok(info) = self.store.head(&self.key, &head).await
                        && &info.etag == expected
                    {
                        self.finished = true;
                        return Ok(ObjectInfo {
                            size: self.size,
                            metadata: Some(self.metadata.clone()),
                            ..info
                        });
                    }
                }
                Err(self.fail(e).await)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> StoreResult<()> {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        self.finished = true;
        self.store.abort(&self.key, &self.upload_id).await;
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped without complete or abort (a writer that failed or was cancelled): abort
        // in the background so the parts do not linger in the bucket.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key, id) = (self.store.clone(), self.key.clone(), self.upload_id.clone());
            rt.spawn(async move { store.abort(&key, &id).await });
        }
    }
}
