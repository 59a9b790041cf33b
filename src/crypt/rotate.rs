//! Root key rotation: rewraps each object's data key under a new root key by replacing the
//! object's metadata (a server-side copy onto itself), so no object body is read or written.
//! Objects already under the new key are skipped, which makes an interrupted rotation
//! resumable by running it again.

use std::sync::Arc;

use super::envelope::METADATA_KEY;
use super::keys::KeyProvider;
use super::{Crypt, CryptError};
use crate::store::{CopyOptions, GetOptions, ListRequest, ObjectStore, list_all};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationReport {
    pub objects: u64,
    pub rewrapped: u64,
    pub already_current: u64,
    /// Objects without an envelope (directory markers, objects of other tools).
    pub unencrypted: u64,
}

/// Rewraps every object under `prefix` whose data key is not wrapped by `to`'s writer key.
/// `from` unwraps (it may hold several old keys). `progress(done, total)` after each object.
pub async fn rotate(
    store: &dyn ObjectStore,
    prefix: &str,
    from: &Arc<dyn KeyProvider>,
    to: &Arc<dyn KeyProvider>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<RotationReport, RotateError> {
    let target = to
        .key_ids()
        .into_iter()
        .next()
        .ok_or_else(|| RotateError::Crypt(CryptError::Key("no new key".into())))?;
    let all = list_all(
        store,
        ListRequest {
            prefix: prefix.to_string(),
            ..Default::default()
        },
    )
    .await?;
    let total = all.objects.len() as u64;
    let mut report = RotationReport::default();
    for (i, obj) in all.objects.into_iter().enumerate() {
        report.objects += 1;
        let metadata = match obj.metadata {
            Some(m) => m,
            None => store
                .head(&obj.key, &GetOptions::default())
                .await?
                .metadata
                .unwrap_or_default(),
        };
        match Crypt::envelope_of(&metadata).map_err(|e| RotateError::Object(obj.key.clone(), e))? {
            None => report.unencrypted += 1,
            Some(env) if env.key_id_hex() == target => report.already_current += 1,
            Some(env) => {
                let dk = from
                    .unwrap(&env)
                    .await
                    .map_err(|e| RotateError::Object(obj.key.clone(), e))?;
                let new_env = to
                    .wrap(&dk, &env.file_id)
                    .await
                    .map_err(|e| RotateError::Object(obj.key.clone(), e))?;
                let mut m = metadata.clone();
                m.insert(METADATA_KEY.to_string(), new_env.encode());
                let opts = CopyOptions {
                    metadata: Some(m),
                    ..Default::default()
                };
                store.copy(&obj.key, &obj.key, &opts).await?;
                report.rewrapped += 1;
            }
        }
        progress(i as u64 + 1, total);
    }
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Crypt(CryptError),
    #[error("{0}: {1}")]
    Object(String, CryptError),
}
