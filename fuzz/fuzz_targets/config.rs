//! The config decoders: a store's `coffer.toml` (also read from a bucket, so written by
//! whoever can write there) and a mount's config file.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = coffer::volume::VolumeConfig::parse(text, "fuzz") {
        let _ = cfg.geometry();
        let _ = cfg.local_store_config(Path::new("/nonexistent-coffer-fuzz"));
    }
    let _ = coffer::config::MountFile::parse(text, Path::new("/etc/coffer/fuzz.toml"));
});
