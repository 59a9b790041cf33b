//! Where an object key lives inside a replica directory.
//!
//! Each `/`-separated component of a key is a directory, so that a listing with a delimiter
//! reads one directory and a prefix never needs a scan of the whole store. The versions of
//! the object whose key ends at a component live in that component's directory, named
//! after the version with a leading `%` ([`VersionLayout::Flat`]):
//!
//! ```text
//! objects/photos/2024/a.jpg/%<version>.m   metadata record (the commit point)
//! objects/photos/2024/a.jpg/%<version>.d   data and its block checksums
//! ```
//!
//! Stores made before that layout keep them one level down, in a `%v` directory and without
//! the `%` ([`VersionLayout::Nested`]): `objects/photos/2024/a.jpg/%v/<version>.m`.
//!
//! Components are escaped so that no key can name `%v`, `%n`, `.`, `..` or a version file: a
//! component that is empty, or starts with `%` or `.`, gets a leading `%`, so that an escaped
//! name with a leading `%` goes on with `%`, `.` or nothing, where a version file's goes on
//! with a hexadecimal digit. A component whose escaped form is longer than a file name may be
//! (255 bytes) is stored under `%#` and a hash, with its real name in a `%n` file inside.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::replica::{DATA_SUFFIX, DELETE_SUFFIX, META_SUFFIX};

/// The directory holding the versions of an object, in [`VersionLayout::Nested`] stores.
pub const VERSIONS_DIR: &str = "%v";
/// The prefix of a version's file names in [`VersionLayout::Flat`] stores.
const FLAT_PREFIX: char = '%';

/// Where a replica keeps the version files of a key (fixed when the store is made, and
/// written in its `coffer.toml`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionLayout {
    /// In the key's `%v` directory, as `<version>.m`: stores made before stop 30.
    Nested,
    /// In the key's own directory, as `%<version>.m`: one directory fewer per key, which a
    /// cold read or listing of small files otherwise pays a disk read for.
    #[default]
    Flat,
}

impl VersionLayout {
    /// The file name of version `id` with `suffix` (`.m`, `.x` or `.d`).
    pub fn file_name(self, id: &str, suffix: &str) -> String {
        match self {
            VersionLayout::Nested => format!("{id}{suffix}"),
            VersionLayout::Flat => format!("{FLAT_PREFIX}{id}{suffix}"),
        }
    }

    /// The version id and suffix (`.m`, `.x` or `.d`) a name in a versions directory gives,
    /// or `None` for names that are no version file. In the flat layout the id must be
    /// lowercase hexadecimal, as every id this store makes is: that is what keeps a
    /// version file apart from an escaped key component in the same directory.
    pub fn parse_file_name(self, name: &str) -> Option<(&str, &'static str)> {
        let rest = match self {
            VersionLayout::Nested => name,
            VersionLayout::Flat => name.strip_prefix(FLAT_PREFIX)?,
        };
        let (id, suffix) = [META_SUFFIX, DELETE_SUFFIX, DATA_SUFFIX]
            .into_iter()
            .find_map(|s| rest.strip_suffix(s).map(|id| (id, s)))?;
        let hex = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (self == VersionLayout::Nested || hex).then_some((id, suffix))
    }

    /// The directory of `key`'s versions, given the key's own directory.
    pub fn versions_dir(self, key_dir: PathBuf) -> PathBuf {
        match self {
            VersionLayout::Nested => key_dir.join(VERSIONS_DIR),
            VersionLayout::Flat => key_dir,
        }
    }
}
/// The file holding the real name of a hashed (long) component.
pub const NAME_FILE: &str = "%n";
const HASHED_PREFIX: &str = "%#";
const MAX_NAME: usize = 255;

/// Escapes one key component into a file name.
pub fn escape_component(c: &str) -> String {
    let escaped = if c.is_empty() || c.starts_with('%') || c.starts_with('.') {
        format!("%{c}")
    } else {
        c.to_string()
    };
    if escaped.len() > MAX_NAME {
        format!("{HASHED_PREFIX}{}", blake3::hash(c.as_bytes()).to_hex())
    } else {
        escaped
    }
}

/// Whether a file name is a hashed component whose real name is in its `%n` file.
pub fn is_hashed(name: &str) -> bool {
    name.starts_with(HASHED_PREFIX)
}

/// Inverse of [`escape_component`] for names that are not hashed; `None` for the store's own
/// entries (`%v`, `%n`) and for names no key maps to.
pub fn unescape_component(name: &str) -> Option<String> {
    if name == VERSIONS_DIR || name == NAME_FILE || is_hashed(name) {
        return None;
    }
    match name.strip_prefix('%') {
        Some(rest) if rest.is_empty() || rest.starts_with('%') || rest.starts_with('.') => {
            Some(rest.to_string())
        }
        Some(_) => None,
        None if name.starts_with('.') => None,
        None => Some(name.to_string()),
    }
}

/// The longest real name a `%n` file may hold: keys are at most 1,024 bytes.
const MAX_NAME_FILE: u64 = 1024;

