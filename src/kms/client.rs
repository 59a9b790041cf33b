//! The client side: a [`KeyProvider`] whose data keys come from the key service, and the
//! administration requests of `coffer kms`.
//!
//! Its envelopes are kind 3: `name length (1) | key name | service blob`; the root key id is
//! the first 8 bytes of SHA-256("coffer key id v1 kms" || name).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use zeroize::Zeroizing;

use super::{Request, Response};
use crate::crypt::CryptError;
use crate::crypt::content::DataKey;
use crate::crypt::envelope::{Envelope, KIND_KMS};
use crate::crypt::format::FILE_ID_LEN;
use crate::crypt::keys::KeyProvider;

/// Sends one request and reads its answer.
pub async fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("key service at {}: {e}", socket.display()))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|e| format!("key service: {e}"))?;
    let mut answer = String::new();
    BufReader::new(r)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("key service: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("key service answered nonsense: {e}"))
}

pub struct KmsProvider {
    socket: PathBuf,
    name: String,
    id: [u8; 8],
}

impl KmsProvider {
    /// `kms:SOCKET#NAME`.
    pub fn parse(spec: &str) -> Option<Result<KmsProvider, CryptError>> {
        let rest = spec.strip_prefix("kms:")?;
        Some(match rest.rsplit_once('#') {
            Some((socket, name)) if !name.is_empty() && name.len() < 256 => Ok(KmsProvider {
                socket: PathBuf::from(socket),
                id: Self::key_id(name),
                name: name.to_string(),
            }),
            _ => Err(CryptError::Key(format!(
                "{spec}: a key service key is kms:SOCKET#NAME"
            ))),
        })
    }

    pub fn key_id(name: &str) -> [u8; 8] {
        let d = Sha256::new()
            .chain_update(b"coffer key id v1 kms")
            .chain_update(name.as_bytes())
            .finalize();
        d[..8].try_into().expect("8 bytes")
    }

    async fn ask(&self, req: Request) -> Result<Response, CryptError> {
        let resp = call(&self.socket, &req).await.map_err(CryptError::Key)?;
        if resp.ok {
            Ok(resp)
        } else {
            Err(CryptError::Key(format!(
                "key service key {:?}: {}",
                self.name,
                resp.error.unwrap_or_default()
            )))
        }
    }

    fn envelope(&self, file_id: &[u8; FILE_ID_LEN], blob: &str) -> Result<Envelope, CryptError> {
        let blob = STANDARD
            .decode(blob)
            .map_err(|_| CryptError::Key("key service: bad blob".into()))?;
        let mut wrapped = vec![self.name.len() as u8];
        wrapped.extend_from_slice(self.name.as_bytes());
        wrapped.extend_from_slice(&blob);
        Ok(Envelope {
            kind: KIND_KMS,
            key_id: self.id,
            file_id: *file_id,
            wrapped,
        })
    }
}

fn data_key(b64: Option<String>) -> Result<DataKey, CryptError> {
    let raw = Zeroizing::new(
        STANDARD
            .decode(b64.unwrap_or_default())
            .map_err(|_| CryptError::Key("key service: bad data key".into()))?,
    );
    let k: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| CryptError::Key("key service: a data key of the wrong size".into()))?;
    Ok(DataKey::from_bytes(k))
}

#[async_trait]
impl KeyProvider for KmsProvider {
    fn describe(&self) -> String {
        format!(
            "key service key {:?} at {}",
            self.name,
            self.socket.display()
        )
    }

    fn key_ids(&self) -> Vec<String> {
        vec![hex::encode(self.id)]
    }

    async fn wrap(
        &self,
        dk: &DataKey,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<Envelope, CryptError> {
        let resp = self
            .ask(Request::Encrypt {
                key: self.name.clone(),
                plaintext: STANDARD.encode(dk.bytes()),
                context: hex::encode(file_id),
            })
            .await?;
        self.envelope(file_id, resp.blob.as_deref().unwrap_or_default())
    }

    async fn generate(
        &self,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<(DataKey, Envelope), CryptError> {
        let resp = self
            .ask(Request::GenerateDataKey {
                key: self.name.clone(),
                context: hex::encode(file_id),
            })
            .await?;
        let env = self.envelope(file_id, resp.blob.as_deref().unwrap_or_default())?;
        Ok((data_key(resp.plaintext)?, env))
    }

    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError> {
        if env.kind != KIND_KMS {
            return Err(CryptError::BadEnvelope(format!(
                "kind {} needs another key provider",
                env.kind
            )));
        }
        if env.key_id != self.id {
            return Err(CryptError::MissingKey(env.key_id_hex()));
        }
        let n = *env.wrapped.first().unwrap_or(&0) as usize;
        let name = env
            .wrapped
            .get(1..1 + n)
            .ok_or_else(|| CryptError::BadEnvelope("truncated key name".into()))?;
        if name != self.name.as_bytes() {
            return Err(CryptError::MissingKey(env.key_id_hex()));
        }
        let resp = self
            .ask(Request::Decrypt {
                key: self.name.clone(),
                blob: STANDARD.encode(&env.wrapped[1 + n..]),
                context: hex::encode(env.file_id),
            })
            .await?;
        data_key(resp.plaintext)
    }
}
