//! AWS KMS as a root key provider (`--key aws-kms:KEY`, KEY a key id, ARN or `alias/...`).
//!
//! Data keys come from GenerateDataKey and are opened with Decrypt; rotation rewraps with
//! Encrypt. Every call carries the encryption context `coffer-file-id = <file id in hex>`,
//! which binds a wrapped data key to its object (KMS refuses the blob under any other
//! context) and is what CloudTrail logs in clear: never the file name.
//!
//! Envelopes are kind 4: `key length (1) | KEY as configured | CiphertextBlob`; the root key
//! id is the first 8 bytes of SHA-256("coffer key id v1 aws-kms" || KEY), so every host must
//! name the key the same way (the same ARN, or the same alias). Region, credentials and
//! endpoint come from the standard AWS chain (`AWS_REGION`, profiles, `AWS_ENDPOINT_URL_KMS`
//! for a KMS-compatible service).

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use crate::crypt::CryptError;
use crate::crypt::content::DataKey;
use crate::crypt::envelope::{Envelope, KIND_AWS_KMS};
use crate::crypt::format::FILE_ID_LEN;
use crate::crypt::keys::KeyProvider;

/// The encryption context's only entry.
pub const CONTEXT_KEY: &str = "coffer-file-id";

pub struct AwsKmsProvider {
    key: String,
    id: [u8; 8],
    client: OnceCell<aws_sdk_kms::Client>,
}

impl AwsKmsProvider {
    /// `aws-kms:KEY`.
    pub fn parse(spec: &str) -> Option<Result<AwsKmsProvider, CryptError>> {
        let key = spec.strip_prefix("aws-kms:")?;
        Some(if key.is_empty() || key.len() > 250 {
            Err(CryptError::Key(format!(
                "{spec}: an AWS KMS key is aws-kms:KEY-ID, aws-kms:ARN or aws-kms:alias/NAME"
            )))
        } else {
            Ok(AwsKmsProvider {
                id: Self::key_id(key),
                key: key.to_string(),
                client: OnceCell::new(),
            })
        })
    }

    pub fn key_id(key: &str) -> [u8; 8] {
        let d = Sha256::new()
            .chain_update(b"coffer key id v1 aws-kms")
            .chain_update(key.as_bytes())
            .finalize();
        d[..8].try_into().expect("8 bytes")
    }

    async fn client(&self) -> &aws_sdk_kms::Client {
        self.client
            .get_or_init(|| async {
                let conf = aws_config::defaults(BehaviorVersion::latest()).load().await;
                aws_sdk_kms::Client::new(&conf)
            })
            .await
    }

    /// An SDK error as a crypt error naming the key: a refusal of the key (disabled, not
    /// found, denied) is EACCES; a blob that does not open is a failed unwrap (EIO).
    fn error<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        op: &str,
        e: SdkError<E>,
    ) -> CryptError {
        let code = e.code().unwrap_or("").to_string();
        let what = match e.message() {
            Some(m) => format!("{code}: {m}"),
            None => format!("{}", aws_sdk_kms::error::DisplayErrorContext(&e)),
        };
        if code == "InvalidCiphertextException" {
            return CryptError::UnwrapFailed(format!(
                "{} (AWS KMS {}: {what})",
                hex::encode(self.id),
                self.key
            ));
        }
        CryptError::Key(format!("AWS KMS key {}: {op}: {what}", self.key))
    }

    fn envelope(&self, file_id: &[u8; FILE_ID_LEN], blob: &[u8]) -> Envelope {
        let mut wrapped = vec![self.key.len() as u8];
        wrapped.extend_from_slice(self.key.as_bytes());
        wrapped.extend_from_slice(blob);
        Envelope {
            kind: KIND_AWS_KMS,
            key_id: self.id,
            file_id: *file_id,
            wrapped,
        }
    }
}

fn data_key(blob: Option<&Blob>) -> Result<DataKey, CryptError> {
    let raw = Zeroizing::new(blob.map(|b| b.as_ref().to_vec()).unwrap_or_default());
    let k: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| CryptError::Key("AWS KMS returned a data key of the wrong size".into()))?;
    Ok(DataKey::from_bytes(k))
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn describe(&self) -> String {
        format!("AWS KMS key {}", self.key)
    }

    fn key_ids(&self) -> Vec<String> {
        vec![hex::encode(self.id)]
    }

    async fn wrap(
        &self,
        dk: &DataKey,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<Envelope, CryptError> {
        let out = self
            .client()
            .await
            .encrypt()
            .key_id(&self.key)
            .plaintext(Blob::new(dk.bytes().to_vec()))
            .encryption_context(CONTEXT_KEY, hex::encode(file_id))
            .send()
            .await
            .map_err(|e| self.error("Encrypt", e))?;
        let blob = out
            .ciphertext_blob()
            .ok_or_else(|| CryptError::Key("AWS KMS Encrypt returned no ciphertext".into()))?;
        Ok(self.envelope(file_id, blob.as_ref()))
    }

    async fn generate(
        &self,
        file_id: &[u8; FILE_ID_LEN],
    ) -> Result<(DataKey, Envelope), CryptError> {
        let out = self
            .client()
            .await
            .generate_data_key()
            .key_id(&self.key)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(CONTEXT_KEY, hex::encode(file_id))
            .send()
            .await
            .map_err(|e| self.error("GenerateDataKey", e))?;
        let blob = out.ciphertext_blob().ok_or_else(|| {
            CryptError::Key("AWS KMS GenerateDataKey returned no ciphertext".into())
        })?;
        let env = self.envelope(file_id, blob.as_ref());
        Ok((data_key(out.plaintext())?, env))
    }

    async fn unwrap(&self, env: &Envelope) -> Result<DataKey, CryptError> {
        if env.kind != KIND_AWS_KMS {
            return Err(CryptError::BadEnvelope(format!(
                "kind {} needs another key provider",
                env.kind
            )));
        }
        let n = *env.wrapped.first().unwrap_or(&0) as usize;
        let key = env
            .wrapped
            .get(1..1 + n)
            .ok_or_else(|| CryptError::BadEnvelope("truncated key name".into()))?;
        if env.key_id != self.id || key != self.key.as_bytes() {
            return Err(CryptError::MissingKey(env.key_id_hex()));
        }
        let out = self
            .client()
            .await
            .decrypt()
            .key_id(&self.key)
            .ciphertext_blob(Blob::new(env.wrapped[1 + n..].to_vec()))
            .encryption_context(CONTEXT_KEY, hex::encode(env.file_id))
            .send()
            .await
            .map_err(|e| self.error("Decrypt", e))?;
        data_key(out.plaintext())
    }
}
