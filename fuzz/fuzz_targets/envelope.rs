//! The envelope decoder (object metadata `coffer-key`) and the unwrap of whatever it decodes,
//! by a symmetric key ring and a key pair.

#![no_main]

#[path = "common.rs"]
mod common;

use coffer::crypt::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let valid = common::sealed()
        .1
        .get(coffer::crypt::envelope::METADATA_KEY)
        .map(|s| Envelope::decode(s).unwrap().to_bytes())
        .unwrap();
    let edited = common::mutated(&valid, input);
    let data = edited.as_deref().unwrap_or(input);
    if let Ok(env) = Envelope::parse(data) {
        assert_eq!(env.to_bytes(), data, "parse and to_bytes disagree");
        let _ = futures::executor::block_on(common::provider().unwrap(&env));
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(env) = Envelope::decode(s)
    {
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        let _ = futures::executor::block_on(common::provider().unwrap(&env));
    }
});
