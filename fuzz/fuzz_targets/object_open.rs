//! The object format parser and chunk opener on hostile bodies: the metadata is that of a real
//! object, the body is the fuzzer's. Opening must fail cleanly or give back exactly the
//! plaintext that was sealed (anything else would be a forgery).

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let (valid, meta) = common::sealed();
    let edited = common::mutated(valid, input);
    let body = edited.as_deref().unwrap_or(input);
    let crypt = common::crypt();
    let plain = common::plaintext();
    if let Ok(got) = futures::executor::block_on(coffer::crypt::decrypt_all(&crypt, meta, body)) {
        assert_eq!(
            got, plain,
            "a different body opened under the same envelope"
        );
    }
    // Each chunk alone, as a ranged read opens it.
    let g = crypt.geometry();
    let Ok(plain_size) = g.plain_size(body.len() as u64) else {
        return;
    };
    let header = &body[..(g.header_len() as usize).min(body.len())];
    let Ok(cipher) = futures::executor::block_on(crypt.open_object(meta, header)) else {
        return;
    };
    for i in 0..g.chunk_count(plain_size).min(64) {
        let r = g.stored_range(i..i + 1, plain_size);
        let Some(stored) = body.get(r.start as usize..r.end as usize) else {
            continue;
        };
        if let Ok(chunks) = cipher.open(i..i + 1, plain_size, stored) {
            let start = (i << common::CHUNK_SHIFT) as usize;
            let got = chunks.concat();
            assert_eq!(
                Some(&got[..]),
                plain.get(start..start + got.len()),
                "chunk {i} opened to other bytes"
            );
        }
    }
});
