//! Per-directory attribute index, for stores whose listings carry no metadata (S3).
//!
//! On S3 a file's POSIX attributes live in its object's user metadata, which a listing does
//! not return: `ls -l` of a cold directory of 10,000 files took 10,000 HEADs. The index is
//! one object per directory, under [`INDEX_DIR`] at the mount's root, holding for each file
//! the metadata it is stored with and what identifies that stored version in a listing
//! (ETag, size and last-modified time). A cold listing takes an entry only where all three
//! still match, so an index that is old, partial or written by another mount never shows
//! attributes the object does not have: what changed since is read by a HEAD, as without
//! an index. It is a cache and nothing else: losing it, or failing to write it, costs
//! HEADs, never data.
//!
//! The index holds the same POSIX attributes and extended attributes that the objects'
//! metadata holds in the clear, with the same SSE parameters; no key material.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::Metadata;

/// The hidden root directory of the indexes.
pub const INDEX_DIR: &str = ".coffer-attr-index";

/// Below this many HEADs a listing saves, keeping an index costs more than it saves.
pub const MIN_ENTRIES: usize = 16;

/// Larger directories get no index (its JSON would pass 20 MB).
pub const MAX_ENTRIES: usize = 100_000;

const VERSION: u32 = 1;

/// The index object's metadata entry naming every [`SPLIT_EVERY`]th file of the directory
/// (base64 of a JSON list), read by a HEAD: a cold listing of a large directory lists the
/// ranges between them at once while the index itself is fetched and parsed.
pub const SPLITS_KEY: &str = "coffer-index-splits";
/// One S3 listing page.
pub const SPLIT_EVERY: usize = 1000;
/// Most bytes of [`SPLITS_KEY`]'s value (S3 allows 2 KB of metadata in all): a directory
/// whose names would not fit is cut every 2nd, 4th... 1000th name instead.
const SPLITS_BYTES: usize = 1536;

/// The [`SPLITS_KEY`] value for a directory whose files are `names`, in order.
pub fn splits_value(names: &[&str]) -> Option<String> {
    let mut every = SPLIT_EVERY;
    while every <= names.len() {
        let cut: Vec<&str> = names
            .iter()
            .skip(every - 1)
            .step_by(every)
            .copied()
            .filter(|n| Some(n) != names.last())
            .collect();
        let value = STANDARD.encode(serde_json::to_vec(&cut).expect("names serialize"));
        if value.len() <= SPLITS_BYTES {
            return (!cut.is_empty()).then_some(value);
        }
        every *= 2;
    }
    None
}

/// The split keys an index object's metadata names after the key `after`, in order (none
/// if it names none or is unreadable: they only balance a listing, never decide it).
pub fn splits_after(metadata: Option<&Metadata>, dir_prefix: &str, after: &str) -> Vec<String> {
    let names: Vec<String> = metadata
        .and_then(|m| m.get(SPLITS_KEY))
        .and_then(|v| STANDARD.decode(v).ok())
        .and_then(|json| serde_json::from_slice(&json).ok())
        .unwrap_or_default();
    let mut keys: Vec<String> = names
        .into_iter()
        .map(|n| format!("{dir_prefix}{n}"))
        .filter(|k| k.as_str() > after)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What identifies one stored version of an object in a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub etag: String,
    /// Stored (not plaintext) size.
    pub size: u64,
    /// Last-modified time, nanoseconds since the epoch, as the listing gave it.
    pub modified_ns: u64,
}

