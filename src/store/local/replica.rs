//! One replica directory: its identity marker, and the per-key version files inside it.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layout::{self, DirSync, VersionLayout};
use super::record::{self, MetaRecord};

pub const MARKER_FILE: &str = "replica.json";
/// Suffix of a version's metadata record (a live version).
pub const META_SUFFIX: &str = ".m";
/// Suffix of a delete marker's record.
pub const DELETE_SUFFIX: &str = ".x";
/// Suffix of a version's data file.
pub const DATA_SUFFIX: &str = ".d";

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ReplicaMarker {
    pub store_id: String,
    pub index: usize,
}

/// Why a replica could not serve a version.
#[derive(Debug)]
pub enum ReplicaError {
    Missing,
    Corrupt(String),
    Io(io::Error),
}

impl From<io::Error> for ReplicaError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            ReplicaError::Missing
        } else {
            ReplicaError::Io(e)
        }
    }
}

impl std::fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaError::Missing => f.write_str("missing"),
            ReplicaError::Corrupt(d) => write!(f, "corrupt ({d})"),
            ReplicaError::Io(e) => write!(f, "unreadable ({e})"),
        }
    }
}

/// A version's record file, open, and the length of the record at its start.
pub struct RecordFile {
    file: File,
    len: usize,
}

/// A version as named in a key's versions directory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionName {
    pub id: String,
    pub deleted: bool,
}

pub struct Replica {
    pub index: usize,
    pub root: PathBuf,
    pub objects: PathBuf,
    pub tmp: PathBuf,
    /// False when the replica directory is missing or not this store's (a disk not mounted).
    pub online: bool,
    /// Where the version files of a key are.
    pub layout: VersionLayout,
}

impl Replica {
    pub fn new(index: usize, root: PathBuf, layout: VersionLayout) -> Replica {
        Replica {
            index,
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            root,
            online: true,
            layout,
        }
    }

    /// Creates the replica's directories and identity marker.
    pub fn init(&self, store_id: &str) -> io::Result<()> {
        fs::create_dir_all(&self.root)?;
        fs::create_dir_all(&self.objects)?;
        fs::create_dir_all(&self.tmp)?;
        let marker = ReplicaMarker {
            store_id: store_id.to_string(),
            index: self.index,
        };
        let path = self.root.join(MARKER_FILE);
        let tmp = self.root.join(format!("{MARKER_FILE}.tmp"));
        super::durable::remove_file_if_exists(&tmp)?;
        super::durable::write_file_synced(&tmp, &serde_json::to_vec_pretty(&marker)?)?;
        fs::rename(&tmp, &path)?;
        super::durable::sync_dir(&self.root)?;
        if let Some(parent) = self.root.parent() {
            let _ = super::durable::sync_dir(parent);
        }
        Ok(())
    }

    /// Checks that the directory is this store's replica `index`.
    pub fn check_marker(&self, store_id: &str) -> Result<(), String> {
        let bytes = fs::read(self.root.join(MARKER_FILE))
            .map_err(|e| format!("{}: {e}", self.root.join(MARKER_FILE).display()))?;
        let marker: ReplicaMarker = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: {e}", self.root.join(MARKER_FILE).display()))?;
        if marker.store_id != store_id || marker.index != self.index {
            return Err(format!(
                "{} belongs to store {} as replica {}, not to store {store_id} as replica {}",
                self.root.display(),
                marker.store_id,
                marker.index,
                self.index
            ));
        }
        Ok(())
    }

    /// Removes leftovers of writes that never committed. Only safe while no put runs.
    pub fn clean_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            fs::remove_file(entry.path())?;
            n += 1;
        }
        Ok(n)
    }

    /// The directory holding `key`'s version files.
    pub fn versions_dir(&self, key: &str) -> PathBuf {
        self.layout
            .versions_dir(layout::key_dir(&self.objects, key))
    }

    /// Creates `key`'s directories (see [`layout::create_key_dirs`]) and returns its
    /// versions directory.
    pub fn create_key_dirs(&self, key: &str, sync: DirSync) -> io::Result<PathBuf> {
        layout::create_key_dirs(&self.objects, key, sync, self.layout)
    }

    /// Every version of `key` on this replica, oldest first.
    pub fn versions(&self, key: &str) -> io::Result<Vec<VersionName>> {
        versions_in(&self.versions_dir(key), self.layout)
    }

    pub fn record_path(&self, key: &str, v: &VersionName) -> PathBuf {
        let suffix = if v.deleted {
            DELETE_SUFFIX
        } else {
            META_SUFFIX
        };
        self.versions_dir(key)
            .join(self.layout.file_name(&v.id, suffix))
    }

    pub fn data_path(&self, key: &str, id: &str) -> PathBuf {
        self.versions_dir(key)
            .join(self.layout.file_name(id, DATA_SUFFIX))
    }

    /// Reads and verifies the record of a version.
    pub fn read_record(&self, key: &str, v: &VersionName) -> Result<MetaRecord, ReplicaError> {
        self.open_record(key, v).map(|(rec, _)| rec)
    }

    /// [`Self::read_record`], keeping the record's file open for [`Self::open_data`]: an
    /// embedded version's data is then read without opening the file again.
    pub fn open_record(
        &self,
        key: &str,
        v: &VersionName,
    ) -> Result<(MetaRecord, RecordFile), ReplicaError> {
        let file = File::open(self.record_path(key, v))?;
        let (rec, len) = record::read_meta(&file)?.map_err(ReplicaError::Corrupt)?;
        if rec.key != key || rec.deleted != v.deleted {
            return Err(ReplicaError::Corrupt(format!(
                "record names key {:?} (deleted: {}), expected {key:?}",
                rec.key, rec.deleted
            )));
        }
        Ok((rec, RecordFile { file, len }))
    }

    /// The stored bytes of live version `v`, whose record `rec` was read from `record`: the
    /// rest of that file when the data is embedded, else its `.d` file.
    pub fn open_data(
        &self,
        key: &str,
        v: &VersionName,
        rec: &MetaRecord,
        record: RecordFile,
    ) -> io::Result<record::StoredData> {
        if rec.embedded {
            return Ok(record::StoredData {
                file: record.file,
                base: record.len as u64,
            });
        }
        Ok(record::StoredData {
            file: File::open(self.data_path(key, &v.id))?,
            base: 0,
        })
    }
}

/// The versions named in a versions directory, oldest first. A missing directory has none.
pub fn versions_in(dir: &Path, layout: VersionLayout) -> io::Result<Vec<VersionName>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(v) = name.to_str().and_then(|n| version_of(n, layout)) {
            out.push(v);
        }
    }
    out.sort();
    Ok(out)
}

/// The version a record file's name in a versions directory names (`None` for data files
/// and for names that are no version's).
pub fn version_of(name: &str, layout: VersionLayout) -> Option<VersionName> {
    let (id, suffix) = layout.parse_file_name(name)?;
    version_named(id, suffix)
}

/// The version of a parsed version file name (see [`VersionLayout::parse_file_name`]):
/// `None` for a data file.
pub fn version_named(id: &str, suffix: &str) -> Option<VersionName> {
    match suffix {
        META_SUFFIX => Some(VersionName {
            id: id.to_string(),
            deleted: false,
        }),
        DELETE_SUFFIX => Some(VersionName {
            id: id.to_string(),
            deleted: true,
        }),
        _ => None,
    }
}
