//! The `coffer` command line. Errors are reported here, with their context, and turn into a
//! non-zero exit status.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use coffer::crypt::keys::RootKey;
use coffer::store::local::scrub;
use coffer::store::{GetOptions, ListRequest, ObjectStore, list_all};
use coffer::volume::{self, InitLocal};

#[derive(Parser)]
#[command(
    name = "coffer",
    version,
    about = "An encrypted, replicated filesystem over objects"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a store: a local N-replica store at PATH.
    Init(InitArgs),
    /// Mount a store. With only MOUNTPOINT, uses (and on first use creates) the default
    /// local store and root key.
    Mount(MountArgs),
    /// Root key management.
    #[command(subcommand)]
    Key(KeyCommand),
    /// List a directory of a store without mounting it.
    Ls(ReadArgs),
    /// Write a file of a store to standard output without mounting it.
    Cat(ReadArgs),
    /// Verify every replica of every object; with --repair, restore full redundancy.
    Scrub(ScrubArgs),
    /// List the versions of the objects under a path.
    Versions(ReadArgs),
    /// Make an earlier version of a file the current one again.
    Restore(RestoreArgs),
    /// Delete old versions: keep the newest --keep of each file, and of the others delete
    /// those older than --older-than-days (all of them without it).
    Prune(PruneArgs),
}

#[derive(Args)]
struct PruneArgs {
    source: PathBuf,
    /// Only files under this path.
    #[arg(default_value = "")]
    path: String,
    #[arg(long)]
    keep: usize,
    #[arg(long)]
    older_than_days: Option<f64>,
}

