//! S3 answers to typed store errors. The S3 error code and HTTP status go into the detail,
//! so the log says what the server said; the kind decides the errno the caller sees.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response;

use crate::store::StoreError;

/// What a request was, for the error's wording and the SSE-C special cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
    Copy,
    Multipart,
    Bucket,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "PutObject",
            Op::Get => "GetObject",
            Op::Head => "HeadObject",
            Op::List => "ListObjectsV2",
            Op::Delete => "DeleteObject",
            Op::Copy => "CopyObject",
            Op::Multipart => "multipart upload",
            Op::Bucket => "bucket request",
        }
    }
}

/// Maps an SDK error (after the SDK's own retries) to a store error naming `key`.
pub(super) fn map_err<E>(key: &str, op: Op, err: SdkError<E, Response>, sse_c: bool) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = key.to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("").to_string();
            let msg = se.err().message().unwrap_or("").to_string();
            let mut detail = format!("{}: HTTP {status} {code} {msg}", op.name())
                .trim_end()
                .to_string();
            if code.is_empty() && msg.is_empty() && status < 300 {
                // An answer the SDK could not read: say why.
                detail.push_str(&format!(": {}", DisplayErrorContext(&err)));
            }
            classify(key, op, status, &code, &msg, detail, sse_c)
        }
        SdkError::ConstructionFailure(_) => StoreError::Invalid {
            key,
            detail: format!("{}: {}", op.name(), DisplayErrorContext(&err)),
        },
        // Timeouts, connection failures, resets, TLS errors and unreadable answers: the SDK
        // has already retried them.
        _ => StoreError::Unavailable {
            key,
            detail: format!("{}: {}", op.name(), DisplayErrorContext(&err)),
        },
    }
}

fn classify(
    key: String,
    op: Op,
    status: u16,
    code: &str,
    msg: &str,
    detail: String,
    sse_c: bool,
) -> StoreError {
    let lower = msg.to_ascii_lowercase();
    let about_encryption = lower.contains("encrypt")
        || lower.contains("sse")
        || lower.contains("customer")
        || lower.contains("key md5");
    match (status, code) {
        (_, "NoSuchBucket") => StoreError::Invalid {
            key,
            detail: format!("{detail} (the bucket does not exist)"),
        },
        (_, "NoSuchKey") | (_, "NoSuchVersion") | (404, _) => StoreError::NotFound { key },
        (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed { key, detail },
        (_, "BadDigest")
        | (_, "InvalidDigest")
        | (_, "XAmzContentSHA256Mismatch")
        | (_, "XAmzContentChecksumMismatch")
        | (_, "InvalidChecksum") => StoreError::Corrupt { key, detail },
        (507, _) | (_, "QuotaExceeded") | (_, "EntityTooLarge") | (_, "StorageFull") => {
            StoreError::NoSpace { key, detail }
        }
        // A HEAD answer has no body, so no code: a 400 or 403 on an SSE-C request, or a
        // 400 that talks about encryption, is the customer key's fault.
        (400, _) if about_encryption || (op == Op::Head && code.is_empty()) => {
            StoreError::WrongKey { key }
        }
        (403, _) if sse_c && matches!(op, Op::Get | Op::Head | Op::Copy) => {
            StoreError::WrongKey { key }
        }
        (401 | 403, _) => StoreError::AccessDenied { key, detail },
        (416, _) => StoreError::Invalid { key, detail },
        (s, _) if s >= 500 => StoreError::Unavailable { key, detail },
        (_, "SlowDown") | (_, "RequestTimeout") | (429, _) => {
            StoreError::Unavailable { key, detail }
        }
        _ => StoreError::Invalid { key, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: u16, code: &str, msg: &str, op: Op, sse_c: bool) -> i32 {
        classify("k".into(), op, status, code, msg, "d".into(), sse_c).errno()
    }

    #[test]
    fn errnos() {
        assert_eq!(c(404, "", "", Op::Head, false), libc::ENOENT);
        assert_eq!(c(404, "NoSuchKey", "", Op::Get, false), libc::ENOENT);
        assert_eq!(c(404, "NoSuchBucket", "", Op::Get, false), libc::EINVAL);
        assert_eq!(c(403, "AccessDenied", "", Op::Put, false), libc::EACCES);
        assert_eq!(c(403, "AccessDenied", "", Op::Get, true), libc::EACCES);
        assert_eq!(c(400, "", "", Op::Head, false), libc::EACCES);
        assert_eq!(
            c(
                400,
                "InvalidRequest",
                "The object was stored using a form of Server Side Encryption",
                Op::Get,
                false
            ),
            libc::EACCES
        );
        assert_eq!(c(503, "SlowDown", "", Op::Put, false), libc::EIO);
        assert_eq!(c(400, "BadDigest", "", Op::Put, false), libc::EIO);
        assert_eq!(c(400, "EntityTooLarge", "", Op::Put, false), libc::ENOSPC);
        assert_eq!(c(507, "", "", Op::Put, false), libc::ENOSPC);
    }
}
