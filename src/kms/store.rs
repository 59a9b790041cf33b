//! The service's named keys, sealed on disk under the master key (AES-256-GCM-SIV), and the
//! wrapping of data keys with them.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const SEALED_FILE: &str = "keys.sealed";
const STORE_AAD: &[u8] = b"coffer kms key store v1";

#[derive(Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    /// The key material, base64. Lives only in this process and, sealed, on disk.
    material: String,
    /// Seconds since the epoch.
    pub created: u64,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct NamedKey {
    pub versions: Vec<KeyVersion>,
    pub enabled: bool,
    pub encrypt_uids: Vec<u32>,
    pub decrypt_uids: Vec<u32>,
    /// Rotate automatically when the newest version is older than this.
    pub rotate_days: Option<f64>,
}

#[derive(Default, Serialize, Deserialize)]
struct Keys {
    keys: BTreeMap<String, NamedKey>,
}

pub struct KeyStore {
    path: PathBuf,
    master: Aes256GcmSiv,
    keys: Keys,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_material() -> KeyVersion {
    let mut k = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *k).expect("the OS random source works");
    KeyVersion {
        material: STANDARD.encode(*k),
        created: now(),
    }
}

fn wrap_aad(name: &str, version: u32, context: &str) -> Vec<u8> {
    let mut aad = b"coffer kms v1 wrap".to_vec();
    aad.extend_from_slice(&(name.len() as u32).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(context.as_bytes());
    aad
}

impl KeyVersion {
    fn cipher(&self) -> Result<Aes256GcmSiv> {
        let raw = Zeroizing::new(STANDARD.decode(&self.material)?);
        Aes256GcmSiv::new_from_slice(&raw).map_err(|_| anyhow!("bad key material"))
    }
}

impl KeyStore {
    /// Opens (or creates) the key store in `dir`, sealed under `master` (32 bytes).
    pub fn open(dir: &Path, master: &[u8; 32]) -> Result<KeyStore> {
        let master = Aes256GcmSiv::new_from_slice(master).expect("32-byte key");
        let path = dir.join(SEALED_FILE);
        let keys = match fs::read(&path) {
            Ok(b) => {
                if b.len() < 12 {
                    bail!("{}: truncated", path.display());
                }
                let plain = Zeroizing::new(
                    master
                        .decrypt(
                            Nonce::from_slice(&b[..12]),
                            Payload {
                                msg: &b[12..],
                                aad: STORE_AAD,
                            },
                        )
                        .map_err(|_| {
                            anyhow!(
                                "{}: the master key does not open it (wrong key file, or the file was altered)",
                                path.display()
                            )
                        })?,
                );
                serde_json::from_slice(&plain)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Keys::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(KeyStore { path, master, keys })
    }

    fn save(&self) -> Result<()> {
        let plain = Zeroizing::new(serde_json::to_vec(&self.keys)?);
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let ct = self
            .master
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: STORE_AAD,
                },
            )
            .map_err(|_| anyhow!("sealing the key store"))?;
        let tmp = self.path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&nonce)?;
        f.write_all(&ct)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        crate::store::local::durable::sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&NamedKey> {
        self.keys
            .keys
            .get(name)
            .ok_or_else(|| anyhow!("no key named {name:?}"))
    }

    pub fn names(&self) -> Vec<(String, NamedKey)> {
        self.keys
            .keys
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn create(
        &mut self,
        name: &str,
        encrypt_uids: Vec<u32>,
        decrypt_uids: Vec<u32>,
        rotate_days: Option<f64>,
    ) -> Result<()> {
        if name.is_empty() || name.len() > 100 || name.contains(['\n', '#']) {
            bail!("a key name is 1 to 100 characters, without newlines or #");
        }
        if self.keys.keys.contains_key(name) {
            bail!("key {name:?} exists");
        }
        self.keys.keys.insert(
            name.to_string(),
            NamedKey {
                versions: vec![new_material()],
                enabled: true,
                encrypt_uids,
                decrypt_uids,
                rotate_days,
            },
        );
        self.save()
    }

    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        self.keys
            .keys
            .get_mut(name)
            .ok_or_else(|| anyhow!("no key named {name:?}"))?
            .enabled = enabled;
        self.save()
    }

    /// Adds a version; returns its number (from 1).
    pub fn rotate(&mut self, name: &str) -> Result<u32> {
        let k = self
            .keys
            .keys
            .get_mut(name)
            .ok_or_else(|| anyhow!("no key named {name:?}"))?;
        k.versions.push(new_material());
        let v = k.versions.len() as u32;
        self.save()?;
        Ok(v)
    }

    /// Rotates a key whose newest version is older than its rotation period.
    pub fn rotate_if_due(&mut self, name: &str) -> Result<Option<u32>> {
        let k = self.get(name)?;
        let due = k.rotate_days.is_some_and(|days| {
            let newest = k.versions.last().map_or(0, |v| v.created);
            now().saturating_sub(newest) as f64 >= days * 86400.0
        });
        if due {
            self.rotate(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Wraps `dk` with the newest version: `version (4) | nonce (12) | sealed (48)`.
    pub fn wrap(&self, name: &str, dk: &[u8], context: &str) -> Result<(Vec<u8>, u32)> {
        let k = self.get(name)?;
        let version = k.versions.len() as u32;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let ct = k.versions[version as usize - 1]
            .cipher()?
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: dk,
                    aad: &wrap_aad(name, version, context),
                },
            )
            .map_err(|_| anyhow!("wrapping failed"))?;
        let mut blob = version.to_be_bytes().to_vec();
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Ok((blob, version))
    }

    pub fn unwrap(
        &self,
        name: &str,
        blob: &[u8],
        context: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, u32)> {
        let k = self.get(name)?;
        if blob.len() < 16 {
            bail!("blob too short");
        }
        let version = u32::from_be_bytes(blob[..4].try_into().expect("4 bytes"));
        let kv = version
            .checked_sub(1)
            .and_then(|i| k.versions.get(i as usize))
            .ok_or_else(|| anyhow!("key {name:?} has no version {version}"))?;
        let pt = kv
            .cipher()?
            .decrypt(
                Nonce::from_slice(&blob[4..16]),
                Payload {
                    msg: &blob[16..],
                    aad: &wrap_aad(name, version, context),
                },
            )
            .map_err(|_| {
                anyhow!("the blob does not open under key {name:?} (tampered, or another object's)")
            })?;
        Ok((Zeroizing::new(pt), version))
    }
}
