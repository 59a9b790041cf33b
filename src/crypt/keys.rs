//! Root keys and the providers that wrap and unwrap data keys with them.
//!
//! A symmetric root key lives in a key file (`coffer key new FILE`): 256 random bits in a
//! one-line text format, mode 0600, refused when group- or world-accessible. Several keys can
//! be loaded as a key ring: the first wraps new data keys, all of them unwrap.

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
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CryptError;
use super::content::DataKey;
use super::envelope::{Envelope, KIND_SYMMETRIC};
use super::format::FILE_ID_LEN;

const KEY_FILE_TAG: &str = "coffer-root-key-v1:";

/// Wraps and unwraps data keys. Implementations: a symmetric key ring; later a key pair and
/// key services.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Short description for logs, naming key ids only.
    fn describe(&self) -> String;
    /// The root key ids this provider can unwrap with.
    fn key_ids(&self) -> Vec<String>;
    async fn wrap(&self, dk: &DataKey, file_id: &[u8; FILE_ID_LEN])
    -> Result<Envelope, CryptError>;
    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError>;
    /// A new data key for an object and its envelope. Locally generated and wrapped by
    /// default; a key service generates it itself (GenerateDataKey).
    async fn generate(
        &self,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<(DataKey, Envelope), CryptError> {
        let dk = DataKey::generate();
        let env = self.wrap(&dk, file_id).await?;
        Ok((dk, env))
    }
}

/// A symmetric root key. Zeroized on drop, never printed.
pub struct RootKey {
    id: [u8; 8],
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootKey({})", self.id_hex())
    }
}

impl RootKey {
    pub fn generate() -> RootKey {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *k).expect("the OS random source works");
        Self::from_bytes(k)
    }

    pub fn from_bytes(key: Zeroizing<[u8; 32]>) -> RootKey {
        let digest = Sha256::new()
            .chain_update(b"coffer key id v1")
            .chain_update(*key)
            .finalize();
        RootKey {
            id: digest[..8].try_into().unwrap(),
            key,
        }
    }

    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// Writes the key to a new file with mode 0600 (refusing to overwrite one).
    pub fn write_new(&self, path: &Path) -> Result<(), CryptError> {
        let text = Zeroizing::new(format!(
            "# coffer root key {}. Whoever holds this file can read the data it protects;\n\
             # losing it loses that data. Keep a copy somewhere safe.\n{KEY_FILE_TAG}{}\n",
            self.id_hex(),
            STANDARD.encode(*self.key)
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CryptError::Key(format!("{}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| CryptError::Key(format!("{}: {e}", path.display())))
    }

    /// Reads a key file, refusing one that group or others can access.
    pub fn read(path: &Path) -> Result<RootKey, CryptError> {
        let err = |d: String| CryptError::Key(format!("key file {}: {d}", path.display()));
        let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {:04o} lets others read it; run `chmod 600 {}`",
                mode & 0o7777,
                path.display()
            )));
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| err("empty".into()))?;
        let b64 = line.strip_prefix(KEY_FILE_TAG).ok_or_else(|| {
            err(format!(
                "not a coffer root key (expected a {KEY_FILE_TAG} line)"
            ))
        })?;
        let raw = Zeroizing::new(
            STANDARD
                .decode(b64)
                .map_err(|_| err("not valid base64".into()))?,
        );
        let key: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| err(format!("{} bytes, expected 32", raw.len())))?;
        Ok(RootKey::from_bytes(Zeroizing::new(key)))
    }

    /// The key itself, for the key service's master key (never logged).
    pub fn material(&self) -> &[u8; 32] {
        &self.key
    }

    fn cipher(&self) -> Aes256GcmSiv {
        Aes256GcmSiv::new_from_slice(&*self.key).expect("32-byte key")
    }
}

/// Symmetric root keys: the first wraps, all unwrap.
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<RootKey>,
}

impl KeyRing {
    pub fn new(keys: Vec<RootKey>) -> Result<KeyRing, CryptError> {
        if keys.is_empty() {
            return Err(CryptError::Key("a key ring needs at least one key".into()));
        }
        Ok(KeyRing { keys })
    }

