//! The crypt layer: the encrypted object format (docs/FORMAT.md), envelopes and root keys.
//!
//! [`Crypt`] is what the layers above use: it makes an [`ObjectCipher`] for each object
//! written (a fresh data key, wrapped into the object's metadata) or read (unwrapped from
//! it), and knows the chunk geometry so that sizes come from listings alone.

pub mod content;
pub mod envelope;
pub mod error;
pub mod format;
pub mod keypair;
pub mod keys;
pub mod names;
pub mod rotate;
pub mod throughput;

use std::sync::Arc;

pub use error::CryptError;

use crate::buffers::GET_BUFFERS;
use crate::store::Metadata;
use content::ContentCipher;
use envelope::Envelope;
use format::Geometry;
use keys::KeyProvider;

/// Whether and how the client encrypts object bodies.
#[derive(Clone)]
pub enum Mode {
    /// Envelope encryption on the client (the default).
    Client(Arc<dyn KeyProvider>),
    /// No client-side encryption (SSE only, or nothing): object bodies are the files.
    None,
}

#[derive(Clone)]
pub struct Crypt {
    mode: Mode,
    chunk_shift: u8,
}

impl Crypt {
    pub fn new(mode: Mode, chunk_shift: u8) -> Crypt {
        Crypt { mode, chunk_shift }
    }

    pub fn encrypts(&self) -> bool {
        matches!(self.mode, Mode::Client(_))
    }

    pub fn geometry(&self) -> Geometry {
        match self.mode {
            Mode::Client(_) => Geometry::encrypted(self.chunk_shift),
            Mode::None => Geometry::plain(self.chunk_shift),
        }
    }

    /// A cipher for a new write of an object, and the metadata entries (the envelope) to
    /// store with it.
    pub async fn new_object(&self) -> Result<(ObjectCipher, Metadata), CryptError> {
        match &self.mode {
            Mode::None => Ok((ObjectCipher::plain(self.geometry()), Metadata::new())),
            Mode::Client(provider) => {
                let file_id = content::random_file_id();
                let (dk, env) = provider.generate(&file_id).await?;
                let cipher = ContentCipher::for_new_object(&dk, file_id, self.chunk_shift);
                let mut meta = Metadata::new();
                meta.insert(envelope::METADATA_KEY.to_string(), env.encode());
                Ok((ObjectCipher::encrypted(cipher), meta))
            }
        }
    }

    /// The envelope of an object, from its metadata. `None` for an object with none.
    pub fn envelope_of(metadata: &Metadata) -> Result<Option<Envelope>, CryptError> {
        metadata
            .get(envelope::METADATA_KEY)
            .map(|s| Envelope::decode(s))
            .transpose()
    }

    /// A cipher to read an existing object from its metadata and its first
    /// [`Crypt::header_len`] bytes.
    pub async fn open_object(
        &self,
        metadata: &Metadata,
        header: &[u8],
    ) -> Result<ObjectCipher, CryptError> {
        match &self.mode {
            Mode::None => Ok(ObjectCipher::plain(self.geometry())),
            Mode::Client(provider) => {
                let env = Self::envelope_of(metadata)?.ok_or_else(|| {
                    CryptError::BadEnvelope(
                        "the object is not encrypted (no coffer-key metadata); refusing to \
                         read unauthenticated content"
                            .into(),
                    )
                })?;
                let parsed = format::Header::parse(header)?;
                if parsed.file_id != env.file_id {
                    return Err(CryptError::BadEnvelope(
                        "envelope belongs to another object (file id mismatch)".into(),
                    ));
                }
                let dk = provider.unwrap(&env).await?;
                Ok(ObjectCipher::encrypted(ContentCipher::for_existing_object(
                    &dk, header,
                )?))
            }
        }
    }

    /// Bytes of an object to read before [`Crypt::open_object`].
    pub fn header_len(&self) -> u64 {
        self.geometry().header_len()
    }

    pub fn provider(&self) -> Option<&Arc<dyn KeyProvider>> {
        match &self.mode {
            Mode::Client(p) => Some(p),
            Mode::None => None,
        }
    }
}

/// Seals or opens the chunks of one object (a pass-through when the client does not
/// encrypt).
pub struct ObjectCipher {
    cipher: Option<ContentCipher>,
    geometry: Geometry,
}

impl ObjectCipher {
    fn plain(geometry: Geometry) -> Self {
        ObjectCipher {
            cipher: None,
            geometry,
        }
    }

