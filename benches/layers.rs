//! The crypt and cache layers alone, with no mount and no disk, so a regression in the data
//! path shows without FUSE or a store in the way. `cargo bench --bench layers`.
//!
//! - crypt: sealing and opening 1 MiB of a file (64 KiB chunks) through the object cipher;
//! - cache: hits of the decrypted chunk cache;
//! - reader: 1 MiB reads of a 16 MiB object held by the in-memory store, cold (ranged get,
//!   open, cache fill) and warm (from the chunk cache);
//! - upload: a 16 MiB file streamed through the writer (sealed in parts, put as multipart).

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use coffer::cache::upload::StreamingWriter;
use coffer::cache::{ChunkCache, CommittedObject};
use coffer::crypt::keys::{KeyRing, RootKey};
use coffer::crypt::{Crypt, Mode};
use coffer::store::memory::MemoryStore;
use coffer::store::{GetOptions, ObjectStore, PutOptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use zeroize::Zeroizing;

const MIB: usize = 1 << 20;
const FILE: usize = 16 * MIB;

fn crypt() -> Crypt {
    let ring = KeyRing::new(vec![RootKey::from_bytes(Zeroizing::new([7; 32]))]).unwrap();
    Crypt::new(Mode::Client(Arc::new(ring)), 16)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

fn crypt_layer(c: &mut Criterion) {
    let rt = runtime();
    let crypt = crypt();
    let (cipher, _) = rt.block_on(crypt.new_object()).unwrap();
    let plain = data(MIB);
    let sealed = cipher.seal(0, &plain, true);
    let mut g = c.benchmark_group("crypt");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("seal 1 MiB, 64 KiB chunks", |b| {
        b.iter(|| black_box(cipher.seal(0, black_box(&plain), true)))
    });
    g.bench_function("open 1 MiB, 64 KiB chunks", |b| {
        b.iter(|| black_box(cipher.open(0..16, MIB as u64, black_box(&sealed)).unwrap()))
    });
    g.finish();
}

fn cache_layer(c: &mut Criterion) {
    let cache = ChunkCache::new(64 * MIB);
    for i in 0..512u64 {
        cache.insert((1, i), Bytes::from(vec![i as u8; 64 << 10]));
    }
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("chunk cache hit", |b| {
        b.iter(|| {
            i = (i + 97) % 512;
            black_box(cache.get(&(1, i)).unwrap())
        })
    });
    g.finish();
}

/// A 16 MiB encrypted object in the in-memory store.
fn stored_object(rt: &tokio::runtime::Runtime, crypt: &Crypt) -> Arc<dyn ObjectStore> {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(false));
    rt.block_on(async {
        let (cipher, metadata) = crypt.new_object().await.unwrap();
        let opts = PutOptions {
            metadata,
            ..Default::default()
        };
        let mut w = StreamingWriter::new(store.clone(), "file", opts, cipher);
        w.append(&data(FILE)).await.unwrap();
        w.finish(None).await.unwrap();
    });
    store
}

fn reader_layer(c: &mut Criterion) {
    let rt = runtime();
    let crypt = crypt();
    let store = stored_object(&rt, &crypt);
    let open = |cache: &ChunkCache| {
        rt.block_on(CommittedObject::open(
            store.as_ref(),
            &crypt,
            cache,
            "file",
            GetOptions::default(),
            None,
        ))
        .unwrap()
        .0
    };
    let read_all = |obj: &CommittedObject, cache: &ChunkCache| {
        rt.block_on(async {
            for off in (0..FILE as u64).step_by(MIB) {
                let range = off..off + MIB as u64;
                black_box(obj.read(store.as_ref(), cache, range).await.unwrap());
            }
        })
    };
    let mut g = c.benchmark_group("reader");
    g.throughput(Throughput::Bytes(FILE as u64));
    g.bench_function("16 MiB in 1 MiB reads, cold", |b| {
        b.iter(|| {
            let cache = ChunkCache::new(64 * MIB);
            read_all(&open(&cache), &cache)
        })
    });
    let cache = ChunkCache::new(64 * MIB);
    let obj = open(&cache);
    g.bench_function("16 MiB in 1 MiB reads, warm", |b| {
        b.iter(|| read_all(&obj, &cache))
    });
    g.finish();
}

fn upload_layer(c: &mut Criterion) {
    let rt = runtime();
    let crypt = crypt();
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new(false));
    let plain = data(MIB);
    let mut g = c.benchmark_group("upload");
    g.throughput(Throughput::Bytes(FILE as u64));
    g.bench_function("16 MiB streamed in 1 MiB writes", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (cipher, metadata) = crypt.new_object().await.unwrap();
                let opts = PutOptions {
                    metadata,
                    ..Default::default()
                };
                let mut w = StreamingWriter::new(store.clone(), "up", opts, cipher);
                for _ in 0..FILE / MIB {
                    w.append(&plain).await.unwrap();
                }
                black_box(w.finish(None).await.unwrap())
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = layers;
    config = Criterion::default().sample_size(10);
    targets = crypt_layer, cache_layer, reader_layer, upload_layer
}
criterion_main!(layers);
