//! Root key rotation: rewraps each object's data key under a new root key by replacing the
//! object's metadata (a server-side copy onto itself), so no object body is read or written.
//! Objects already under the new key are skipped, which makes an interrupted rotation
//! resumable by running it again.

use std::sync::Arc;

use super::envelope::METADATA_KEY;
use super::keys::KeyProvider;
use super::{Crypt, CryptError};
use crate::store::{
    CopyOptions, GetOptions, ListRequest, ObjectInfo, ObjectStore, StoreError, list_all,
};

/// Tries per object: another writer changing it between its read and its copy makes the
/// copy fail and the object be read again.
const MAX_ATTEMPTS: u32 = 5;

enum Rewrap {
    Unencrypted,
    Current,
    Done,
}

/// Rewraps the envelope of `obj` (as listed or headed) if `to` does not wrap it yet. The
/// copy is of the newest version only while it has the ETag seen, so that the rewrapped
/// envelope never lands on content it does not belong to (a copy of an older version by
/// its id would bring that content back over the newer).
async fn rewrap_one(
    store: &dyn ObjectStore,
    obj: &ObjectInfo,
    from: &Arc<dyn KeyProvider>,
    to: &Arc<dyn KeyProvider>,
    target: &str,
) -> Result<Rewrap, RotateError> {
    let (metadata, etag) = match &obj.metadata {
        Some(m) => (m.clone(), obj.etag.clone()),
        None => {
            let head = store.head(&obj.key, &GetOptions::default()).await?;
            (head.metadata.unwrap_or_default(), head.etag)
        }
    };
    let env =
        match Crypt::envelope_of(&metadata).map_err(|e| RotateError::Object(obj.key.clone(), e))? {
            None => return Ok(Rewrap::Unencrypted),
            Some(env) if env.key_id_hex() == target => return Ok(Rewrap::Current),
            Some(env) => env,
        };
    let dk = from
        .unwrap(&env)
        .await
        .map_err(|e| RotateError::Object(obj.key.clone(), e))?;
    let new_env = to
        .wrap(&dk, &env.file_id)
        .await
        .map_err(|e| RotateError::Object(obj.key.clone(), e))?;
    let mut m = metadata;
    m.insert(METADATA_KEY.to_string(), new_env.encode());
    let opts = CopyOptions {
        metadata: Some(m),
        source_if_match: (!etag.is_empty()).then_some(etag),
        ..Default::default()
    };
    store.copy(&obj.key, &obj.key, &opts).await?;
    Ok(Rewrap::Done)
}

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
        // What the listing said of the object, then, if it changed before its copy, what a
        // head says now.
        let mut seen = obj;
        let mut attempt = 1;
        let outcome = loop {
            match rewrap_one(store, &seen, from, to, &target).await {
                Err(RotateError::Store(StoreError::PreconditionFailed { .. }))
                    if attempt < MAX_ATTEMPTS =>
                {
                    // Written by someone else since it was read: its new envelope is
                    // rewrapped instead (the one read belongs to content that is gone).
                    attempt += 1;
                    seen = store.head(&seen.key, &GetOptions::default()).await?;
                }
                other => break other?,
            }
        };
        match outcome {
            Rewrap::Unencrypted => report.unencrypted += 1,
            Rewrap::Current => report.already_current += 1,
            Rewrap::Done => report.rewrapped += 1,
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
