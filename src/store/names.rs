//! A store wrapper that encrypts object keys: the layers above see plaintext paths, the
//! backend sees each component encrypted with the store's name key ([`crate::crypt::names`]).
//!
//! Keys under the reserved `.coffer/` prefix (an S3 store's own config, read before any key
//! is loaded) pass through unchanged. Listed entries that do not decrypt (planted by another
//! tool, or moved between directories) are left out with a warning, never shown garbled.
//! Long components live hashed with their encoding in a sidecar object, written before the
//! first object that needs it and kept afterwards (old versions may still name it).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::OnceCell;
use tracing::warn;

use super::{
    CopyOptions, GetOptions, GetResult, ListPage, ListRequest, ObjectInfo, ObjectStore, PutOptions,
    Sse, StoreError, StoreLimits, StoreResult, Upload, VersionInfo,
};
use crate::crypt::envelope::Envelope;
use crate::crypt::keys::KeyProvider;
use crate::crypt::names::{self, NameCipher, SIDECAR_SUFFIX};

/// The top-level name whose keys are never encrypted.
const PASSTHROUGH: &str = ".coffer";

/// Where the name key comes from: its envelope (in the volume config), unwrapped on first use.
pub struct NameKey {
    pub provider: Arc<dyn KeyProvider>,
    pub envelope: Envelope,
}

pub struct NameCipherStore {
    inner: Arc<dyn ObjectStore>,
    key: NameKey,
    cipher: OnceCell<Arc<NameCipher>>,
    /// SSE parameters of sidecar objects (those of the store's writes).
    sidecar_sse: Sse,
    /// Stored component paths (`enc/enc/~hash`) to their encodings: sidecars known to exist.
    long_names: Mutex<std::collections::HashMap<String, String>>,
}

/// A key's stored form, and the sidecars it needs: (sidecar key, encoding).
struct Encrypted {
    key: String,
    sidecars: Vec<(String, String)>,
}

impl NameCipherStore {
    pub fn new(inner: Arc<dyn ObjectStore>, key: NameKey, sidecar_sse: Sse) -> NameCipherStore {
        NameCipherStore {
            inner,
            key,
            cipher: OnceCell::new(),
            sidecar_sse,
            long_names: Mutex::new(Default::default()),
        }
    }

    /// The name cipher, unwrapping the name key the first time (a missing or wrong root key
    /// shows here: EACCES with the reason).
    pub async fn cipher(&self) -> StoreResult<Arc<NameCipher>> {
        self.cipher
            .get_or_try_init(|| async {
                let dk = self
                    .key
                    .provider
                    .unwrap(&self.key.envelope)
                    .await
                    .map_err(|e| StoreError::AccessDenied {
                        key: "(name key)".into(),
                        detail: format!("name encryption needs the store's root key: {e}"),
                    })?;
                Ok(Arc::new(NameCipher::from_data_key(&dk)))
            })
            .await
            .cloned()
    }

    fn passthrough(key: &str) -> bool {
        key == PASSTHROUGH || key.starts_with(".coffer/")
    }

    async fn encrypt_key(&self, key: &str) -> StoreResult<Encrypted> {
        if Self::passthrough(key) {
            return Ok(Encrypted {
                key: key.to_string(),
                sidecars: Vec::new(),
            });
        }
        let cipher = self.cipher().await?;
        let mut stored = String::with_capacity(key.len() * 2);
        let mut plain_parent = String::new();
        let mut sidecars = Vec::new();
        for (i, comp) in key.split('/').enumerate() {
            if i > 0 {
                stored.push('/');
            }
            if comp.is_empty() {
                continue;
            }
            let enc = cipher.encrypt(&plain_parent, comp);
            let s = names::stored_component(&enc);
            if names::is_long(&s) {
                sidecars.push((format!("{stored}{s}{SIDECAR_SUFFIX}"), enc));
            }
            stored.push_str(&s);
            if !plain_parent.is_empty() {
                plain_parent.push('/');
            }
            plain_parent.push_str(comp);
        }
        let max = self.inner.limits().max_key_bytes;
        if stored.len() > max {
            return Err(StoreError::NameTooLong {
                key: key.to_string(),
                detail: format!("{} bytes encrypted, the backend takes {max}", stored.len()),
            });
        }
        Ok(Encrypted {
            key: stored,
            sidecars,
        })
    }

