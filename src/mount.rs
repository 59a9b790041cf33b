//! Running a mount: options, the FUSE session, the background attribute flusher, signals and
//! a clean unmount that commits every open file first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fuser::{Config, MountOption, SessionACL};
use tracing::{error, info, warn};

use crate::crypt::Crypt;
use crate::store::{ObjectStore, Sse};
use crate::vfs::{Defaults, Vfs, VfsConfig};

/// Threads reading requests from the kernel.
const FUSE_THREADS: usize = 4;

/// Options of one mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// `-o` options as given (comma-separated lists flattened).
    pub options: Vec<String>,
    pub cache_bytes: usize,
    /// Memory for caches and buffers: half for write buffers, the chunk cache within the
    /// other half.
    pub memory_limit: usize,
    pub cache_dir: PathBuf,
    pub fsname: String,
    /// Scrub (and repair) this local store in the background at this interval.
    pub scrub: Option<(crate::store::local::LocalStore, Duration)>,
    /// How long directory listings are trusted (stores other clients write to).
    pub metadata_ttl: Option<Duration>,
    /// A top-level name the mount hides (the store's own data).
    pub reserved_root_name: Option<String>,
    /// Serve the statistics to Prometheus on this loopback address.
    pub prometheus: Option<std::net::SocketAddr>,
}

/// What the `-o` options ask of the kernel and of the vfs.
struct Parsed {
    fuse: Vec<MountOption>,
    acl: SessionACL,
    read_only: bool,
    defaults: Defaults,
}

fn parse_options(opts: &[String]) -> Result<Parsed> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut p = Parsed {
        fuse: vec![MountOption::DefaultPermissions],
        acl: SessionACL::Owner,
        read_only: false,
        defaults: Defaults {
            uid,
            gid,
            file_perm: 0o644,
            dir_perm: 0o755,
        },
    };
    let mut umask = 0o022;
    for o in opts
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (name, value) = match o.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (o, None),
        };
        let num = |radix: u32| -> Result<u32> {
            let v = value.ok_or_else(|| anyhow!("-o {name} needs a value"))?;
            u32::from_str_radix(v, radix).map_err(|_| anyhow!("-o {name}={v}: not a number"))
        };
        match name {
            "allow_other" => p.acl = SessionACL::All,
            "allow_root" => p.acl = SessionACL::RootAndOwner,
            "default_permissions" => {}
            "ro" => {
                p.read_only = true;
                p.fuse.push(MountOption::RO);
            }
            "rw" => p.fuse.push(MountOption::RW),
            "uid" => p.defaults.uid = num(10)?,
            "gid" => p.defaults.gid = num(10)?,
            "umask" => umask = num(8)?,
            "noatime" => p.fuse.push(MountOption::NoAtime),
            "nodev" => p.fuse.push(MountOption::NoDev),
            "nosuid" => p.fuse.push(MountOption::NoSuid),
            "noexec" => p.fuse.push(MountOption::NoExec),
            "exec" => p.fuse.push(MountOption::Exec),
            "suid" => p.fuse.push(MountOption::Suid),
            "dev" => p.fuse.push(MountOption::Dev),
            "auto_unmount" => p.fuse.push(MountOption::AutoUnmount),
            // Options for mount(8) and systemd, not for the filesystem.
            "_netdev" | "nofail" | "auto" | "noauto" | "user" | "users" | "nouser" | "defaults" => {
            }
            n if n.starts_with("x-") || n.starts_with("comment=") => {}
            other => bail!("unknown mount option {other:?}"),
        }
    }
    p.defaults.file_perm = 0o666 & !umask;
    p.defaults.dir_perm = 0o777 & !umask;
    Ok(p)
}

/// glibc raises its mmap threshold each time a large block is freed, after which the
/// multi-MiB part buffers of uploads are carved from the heap arenas and their memory is
/// kept after release: resident memory then grows far past what is in use. A fixed
/// threshold keeps large buffers in their own mappings, returned to the system on free.
fn limit_heap_growth() {
    // SAFETY: mallopt only tunes the allocator; called before the worker threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Clears a mount point left behind by a crashed mount ("Transport endpoint is not
/// connected") so that the new mount can take its place.
pub fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        warn!(
            "{} is a stale mount of a process that died; clearing it",
            mountpoint.display()
        );
        let status = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(mountpoint)
                .status();
        }
    }
}

