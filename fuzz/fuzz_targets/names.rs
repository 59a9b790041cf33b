//! The name decoder of encrypted-name stores: object key components from a listing (which
//! anyone who can write the bucket controls) decrypted under a fixed name key.

#![no_main]

use coffer::crypt::content::DataKey;
use coffer::crypt::names::{self, NameCipher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let cipher = NameCipher::from_data_key(&DataKey::from_bytes([3; 32]));
    let (parent, component) = s.split_once('\n').unwrap_or(("dir", s));
    if let Ok(name) = cipher.decrypt(parent, component) {
        // Only what was encrypted decrypts: it encrypts back to the same component.
        assert_eq!(cipher.encrypt(parent, &name), component);
    }
    let _ = names::is_long(component);
    let _ = names::is_sidecar(component);
    let _ = names::stored_component(component);
});