    /// A copy (or with `rename`, a move) of `src` to `dst`, both by their stored names.
    async fn copy_or_rename(
        &self,
        src: &str,
        dst: &str,
        opts: &CopyOptions,
        rename: bool,
    ) -> StoreResult<ObjectInfo> {
        let s = self.encrypt_key(src).await?;
        let d = self.encrypt_key(dst).await?;
        self.ensure_sidecars(&d).await?;
        let mut info = if rename {
            self.inner.rename(&s.key, &d.key, opts).await?
        } else {
            self.inner.copy(&s.key, &d.key, opts).await?
        };
        info.key = dst.to_string();
        Ok(info)
    }

    /// Writes the sidecars a key needs that are not known to exist.
    async fn ensure_sidecars(&self, enc: &Encrypted) -> StoreResult<()> {
        for (sidecar, encoding) in &enc.sidecars {
            let component = sidecar.trim_end_matches(SIDECAR_SUFFIX).to_string();
            if self.long_names.lock().contains_key(&component) {
                continue;
            }
            let opts = PutOptions {
                sse: self.sidecar_sse.clone(),
                ..Default::default()
            };
            self.inner
                .put(sidecar, Bytes::from(encoding.clone()), &opts)
                .await?;
            self.long_names.lock().insert(component, encoding.clone());
        }
        Ok(())
    }

    /// The encoding of a hashed component at `stored_path` (parent's stored prefix + the
    /// component), from the cache or its sidecar.
    async fn long_encoding(&self, stored_path: &str) -> StoreResult<String> {
        if let Some(e) = self.long_names.lock().get(stored_path) {
            return Ok(e.clone());
        }
        let sidecar = format!("{stored_path}{SIDECAR_SUFFIX}");
        let opts = GetOptions {
            sse: self.sidecar_sse.clone(),
            ..Default::default()
        };
        let body = self.inner.get(&sidecar, None, &opts).await?.body;
        let component = stored_path.rsplit('/').next().unwrap_or(stored_path);
        let encoding = std::str::from_utf8(&body)
            .ok()
            .filter(|e| names::sidecar_matches(component, e))
            .ok_or_else(|| StoreError::corrupt(&sidecar, "long name sidecar does not match"))?
            .to_string();
        self.long_names
            .lock()
            .insert(stored_path.to_string(), encoding.clone());
        Ok(encoding)
    }

    /// Decrypts the part `rest` of a stored key under a directory whose plaintext prefix and
    /// stored prefix are given (both empty or ending in `/`). `None` for sidecars.
    async fn decrypt_rest(
        &self,
        cipher: &NameCipher,
        plain_prefix: &str,
        stored_prefix: &str,
        rest: &str,
    ) -> StoreResult<Option<String>> {
        let mut plain = plain_prefix.to_string();
        let mut stored = stored_prefix.to_string();
        let comps: Vec<&str> = rest.split('/').collect();
        for (i, comp) in comps.iter().enumerate() {
            if i > 0 {
                plain.push('/');
                stored.push('/');
            }
            if comp.is_empty() {
                continue;
            }
            if names::is_sidecar(comp) && i == comps.len() - 1 {
                return Ok(None);
            }
            let encoding = if names::is_long(comp) {
                self.long_encoding(&format!("{stored}{comp}")).await?
            } else {
                comp.to_string()
            };
            let parent = plain.trim_end_matches('/');
            let name = cipher
                .decrypt(parent, &encoding)
                .map_err(|e| StoreError::corrupt(&format!("{stored}{comp}"), e.to_string()))?;
            plain.push_str(&name);
            stored.push_str(comp);
        }
        Ok(Some(plain))
    }

