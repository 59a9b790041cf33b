//! Public/private root keys (X25519): a host with only the public key wraps data keys for
//! new files but cannot unwrap any, so it can write backups it cannot read.
//!
//! A wrap is HPKE's base mode in miniature: a fresh ephemeral X25519 key per data key, the
//! shared secret run through HKDF-SHA256 (salted with both public keys) into a one-time
//! AES-256-GCM-SIV key, which seals the data key with the envelope's associated data
//! (version, kind, key id, file id). See docs/FORMAT.md, section 5.
//!
//! ```text
//! kind 2 wrapped key: ephemeral public key (32) | AES-256-GCM-SIV(data key) with tag (48)
//! ```

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::CryptError;
use super::content::DataKey;
use super::envelope::{Envelope, KIND_X25519};
use super::format::FILE_ID_LEN;
use super::keys::KeyProvider;

pub const PUBLIC_TAG: &str = "coffer-public-key-v1:";
pub const PRIVATE_TAG: &str = "coffer-private-key-v1:";

/// A key pair, or only its public half (write-only).
pub struct KeyPair {
    public: PublicKey,
    secret: Option<StaticSecret>,
    id: [u8; 8],
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyPair({}, {})",
            self.id_hex(),
            if self.secret.is_some() {
                "private"
            } else {
                "public only"
            }
        )
    }
}

fn key_id(public: &PublicKey) -> [u8; 8] {
    let d = Sha256::new()
        .chain_update(b"coffer key id v1 x25519")
        .chain_update(public.as_bytes())
        .finalize();
    d[..8].try_into().expect("8 bytes")
}

