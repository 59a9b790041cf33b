//! What the targets share: fixed keys (the fuzzer explores the parsers, not the keys) and a
//! sealed object of three chunks to mutate.

use std::sync::{Arc, OnceLock};

use coffer::crypt::keypair::KeyPair;
use coffer::crypt::keys::{KeyProvider, KeyRing, ProviderChain, RootKey};
use coffer::crypt::{Crypt, Mode};
use coffer::store::Metadata;

/// 4 KiB chunks: the smallest the format allows, so a seed holds several.
pub const CHUNK_SHIFT: u8 = 12;

pub fn provider() -> Arc<dyn KeyProvider> {
    static P: OnceLock<Arc<dyn KeyProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let ring = KeyRing::new(vec![RootKey::from_bytes(zeroize::Zeroizing::new([7; 32]))])
            .expect("one key");
        Arc::new(ProviderChain(vec![
            Arc::new(ring),
            Arc::new(KeyPair::generate()),
        ]))
    })
    .clone()
}

pub fn crypt() -> Crypt {
    Crypt::new(Mode::Client(provider()), CHUNK_SHIFT)
}

/// The plaintext of the sealed object: two full chunks and a partial one.
pub fn plaintext() -> Vec<u8> {
    (0..10_000u32).map(|i| (i % 251) as u8).collect()
}

/// A sealed object (body, metadata) under the fixed key, made once per process.
pub fn sealed() -> &'static (Vec<u8>, Metadata) {
    static S: OnceLock<(Vec<u8>, Metadata)> = OnceLock::new();
    S.get_or_init(|| {
        futures::executor::block_on(coffer::crypt::encrypt_all(&crypt(), &plaintext()))
            .expect("sealing works")
    })
}

/// Inputs starting with `M` are edits of a valid value instead of a value: pairs of a
/// little-endian u16 position and a byte to xor there, then a final u16 to cut the length
/// to (if any). Random bytes never make a valid sealed object, so this is how the fuzzer
/// reaches the checks past the header and the commitment.
pub fn mutated(valid: &[u8], input: &[u8]) -> Option<Vec<u8>> {
    let edits = input.strip_prefix(b"M")?;
    let mut v = valid.to_vec();
    let mut it = edits.chunks_exact(3);
    for e in &mut it {
        let pos = u16::from_le_bytes([e[0], e[1]]) as usize;
        if let Some(b) = v.get_mut(pos) {
            *b ^= e[2];
        }
    }
    if let [a, b] = it.remainder() {
        v.truncate(u16::from_le_bytes([*a, *b]) as usize);
    }
    Some(v)
}
