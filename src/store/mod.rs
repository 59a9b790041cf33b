//! The object store layer: the [`ObjectStore`] trait every backend implements, its request
//! and response types, and the backends themselves.
//!
//! The trait is shaped after S3 (the most constrained backend) so that every layer above can
//! be tested against the in-memory store, the fault-injecting wrapper, the local replica store
//! and S3 alike: whole and multipart puts, ranged gets, listings with a delimiter and
//! pagination, server-side copy with metadata replace, and object versions.

pub mod error;
pub mod faulty;
pub mod local;
pub mod memory;
pub mod names;
pub mod policy;
pub mod s3;
pub mod sse_history;
pub mod throughput;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use zeroize::Zeroizing;

pub use error::{StoreError, StoreResult};

/// User metadata of an object: lower-case names (without S3's `x-amz-meta-` prefix) to ASCII
/// values. Backends keep the whole map under [`StoreLimits::max_metadata_bytes`].
pub type Metadata = BTreeMap<String, String>;

/// A customer-provided SSE-C key. Zeroized on drop and never printed.
#[derive(Clone)]
pub struct SseCustomerKey(Zeroizing<[u8; 32]>);

impl SseCustomerKey {
    pub fn new(key: [u8; 32]) -> Self {
        SseCustomerKey(Zeroizing::new(key))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SseCustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SseCustomerKey(<redacted>)")
    }
}

/// Server-side encryption parameters of one request.
#[derive(Clone, Debug, Default)]
pub enum Sse {
    #[default]
    None,
    /// SSE-S3: the server encrypts with a key it holds (`x-amz-server-side-encryption: AES256`).
    S3,
    /// SSE-KMS with an optional key id (`aws:kms`).
    Kms { key_id: Option<String> },
    /// SSE-C: the customer key travels with every request that touches the object body.
    Customer(SseCustomerKey),
}

impl Sse {
    pub fn is_none(&self) -> bool {
        matches!(self, Sse::None)
    }
}

/// A checksum of a request body that the backend verifies before accepting the write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    Crc32c(u32),
}

impl Checksum {
    pub fn crc32c_of(data: &[u8]) -> Self {
        Checksum::Crc32c(crc32c::crc32c(data))
    }

    pub fn verify(&self, data: &[u8]) -> bool {
        match self {
            Checksum::Crc32c(expected) => crc32c::crc32c(data) == *expected,
        }
    }
}

/// Options of a put (whole or multipart).
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    pub metadata: Metadata,
    pub sse: Sse,
    /// Checksum of the whole body (single put) that the backend must verify.
    pub checksum: Option<Checksum>,
    /// The put need not be durable before it returns, as [`CopyOptions::defer_durability`]
    /// (a new directory's marker or a symlink: ext4 makes those durable at its next
    /// commit, or at an fsync of the directory).
    pub defer_durability: bool,
}

/// Options of a get or head.
#[derive(Clone, Debug, Default)]
pub struct GetOptions {
    pub sse: Sse,
    /// Read this version instead of the latest one.
    pub version_id: Option<String>,
    /// Read only if the object still has this ETag (S3's `If-Match`), so that reads of an
    /// object opened earlier never mix in a newer version. Backends that pin versions by
    /// other means may ignore it.
    pub if_match: Option<String>,
}

/// Options of a server-side copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Replace the metadata of the copy (S3's `x-amz-metadata-directive: REPLACE`); `None`
    /// keeps the source's.
    pub metadata: Option<Metadata>,
    /// SSE parameters of the source (for SSE-C, the copy-source key headers).
    pub source_sse: Sse,
    /// SSE parameters of the destination.
    pub sse: Sse,
    /// Copy this version of the source instead of the latest.
    pub source_version_id: Option<String>,
    /// Copy only if the source's ETag is this one (S3's `x-amz-copy-source-if-match`), else
    /// [`StoreError::PreconditionFailed`]: a copy that replaces the metadata with what the
    /// caller read (an envelope) must not land on content the caller did not read.
    pub source_if_match: Option<String>,
    /// The copy must be atomic but need not be durable before it returns: a backend with
    /// group commit (the local store) may acknowledge it first and make it durable with its
    /// next commit, within about a second, or at [`ObjectStore::sync`]. POSIX asks no more
    /// of a rename until the directory is fsync'd; S3's copies are durable either way.
    pub defer_durability: bool,
}

/// What a backend knows about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    /// Size of the stored body in bytes.
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: String,
    pub version_id: Option<String>,
    /// User metadata, where the backend returned it (always from head and get; from list only
    /// where it is cheap).
    pub metadata: Option<Metadata>,
}