impl Listed {
    pub fn new(etag: &str, size: u64, modified: SystemTime) -> Listed {
        Listed {
            etag: etag.to_string(),
            size,
            modified_ns: modified
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    #[serde(flatten)]
    pub listed: Listed,
    pub meta: Metadata,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AttrIndex {
    version: u32,
    /// The directory's key prefix, so that an index is never applied to another directory.
    dir: String,
    pub entries: BTreeMap<String, IndexEntry>,
}

/// Where the index of the directory with key prefix `dir_prefix` lives. A hash keeps the key
/// short and flat whatever the directory's depth.
pub fn index_key(mount_prefix: &str, dir_prefix: &str) -> String {
    let digest = Sha256::digest(dir_prefix.as_bytes());
    format!("{mount_prefix}{INDEX_DIR}/{}", hex::encode(&digest[..16]))
}

impl AttrIndex {
    pub fn new(dir_prefix: &str) -> AttrIndex {
        AttrIndex {
            version: VERSION,
            dir: dir_prefix.to_string(),
            entries: BTreeMap::new(),
        }
    }

    /// The index of `dir_prefix` from its stored bytes; `Err` says why it is not usable.
    pub fn parse(bytes: &[u8], dir_prefix: &str) -> Result<AttrIndex, String> {
        let index: AttrIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable: {e}"))?;
        if index.version != VERSION {
            return Err(format!("unknown version {}", index.version));
        }
        if index.dir != dir_prefix {
            return Err(format!("made for {:?}", index.dir));
        }
        Ok(index)
    }

    /// The stored metadata of `name`, taken out of the index, if the index knows the
    /// version the listing shows (a cold listing takes each entry once: no copy).
    pub fn take(&mut self, name: &str, listed: &Listed) -> Option<Metadata> {
        match self.entries.get(name) {
            Some(e) if e.listed == *listed => self.entries.remove(name).map(|e| e.meta),
            _ => None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn splits_name_every_page_and_come_back_after_a_key() {
        let names: Vec<String> = (0..3500).map(|i| format!("f{i:05}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let value = splits_value(&refs).expect("three splits");
        let mut m = Metadata::new();
        m.insert(SPLITS_KEY.into(), value);
        assert_eq!(
            splits_after(Some(&m), "d/", "d/f00999"),
            ["d/f01999", "d/f02999"]
        );
        assert_eq!(splits_after(Some(&m), "d/", "d/f00998").len(), 3);
        // Too few names for a split; unreadable or missing values give none.
        assert_eq!(splits_value(&refs[..1000]), None);
        m.insert(SPLITS_KEY.into(), "not base64!".into());
        assert!(splits_after(Some(&m), "d/", "").is_empty());
        assert!(splits_after(None, "d/", "").is_empty());
    }

    #[test]
    fn long_names_are_split_more_coarsely_to_fit_the_metadata() {
        let names: Vec<String> = (0..100_000)
            .map(|i| format!("{i:06}{}", "x".repeat(200)))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let value = splits_value(&refs).expect("some splits fit");
        assert!(value.len() <= SPLITS_BYTES);
        let mut m = Metadata::new();
        m.insert(SPLITS_KEY.into(), value);
        let splits = splits_after(Some(&m), "", "");
        assert!(splits.len() >= 3, "{} splits", splits.len());
    }

    fn listed(etag: &str, secs: u64) -> Listed {
        Listed::new(
            etag,
            100,
            UNIX_EPOCH + Duration::from_millis(secs * 1000 + 5),
        )
    }

    #[test]
    fn an_entry_is_taken_only_for_the_version_it_was_made_for() {
        let mut index = AttrIndex::new("p/d/");
        let meta = Metadata::from([("mode".to_string(), "33188".to_string())]);
        index.entries.insert(
            "f".into(),
            IndexEntry {
                listed: listed("e1", 7),
                meta: meta.clone(),
            },
        );
        let mut back = AttrIndex::parse(&index.to_bytes(), "p/d/").unwrap();
        // Rewritten content, a metadata copy (same ETag, new time), another size, a name
        // it does not know: none are taken.
        assert_eq!(back.take("f", &listed("e2", 7)), None);
        assert_eq!(back.take("f", &listed("e1", 8)), None);
        let mut bigger = listed("e1", 7);
        bigger.size += 1;
        assert_eq!(back.take("f", &bigger), None);
        assert_eq!(back.take("g", &listed("e1", 7)), None);
        assert_eq!(back.take("f", &listed("e1", 7)), Some(meta));
    }

    #[test]
    fn an_index_of_another_directory_or_version_is_refused() {
        let index = AttrIndex::new("p/d/");
        assert!(AttrIndex::parse(&index.to_bytes(), "p/e/").is_err());
        let other = index.to_bytes().replace_version();
        assert!(AttrIndex::parse(&other, "p/d/").is_err());
        assert!(AttrIndex::parse(b"{not json", "p/d/").is_err());
        assert_ne!(index_key("", "p/d/"), index_key("", "p/e/"));
        assert!(index_key("m/", "p/d/").starts_with("m/.coffer-attr-index/"));
    }

    trait ReplaceVersion {
        fn replace_version(self) -> Vec<u8>;
    }

    impl ReplaceVersion for Vec<u8> {
        fn replace_version(self) -> Vec<u8> {
            String::from_utf8(self)
                .unwrap()
                .replace("\"version\":1", "\"version\":99")
                .into_bytes()
        }
    }
}