    /// The plaintext key of a stored key, or `None` for sidecars and names that do not
    /// decrypt (logged).
    async fn decrypt_listed(
        &self,
        cipher: &NameCipher,
        plain_prefix: &str,
        stored_prefix: &str,
        stored_key: &str,
    ) -> Option<String> {
        if Self::passthrough(stored_key) {
            return Some(stored_key.to_string());
        }
        let rest = stored_key.strip_prefix(stored_prefix)?;
        match self
            .decrypt_rest(cipher, plain_prefix, stored_prefix, rest)
            .await
        {
            Ok(k) => k,
            Err(e) => {
                warn!("{stored_key}: left out of the listing: {e}");
                None
            }
        }
    }

    /// A plaintext listing prefix (a directory prefix ending in `/`, or "") in stored form.
    async fn stored_prefix(&self, prefix: &str) -> StoreResult<String> {
        if prefix.is_empty() {
            return Ok(String::new());
        }
        if !prefix.ends_with('/') {
            // Encrypted names have no order or prefix relation to their plaintext: only whole
            // directories can be listed.
            return Err(StoreError::invalid(
                prefix,
                "with name encryption, listings are of whole directories (a prefix ending in /)",
            ));
        }
        Ok(self.encrypt_key(prefix).await?.key)
    }
}

#[async_trait]
impl ObjectStore for NameCipherStore {
    fn describe(&self) -> String {
        format!("{} (names encrypted)", self.inner.describe())
    }

    fn limits(&self) -> StoreLimits {
        StoreLimits {
            lists_after_a_key: false,
            ..self.inner.limits()
        }
    }

    fn request_stats(&self) -> Vec<(&'static str, u64)> {
        self.inner.request_stats()
    }

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<ObjectInfo> {
        let enc = self.encrypt_key(key).await?;
        self.ensure_sidecars(&enc).await?;
        let mut info = self.inner.put(&enc.key, body, opts).await?;
        info.key = key.to_string();
        Ok(info)
    }

    async fn create_upload(&self, key: &str, opts: &PutOptions) -> StoreResult<Box<dyn Upload>> {
        let enc = self.encrypt_key(key).await?;
        self.ensure_sidecars(&enc).await?;
        Ok(Box::new(RenamedUpload {
            inner: self.inner.create_upload(&enc.key, opts).await?,
            key: key.to_string(),
        }))
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        opts: &GetOptions,
    ) -> StoreResult<GetResult> {
        let enc = self.encrypt_key(key).await?;
        let mut r = self.inner.get(&enc.key, range, opts).await?;
        r.info.key = key.to_string();
        Ok(r)
    }

    async fn head(&self, key: &str, opts: &GetOptions) -> StoreResult<ObjectInfo> {
        let enc = self.encrypt_key(key).await?;
        let mut info = self.inner.head(&enc.key, opts).await?;
        info.key = key.to_string();
        Ok(info)
    }

