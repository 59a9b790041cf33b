//! Seal and open throughput of the object format, per core and on all cores, for 64 KiB and
//! 1 MiB chunks, against the raw AES-256-GCM-SIV throughput of the same crate on the same
//! machine, as ratios. `cargo bench --bench crypt_throughput`.

use std::time::Instant;

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use coffer::crypt::content::{ContentCipher, DataKey};

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Best of three timings of `f` processing `bytes`.
fn best(bytes: usize, mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            mbps(bytes, t.elapsed().as_secs_f64())
        })
        .fold(0.0, f64::max)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let total: usize = if quick { 8 << 20 } else { 256 << 20 };
    let data: Vec<u8> = (0..total).map(|i| (i * 31) as u8).collect();
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>16}",
        "chunk", "raw MB/s", "seal MB/s", "open MB/s", "seal/raw", "open/raw", "seal, all cores"
    );
    let mut json = Vec::new();
    for shift in [16u8, 20] {
        let chunk = 1usize << shift;
        let raw = Aes256GcmSiv::new_from_slice(&[7u8; 32]).unwrap();
        let mut buf = data.clone();
        let raw_mbps = best(total, || {
            for (i, c) in buf.chunks_mut(chunk).enumerate() {
                let mut n = [0u8; 12];
                n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let _ = raw
                    .encrypt_inout_detached(&Nonce::from(n), b"", c.into())
                    .unwrap();
            }
        });
        let cipher = ContentCipher::for_new_object(&DataKey::from_bytes([9; 32]), [1; 16], shift);
        let chunks = total / chunk;
        let mut sealed = Vec::with_capacity(total + chunks * 16);
        let seal_mbps = best(total, || {
            sealed.clear();
            for (i, c) in data.chunks(chunk).enumerate() {
                cipher.seal_chunk_into(i as u64, i == chunks - 1, c, &mut sealed);
            }
        });
        let mut open_buf = sealed.clone();
        let open_mbps = best(total, || {
            open_buf.copy_from_slice(&sealed);
            for (i, c) in open_buf.chunks_mut(chunk + 16).enumerate() {
                cipher
                    .open_chunk_in_place(i as u64, i == chunks - 1, c)
                    .unwrap();
            }
        });
        let all_mbps = best(total, || {
            let _ = cipher.seal_chunks(0, &data, true);
        });
        // Raw open is the same AES-GCM-SIV work as raw seal (CTR plus POLYVAL).
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>10.0} {:>9.3} {:>9.3} {:>16.0}",
            format!("{} KiB", chunk >> 10),
            raw_mbps,
            seal_mbps,
            open_mbps,
            seal_mbps / raw_mbps,
            open_mbps / raw_mbps,
            all_mbps
        );
        json.push(format!(
            "{{\"chunk\":{chunk},\"raw\":{raw_mbps:.0},\"seal\":{seal_mbps:.0},\"open\":{open_mbps:.0},\"seal_ratio\":{:.3},\"open_ratio\":{:.3},\"seal_all_cores\":{all_mbps:.0}}}",
            seal_mbps / raw_mbps,
            open_mbps / raw_mbps
        ));
    }
    println!("{{\"bench\":\"crypt\",\"results\":[{}]}}", json.join(","));
}