/// A ranged or whole get.
#[derive(Debug)]
pub struct GetResult {
    pub info: ObjectInfo,
    /// The byte range of the object that `body` holds.
    pub range: Range<u64>,
    pub body: Bytes,
}

/// One listing request.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub prefix: String,
    /// Group keys by this delimiter after the prefix (S3's `delimiter`, normally `/`).
    pub delimiter: Option<char>,
    /// Continue after this token (from [`ListPage::next`]).
    pub continuation: Option<String>,
    /// Start after this key (S3's `start-after`); only where [`StoreLimits::lists_after_a_key`].
    pub start_after: Option<String>,
    /// At most this many entries (objects plus prefixes); 0 means the backend's default.
    pub max_keys: usize,
}

/// One page of a listing, in key order.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub common_prefixes: Vec<String>,
    /// Token for the next page, if the listing was cut.
    pub next: Option<String>,
}

impl ListPage {
    /// Adds the entries of `later`, a page that follows this one in key order.
    pub fn append(&mut self, later: ListPage) {
        self.objects.extend(later.objects);
        self.common_prefixes.extend(later.common_prefixes);
    }
}

/// One version of an object, or a delete marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub key: String,
    pub version_id: String,
    pub is_latest: bool,
    pub is_delete_marker: bool,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: String,
}

/// Limits of a backend that shape requests above it.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    /// Smallest part of a multipart upload, except the last.
    pub min_part_size: u64,
    /// Largest part of a multipart upload.
    pub max_part_size: u64,
    /// Plaintext of a streamed upload's first parts (later ones grow): what each part
    /// being filled, queued or in flight holds in memory.
    pub part_size: u64,
    /// Most parts in one multipart upload.
    pub max_parts: u64,
    /// Largest total size of user metadata (names and values).
    pub max_metadata_bytes: usize,
    /// Longest object key in bytes.
    pub max_key_bytes: usize,
    /// Whether a change of an object's metadata copies its data (S3's CopyObject: the
    /// service reads the whole object again) rather than only its record.
    pub metadata_change_copies_data: bool,
    /// Whether a listing gives each object's user metadata (S3's does not: a HEAD per
    /// object does, which the vfs spares with its per-directory attribute index).
    pub listing_has_metadata: bool,
    /// Whether a listing can start after a given key ([`ListRequest::start_after`]), in the
    /// order of the keys the caller sees. Not through name encryption: the backend's order of
    /// encrypted keys is not the order of the names.
    pub lists_after_a_key: bool,
}

impl StoreLimits {
    /// S3's limits: parts of 5 MiB to 5 GiB, 10,000 parts, 2 KB of metadata, 1,024-byte keys.
    /// Streamed parts start at the 5 MiB minimum: with [`crate::store::s3::S3Options`]'s
    /// parts in flight, that bounds a large write's memory (rclone's parts are 5 MiB too),
    /// and on a single Garage node 8 MiB parts wrote no faster.
    pub const S3: StoreLimits = StoreLimits {
        min_part_size: 5 << 20,
        max_part_size: 5 << 30,
        part_size: 5 << 20,
        max_parts: 10_000,
        max_metadata_bytes: 2048,
        max_key_bytes: 1024,
        metadata_change_copies_data: true,
        listing_has_metadata: false,
        lists_after_a_key: true,
    };
}

