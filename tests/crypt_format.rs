//! The object format: golden objects, every tamper case of docs/FORMAT.md, random sizes and
//! ranges, and hostile headers and envelopes.

use std::sync::Arc;

use coffer::crypt::content::{ContentCipher, DataKey};
use coffer::crypt::envelope::{Envelope, METADATA_KEY};
use coffer::crypt::format::{Geometry, HEADER_LEN, Header, TAG_LEN};
use coffer::crypt::keys::{KeyRing, RootKey};
use coffer::crypt::{Crypt, CryptError, Mode, decrypt_all, encrypt_all};
use coffer::store::Metadata;
use proptest::prelude::*;
use zeroize::Zeroizing;

const SHIFT: u8 = 12; // 4 KiB chunks keep the cases small
const C: usize = 1 << SHIFT;

fn ring(seed: u8) -> Arc<KeyRing> {
    Arc::new(KeyRing::new(vec![RootKey::from_bytes(Zeroizing::new([seed; 32]))]).unwrap())
}

fn crypt(seed: u8) -> Crypt {
    Crypt::new(Mode::Client(ring(seed)), SHIFT)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// The golden objects of format version 1: name and plaintext.
fn golden_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("v1-empty", Vec::new()),
        ("v1-small", b"coffer golden object, format 1\n".to_vec()),
        (
            "v1-multi",
            (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        ),
    ]
}

/// Golden objects of format version 1, written once and committed: read forever after.
#[test]
fn golden_objects_of_version_1_still_read() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let c = Crypt::new(Mode::Client(ring(0x42)), 16);
    for (name, expected) in golden_cases() {
        let body = std::fs::read(golden.join(format!("{name}.body"))).unwrap_or_else(|e| {
            panic!("{name}.body: {e} (written by the ignored test write_golden_objects)")
        });
        let meta: Metadata = serde_json::from_str(
            &std::fs::read_to_string(golden.join(format!("{name}.meta.json"))).unwrap(),
        )
        .unwrap();
        let plain = rt().block_on(decrypt_all(&c, &meta, &body)).unwrap();
        assert_eq!(plain, expected, "{name}");
    }
}

/// Writes the golden objects: run once per format version with
/// `cargo test --test crypt_format write_golden_objects -- --ignored`, then commit them.
#[test]
#[ignore = "writes the golden files; run once per format version"]
fn write_golden_objects() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let c = Crypt::new(Mode::Client(ring(0x42)), 16);
    for (name, data) in golden_cases() {
        let (body, meta) = rt().block_on(encrypt_all(&c, &data)).unwrap();
        std::fs::write(golden.join(format!("{name}.body")), body).unwrap();
        std::fs::write(
            golden.join(format!("{name}.meta.json")),
            serde_json::to_string_pretty(&meta).unwrap(),
        )
        .unwrap();
    }
}

fn sealed(data: &[u8]) -> (Vec<u8>, Metadata) {
    rt().block_on(encrypt_all(&crypt(1), data)).unwrap()
}

fn open(body: &[u8], meta: &Metadata) -> Result<Vec<u8>, CryptError> {
    rt().block_on(decrypt_all(&crypt(1), meta, body))
}

fn chunk_at(i: usize) -> std::ops::Range<usize> {
    let start = HEADER_LEN + i * (C + TAG_LEN);
    start..start + C + TAG_LEN
}