/// The one-time wrapping key of an ephemeral/recipient pair.
fn wrap_cipher(shared: &[u8; 32], eph: &PublicKey, recipient: &PublicKey) -> Aes256GcmSiv {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph.as_bytes());
    salt[32..].copy_from_slice(recipient.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(b"coffer v1 x25519 wrap key", &mut *key)
        .expect("32 bytes is a valid HKDF length");
    Aes256GcmSiv::new_from_slice(&*key).expect("32-byte key")
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).expect("the OS random source works");
        Self::from_secret(StaticSecret::from(*seed))
    }

    fn from_secret(secret: StaticSecret) -> KeyPair {
        let public = PublicKey::from(&secret);
        KeyPair {
            id: key_id(&public),
            public,
            secret: Some(secret),
        }
    }

    pub fn public_only(&self) -> KeyPair {
        KeyPair {
            public: self.public,
            secret: None,
            id: self.id,
        }
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    pub fn can_unwrap(&self) -> bool {
        self.secret.is_some()
    }

    /// Writes the public key (0644) and the private key (0600, refusing to overwrite).
    pub fn write_new(&self, public: &Path, private: &Path) -> Result<(), CryptError> {
        let secret = self
            .secret
            .as_ref()
            .ok_or_else(|| CryptError::Key("no private key to write".into()))?;
        let write = |path: &Path, mode: u32, text: &str| -> Result<(), CryptError> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .map_err(|e| CryptError::Key(format!("{}: {e}", path.display())))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| CryptError::Key(format!("{}: {e}", path.display())))
        };
        let private_text = Zeroizing::new(format!(
            "# coffer private key {}: reads everything written with its public key.\n\
             # Keep it off the machines that only write backups.\n{PRIVATE_TAG}{}\n",
            self.id_hex(),
            STANDARD.encode(secret.to_bytes())
        ));
        write(private, 0o600, &private_text)?;
        write(
            public,
            0o644,
            &format!(
                "# coffer public key {}: writes files only its private key can read.\n{PUBLIC_TAG}{}\n",
                self.id_hex(),
                STANDARD.encode(self.public.as_bytes())
            ),
        )
    }

    /// Parses the key line of a key file whose tag is [`PUBLIC_TAG`] or [`PRIVATE_TAG`]
    /// (`None` for another kind of key file). Private key files must be 0600.
    pub fn read(path: &Path, text: &str) -> Option<Result<KeyPair, CryptError>> {
        let err = |d: String| CryptError::Key(format!("key file {}: {d}", path.display()));
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))?;
        let decode = |b64: &str| -> Result<Zeroizing<[u8; 32]>, CryptError> {
            let raw = Zeroizing::new(
                STANDARD
                    .decode(b64)
                    .map_err(|_| err("not valid base64".into()))?,
            );
            let k: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| err(format!("{} bytes, expected 32", raw.len())))?;
            Ok(Zeroizing::new(k))
        };
        if let Some(b64) = line.strip_prefix(PUBLIC_TAG) {
            return Some(decode(b64).map(|k| {
                let public = PublicKey::from(*k);
                KeyPair {
                    id: key_id(&public),
                    public,
                    secret: None,
                }
            }));
        }
        let b64 = line.strip_prefix(PRIVATE_TAG)?;
        let mode = fs::metadata(path).map(|m| m.permissions().mode()).ok()?;
        if mode & 0o077 != 0 {
            return Some(Err(err(format!(
                "mode {:04o} lets others read it; run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            ))));
        }
        Some(decode(b64).map(|k| Self::from_secret(StaticSecret::from(*k))))
    }
}

#[async_trait]
impl KeyProvider for KeyPair {
    fn describe(&self) -> String {
        format!(
            "key pair {}{}",
            self.id_hex(),
            if self.can_unwrap() {
                ""
            } else {
                " (public key only: write-only)"
            }
        )
    }

    fn key_ids(&self) -> Vec<String> {
        vec![self.id_hex()]
    }

    async fn wrap(
        &self,
        dk: &DataKey,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<Envelope, CryptError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).expect("the OS random source works");
        let eph = StaticSecret::from(*seed);
        let eph_public = PublicKey::from(&eph);
        let shared = Zeroizing::new(eph.diffie_hellman(&self.public).to_bytes());
        let aad = Envelope::wrap_aad(KIND_X25519, &self.id, file_id);
        // The wrapping key is used once, so a fixed nonce is safe (and GCM-SIV would
        // tolerate a repeat anyway).
        let ct = wrap_cipher(&shared, &eph_public, &self.public)
            .encrypt(
                &Nonce::from([0u8; 12]),
                Payload {
                    msg: dk.bytes(),
                    aad: &aad,
                },
            )
            .expect("wrapping 32 bytes cannot fail");
        let mut wrapped = eph_public.as_bytes().to_vec();
        wrapped.extend_from_slice(&ct);
        Ok(Envelope {
            kind: KIND_X25519,
            key_id: self.id,
            file_id: *file_id,
            wrapped,
        })
    }

    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError> {
        if env.kind != KIND_X25519 {
            return Err(CryptError::BadEnvelope(format!(
                "kind {} needs another key provider",
                env.kind
            )));
        }
        if env.key_id != self.id {
            return Err(CryptError::MissingKey(env.key_id_hex()));
        }
        let secret = self
            .secret
            .as_ref()
            .ok_or_else(|| CryptError::WriteOnly(self.id_hex()))?;
        if env.wrapped.len() != 32 + 48 {
            return Err(CryptError::BadEnvelope(
                "wrapped key of the wrong length".into(),
            ));
        }
        let eph: [u8; 32] = env.wrapped[..32].try_into().expect("32 bytes");
        let eph = PublicKey::from(eph);
        let shared = Zeroizing::new(secret.diffie_hellman(&eph).to_bytes());
        let aad = Envelope::wrap_aad(KIND_X25519, &env.key_id, &env.file_id);
        let pt = Zeroizing::new(
            wrap_cipher(&shared, &eph, &self.public)
                .decrypt(
                    &Nonce::from([0u8; 12]),
                    Payload {
                        msg: &env.wrapped[32..],
                        aad: &aad,
                    },
                )
                .map_err(|_| CryptError::UnwrapFailed(env.key_id_hex()))?,
        );
        let key: [u8; 32] = pt
            .as_slice()
            .try_into()
            .map_err(|_| CryptError::BadEnvelope("unwrapped key of the wrong length".into()))?;
        Ok(DataKey::from_bytes(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn public_key_wraps_only_private_key_unwraps() {
        let pair = KeyPair::generate();
        let public = pair.public_only();
        let dk = DataKey::generate();
        let env = public.wrap(&dk, &[7; 16]).await.unwrap();
        assert_eq!(env.key_id_hex(), pair.id_hex());
        assert_eq!(
            public.unwrap(&env).await.unwrap_err(),
            CryptError::WriteOnly(pair.id_hex())
        );
        assert_eq!(pair.unwrap(&env).await.unwrap().bytes(), dk.bytes());
        // Bound to the object: another file id fails.
        let mut moved = env.clone();
        moved.file_id = [8; 16];
        assert!(matches!(
            pair.unwrap(&moved).await,
            Err(CryptError::UnwrapFailed(_))
        ));
        // Each wrap uses a fresh ephemeral key.
        let again = public.wrap(&dk, &[7; 16]).await.unwrap();
        assert_ne!(again.wrapped, env.wrapped);
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let (pubf, privf) = (dir.path().join("k.pub"), dir.path().join("k.priv"));
        let pair = KeyPair::generate();
        pair.write_new(&pubf, &privf).unwrap();
        let read = |p: &Path| KeyPair::read(p, &fs::read_to_string(p).unwrap()).unwrap();
        let public = read(&pubf).unwrap();
        assert!(!public.can_unwrap());
        assert_eq!(public.id_hex(), pair.id_hex());
        let private = read(&privf).unwrap();
        assert!(private.can_unwrap());
        assert_eq!(private.id_hex(), pair.id_hex());
        fs::set_permissions(&privf, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&privf).unwrap_err().to_string().contains("chmod 600"));
        let secret = STANDARD.encode(pair.secret.as_ref().unwrap().to_bytes());
        assert!(!format!("{pair:?}").contains(&secret));
        assert!(!format!("{pair:?}").contains(&secret[..12]));
    }
}
