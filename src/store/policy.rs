//! The policy that refuses unencrypted writes (`--require-encryption`), as a bucket policy
//! denies puts without an encryption header: every write must be sealed on the client or
//! ask the server to encrypt it.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, ObjectInfo, ObjectStore, PutOptions,
    Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo,
};

pub struct RequireEncryption {
    inner: Arc<dyn ObjectStore>,
    /// Whether bodies are sealed on the client before they reach this store.
    client_side: bool,
}

impl RequireEncryption {
    pub fn new(inner: Arc<dyn ObjectStore>, client_side: bool) -> Self {
        RequireEncryption { inner, client_side }
    }

    fn check(&self, key: &str, sse: &Sse) -> StoreResult<()> {
        if self.client_side || !sse.is_none() {
            return Ok(());
        }
        Err(StoreError::AccessDenied {
            key: key.to_string(),
            detail: "refused by --require-encryption: this store neither encrypts on the client nor asks the server to (SSE)".into(),
        })
    }
}

#[async_trait]
impl ObjectStore for RequireEncryption {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    fn request_stats(&self) -> Vec<(&'static str, u64)> {
        self.inner.request_stats()
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.check(key, &opts.sse)?;
        self.inner.put(key, body, opts).await
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        self.check(key, &opts.sse)?;
        self.inner.create_upload(key, opts).await
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        self.inner.get(key, range, opts).await
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        self.inner.head(key, opts).await
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        self.inner.list(req).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.check(dst, &opts.sse)?;
        self.inner.copy(src, dst, opts).await
    }

    async fn rename(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.check(dst, &opts.sse)?;
        self.inner.rename(src, dst, opts).await
    }

    async fn versioning_enabled(&self) -> StoreResult<bool> {
        self.inner.versioning_enabled().await
    }

    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>> {
        self.inner.list_versions(prefix).await
    }

    async fn space(&self) -> Option<(u64, u64)> {
        self.inner.space().await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SseCustomerKey;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn unencrypted_writes_are_refused() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(false));
        let plain = RequireEncryption::new(mem.clone(), false);
        let e = plain
            .put("a", Bytes::from_static(b"x"), &PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EACCES);
        assert!(
            plain
                .create_upload("a", &PutOptions::default())
                .await
                .is_err()
        );
        let sse = PutOptions {
            sse: Sse::Customer(SseCustomerKey::new([1; 32])),
            ..Default::default()
        };
        plain
            .put("a", Bytes::from_static(b"x"), &sse)
            .await
            .unwrap();
        let client = RequireEncryption::new(mem, true);
        client
            .put("b", Bytes::from_static(b"sealed"), &PutOptions::default())
            .await
            .unwrap();
    }
}