    pub fn writer_id(&self) -> String {
        self.keys[0].id_hex()
    }
}

#[async_trait]
impl KeyProvider for KeyRing {
    fn describe(&self) -> String {
        format!("key ring [{}]", self.key_ids().join(", "))
    }

    fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(RootKey::id_hex).collect()
    }

    async fn wrap(
        &self,
        dk: &DataKey,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<Envelope, CryptError> {
        let root = &self.keys[0];
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let aad = Envelope::wrap_aad(KIND_SYMMETRIC, &root.id, file_id);
        let ct = root
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: dk.bytes(),
                    aad: &aad,
                },
            )
            .expect("wrapping 32 bytes cannot fail");
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ct);
        Ok(Envelope {
            kind: KIND_SYMMETRIC,
            key_id: root.id,
            file_id: *file_id,
            wrapped,
        })
    }

    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError> {
        if env.kind != KIND_SYMMETRIC {
            return Err(CryptError::BadEnvelope(format!(
                "kind {} needs another key provider",
                env.kind
            )));
        }
        let root = self
            .keys
            .iter()
            .find(|k| k.id == env.key_id)
            .ok_or_else(|| CryptError::MissingKey(env.key_id_hex()))?;
        if env.wrapped.len() != 12 + 48 {
            return Err(CryptError::BadEnvelope(
                "wrapped key of the wrong length".into(),
            ));
        }
        let aad = Envelope::wrap_aad(KIND_SYMMETRIC, &env.key_id, &env.file_id);
        let pt = Zeroizing::new(
            root.cipher()
                .decrypt(
                    &Nonce::try_from(&env.wrapped[..12]).expect("a 12-byte nonce"),
                    Payload {
                        msg: &env.wrapped[12..],
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

/// Several providers as one: the first wraps new data keys; an envelope is unwrapped by the
/// provider that holds its root key (symmetric keys and key pairs may be mixed).
pub struct ProviderChain(pub Vec<std::sync::Arc<dyn KeyProvider>>);

#[async_trait]
impl KeyProvider for ProviderChain {
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn key_ids(&self) -> Vec<String> {
        self.0.iter().flat_map(|p| p.key_ids()).collect()
    }

    async fn wrap(
        &self,
        dk: &DataKey,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<Envelope, CryptError> {
        self.0[0].wrap(dk, file_id).await
    }

    async fn generate(
        &self,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<(DataKey, Envelope), CryptError> {
        self.0[0].generate(file_id).await
    }

    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError> {
        let id = env.key_id_hex();
        match self.0.iter().find(|p| p.key_ids().contains(&id)) {
            Some(p) => p.unwrap(env).await,
            None => Err(CryptError::MissingKey(id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = RootKey::generate();
        k.write_new(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = RootKey::read(&p).unwrap();
        assert_eq!(back.id(), k.id());
        assert!(k.write_new(&p).is_err(), "overwrote an existing key file");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = RootKey::read(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!format!("{k:?}").contains(&STANDARD.encode(*k.key)));
    }

    #[tokio::test]
    async fn ring_wraps_with_first_and_unwraps_with_any() {
        let a = RootKey::generate();
        let b = RootKey::generate();
        let b_id = b.id_hex();
        let only_a = KeyRing::new(vec![RootKey::from_bytes(a.key.clone())]).unwrap();
        let ring = KeyRing::new(vec![b, a]).unwrap();
        let dk = DataKey::generate();
        let env_a = only_a.wrap(&dk, &[1; 16]).await.unwrap();
        assert_eq!(ring.unwrap(&env_a).await.unwrap().bytes(), dk.bytes());
        let env_b = ring.wrap(&dk, &[1; 16]).await.unwrap();
        assert_eq!(env_b.key_id_hex(), b_id);
        assert_eq!(
            only_a.unwrap(&env_b).await.unwrap_err(),
            CryptError::MissingKey(b_id)
        );
        // Moving the envelope to another object (file id) fails.
        let mut moved = env_a.clone();
        moved.file_id = [2; 16];
        assert!(matches!(
            ring.unwrap(&moved).await,
            Err(CryptError::UnwrapFailed(_))
        ));
    }
}
