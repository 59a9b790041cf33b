//! Reading a replica's key directories for listings, walks and prunes: each directory is
//! read once for both the key's own versions and the keys below it.

use std::fs;
use std::io;
use std::path::Path;

use tracing::warn;

use super::layout::{self, VersionLayout};
use super::replica::{self, VersionName};

/// One read of a key's directory.
pub struct KeyDir {
    /// The key's versions, oldest first (flat layout: they are in this directory).
    flat_versions: Vec<VersionName>,
    /// Nested layout: the key has a `%v` directory, read when its versions are asked for.
    nested_versions: bool,
    /// Every other entry: the directories of keys below this one, `%n`, and whatever else
    /// something other than coffer planted.
    pub entries: Vec<fs::DirEntry>,
    layout: VersionLayout,
}

impl KeyDir {
    /// Reads `dir`; `None` when it is missing (or not a directory).
    pub fn read(dir: &Path, layout: VersionLayout) -> io::Result<Option<KeyDir>> {
        let listing = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut kd = KeyDir {
            flat_versions: Vec::new(),
            nested_versions: false,
            entries: Vec::new(),
            layout,
        };
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_str();
            match layout {
                VersionLayout::Flat => {
                    if let Some((id, suffix)) = name.and_then(|n| layout.parse_file_name(n)) {
                        // A record names a version; a data file is skipped.
                        kd.flat_versions.extend(replica::version_named(id, suffix));
                        continue;
                    }
                }
                VersionLayout::Nested => {
                    if name == Some(layout::VERSIONS_DIR) {
                        kd.nested_versions |= entry.file_type()?.is_dir();
                        continue;
                    }
                }
            }
            kd.entries.push(entry);
        }
        kd.flat_versions.sort();
        Ok(Some(kd))
    }

    /// Whether the key has versions of its own (in the nested layout: a `%v` directory).
    pub fn has_versions(&self) -> bool {
        !self.flat_versions.is_empty() || self.nested_versions
    }

    /// The key's versions, oldest first; `dir` is the directory this was read from.
    pub fn versions(&self, dir: &Path) -> io::Result<Vec<VersionName>> {
        match self.layout {
            VersionLayout::Flat => Ok(self.flat_versions.clone()),
            VersionLayout::Nested if self.nested_versions => {
                replica::versions_in(&dir.join(layout::VERSIONS_DIR), self.layout)
            }
            VersionLayout::Nested => Ok(Vec::new()),
        }
    }

    /// Whether any key below this one has a live newest version.
    fn subtree_live(&self) -> io::Result<bool> {
        for entry in &self.entries {
            if entry.file_name() == layout::NAME_FILE || !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            let Some(child) = KeyDir::read(&path, self.layout)? else {
                continue;
            };
            if child.versions(&path)?.last().is_some_and(|v| !v.deleted) || child.subtree_live()? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What a key's directory holds: whether it has versions of its own, and whether any key
/// below it has a live newest version.
pub fn key_dir_contents(dir: &Path, layout: VersionLayout) -> io::Result<(bool, bool)> {
    match KeyDir::read(dir, layout)? {
        Some(kd) => Ok((kd.has_versions(), kd.subtree_live()?)),
        None => Ok((false, false)),
    }
}

/// The key component of a replica directory entry, or `None` for entries no key maps to:
/// the store's own files, and what something else planted there (names that are not UTF-8,
/// symlinks, plain files, damaged long-name files), which is skipped with a warning rather
/// than followed or allowed to fail the whole listing.
pub fn listable_component(
    dir: &Path,
    entry: &fs::DirEntry,
    layout: VersionLayout,
) -> io::Result<Option<String>> {
    let name = entry.file_name();
    let Some(name) = name.to_str() else {
        warn!(
            "{}: skipping an entry whose name is not UTF-8",
            entry.path().display()
        );
        return Ok(None);
    };
    if name == layout::VERSIONS_DIR
        || name == layout::NAME_FILE
        || (layout == VersionLayout::Flat && layout.parse_file_name(name).is_some())
    {
        return Ok(None);
    }
    if !layout::is_real_dir(entry)? {
        warn!(
            "{}: skipping an entry that is not a directory of the store",
            entry.path().display()
        );
        return Ok(None);
    }
    match layout::component_of(dir, name) {
        Ok(c) => Ok(c),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::NotFound
            ) =>
        {
            warn!(
                "{}: skipping a damaged long name: {e}",
                entry.path().display()
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Walks a replica's directory tree below `dir` (whose key prefix is `base`), calling `f`
/// with each key that has versions and its newest version. `partial` filters the first level.
pub fn walk(
    dir: &Path,
    base: &str,
    partial: Option<&str>,
    layout: VersionLayout,
    f: &mut dyn FnMut(String, Option<&VersionName>),
) -> io::Result<()> {
    match KeyDir::read(dir, layout)? {
        Some(kd) => walk_below(&kd, dir, base, partial, f),
        None => Ok(()),
    }
}

fn walk_below(
    kd: &KeyDir,
    dir: &Path,
    base: &str,
    partial: Option<&str>,
    f: &mut dyn FnMut(String, Option<&VersionName>),
) -> io::Result<()> {
    for entry in &kd.entries {
        let Some(comp) = listable_component(dir, entry, kd.layout)? else {
            continue;
        };
        if partial.is_some_and(|p| !comp.starts_with(p)) {
            continue;
        }
        let key = format!("{base}{comp}");
        let path = entry.path();
        let Some(child) = KeyDir::read(&path, kd.layout)? else {
            continue;
        };
        let versions = child.versions(&path)?;
        if !versions.is_empty() {
            f(key.clone(), versions.last());
        }
        walk_below(&child, &path, &format!("{key}/"), None, f)?;
    }
    Ok(())
}
