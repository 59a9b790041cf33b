//! The error type of the filesystem layers (cache, vfs, fs): store and crypt errors, or a
//! plain errno with a message. Every variant maps to the errno the caller sees.

use crate::crypt::CryptError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error("{1}")]
    Errno(i32, String),
    #[error("staging: {0}")]
    Staging(#[from] std::io::Error),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Store(e) => e.errno(),
            FsError::Crypt(e) => e.errno(),
            FsError::Errno(n, _) => *n,
            FsError::Staging(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        FsError::Errno(errno, msg.into())
    }
}
