//! POSIX attributes and how they persist in object metadata.
//!
//! The names follow s3fs so that other tools understand them: `mode` (decimal `st_mode`,
//! type bits included), `uid`, `gid`, `mtime` and `ctime` (whole seconds). coffer adds
//! `coffer-mtime` and `coffer-ctime` (`seconds.nanoseconds`) for full precision, and
//! `coffer-xattr` (JSON object of base64 values) for user extended attributes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::store::Metadata;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    /// Permission bits (07777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Plaintext size.
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Mount-wide defaults for objects without POSIX metadata (written by other tools).
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub file_perm: u32,
    pub dir_perm: u32,
}

impl Attr {
    pub fn new(kind: Kind, perm: u32, uid: u32, gid: u32) -> Attr {
        let now = SystemTime::now();
        Attr {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            mtime: now,
            ctime: now,
        }
    }

    /// Attributes from an object's metadata; missing fields take the defaults, so objects
    /// from other tools show as ordinary files, never as `----------`.
    pub fn from_metadata(
        kind_hint: Kind,
        meta: &Metadata,
        fallback_time: SystemTime,
        d: &Defaults,
    ) -> Attr {
        let mode: Option<u32> = meta.get("mode").and_then(|v| v.trim().parse().ok());
        let kind = match mode.map(|m| m & libc::S_IFMT) {
            Some(libc::S_IFLNK) if kind_hint == Kind::File => Kind::Symlink,
            _ => kind_hint,
        };
        let perm = match mode {
            Some(m) if m & 0o7777 != 0 || m & libc::S_IFMT != 0 => m & 0o7777,
            _ => match kind {
                Kind::Dir => d.dir_perm,
                Kind::Symlink => 0o777,
                Kind::File => d.file_perm,
            },
        };
        let time = |precise: &str, secs: &str| {
            meta.get(precise)
                .and_then(|v| parse_time(v))
                .or_else(|| meta.get(secs).and_then(|v| parse_time(v)))
                .unwrap_or(fallback_time)
        };
        Attr {
            kind,
            perm,
            uid: meta
                .get("uid")
                .and_then(|v| v.parse().ok())
                .unwrap_or(d.uid),
            gid: meta
                .get("gid")
                .and_then(|v| v.parse().ok())
                .unwrap_or(d.gid),
            size: 0,
            mtime: time("coffer-mtime", "mtime"),
            ctime: time("coffer-ctime", "ctime"),
        }
    }

    /// Writes the attributes into metadata (keeping other entries).
    pub fn to_metadata(&self, meta: &mut Metadata) {
        meta.insert(
            "mode".into(),
            (self.kind.type_bits() | self.perm).to_string(),
        );
        meta.insert("uid".into(), self.uid.to_string());
        meta.insert("gid".into(), self.gid.to_string());
        meta.insert("mtime".into(), secs(self.mtime).to_string());
        meta.insert("ctime".into(), secs(self.ctime).to_string());
        meta.insert("coffer-mtime".into(), format_time(self.mtime));
        meta.insert("coffer-ctime".into(), format_time(self.ctime));
    }
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

/// `seconds.nanoseconds`, with negative seconds for times before 1970.
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            // t = -(d): floor to whole seconds, keep a non-negative nanosecond part.
            let (s, n) = if d.subsec_nanos() == 0 {
                (d.as_secs() as i64, 0)
            } else {
                (d.as_secs() as i64 + 1, 1_000_000_000 - d.subsec_nanos())
            };
            format!("-{s}.{n:09}")
        }
    }
}

pub fn parse_time(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (s, n) = match v.split_once('.') {
        Some((s, n)) => {
            if n.is_empty() || n.len() > 9 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (
                s.parse::<u64>().ok()?,
                format!("{n:0<9}").parse::<u32>().ok()?,
            )
        }
        None => (v.parse::<u64>().ok()?, 0),
    };
    if neg {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(s))?
            .checked_add(Duration::from_nanos(n as u64))
    } else {
        UNIX_EPOCH.checked_add(Duration::new(s, n))
    }
}

pub const XATTR_KEY: &str = "coffer-xattr";

/// The metadata keys of a file's modification and change times.
pub const TIME_KEYS: [&str; 4] = ["mtime", "ctime", "coffer-mtime", "coffer-ctime"];

pub fn xattrs_from_metadata(meta: &Metadata) -> BTreeMap<String, Vec<u8>> {
    let Some(json) = meta.get(XATTR_KEY) else {
        return BTreeMap::new();
    };
    let map: BTreeMap<String, String> = serde_json::from_str(json).unwrap_or_default();
    // Only the namespace a mount stores (another tool's metadata may name others).
    map.into_iter()
        .filter(|(k, _)| k.starts_with(super::XATTR_NAMESPACE))
        .filter_map(|(k, v)| STANDARD.decode(v).ok().map(|v| (k, v)))
        .collect()
}

pub fn xattrs_to_metadata(x: &BTreeMap<String, Vec<u8>>, meta: &mut Metadata) {
    if x.is_empty() {
        meta.remove(XATTR_KEY);
        return;
    }
    let map: BTreeMap<&String, String> = x.iter().map(|(k, v)| (k, STANDARD.encode(v))).collect();
    meta.insert(
        XATTR_KEY.into(),
        serde_json::to_string(&map).expect("strings serialize"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_to_the_nanosecond() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH,
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH - Duration::from_secs(86400),
        ] {
            assert_eq!(parse_time(&format_time(t)), Some(t), "{}", format_time(t));
        }
        assert_eq!(parse_time("12"), Some(UNIX_EPOCH + Duration::from_secs(12)));
        assert_eq!(parse_time("x"), None);
        assert_eq!(parse_time("1.1234567890"), None);
    }

    #[test]
    fn foreign_objects_get_defaults() {
        let d = Defaults {
            uid: 7,
            gid: 8,
            file_perm: 0o644,
            dir_perm: 0o755,
        };
        let a = Attr::from_metadata(Kind::File, &Metadata::new(), UNIX_EPOCH, &d);
        assert_eq!((a.perm, a.uid, a.gid, a.kind), (0o644, 7, 8, Kind::File));
        let mut m = Metadata::new();
        let mut b = Attr::new(Kind::Symlink, 0o777, 1, 2);
        b.mtime = UNIX_EPOCH + Duration::new(3, 4);
        b.to_metadata(&mut m);
        let back = Attr::from_metadata(Kind::File, &m, UNIX_EPOCH, &d);
        assert_eq!(back.kind, Kind::Symlink);
        assert_eq!(
            (back.perm, back.uid, back.gid, back.mtime),
            (0o777, 1, 2, b.mtime)
        );
    }
}