#[test]
fn every_tamper_case_fails() {
    let data: Vec<u8> = (0..(3 * C + 100)).map(|i| (i * 13) as u8).collect();
    let (body, meta) = sealed(&data);
    assert_eq!(open(&body, &meta).unwrap(), data);
    let mut cases: Vec<(&str, Vec<u8>, Metadata)> = Vec::new();
    // Swap chunks 0 and 1.
    let mut b = body.clone();
    let (c0, c1) = (body[chunk_at(0)].to_vec(), body[chunk_at(1)].to_vec());
    b[chunk_at(0)].copy_from_slice(&c1);
    b[chunk_at(1)].copy_from_slice(&c0);
    cases.push(("swap chunks", b, meta.clone()));
    // Drop a middle chunk.
    let mut b = body.clone();
    b.drain(chunk_at(1));
    cases.push(("drop a chunk", b, meta.clone()));
    // Truncate at a chunk boundary (drop the last chunk).
    cases.push((
        "truncate at boundary",
        body[..chunk_at(3).start].to_vec(),
        meta.clone(),
    ));
    // Truncate inside a chunk.
    cases.push((
        "truncate inside",
        body[..body.len() - 5].to_vec(),
        meta.clone(),
    ));
    // Append a copy of a full chunk (extension).
    let mut b = body.clone();
    b.extend_from_slice(&body[chunk_at(0)]);
    cases.push(("append a chunk", b, meta.clone()));
    // Flip a bit in a chunk's ciphertext and in a tag.
    let mut b = body.clone();
    b[chunk_at(2).start + 7] ^= 1;
    cases.push(("flip ciphertext", b, meta.clone()));
    let mut b = body.clone();
    b[chunk_at(1).end - 1] ^= 0x80;
    cases.push(("flip tag", b, meta.clone()));
    // Edit every header field.
    for (i, v) in [(4usize, 2u8), (5, 2), (6, 13), (7, 1), (8, 0), (30, 0)] {
        let mut b = body.clone();
        b[i] = if b[i] == v { v ^ 1 } else { v };
        cases.push(("edit header", b, meta.clone()));
    }
    // Another object's wrapped key (same root key): the commitment check stops it.
    let (other_body, other_meta) = sealed(b"another file");
    cases.push(("swap wrapped key", body.clone(), other_meta.clone()));
    // Another object's header and key together with this body's chunks.
    let mut b = other_body[..HEADER_LEN].to_vec();
    b.extend_from_slice(&body[HEADER_LEN..]);
    cases.push(("swap header and key", b, other_meta));
    // A tampered envelope.
    let mut m = meta.clone();
    let mut env = Envelope::decode(&m[METADATA_KEY]).unwrap();
    env.wrapped[20] ^= 1;
    m.insert(METADATA_KEY.into(), env.encode());
    cases.push(("tamper envelope", body.clone(), m));
    // No envelope at all (a plaintext object planted by someone else).
    cases.push(("missing envelope", body.clone(), Metadata::new()));
    for (what, b, m) in cases {
        let r = open(&b, &m);
        assert!(r.is_err(), "{what}: decrypted anyway");
    }
}

#[test]
fn commitment_is_checked_before_any_chunk() {
    let dk = DataKey::generate();
    let c = ContentCipher::for_new_object(&dk, [1; 16], SHIFT);
    let other = DataKey::generate();
    assert_eq!(
        ContentCipher::for_existing_object(&other, c.header()).err(),
        Some(CryptError::CommitmentMismatch)
    );
}

#[test]
fn truncated_objects_have_invalid_sizes() {
    let g = Geometry::encrypted(SHIFT);
    let (body, _) = sealed(&vec![1u8; 2 * C]);
    assert_eq!(g.plain_size(body.len() as u64), Ok(2 * C as u64));
    for cut in [1, TAG_LEN, C + TAG_LEN - 1] {
        let s = body.len() - cut;
        if let Ok(p) = g.plain_size(s as u64) {
            // A size that parses must not decrypt: the last chunk's flag or tag fails.
            assert!(p < 2 * C as u64);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_sizes_and_ranges_round_trip(
        size in prop_oneof![Just(0usize), Just(1), Just(C - 1), Just(C), Just(C + 1), 0usize..(9 * C)],
        ranges in proptest::collection::vec((0usize..(10 * C), 0usize..(3 * C)), 1..8),
    ) {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let c = crypt(9);
        let (body, meta) = rt().block_on(encrypt_all(&c, &data)).unwrap();
        let g = c.geometry();
        prop_assert_eq!(g.plain_size(body.len() as u64).unwrap(), size as u64);
        let cipher = rt().block_on(c.open_object(&meta, &body[..HEADER_LEN])).unwrap();
        for (start, len) in ranges {
            let end = (start + len).min(size);
            let chunks = g.chunks_of(start as u64..end as u64, size as u64);
            if chunks.is_empty() {
                continue;
            }
            let stored = g.stored_range(chunks.clone(), size as u64);
            let opened = cipher.open(chunks.clone(), size as u64, &body[stored.start as usize..stored.end as usize]).unwrap();
            let flat = opened.concat();
            let base = chunks.start as usize * C;
            prop_assert_eq!(&flat[start - base..end - base], &data[start..end]);
            // Opened in place, as the reader does: the same plaintext, chunk for chunk.
            let piece = bytes::Bytes::copy_from_slice(&body[stored.start as usize..stored.end as usize]);
            let (shared, held) = cipher.open_shared(chunks.clone(), size as u64, piece).unwrap();
            prop_assert!(held >= (stored.end - stored.start) as usize);
            prop_assert_eq!(shared.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), opened);
        }
    }

    #[test]
    fn arbitrary_headers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..100)) {
        let _ = Header::parse(&b);
        let dk = DataKey::from_bytes([3; 32]);
        let _ = ContentCipher::for_existing_object(&dk, &b);
    }

    #[test]
    fn arbitrary_bodies_and_envelopes_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        env in ".{0,200}",
        size in any::<u64>(),
    ) {
        let mut m = Metadata::new();
        m.insert(METADATA_KEY.into(), env);
        let _ = open(&body, &m);
        let _ = Geometry::encrypted(SHIFT).plain_size(size);
        let _ = Geometry::encrypted(24).plain_size(size);
    }
}