#[derive(Args)]
struct InitArgs {
    /// Directory of the new store.
    path: PathBuf,
    /// Number of replicas; every write is durable on all of them before it returns.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// A replica directory (one per replica, ideally on different disks). By default the
    /// replicas are PATH/replica-N.
    #[arg(long = "replica-dir")]
    replica_dirs: Vec<PathBuf>,
    /// Keep no old versions of overwritten and deleted files.
    #[arg(long)]
    no_versioning: bool,
    /// Plaintext chunk size in bytes (a power of two, 4 KiB to 16 MiB).
    #[arg(long, default_value_t = 65536)]
    chunk_size: u64,
    /// Store file bodies unencrypted (only for data that is public or protected otherwise).
    #[arg(long)]
    no_encryption: bool,
    /// Root key file; created (mode 0600) if it does not exist.
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Args)]
struct MountArgs {
    /// SOURCE (a local store path) and MOUNTPOINT, or just MOUNTPOINT for the default store.
    #[arg(num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
    /// Root key file (repeat for a key ring: the first writes, all read).
    #[arg(long)]
    key: Vec<PathBuf>,
    /// Mount options: allow_other, default_permissions, ro, uid=, gid=, umask=, ...
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Memory for decrypted chunks, in MiB.
    #[arg(long, default_value_t = 256)]
    cache_size: usize,
    /// Memory for caches and buffers together, in MiB: writers slow down and the cache
    /// shrinks to stay within it.
    #[arg(long, default_value_t = 1024)]
    memory_limit: usize,
    /// Directory for staged (encrypted) changes of files being rewritten.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Detach once the mount is ready (exit status says whether it mounted).
    #[arg(short = 'd', long)]
    daemon: bool,
    /// Write logs to this file instead of standard error.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Verify every replica in the background every this many hours, repairing what is
    /// missing or corrupt (0: never).
    #[arg(long, default_value_t = 0.0)]
    scrub_interval: f64,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a new random root key file (mode 0600).
    New { file: PathBuf },
    /// Print the id of a root key file (the id stores and error messages name).
    Id { file: PathBuf },
    /// Rewrap every object's data key under a new root key (metadata only: no data moves).
    /// Resumable: run it again after an interruption.
    Rotate {
        source: PathBuf,
        /// The new root key file.
        #[arg(long)]
        to: PathBuf,
        /// The current root key file(s).
        #[arg(long)]
        key: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct ReadArgs {
    /// The store (a local store path).
    source: PathBuf,
    /// Path inside the store.
    #[arg(default_value = "")]
    path: String,
    #[arg(long)]
    key: Vec<PathBuf>,
}

#[derive(Args)]
struct ScrubArgs {
    source: PathBuf,
    /// Rewrite missing and corrupt replicas from good copies, and remove leftovers.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct RestoreArgs {
    source: PathBuf,
    path: String,
    version: String,
}

/// Set in a detached mount's process: the pipe on which it reports readiness or failure.
const READY_FD_ENV: &str = "COFFER_READY_FD";

fn init_logging(command: &Command) -> Result<()> {
    let (level, log_file) = match command {
        Command::Mount(a) => ("info", a.log_file.clone()),
        _ => ("warn", None),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// Reports to the parent of a detached mount (if this is one).
fn report_ready(msg: &str) {
    use std::os::unix::io::FromRawFd;
    if let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the parent passed us this descriptor for exactly this message; it is used
        // once and closed.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let _ = f.write_all(msg.as_bytes());
        // SAFETY: setting the variable before any other thread reads the environment again.
        unsafe { std::env::remove_var(READY_FD_ENV) };
    }
}

/// `coffer mount -d`: runs the mount in a new session and returns once it is ready (or
/// failed, with its reason).
fn run_detached(log_to_file: bool) -> Result<()> {
    use std::os::unix::io::FromRawFd;
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (r, w) = (fds[0], fds[1]);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, w.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // With a log file the detached process keeps nothing of the caller's terminal or pipes;
    // without one, its log goes to the caller's standard error.
    if log_to_file {
        cmd.stderr(std::process::Stdio::null());
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let flags = libc::fcntl(w, libc::F_GETFD);
            libc::fcntl(w, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    // SAFETY: closing our copy of the write end, so EOF comes when the child closes its own.
    unsafe { libc::close(w) };
    let mut msg = String::new();
    // SAFETY: `r` is the read end of the pipe, owned here.
    let mut reader = unsafe { std::fs::File::from_raw_fd(r) };
    std::io::Read::read_to_string(&mut reader, &mut msg)?;
    if msg.starts_with("ready") {
        return Ok(());
    }
    let status = child.wait()?;
    if msg.is_empty() {
        bail!("the mount process exited with {status} before the mount was ready");
    }
    bail!("{}", msg.trim_start_matches("error: ").trim());
}

fn main() {
    let cli = Cli::parse();
    if let Command::Mount(a) = &cli.command
        && a.daemon
        && std::env::var_os(READY_FD_ENV).is_none()
    {
        if let Err(e) = run_detached(a.log_file.is_some()) {
            eprintln!("coffer: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = init_logging(&cli.command) {
        eprintln!("coffer: {e:#}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Init(a) => init(a),
        Command::Mount(a) => mount(a),
        Command::Key(KeyCommand::New { file }) => key_new(&file),
        Command::Key(KeyCommand::Rotate { source, to, key }) => key_rotate(&source, &to, &key),
        Command::Key(KeyCommand::Id { file }) => RootKey::read(&file)
            .map(|k| println!("{}", k.id_hex()))
            .map_err(|e| anyhow!("{e}")),
        Command::Ls(a) => ls(a),
        Command::Cat(a) => cat(a),
        Command::Scrub(a) => scrub_cmd(a),
        Command::Versions(a) => versions(a),
        Command::Restore(a) => restore(a),
        Command::Prune(a) => prune(a),
    };
    if let Err(e) = result {
        report_ready(&format!("error: {e:#}"));
        eprintln!("coffer: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn key_new(file: &Path) -> Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let k = RootKey::generate();
    k.write_new(file).map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "created root key {} in {}\nWhoever holds this file can read your data; if you lose it, the data is lost. Keep a copy somewhere safe.",
        k.id_hex(),
        file.display()
    );
    Ok(())
}

/// Reads a key file, or creates it if it does not exist; returns its id.
fn key_for_init(file: &Path) -> Result<String> {
    if !file.exists() {
        key_new(file)?;
    }
    Ok(RootKey::read(file).map_err(|e| anyhow!("{e}"))?.id_hex())
}

fn init(a: InitArgs) -> Result<()> {
    if !a.chunk_size.is_power_of_two() {
        bail!("--chunk-size must be a power of two");
    }
    let key_id = match (&a.key, a.no_encryption) {
        (Some(k), false) => Some(key_for_init(k)?),
        (None, false) => bail!(
            "an encrypted store needs a root key: pass --key FILE (created if missing), or --no-encryption"
        ),
        (_, true) => None,
    };
    let cfg = volume::init_local(&InitLocal {
        path: a.path.clone(),
        replicas: a.replicas,
        replica_dirs: a.replica_dirs,
        versioning: !a.no_versioning,
        chunk_shift: a.chunk_size.trailing_zeros() as u8,
        encrypt: !a.no_encryption,
        key_id,
    })?;
    let local = cfg.local.as_ref().expect("a local store");
    eprintln!(
        "created store {} at {} with {} replicas:",
        cfg.store_id,
        a.path.display(),
        local.replicas.len()
    );
    for r in &local.replicas {
        eprintln!("  {}", r.display());
    }
    Ok(())
}

fn mount(a: MountArgs) -> Result<()> {
    let (source, mountpoint, keys) = if a.paths.len() == 1 {
        let (store, key) = volume::default_paths()?;
        if !store.join(volume::CONFIG_FILE).exists() {
            if !key.exists() {
                key_new(&key)?;
            }
            let id = key_for_init(&key)?;
            volume::init_local(&InitLocal {
                path: store.clone(),
                replicas: 3,
                replica_dirs: Vec::new(),
                versioning: true,
                chunk_shift: 16,
                encrypt: true,
                key_id: Some(id),
            })?;
            eprintln!(
                "created the default store at {} (3 replicas)",
                store.display()
            );
        }
        eprintln!("root key: {} (losing it loses the data)", key.display());
        let keys = if a.key.is_empty() { vec![key] } else { a.key };
        (store, a.paths[0].clone(), keys)
    } else {
        (a.paths[0].clone(), a.paths[1].clone(), a.key)
    };
    let _lock = volume::lock_store(&source, true)?;
    let vol = volume::open_local(&source, &keys)?;
    volume::record_writer_key(&source, &vol)?;
    if let Some(local) = &vol.local {
        let n = local.clean_tmp().context("cleaning temporary files")?;
        if n > 0 {
            tracing::info!("removed {n} temporary files of writes cut short");
        }
    }
    let cache_dir = match a.cache_dir {
        Some(d) => d,
        None => source.join("cache"),
    };
    let opts = coffer::mount::MountOptions {
        mountpoint,
        options: a.options,
        cache_bytes: a.cache_size << 20,
        memory_limit: a.memory_limit << 20,
        cache_dir,
        fsname: format!("coffer:{}", source.display()),
        scrub: (a.scrub_interval > 0.0)
            .then(|| {
                vol.local.clone().map(|l| {
                    (
                        l,
                        std::time::Duration::from_secs_f64(a.scrub_interval * 3600.0),
                    )
                })
            })
            .flatten(),
    };
    coffer::mount::run(vol.store, vol.crypt, opts, || report_ready("ready\n"))
}

fn open_read(source: &Path, keys: &[PathBuf]) -> Result<volume::Volume> {
    let keys = if keys.is_empty() {
        let (store, key) = volume::default_paths()?;
        if source.canonicalize().ok() == store.canonicalize().ok() && key.exists() {
            vec![key]
        } else {
            Vec::new()
        }
    } else {
        keys.to_vec()
    };
    volume::open_local(source, &keys)
}

fn ls(a: ReadArgs) -> Result<()> {
    let vol = open_read(&a.source, &a.key)?;
    let rt = runtime()?;
    let prefix = match a.path.trim_matches('/') {
        "" => String::new(),
        p => format!("{p}/"),
    };
    let page = rt.block_on(list_all(
        vol.store.as_ref(),
        ListRequest {
            prefix: prefix.clone(),
            delimiter: Some('/'),
            ..Default::default()
        },
    ))?;
    let g = vol.crypt.geometry();
    let mut out = std::io::stdout().lock();
    for p in &page.common_prefixes {
        writeln!(out, "{:>12}  {}", "dir", &p[prefix.len()..])?;
    }
    for o in &page.objects {
        let name = &o.key[prefix.len()..];
        if name.is_empty() {
            continue;
        }
        let size = g
            .plain_size(o.size)
            .map_or_else(|_| "?".to_string(), |s| s.to_string());
        writeln!(out, "{size:>12}  {name}")?;
    }
    Ok(())
}

fn cat(a: ReadArgs) -> Result<()> {
    let vol = open_read(&a.source, &a.key)?;
    let rt = runtime()?;
    let key = a.path.trim_matches('/').to_string();
    rt.block_on(async {
        let cache = coffer::cache::ChunkCache::new(64 << 20);
        let (obj, _) = coffer::cache::CommittedObject::open(
            vol.store.as_ref(),
            &vol.crypt,
            &key,
            GetOptions::default(),
        )
        .await
        .with_context(|| format!("opening {key}"))?;
        let mut out = std::io::stdout().lock();
        let step = 8 << 20;
        let mut off = 0;
        while off < obj.plain_size {
            let data = obj
                .read(vol.store.as_ref(), &cache, off..off + step)
                .await
                .with_context(|| format!("reading {key} at {off}"))?;
            out.write_all(&data)?;
            cache.forget_object(obj.cache_id);
            off += step;
        }
        out.flush()?;
        Ok(())
    })
}

fn scrub_cmd(a: ScrubArgs) -> Result<()> {
    let _lock = volume::lock_store(&a.source, true)?;
    let cfg = volume::VolumeConfig::read(&a.source)?;
    let store = coffer::store::local::LocalStore::open(&cfg.local_store_config(&a.source)?)
        .map_err(|e| anyhow!("{e}"))?;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} keys ({eta} left)")
                .expect("valid template"),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line = std::time::Instant::now();
    let report = scrub::scrub(&store, a.repair, &mut |done, total| match &bar {
        Some(b) => {
            b.set_length(total);
            b.set_position(done);
        }
        None => {
            if last_line.elapsed().as_secs() >= 10 {
                eprintln!("scrub: {done}/{total} keys");
                last_line = std::time::Instant::now();
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for d in &report.damage {
        eprintln!("{d:?}");
    }
    println!("scrub: {}", report.summary());
    if report.damage_remaining() {
        bail!(
            "damage remains{}",
            if a.repair {
                ""
            } else {
                "; run again with --repair"
            }
        );
    }
    Ok(())
}

fn versions(a: ReadArgs) -> Result<()> {
    let vol = open_read(&a.source, &a.key)?;
    let rt = runtime()?;
    let list = rt.block_on(vol.store.list_versions(a.path.trim_matches('/')))?;
    let g = vol.crypt.geometry();
    for v in list {
        let when = coffer::vfs::attr::format_time(v.mtime);
        if v.is_delete_marker {
            println!(
                "{}  {}  {:>12}  {} (deleted){}",
                v.version_id,
                when,
                "-",
                v.key,
                if v.is_latest { " latest" } else { "" }
            );
        } else {
            let size = g
                .plain_size(v.size)
                .map_or_else(|_| "?".into(), |s| s.to_string());
            println!(
                "{}  {}  {:>12}  {}{}",
                v.version_id,
                when,
                size,
                v.key,
                if v.is_latest { " latest" } else { "" }
            );
        }
    }
    Ok(())
}

fn restore(a: RestoreArgs) -> Result<()> {
    // Restoring copies a version inside the store: no key is needed.
    let _lock = volume::lock_store(&a.source, true)?;
    let cfg = volume::VolumeConfig::read(&a.source)?;
    let store: Arc<dyn ObjectStore> = Arc::new(
        coffer::store::local::LocalStore::open(&cfg.local_store_config(&a.source)?)
            .map_err(|e| anyhow!("{e}"))?,
    );
    let rt = runtime()?;
    let key = a.path.trim_matches('/');
    let info = rt.block_on(store.restore_version(key, &a.version, &Default::default()))?;
    eprintln!(
        "restored {key} from version {} as {}",
        a.version,
        info.version_id.unwrap_or_default()
    );
    Ok(())
}

fn prune(a: PruneArgs) -> Result<()> {
    if a.keep == 0 {
        bail!("--keep must be at least 1 (the current version)");
    }
    let _lock = volume::lock_store(&a.source, true)?;
    let cfg = volume::VolumeConfig::read(&a.source)?;
    let store = coffer::store::local::LocalStore::open(&cfg.local_store_config(&a.source)?)
        .map_err(|e| anyhow!("{e}"))?;
    let older = a
        .older_than_days
        .map(|d| std::time::Duration::from_secs_f64(d * 86400.0));
    let n = runtime()?.block_on(store.prune_versions(a.path.trim_matches('/'), a.keep, older))?;
    println!("pruned {n} versions");
    Ok(())
}

fn key_rotate(source: &Path, to: &Path, keys: &[PathBuf]) -> Result<()> {
    use coffer::crypt::keys::KeyProvider;
    let _lock = volume::lock_store(source, true)?;
    let vol = volume::open_local(source, keys)?;
    let from: Arc<dyn KeyProvider> =
        vol.crypt.provider().cloned().ok_or_else(|| {
            anyhow!("this store is not encrypted on the client: nothing to rotate")
        })?;
    let new: Arc<dyn KeyProvider> = Arc::new(volume::load_keys(&[to.to_path_buf()])?);
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} objects ({eta} left)")
                .expect("valid template"),
        );
        b
    });
    let report = runtime()?.block_on(coffer::crypt::rotate::rotate(
        vol.store.as_ref(),
        "",
        &from,
        &new,
        &mut |done, total| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        },
    ))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // From now on the store expects the new key.
    let mut cfg = vol.config.clone();
    cfg.encryption.key_ids = new.key_ids();
    volume::write_config(source, &cfg)?;
    println!(
        "rotated: {} objects, {} rewrapped, {} already under the new key, {} not encrypted",
        report.objects, report.rewrapped, report.already_current, report.unencrypted
    );
    Ok(())
}