/// Mounts and serves until unmounted, SIGINT or SIGTERM; then commits every open file and
/// unmounts. `ready` is called once the mount answers.
pub fn run(
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    crypt: Crypt,
    sse: Sse,
    opts: MountOptions,
    ready: impl FnOnce(),
) -> Result<()> {
    let parsed = parse_options(&opts.options)?;
    limit_heap_growth();
    let has_fusermount = std::process::Command::new("fusermount3")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fusermount {
        bail!(
            "fusermount3 is not installed: install FUSE 3 (Debian and Ubuntu: apt-get install fuse3)"
        );
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available"
        );
    }
    clear_stale_mount(&opts.mountpoint);
    let meta = std::fs::metadata(&opts.mountpoint)
        .with_context(|| format!("mount point {}", opts.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!(
            "mount point {} is not a directory",
            opts.mountpoint.display()
        );
    }
    let staging_dir = opts.cache_dir.join(format!("mount-{}", std::process::id()));
    let cfg = VfsConfig {
        prefix: String::new(),
        defaults: parsed.defaults,
        cache_bytes: opts.cache_bytes.min(opts.memory_limit / 2),
        staging_dir: staging_dir.clone(),
        sse,
        read_only: parsed.read_only,
        meta_flush_interval: Duration::from_secs(1),
        write_buffer_bytes: Some(opts.memory_limit / 2),
        metadata_ttl: opts.metadata_ttl,
        reserved_root_name: opts.reserved_root_name.clone(),
    };
    info!(
        "mounting {} at {}",
        store.describe(),
        opts.mountpoint.display()
    );
    let vfs = Vfs::new(store, crypt, cfg);
    let fs = crate::fs::CofferFs::new(vfs.clone(), rt.handle().clone());
    let mut options = parsed.fuse;
    options.push(MountOption::FSName(opts.fsname.clone()));
    options.push(MountOption::Subtype("coffer".into()));
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = parsed.acl;
    // Requests run on their FUSE thread until they wait (see `fs`), and the local store's
    // work runs there too: more than one thread keeps one slow request from holding up the
    // rest, and lets concurrent small puts share a journal sync.
    config.n_threads = Some(FUSE_THREADS);
    // The signal handlers go in before the mount appears: a SIGUSR1 or SIGTERM sent as soon
    // as the mount point answers would otherwise find the default action (exit) in place.
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        let _runtime = rt.enter();
        let make = |kind| signal(kind).context("installing a signal handler");
        (
            make(SignalKind::terminate())?,
            make(SignalKind::interrupt())?,
            make(SignalKind::user_defined1())?,
            make(SignalKind::hangup())?,
        )
    };
    let session = fuser::Session::new(fs, &opts.mountpoint, &config)
        .with_context(|| format!("mounting at {}", opts.mountpoint.display()))?;
    let bg = session.spawn()?;

    // Content of files that were open when a mount crashed (see OPEN_DELETED_DIR).
    if !parsed.read_only {
        let vfs = vfs.clone();
        rt.spawn(async move {
            match vfs.clean_open_deleted().await {
                Ok(0) => {}
                Ok(n) => info!("deleted {n} files left open-and-deleted by an earlier mount"),
                Err(e) => warn!("cleaning files left open-and-deleted: {e}"),
            }
        });
    }

    // Attribute changes reach the store within a second.
    let flusher = {
        let vfs = vfs.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = vfs.flush_all_metadata().await {
                    warn!("background attribute flush: {e}");
                }
                // Directories unchanged for a few seconds get their attribute index.
                vfs.write_attr_indexes(Duration::from_secs(5)).await;
            }
        })
    };
    // Buffer pools that a burst of work filled and nothing used since give their memory back.
    rt.spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            crate::cache::buffers::trim_unused();
        }
    });
    let scrubber = opts.scrub.clone().map(|(store, every)| {
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await; // the first tick is immediate: wait a whole interval first
            loop {
                tick.tick().await;
                let s = store.clone();
                // Versions younger than half an interval (at most ten minutes) may be puts in
                // flight; the next round verifies them.
                let min_age = (every / 2).min(Duration::from_secs(600));
                let scrub = move || crate::store::local::scrub::scrub_live(&s, true, min_age);
                match tokio::task::spawn_blocking(scrub).await {
                    Ok(Ok(report)) => {
                        for d in &report.damage {
                            warn!("background scrub: {d:?}");
                        }
                        info!("background scrub: {}", report.summary());
                    }
                    Ok(Err(e)) => error!("background scrub failed: {e}"),
                    Err(e) => error!("background scrub task failed: {e}"),
                }
            }
        })
    });
    // Live statistics for `coffer stats` and, if asked, Prometheus.
    let control = match rt.block_on(async { crate::control::bind(&opts.mountpoint) }) {
        Ok((listener, path)) => {
            let task = rt.spawn(crate::control::serve(
                listener,
                vfs.clone(),
                opts.mountpoint.clone(),
            ));
            Some((task, path))
        }
        Err(e) => {
            warn!("no control socket for `coffer stats`: {e:#}");
            None
        }
    };
    let prometheus = match opts.prometheus {
        Some(addr) => {
            let listener = rt
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("binding the Prometheus endpoint {addr}"))?;
            info!("Prometheus metrics on http://{addr}/metrics");
            Some(rt.spawn(crate::control::serve_prometheus(listener, vfs.clone())))
        }
        None => None,
    };
    ready();
    crate::logging::sd_notify("READY=1");
    info!("mounted at {}", opts.mountpoint.display());

    // Wait for a signal, or for the kernel to end the session (fusermount3 -u, umount).
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    // SIGUSR1 writes the statistics to the log.
    let stats_vfs = vfs.clone();
    rt.spawn(async move {
        let (mut term, mut int, mut usr1, mut hup) = signals;
        let why = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = usr1.recv() => info!("{}", stats_vfs.stats_line()),
                _ = hup.recv() => {
                    crate::logging::reopen();
                    info!("SIGHUP: log file reopened");
                }
            }
        };
        let _ = tx.send(why);
    });
    let signalled = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(why) => break Some(why),
            Err(_) if bg.guard.is_finished() => break None,
            Err(_) => {}
        }
    };
    crate::logging::sd_notify("STOPPING=1");
    let joined = match signalled {
        Some(why) => {
            info!("{why}: committing open files and unmounting");
            // Commit while still mounted, so that nothing waits on a dead mount, then
            // unmount.
            if let Err(e) = rt.block_on(vfs.flush_everything()) {
                error!("committing open files: {e}");
            }
            bg.umount_and_join()
        }
        None => bg.join(),
    };
    // Stop the background flusher before the last flush; what it had not written yet is
    // still marked dirty and goes out with that flush.
    flusher.abort();
    let _ = rt.block_on(flusher);
    if let Some(s) = scrubber {
        s.abort();
    }
    if let Some((task, path)) = control {
        task.abort();
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = prometheus {
        p.abort();
    }
    if let Err(e) = rt.block_on(vfs.flush_everything()) {
        error!("committing open files at unmount: {e}");
    }
    let _ = std::fs::remove_dir_all(&staging_dir);
    info!("{}", vfs.stats_line());
    info!("unmounted {}", opts.mountpoint.display());
    joined.map_err(|e| anyhow!("FUSE session: {e}"))
}

/// Whether `path` is a mount point in this namespace's mount table.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path
        .canonicalize()
        .or_else(|_| Ok::<_, ()>(path.to_path_buf()))
    else {
        return false;
    };
    let target = canon.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|mp| unescape_mount_path(mp) == target)
            })
        })
        .unwrap_or(false)
}

/// /proc/mounts escapes spaces, tabs, newlines and backslashes as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = s.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let p =
            parse_options(&["allow_other,ro".into(), "umask=077".into(), "uid=5".into()]).unwrap();
        assert!(p.read_only);
        assert_eq!(p.acl, SessionACL::All);
        assert_eq!(
            (p.defaults.file_perm, p.defaults.dir_perm, p.defaults.uid),
            (0o600, 0o700, 5)
        );
        assert!(parse_options(&["bogus".into()]).is_err());
        assert!(parse_options(&["_netdev,nofail,x-systemd.automount".into()]).is_ok());
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
