//! Typed errors of the crypt layer. None of them carries key material.

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CryptError {
    #[error("not a coffer object: {0}")]
    BadHeader(String),
    #[error("unsupported format version {0} (this coffer reads version 1)")]
    UnsupportedVersion(u8),
    #[error("object size {0} is not a valid encrypted size (truncated or extended)")]
    BadSize(u64),
    #[error("key commitment mismatch: the data key does not belong to this object")]
    CommitmentMismatch,
    #[error("chunk {0} failed authentication (tampered, reordered, truncated or corrupt)")]
    ChunkAuth(u64),
    #[error("bad key envelope: {0}")]
    BadEnvelope(String),
    #[error(
        "this object's data key is wrapped by root key {0}, which is not loaded: pass --key with that key file"
    )]
    MissingKey(String),
    #[error("root key {0} failed to unwrap the data key (wrong key or tampered envelope)")]
    UnwrapFailed(String),
    #[error(
        "this mount holds only the public key {0}: it can write new files but not read existing content"
    )]
    WriteOnly(String),
    #[error("bad encrypted name {0}")]
    BadName(String),
    #[error("{0}")]
    Key(String),
}

impl CryptError {
    /// The errno a filesystem caller should see: EACCES for missing keys, EIO for damage.
    pub fn errno(&self) -> i32 {
        match self {
            CryptError::MissingKey(_) | CryptError::WriteOnly(_) | CryptError::Key(_) => {
                libc::EACCES
            }
            _ => libc::EIO,
        }
    }
}
