//! Reading chunks of a committed object: ranged gets aligned to chunks, opened in parallel,
//! kept in the chunk cache.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::ChunkCache;
use crate::crypt::{Crypt, ObjectCipher};
use crate::error::{FsError, FsResult};
use crate::store::{GetOptions, ObjectInfo, ObjectStore};

static NEXT_OBJECT: AtomicU64 = AtomicU64::new(1);

/// An object version opened for reading: its cipher and plaintext size.
pub struct CommittedObject {
    pub key: String,
    /// Identity of this version in the chunk cache.
    pub cache_id: u64,
    pub plain_size: u64,
    pub cipher: Arc<ObjectCipher>,
    pub get: GetOptions,
}

impl CommittedObject {
    /// Opens an object: one ranged get of its header returns the metadata (with the
    /// envelope) too. With `version_id` in `get`, reads stay on that version.
    pub async fn open(
        store: &dyn ObjectStore,
        crypt: &Crypt,
        key: &str,
        get: GetOptions,
    ) -> FsResult<(CommittedObject, ObjectInfo)> {
        let header_len = crypt.header_len();
        let (info, header) = if header_len > 0 {
            let r = store.get(key, Some(0..header_len), &get).await?;
            (r.info, r.body)
        } else {
            (store.head(key, &get).await?, Bytes::new())
        };
        let plain_size = crypt.geometry().plain_size(info.size)?;
        let metadata = info.metadata.clone().unwrap_or_default();
        let cipher = crypt.open_object(&metadata, &header).await?;
        // Later reads stay on this version: by its id where the store has versions, else
        // by its ETag.
        let version_id = get.version_id.or(info.version_id.clone());
        let get = GetOptions {
            if_match: match &version_id {
                None if !info.etag.is_empty() => Some(info.etag.clone()),
                _ => None,
            },
            version_id,
            ..get
        };
        Ok((
            CommittedObject {
                key: key.to_string(),
                cache_id: NEXT_OBJECT.fetch_add(1, Ordering::Relaxed),
                plain_size,
                cipher: Arc::new(cipher),
                get,
            },
            info,
        ))
    }

    /// The plaintext of `chunks` (clamped to the object), one buffer per chunk, from the
    /// cache where it has them and with one ranged get per run of missing chunks.
    pub async fn read_chunks(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        chunks: Range<u64>,
    ) -> FsResult<Vec<Bytes>> {
        let g = self.cipher.geometry();
        let chunks = chunks.start..chunks.end.min(g.chunk_count(self.plain_size));
        let mut out: Vec<Option<Bytes>> = chunks
            .clone()
            .map(|i| cache.get(&(self.cache_id, i)))
            .collect();
        let mut i = 0;
        while i < out.len() {
            if out[i].is_some() {
                i += 1;
                continue;
            }
            let start = i;
            while i < out.len() && out[i].is_none() {
                i += 1;
            }
            let run = chunks.start + start as u64..chunks.start + i as u64;
            let range = g.stored_range(run.clone(), self.plain_size);
            let got = store.get(&self.key, Some(range.clone()), &self.get).await?;
            if got.range != range {
                return Err(FsError::Crypt(crate::crypt::CryptError::BadSize(
                    got.info.size,
                )));
            }
            let cipher = self.cipher.clone();
            let plain_size = self.plain_size;
            let r = run.clone();
            let opened = tokio::task::spawn_blocking(move || cipher.open(r, plain_size, &got.body))
                .await
                .map_err(|e| FsError::new(libc::EIO, format!("decrypt task failed: {e}")))??;
            for (j, data) in opened.into_iter().enumerate() {
                let data = Bytes::from(data);
                cache.insert((self.cache_id, run.start + j as u64), data.clone());
                out[start + j] = Some(data);
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every chunk filled"))
            .collect())
    }

    /// Plaintext bytes `range` of the object.
    pub async fn read(
        &self,
        store: &dyn ObjectStore,
        cache: &ChunkCache,
        range: Range<u64>,
    ) -> FsResult<Vec<u8>> {
        let g = self.cipher.geometry();
        let chunks = g.chunks_of(range.clone(), self.plain_size);
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.read_chunks(store, cache, chunks.clone()).await?;
        let end = range.end.min(self.plain_size);
        let mut out = Vec::with_capacity((end - range.start) as usize);
        for (j, chunk) in data.iter().enumerate() {
            let base = (chunks.start + j as u64) * g.chunk;
            let from = range.start.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(chunk.len());
            if from < to {
                out.extend_from_slice(&chunk[from..to]);
            }
        }
        Ok(out)
    }
}
