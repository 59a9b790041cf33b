//! The data path between the vfs and the store: decrypted chunk cache, ranged chunk reads,
//! streaming uploads and the encrypted staging of random writes.

pub mod buffers;
pub mod chunk_cache;
pub mod memory;
pub mod reader;
pub mod staging;
pub mod upload;

pub use chunk_cache::ChunkCache;
pub use reader::CommittedObject;
