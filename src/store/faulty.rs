//! A fault-injecting wrapper around any [`ObjectStore`], for the tests of the layers above:
//! fail chosen calls, fail every Nth call, delay calls, corrupt the bytes a get returns, or
//! hold calls on some keys until released.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, ObjectInfo, ObjectStore, PutOptions,
    Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo,
};

/// The error an injected fault produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A transient failure (503, reset): [`StoreError::Unavailable`].
    Transient,
    /// A full disk or quota: [`StoreError::NoSpace`].
    NoSpace,
    /// A permission answer: [`StoreError::AccessDenied`].
    AccessDenied,
}

/// What to inject. Call numbers count every trait call (and every upload part), from 1.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Fail exactly these calls.
    pub fail_calls: Vec<u64>,
    /// Fail every call whose number is a multiple of this.
    pub fail_every: Option<u64>,
    pub kind: Option<FaultKind>,
    /// Sleep this long before every call.
    pub delay: Option<Duration>,
    /// Flip one bit of every body a get returns.
    pub corrupt_gets: bool,
    /// Calls on keys starting with this prefix wait until [`FaultyStore::release`].
    pub hold_prefix: Option<String>,
    /// The calls the hold applies to, by name (`"copy"`, `"delete"`, ...; a copy counts by
    /// its destination key); empty: every call.
    pub hold_only: Vec<&'static str>,
    /// A held listing waits after the store has answered instead of before: its answer
    /// then arrives late, showing the store as it was (only `list` holds this way).
    pub hold_after: bool,
    /// Fail every get whose range starts at one of these offsets (with `kind`).
    pub fail_gets_at: Vec<u64>,
}

/// Counters of what the wrapper did.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub calls: AtomicU64,
    pub failed: AtomicU64,
    pub corrupted: AtomicU64,
    /// Calls that have waited on a hold.
    pub held: AtomicU64,
    /// The byte range of every get, in the order they were made (None: the whole object).
    pub gets: Mutex<Vec<(String, Option<Range<u64>>)>>,
}

#[derive(Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: Arc<Mutex<FaultPlan>>,
    stats: Arc<FaultStats>,
    released: Arc<Notify>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultyStore {
            inner,
            plan: Default::default(),
            stats: Default::default(),
            released: Arc::new(Notify::new()),
        }
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock() = plan;
        self.released.notify_waiters();
    }

    pub fn stats(&self) -> &FaultStats {
        &self.stats
    }

    /// Lets held calls go on (and clears the hold).
    pub fn release(&self) {
        self.plan.lock().hold_prefix = None;
        self.released.notify_waiters();
    }

    async fn before_call(&self, key: &str, call: &str) -> StoreResult<()> {
        let n = self.stats.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let (delay, fail, kind) = {
            let plan = self.plan.lock();
            let fail = plan.fail_calls.contains(&n)
                || plan.fail_every.is_some_and(|e| n.is_multiple_of(e));
            (plan.delay, fail, plan.kind.unwrap_or(FaultKind::Transient))
        };
        if !(call == "list" && self.plan.lock().hold_after) {
            self.hold(key, call).await;
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if fail {
            return Err(self.injected(key, format!("injected fault on call {n}"), kind));
        }
        Ok(())
    }

    /// An injected failure of the plan's kind, counted.
    fn injected(&self, key: &str, detail: String, kind: FaultKind) -> StoreError {
        self.stats.failed.fetch_add(1, Ordering::SeqCst);
        let key = key.to_string();
        match kind {
            FaultKind::Transient => StoreError::Unavailable { key, detail },
            FaultKind::NoSpace => StoreError::NoSpace { key, detail },
            FaultKind::AccessDenied => StoreError::AccessDenied { key, detail },
        }
    }

    /// Waits while the plan holds `call` on `key`.
    async fn hold(&self, key: &str, call: &str) {
        let mut counted = false;
        loop {
            let notified = self.released.notified();
            let held = {
                let plan = self.plan.lock();
                plan.hold_prefix
                    .as_deref()
                    .is_some_and(|p| key.starts_with(p))
                    && (plan.hold_only.is_empty() || plan.hold_only.contains(&call))
            };
            if !held {
                return;
            }
            if !counted {
                counted = true;
                self.stats.held.fetch_add(1, Ordering::SeqCst);
            }
            notified.await;
        }
    }

    fn maybe_corrupt(&self, mut result: GetResult) -> GetResult {
        if self.plan.lock().corrupt_gets && !result.body.is_empty() {
            let mut bytes = result.body.to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x01;
            result.body = Bytes::from(bytes);
            self.stats.corrupted.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        self.before_call(key, "put").await?;
        self.inner.put(key, body, opts).await
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        self.before_call(key, "create_upload").await?;
        let inner = self.inner.create_upload(key, opts).await?;
        Ok(Box::new(FaultyUpload {
            store: self.clone(),
            key: key.to_string(),
            inner,
        }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        self.before_call(key, "get").await?;
        if let Some(r) = &range {
            let (fail, kind) = {
                let plan = self.plan.lock();
                let kind = plan.kind.unwrap_or(FaultKind::Transient);
                (plan.fail_gets_at.contains(&r.start), kind)
            };
            if fail {
                let detail = format!("injected fault on the get from {}", r.start);
                return Err(self.injected(key, detail, kind));
            }
        }
        self.stats
            .gets
            .lock()
            .push((key.to_string(), range.clone()));
        let r = self.inner.get(key, range, opts).await?;
        Ok(self.maybe_corrupt(r))
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        self.before_call(key, "head").await?;
        self.inner.head(key, opts).await
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        self.before_call(&req.prefix, "list").await?;
        let page = self.inner.list(req).await;
        if self.plan.lock().hold_after {
            self.hold(&req.prefix, "list").await;
        }
        page
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.before_call(key, "delete").await?;
        self.inner.delete(key).await
    }

    async fn copy(&self, src: &str, dst: &str, opts: &CopyOptions) -> StoreResult<ObjectInfo> {
        self.before_call(dst, "copy").await?;
        self.inner.copy(src, dst, opts).await
    }

    async fn versioning_enabled(&self) -> StoreResult<bool> {
        self.inner.versioning_enabled().await
    }

    async fn space(&self) -> Option<(u64, u64)> {
        self.inner.space().await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.inner.flush().await
    }

    async fn list_versions(&self, prefix: &str) -> StoreResult<Vec<VersionInfo>> {
        self.before_call(prefix, "list_versions").await?;
        self.inner.list_versions(prefix).await
    }

    async fn restore_version(
        &self,
        key: &str,
        version_id: &str,
        sse: &Sse,
    ) -> StoreResult<ObjectInfo> {
        self.before_call(key, "restore_version").await?;
        self.inner.restore_version(key, version_id, sse).await
    }
}

struct FaultyUpload {
    store: FaultyStore,
    key: String,
    inner: Box<dyn Upload>,
}

#[async_trait]
impl Upload for FaultyUpload {
    async fn put_part(&mut self, part: Bytes) -> StoreResult<()> {
        self.store.before_call(&self.key, "put_part").await?;
        self.inner.put_part(part).await
    }

    async fn complete(self: Box<Self>) -> StoreResult<ObjectInfo> {
        self.store.before_call(&self.key, "complete").await?;
        self.inner.complete().await
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        self.inner.abort().await
    }
}
