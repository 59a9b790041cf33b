//! An in-memory [`ObjectStore`] with S3's semantics (versions, delete markers, SSE-C key
//! checks, metadata limits), for the tests of every layer above the store.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, ObjectInfo, ObjectStore, PutOptions,
    Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo, check_source_etag, clamp_range,
    metadata_size, paginate_keys,
};

#[derive(Clone)]
struct Version {
    id: String,
    /// `None` for a delete marker.
    body: Option<Bytes>,
    metadata: super::Metadata,
    mtime: SystemTime,
    etag: String,
    /// SHA-256 of the SSE-C key the body was written with.
    sse_c_key_hash: Option<[u8; 32]>,
}

/// Cheap to clone: clones share the same objects.
#[derive(Clone)]
pub struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, Vec<Version>>>>,
    versioning: bool,
    next_version: Arc<AtomicU64>,
    limits: StoreLimits,
    /// The part sizes of each completed multipart upload, by key (tests check how callers
    /// cut their parts).
    parts: Arc<Mutex<BTreeMap<String, Vec<u64>>>>,
}

impl MemoryStore {
    pub fn new(versioning: bool) -> Self {
        MemoryStore {
            objects: Default::default(),
            versioning,
            next_version: Arc::new(AtomicU64::new(1)),
            parts: Default::default(),
            limits: StoreLimits {
                min_part_size: 1,
                listing_has_metadata: true,
                ..StoreLimits::S3
            },
        }
    }

    /// Same store, with S3's part-size limits enforced (to test callers' part sizing).
    pub fn with_limits(versioning: bool, limits: StoreLimits) -> Self {
        MemoryStore {
            limits,
            ..MemoryStore::new(versioning)
        }
    }

    /// The part sizes of the last multipart upload completed for `key`.
    pub fn upload_parts(&self, key: &str) -> Option<Vec<u64>> {
        self.parts.lock().get(key).cloned()
    }

