//! A volume: a store (SOURCE), its small plaintext config, and what it takes to open it.
//!
//! A local store at PATH keeps `PATH/coffer.toml` (format version, chunk size, encryption
//! mode, the root key ids it expects, replica directories, versioning) and `PATH/coffer.lock`,
//! which a mount holds exclusively.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::crypt::keys::{KeyProvider, KeyRing, RootKey};
use crate::crypt::{Crypt, Mode};
use crate::store::ObjectStore;
use crate::store::local::{LocalStore, LocalStoreConfig};

pub const CONFIG_FILE: &str = "coffer.toml";
pub const LOCK_FILE: &str = "coffer.lock";
pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Version of this config and of the object format.
    pub format: u32,
    pub store_id: String,
    /// log2 of the chunk size of encrypted objects.
    pub chunk_shift: u8,
    pub encryption: EncryptionConfig,
    pub local: Option<LocalSection>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// "client" (envelope encryption, the default) or "none".
    pub mode: String,
    /// Root key ids that wrapped data keys of this store (for the "needs key" message).
    #[serde(default)]
    pub key_ids: Vec<String>,
    #[serde(default)]
    pub name_encryption: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    pub replicas: Vec<PathBuf>,
    pub versioning: bool,
    /// Refuse writes without server-side encryption (a bucket policy's equivalent).
    #[serde(default)]
    pub require_encryption: bool,
}

/// The store-held SSE-S3 key of a local store: in the store directory, apart from the
/// replicas, mode 0600.
pub const SSE_KEY_FILE: &str = "sse-s3.key";

/// Options of `coffer init` for a local store.
pub struct InitLocal {
    pub path: PathBuf,
    pub replicas: usize,
    pub replica_dirs: Vec<PathBuf>,
    pub versioning: bool,
    pub chunk_shift: u8,
    pub encrypt: bool,
    pub key_id: Option<String>,
}

impl VolumeConfig {
    pub fn read(path: &Path) -> Result<VolumeConfig> {
        let file = path.join(CONFIG_FILE);
        let text = fs::read_to_string(&file).with_context(|| {
            format!(
                "{} is not a coffer store (no {CONFIG_FILE}); create one with `coffer init`",
                path.display()
            )
        })?;
        let cfg: VolumeConfig =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        if cfg.format != FORMAT {
            bail!(
                "{}: format {} is not supported by this coffer (it reads format {FORMAT})",
                file.display(),
                cfg.format
            );
        }
        Ok(cfg)
    }

    fn write_new(&self, path: &Path) -> Result<()> {
        let file = path.join(CONFIG_FILE);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&file)
            .with_context(|| format!("creating {}", file.display()))?;
        f.write_all(toml::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        crate::store::local::durable::sync_dir(path)?;
        Ok(())
    }

    /// How to open the local store at `path` (whose config this is).
    pub fn local_store_config(&self, path: &Path) -> Result<LocalStoreConfig> {
        let local = self
            .local
            .as_ref()
            .ok_or_else(|| anyhow!("not a local store"))?;
        let key_file = path.join(SSE_KEY_FILE);
        let sse_store_key = match fs::read(&key_file) {
            Ok(b) => {
                let k: [u8; 32] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| anyhow!("{}: not a 32-byte key", key_file.display()))?;
                Some(crate::store::SseCustomerKey::new(k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => bail!("{}: {e}", key_file.display()),
        };
        Ok(LocalStoreConfig {
            store_id: self.store_id.clone(),
            replicas: local.replicas.clone(),
            versioning: local.versioning,
            sse_store_key,
            require_encryption: local.require_encryption,
        })
    }
}

/// Creates a local store: its directory, config and replica directories.
pub fn init_local(o: &InitLocal) -> Result<VolumeConfig> {
    if o.path.join(CONFIG_FILE).exists() {
        bail!("{} is already a coffer store", o.path.display());
    }
    if !(crate::crypt::format::MIN_CHUNK_SHIFT..=crate::crypt::format::MAX_CHUNK_SHIFT)
        .contains(&o.chunk_shift)
    {
        bail!("chunk size must be a power of two from 4 KiB to 16 MiB");
    }
    fs::create_dir_all(&o.path).with_context(|| format!("creating {}", o.path.display()))?;
    let path = o.path.canonicalize()?;
    let replicas: Vec<PathBuf> = if o.replica_dirs.is_empty() {
        if o.replicas == 0 {
            bail!("a store needs at least one replica");
        }
        (0..o.replicas)
            .map(|i| path.join(format!("replica-{i}")))
            .collect()
    } else {
        if o.replica_dirs.len() != o.replicas {
            bail!(
                "--replicas {} but {} --replica-dir given: give one directory per replica",
                o.replicas,
                o.replica_dirs.len()
            );
        }
        o.replica_dirs
            .iter()
            .map(|d| {
                fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Ok(d.canonicalize()?)
            })
            .collect::<Result<_>>()?
    };
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).expect("the OS random source works");
    let cfg = VolumeConfig {
        format: FORMAT,
        store_id: hex::encode(id),
        chunk_shift: o.chunk_shift,
        encryption: EncryptionConfig {
            mode: if o.encrypt { "client" } else { "none" }.into(),
            key_ids: o.key_id.iter().cloned().collect(),
            name_encryption: false,
        },
        local: Some(LocalSection {
            replicas,
            versioning: o.versioning,
            require_encryption: false,
        }),
    };
    // The SSE-S3 store key: random, kept beside the config and apart from the replicas.
    let mut sse_key = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *sse_key).expect("the OS random source works");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path.join(SSE_KEY_FILE))?;
        f.write_all(&*sse_key)?;
        f.sync_all()?;
    }
    LocalStore::init(&cfg.local_store_config(&path)?)?;
    cfg.write_new(&path)?;
    Ok(cfg)
}

