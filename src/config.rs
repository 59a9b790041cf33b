//! The mount configuration file: everything `coffer mount` takes on its command line, in
//! TOML (`/etc/coffer/NAME.toml`, or `--config FILE`). Options given on the command line
//! override the file. Unknown keys are errors that name the key and the line. Secrets are
//! never in it: only the paths of the files that hold them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MountFile {
    pub source: Option<String>,
    pub mountpoint: Option<PathBuf>,
    /// Root key files (the first writes).
    pub key: Option<Vec<PathBuf>>,
    /// Mount options, as with `-o`.
    pub options: Option<Vec<String>>,
    pub cache_size: Option<usize>,
    pub memory_limit: Option<usize>,
    pub cache_dir: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    /// Log filter, as `RUST_LOG` (`info`, `coffer=debug`).
    pub log: Option<String>,
    pub scrub_interval: Option<f64>,
    pub metadata_ttl: Option<f64>,
    pub sse_c_key: Option<PathBuf>,
    pub require_encryption: Option<bool>,
    pub prometheus: Option<String>,
    pub s3: Option<S3File>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3File {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub path_style: Option<bool>,
    pub ca_bundle: Option<PathBuf>,
    pub checksum: Option<String>,
    pub request_timeout: Option<f64>,
    pub attempts: Option<u32>,
    pub parts_in_flight: Option<u32>,
}

/// `--config NAME` means `/etc/coffer/NAME.toml`; anything with a `/` or a `.toml` suffix
/// is a path.
pub fn resolve(name: &str) -> PathBuf {
    if name.contains('/') || name.ends_with(".toml") {
        PathBuf::from(name)
    } else {
        PathBuf::from(format!("/etc/coffer/{name}.toml"))
    }
}

impl MountFile {
    pub fn parse(text: &str, origin: &Path) -> Result<MountFile> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => anyhow!("{} line {l}: {}", origin.display(), e.message()),
                None => anyhow!("{}: {}", origin.display(), e.message()),
            }
        })
    }

    pub fn read(path: &Path) -> Result<MountFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file() {
        let f = MountFile::parse(
            r#"
source = "s3://bucket/prefix"
mountpoint = "/mnt/backup"
key = ["/etc/coffer/root.key"]
options = ["allow_other", "ro"]
cache_size = 512
metadata_ttl = 30

[s3]
endpoint_url = "https://s3.lan:3900"
path_style = true
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(f.source.as_deref(), Some("s3://bucket/prefix"));
        assert_eq!(f.cache_size, Some(512));
        assert_eq!(f.s3.unwrap().path_style, Some(true));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = MountFile::parse(
            "source = \"/srv/x\"\n\ncache_sise = 3\n",
            Path::new("/etc/coffer/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("cache_sise"), "{e}");
        let e = MountFile::parse("[s3]\nendpoint = \"x\"\n", Path::new("y.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("endpoint"), "{e}");
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(resolve("backup"), PathBuf::from("/etc/coffer/backup.toml"));
        assert_eq!(resolve("./b.toml"), PathBuf::from("./b.toml"));
    }
}
