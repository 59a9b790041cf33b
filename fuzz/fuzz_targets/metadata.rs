//! The metadata decoders: a local replica's version record (`.m` file, with any embedded
//! data after it), and object metadata (from a bucket anyone with access can write) turned
//! into POSIX attributes and xattrs.

#![no_main]

use std::time::SystemTime;

use coffer::store::Metadata;
use coffer::vfs::attr::{self, Attr, Defaults, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use coffer::store::local::record;
    let _ = record::decode_meta(data);
    // The whole of a record file: the record, and the embedded data after it.
    if let Ok((rec, at)) = record::decode_record_file(data, data.len() as u64)
        && rec.embedded
    {
        let _ = record::verify_stored(&data[at..], &rec);
    }
    let Ok(meta) = serde_json::from_slice::<Metadata>(data) else {
        return;
    };
    let d = Defaults {
        uid: 1000,
        gid: 1000,
        file_perm: 0o644,
        dir_perm: 0o755,
    };
    for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
        let a = Attr::from_metadata(kind, &meta, SystemTime::UNIX_EPOCH, &d);
        // What was read writes back and reads again the same.
        let mut again = Metadata::new();
        a.to_metadata(&mut again);
        let b = Attr::from_metadata(kind, &again, SystemTime::UNIX_EPOCH, &d);
        assert_eq!(
            (a.perm, a.uid, a.gid, a.mtime),
            (b.perm, b.uid, b.gid, b.mtime)
        );
    }
    let x = attr::xattrs_from_metadata(&meta);
    let mut again = Metadata::new();
    attr::xattrs_to_metadata(&x, &mut again);
    assert_eq!(attr::xattrs_from_metadata(&again), x);
    for v in meta.values() {
        let _ = attr::parse_time(v);
    }
});
