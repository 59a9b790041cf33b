//! The key service process: answers requests on its socket, checks each against the key's
//! policy with the caller's credentials, and logs every use.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::store::{KeyStore, now};
use super::{Request, Response};

pub const AUDIT_FILE: &str = "audit.log";

struct Service {
    keys: Mutex<KeyStore>,
    audit: Mutex<std::fs::File>,
    /// The uid the service runs as: it and root administer keys.
    owner: u32,
}

struct Caller {
    uid: u32,
    pid: i32,
}

impl Service {
    fn audit(
        &self,
        caller: &Caller,
        op: &str,
        key: &str,
        version: Option<u32>,
        context: &str,
        result: &str,
    ) {
        let line = format!(
            "{} op={op} key={key} version={} uid={} pid={} object={} result={result}\n",
            crate::vfs::attr::format_time(std::time::SystemTime::now()),
            version.map_or("-".into(), |v| v.to_string()),
            caller.uid,
            caller.pid,
            if context.is_empty() { "-" } else { context },
        );
        let mut f = self.audit.lock();
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.sync_data()) {
            warn!("audit log: {e}");
        }
    }

    fn is_admin(&self, c: &Caller) -> bool {
        c.uid == 0 || c.uid == self.owner
    }

    fn handle(&self, c: &Caller, req: Request) -> Response {
        let mut keys = self.keys.lock();
        let refuse = |why: String| Response::error(why);
        match req {
            Request::GenerateDataKey { key, context } | Request::Encrypt { key, context, .. }
                if keys.get(&key).is_err() =>
            {
                self.audit(c, "encrypt", &key, None, &context, "no such key");
                refuse(format!("no key named {key:?} in the key service"))
            }
            Request::GenerateDataKey { key, context } => {
                let r = self.encrypt_checks(&mut keys, c, &key, &context);
                if let Some(e) = r {
                    return e;
                }
                let mut dk = zeroize::Zeroizing::new([0u8; 32]);
                getrandom::fill(&mut *dk).expect("the OS random source works");
                match keys.wrap(&key, &*dk, &context) {
                    Ok((blob, version)) => {
                        self.audit(c, "generate_data_key", &key, Some(version), &context, "ok");
                        Response {
                            ok: true,
                            plaintext: Some(STANDARD.encode(*dk)),
                            blob: Some(STANDARD.encode(blob)),
                            version: Some(version),
                            ..Default::default()
                        }
                    }
                    Err(e) => refuse(e.to_string()),
                }
            }
            Request::Encrypt {
                key,
                plaintext,
                context,
            } => {
                if let Some(e) = self.encrypt_checks(&mut keys, c, &key, &context) {
                    return e;
                }
                let dk = zeroize::Zeroizing::new(STANDARD.decode(plaintext).unwrap_or_default());
                if dk.len() != 32 {
                    return refuse("a data key is 32 bytes".into());
                }
                match keys.wrap(&key, &dk, &context) {
                    Ok((blob, version)) => {
                        self.audit(c, "encrypt", &key, Some(version), &context, "ok");
                        Response {
                            ok: true,
                            blob: Some(STANDARD.encode(blob)),
                            version: Some(version),
                            ..Default::default()
                        }
                    }
                    Err(e) => refuse(e.to_string()),
                }
            }
            Request::Decrypt { key, blob, context } => {
                let k = match keys.get(&key) {
                    Ok(k) => k.clone(),
                    Err(e) => {
                        self.audit(c, "decrypt", &key, None, &context, "no such key");
                        return refuse(e.to_string());
                    }
                };
                if !k.enabled {
                    self.audit(c, "decrypt", &key, None, &context, "disabled");
                    return refuse(format!("key {key:?} is disabled in the key service"));
                }
                if !(c.uid == self.owner || k.decrypt_uids.contains(&c.uid)) {
                    self.audit(c, "decrypt", &key, None, &context, "denied");
                    return refuse(format!("uid {} may not decrypt with key {key:?}", c.uid));
                }
                let blob = STANDARD.decode(blob).unwrap_or_default();
                match keys.unwrap(&key, &blob, &context) {
                    Ok((dk, version)) => {
                        self.audit(c, "decrypt", &key, Some(version), &context, "ok");
                        Response {
                            ok: true,
                            plaintext: Some(STANDARD.encode(&*dk)),
                            version: Some(version),
                            ..Default::default()
                        }
                    }
                    Err(e) => {
                        self.audit(c, "decrypt", &key, None, &context, "bad blob");
                        refuse(e.to_string())
                    }
                }
            }
            admin if !self.is_admin(c) => {
                self.audit(c, "admin", "-", None, "", "denied");
                refuse(format!("uid {} may not administer keys ({admin:?})", c.uid))
            }
            Request::Create {
                key,
                encrypt_uids,
                decrypt_uids,
                rotate_days,
            } => self.admin_result(
                c,
                "create",
                &key,
                keys.create(&key, encrypt_uids, decrypt_uids, rotate_days)
                    .map(|()| Some(1)),
            ),
            Request::Disable { key } => self.admin_result(
                c,
                "disable",
                &key,
                keys.set_enabled(&key, false).map(|()| None),
            ),
            Request::Enable { key } => self.admin_result(
                c,
                "enable",
                &key,
                keys.set_enabled(&key, true).map(|()| None),
            ),
            Request::Rotate { key } => {
                self.admin_result(c, "rotate", &key, keys.rotate(&key).map(Some))
            }
            Request::List => {
                let text = keys
                    .names()
                    .into_iter()
                    .map(|(name, k)| {
                        format!(
                            "{name} {} versions={} encrypt_uids={:?} decrypt_uids={:?} rotate_days={}\n",
                            if k.enabled { "enabled" } else { "disabled" },
                            k.versions.len(),
                            k.encrypt_uids,
                            k.decrypt_uids,
                            k.rotate_days.map_or("-".into(), |d| d.to_string())
                        )
                    })
                    .collect();
                Response {
                    ok: true,
                    text: Some(text),
                    ..Default::default()
                }
            }
        }
    }

    /// The checks before a key wraps anything; rotates the key first if it is due.
    fn encrypt_checks(
        &self,
        keys: &mut KeyStore,
        c: &Caller,
        key: &str,
        context: &str,
    ) -> Option<Response> {
        let k = keys.get(key).ok()?.clone();
        if !k.enabled {
            self.audit(c, "encrypt", key, None, context, "disabled");
            return Some(Response::error(format!(
                "key {key:?} is disabled in the key service"
            )));
        }
        if !(c.uid == self.owner || k.encrypt_uids.contains(&c.uid)) {
            self.audit(c, "encrypt", key, None, context, "denied");
            return Some(Response::error(format!(
                "uid {} may not encrypt with key {key:?}",
                c.uid
            )));
        }
        match keys.rotate_if_due(key) {
            Ok(Some(v)) => {
                info!("key {key:?} rotated to version {v} (rotation period reached)");
                self.audit(c, "auto_rotate", key, Some(v), "", "ok");
            }
            Ok(None) => {}
            Err(e) => warn!("rotating key {key:?}: {e}"),
        }
        None
    }

    fn admin_result(&self, c: &Caller, op: &str, key: &str, r: Result<Option<u32>>) -> Response {
        match r {
            Ok(version) => {
                self.audit(c, op, key, version, "", "ok");
                Response {
                    ok: true,
                    version,
                    ..Default::default()
                }
            }
            Err(e) => {
                self.audit(c, op, key, None, "", "failed");
                Response::error(e.to_string())
            }
        }
    }
}

async fn connection(svc: Arc<Service>, stream: UnixStream) -> Result<()> {
    let cred = stream.peer_cred()?;
    let caller = Caller {
        uid: cred.uid(),
        pid: cred.pid().unwrap_or(0),
    };
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => svc.handle(&caller, req),
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn serve(dir: &Path, master: &[u8; 32], socket: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let keys = KeyStore::open(dir, master)?;
    let audit = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(AUDIT_FILE))
        .with_context(|| format!("opening {}", dir.join(AUDIT_FILE).display()))?;
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // Anyone may connect; every key's policy decides what each uid may do.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    let svc = Arc::new(Service {
        keys: Mutex::new(keys),
        audit: Mutex::new(audit),
        // SAFETY: getuid cannot fail.
        owner: unsafe { libc::getuid() },
    });
    info!(
        "key service on {} (keys in {}, started {})",
        socket.display(),
        dir.display(),
        now()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let svc = svc.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(svc, stream).await {
                        warn!("key service connection: {e}");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// The default socket of a service directory.
pub fn default_socket(dir: &Path) -> PathBuf {
    dir.join("kms.sock")
}
