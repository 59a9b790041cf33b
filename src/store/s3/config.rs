//! Where an S3 store is (`s3://bucket/prefix`) and how to reach it: endpoint, region,
//! credentials (the standard AWS chain), addressing style, CA bundle, retries and timeouts.

use std::path::PathBuf;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};

use crate::store::{StoreError, StoreResult};

/// `s3://bucket/prefix`: the bucket and the key prefix (empty, or ending in `/`) under which
/// the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

impl S3Location {
    /// Whether a SOURCE argument names an S3 store rather than a local path.
    pub fn is_s3(source: &str) -> bool {
        source.starts_with("s3://")
    }

    pub fn parse(source: &str) -> StoreResult<S3Location> {
        let rest = source.strip_prefix("s3://").ok_or_else(|| {
            StoreError::invalid(source, "an S3 store is named s3://BUCKET/PREFIX")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(StoreError::invalid(
                source,
                format!("{bucket:?} is not a valid bucket name"),
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(StoreError::invalid(
                source,
                "the prefix may not hold empty, `.` or `..` components",
            ));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Which flexible checksum puts carry (the server verifies it before storing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireChecksum {
    #[default]
    Crc32c,
    Sha256,
}

/// How to reach the service. Everything unset comes from the standard AWS chain
/// (environment, shared config and credentials files, profiles, web identity, IMDS).
#[derive(Clone, Debug)]
pub struct S3Options {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub path_style: bool,
    /// PEM bundle of the CAs to trust (self-hosted endpoints); replaces the system roots.
    pub ca_bundle: Option<PathBuf>,
    pub checksum: WireChecksum,
    /// Attempts per request, the first included (throttling, 5xx, timeouts, resets).
    pub max_attempts: u32,
    /// Upper bound of one attempt, so that a stalled server never hangs a caller forever.
    pub attempt_timeout: Duration,
    /// Multipart parts uploaded at once per file.
    pub parts_in_flight: usize,
    /// Access key and secret to use instead of the AWS chain (embedding and tests; the
    /// command line never takes secrets).
    pub static_credentials: Option<(String, String)>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint_url: None,
            region: None,
            profile: None,
            path_style: false,
            ca_bundle: None,
            checksum: WireChecksum::Crc32c,
            max_attempts: 8,
            attempt_timeout: Duration::from_secs(120),
            parts_in_flight: 3,
            static_credentials: None,
        }
    }
}

impl S3Options {
    /// Whether requests travel in the clear to another host (SSE-C is refused then: the key
    /// would cross the network in a header).
    pub fn is_plain_http_to_remote(&self) -> bool {
        let Some(url) = &self.endpoint_url else {
            return false; // AWS endpoints: HTTPS
        };
        let Some(rest) = url.strip_prefix("http://") else {
            return false;
        };
        let authority = rest.split('/').next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        !loopback
    }

    /// Builds the SDK client.
    pub async fn client(&self) -> StoreResult<aws_sdk_s3::Client> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(self.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(self.attempt_timeout)
                    .build(),
            );
        if let Some(p) = &self.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &self.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(u) = &self.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        if let Some((id, secret)) = &self.static_credentials {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "coffer-static",
            ));
        }
        loader = loader.http_client(self.http_client()?);
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.path_style)
            // coffer sets the checksum of every put itself and asks for them on gets.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            // Self-hosted services rarely care; AWS needs the right one and says so.
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        Ok(aws_sdk_s3::Client::from_conf(b.build()))
    }
}

impl S3Options {
    /// coffer's HTTP client (quick ACKs, see `http`), trusting the system roots or exactly
    /// the CAs of the PEM bundle. Behind a proxy (HTTPS_PROXY and the like), the SDK's own
    /// client, which speaks to proxies.
    fn http_client(&self) -> StoreResult<aws_smithy_runtime_api::client::http::SharedHttpClient> {
        let named = |bundle: &std::path::Path| bundle.display().to_string();
        let roots = match &self.ca_bundle {
            Some(bundle) => super::http::Roots::Bundle(
                std::fs::read(bundle)
                    .map_err(|e| StoreError::io(&named(bundle), "reading the CA bundle", e))?,
            ),
            None => super::http::Roots::System,
        };
        if proxy_configured() {
            return sdk_client(roots, self.ca_bundle.as_deref());
        }
        super::http::quick_ack_client(roots).map_err(|e| {
            let what = self.ca_bundle.as_deref().map_or("TLS".into(), named);
            StoreError::invalid(&what, e)
        })
    }
}

fn proxy_configured() -> bool {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// The SDK's HTTPS client, trusting the system roots or exactly the CAs of a PEM bundle.
fn sdk_client(
    roots: super::http::Roots,
    bundle: Option<&std::path::Path>,
) -> StoreResult<aws_smithy_runtime_api::client::http::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let trust = match roots {
        super::http::Roots::System => TrustStore::default(),
        super::http::Roots::Bundle(pem) => {
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(StoreError::invalid(
                    &bundle.unwrap_or("CA bundle".as_ref()).display().to_string(),
                    "no PEM certificate in the CA bundle",
                ));
            }
            TrustStore::empty()
                .with_native_roots(false)
                .with_pem_certificate(pem)
        }
    };
    let ctx = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| StoreError::invalid("CA bundle", format!("{e}")))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(ctx)
        .build_https())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let l = S3Location::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("my-bucket", "a/b/")
        );
        let l = S3Location::parse("s3://bkt").unwrap();
        assert_eq!(l.prefix, "");
        assert!(S3Location::parse("s3://B").is_err());
        assert!(S3Location::parse("s3://bkt/a/../b").is_err());
        assert!(S3Location::parse("/srv/x").is_err());
    }

    #[test]
    fn plain_http_to_remote() {
        let o = |u: &str| S3Options {
            endpoint_url: Some(u.into()),
            ..Default::default()
        };
        assert!(!o("http://127.0.0.1:3900").is_plain_http_to_remote());
        assert!(!o("http://localhost:3900/").is_plain_http_to_remote());
        assert!(!o("http://[::1]:3900").is_plain_http_to_remote());
        assert!(!o("https://s3.example.com").is_plain_http_to_remote());
        assert!(o("http://s3.example.com:3900").is_plain_http_to_remote());
        assert!(o("http://10.0.0.5").is_plain_http_to_remote());
    }
}
