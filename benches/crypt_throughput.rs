//! Seal and open throughput of the object format, per core and on all cores, for 64 KiB and
//! 1 MiB chunks, against the raw AES-256-GCM-SIV throughput of the same crate on the same
//! machine, as ratios (`coffer::crypt::throughput`). `cargo bench --bench crypt_throughput`.

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let rows = coffer::crypt::throughput::measure(if quick { 8 << 20 } else { 256 << 20 });
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>16}",
        "chunk", "raw MB/s", "seal MB/s", "open MB/s", "seal/raw", "open/raw", "seal, all cores"
    );
    for r in &rows {
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>10.0} {:>9.3} {:>9.3} {:>16.0}",
            format!("{} KiB", r.chunk >> 10),
            r.raw,
            r.seal,
            r.open,
            r.seal_ratio(),
            r.open_ratio(),
            r.seal_all_cores
        );
    }
    println!("{}", coffer::crypt::throughput::report_json(&rows));
}