/// The real key component of the directory entry `name` inside `dir`. A `%n` file that is
/// missing, too long, not UTF-8 or holds a `/` (planted or damaged by something other than
/// coffer) is an `InvalidData` error: callers skip that entry, not the whole listing.
pub fn component_of(dir: &Path, name: &str) -> io::Result<Option<String>> {
    if is_hashed(name) {
        let path = dir.join(name).join(NAME_FILE);
        let f = fs::File::open(&path)?;
        let mut real = String::new();
        io::Read::read_to_string(&mut io::Read::take(f, MAX_NAME_FILE + 1), &mut real)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if real.len() as u64 > MAX_NAME_FILE || real.contains('/') || real.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a key component", path.display()),
            ));
        }
        return Ok(Some(real));
    }
    Ok(unescape_component(name))
}

/// Whether a directory entry is a real directory (not a symlink, which could lead out of
/// the replica: a store never creates one, so one found there was planted).
pub fn is_real_dir(entry: &fs::DirEntry) -> io::Result<bool> {
    Ok(entry.file_type()?.is_dir())
}

/// The directory of a key (below a replica's `objects/` directory), and the components that
/// need a `%n` name file because they were hashed.
pub fn key_dir(objects: &Path, key: &str) -> PathBuf {
    let mut p = objects.to_path_buf();
    for c in key.split('/') {
        p.push(escape_component(c));
    }
    p
}

/// The directory that a listing of `prefix` reads, and the partial last component that
/// entries must start with. `"a/b/"` reads `a/b` (every entry); `"a/b/c"` reads `a/b` and keeps
/// entries starting with `c`.
pub fn prefix_dir(objects: &Path, prefix: &str) -> (PathBuf, String, String) {
    match prefix.rfind('/') {
        Some(pos) => {
            let dir_key = &prefix[..pos];
            (
                key_dir(objects, dir_key),
                prefix[..=pos].to_string(),
                prefix[pos + 1..].to_string(),
            )
        }
        None => (objects.to_path_buf(), String::new(), prefix.to_string()),
    }
}

/// How new directories (and `%n` files) of a key are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirSync {
    /// fsync each new entry into its parent before returning.
    Now,
    /// No fsync: a journal entry covers the write until the next checkpoint's syncfs.
    Later,
    /// Replaying a journal after a crash: no fsync, and `%n` files of existing hashed
    /// components are checked and rewritten (a power cut may have left them empty).
    Replay,
}

/// Creates the directories of a key (and, in the nested layout, its `%v` directory),
/// writing `%n` files for hashed components and, with [`DirSync::Now`], fsyncing each new
/// directory's parent so that the new entries are durable. Returns the directory the
/// key's version files go in. A directory removed by a concurrent prune of an emptied
/// neighbour between two steps is created again.
pub fn create_key_dirs(
    objects: &Path,
    key: &str,
    sync: DirSync,
    versions: VersionLayout,
) -> io::Result<PathBuf> {
    let mut attempt = 0;
    loop {
        match try_create_key_dirs(objects, key, sync, versions) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 8 => attempt += 1,
            other => return other,
        }
    }
}

