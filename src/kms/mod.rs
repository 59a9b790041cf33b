//! A local key service (`coffer kms serve`): root keys that never leave its process.
//!
//! Mounts ask it over a Unix socket for new data keys (GenerateDataKey) and to unwrap them
//! (Decrypt). Each named key has a policy of which uids may encrypt and which may decrypt,
//! checked with the peer's credentials (SO_PEERCRED); keys can be disabled and enabled, and
//! rotated (new data keys use the newest version, old versions keep decrypting). Every use
//! is appended to an audit log (time, operation, key and version, uid and pid, object id).
//! The key store on disk is sealed under a master key file.
//!
//! The protocol is one JSON request per line and one JSON answer per line.

pub mod aws;
pub mod client;
pub mod server;
pub mod store;

use serde::{Deserialize, Serialize};

/// One request to the service.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A new data key for object `context` (its file id, hex).
    GenerateDataKey {
        key: String,
        context: String,
    },
    /// Wraps a given data key (key rotation rewraps with it).
    Encrypt {
        key: String,
        plaintext: String,
        context: String,
    },
    Decrypt {
        key: String,
        blob: String,
        context: String,
    },
    Create {
        key: String,
        encrypt_uids: Vec<u32>,
        decrypt_uids: Vec<u32>,
        rotate_days: Option<f64>,
    },
    Disable {
        key: String,
    },
    Enable {
        key: String,
    },
    Rotate {
        key: String,
    },
    List,
}

/// The answer: `ok` with the fields of the request's kind, or an error.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A data key, base64 (GenerateDataKey, Decrypt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<String>,
    /// The wrapped data key, base64 (GenerateDataKey, Encrypt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Response {
    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }

    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }
}
