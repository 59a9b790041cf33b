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

use crate::crypt::keypair::KeyPair;
use crate::crypt::keys::{KeyProvider, KeyRing, ProviderChain, RootKey};
use crate::crypt::{Crypt, Mode};
use crate::store::local::layout::VersionLayout;
use crate::store::local::{LocalStore, LocalStoreConfig};
use crate::store::names::{NameCipherStore, NameKey};
use crate::store::s3::{S3Location, S3Options, S3Store};
use crate::store::sse_history::SseKeyHistory;
use crate::store::{GetOptions, ObjectStore, Sse, SseCustomerKey, StoreError};

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
    /// Whether object keys are encrypted ([`crate::store::names`]).
    #[serde(default)]
    pub name_encryption: bool,
    /// The name key's envelope (wrapped by a root key, as a data key is), with name
    /// encryption on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_key: Option<String>,
    /// Server-side encryption the store asks of its backend on every write: "none",
    /// "sse-c" (a customer key given at mount), "sse-s3" or "sse-kms".
    #[serde(default = "default_sse")]
    pub server_side: String,
    #[serde(default)]
    pub sse_kms_key_id: Option<String>,
}

fn default_sse() -> String {
    "none".into()
}

/// Server-side encryption modes a store may ask for.
pub const SSE_MODES: [&str; 4] = ["none", "sse-c", "sse-s3", "sse-kms"];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    pub replicas: Vec<PathBuf>,
    pub versioning: bool,
    /// Refuse writes without server-side encryption (a bucket policy's equivalent).
    #[serde(default)]
    pub require_encryption: bool,
    /// Where the replicas keep a key's version files: `layout = "flat"` in stores made
    /// since stop 30. A store made before has no such line, which reads as the nested
    /// layout, and keeps it (the line is not written for it): an older coffer, which
    /// knows no such field, refuses a flat store instead of finding it empty.
    #[serde(default = "nested_layout", skip_serializing_if = "is_nested")]
    pub layout: VersionLayout,
}

fn nested_layout() -> VersionLayout {
    VersionLayout::Nested
}

