//! coffer: an encrypted, replicated filesystem over objects.
//!
//! Layers, top to bottom (each testable without the ones above it):
//! - [`fs`]: the FUSE adapter, a thin map from kernel requests to the vfs;
//! - [`vfs`]: POSIX semantics over objects (inodes, handles, directories, rename);
//! - [`cache`]: chunk cache, read-ahead, write staging and streaming upload;
//! - [`crypt`]: the object format, envelopes and key providers;
//! - [`store`]: the [`store::ObjectStore`] trait and its backends.

pub mod blocking;
pub mod buffers;
pub mod cache;
pub mod config;
pub mod control;
pub mod crypt;
pub mod error;
pub mod fs;
pub mod kms;
pub mod logging;
pub mod mount;
pub mod progress;
pub mod store;
pub mod vfs;
pub mod volume;