/// A held store lock (released on drop).
pub struct StoreLock(#[allow(dead_code)] File);

/// Takes the store's lock, exclusively (a mount, a repair) or shared.
pub fn lock_store(path: &Path, exclusive: bool) -> Result<StoreLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path.join(LOCK_FILE))
        .with_context(|| format!("opening {}", path.join(LOCK_FILE).display()))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        bail!(
            "{} is in use by another coffer process (mounted, or a scrub is running)",
            path.display()
        );
    }
    Ok(StoreLock(file))
}

/// Loads root key files into a key ring (the first wraps new data keys).
pub fn load_keys(files: &[PathBuf]) -> Result<KeyRing> {
    let keys = files
        .iter()
        .map(|f| RootKey::read(f).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<_>>>()?;
    KeyRing::new(keys).map_err(|e| anyhow!("{e}"))
}

/// An opened volume.
pub struct Volume {
    pub config: VolumeConfig,
    pub store: Arc<dyn ObjectStore>,
    pub local: Option<LocalStore>,
    pub crypt: Crypt,
}

/// Opens a local store with the given key files, checking that the keys it needs are there.
pub fn open_local(path: &Path, key_files: &[PathBuf]) -> Result<Volume> {
    let config = VolumeConfig::read(path)?;
    let local = LocalStore::open(&config.local_store_config(path)?).map_err(|e| anyhow!("{e}"))?;
    let crypt = match config.encryption.mode.as_str() {
        "client" => {
            if key_files.is_empty() {
                bail!(
                    "this store is encrypted with root key {}: pass --key FILE",
                    config.encryption.key_ids.join(" or ")
                );
            }
            let ring = load_keys(key_files)?;
            let ids = ring.key_ids();
            if !config.encryption.key_ids.is_empty()
                && !config.encryption.key_ids.iter().any(|k| ids.contains(k))
            {
                bail!(
                    "this store needs key {}, but the keys given are {}: pass --key with the right key file",
                    config.encryption.key_ids.join(" or "),
                    ids.join(", ")
                );
            }
            Crypt::new(Mode::Client(Arc::new(ring)), config.chunk_shift)
        }
        "none" => Crypt::new(Mode::None, config.chunk_shift),
        other => bail!(
            "unknown encryption mode {other:?} in {}",
            path.join(CONFIG_FILE).display()
        ),
    };
    Ok(Volume {
        store: Arc::new(local.clone()),
        local: Some(local),
        config,
        crypt,
    })
}

/// Adds the key that will wrap new data keys to the store's list of expected key ids, so
/// that later mounts name every key the store's objects may need.
pub fn record_writer_key(path: &Path, vol: &Volume) -> Result<()> {
    let Some(provider) = vol.crypt.provider() else {
        return Ok(());
    };
    let Some(writer) = provider.key_ids().into_iter().next() else {
        return Ok(());
    };
    if vol.config.encryption.key_ids.contains(&writer) {
        return Ok(());
    }
    let mut cfg = vol.config.clone();
    cfg.encryption.key_ids.push(writer);
    write_config(path, &cfg)
}

/// Replaces a store's config file atomically.
pub fn write_config(path: &Path, cfg: &VolumeConfig) -> Result<()> {
    let file = path.join(CONFIG_FILE);
    let tmp = path.join(format!("{CONFIG_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(toml::to_string_pretty(cfg)?.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &file)?;
    crate::store::local::durable::sync_dir(path)?;
    Ok(())
}

/// Where `coffer mount MOUNTPOINT` keeps its default store and key.
pub fn default_paths() -> Result<(PathBuf, PathBuf)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let xdg = |var: &str, fallback: &str| -> Result<PathBuf> {
        match std::env::var_os(var).filter(|v| !v.is_empty()) {
            Some(v) => Ok(PathBuf::from(v)),
            None => Ok(home
                .clone()
                .ok_or_else(|| anyhow!("neither ${var} nor $HOME is set"))?
                .join(fallback)),
        }
    };
    Ok((
        xdg("XDG_DATA_HOME", ".local/share")?.join("coffer/default"),
        xdg("XDG_CONFIG_HOME", ".config")?.join("coffer/root.key"),
    ))
}
