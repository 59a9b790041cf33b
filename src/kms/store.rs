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

/// Where a passphrase-sealed key store keeps its KDF salt and parameters.
const KDF_FILE: &str = "passphrase.kdf";

/// Argon2id parameters of a passphrase (64 MiB, 3 passes: about a third of a second here,
/// and the memory makes guessing on GPUs costly).
#[derive(Serialize, Deserialize)]
struct KdfParams {
    kdf: String,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
}

/// The master key of a key store sealed under a passphrase: Argon2id of the passphrase with
/// the store's salt (created, with its parameters, on first use).
pub fn master_from_passphrase(dir: &Path, passphrase: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    if passphrase.len() < 12 {
        bail!("the passphrase is too short: use at least 12 characters");
    }
    let path = dir.join(KDF_FILE);
    let params: KdfParams = match fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(SEALED_FILE).exists() {
                bail!(
                    "{} is sealed under a master key file, not a passphrase: pass --master-key",
                    dir.display()
                );
            }
            fs::create_dir_all(dir)?;
            let mut salt = [0u8; 16];
            getrandom::fill(&mut salt).expect("the OS random source works");
            let p = KdfParams {
                kdf: "argon2id".into(),
                m_kib: 64 * 1024,
                t: 3,
                p: 1,
                salt: STANDARD.encode(salt),
            };
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(serde_json::to_string(&p)?.as_bytes())?;
            f.sync_all()?;
            p
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if params.kdf != "argon2id" {
        bail!("{}: unknown KDF {:?}", path.display(), params.kdf);
    }
    let salt = STANDARD.decode(&params.salt)?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, &salt, &mut *key)
        .map_err(|e| anyhow!("deriving the master key: {e}"))?;
    Ok(key)
}

/// Reads a passphrase file (first line), refusing one that others can read.
pub fn read_passphrase_file(path: &Path) -> Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .with_context(|| format!("passphrase file {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "passphrase file {}: mode {:04o} lets others read it; run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    let text = Zeroizing::new(fs::read_to_string(path)?);
    Ok(Zeroizing::new(
        text.lines().next().unwrap_or("").trim_end().to_string(),
    ))
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
                            &Nonce::try_from(&b[..12]).expect("a 12-byte nonce"),
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
                &Nonce::from(nonce),
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
                &Nonce::from(nonce),
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
                &Nonce::try_from(&blob[4..16]).expect("a 12-byte nonce"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passphrase_seals_the_key_store() {
        let dir = tempfile::tempdir().unwrap();
        let pass = b"correct horse battery staple";
        assert!(master_from_passphrase(dir.path(), b"short").is_err());
        let master = master_from_passphrase(dir.path(), pass).unwrap();
        // The same passphrase gives the same key (the salt is kept); another does not.
        assert_eq!(*master_from_passphrase(dir.path(), pass).unwrap(), *master);
        let other = master_from_passphrase(dir.path(), b"wrong horse battery staple").unwrap();
        assert_ne!(*other, *master);
        let mut store = KeyStore::open(dir.path(), &master).unwrap();
        store.create("backup", vec![], vec![], None).unwrap();
        assert!(KeyStore::open(dir.path(), &master).is_ok());
        let e = KeyStore::open(dir.path(), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not open"), "{e}");
        let sealed = fs::read(dir.path().join(SEALED_FILE)).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"backup"));
        // A store sealed under a key file is not silently reopened under a passphrase.
        let keyed = tempfile::tempdir().unwrap();
        KeyStore::open(keyed.path(), &[9; 32])
            .unwrap()
            .create("k", vec![], vec![], None)
            .unwrap();
        let e = master_from_passphrase(keyed.path(), pass)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--master-key"), "{e}");
    }
}
