//! Typed errors of the object store layer.
//!
//! Upper layers map these to errno values and decide what to retry: only
//! [`StoreError::Unavailable`] is transient.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: no such object")]
    NotFound { key: String },
    #[error("{key}: precondition failed: {detail}")]
    PreconditionFailed { key: String, detail: String },
    #[error("{key}: access denied: {detail}")]
    AccessDenied { key: String, detail: String },
    #[error("{key}: wrong or missing SSE-C customer key")]
    WrongKey { key: String },
    #[error("{key}: corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("{key}: no space left on device: {detail}")]
    NoSpace { key: String, detail: String },
    #[error("{key}: backend unavailable: {detail}")]
    Unavailable { key: String, detail: String },
    #[error("{key}: invalid request: {detail}")]
    Invalid { key: String, detail: String },
    #[error("{key}: name too long: {detail}")]
    NameTooLong { key: String, detail: String },
    #[error("{key}: replaced by another client while open for reading")]
    Changed { key: String },
    #[error("{key}: {context}: {source}")]
    Io {
        key: String,
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// Wraps an I/O error, turning ENOSPC and EDQUOT into [`StoreError::NoSpace`] so that the
    /// caller sees ENOSPC rather than a generic I/O failure.
    pub fn io(key: &str, context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace {
                key: key.to_string(),
                detail: format!("{context}: {source}"),
            },
            _ => StoreError::Io {
                key: key.to_string(),
                context,
                source,
            },
        }
    }

    pub fn not_found(key: &str) -> Self {
        StoreError::NotFound {
            key: key.to_string(),
        }
    }

    pub fn corrupt(key: &str, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    pub fn invalid(key: &str, detail: impl Into<String>) -> Self {
        StoreError::Invalid {
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// The errno a filesystem caller should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::NotFound { .. } => libc::ENOENT,
            StoreError::PreconditionFailed { .. } => libc::EEXIST,
            StoreError::AccessDenied { .. } | StoreError::WrongKey { .. } => libc::EACCES,
            StoreError::NoSpace { .. } => libc::ENOSPC,
            StoreError::Invalid { .. } => libc::EINVAL,
            StoreError::NameTooLong { .. } => libc::ENAMETOOLONG,
            StoreError::Corrupt { .. }
            | StoreError::Unavailable { .. }
            | StoreError::Changed { .. } => libc::EIO,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