/// Size of a user metadata map as S3 counts it (names and values).
pub fn metadata_size(metadata: &Metadata) -> usize {
    metadata.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A multipart (streaming) upload. Parts are written in order; memory stays bounded by the
/// parts the caller holds. Nothing is visible under the key until [`Upload::complete`]
/// returns, and a dropped or aborted upload leaves the previous object untouched.
#[async_trait]
pub trait Upload: Send {
    /// Appends the next part. Every part but the last must be at least
    /// [`StoreLimits::min_part_size`] bytes.
    async fn put_part(&mut self, part: Bytes) -> StoreResult<()>;
    /// Waits until [`Self::put_part`] would take a part without waiting (an upload that
    /// sends parts concurrently has a free slot): a caller with a queue of parts takes the
    /// next one off it only then, so that no part waits outside the queue.
    async fn ready(&mut self) -> StoreResult<()> {
        Ok(())
    }
    /// Makes the object visible, durably, and returns what was stored.
    async fn complete(self: Box<Self>) -> StoreResult<ObjectInfo>;
    /// Drops everything uploaded so far.
    async fn abort(self: Box<Self>) -> StoreResult<()>;
}

/// The backend interface. Implementations are cheap to share (`Arc<dyn ObjectStore>`).
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A short description for logs ("local store /srv/coffer (3 replicas)").
    fn describe(&self) -> String;

    fn limits(&self) -> StoreLimits;

    /// Requests sent so far, by kind, for statistics (empty where not counted).
    fn request_stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Stores a whole object, durably, replacing any previous one.
    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo>;

    /// Starts a multipart upload; metadata and SSE parameters are fixed here, as S3's
    /// CreateMultipartUpload fixes them.
    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>>;

    /// Reads `range` of an object (the whole object if `None`). A range past the end is cut
    /// at the end of the object.
    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult>;

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo>;

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage>;

    /// Deletes an object. Deleting a missing key succeeds, as on S3. On a versioned store
    /// this adds a delete marker and keeps the previous versions.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Server-side copy, optionally replacing the metadata. `src == dst` with new metadata
    /// is how metadata-only updates are made.
    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo>;

    /// Moves an object: [`Self::copy`] to `dst`, then [`Self::delete`] of `src`. A crash
    /// part-way may leave both keys, never neither. A backend that can make both durable in
    /// one step overrides it (the local store: one journal fdatasync instead of two).
    async fn rename(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        let info = self.copy(src, dst, opts).await?;
        if src != dst {
            self.delete(src).await?;
        }
        Ok(info)
    }

    /// Whether the backend keeps versions of overwritten and deleted objects.
    async fn versioning_enabled(&self) -> StoreResult<bool>;

    /// Versions and delete markers of every key under `prefix`, newest first per key.
    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>>;

    /// Total and free bytes where the backend knows them (for statfs).
    async fn space(&self) -> Option<(u64, u64)> {
        None
    }

    /// Makes every acknowledged change durable, those acknowledged with
    /// [`CopyOptions::defer_durability`] included (`fsync` of a file or directory).
    async fn sync(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Makes every acknowledged write durable in its final place and finishes deferred
    /// work (the local store checkpoints its journal); called at unmount. Acknowledged
    /// writes are durable without it: this only saves the next open a replay.
    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Makes `version_id` the latest version of `key` again (a copy of that version onto the
    /// key, as on S3), keeping every other version.
    async fn restore_version(
        &self,
        key: &str,
        version_id: &str,
        sse: &Sse,
    ) -> StoreResult<ObjectInfo> {
        let opts = CopyOptions {
            metadata: None,
            source_sse: sse.clone(),
            sse: sse.clone(),
            source_version_id: Some(version_id.to_string()),
            source_if_match: None,
            defer_durability: false,
        };
        self.copy(key, key, &opts).await
    }
}

/// Reads every page of a listing.
pub async fn list_all(store: &dyn ObjectStore, mut req: ListRequest) -> StoreResult<ListPage> {
    let mut all = ListPage::default();
    loop {
        let mut page = store.list(&req).await?;
        let next = page.next.take();
        all.append(page);
        match next {
            Some(token) => req.continuation = Some(token),
            None => return Ok(all),
        }
    }
}

/// Listings of one range at most in flight at once, in [`list_all_split`].
const RANGES_IN_FLIGHT: usize = 8;

/// Reads every entry of a listing after `req.start_after` as several listings at once, one
/// per range between the `splits` (keys in increasing order): the range after split `i`
/// ends at split `i + 1` included, the last one at the listing's end. S3 lists one page at a
/// time, each a round trip, so a directory of 10,000 files is 10 waits in a row; split, it
/// is one or two. A split where no key is any more only unbalances the ranges: each range
/// reads on, page by page, until it passes its end, so nothing is lost or listed twice.
pub async fn list_all_split(
    store: &dyn ObjectStore,
    req: &ListRequest,
    splits: &[String],
) -> StoreResult<ListPage> {
    let starts = std::iter::once(req.start_after.clone()).chain(splits.iter().cloned().map(Some));
    let ends = splits
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None));
    let ranges: Vec<_> = starts
        .zip(ends)
        .map(|(after, upto)| list_range(store, req, after, upto))
        .collect();
    let pages: Vec<ListPage> = futures::stream::iter(ranges)
        .buffered(RANGES_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut all = ListPage::default();
    for page in pages {
        all.append(page);
    }
    Ok(all)
}

/// The entries of a listing after `after` up to `upto` included (to the end without it).
async fn list_range(
    store: &dyn ObjectStore,
    req: &ListRequest,
    after: Option<String>,
    upto: Option<String>,
) -> StoreResult<ListPage> {
    let mut req = ListRequest {
        start_after: after.clone(),
        continuation: None,
        ..req.clone()
    };
    // Past the start too: a store may give a directory group again after a key inside it.
    let within = |marker: &str| {
        after.as_deref().is_none_or(|a| marker > a)
            && upto.as_deref().is_none_or(|end| marker <= end)
    };
    let mut all = ListPage::default();
    loop {
        let page = store.list(&req).await?;
        // Keys and prefixes each come in order, so once one is at the end or past it, the
        // rest of the listing is the next range's.
        let reached = |marker: &str| upto.as_deref().is_some_and(|end| marker >= end);
        let done = page.objects.iter().any(|o| reached(&o.key))
            || page.common_prefixes.iter().any(|p| reached(p));
        all.objects
            .extend(page.objects.into_iter().filter(|o| within(&o.key)));
        all.common_prefixes
            .extend(page.common_prefixes.into_iter().filter(|p| within(p)));
        match page.next {
            Some(token) if !done => req.continuation = Some(token),
            _ => return Ok(all),
        }
    }
}

/// [`CopyOptions::source_if_match`] (`want`) against the source's ETag `etag`.
pub fn check_source_etag(src: &str, etag: &str, want: Option<&str>) -> StoreResult<()> {
    match want {
        Some(want) if want != etag => Err(StoreError::PreconditionFailed {
            key: src.to_string(),
            detail: format!("the source's ETag is {etag:?}, not {want:?}: it changed"),
        }),
        _ => Ok(()),
    }
}

/// Splits an object range into the S3-style `start..end` it covers within `size`.
pub fn clamp_range(range: Option<Range<u64>>, size: u64) -> Range<u64> {
    match range {
        None => 0..size,
        Some(r) => r.start.min(size)..r.end.min(size).max(r.start.min(size)),
    }
}

/// A listing page of keys only, before the backend fills in what it knows of each object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyPage {
    pub objects: Vec<String>,
    pub common_prefixes: Vec<String>,
    pub next: Option<String>,
}

