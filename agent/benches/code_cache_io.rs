//! The code cache's file IO, std against io_uring ([`FileIo`]): reading an entry whose length the
//! index knows, writing a new entry with its data synced, and a whole verified `CodeCache::get`
//! hit (blocking-pool hop, read, sha256, use-order touch), at 64 KiB and 4 MiB. The files live
//! under cargo's target folder (a disk here; fsync on a tmpfs /tmp would cost nothing).
//!
//! `cargo bench -p hearth-agent --bench code_cache_io`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hearth_agent::code_cache::{CodeCache, DirectorySource, FileIo};
use sha2::{Digest as _, Sha256};

const SIZES: [(usize, &str); 2] = [(64 << 10, "64KiB"), (4 << 20, "4MiB")];
const MODES: [(FileIo, &str); 2] = [(FileIo::Std, "std"), (FileIo::Uring, "io_uring")];

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("code-cache-io-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a scratch folder under the target folder")
}

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn file_io(c: &mut Criterion) {
    assert_eq!(
        FileIo::Uring.effective(),
        FileIo::Uring,
        "io_uring is refused here: nothing to compare"
    );
    let dir = scratch();
    let mut read = c.benchmark_group("read");
    for (len, size) in SIZES {
        let path = dir.path().join(format!("read-{size}"));
        std::fs::write(&path, bytes(len)).expect("write the file to read");
        read.throughput(Throughput::Bytes(len as u64));
        for (mode, name) in MODES {
            read.bench_with_input(BenchmarkId::new(name, size), &path, |b, path| {
                b.iter(|| mode.read(path, Some(len as u64)).expect("read"))
            });
        }
    }
    read.finish();

    let mut write = c.benchmark_group("write_synced");
    for (len, size) in SIZES {
        let data = bytes(len);
        write.throughput(Throughput::Bytes(len as u64));
        for (mode, name) in MODES {
            let path = dir.path().join(format!("write-{name}-{size}"));
            write.bench_with_input(BenchmarkId::new(name, size), &data, |b, data| {
                b.iter(|| {
                    mode.write_synced(&path, data).expect("write");
                    std::fs::remove_file(&path).expect("remove");
                })
            });
        }
    }
    write.finish();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut get = c.benchmark_group("get_hit");
    for (len, size) in SIZES {
        let data = bytes(len);
        let digest = hex::encode(Sha256::digest(&data));
        let store = dir.path().join(format!("store-{size}"));
        std::fs::create_dir_all(&store).expect("store");
        std::fs::write(store.join(format!("{digest}.zip")), &data).expect("store the code");
        get.throughput(Throughput::Bytes(len as u64));
        for (mode, name) in MODES {
            let cache = CodeCache::open_with(
                &dir.path().join(format!("cache-{name}-{size}")),
                1 << 30,
                DirectorySource { dir: store.clone() },
                mode,
            )
            .expect("open the cache");
            runtime.block_on(cache.get(&digest)).expect("fill");
            get.bench_with_input(BenchmarkId::new(name, size), &digest, |b, digest| {
                b.iter(|| runtime.block_on(cache.get(digest)).expect("hit"))
            });
        }
    }
    get.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = file_io
}
criterion_main!(benches);
