//! Content encryption: per-object keys from HKDF, key commitment, and chunks sealed with
//! AES-256-GCM-SIV under a STREAM-style nonce (chunk index plus an authenticated last-chunk
//! flag), each authenticating the whole header (docs/FORMAT.md, section 4).

use std::fmt;

use aes_gcm_siv::aead::inout::InOutBuf;
use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use hkdf::Hkdf;
use rayon::prelude::*;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::CryptError;
use super::format::{FILE_ID_LEN, Geometry, HEADER_LEN, Header, TAG_LEN};

const INFO_CONTENT: &[u8] = b"coffer v1 content key";
const INFO_COMMIT: &[u8] = b"coffer v1 key commitment";

/// A 256-bit data key: random per object write, zeroized on drop, never printed.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *k).expect("the OS random source works");
        DataKey(k)
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        DataKey(Zeroizing::new(b))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

pub fn random_file_id() -> [u8; FILE_ID_LEN] {
    let mut id = [0u8; FILE_ID_LEN];
    getrandom::fill(&mut id).expect("the OS random source works");
    id
}

/// Derives (content key, commitment) from a data key, the file id and the header prefix.
fn derive(
    dk: &DataKey,
    file_id: &[u8; FILE_ID_LEN],
    chunk_shift: u8,
) -> (Zeroizing<[u8; 32]>, [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(file_id), dk.bytes());
    let prefix = Header::prefix(chunk_shift);
    let mut content = Zeroizing::new([0u8; 32]);
    let mut commit = [0u8; 32];
    hk.expand_multi_info(&[INFO_CONTENT, &prefix], &mut *content)
        .expect("32 bytes is a valid HKDF length");
    hk.expand_multi_info(&[INFO_COMMIT, &prefix], &mut commit)
        .expect("32 bytes is a valid HKDF length");
    (content, commit)
}

fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    Nonce::from(n)
}

/// The cipher of one object: seals and opens its chunks.
pub struct ContentCipher {
    aead: Aes256GcmSiv,
    header: [u8; HEADER_LEN],
    geometry: Geometry,
}

impl ContentCipher {
    /// A cipher for a new object write: derives the keys and builds the header.
    pub fn for_new_object(dk: &DataKey, file_id: [u8; FILE_ID_LEN], chunk_shift: u8) -> Self {
        let (content, commitment) = derive(dk, &file_id, chunk_shift);
        let header = Header {
            chunk_shift,
            file_id,
            commitment,
        };
        ContentCipher {
            aead: Aes256GcmSiv::new_from_slice(&*content).expect("32-byte key"),
            header: header.to_bytes(),
            geometry: Geometry::encrypted(chunk_shift),
        }
    }