    async fn list(&self, req: &ListRequest) -> StoreResult<ListPage> {
        if req.start_after.is_some() {
            return Err(StoreError::Invalid {
                key: req.prefix.clone(),
                detail: "a listing of encrypted names cannot start after a name".into(),
            });
        }
        let cipher = self.cipher().await?;
        let stored_prefix = self.stored_prefix(&req.prefix).await?;
        let inner_req = ListRequest {
            prefix: stored_prefix.clone(),
            ..req.clone()
        };
        let page = self.inner.list(&inner_req).await?;
        let mut out = ListPage {
            next: page.next,
            ..Default::default()
        };
        for mut o in page.objects {
            if let Some(k) = self
                .decrypt_listed(&cipher, &req.prefix, &stored_prefix, &o.key)
                .await
            {
                o.key = k;
                out.objects.push(o);
            }
        }
        for p in page.common_prefixes {
            if let Some(k) = self
                .decrypt_listed(&cipher, &req.prefix, &stored_prefix, &p)
                .await
            {
                out.common_prefixes.push(k);
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let enc = self.encrypt_key(key).await?;
        self.inner.delete(&enc.key).await
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
        let cipher = self.cipher().await?;
        // A file's versions: its exact stored key. A directory's: the stored prefix.
        let (plain_prefix, stored_prefix, exact) = if prefix.is_empty() || prefix.ends_with('/') {
            (prefix.to_string(), self.stored_prefix(prefix).await?, None)
        } else {
            let enc = self.encrypt_key(prefix).await?.key;
            let (pp, sp) = match (prefix.rfind('/'), enc.rfind('/')) {
                (Some(a), Some(b)) => (prefix[..=a].to_string(), enc[..=b].to_string()),
                _ => (String::new(), String::new()),
            };
            (pp, sp, Some(enc))
        };
        let listed = self
            .inner
            .list_versions(exact.as_deref().unwrap_or(&stored_prefix))
            .await?;
        let mut out = Vec::with_capacity(listed.len());
        for mut v in listed {
            if let Some(e) = &exact
                && v.key != *e
            {
                continue;
            }
            if let Some(k) = self
                .decrypt_listed(&cipher, &plain_prefix, &stored_prefix, &v.key)
                .await
            {
                v.key = k;
                out.push(v);
            }
        }
        Ok(out)
    }

    async fn space(&self) -> Option<(u64, u64)> {
        self.inner.space().await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.inner.flush().await
    }

    async fn restore_version(
        &self,
        key: &str,
        version_id: &str,
        sse: &Sse,
    ) -> StoreResult<ObjectInfo> {
        let enc = self.encrypt_key(key).await?;
        self.ensure_sidecars(&enc).await?;
        let mut info = self
            .inner
            .restore_version(&enc.key, version_id, sse)
            .await?;
        info.key = key.to_string();
        Ok(info)
    }
}

/// A multipart upload whose completed object reports its plaintext key.
struct RenamedUpload {
    inner: Box<dyn Upload>,
    key: String,
}

#[async_trait]
impl Upload for RenamedUpload {
    async fn put_part(&mut self, part: Bytes) -> StoreResult<()> {
        self.inner.put_part(part).await
    }

    async fn complete(self: Box<Self>) -> StoreResult<ObjectInfo> {
        let key = self.key;
        let mut info = self.inner.complete().await?;
        info.key = key;
        Ok(info)
    }

    async fn abort(self: Box<Self>) -> StoreResult<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypt::content::random_file_id;
    use crate::crypt::keys::{KeyRing, RootKey};
    use crate::store::list_all;
    use crate::store::memory::MemoryStore;

    async fn setup() -> (Arc<MemoryStore>, NameCipherStore) {
        let ring: Arc<dyn KeyProvider> = Arc::new(KeyRing::new(vec![RootKey::generate()]).unwrap());
        let (_, envelope) = ring.generate(&random_file_id()).await.unwrap();
        let mem = Arc::new(MemoryStore::new(true));
        let store = NameCipherStore::new(
            mem.clone(),
            NameKey {
                provider: ring,
                envelope,
            },
            Sse::None,
        );
        (mem, store)
    }

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    #[tokio::test]
    async fn keys_are_encrypted_and_listings_decrypted() {
        let (mem, store) = setup().await;
        let o = PutOptions::default();
        let long = "L".repeat(250);
        for k in [
            "top.txt",
            "docs/",
            "docs/a.txt",
            "docs/sub/b.txt",
            &format!("docs/{long}/c.txt"),
            &format!("docs/{long}.txt"),
            ".coffer/volume.toml",
        ] {
            store.put(k, b(k), &o).await.unwrap();
        }
        // Nothing of the plaintext names reaches the backend, but for the reserved config.
        let raw = list_all(mem.as_ref(), ListRequest::default())
            .await
            .unwrap();
        for obj in &raw.objects {
            if obj.key.starts_with(".coffer/") {
                continue;
            }
            for word in ["top", "docs", "a.txt", "sub", "LLLL", "txt"] {
                assert!(!obj.key.contains(word), "{} leaks {word}", obj.key);
            }
            assert!(obj.key.len() < 400, "{}", obj.key);
        }
        assert_eq!(
            store
                .get("docs/a.txt", None, &GetOptions::default())
                .await
                .unwrap()
                .body,
            b("docs/a.txt")
        );
        let page = list_all(
            &store,
            ListRequest {
                prefix: "docs/".into(),
                delimiter: Some('/'),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut objs: Vec<_> = page.objects.iter().map(|o| o.key.clone()).collect();
        objs.sort();
        let mut want = vec![
            "docs/".to_string(),
            "docs/a.txt".into(),
            format!("docs/{long}.txt"),
        ];
        want.sort();
        assert_eq!(objs, want);
        let mut prefixes = page.common_prefixes.clone();
        prefixes.sort();
        assert_eq!(
            prefixes,
            vec![format!("docs/{long}/"), "docs/sub/".to_string()]
        );
        // A recursive listing decrypts whole paths, through long components too.
        let all = list_all(&store, ListRequest::default()).await.unwrap();
        let mut keys: Vec<_> = all.objects.iter().map(|o| o.key.clone()).collect();
        keys.sort();
        assert_eq!(keys.len(), 7, "{keys:?}");
        assert!(keys.contains(&format!("docs/{long}/c.txt")));
        // Copy and delete work on plaintext keys.
        store
            .copy("docs/a.txt", "docs/sub/moved.txt", &CopyOptions::default())
            .await
            .unwrap();
        store.delete("docs/a.txt").await.unwrap();
        assert!(
            store
                .head("docs/a.txt", &GetOptions::default())
                .await
                .is_err()
        );
        assert_eq!(
            store
                .get("docs/sub/moved.txt", None, &GetOptions::default())
                .await
                .unwrap()
                .body,
            b("docs/a.txt")
        );
    }

    #[tokio::test]
    async fn planted_and_moved_names_are_left_out() {
        let (mem, store) = setup().await;
        let o = PutOptions::default();
        store.put("a/x", b("x"), &o).await.unwrap();
        let raw = list_all(mem.as_ref(), ListRequest::default())
            .await
            .unwrap();
        let x = raw.objects[0].key.clone();
        let (dir_a, name_x) = x.split_once('/').unwrap();
        store.put("b/y", b("y"), &o).await.unwrap();
        let raw = list_all(mem.as_ref(), ListRequest::default())
            .await
            .unwrap();
        let dir_b = raw
            .objects
            .iter()
            .map(|o| o.key.split_once('/').unwrap().0)
            .find(|d| *d != dir_a)
            .unwrap()
            .to_string();
        // A name moved into another directory, random junk, a bad long name.
        mem.put(&format!("{dir_b}/{name_x}"), b("moved"), &o)
            .await
            .unwrap();
        mem.put(&format!("{dir_b}/not-a-name"), b("junk"), &o)
            .await
            .unwrap();
        mem.put(&format!("{dir_b}/~nosidecar"), b("junk"), &o)
            .await
            .unwrap();
        mem.put(&format!("{dir_b}/../../etc"), b("junk"), &o)
            .await
            .unwrap();
        let page = list_all(
            &store,
            ListRequest {
                prefix: "b/".into(),
                delimiter: Some('/'),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let keys: Vec<_> = page.objects.iter().map(|o| o.key.clone()).collect();
        assert_eq!(keys, vec!["b/y".to_string()]);
    }

    #[tokio::test]
    async fn a_wrong_root_key_is_access_denied() {
        let (mem, store) = setup().await;
        store
            .put("f", b("f"), &PutOptions::default())
            .await
            .unwrap();
        let other: Arc<dyn KeyProvider> =
            Arc::new(KeyRing::new(vec![RootKey::generate()]).unwrap());
        let wrong = NameCipherStore::new(
            mem,
            NameKey {
                provider: other,
                envelope: store.key.envelope.clone(),
            },
            Sse::None,
        );
        let e = wrong.head("f", &GetOptions::default()).await.unwrap_err();
        assert_eq!(e.errno(), libc::EACCES, "{e}");
        assert!(e.to_string().contains("root key"), "{e}");
    }
}
