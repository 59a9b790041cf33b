//! Scrub: read every replica of every version, verify it in full, report what is missing,
//! corrupt or orphaned, and optionally restore full redundancy from good copies.

use std::collections::BTreeMap;
use std::fs;
use std::io;

use super::replica::{DATA_SUFFIX, ReplicaError, VersionName};
use super::{LocalStore, durable, record};

/// A replica's verdict on one version: verified bytes, or why it failed.
type ReplicaStatus = (usize, Result<u64, ReplicaError>);

/// One problem found by a scrub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// A replica lacks a version the others have.
    Missing {
        key: String,
        version: String,
        replica: usize,
    },
    /// A replica's copy fails verification.
    Corrupt {
        key: String,
        version: String,
        replica: usize,
        detail: String,
    },
    /// No replica has a good copy: the version is lost.
    Lost { key: String, version: String },
    /// A data file with no record, or a leftover temporary file (from a crash).
    Orphan { path: String },
}

#[derive(Debug, Default)]
pub struct ScrubReport {
    pub keys: u64,
    pub versions: u64,
    pub bytes_verified: u64,
    pub damage: Vec<Damage>,
    /// Damage entries that were repaired.
    pub repaired: u64,
}

impl ScrubReport {
    /// Whether damage is left after this scrub (everything found, less what was repaired).
    pub fn damage_remaining(&self) -> bool {
        self.damage.len() as u64 > self.repaired
    }

    pub fn summary(&self) -> String {
        let count = |f: fn(&Damage) -> bool| self.damage.iter().filter(|d| f(d)).count();
        format!(
            "{} keys, {} versions, {} bytes verified; missing replicas: {}, corrupt replicas: {}, \
             lost versions: {}, orphaned files: {}; repaired: {}",
            self.keys,
            self.versions,
            self.bytes_verified,
            count(|d| matches!(d, Damage::Missing { .. })),
            count(|d| matches!(d, Damage::Corrupt { .. })),
            count(|d| matches!(d, Damage::Lost { .. })),
            count(|d| matches!(d, Damage::Orphan { .. })),
            self.repaired
        )
    }
}

/// Scrubs the whole store. `progress(done, total)` is called after each key. Run it while
/// nothing else writes to the store (the CLI takes the store's lock).
pub fn scrub(
    store: &LocalStore,
    repair: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<ScrubReport> {
    scrub_with(store, repair, None, progress)
}

/// Scrubs a store that a mount is writing to: verifies and repairs versions older than
/// `min_age` (younger ones may still be being written by a put), and leaves temporary and
/// record-less files alone (they may be puts in flight).
pub fn scrub_live(
    store: &LocalStore,
    repair: bool,
    min_age: std::time::Duration,
) -> io::Result<ScrubReport> {
    scrub_with(store, repair, Some(min_age), &mut |_, _| {})
}

fn scrub_with(
    store: &LocalStore,
    repair: bool,
    live: Option<std::time::Duration>,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<ScrubReport> {
    let inner = &store.inner;
    inner.settle();
    let mut report = ScrubReport::default();

    for r in inner.online().filter(|_| live.is_none()) {
        for entry in fs::read_dir(&r.tmp)? {
            let path = entry?.path();
            report.damage.push(Damage::Orphan {
                path: path.display().to_string(),
            });
            if repair {
                durable::remove_file_if_exists(&path)?;
                report.repaired += 1;
            }
        }
    }

    let keys = inner
        .walk_keys("", true)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let total = keys.len() as u64;
    for (done, key) in keys.into_iter().enumerate() {
        report.keys += 1;
        scrub_key(store, &key, repair, live, &mut report)?;
        progress(done as u64 + 1, total);
    }
    Ok(report)
}

fn scrub_key(
    store: &LocalStore,
    key: &str,
    repair: bool,
    live: Option<std::time::Duration>,
    report: &mut ScrubReport,
) -> io::Result<()> {
    let inner = &store.inner;
    let mut versions: BTreeMap<VersionName, Vec<ReplicaStatus>> = BTreeMap::new();
    for r in inner.online() {
        let names = r.versions(key)?;
        for v in &names {
            let status = r.open_record(key, v).and_then(|(rec, file)| {
                if v.deleted {
                    return Ok(0);
                }
                let data = r.open_data(key, v, &rec, file)?;
                record::verify_full(&data, &rec)?.map_err(ReplicaError::Corrupt)?;
                Ok(rec.size)
            });
            versions
                .entry(v.clone())
                .or_default()
                .push((r.index, status));
        }
        // Data files whose record never landed (a put cut short by a crash).
        let dir = r.versions_dir(key);
        let listing = if live.is_some() {
            None
        } else {
            fs::read_dir(&dir).ok()
        };
        if let Some(entries) = listing {
            for entry in entries {
                let name = entry?.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| r.layout.parse_file_name(n))
                    .and_then(|(id, suffix)| (suffix == DATA_SUFFIX).then_some(id))
                else {
                    continue;
                };
                if !names.iter().any(|v| v.id == id && !v.deleted) {
                    let path = dir.join(&name);
                    report.damage.push(Damage::Orphan {
                        path: path.display().to_string(),
                    });
                    if repair {
                        durable::remove_file_if_exists(&path)?;
                        durable::sync_dir(&dir)?;
                        report.repaired += 1;
                    }
                }
            }
        }
    }
    let cutoff = live.map(|age| super::now_ns().saturating_sub(age.as_nanos() as u64));
    for (v, statuses) in versions {
        let written = u64::from_str_radix(v.id.get(..16).unwrap_or(""), 16).unwrap_or(0);
        if cutoff.is_some_and(|c| written > c) {
            continue;
        }
        report.versions += 1;
        let mut good = None;
        let mut bad = Vec::new();
        for r in inner.online() {
            match statuses.iter().find(|(i, _)| *i == r.index) {
                None => {
                    report.damage.push(Damage::Missing {
                        key: key.to_string(),
                        version: v.id.clone(),
                        replica: r.index,
                    });
                    bad.push(r.index);
                }
                Some((_, Ok(size))) => {
                    report.bytes_verified += size;
                    good.get_or_insert(r.index);
                }
                Some((_, Err(e))) => {
                    let detail = e.to_string();
                    tracing::warn!(
                        "scrub: {key} version {} on replica {}: {detail}",
                        v.id,
                        r.index
                    );
                    report.damage.push(Damage::Corrupt {
                        key: key.to_string(),
                        version: v.id.clone(),
                        replica: r.index,
                        detail,
                    });
                    bad.push(r.index);
                }
            }
        }
        match good {
            None => {
                tracing::error!("scrub: {key} version {} has no good replica", v.id);
                report.damage.push(Damage::Lost {
                    key: key.to_string(),
                    version: v.id.clone(),
                });
            }
            Some(g) if repair && !bad.is_empty() => {
                store.repair_version(key, &v, g, &bad)?;
                report.repaired += bad.len() as u64;
            }
            Some(_) => {}
        }
    }
    Ok(())
}
