//! Staging of changed chunks for random writes, appends and rewrites: each changed chunk is
//! kept in a local file, sealed with a per-mount key, so that no plaintext ever lands on the
//! local disk. The file is unlinked as soon as it is created, so nothing is left behind by a
//! crash; the key dies with the process.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::Zeroizing;

const NONCE: usize = 12;
const TAG: usize = 16;
const LEN: usize = 4;

/// The per-mount key for staged data.
pub struct StagingKey(Aes256GcmSiv);

impl StagingKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *k).expect("the OS random source works");
        StagingKey(Aes256GcmSiv::new_from_slice(&*k).expect("32-byte key"))
    }
}

/// Sealed chunks of one file, in slots of a sparse anonymous file.
pub struct StagingFile {
    file: File,
    chunk: usize,
    /// Random per staging file, bound into every slot so slots cannot move between files.
    salt: [u8; 16],
    present: BTreeSet<u64>,
}

impl StagingFile {
    pub fn create(dir: &Path, chunk: usize) -> io::Result<StagingFile> {
        std::fs::create_dir_all(dir)?;
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).expect("the OS random source works");
        let path = dir.join(format!("stage-{}", hex::encode(salt)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(StagingFile {
            file,
            chunk,
            salt,
            present: BTreeSet::new(),
        })
    }

    fn slot(&self) -> u64 {
        (LEN + NONCE + self.chunk + TAG) as u64
    }

    fn aad(&self, index: u64) -> [u8; 24] {
        let mut a = [0u8; 24];
        a[..16].copy_from_slice(&self.salt);
        a[16..].copy_from_slice(&index.to_le_bytes());
        a
    }

    pub fn contains(&self, index: u64) -> bool {
        self.present.contains(&index)
    }

    /// Staged chunk indices, in order.
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.present.iter().copied()
    }

    /// Forgets staged chunks at or after `index` (after a truncate).
    pub fn drop_from(&mut self, index: u64) {
        self.present.split_off(&index);
    }

    pub fn write_chunk(&mut self, key: &StagingKey, index: u64, data: &[u8]) -> io::Result<()> {
        assert!(data.len() <= self.chunk);
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let mut buf = Vec::with_capacity(LEN + NONCE + data.len() + TAG);
        buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(data);
        let tag = key
            .0
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                &self.aad(index),
                (&mut buf[LEN + NONCE..]).into(),
            )
            .expect("chunk sizes are far below the AEAD limit");
        buf.extend_from_slice(&tag);
        self.file.write_all_at(&buf, index * self.slot())?;
        self.present.insert(index);
        Ok(())
    }

    pub fn read_chunk(&self, key: &StagingKey, index: u64) -> io::Result<Vec<u8>> {
        let mut head = [0u8; LEN + NONCE];
        let off = index * self.slot();
        self.file.read_exact_at(&mut head, off)?;
        let len = u32::from_le_bytes(head[..LEN].try_into().unwrap()) as usize;
        if len > self.chunk {
            return Err(io::Error::other("staged chunk has a bad length"));
        }
        let mut buf = vec![0u8; len + TAG];
        self.file
            .read_exact_at(&mut buf, off + (LEN + NONCE) as u64)?;
        let tag = Tag::try_from(&buf[len..]).expect("a 16-byte tag");
        buf.truncate(len);
        key.0
            .decrypt_inout_detached(
                &Nonce::try_from(&head[LEN..]).expect("a 12-byte nonce"),
                &self.aad(index),
                (&mut buf[..]).into(),
                &tag,
            )
            .map_err(|_| io::Error::other("staged chunk failed authentication"))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_without_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let key = StagingKey::generate();
        let mut s = StagingFile::create(dir.path(), 4096).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "file not unlinked"
        );
        s.write_chunk(&key, 3, b"secret marker text").unwrap();
        s.write_chunk(&key, 0, &[7u8; 4096]).unwrap();
        assert_eq!(s.read_chunk(&key, 3).unwrap(), b"secret marker text");
        assert_eq!(s.read_chunk(&key, 0).unwrap(), vec![7u8; 4096]);
        let mut raw = Vec::new();
        let len = s.file.metadata().unwrap().len();
        raw.resize(len as usize, 0);
        s.file.read_exact_at(&mut raw, 0).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.indices().collect::<Vec<_>>(), vec![0, 3]);
        s.drop_from(1);
        assert_eq!(s.indices().collect::<Vec<_>>(), vec![0]);
    }
}