/// Groups sorted keys into a listing page the way S3 does: keys with the delimiter after the
/// prefix become common prefixes; `continuation` is the last key or prefix already returned.
/// Used by the backends that list by scanning (memory, local).
pub fn paginate_keys(
    prefix: &str,
    delimiter: Option<char>,
    continuation: Option<&str>,
    max_keys: usize,
    sorted: impl Iterator<Item = String>,
) -> KeyPage {
    let mut page = KeyPage::default();
    let mut count = 0usize;
    let mut last_returned: Option<String> = None;
    for key in sorted {
        if !key.starts_with(prefix) {
            continue;
        }
        let group = delimiter.and_then(|d| {
            key[prefix.len()..]
                .find(d)
                .map(|pos| key[..prefix.len() + pos + d.len_utf8()].to_string())
        });
        let marker = group.clone().unwrap_or_else(|| key.clone());
        if continuation.is_some_and(|after| marker.as_str() <= after)
            || last_returned.as_deref() == Some(marker.as_str())
        {
            continue;
        }
        if count == max_keys {
            page.next = last_returned;
            return page;
        }
        count += 1;
        match group {
            Some(p) => page.common_prefixes.push(p),
            None => page.objects.push(key),
        }
        last_returned = Some(marker);
    }
    page
}

/// The object keys of a listing page, in order.
pub fn keys_of(page: &ListPage) -> Vec<String> {
    page.objects.iter().map(|o| o.key.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn listing(page: &ListPage) -> (Vec<String>, Vec<String>) {
        (keys_of(page), page.common_prefixes.clone())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Listed in ranges, with splits where keys are, where they are not (an index older
        /// than the listing), and pages of a few entries (several pages per range), a
        /// directory lists as it does in one go: every entry once, in order.
        #[test]
        fn split_listings_equal_one_listing(
            names in proptest::collection::btree_set("[a-e]{1,3}(/[a-c])?", 0..40),
            splits in proptest::collection::btree_set("[a-e]{1,3}", 0..6),
            after in proptest::option::of("[a-e]{1,2}"),
            max_keys in 1usize..5,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let store = memory::MemoryStore::new(false);
                for n in &names {
                    store.put(&format!("d/{n}"), Bytes::from_static(b"x"), &PutOptions::default())
                        .await
                        .unwrap();
                }
                let req = ListRequest {
                    prefix: "d/".into(),
                    delimiter: Some('/'),
                    start_after: after.as_ref().map(|a| format!("d/{a}")),
                    max_keys,
                    ..Default::default()
                };
                let whole = list_all(&store, req.clone()).await.unwrap();
                let splits: Vec<String> = splits
                    .iter()
                    .map(|s| format!("d/{s}"))
                    .filter(|s| req.start_after.as_ref().is_none_or(|a| s > a))
                    .collect();
                let split = list_all_split(&store, &req, &splits).await.unwrap();
                prop_assert_eq!(listing(&split), listing(&whole));
                Ok(())
            })?;
        }
    }
}