fn is_nested(l: &VersionLayout) -> bool {
    *l == VersionLayout::Nested
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
    /// The name key's envelope ([`new_name_key`]), to encrypt names.
    pub name_key: Option<String>,
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
        Self::parse(&text, &file.display().to_string())
    }

    /// Parses a store's config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<VolumeConfig> {
        let cfg: VolumeConfig = toml::from_str(text).map_err(|e| anyhow!("{origin}: {e}"))?;
        if cfg.format != FORMAT {
            bail!(
                "{origin}: format {} is not supported by this coffer (it reads format {FORMAT})",
                cfg.format
            );
        }
        // Found by fuzzing: a hostile chunk size must not reach the size arithmetic.
        let shifts = crate::crypt::format::MIN_CHUNK_SHIFT..=crate::crypt::format::MAX_CHUNK_SHIFT;
        if !shifts.contains(&cfg.chunk_shift) {
            bail!(
                "{origin}: chunk_shift {} is outside {}..={}",
                cfg.chunk_shift,
                shifts.start(),
                shifts.end()
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

    /// How stored sizes map to file sizes in this store.
    pub fn geometry(&self) -> crate::crypt::format::Geometry {
        if self.encryption.mode == "client" {
            crate::crypt::format::Geometry::encrypted(self.chunk_shift)
        } else {
            crate::crypt::format::Geometry::plain(self.chunk_shift)
        }
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
            layout: local.layout,
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
    let cfg = VolumeConfig {
        format: FORMAT,
        store_id: new_store_id(),
        chunk_shift: o.chunk_shift,
        encryption: EncryptionConfig {
            mode: if o.encrypt { "client" } else { "none" }.into(),
            key_ids: o.key_id.iter().cloned().collect(),
            name_encryption: o.name_key.is_some(),
            name_key: o.name_key.clone(),
            server_side: default_sse(),
            sse_kms_key_id: None,
        },
        local: Some(LocalSection {
            replicas,
            versioning: o.versioning,
            require_encryption: false,
            layout: VersionLayout::Flat,
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

/// How long taking a busy store's lock is retried.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
    // A mount that was just unmounted may still be finishing its last commits: give it a
    // few seconds before calling the store busy.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    // SAFETY: flock on a file descriptor we own.
    while unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        if std::time::Instant::now() >= deadline {
            bail!(
                "{} is in use by another coffer process (mounted, or a scrub is running)",
                path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(StoreLock(file))
}

/// Reads one key file of any kind: a symmetric root key, a public key (write-only) or a
/// private key; or names a key of a key service (`kms:SOCKET#NAME`).
pub fn load_key_file(file: &Path) -> Result<Arc<dyn KeyProvider>> {
    if let Some(kms) = crate::kms::client::KmsProvider::parse(&file.to_string_lossy()) {
        return Ok(Arc::new(kms.map_err(|e| anyhow!("{e}"))?));
    }
    if let Some(aws) = crate::kms::aws::AwsKmsProvider::parse(&file.to_string_lossy()) {
        return Ok(Arc::new(aws.map_err(|e| anyhow!("{e}"))?));
    }
    let text = zeroize::Zeroizing::new(
        fs::read_to_string(file).with_context(|| format!("key file {}", file.display()))?,
    );
    if let Some(pair) = KeyPair::read(file, &text) {
        return Ok(Arc::new(pair.map_err(|e| anyhow!("{e}"))?));
    }
    Ok(Arc::new(KeyRing::new(vec![
        RootKey::read(file).map_err(|e| anyhow!("{e}"))?,
    ])?))
}

/// Loads root key files as one provider: the first wraps new data keys, all unwrap.
pub fn load_keys(files: &[PathBuf]) -> Result<Arc<dyn KeyProvider>> {
    if files.is_empty() {
        bail!("no key file given");
    }
    let mut providers = files
        .iter()
        .map(|f| load_key_file(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(if providers.len() == 1 {
        providers.remove(0)
    } else {
        Arc::new(ProviderChain(providers))
    })
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
    let crypt = crypt_for(
        &config,
        key_files,
        &path.join(CONFIG_FILE).display().to_string(),
    )?;
    Ok(Volume {
        store: Arc::new(local.clone()),
        local: Some(local),
        config,
        crypt,
    })
}

/// The client-side encryption of a store, with its keys loaded and checked.
fn crypt_for(config: &VolumeConfig, key_files: &[PathBuf], origin: &str) -> Result<Crypt> {
    Ok(match config.encryption.mode.as_str() {
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
            Crypt::new(Mode::Client(ring), config.chunk_shift)
        }
        "none" => Crypt::new(Mode::None, config.chunk_shift),
        other => bail!("unknown encryption mode {other:?} in {origin}"),
    })
}

/// Where an S3 store keeps its volume config, under its prefix. The filesystem hides the
/// directory ([`RESERVED_NAME`]).
pub const S3_CONFIG_KEY: &str = ".coffer/volume.toml";
/// The top-level name a mount never shows nor lets anyone create.
pub const RESERVED_NAME: &str = ".coffer";

/// Options of `coffer init` for an S3 store.
pub struct InitS3 {
    pub location: S3Location,
    pub s3: S3Options,
    pub chunk_shift: u8,
    pub encrypt: bool,
    pub key_id: Option<String>,
    pub name_key: Option<String>,
    pub server_side: String,
    pub sse_kms_key_id: Option<String>,
}

fn new_store_id() -> String {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).expect("the OS random source works");
    hex::encode(id)
}

/// Creates an S3 store: writes its volume config under the prefix.
pub async fn init_s3(o: &InitS3) -> Result<VolumeConfig> {
    if !SSE_MODES.contains(&o.server_side.as_str()) {
        bail!(
            "unknown server-side encryption {:?} (one of {})",
            o.server_side,
            SSE_MODES.join(", ")
        );
    }
    let store = S3Store::connect(o.location.clone(), &o.s3).await?;
    store
        .check_bucket()
        .await
        .with_context(|| format!("bucket {}", o.location.bucket))?;
    match store.head(S3_CONFIG_KEY, &GetOptions::default()).await {
        Ok(_) => bail!("{} is already a coffer store", o.location),
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let cfg = VolumeConfig {
        format: FORMAT,
        store_id: new_store_id(),
        chunk_shift: o.chunk_shift,
        encryption: EncryptionConfig {
            mode: if o.encrypt { "client" } else { "none" }.into(),
            key_ids: o.key_id.iter().cloned().collect(),
            name_encryption: o.name_key.is_some(),
            name_key: o.name_key.clone(),
            server_side: o.server_side.clone(),
            sse_kms_key_id: o.sse_kms_key_id.clone(),
        },
        local: None,
    };
    put_s3_config(&store, &cfg).await?;
    Ok(cfg)
}

async fn put_s3_config(store: &S3Store, cfg: &VolumeConfig) -> Result<()> {
    let text = toml::to_string_pretty(cfg)?;
    store
        .put(S3_CONFIG_KEY, bytes::Bytes::from(text), &Default::default())
        .await
        .with_context(|| format!("writing the volume config of {}", store.location()))?;
    Ok(())
}

/// Reads the volume config of an S3 store.
pub async fn read_s3_config(store: &S3Store) -> Result<VolumeConfig> {
    let got = match store.get(S3_CONFIG_KEY, None, &GetOptions::default()).await {
        Ok(g) => g,
        Err(StoreError::NotFound { .. }) => bail!(
            "{} is not a coffer store (no {S3_CONFIG_KEY}); create one with `coffer init {}`",
            store.location(),
            store.location()
        ),
        Err(e) => return Err(e.into()),
    };
    let origin = format!("{}{S3_CONFIG_KEY}", store.location());
    let text = std::str::from_utf8(&got.body).map_err(|_| anyhow!("{origin}: not UTF-8"))?;
    VolumeConfig::parse(text, &origin)
}

/// Opens an S3 store with the given key files.
pub async fn open_s3(
    location: &S3Location,
    s3: &S3Options,
    key_files: &[PathBuf],
) -> Result<(Volume, S3Store)> {
    let store = S3Store::connect(location.clone(), s3).await?;
    let config = read_s3_config(&store).await?;
    let crypt = crypt_for(&config, key_files, &format!("{location}{S3_CONFIG_KEY}"))?;
    Ok((
        Volume {
            store: Arc::new(store.clone()),
            local: None,
            config,
            crypt,
        },
        store,
    ))
}

/// Adds the writer key's id to an S3 store's config (as [`record_writer_key`] does locally).
pub async fn record_writer_key_s3(store: &S3Store, vol: &Volume) -> Result<()> {
    let Some(writer) = vol
        .crypt
        .provider()
        .and_then(|p| p.key_ids().into_iter().next())
    else {
        return Ok(());
    };
    if vol.config.encryption.key_ids.contains(&writer) {
        return Ok(());
    }
    let mut cfg = vol.config.clone();
    cfg.encryption.key_ids.push(writer);
    put_s3_config(store, &cfg).await
}

/// Replaces an S3 store's config (after a key rotation).
pub async fn write_s3_config(store: &S3Store, cfg: &VolumeConfig) -> Result<()> {
    put_s3_config(store, cfg).await
}

/// Reads an SSE-C key file: one base64 key of 32 bytes per line, the first for writes and
/// the others for reading older objects (a key history, as s3fs keeps). Refused when others
/// can read it.
pub fn read_sse_c_keys(file: &Path) -> Result<Vec<SseCustomerKey>> {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(file).with_context(|| format!("SSE-C key file {}", file.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "SSE-C key file {} is readable by others (mode {:o}): chmod 600 it",
            file.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = zeroize::Zeroizing::new(
        fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
    );
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let raw = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| anyhow!("{} line {}: not base64", file.display(), n + 1))?,
        );
        let k: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            anyhow!(
                "{} line {}: an SSE-C key is 32 bytes, this one is {}",
                file.display(),
                n + 1,
                raw.len()
            )
        })?;
        keys.push(SseCustomerKey::new(k));
    }
    if keys.is_empty() {
        bail!("{}: no key in the file", file.display());
    }
    Ok(keys)
}

/// A new name key for a store, wrapped by `provider`'s writer key, as its envelope encoded
/// for the volume config.
pub async fn new_name_key(provider: &Arc<dyn KeyProvider>) -> Result<String> {
    let (_, envelope) = provider
        .generate(&crate::crypt::content::random_file_id())
        .await?;
    // A key that can only wrap (a public key) could never read the names back.
    provider.unwrap(&envelope).await.map_err(|e| {
        anyhow!(
            "name encryption needs a root key that can also decrypt (not a public key alone): {e}"
        )
    })?;
    Ok(envelope.encode())
}

/// The store wrapped in name encryption when the volume has it on, with the name key
/// unwrapped now (so that a missing key fails here, not on the first lookup). `sse` is what
/// the long-name sidecars are written with.
pub async fn with_names(
    config: &VolumeConfig,
    crypt: &Crypt,
    store: Arc<dyn ObjectStore>,
    sse: &Sse,
) -> Result<Arc<dyn ObjectStore>> {
    if !config.encryption.name_encryption {
        return Ok(store);
    }
    let encoded = config.encryption.name_key.as_deref().ok_or_else(|| {
        anyhow!("the store's config turns name encryption on but has no name_key")
    })?;
    let provider = crypt
        .provider()
        .cloned()
        .ok_or_else(|| anyhow!("this store encrypts names: pass --key with its root key"))?;
    let envelope = crate::crypt::envelope::Envelope::decode(encoded)
        .map_err(|e| anyhow!("the store's name key: {e}"))?;
    let names = NameCipherStore::new(store, NameKey { provider, envelope }, sse.clone());
    names.cipher().await?;
    Ok(Arc::new(names))
}

/// The SSE parameters of a store's writes, and the store wrapped with an SSE-C key history
/// where there is one.
pub fn server_side_encryption(
    config: &VolumeConfig,
    store: Arc<dyn ObjectStore>,
    sse_c_key: Option<&Path>,
) -> Result<(Sse, Arc<dyn ObjectStore>)> {
    Ok(match config.encryption.server_side.as_str() {
        "none" => (Sse::None, store),
        "sse-s3" => (Sse::S3, store),
        "sse-kms" => (
            Sse::Kms {
                key_id: config.encryption.sse_kms_key_id.clone(),
            },
            store,
        ),
        "sse-c" => {
            let file = sse_c_key.ok_or_else(|| {
                anyhow!("this store is encrypted with SSE-C: pass --sse-c-key FILE")
            })?;
            let mut keys = read_sse_c_keys(file)?;
            let current = keys.remove(0);
            let store: Arc<dyn ObjectStore> = if keys.is_empty() {
                store
            } else {
                Arc::new(SseKeyHistory::new(store, keys))
            };
            (Sse::Customer(current), store)
        }
        other => bail!("unknown server-side encryption {other:?} in the store's config"),
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

/// Where mounts of remote stores keep their staging files: `$XDG_CACHE_HOME/coffer`.
pub fn cache_home() -> Result<PathBuf> {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(v) => Ok(PathBuf::from(v).join("coffer")),
        None => Ok(PathBuf::from(
            std::env::var_os("HOME")
                .ok_or_else(|| anyhow!("neither $XDG_CACHE_HOME nor $HOME is set"))?,
        )
        .join(".cache/coffer")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_chunk_sizes_are_refused() {
        let text = "format = 1\nstore_id = \"0123456789abcdef\"\nchunk_shift = 76\n\n[encryption]\nmode = \"client\"\nkey_ids = []\n";
        let e = VolumeConfig::parse(text, "t").unwrap_err().to_string();
        assert!(e.contains("chunk_shift 76"), "{e}");
        let ok = text.replace("= 76", "= 16");
        assert_eq!(VolumeConfig::parse(&ok, "t").unwrap().chunk_shift, 16);
    }
}