    /// A cipher for an existing object: parses its header and checks the key commitment
    /// (in constant time) before any chunk is opened.
    pub fn for_existing_object(dk: &DataKey, header_bytes: &[u8]) -> Result<Self, CryptError> {
        let header = Header::parse(header_bytes)?;
        let (content, commitment) = derive(dk, &header.file_id, header.chunk_shift);
        if !bool::from(commitment.ct_eq(&header.commitment)) {
            return Err(CryptError::CommitmentMismatch);
        }
        Ok(ContentCipher {
            aead: Aes256GcmSiv::new_from_slice(&*content).expect("32-byte key"),
            header: header.to_bytes(),
            geometry: Geometry::encrypted(header.chunk_shift),
        })
    }

    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    pub fn file_id(&self) -> [u8; FILE_ID_LEN] {
        self.header[8..24].try_into().unwrap()
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Seals one chunk, appending `ciphertext || tag` to `out`.
    pub fn seal_chunk_into(&self, index: u64, last: bool, plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .aead
            .encrypt_inout_detached(
                &nonce(index, last),
                &self.header,
                (&mut out[start..]).into(),
            )
            .expect("chunk sizes are far below the AEAD limit");
        out.extend_from_slice(&tag);
    }

    /// Seals consecutive full or final chunks starting at `first_index`, in parallel across
    /// cores. `plaintext` holds whole chunks, except that the last one may be short when
    /// `ends_file` is set; the final chunk gets the last flag only when `ends_file` is set.
    pub fn seal_chunks(&self, first_index: u64, plaintext: &[u8], ends_file: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_chunks_at(first_index, plaintext, ends_file, &mut out, 0);
        out
    }

    /// [`Self::seal_chunks`] into `out[at..]`, leaving `out` exactly that long. What `out`
    /// already holds there is overwritten without being zeroed first: a reused part buffer
    /// saves a memset of every byte written (6 % of a sequential write's CPU).
    pub fn seal_chunks_at(
        &self,
        first_index: u64,
        plaintext: &[u8],
        ends_file: bool,
        out: &mut Vec<u8>,
        at: usize,
    ) {
        let c = self.geometry.chunk as usize;
        let pieces: Vec<&[u8]> = if plaintext.is_empty() {
            vec![&[][..]]
        } else {
            plaintext.chunks(c).collect()
        };
        let n = pieces.len();
        let need = at + plaintext.len() + n * TAG_LEN;
        if out.len() >= need {
            out.truncate(need);
        } else {
            out.resize(need, 0);
        }
        // Every output slot has a known size, so the chunks seal in place in parallel.
        let mut slots: Vec<&mut [u8]> = Vec::with_capacity(n);
        let mut rest = &mut out[at..];
        for p in &pieces {
            let (slot, tail) = rest.split_at_mut(p.len() + TAG_LEN);
            slots.push(slot);
            rest = tail;
        }
        let seal = |(i, (slot, p)): (usize, (&mut [u8], &&[u8]))| {
            let last = ends_file && i == n - 1;
            let (body, tag_slot) = slot.split_at_mut(p.len());
            // Sealed from the plaintext straight into its slot: no copy first.
            let inout = InOutBuf::new(p, body).expect("slot and chunk have one length");
            let tag = self
                .aead
                .encrypt_inout_detached(&nonce(first_index + i as u64, last), &self.header, inout)
                .expect("chunk sizes are far below the AEAD limit");
            tag_slot.copy_from_slice(&tag);
        };
        if n == 1 {
            // One chunk (a small file): handing it to the thread pool and waiting for it
            // would cost more than sealing it.
            slots
                .into_iter()
                .zip(pieces.iter())
                .enumerate()
                .for_each(seal);
        } else {
            slots
                .into_par_iter()
                .zip(pieces.par_iter())
                .enumerate()
                .for_each(seal);
        }
    }

    /// Opens one stored chunk (`ciphertext || tag`) in place, returning the plaintext length.
    /// Nothing of a chunk whose tag fails is returned.
    pub fn open_chunk_in_place(
        &self,
        index: u64,
        last: bool,
        stored: &mut [u8],
    ) -> Result<usize, CryptError> {
        if stored.len() < TAG_LEN {
            return Err(CryptError::ChunkAuth(index));
        }
        let (body, tag) = stored.split_at_mut(stored.len() - TAG_LEN);
        let tag = Tag::try_from(&*tag).expect("a 16-byte tag");
        match self
            .aead
            .decrypt_inout_detached(&nonce(index, last), &self.header, body.into(), &tag)
        {
            Ok(()) => Ok(body.len()),
            Err(_) => {
                body.fill(0);
                Err(CryptError::ChunkAuth(index))
            }
        }
    }

    /// Each chunk of `chunks` with its stored length (plaintext and tag), once the stored
    /// bytes given (`stored_len`) are checked to be exactly those chunks.
    fn stored_lengths(
        &self,
        chunks: std::ops::Range<u64>,
        plain_size: u64,
        stored_len: usize,
    ) -> Result<Vec<(u64, usize)>, CryptError> {
        let g = self.geometry;
        let expected = g.stored_range(chunks.clone(), plain_size);
        if stored_len as u64 != expected.end - expected.start {
            return Err(CryptError::BadSize(stored_len as u64));
        }
        Ok(chunks
            .map(|i| (i, (g.chunk_len(i, plain_size) + g.tag_len()) as usize))
            .collect())
    }

    /// Opens stored chunks `chunks` of a file of `plain_size` bytes, in parallel across cores.
    /// `stored` must be exactly [`Geometry::stored_range`] of those chunks. Returns one
    /// plaintext buffer per chunk.
    pub fn open_chunks(
        &self,
        chunks: std::ops::Range<u64>,
        plain_size: u64,
        stored: &[u8],
    ) -> Result<Vec<Vec<u8>>, CryptError> {
        let last_index = self.geometry.chunk_count(plain_size) - 1;
        let pieces: Vec<(u64, &[u8])> = self
            .stored_lengths(chunks, plain_size, stored.len())?
            .into_iter()
            .scan(0usize, |off, (i, len)| {
                let piece = &stored[*off..*off + len];
                *off += len;
                Some((i, piece))
            })
            .collect();
        let open = |(i, piece): (u64, &[u8])| {
            let mut buf = piece.to_vec();
            let n = self.open_chunk_in_place(i, i == last_index, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        };
        if pieces.len() == 1 {
            pieces.into_iter().map(open).collect()
        } else {
            pieces.into_par_iter().map(open).collect()
        }
    }

    /// [`Self::open_chunks`] in place: `stored` becomes the plaintext, and the range of each
    /// chunk's plaintext in it is returned (the tags stay between them). No buffer per chunk
    /// and no copy, where a cold sequential read spent a quarter of its time faulting in
    /// fresh buffers.
    pub fn open_chunks_in_place(
        &self,
        chunks: std::ops::Range<u64>,
        plain_size: u64,
        stored: &mut [u8],
    ) -> Result<Vec<std::ops::Range<usize>>, CryptError> {
        let last_index = self.geometry.chunk_count(plain_size) - 1;
        let lengths = self.stored_lengths(chunks, plain_size, stored.len())?;
        let mut pieces: Vec<(u64, usize, &mut [u8])> = Vec::with_capacity(lengths.len());
        let mut rest = stored;
        let mut off = 0usize;
        for (i, len) in lengths {
            let (piece, tail) = rest.split_at_mut(len);
            pieces.push((i, off, piece));
            off += len;
            rest = tail;
        }
        let open = |(i, off, piece): (u64, usize, &mut [u8])| {
            let n = self.open_chunk_in_place(i, i == last_index, piece)?;
            Ok(off..off + n)
        };
        if pieces.len() == 1 {
            pieces.into_iter().map(open).collect()
        } else {
            pieces.into_par_iter().map(open).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // Fixed inputs give fixed bytes: a change here is a format change.
        let dk = DataKey::from_bytes([0x11; 32]);
        let c = ContentCipher::for_new_object(&dk, [0x22; 16], 12);
        let sealed = c.seal_chunks(0, b"coffer known answer", true);
        let mut obj = c.header().to_vec();
        obj.extend_from_slice(&sealed);
        assert_eq!(
            hex::encode(&obj),
            include_str!("../../tests/golden/kat-v1.hex").trim()
        );
    }

    /// Sealing over a reused buffer (stale bytes where the chunks go, a longer or shorter
    /// old length) gives exactly what sealing into a fresh one gives, and keeps the bytes
    /// before `at`.
    #[test]
    fn sealing_over_a_reused_buffer_equals_sealing_into_a_fresh_one() {
        let dk = DataKey::from_bytes([0x33; 32]);
        let c = ContentCipher::for_new_object(&dk, [0x44; 16], 12);
        let chunk = c.geometry().chunk as usize;
        for len in [0, 1, chunk - 1, chunk, 3 * chunk + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let fresh = c.seal_chunks(5, &plain, len % 2 == 0);
            for old_len in [0, 10, fresh.len() + 10, 4 * fresh.len() + 100] {
                let mut reused = vec![0xa5u8; old_len.max(10)];
                reused[..10].copy_from_slice(b"keep these");
                c.seal_chunks_at(5, &plain, len % 2 == 0, &mut reused, 10);
                assert_eq!(&reused[..10], b"keep these");
                assert_eq!(&reused[10..], &fresh[..], "len {len}, old length {old_len}");
            }
        }
    }
}
