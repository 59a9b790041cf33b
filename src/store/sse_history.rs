//! SSE-C key history: objects written under an earlier customer key stay readable.
//!
//! The layers above send the current (first) key with every request; when the backend says
//! an object was written under another key, this wrapper tries the older keys of the history
//! in order, as s3fs's key file does, and remembers which key each object needs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, ObjectInfo, ObjectStore, PutOptions,
    Sse, SseCustomerKey, StoreError, StoreLimits, StoreResult, Upload, VersionInfo,
};

pub struct SseKeyHistory {
    inner: Arc<dyn ObjectStore>,
    /// Older keys, newest first (the current key is the one callers send).
    older: Vec<SseCustomerKey>,
    /// Which older key an object needed last time (index into `older`).
    known: Mutex<HashMap<String, usize>>,
}

impl SseKeyHistory {
    pub fn new(inner: Arc<dyn ObjectStore>, older: Vec<SseCustomerKey>) -> Self {
        SseKeyHistory {
            inner,
            older,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// A copy (or with `rename`, a move) of `src`, read with whichever key of the history
    /// opens it. The result is written under the caller's (current) key: copying rekeys old
    /// objects.
    async fn copy_or_rename(
        &self,
        src: &str,
        dst: &str,
        opts: &CopyOptions,
        rename: bool,
    ) -> StoreResult<ObjectInfo> {
        let info = self
            .with_history(src, &opts.source_sse, |source_sse| {
                let o = CopyOptions {
                    source_sse,
                    ..opts.clone()
                };
                async move {
                    if rename {
                        self.inner.rename(src, dst, &o).await
                    } else {
                        self.inner.copy(src, dst, &o).await
                    }
                }
            })
            .await?;
        let mut known = self.known.lock();
        known.remove(dst);
        if rename {
            known.remove(src);
        }
        Ok(info)
    }

    /// Runs `op` with the caller's SSE, then, if the key was wrong, with each older key.
    async fn with_history<T, F, Fut>(&self, key: &str, sse: &Sse, op: F) -> StoreResult<T>
    where
        F: Fn(Sse) -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        if !matches!(sse, Sse::Customer(_)) || self.older.is_empty() {
            return op(sse.clone()).await;
        }
        let remembered = self.known.lock().get(key).copied();
        if let Some(i) = remembered {
            match op(Sse::Customer(self.older[i].clone())).await {
                Err(StoreError::WrongKey { .. }) => {}
                r => return r,
            }
        }
        let first = op(sse.clone()).await;
        if !matches!(first, Err(StoreError::WrongKey { .. })) {
            return first;
        }
        for (i, k) in self.older.iter().enumerate() {
            if Some(i) == remembered {
                continue;
            }
            match op(Sse::Customer(k.clone())).await {
                Err(StoreError::WrongKey { .. }) => continue,
                r => {
                    if r.is_ok() {
                        self.known.lock().insert(key.to_string(), i);
                    }
                    return r;
                }
            }
        }
        first
    }
}

#[async_trait]
impl ObjectStore for SseKeyHistory {
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
        self.known.lock().remove(key);
        self.inner.put(key, body, opts).await
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        self.known.lock().remove(key);
        self.inner.create_upload(key, opts).await
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        self.with_history(key, &opts.sse, |sse| {
            let o = GetOptions {
                sse,
                version_id: opts.version_id.clone(),
                if_match: opts.if_match.clone(),
            };
            let range = range.clone();
            async move { self.inner.get(key, range, &o).await }
        })
        .await
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        self.with_history(key, &opts.sse, |sse| {
            let o = GetOptions {
                sse,
                version_id: opts.version_id.clone(),
                if_match: opts.if_match.clone(),
            };
            async move { self.inner.head(key, &o).await }
        })
        .await
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        self.inner.list(req).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.known.lock().remove(key);
        self.inner.delete(key).await
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.copy_or_rename(src, dst, opts, false).await
    }

    async fn rename(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.copy_or_rename(src, dst, opts, true).await
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
    use crate::store::memory::MemoryStore;

    fn k(b: u8) -> SseCustomerKey {
        SseCustomerKey::new([b; 32])
    }

    #[tokio::test]
    async fn older_keys_read_and_copies_rekey() {
        let mem = Arc::new(MemoryStore::new(false));
        let put = |key: SseCustomerKey| PutOptions {
            sse: Sse::Customer(key),
            ..Default::default()
        };
        mem.put("old", Bytes::from_static(b"1"), &put(k(1)))
            .await
            .unwrap();
        let s = SseKeyHistory::new(mem.clone(), vec![k(2), k(1)]);
        let current = GetOptions {
            sse: Sse::Customer(k(3)),
            version_id: None,
            if_match: None,
        };
        assert_eq!(&s.get("old", None, &current).await.unwrap().body[..], b"1");
        assert!(s.head("old", &current).await.is_ok());
        // Unknown to every key: the error of the current key.
        mem.put("alien", Bytes::from_static(b"x"), &put(k(9)))
            .await
            .unwrap();
        assert!(matches!(
            s.get("alien", None, &current).await,
            Err(StoreError::WrongKey { .. })
        ));
        s.copy(
            "old",
            "old",
            &CopyOptions {
                source_sse: Sse::Customer(k(3)),
                sse: Sse::Customer(k(3)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Now under the current key, readable without the history.
        assert_eq!(
            &mem.get("old", None, &current).await.unwrap().body[..],
            b"1"
        );
    }
}
