//! The `coffer` command line. Errors are reported here, with their context, and turn into a
//! non-zero exit status.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use coffer::crypt::keys::RootKey;
use coffer::store::local::scrub;
use coffer::store::s3::{S3Location, S3Options, S3Store, WireChecksum};
use coffer::store::{GetOptions, ListRequest, ObjectStore, list_all};
use coffer::volume::{self, InitLocal, InitS3};

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
    /// The local key service: root keys that never leave its process. Mount with
    /// `--key kms:SOCKET#NAME`.
    #[command(subcommand)]
    Kms(KmsCommand),
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
    /// Abort multipart uploads of an S3 store left behind by writers that crashed.
    Gc(GcArgs),
    /// Show the live statistics of a mount.
    Stats { mountpoint: PathBuf },
    /// Plain PUT and GET throughput of the store's backend through coffer's store layer, with
    /// no FUSE and no encryption (a reference for scripts/bench); prints JSON.
    #[command(hide = true)]
    StoreThroughput {
        source: String,
        /// Bytes to write and read, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Drop the page cache (as root) between the upload and the reads, so that they are
        /// as cold as a mount's cold read.
        #[arg(long)]
        drop_caches: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Seal and open throughput of the object format against raw AES-256-GCM-SIV, on one core
    /// and on all (a reference for scripts/bench); prints JSON.
    #[command(hide = true)]
    CryptThroughput {
        /// Bytes to seal and open per measurement, in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: usize,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (coffer.1 and one per command) into a directory.
    Man { dir: PathBuf },
}

/// How to reach an S3 store (`s3://bucket/prefix`). Credentials come from the standard AWS
/// chain (environment, shared files, profiles, web identity, instance metadata), never from
/// the command line.
#[derive(Args, Clone, Default)]
struct S3Args {
    /// S3 endpoint (Garage, MinIO, Ceph: http://127.0.0.1:3900); AWS by default.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// A profile of the shared AWS config and credentials files.
    #[arg(long)]
    profile: Option<String>,
    /// Path-style addressing (http://host/bucket/key), which most self-hosted services need.
    #[arg(long)]
    path_style: bool,
    /// PEM file of the CAs to trust for the endpoint (self-hosted endpoints with their own CA).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Checksum sent with every put and verified by the server: crc32c or sha256.
    #[arg(long, default_value = "crc32c")]
    checksum: String,
    /// Seconds one attempt of a request may take before it is abandoned and retried: a
    /// stalled server slows the caller, it never hangs it.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Attempts per request, the first included, before the error reaches the caller (EIO).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: u32,
    /// Parts of one file uploaded at once. Each holds up to 5 MiB (more past 5 GiB): three
    /// keep a local or nearby endpoint busy; a fast link far from it may want more.
    #[arg(long, default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=MAX_PARTS_IN_FLIGHT as i64))]
    parts_in_flight: u32,
}

/// Most `--parts-in-flight`.
const MAX_PARTS_IN_FLIGHT: u32 = 64;

impl S3Args {
    fn options(&self) -> Result<S3Options> {
        Ok(S3Options {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            profile: self.profile.clone(),
            path_style: self.path_style,
            ca_bundle: self.ca_bundle.clone(),
            checksum: match self.checksum.as_str() {
                "crc32c" => WireChecksum::Crc32c,
                "sha256" => WireChecksum::Sha256,
                other => bail!("--checksum {other}: use crc32c or sha256"),
            },
            attempt_timeout: {
                if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
                    bail!(
                        "--request-timeout {}: a positive number of seconds",
                        self.request_timeout
                    );
                }
                std::time::Duration::from_secs_f64(self.request_timeout)
            },
            max_attempts: self.attempts,
            // The config file's value is not checked by clap.
            parts_in_flight: self.parts_in_flight.clamp(1, MAX_PARTS_IN_FLIGHT) as usize,
            ..Default::default()
        })
    }
}

#[derive(Args)]
struct GcArgs {
    source: String,
    /// Only uploads started more than this many hours ago (others may be writes in progress).
    #[arg(long, default_value_t = 24.0)]
    older_than_hours: f64,
    #[command(flatten)]
    s3: S3Args,
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
    /// Directory of the new local store, or s3://BUCKET/PREFIX.
    path: String,
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
    /// Encryption: client (the default: envelope encryption on this machine), none, sse-c,
    /// sse-s3, sse-kms, or client+sse-c, client+sse-s3, client+sse-kms (both).
    #[arg(long)]
    encryption: Option<String>,
    /// Key id of SSE-KMS (the bucket's default key without it).
    #[arg(long)]
    sse_kms_key_id: Option<String>,
    #[command(flatten)]
    s3: S3Args,
    /// Root key file; created (mode 0600) if it does not exist.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Encrypt file and directory names too (each path component, with AES-SIV).
    #[arg(long)]
    encrypt_names: bool,
}

