//! The key envelope: an object's data key wrapped by a root key, kept in the object's user
//! metadata (not its body) so that rotation rewraps without rewriting data
//! (docs/FORMAT.md, section 5).
//!
//! ```text
//! version (1) | kind (1) | root key id (8) | file id (16) | kind-specific wrapped key
//! kind 1, symmetric root key: nonce (12) | AES-256-GCM-SIV(data key) with tag (48)
//! kind 2, X25519 public key: ephemeral public key (32) | AES-256-GCM-SIV(data key) (48)
//! kind 3, local key service: name length (1) | key name | service blob
//! kind 4, AWS KMS: key length (1) | key id, ARN or alias | KMS CiphertextBlob
//! ```
//! Encoded as unpadded base64url in the metadata entry [`METADATA_KEY`].

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::CryptError;
use super::format::FILE_ID_LEN;

pub const METADATA_KEY: &str = "coffer-key";
pub const ENVELOPE_VERSION: u8 = 1;
pub const KIND_SYMMETRIC: u8 = 1;
/// Wrapped for an X25519 public key (see `keypair.rs`).
pub const KIND_X25519: u8 = 2;
/// Wrapped by a key service (see `kms/client.rs`).
pub const KIND_KMS: u8 = 3;
/// Wrapped by AWS KMS (see `kms/aws.rs`).
pub const KIND_AWS_KMS: u8 = 4;
/// Longest envelope accepted, so that hostile metadata cannot make a reader allocate much.
const MAX_ENVELOPE: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub kind: u8,
    pub key_id: [u8; 8],
    pub file_id: [u8; FILE_ID_LEN],
    pub wrapped: Vec<u8>,
}

impl Envelope {
    pub fn key_id_hex(&self) -> String {
        hex::encode(self.key_id)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(26 + self.wrapped.len());
        b.push(ENVELOPE_VERSION);
        b.push(self.kind);
        b.extend_from_slice(&self.key_id);
        b.extend_from_slice(&self.file_id);
        b.extend_from_slice(&self.wrapped);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Envelope, CryptError> {
        if b.len() < 26 {
            return Err(CryptError::BadEnvelope(format!(
                "{} bytes is too short",
                b.len()
            )));
        }
        if b[0] != ENVELOPE_VERSION {
            return Err(CryptError::BadEnvelope(format!("unknown version {}", b[0])));
        }
        Ok(Envelope {
            kind: b[1],
            key_id: b[2..10].try_into().unwrap(),
            file_id: b[10..26].try_into().unwrap(),
            wrapped: b[26..].to_vec(),
        })
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.to_bytes())
    }

    pub fn decode(s: &str) -> Result<Envelope, CryptError> {
        if s.len() > MAX_ENVELOPE {
            return Err(CryptError::BadEnvelope(format!(
                "{} characters is too long",
                s.len()
            )));
        }
        let b = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| CryptError::BadEnvelope(format!("not base64url: {e}")))?;
        Self::parse(&b)
    }

    /// Associated data of a wrap: binds the wrapped key to the envelope's version, kind, root
    /// key id and the object's file id, so it cannot be moved to another object unnoticed.
    pub fn wrap_aad(kind: u8, key_id: &[u8; 8], file_id: &[u8; FILE_ID_LEN]) -> Vec<u8> {
        let mut aad = b"coffer v1 wrap".to_vec();
        aad.push(ENVELOPE_VERSION);
        aad.push(kind);
        aad.extend_from_slice(key_id);
        aad.extend_from_slice(file_id);
        aad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,300}") {
            let _ = Envelope::decode(&s);
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(e) = Envelope::parse(&b) {
                prop_assert_eq!(e.to_bytes(), b);
            }
        }
    }
}