fn try_create_key_dirs(
    objects: &Path,
    key: &str,
    sync: DirSync,
    versions_layout: VersionLayout,
) -> io::Result<PathBuf> {
    let durable = sync == DirSync::Now;
    let mut p = objects.to_path_buf();
    for c in key.split('/') {
        let name = escape_component(c);
        let parent = p.clone();
        p.push(&name);
        match fs::create_dir(&p) {
            Ok(()) => {
                if is_hashed(&name) {
                    write_name_file(&p, c, durable)?;
                }
                if durable {
                    super::durable::sync_dir(&parent)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                refuse_non_dir(&p)?;
                if sync == DirSync::Replay
                    && is_hashed(&name)
                    && fs::read(p.join(NAME_FILE)).ok().as_deref() != Some(c.as_bytes())
                {
                    let _ = super::durable::remove_file_if_exists(&p.join(NAME_FILE));
                    write_name_file(&p, c, false)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    if versions_layout == VersionLayout::Flat {
        return Ok(p);
    }
    let versions = p.join(VERSIONS_DIR);
    match fs::create_dir(&versions) {
        Ok(()) if durable => super::durable::sync_dir(&p)?,
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => refuse_non_dir(&versions)?,
        Err(e) => return Err(e),
    }
    Ok(versions)
}

/// Checks, without creating anything, that [`create_key_dirs`] would find only directories
/// of the store's own where `key`'s directories already exist: what a write must know
/// before it is acknowledged when its layout files are written afterwards.
pub fn check_key_dirs(objects: &Path, key: &str, versions: VersionLayout) -> io::Result<()> {
    let mut p = objects.to_path_buf();
    let nested = (versions == VersionLayout::Nested).then(|| VERSIONS_DIR.to_string());
    for name in key.split('/').map(escape_component).chain(nested) {
        p.push(&name);
        match is_dir_nofollow(&p) {
            Ok(true) => {}
            Ok(false) => refuse_non_dir(&p)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_name_file(dir: &Path, component: &str, durable: bool) -> io::Result<()> {
    if durable {
        super::durable::write_file_synced(&dir.join(NAME_FILE), component.as_bytes())?;
        super::durable::sync_dir(dir)
    } else {
        fs::write(dir.join(NAME_FILE), component.as_bytes())
    }
}

/// Whether `p` is a directory (a symlink is not followed). Hand-written over statx(2)
/// because `fs::symlink_metadata` asks for every field, and reading a directory's ctime
/// marks it queried (Linux 6.13's multigrain timestamps): the next entry made in it then
/// takes a fine-grained ctime, which moves the kernel's timestamp floor, so that every
/// later append to a journal segment changes the segment's mtime and each fdatasync also
/// writes its inode's block. Measured: one more synchronous disk write per small file.
/// Asking for the file type alone reads no timestamp.
pub fn is_dir_nofollow(p: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statx is all zeroes-valid plain data.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `stx` a writable statx buffer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE,
            &mut stx,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(fs::symlink_metadata(p)?.is_dir());
        }
        return Err(e);
    }
    Ok(u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFDIR)
}

/// An existing path a write would go through must be a directory of the store's own: a
/// planted symlink would send the write outside the replica.
fn refuse_non_dir(p: &Path) -> io::Result<()> {
    if is_dir_nofollow(p)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a directory of the store (a symlink or file planted there?)",
                p.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        for c in [
            "", ".", "..", "%v", "%n", "%", ".hidden", "plain", "a b", "é", "%#x",
        ] {
            let e = escape_component(c);
            assert_ne!(e, VERSIONS_DIR);
            assert_ne!(e, NAME_FILE);
            assert_ne!(e, ".");
            assert_ne!(e, "..");
            assert_eq!(unescape_component(&e).as_deref(), Some(c), "{c:?} -> {e:?}");
        }
    }

    #[test]
    fn no_key_component_reads_as_a_flat_version_file() {
        let flat = VersionLayout::Flat;
        let id = "18ef0ecbc6a08c0412345678";
        for suffix in [".m", ".x", ".d"] {
            assert_eq!(
                flat.parse_file_name(&flat.file_name(id, suffix)),
                Some((id, suffix))
            );
            let nested = VersionLayout::Nested;
            assert_eq!(
                nested.parse_file_name(&nested.file_name(id, suffix)),
                Some((id, suffix))
            );
            // Components that look like version files, escaped, are none.
            for c in [
                format!("%{id}{suffix}"),
                format!("{id}{suffix}"),
                format!("%%{id}{suffix}"),
                format!(".{id}{suffix}"),
                suffix.to_string(),
                format!("%{suffix}"),
            ] {
                let e = escape_component(&c);
                assert_eq!(flat.parse_file_name(&e), None, "{c:?} escapes to {e:?}");
                assert_eq!(unescape_component(&e).as_deref(), Some(c.as_str()));
            }
        }
        for name in [
            "%v", "%n", "%.m", "%G1.m", "%1A.m", "%1.dd", "%#ab.m", "%%1.m",
        ] {
            assert_eq!(flat.parse_file_name(name), None, "{name}");
        }
        // And no version file reads as a key component.
        assert_eq!(unescape_component(&flat.file_name(id, ".m")), None);
    }

    #[test]
    fn long_components_are_hashed() {
        let long = "x".repeat(255);
        assert_eq!(escape_component(&long), long);
        let long_dot = format!(".{}", "x".repeat(254));
        let e = escape_component(&long_dot);
        assert!(is_hashed(&e));
        assert!(e.len() <= 255);
        assert_eq!(unescape_component(&e), None);
    }

    #[test]
    fn prefix_dirs() {
        let o = Path::new("/o");
        assert_eq!(
            prefix_dir(o, "a/b/"),
            (PathBuf::from("/o/a/b"), "a/b/".into(), "".into())
        );
        assert_eq!(
            prefix_dir(o, "a/b/c"),
            (PathBuf::from("/o/a/b"), "a/b/".into(), "c".into())
        );
        assert_eq!(
            prefix_dir(o, "c"),
            (PathBuf::from("/o"), "".into(), "c".into())
        );
    }

    #[test]
    fn is_dir_nofollow_tells_directories_from_files_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(is_dir_nofollow(&d).unwrap());
        assert!(!is_dir_nofollow(&f).unwrap());
        assert!(
            !is_dir_nofollow(&link).unwrap(),
            "a symlink to a directory is not one"
        );
        let missing = is_dir_nofollow(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(refuse_non_dir(&link).is_err());
        for l in [VersionLayout::Nested, VersionLayout::Flat] {
            assert!(check_key_dirs(dir.path(), "link/x", l).is_err());
            assert!(check_key_dirs(dir.path(), "d/x", l).is_ok());
        }
    }
}
