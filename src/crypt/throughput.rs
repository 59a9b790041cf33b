//! Seal and open throughput of the object format, per core and on all cores, against the raw
//! AES-256-GCM-SIV throughput of the same crate on the same machine: the cipher's ceiling the
//! benchmark compares mounts with (`coffer crypt-throughput`, and
//! `cargo bench --bench crypt_throughput` for the table).
//!
//! In the library rather than only in the cargo bench so that scripts/bench measures it with
//! the binary it already built: `cargo bench` compiles the crate again with the
//! dev-dependencies' features, which took 95 of a quick run's 240 s.

use std::time::Instant;

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};

use super::content::{ContentCipher, DataKey};

/// One chunk size's figures, in MB/s.
#[derive(Debug, Clone, Copy)]
pub struct CipherThroughput {
    pub chunk: usize,
    /// AES-256-GCM-SIV alone, one core.
    pub raw: f64,
    /// coffer's chunk seal and open (nonce derivation, framing), one core.
    pub seal: f64,
    pub open: f64,
    /// coffer's seal of a whole buffer on every core.
    pub seal_all_cores: f64,
}

impl CipherThroughput {
    /// coffer's seal against raw AES-256-GCM-SIV (raw open is the same AES work as raw seal:
    /// CTR plus POLYVAL).
    pub fn seal_ratio(&self) -> f64 {
        self.seal / self.raw
    }

    pub fn open_ratio(&self) -> f64 {
        self.open / self.raw
    }

    pub fn to_json(&self) -> String {
        format!(
            "{{\"chunk\":{},\"raw\":{:.0},\"seal\":{:.0},\"open\":{:.0},\"seal_ratio\":{:.3},\"open_ratio\":{:.3},\"seal_all_cores\":{:.0}}}",
            self.chunk,
            self.raw,
            self.seal,
            self.open,
            self.seal_ratio(),
            self.open_ratio(),
            self.seal_all_cores
        )
    }
}

/// The one-line JSON report of `rows` that scripts/bench reads.
pub fn report_json(rows: &[CipherThroughput]) -> String {
    let rows: Vec<String> = rows.iter().map(CipherThroughput::to_json).collect();
    format!("{{\"bench\":\"crypt\",\"results\":[{}]}}", rows.join(","))
}

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

/// Measures 64 KiB and 1 MiB chunks over `total` bytes (a whole number of 1 MiB chunks).
pub fn measure(total: usize) -> Vec<CipherThroughput> {
    let total = total.max(1 << 20) >> 20 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i * 31) as u8).collect();
    [16u8, 20]
        .into_iter()
        .map(|shift| {
            let chunk = 1usize << shift;
            let raw = Aes256GcmSiv::new_from_slice(&[7u8; 32]).expect("a 32-byte key");
            let mut buf = data.clone();
            let raw_mbps = best(total, || {
                for (i, c) in buf.chunks_mut(chunk).enumerate() {
                    let mut n = [0u8; 12];
                    n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    raw.encrypt_inout_detached(&Nonce::from(n), b"", c.into())
                        .expect("in-place encryption of a chunk");
                }
            });
            let cipher =
                ContentCipher::for_new_object(&DataKey::from_bytes([9; 32]), [1; 16], shift);
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
                        .expect("a chunk sealed just now opens");
                }
            });
            let all_mbps = best(total, || {
                let _ = cipher.seal_chunks(0, &data, true);
            });
            CipherThroughput {
                chunk,
                raw: raw_mbps,
                seal: seal_mbps,
                open: open_mbps,
                seal_all_cores: all_mbps,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_chunk_sizes() {
        let rows = measure(2 << 20);
        assert_eq!(
            rows.iter().map(|r| r.chunk).collect::<Vec<_>>(),
            [64 << 10, 1 << 20]
        );
        for r in &rows {
            assert!(r.raw > 0.0 && r.seal > 0.0 && r.open > 0.0 && r.seal_all_cores > 0.0);
            assert!(report_json(&rows).contains(&r.to_json()));
            assert!(r.to_json().contains(&format!("\"chunk\":{}", r.chunk)));
        }
    }
}
