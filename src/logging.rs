//! Where logs go: standard error in the foreground, a log file (reopened on SIGHUP, for
//! logrotate), or syslog for a detached mount without a log file (journald reads it too).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// A log file that can be reopened under the same name.
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<Arc<LogFile>> = OnceLock::new();

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFileMaker> {
        let lf = Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(open_append(path)?),
        });
        let _ = LOG_FILE.set(lf.clone());
        Ok(LogFileMaker(lf))
    }
}

/// Reopens the log file (after logrotate moved it); a no-op without one.
pub fn reopen() {
    if let Some(lf) = LOG_FILE.get()
        && let Ok(f) = open_append(&lf.path)
        && let Ok(mut cur) = lf.file.lock()
    {
        *cur = f;
    }
}

pub struct LogFileWriter(Arc<LogFile>);

impl Write for LogFileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .file
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The log file as tracing's writer.
#[derive(Clone)]
pub struct LogFileMaker(pub Arc<LogFile>);

impl<'a> MakeWriter<'a> for LogFileMaker {
    type Writer = LogFileWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogFileWriter(self.0.clone())
    }
}

/// Sends each formatted event to syslog(3) at its level. Hand-written over libc: glibc's
/// syslog reaches journald or any syslog daemon through /dev/log, and a crate would add
/// nothing but a dependency.
#[derive(Clone, Copy)]
pub struct Syslog;

impl Syslog {
    pub fn init() -> Syslog {
        static IDENT: &[u8] = b"coffer\0";
        // SAFETY: IDENT is a static NUL-terminated string that outlives every syslog call.
        unsafe { libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_DAEMON) };
        Syslog
    }
}

pub struct SyslogWriter {
    priority: libc::c_int,
    buf: Vec<u8>,
}

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf).replace('\0', " ");
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if let Ok(msg) = CString::new(text) {
            // SAFETY: a constant format string and a NUL-terminated argument.
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), msg.as_ptr()) };
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogWriter {
            priority: libc::LOG_INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        let priority = match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        SyslogWriter {
            priority,
            buf: Vec::new(),
        }
    }
}

/// Tells systemd (`Type=notify`) how the service is doing; a no-op outside systemd.
pub fn sd_notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
}
