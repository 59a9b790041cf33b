//! Server-side encryption on the local store, behaving as S3's does so that the local store
//! can stand in for S3 in every test.
//!
//! Each object version gets a random 16-byte salt and its own AES-256 key, derived with
//! HKDF-SHA256 from the customer's key (SSE-C) or the store's key (SSE-S3); the stored bytes
//! are AES-256-CTR of the data under it (the block checksums cover the stored bytes, so
//! integrity is unchanged, and CTR keeps ranged reads cheap). For SSE-C only a salted
//! HMAC-SHA256 of the customer key is kept, to refuse a wrong key; the key itself is never
//! written anywhere.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::record::SseRecord;
use crate::store::{Sse, StoreError, StoreResult};

type Aes256Ctr = ctr::Ctr128BE<Aes256>;

const MODE_CUSTOMER: &str = "customer";
const MODE_STORE: &str = "store";

/// The key of one object version's stored bytes.
pub struct ObjectKey(Zeroizing<[u8; 32]>);

impl ObjectKey {
    /// Encrypts or decrypts `data`, which starts at byte `offset` of the object.
    pub fn apply(&self, offset: u64, data: &mut [u8]) {
        let mut c = Aes256Ctr::new((&*self.0).into(), &[0u8; 16].into());
        c.seek(offset);
        c.apply_keystream(data);
    }
}

fn derive(root: &[u8; 32], salt: &[u8], mode: &str) -> ObjectKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), root);
    let mut k = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(&[b"coffer local sse v1 ", mode.as_bytes()], &mut *k)
        .expect("32 bytes is a valid HKDF length");
    ObjectKey(k)
}

fn key_hmac(customer: &[u8; 32], salt: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(salt).expect("HMAC takes any key length");
    m.update(customer);
    m.finalize().into_bytes().into()
}

/// The record and key for a new version written with `sse`; `None` without SSE.
pub fn for_put(
    key: &str,
    sse: &Sse,
    store_key: Option<&[u8; 32]>,
) -> StoreResult<Option<(SseRecord, ObjectKey)>> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the OS random source works");
    match sse {
        Sse::None => Ok(None),
        Sse::Customer(k) => Ok(Some((
            SseRecord {
                mode: MODE_CUSTOMER.into(),
                salt: hex::encode(salt),
                key_hmac: Some(hex::encode(key_hmac(k.bytes(), &salt))),
            },
            derive(k.bytes(), &salt, MODE_CUSTOMER),
        ))),
        Sse::S3 => {
            let root = store_key.ok_or_else(|| {
                StoreError::invalid(key, "SSE-S3 needs a store key, and this store has none")
            })?;
            Ok(Some((
                SseRecord {
                    mode: MODE_STORE.into(),
                    salt: hex::encode(salt),
                    key_hmac: None,
                },
                derive(root, &salt, MODE_STORE),
            )))
        }
        Sse::Kms { .. } => Err(StoreError::invalid(
            key,
            "SSE-KMS needs a key service; the local store offers SSE-S3 and SSE-C",
        )),
    }
}

/// The key to read a version with, checking an SSE-C request's key against the version's.
pub fn for_get(
    key: &str,
    rec: Option<&SseRecord>,
    sse: &Sse,
    store_key: Option<&[u8; 32]>,
) -> StoreResult<Option<ObjectKey>> {
    let Some(rec) = rec else { return Ok(None) };
    let salt = hex::decode(&rec.salt)
        .map_err(|_| StoreError::corrupt(key, "bad SSE salt in the record"))?;
    match rec.mode.as_str() {
        MODE_CUSTOMER => {
            let Sse::Customer(k) = sse else {
                return Err(StoreError::WrongKey { key: key.into() });
            };
            let want = rec
                .key_hmac
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| StoreError::corrupt(key, "SSE-C record without a key HMAC"))?;
            if !bool::from(key_hmac(k.bytes(), &salt).ct_eq(&want)) {
                return Err(StoreError::WrongKey { key: key.into() });
            }
            Ok(Some(derive(k.bytes(), &salt, MODE_CUSTOMER)))
        }
        MODE_STORE => {
            let root = store_key.ok_or_else(|| StoreError::AccessDenied {
                key: key.into(),
                detail: "object is SSE-S3 encrypted and the store key is not available".into(),
            })?;
            Ok(Some(derive(root, &salt, MODE_STORE)))
        }
        other => Err(StoreError::corrupt(
            key,
            format!("unknown SSE mode {other:?}"),
        )),
    }
}

/// Whether a version encrypted as `rec` can be shared (hard-linked) by a copy written with
/// `sse`: same mode, and for SSE-C the same customer key.
pub fn same_encryption(rec: Option<&SseRecord>, sse: &Sse) -> bool {
    match (rec, sse) {
        (None, Sse::None) => true,
        (Some(r), Sse::S3) => r.mode == MODE_STORE,
        (Some(r), Sse::Customer(k)) => {
            r.mode == MODE_CUSTOMER
                && hex::decode(&r.salt)
                    .ok()
                    .is_some_and(|salt| Some(hex::encode(key_hmac(k.bytes(), &salt))) == r.key_hmac)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SseCustomerKey;

    #[test]
    fn ranges_decrypt_on_their_own() {
        let sse = Sse::Customer(SseCustomerKey::new([9; 32]));
        let (rec, k) = for_put("k", &sse, None).unwrap().unwrap();
        let plain: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut stored = plain.clone();
        k.apply(0, &mut stored[..3000]);
        k.apply(3000, &mut stored[3000..]);
        assert_ne!(stored, plain);
        let k2 = for_get("k", Some(&rec), &sse, None).unwrap().unwrap();
        let mut part = stored[4321..7777].to_vec();
        k2.apply(4321, &mut part);
        assert_eq!(part, &plain[4321..7777]);
        let wrong = Sse::Customer(SseCustomerKey::new([8; 32]));
        assert!(matches!(
            for_get("k", Some(&rec), &wrong, None),
            Err(StoreError::WrongKey { .. })
        ));
        assert!(matches!(
            for_get("k", Some(&rec), &Sse::None, None),
            Err(StoreError::WrongKey { .. })
        ));
        assert!(same_encryption(Some(&rec), &sse));
        assert!(!same_encryption(Some(&rec), &wrong));
    }
}
