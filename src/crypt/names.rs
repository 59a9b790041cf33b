//! Name encryption: each path component encrypted deterministically with AES-SIV (RFC 5297),
//! authenticated and bound to its parent directory, and encoded for object keys.
//!
//! Deterministic, so that a lookup encrypts the name it looks for instead of listing; bound to
//! the plaintext path of the parent (the associated data), so that an encrypted name moved
//! into another directory no longer decrypts, and equal names in different directories have
//! unrelated encryptions. The encoding is unpadded base64url: object-key safe, never `.` or
//! `%`, and case matters on every backend coffer writes to.
//!
//! A component whose encoding is longer than [`LONG_NAME_LIMIT`] is stored as `~` and the
//! base64url SHA-256 of the encoding, with the full encoding in a small sidecar object next to
//! it (`<hashed>.n`), as gocryptfs keeps its long names: names are never rejected for length.

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CryptError;
use super::content::DataKey;

/// Longest encoded component stored as it is; longer ones are hashed. 176 characters keep
/// an encrypted component inside one file name of the local store (255 bytes) and leave room
/// for several levels in an S3 key (1,024 bytes).
pub const LONG_NAME_LIMIT: usize = 176;
/// First character of a hashed (long) component: not in the base64url alphabet.
pub const LONG_PREFIX: char = '~';
/// Suffix of a long name's sidecar object: `.` is not in the base64url alphabet either.
pub const SIDECAR_SUFFIX: &str = ".n";

const AD_TAG: &[u8] = b"coffer name v1";

/// The per-store name key (64 bytes of AES-SIV key, derived from a wrapped data key).
pub struct NameCipher {
    key: Zeroizing<[u8; 64]>,
}

impl std::fmt::Debug for NameCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameCipher(<redacted>)")
    }
}

impl NameCipher {
    /// Derives the AES-SIV key from the store's name data key with HKDF-SHA256.
    pub fn from_data_key(dk: &DataKey) -> NameCipher {
        let mut key = Zeroizing::new([0u8; 64]);
        Hkdf::<Sha256>::new(None, dk.bytes())
            .expand(b"coffer name key v1", &mut *key)
            .expect("64 bytes is a valid HKDF-SHA256 length");
        NameCipher { key }
    }

    fn siv(&self) -> Aes256Siv {
        Aes256Siv::new(self.key.as_slice().into())
    }

    /// Encrypts one component `name` of the directory `parent` (the plaintext path without
    /// slashes at either end; "" for the root). Returns the encoding as it goes into a key,
    /// before any long-name hashing.
    pub fn encrypt(&self, parent: &str, name: &str) -> String {
        let ct = self
            .siv()
            .encrypt([AD_TAG, parent.as_bytes()], name.as_bytes())
            .expect("two headers and any plaintext are within AES-SIV's limits");
        URL_SAFE_NO_PAD.encode(ct)
    }

    /// Decrypts an encoded component of `parent`; fails for anything this key and parent did
    /// not produce (a name planted by someone else, or moved from another directory).
    pub fn decrypt(&self, parent: &str, encoded: &str) -> Result<String, CryptError> {
        let bad = |why: &str| CryptError::BadName(format!("{encoded:.40}: {why}"));
        let ct = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| bad("not base64url"))?;
        if ct.len() <= 16 {
            return Err(bad("too short"));
        }
        let pt = self
            .siv()
            .decrypt([AD_TAG, parent.as_bytes()], &ct)
            .map_err(|_| bad("does not authenticate in this directory"))?;
        let name = String::from_utf8(pt).map_err(|_| bad("not UTF-8"))?;
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            return Err(bad("not a file name"));
        }
        Ok(name)
    }
}

/// The component stored in keys for an encoding: itself, or its hash when it is too long.
pub fn stored_component(encoded: &str) -> String {
    if encoded.len() <= LONG_NAME_LIMIT {
        encoded.to_string()
    } else {
        format!(
            "{LONG_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(Sha256::digest(encoded.as_bytes()))
        )
    }
}

/// Whether a stored component is a hashed long name (its encoding is in a sidecar).
pub fn is_long(component: &str) -> bool {
    component.starts_with(LONG_PREFIX) && !component.ends_with(SIDECAR_SUFFIX)
}

/// Whether a stored component is a long name's sidecar object.
pub fn is_sidecar(component: &str) -> bool {
    component.starts_with(LONG_PREFIX) && component.ends_with(SIDECAR_SUFFIX)
}

/// Checks that a sidecar's content is the encoding its hashed component names.
pub fn sidecar_matches(component: &str, encoded: &str) -> bool {
    encoded.len() > LONG_NAME_LIMIT && stored_component(encoded) == component
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(b: u8) -> NameCipher {
        NameCipher::from_data_key(&DataKey::from_bytes([b; 32]))
    }

    #[test]
    fn round_trip_and_binding_to_the_parent() {
        let c = cipher(1);
        let e = c.encrypt("docs", "report.pdf");
        assert!(
            e.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(c.decrypt("docs", &e).unwrap(), "report.pdf");
        // Deterministic, and unrelated in another directory.
        assert_eq!(c.encrypt("docs", "report.pdf"), e);
        assert_ne!(c.encrypt("other", "report.pdf"), e);
        assert!(c.decrypt("other", &e).is_err(), "moved name decrypted");
        assert!(
            cipher(2).decrypt("docs", &e).is_err(),
            "wrong key decrypted"
        );
        let mut tampered = e.clone().into_bytes();
        tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
        assert!(
            c.decrypt("docs", &String::from_utf8(tampered).unwrap())
                .is_err()
        );
        for junk in [
            "",
            "a",
            "%%%",
            "~abc",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(c.decrypt("docs", junk).is_err(), "{junk:?} decrypted");
        }
    }

    #[test]
    fn known_answer() {
        // Fixed key and names give fixed encodings forever (names already stored must keep
        // decrypting). The expected values come from an independent implementation: Python's
        // `cryptography` (OpenSSL's AES-SIV and HKDF) with the same inputs.
        let c = cipher(7);
        assert_eq!(c.encrypt("", "a"), "5oj79dCks8WpqX7U7ICpV18");
        assert_eq!(
            c.encrypt("docs/2024", "report.pdf"),
            "jT5-khLLieJO_jMWw_5Zp9eczlxlt4ITTmk"
        );
        assert_eq!(
            c.decrypt("docs/2024", "jT5-khLLieJO_jMWw_5Zp9eczlxlt4ITTmk")
                .unwrap(),
            "report.pdf"
        );
    }

    #[test]
    fn long_names_hash_and_match_their_sidecar() {
        let c = cipher(1);
        let long = "x".repeat(255);
        let e = c.encrypt("", &long);
        assert!(e.len() > LONG_NAME_LIMIT);
        let s = stored_component(&e);
        assert!(s.len() < 50 && is_long(&s) && !is_sidecar(&s));
        assert!(sidecar_matches(&s, &e));
        assert!(!sidecar_matches(&s, &c.encrypt("", &"y".repeat(255))));
        let short = c.encrypt("", "short");
        assert_eq!(stored_component(&short), short);
        assert!(!is_long(&short));
        assert!(is_sidecar(&format!("{s}{SIDECAR_SUFFIX}")));
    }
}