#[derive(Args)]
struct MountArgs {
    /// SOURCE (a local store path or s3://BUCKET/PREFIX) and MOUNTPOINT, or just MOUNTPOINT
    /// for the default store.
    #[arg(num_args = 0..=2)]
    paths: Vec<PathBuf>,
    /// A config file holding these options (NAME for /etc/coffer/NAME.toml, or a path);
    /// the command line overrides it.
    #[arg(long)]
    config: Option<String>,
    /// Serve the statistics to Prometheus on this loopback address (127.0.0.1:9464).
    #[arg(long)]
    prometheus: Option<String>,
    /// Log filter, as RUST_LOG: error, warn, info, debug, or per module (coffer=debug).
    #[arg(long)]
    log: Option<String>,
    #[command(flatten)]
    s3: S3Args,
    /// SSE-C key file of an SSE-C store: one base64 key per line, the first for writes, the
    /// others for reading older objects. Mode 0600.
    #[arg(long)]
    sse_c_key: Option<PathBuf>,
    /// Refuse every write that would be stored unencrypted.
    #[arg(long)]
    require_encryption: bool,
    /// Seconds a directory listing is trusted before it is listed again (S3 stores, which
    /// other clients may change).
    #[arg(long, default_value_t = 10.0)]
    metadata_ttl: f64,
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
    /// Create a new random root key file (mode 0600), or with --pair a public key file
    /// (for hosts that only write) and a private key file (0600, to read).
    New {
        file: PathBuf,
        /// FILE is the public key; this is the private key.
        #[arg(long, value_name = "PRIVATE_FILE")]
        pair: Option<PathBuf>,
    },
    /// Print the id of a key file (the id stores and error messages name).
    Id { file: PathBuf },
    /// Rewrap every object's data key under a new root key (metadata only: no data moves).
    /// Resumable: run it again after an interruption.
    Rotate {
        source: String,
        #[command(flatten)]
        s3: S3Args,
        /// The new root key file.
        #[arg(long)]
        to: PathBuf,
        /// The current root key file(s).
        #[arg(long)]
        key: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KmsCommand {
    /// Run the key service (until SIGTERM). Its keys are sealed in DIR under the master key.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// A root key file (`coffer key new`) that seals the key store.
        #[arg(long, required_unless_present_any = ["passphrase_file", "passphrase_env"])]
        master_key: Option<PathBuf>,
        /// Seal the key store under a passphrase instead (Argon2id), read from this file
        /// (first line; mode 0600).
        #[arg(long, conflicts_with = "master_key")]
        passphrase_file: Option<PathBuf>,
        /// ... or from this environment variable (never from the command line).
        #[arg(long, conflicts_with_all = ["master_key", "passphrase_file"])]
        passphrase_env: Option<String>,
        /// Socket path (DIR/kms.sock by default).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Create a named key; --encrypt-uid and --decrypt-uid say who may use it (the
    /// service's own uid always may).
    Create {
        name: String,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long = "encrypt-uid")]
        encrypt_uids: Vec<u32>,
        #[arg(long = "decrypt-uid")]
        decrypt_uids: Vec<u32>,
        /// Rotate automatically when the newest version is this many days old.
        #[arg(long)]
        rotate_days: Option<f64>,
    },
    /// Refuse every use of a key until it is enabled again.
    Disable {
        name: String,
        #[arg(long)]
        socket: PathBuf,
    },
    Enable {
        name: String,
        #[arg(long)]
        socket: PathBuf,
    },
    /// Add a version: new data keys use it, older versions keep decrypting.
    Rotate {
        name: String,
        #[arg(long)]
        socket: PathBuf,
    },
    /// The keys, their state and policies.
    List {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Print the audit log: one line per use of a key.
    Audit {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct ReadArgs {
    /// The store (a local store path or s3://BUCKET/PREFIX).
    source: String,
    /// Path inside the store.
    #[arg(default_value = "")]
    path: String,
    #[arg(long)]
    key: Vec<PathBuf>,
    /// SSE-C key file of an SSE-C store.
    #[arg(long)]
    sse_c_key: Option<PathBuf>,
    #[command(flatten)]
    s3: S3Args,
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
    source: String,
    path: String,
    version: String,
    /// Root key file, for a store that encrypts names (restoring needs no key otherwise).
    #[arg(long)]
    key: Vec<PathBuf>,
    /// SSE-C key file of an SSE-C store.
    #[arg(long)]
    sse_c_key: Option<PathBuf>,
    #[command(flatten)]
    s3: S3Args,
}

/// Set in a detached mount's process: the pipe on which it reports readiness or failure.
const READY_FD_ENV: &str = "COFFER_READY_FD";

fn init_logging(command: &Command) -> Result<()> {
    let (level, log_file, detached) = match command {
        Command::Mount(a) => (
            a.log.clone().unwrap_or_else(|| "info".into()),
            a.log_file.clone(),
            a.daemon,
        ),
        _ => ("warn".to_string(), None, false),
    };
    let filter = match command {
        // An explicit --log (or -o log=) wins over the environment.
        Command::Mount(a) if a.log.is_some() => tracing_subscriber::EnvFilter::try_new(&level)
            .map_err(|e| anyhow!("--log {level}: {e}"))?,
        _ => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level)),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let f = coffer::logging::LogFile::open(&path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(f).init();
        }
        // A detached mount outlives the terminal that started it: syslog (and so the
        // journal) gets its log, unless systemd already collects standard error.
        None if detached && std::env::var_os("JOURNAL_STREAM").is_none() => builder
            .with_ansi(false)
            .without_time()
            .with_writer(coffer::logging::Syslog::init())
            .init(),
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
fn run_detached(args: &[String], log_to_file: bool) -> Result<()> {
    use std::os::unix::io::FromRawFd;
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (r, w) = (fds[0], fds[1]);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    // The arguments as expanded (a mount helper's own are in another form).
    cmd.args(&args[1..])
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

/// Turns `-o name=value` options that name a `coffer mount` option into that option
/// (`-o key=/etc/root.key` is `--key /etc/root.key`); the others stay mount options.
fn expand_mount_options(args: Vec<String>) -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    // Only `coffer mount ...` (a path argument may be called "mount" too).
    let Some(pos) = args.get(1).filter(|a| *a == "mount").map(|_| 1) else {
        return args;
    };
    let mount = cmd.find_subcommand("mount").expect("a mount command");
    let flags: Vec<(String, bool)> = mount
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            (long != "options").then(|| (long, a.get_action().takes_values()))
        })
        .collect();
    let mut out: Vec<String> = args[..=pos].to_vec();
    let mut it = args[pos + 1..].iter();
    while let Some(a) = it.next() {
        let value = if a == "-o" {
            match it.next() {
                Some(v) => v.clone(),
                None => {
                    out.push(a.clone());
                    break;
                }
            }
        } else if let Some(v) = a.strip_prefix("-o").filter(|v| !v.is_empty()) {
            v.to_string()
        } else {
            out.push(a.clone());
            continue;
        };
        let mut rest = Vec::new();
        for opt in value.split(',').filter(|o| !o.is_empty()) {
            let (name, v) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            let long = name.replace('_', "-");
            match flags.iter().find(|(f, _)| *f == long) {
                Some((f, true)) if v.is_some() => {
                    out.push(format!("--{f}"));
                    out.push(v.unwrap_or_default().to_string());
                }
                Some((f, false)) if v.is_none() || v == Some("true") => out.push(format!("--{f}")),
                _ => rest.push(opt.to_string()),
            }
        }
        if !rest.is_empty() {
            out.push("-o".into());
            out.push(rest.join(","));
        }
    }
    out
}

/// `mount -t fuse.coffer SOURCE DIR -o OPTS` runs `/sbin/mount.fuse.coffer SOURCE DIR -o OPTS`
/// (this binary under that name): the same as `coffer mount SOURCE DIR --daemon -o OPTS`,
/// returning once the mount answers.
fn helper_args(args: Vec<String>) -> Vec<String> {
    let name = Path::new(&args[0])
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if !name.starts_with("mount.") {
        return args;
    }
    let mut out = vec!["coffer".to_string(), "mount".to_string()];
    let mut it = args.into_iter().skip(1);
    let mut positional = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => {
                if let Some(v) = it.next() {
                    out.push("-o".into());
                    out.push(v);
                }
            }
            // -n (no mtab), -s (sloppy), -v (verbose): nothing to do.
            "-n" | "-s" | "-v" => {}
            // -f: fake, do everything but mount.
            "-f" => std::process::exit(0),
            "-t" => {
                it.next();
            }
            o if o.starts_with("-o") => {
                out.push("-o".into());
                out.push(o[2..].to_string());
            }
            _ => positional.push(a),
        }
    }
    out.splice(2..2, positional);
    out.push("--daemon".into());
    out
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let args = expand_mount_options(helper_args(std::env::args().collect()));
    let matches = Cli::command().get_matches_from(&args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Mount(a) = &mut cli.command
        && let Err(e) = apply_config(a, matches.subcommand_matches("mount").expect("mount"))
    {
        eprintln!("coffer: {e:#}");
        std::process::exit(1);
    }
    if let Command::Mount(a) = &cli.command
        && a.daemon
        && std::env::var_os(READY_FD_ENV).is_none()
    {
        if let Err(e) = run_detached(&args, a.log_file.is_some()) {
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
        Command::Key(KeyCommand::New { file, pair: None }) => key_new(&file),
        Command::Key(KeyCommand::New {
            file,
            pair: Some(private),
        }) => key_new_pair(&file, &private),
        Command::Key(KeyCommand::Rotate {
            source,
            to,
            key,
            s3,
        }) => key_rotate(&source, &to, &key, &s3),
        Command::Key(KeyCommand::Id { file }) => {
            volume::load_key_file(&file).map(|k| println!("{}", k.key_ids()[0]))
        }
        Command::Ls(a) => ls(a),
        Command::Cat(a) => cat(a),
        Command::Scrub(a) => scrub_cmd(a),
        Command::Versions(a) => versions(a),
        Command::Restore(a) => restore(a),
        Command::Prune(a) => prune(a),
        Command::Gc(a) => gc(a),
        Command::StoreThroughput {
            source,
            size_mib,
            drop_caches,
            s3,
        } => store_throughput(&source, size_mib, drop_caches, &s3),
        Command::CryptThroughput { size_mib } => {
            let rows = coffer::crypt::throughput::measure(size_mib << 20);
            println!("{}", coffer::crypt::throughput::report_json(&rows));
            Ok(())
        }
        Command::Kms(k) => kms(k),
        Command::Stats { mountpoint } => {
            coffer::control::query(&mountpoint).map(|text| print!("{text}"))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "coffer", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(&dir),
    };
    if let Err(e) = result {
        report_ready(&format!("error: {e:#}"));
        eprintln!("coffer: {e:#}");
        std::process::exit(1);
    }
}

/// Fills in what the command line did not give from the config file, if there is one.
fn apply_config(a: &mut MountArgs, m: &clap::ArgMatches) -> Result<()> {
    use clap::parser::ValueSource;
    let Some(name) = &a.config else {
        if a.paths.is_empty() {
            bail!("coffer mount needs a MOUNTPOINT (and a SOURCE), or --config");
        }
        return Ok(());
    };
    let f = coffer::config::MountFile::read(&coffer::config::resolve(name))?;
    let unset = |id: &str| m.value_source(id) != Some(ValueSource::CommandLine);
    match (a.paths.len(), &f.source, &f.mountpoint) {
        (0, Some(src), Some(mnt)) => a.paths = vec![PathBuf::from(src), mnt.clone()],
        (0, None, Some(mnt)) => a.paths = vec![mnt.clone()],
        (0, _, None) => bail!("{name}: no mountpoint in the config file nor on the command line"),
        (1, Some(src), _) => a.paths.insert(0, PathBuf::from(src)),
        _ => {}
    }
    macro_rules! take {
        ($field:ident) => {
            if unset(stringify!($field))
                && let Some(v) = f.$field.clone()
            {
                a.$field = v;
            }
        };
        (opt $field:ident) => {
            if unset(stringify!($field)) && f.$field.is_some() {
                a.$field = f.$field.clone();
            }
        };
    }
    take!(key);
    take!(cache_size);
    take!(memory_limit);
    take!(scrub_interval);
    take!(metadata_ttl);
    take!(require_encryption);
    take!(opt cache_dir);
    take!(opt log_file);
    take!(opt log);
    take!(opt sse_c_key);
    take!(opt prometheus);
    if let Some(o) = &f.options {
        // Options from the file come first; those on the command line add to them.
        let mut all = o.clone();
        all.append(&mut a.options);
        a.options = all;
    }
    if let Some(s3) = &f.s3 {
        let t = &mut a.s3;
        if unset("endpoint_url") && s3.endpoint_url.is_some() {
            t.endpoint_url = s3.endpoint_url.clone();
        }
        if unset("region") && s3.region.is_some() {
            t.region = s3.region.clone();
        }
        if unset("profile") && s3.profile.is_some() {
            t.profile = s3.profile.clone();
        }
        if unset("path_style")
            && let Some(p) = s3.path_style
        {
            t.path_style = p;
        }
        if unset("ca_bundle") && s3.ca_bundle.is_some() {
            t.ca_bundle = s3.ca_bundle.clone();
        }
        if unset("request_timeout")
            && let Some(v) = s3.request_timeout
        {
            t.request_timeout = v;
        }
        if unset("attempts")
            && let Some(v) = s3.attempts
        {
            t.attempts = v;
        }
        if unset("parts_in_flight")
            && let Some(v) = s3.parts_in_flight
        {
            t.parts_in_flight = v;
        }
        if unset("checksum")
            && let Some(c) = &s3.checksum
        {
            t.checksum = c.clone();
        }
    }
    Ok(())
}

fn kms(cmd: KmsCommand) -> Result<()> {
    use coffer::kms::Request;
    let rt = runtime()?;
    let admin = |socket: &Path, req: Request| -> Result<coffer::kms::Response> {
        let r = rt
            .block_on(coffer::kms::client::call(socket, &req))
            .map_err(|e| anyhow!("{e}"))?;
        if !r.ok {
            bail!("{}", r.error.unwrap_or_default());
        }
        Ok(r)
    };
    match cmd {
        KmsCommand::Serve {
            dir,
            master_key,
            passphrase_file,
            passphrase_env,
            socket,
        } => {
            use coffer::kms::store::{master_from_passphrase, read_passphrase_file};
            let master: zeroize::Zeroizing<[u8; 32]> = match (master_key, passphrase_file) {
                (Some(file), _) => zeroize::Zeroizing::new(
                    *RootKey::read(&file).map_err(|e| anyhow!("{e}"))?.material(),
                ),
                (None, Some(file)) => {
                    master_from_passphrase(&dir, read_passphrase_file(&file)?.as_bytes())?
                }
                (None, None) => {
                    let var = passphrase_env.expect("clap requires one of the three");
                    let pass =
                        zeroize::Zeroizing::new(std::env::var(&var).map_err(|_| {
                            anyhow!("--passphrase-env {var}: the variable is not set")
                        })?);
                    master_from_passphrase(&dir, pass.as_bytes())?
                }
            };
            let socket = socket.unwrap_or_else(|| coffer::kms::server::default_socket(&dir));
            eprintln!("key service on {}", socket.display());
            rt.block_on(coffer::kms::server::serve(&dir, &master, &socket))
        }
        KmsCommand::Create {
            name,
            socket,
            encrypt_uids,
            decrypt_uids,
            rotate_days,
        } => {
            admin(
                &socket,
                Request::Create {
                    key: name.clone(),
                    encrypt_uids,
                    decrypt_uids,
                    rotate_days,
                },
            )?;
            eprintln!(
                "created key {name:?}: mount with --key kms:{}#{name}",
                socket.display()
            );
            Ok(())
        }
        KmsCommand::Disable { name, socket } => {
            admin(&socket, Request::Disable { key: name }).map(|_| ())
        }
        KmsCommand::Enable { name, socket } => {
            admin(&socket, Request::Enable { key: name }).map(|_| ())
        }
        KmsCommand::Rotate { name, socket } => {
            let r = admin(&socket, Request::Rotate { key: name.clone() })?;
            println!("{name}: version {}", r.version.unwrap_or_default());
            Ok(())
        }
        KmsCommand::List { socket } => {
            let r = admin(&socket, Request::List)?;
            print!("{}", r.text.unwrap_or_default());
            Ok(())
        }
        KmsCommand::Audit { dir } => {
            let path = dir.join(coffer::kms::server::AUDIT_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            print!("{text}");
            Ok(())
        }
    }
}

fn man_pages(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut pages = vec![(String::from("coffer"), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((format!("coffer-{}", sub.get_name()), sub.clone()));
    }
    for (name, c) in pages {
        let mut out = Vec::new();
        // clap wants a 'static name; this command exits right after.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(c.name(title)).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
    }
    Ok(())
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

fn key_new_pair(public: &Path, private: &Path) -> Result<()> {
    for f in [public, private] {
        if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    let pair = coffer::crypt::keypair::KeyPair::generate();
    pair.write_new(public, private)
        .map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "created key pair {}: public key {} (writes only), private key {} (reads everything; keep it off the hosts that only write backups)",
        pair.id_hex(),
        public.display(),
        private.display()
    );
    Ok(())
}

/// Reads a key file, or creates a symmetric one if it does not exist; returns its id.
fn key_for_init(file: &Path) -> Result<String> {
    let spec = file.to_string_lossy();
    if !file.exists() && !spec.starts_with("kms:") && !spec.starts_with("aws-kms:") {
        key_new(file)?;
    }
    Ok(volume::load_key_file(file)?.key_ids()[0].clone())
}

/// `--encryption MODE` (or `--no-encryption`) as (client-side on, server-side mode).
fn encryption_modes(a: &InitArgs) -> Result<(bool, String)> {
    let mode = match (&a.encryption, a.no_encryption) {
        (Some(_), true) => bail!("--encryption and --no-encryption contradict each other"),
        (Some(m), false) => m.clone(),
        (None, true) => "none".into(),
        (None, false) => "client".into(),
    };
    let (client, server) = match mode.split_once('+') {
        Some(("client", server)) => (true, server.to_string()),
        None if mode == "client" => (true, "none".to_string()),
        None if volume::SSE_MODES.contains(&mode.as_str()) => (false, mode.clone()),
        _ => bail!(
            "--encryption {mode}: use client, none, sse-c, sse-s3, sse-kms or client+sse-c, client+sse-s3, client+sse-kms"
        ),
    };
    if !volume::SSE_MODES.contains(&server.as_str())
        || (client && server == "none" && mode != "client")
    {
        bail!("--encryption {mode}: unknown server-side mode {server:?}");
    }
    Ok((client, server))
}

fn init(a: InitArgs) -> Result<()> {
    if !a.chunk_size.is_power_of_two() {
        bail!("--chunk-size must be a power of two");
    }
    let (client, server_side) = encryption_modes(&a)?;
    let key_id = match (&a.key, client) {
        (Some(k), true) => Some(key_for_init(k)?),
        (None, true) => bail!(
            "an encrypted store needs a root key: pass --key FILE (created if missing), or --encryption none / sse-c / sse-s3 / sse-kms"
        ),
        (_, false) => None,
    };
    let chunk_shift = a.chunk_size.trailing_zeros() as u8;
    let name_key = match (&a.key, a.encrypt_names && client) {
        (Some(k), true) => {
            let provider = volume::load_key_file(k)?;
            Some(runtime()?.block_on(volume::new_name_key(&provider))?)
        }
        (_, false) if a.encrypt_names => {
            bail!(
                "--encrypt-names needs client-side encryption (--encryption client or client+...)"
            )
        }
        _ => None,
    };
    if S3Location::is_s3(&a.path) {
        let location = S3Location::parse(&a.path)?;
        let s3 = a.s3.options()?;
        if server_side == "sse-c" && s3.is_plain_http_to_remote() {
            bail!(
                "SSE-C sends the key in request headers: it needs an https:// endpoint (or a loopback one)"
            );
        }
        let cfg = runtime()?.block_on(volume::init_s3(&InitS3 {
            location: location.clone(),
            s3,
            chunk_shift,
            encrypt: client,
            key_id,
            name_key,
            server_side,
            sse_kms_key_id: a.sse_kms_key_id,
        }))?;
        eprintln!("created store {} at {location}", cfg.store_id);
        return Ok(());
    }
    if server_side != "none" {
        bail!("server-side encryption is for S3 stores; a local store encrypts on the client");
    }
    let cfg = volume::init_local(&InitLocal {
        path: PathBuf::from(&a.path),
        replicas: a.replicas,
        replica_dirs: a.replica_dirs,
        versioning: !a.no_versioning,
        chunk_shift,
        encrypt: client,
        key_id,
        name_key,
    })?;
    let local = cfg.local.as_ref().expect("a local store");
    eprintln!(
        "created store {} at {} with {} replicas:",
        cfg.store_id,
        a.path,
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
                name_key: None,
            })?;
            eprintln!(
                "created the default store at {} (3 replicas)",
                store.display()
            );
        }
        eprintln!("root key: {} (losing it loses the data)", key.display());
        let keys = if a.key.is_empty() {
            vec![key]
        } else {
            a.key.clone()
        };
        (store, a.paths[0].clone(), keys)
    } else {
        (a.paths[0].clone(), a.paths[1].clone(), a.key.clone())
    };
    let source_text = source.to_string_lossy().to_string();
    if S3Location::is_s3(&source_text) {
        return mount_s3(&source_text, mountpoint, &keys, &a);
    }
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
        metadata_ttl: None,
        reserved_root_name: None,
        prometheus: a
            .prometheus
            .as_deref()
            .map(coffer::control::check_loopback)
            .transpose()?,
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
    let rt = runtime()?;
    let store = rt.block_on(volume::with_names(
        &vol.config,
        &vol.crypt,
        vol.store,
        &Default::default(),
    ))?;
    let store = with_policy(store, &vol.crypt, a.require_encryption);
    coffer::mount::run(rt, store, vol.crypt, Default::default(), opts, || {
        report_ready("ready\n")
    })
}

/// Wraps a store in the policy that refuses unencrypted writes, if asked for.
fn with_policy(
    store: Arc<dyn ObjectStore>,
    crypt: &coffer::crypt::Crypt,
    require: bool,
) -> Arc<dyn ObjectStore> {
    if require {
        Arc::new(coffer::store::policy::RequireEncryption::new(
            store,
            crypt.provider().is_some(),
        ))
    } else {
        store
    }
}

fn mount_s3(source: &str, mountpoint: PathBuf, keys: &[PathBuf], a: &MountArgs) -> Result<()> {
    let location = S3Location::parse(source)?;
    let s3 = a.s3.options()?;
    if a.sse_c_key.is_some() && s3.is_plain_http_to_remote() {
        bail!(
            "SSE-C sends the key in request headers: refusing a plain http:// endpoint that is not loopback (use https://)"
        );
    }
    let rt = runtime()?;
    let (vol, s3store) = rt.block_on(volume::open_s3(&location, &s3, keys))?;
    if vol.config.encryption.server_side == "sse-c" && s3.is_plain_http_to_remote() {
        bail!(
            "this store uses SSE-C, which sends the key in request headers: refusing a plain http:// endpoint that is not loopback"
        );
    }
    rt.block_on(volume::record_writer_key_s3(&s3store, &vol))?;
    let (sse, store) =
        volume::server_side_encryption(&vol.config, vol.store.clone(), a.sse_c_key.as_deref())?;
    // A wrong SSE-C key shows now rather than as EACCES on the first read.
    if let coffer::store::Sse::Customer(_) = &sse {
        let probe = GetOptions {
            sse: sse.clone(),
            version_id: None,
            if_match: None,
        };
        let first = rt.block_on(list_all(
            store.as_ref(),
            ListRequest {
                max_keys: 50,
                ..Default::default()
            },
        ))?;
        if let Some(o) = first
            .objects
            .iter()
            .find(|o| o.key != volume::S3_CONFIG_KEY && !o.key.ends_with('/'))
            && let Err(e) = rt.block_on(store.head(&o.key, &probe))
            && matches!(e, coffer::store::StoreError::WrongKey { .. })
        {
            bail!(
                "the SSE-C key in {} does not open {}: wrong key file?",
                a.sse_c_key.as_deref().unwrap_or(Path::new("?")).display(),
                o.key
            );
        }
    }
    let cache_dir = match &a.cache_dir {
        Some(d) => d.clone(),
        None => volume::cache_home()?.join(&vol.config.store_id),
    };
    let opts = coffer::mount::MountOptions {
        mountpoint,
        options: a.options.clone(),
        cache_bytes: a.cache_size << 20,
        memory_limit: a.memory_limit << 20,
        cache_dir,
        fsname: format!("coffer:{location}"),
        scrub: None,
        metadata_ttl: Some(std::time::Duration::from_secs_f64(a.metadata_ttl.max(0.0))),
        reserved_root_name: Some(volume::RESERVED_NAME.to_string()),
        prometheus: a
            .prometheus
            .as_deref()
            .map(coffer::control::check_loopback)
            .transpose()?,
    };
    let store = rt.block_on(volume::with_names(&vol.config, &vol.crypt, store, &sse))?;
    let store = with_policy(store, &vol.crypt, a.require_encryption);
    coffer::mount::run(rt, store, vol.crypt, sse, opts, || report_ready("ready\n"))
}

/// A store opened for a command other than mount: its volume, the SSE of its requests,
/// and the S3 store itself where it is one.
struct Opened {
    vol: volume::Volume,
    sse: coffer::store::Sse,
    s3: Option<S3Store>,
}

impl Opened {
    fn get_opts(&self) -> GetOptions {
        GetOptions {
            sse: self.sse.clone(),
            version_id: None,
            if_match: None,
        }
    }
}

fn open_source(
    rt: &tokio::runtime::Runtime,
    source: &str,
    keys: &[PathBuf],
    s3: &S3Args,
    sse_c_key: Option<&Path>,
) -> Result<Opened> {
    if S3Location::is_s3(source) {
        let location = S3Location::parse(source)?;
        let (vol, store) = rt.block_on(volume::open_s3(&location, &s3.options()?, keys))?;
        let (sse, wrapped) =
            volume::server_side_encryption(&vol.config, vol.store.clone(), sse_c_key)?;
        let wrapped = rt.block_on(volume::with_names(&vol.config, &vol.crypt, wrapped, &sse))?;
        return Ok(Opened {
            vol: volume::Volume {
                store: wrapped,
                ..vol
            },
            sse,
            s3: Some(store),
        });
    }
    let source = Path::new(source);
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
    let vol = volume::open_local(source, &keys)?;
    let store = rt.block_on(volume::with_names(
        &vol.config,
        &vol.crypt,
        vol.store.clone(),
        &Default::default(),
    ))?;
    Ok(Opened {
        vol: volume::Volume { store, ..vol },
        sse: Default::default(),
        s3: None,
    })
}

/// A store opened without its volume's keys, wrapped in name encryption where the volume
/// has it on (which then does need a root key).
fn with_names_keyed(
    rt: &tokio::runtime::Runtime,
    config: &volume::VolumeConfig,
    store: Arc<dyn ObjectStore>,
    keys: &[PathBuf],
    sse: &coffer::store::Sse,
) -> Result<Arc<dyn ObjectStore>> {
    if !config.encryption.name_encryption {
        return Ok(store);
    }
    if keys.is_empty() {
        bail!("this store encrypts names: pass --key with its root key");
    }
    let crypt = coffer::crypt::Crypt::new(
        coffer::crypt::Mode::Client(volume::load_keys(keys)?),
        config.chunk_shift,
    );
    rt.block_on(volume::with_names(config, &crypt, store, sse))
}

/// A store opened without keys, for commands that only move objects (restore, gc).
fn open_store_only(
    rt: &tokio::runtime::Runtime,
    source: &str,
    s3: &S3Args,
) -> Result<(
    Arc<dyn ObjectStore>,
    Option<volume::StoreLock>,
    volume::VolumeConfig,
)> {
    if S3Location::is_s3(source) {
        let store = rt.block_on(S3Store::connect(S3Location::parse(source)?, &s3.options()?))?;
        let cfg = rt.block_on(volume::read_s3_config(&store))?;
        return Ok((Arc::new(store), None, cfg));
    }
    let path = Path::new(source);
    let lock = volume::lock_store(path, true)?;
    let cfg = volume::VolumeConfig::read(path)?;
    let store = coffer::store::local::LocalStore::open(&cfg.local_store_config(path)?)
        .map_err(|e| anyhow!("{e}"))?;
    Ok((Arc::new(store), Some(lock), cfg))
}

/// Versions need a store that keeps them; say so plainly when it does not.
fn require_versioning(rt: &tokio::runtime::Runtime, store: &dyn ObjectStore) -> Result<()> {
    if !rt.block_on(store.versioning_enabled())? {
        bail!(
            "{} does not keep versions: enable versioning on the bucket (or create the local store without --no-versioning) to list and restore old versions",
            store.describe()
        );
    }
    Ok(())
}

fn ls(a: ReadArgs) -> Result<()> {
    let rt = runtime()?;
    let opened = open_source(&rt, &a.source, &a.key, &a.s3, a.sse_c_key.as_deref())?;
    let vol = &opened.vol;
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
        if opened.s3.is_some() && prefix.is_empty() && p == &format!("{}/", volume::RESERVED_NAME) {
            continue;
        }
        // The mount's attribute indexes (a cache of the files' metadata).
        if prefix.is_empty() && p == &format!("{}/", coffer::vfs::ATTR_INDEX_DIR) {
            continue;
        }
        writeln!(out, "{:>12}  {}", "dir", &p[prefix.len()..])?;
    }
    for o in &page.objects {
        let name = &o.key[prefix.len()..];
        if name.is_empty() || (prefix.is_empty() && name == volume::S3_CONFIG_KEY) {
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
    let rt = runtime()?;
    let opened = open_source(&rt, &a.source, &a.key, &a.s3, a.sse_c_key.as_deref())?;
    let vol = &opened.vol;
    let key = a.path.trim_matches('/').to_string();
    rt.block_on(async {
        let cache = coffer::cache::ChunkCache::new(64 << 20);
        let (obj, _) = coffer::cache::CommittedObject::open(
            vol.store.as_ref(),
            &vol.crypt,
            &cache,
            &key,
            opened.get_opts(),
            None,
        )
        .await
        .with_context(|| format!("opening {key}"))?;
        let mut out = std::io::stdout().lock();
        let step = 8 << 20;
        let mut off = 0;
        // Only large copies are worth a progress display.
        let mut progress =
            (obj.plain_size >= 256 << 20).then(|| coffer::progress::Progress::new("cat", "bytes"));
        while off < obj.plain_size {
            if let Some(p) = &mut progress {
                p.update(off, obj.plain_size);
            }
            let data = obj
                .read(vol.store.as_ref(), &cache, off..off + step)
                .await
                .with_context(|| format!("reading {key} at {off}"))?;
            out.write_all(&data)?;
            cache.forget_object(obj.cache_id);
            off += step;
        }
        out.flush()?;
        if let Some(p) = progress {
            p.finish();
        }
        Ok(())
    })
}

fn scrub_cmd(a: ScrubArgs) -> Result<()> {
    let _lock = volume::lock_store(&a.source, true)?;
    let cfg = volume::VolumeConfig::read(&a.source)?;
    let store = coffer::store::local::LocalStore::open(&cfg.local_store_config(&a.source)?)
        .map_err(|e| anyhow!("{e}"))?;
    let mut progress = coffer::progress::Progress::new("scrub", "keys");
    let report = scrub::scrub(&store, a.repair, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
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
    let rt = runtime()?;
    let (store, _lock, config) = open_store_only(&rt, &a.source, &a.s3)?;
    require_versioning(&rt, store.as_ref())?;
    // Listing versions needs no key, unless the names are encrypted.
    let store = if config.encryption.name_encryption {
        let (sse, store) = volume::server_side_encryption(&config, store, a.sse_c_key.as_deref())?;
        with_names_keyed(&rt, &config, store, &a.key, &sse)?
    } else {
        store
    };
    let list = rt.block_on(store.list_versions(a.path.trim_matches('/')))?;
    let g = config.geometry();
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
    // Restoring copies a version inside the store: no root key is needed (an SSE-C store
    // needs its customer key, which the server asks for on the copy).
    let rt = runtime()?;
    let (store, _lock, config) = open_store_only(&rt, &a.source, &a.s3)?;
    require_versioning(&rt, store.as_ref())?;
    let (sse, store) = volume::server_side_encryption(&config, store, a.sse_c_key.as_deref())?;
    let store = with_names_keyed(&rt, &config, store, &a.key, &sse)?;
    let key = a.path.trim_matches('/');
    let info = rt.block_on(store.restore_version(key, &a.version, &sse))?;
    eprintln!(
        "restored {key} from version {} as {}",
        a.version,
        info.version_id.unwrap_or_default()
    );
    Ok(())
}

fn store_throughput(source: &str, size_mib: u64, drop_caches: bool, s3: &S3Args) -> Result<()> {
    let rt = runtime()?;
    let (store, _lock, _) = open_store_only(&rt, source, s3)?;
    let key = format!("coffer-throughput-{}", std::process::id());
    let t = rt.block_on(coffer::store::throughput::measure(
        store,
        &key,
        size_mib << 20,
        || {
            if drop_caches {
                coffer::store::throughput::drop_page_cache()?;
            }
            Ok(())
        },
    ))?;
    println!(
        "{{\"bytes\":{},\"put_mbps\":{:.1},\"get_mbps\":{:.1}}}",
        t.bytes,
        t.put_mbps(),
        t.get_mbps()
    );
    Ok(())
}

fn gc(a: GcArgs) -> Result<()> {
    if !S3Location::is_s3(&a.source) {
        bail!(
            "gc is for S3 stores; a local store cleans up after crashed writes when mounted (and `coffer scrub --repair` removes leftovers)"
        );
    }
    let rt = runtime()?;
    let store = rt.block_on(S3Store::connect(
        S3Location::parse(&a.source)?,
        &a.s3.options()?,
    ))?;
    rt.block_on(volume::read_s3_config(&store))?;
    let n = rt.block_on(
        store.abort_stale_uploads(std::time::Duration::from_secs_f64(
            a.older_than_hours.max(0.0) * 3600.0,
        )),
    )?;
    println!("aborted {n} stale multipart uploads");
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

fn key_rotate(source: &str, to: &Path, keys: &[PathBuf], s3: &S3Args) -> Result<()> {
    use coffer::crypt::keys::KeyProvider;
    let rt = runtime()?;
    let _lock = if S3Location::is_s3(source) {
        None
    } else {
        Some(volume::lock_store(Path::new(source), true)?)
    };
    let opened = open_source(&rt, source, keys, s3, None)?;
    let vol = opened.vol;
    let from: Arc<dyn KeyProvider> =
        vol.crypt.provider().cloned().ok_or_else(|| {
            anyhow!("this store is not encrypted on the client: nothing to rotate")
        })?;
    let new: Arc<dyn KeyProvider> = volume::load_keys(&[to.to_path_buf()])?;
    let mut progress = coffer::progress::Progress::new("key rotate", "objects");
    let report = rt.block_on(coffer::crypt::rotate::rotate(
        vol.store.as_ref(),
        "",
        &from,
        &new,
        &mut |done, total| progress.update(done, total),
    ))?;
    progress.finish();
    // From now on the store expects the new key.
    let mut cfg = vol.config.clone();
    cfg.encryption.key_ids = new.key_ids();
    if let Some(encoded) = &cfg.encryption.name_key {
        // The name key is rewrapped like a data key; names stay as they are.
        let env = coffer::crypt::envelope::Envelope::decode(encoded)?;
        let dk = rt.block_on(from.unwrap(&env))?;
        cfg.encryption.name_key = Some(rt.block_on(new.wrap(&dk, &env.file_id))?.encode());
    }
    match &opened.s3 {
        Some(store) => rt.block_on(volume::write_s3_config(store, &cfg))?,
        None => volume::write_config(Path::new(source), &cfg)?,
    }
    println!(
        "rotated: {} objects, {} rewrapped, {} already under the new key, {} not encrypted",
        report.objects, report.rewrapped, report.already_current, report.unencrypted
    );
    Ok(())
}