    fn encrypted(c: ContentCipher) -> Self {
        ObjectCipher {
            geometry: c.geometry(),
            cipher: Some(c),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The bytes that start the object body.
    pub fn header(&self) -> &[u8] {
        match &self.cipher {
            Some(c) => c.header(),
            None => &[],
        }
    }

    /// Seals whole chunks starting at chunk `first_index` (see
    /// [`ContentCipher::seal_chunks`]).
    pub fn seal(&self, first_index: u64, plaintext: &[u8], ends_file: bool) -> Vec<u8> {
        match &self.cipher {
            Some(c) => c.seal_chunks(first_index, plaintext, ends_file),
            None => plaintext.to_vec(),
        }
    }

    /// [`Self::seal`] into `out[at..]`, leaving `out` exactly that long; bytes before `at`
    /// are kept, and a reused buffer is overwritten rather than zeroed first.
    pub fn seal_at(
        &self,
        first_index: u64,
        plaintext: &[u8],
        ends_file: bool,
        out: &mut Vec<u8>,
        at: usize,
    ) {
        match &self.cipher {
            Some(c) => c.seal_chunks_at(first_index, plaintext, ends_file, out, at),
            None => {
                out.resize(at, 0);
                out.extend_from_slice(plaintext);
            }
        }
    }

    /// Opens the stored bytes of `chunks` of a file of `plain_size` bytes, one buffer per
    /// chunk.
    pub fn open(
        &self,
        chunks: std::ops::Range<u64>,
        plain_size: u64,
        stored: &[u8],
    ) -> Result<Vec<Vec<u8>>, CryptError> {
        match &self.cipher {
            Some(c) => c.open_chunks(chunks, plain_size, stored),
            None => Ok(
                plain_ranges(self.geometry, chunks, plain_size, stored.len())
                    .map(|r| stored[r].to_vec())
                    .collect(),
            ),
        }
    }

    /// [`Self::open`] into one buffer: the chunks come back as slices of it, opened in place,
    /// with the size of that buffer (which the slices keep alive). The buffer is `stored`'s
    /// own, copied first only if someone else holds it too; a read-ahead segment's goes back
    /// to [`GET_BUFFERS`] when the last slice is dropped.
    pub fn open_shared(
        &self,
        chunks: std::ops::Range<u64>,
        plain_size: u64,
        stored: bytes::Bytes,
    ) -> Result<(Vec<bytes::Bytes>, usize), CryptError> {
        match &self.cipher {
            Some(c) if GET_BUFFERS.suits(stored.len()) => {
                // Opened where the get put it, unless something else holds that buffer
                // (then in a pooled copy); the chunks give the buffer back to the pool when
                // the cache drops the last of them. Copying each segment first was 5 % of
                // the mount's CPU in a cold read.
                let mut buf = GET_BUFFERS.reclaim(stored);
                let held = buf.capacity();
                match c.open_chunks_in_place(chunks, plain_size, &mut buf) {
                    Ok(ranges) => {
                        let plain = GET_BUFFERS.shared_mut(buf);
                        Ok((ranges.into_iter().map(|r| plain.slice(r)).collect(), held))
                    }
                    Err(e) => {
                        GET_BUFFERS.give_mut(buf);
                        Err(e)
                    }
                }
            }
            Some(c) => {
                let mut buf = stored
                    .try_into_mut()
                    .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                let held = buf.capacity();
                let ranges = c.open_chunks_in_place(chunks, plain_size, &mut buf)?;
                let plain = buf.freeze();
                Ok((ranges.into_iter().map(|r| plain.slice(r)).collect(), held))
            }
            None => {
                // Sliced where they lie, in a buffer that returns to the pool once the cache
                // drops them (a get's buffer is freed if dropped as it came).
                let stored = match stored.try_into_mut() {
                    Ok(buf) if GET_BUFFERS.suits(buf.len()) => GET_BUFFERS.shared_mut(buf),
                    Ok(buf) => buf.freeze(),
                    Err(shared) => shared,
                };
                let pieces = plain_ranges(self.geometry, chunks, plain_size, stored.len())
                    .map(|r| stored.slice(r))
                    .collect();
                Ok((pieces, stored.len()))
            }
        }
    }
}

/// Where each of `chunks` lies in the `len` stored bytes of an unencrypted object (no
/// header, no tags), cut short where those bytes end.
fn plain_ranges(
    g: Geometry,
    chunks: std::ops::Range<u64>,
    plain_size: u64,
    len: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    chunks.scan(0usize, move |off, i| {
        let start = (*off).min(len);
        *off += g.chunk_len(i, plain_size) as usize;
        Some(start..(*off).min(len))
    })
}

/// Convenience for tests and tools: the whole plaintext of an object body.
pub async fn decrypt_all(
    crypt: &Crypt,
    metadata: &Metadata,
    body: &[u8],
) -> Result<Vec<u8>, CryptError> {
    let g = crypt.geometry();
    let plain_size = g.plain_size(body.len() as u64)?;
    let header = &body[..(g.header_len() as usize).min(body.len())];
    let cipher = crypt.open_object(metadata, header).await?;
    let chunks = 0..g.chunk_count(plain_size);
    let stored = &body[g.header_len() as usize..];
    Ok(cipher.open(chunks, plain_size, stored)?.concat())
}

/// Convenience for tests and tools: a whole object body and its metadata for `plaintext`.
pub async fn encrypt_all(
    crypt: &Crypt,
    plaintext: &[u8],
) -> Result<(Vec<u8>, Metadata), CryptError> {
    let (cipher, meta) = crypt.new_object().await?;
    let mut body = cipher.header().to_vec();
    body.extend_from_slice(&cipher.seal(0, plaintext, true));
    Ok((body, meta))
}