    /// Overwrites the stored bytes of the latest version (tests plant corruption with it).
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut objects = self.objects.lock();
        let Some(v) = objects.get_mut(key).and_then(|v| v.last_mut()) else {
            return false;
        };
        let Some(body) = &v.body else { return false };
        let mut bytes = body.to_vec();
        f(&mut bytes);
        v.body = Some(Bytes::from(bytes));
        true
    }

    /// Replaces the metadata of the latest version without a new version (tests only).
    pub fn tamper_metadata(&self, key: &str, f: impl FnOnce(&mut super::Metadata)) -> bool {
        let mut objects = self.objects.lock();
        match objects.get_mut(key).and_then(|v| v.last_mut()) {
            Some(v) => {
                f(&mut v.metadata);
                true
            }
            None => false,
        }
    }

    fn version_id(&self) -> String {
        format!("{:016x}", self.next_version.fetch_add(1, Ordering::Relaxed))
    }

    fn key_hash(sse: &Sse) -> Option<[u8; 32]> {
        match sse {
            Sse::Customer(k) => Some(Sha256::digest(k.bytes()).into()),
            _ => None,
        }
    }

    fn check_sse(key: &str, v: &Version, sse: &Sse) -> StoreResult<()> {
        if v.sse_c_key_hash.is_some() && v.sse_c_key_hash != Self::key_hash(sse) {
            return Err(StoreError::WrongKey {
                key: key.to_string(),
            });
        }
        Ok(())
    }

    fn info(key: &str, v: &Version) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: v.body.as_ref().map_or(0, |b| b.len() as u64),
            mtime: v.mtime,
            etag: v.etag.clone(),
            version_id: Some(v.id.clone()),
            metadata: Some(v.metadata.clone()),
        }
    }

    fn insert(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        if metadata_size(&opts.metadata) > self.limits.max_metadata_bytes {
            return Err(StoreError::invalid(key, "metadata too large"));
        }
        if let Some(c) = &opts.checksum
            && !c.verify(&body)
        {
            return Err(StoreError::corrupt(
                key,
                "checksum of the request body mismatch",
            ));
        }
        let v = Version {
            id: self.version_id(),
            etag: hex::encode(&Sha256::digest(&body)[..16]),
            body: Some(body),
            metadata: opts.metadata.clone(),
            mtime: SystemTime::now(),
            sse_c_key_hash: Self::key_hash(&opts.sse),
        };
        let info = Self::info(key, &v);
        let mut objects = self.objects.lock();
        let versions = objects.entry(key.to_string()).or_default();
        if !self.versioning {
            versions.clear();
        }
        versions.push(v);
        Ok(info)
    }

    fn find(&self, key: &str, version_id: Option<&str>) -> StoreResult<Version> {
        let objects = self.objects.lock();
        let versions = objects.get(key).ok_or_else(|| StoreError::not_found(key))?;
        let v = match version_id {
            Some(id) => versions.iter().find(|v| v.id == id),
            None => versions.last(),
        };
        match v {
            Some(v) if v.body.is_some() => Ok(v.clone()),
            _ => Err(StoreError::not_found(key)),
        }
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory store".into()
    }

    fn limits(&self) -> StoreLimits {
        self.limits
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.insert(key, body, opts)
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        Ok(Box::new(MemoryUpload {
            store: self.clone(),
            key: key.to_string(),
            opts: opts.clone(),
            buf: BytesMut::new(),
            sizes: Vec::new(),
            last_part_small: false,
            min_part: self.limits.min_part_size,
        }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        let v = self.find(key, opts.version_id.as_deref())?;
        Self::check_sse(key, &v, &opts.sse)?;
        let body = v.body.clone().unwrap_or_default();
        let r = clamp_range(range, body.len() as u64);
        Ok(GetResult {
            info: Self::info(key, &v),
            body: body.slice(r.start as usize..r.end as usize),
            range: r,
        })
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        let v = self.find(key, opts.version_id.as_deref())?;
        Self::check_sse(key, &v, &opts.sse)?;
        Ok(Self::info(key, &v))
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        let objects = self.objects.lock();
        let live = objects
            .iter()
            .filter(|(_, versions)| versions.last().is_some_and(|v| v.body.is_some()))
            .map(|(k, _)| k.clone());
        let max_keys = if req.max_keys == 0 {
            1000
        } else {
            req.max_keys
        };
        let page = paginate_keys(
            &req.prefix,
            req.delimiter,
            req.continuation.as_deref().or(req.start_after.as_deref()),
            max_keys,
            live,
        );
        Ok(ListPage {
            objects: page
                .objects
                .iter()
                .map(|k| {
                    let mut info =
                        Self::info(k, objects[k].last().expect("listed keys have versions"));
                    if !self.limits.listing_has_metadata {
                        info.metadata = None;
                    }
                    info
                })
                .collect(),
            common_prefixes: page.common_prefixes,
            next: page.next,
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let mut objects = self.objects.lock();
        if !self.versioning {
            objects.remove(key);
            return Ok(());
        }
        if let Some(versions) = objects.get_mut(key)
            && versions.last().is_some_and(|v| v.body.is_some())
        {
            versions.push(Version {
                id: self.version_id(),
                body: None,
                metadata: Default::default(),
                mtime: SystemTime::now(),
                etag: String::new(),
                sse_c_key_hash: None,
            });
        }
        Ok(())
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        let v = self.find(src, opts.source_version_id.as_deref())?;
        Self::check_sse(src, &v, &opts.source_sse)?;
        check_source_etag(src, &v.etag, opts.source_if_match.as_deref())?;
        let put = PutOptions {
            metadata: opts.metadata.clone().unwrap_or(v.metadata.clone()),
            sse: opts.sse.clone(),
            checksum: None,
            defer_durability: false,
        };
        self.insert(dst, v.body.unwrap_or_default(), &put)
    }

    async fn versioning_enabled(&self) -> StoreResult<bool> {
        Ok(self.versioning)
    }

    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>> {
        let objects = self.objects.lock();
        let mut out = Vec::new();
        for (k, versions) in objects.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            for (i, v) in versions.iter().enumerate().rev() {
                out.push(VersionInfo {
                    key: k.clone(),
                    version_id: v.id.clone(),
                    is_latest: i == versions.len() - 1,
                    is_delete_marker: v.body.is_none(),
                    size: v.body.as_ref().map_or(0, |b| b.len() as u64),
                    mtime: v.mtime,
                    etag: v.etag.clone(),
                });
            }
        }
        Ok(out)
    }
}

struct MemoryUpload {
    store: MemoryStore,
    key: String,
    opts: PutOptions,
    buf: BytesMut,
    sizes: Vec<u64>,
    last_part_small: bool,
    min_part: u64,
}

#[async_trait]
impl Upload for MemoryUpload {
    async fn put_part(&mut self, part: Bytes) -> StoreResult<()> {
        if self.last_part_small {
            return Err(StoreError::invalid(
                &self.key,
                "a part smaller than the minimum part size was not the last",
            ));
        }
        self.last_part_small = (part.len() as u64) < self.min_part;
        self.sizes.push(part.len() as u64);
        self.buf.extend_from_slice(&part);
        Ok(())
    }

    async fn complete(self: Box<Self>) -> StoreResult<ObjectInfo> {
        let body = self.buf.clone().freeze();
        let info = self.store.insert(&self.key, body, &self.opts)?;
        self.store.parts.lock().insert(self.key, self.sizes);
        Ok(info)
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        Ok(())
    }
}
