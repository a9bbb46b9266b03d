//! The code cache: function code zips on local disk, content-addressed by their sha256.
//!
//! - Bounded: past `max_bytes` the least recently used entries are removed (never the one being
//!   read). An entry larger than the whole cache is still served, then removed.
//! - One fill per digest: concurrent misses for one digest wait on a per-digest lock; the first
//!   fetches from the [`CodeSource`], the others find the entry filled.
//! - Verified on read: every read hashes the bytes; an entry whose hash is wrong is removed and
//!   fetched again. What the source gives is verified too before it is stored.
//! - Survives restarts: entries are files named by their hex digest, written to a temporary
//!   file and renamed into place; on open the folder is scanned (use order from the files'
//!   modification times, which reads refresh) and leftover temporary files are removed.
//!
//! The source today is the API's code folder (`<data-dir>/code/<hex>.zip`, see
//! `hearth_api::store`), read with plain file reads through [`DirectorySource`]: the
//! `object_store` crate's `LocalFileSystem` would add some twenty crates to do the same read, so
//! it comes with the S3-compatible source, behind the same [`CodeSource`] trait.
//!
//! File IO runs on tokio's blocking pool, through std by default or through io_uring when asked
//! ([`FileIo::Uring`]: a whole read or a synced write is one linked submission on the thread's
//! ring, see `code_cache/uring.rs`; std where io_uring is refused). io_uring did not measure
//! faster here: the figures are in the crate docs (`cargo bench -p hearth-agent --bench
//! code_cache_io`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

mod uring;

/// Why code could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CodeCacheError {
    #[error("{0:?} is not a hex sha256 digest")]
    BadDigest(String),
    #[error("code {digest} is not in the code store")]
    NotFound { digest: String },
    #[error("the code store's copy of {digest} does not match its digest (it hashes to {actual})")]
    SourceCorrupt { digest: String, actual: String },
    #[error("code cache I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a code cache task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CodeCacheError + '_ {
    move |source| CodeCacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the cache reads and writes its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileIo {
    /// `std::fs`: open, read, close; open, write, fdatasync, close. The default: io_uring did not
    /// measure faster here (figures in the crate docs).
    #[default]
    Std,
    /// io_uring: each read or synced write is one linked submission on the thread's ring; std
    /// where io_uring is refused.
    Uring,
}

impl FileIo {
    /// What is really used: [`FileIo::Std`] where io_uring is refused.
    pub fn effective(self) -> FileIo {
        match self {
            FileIo::Uring if uring::available() => FileIo::Uring,
            _ => FileIo::Std,
        }
    }

    /// Reads the file at `path`, whose expected length (from the cache's index) is `len`.
    pub fn read(self, path: &Path, len: Option<u64>) -> std::io::Result<Vec<u8>> {
        if let (FileIo::Uring, Some(len)) = (self, len)
            && let Some(read) = uring::read(path, len)
        {
            return read;
        }
        std::fs::read(path)
    }

    /// Creates `path` (which must not exist), writes `bytes` to it and syncs its data.
    pub fn write_synced(self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if self == FileIo::Uring {
            match uring::write_synced(path, bytes) {
                Some(written) => return written,
                // Refused, or a short write: start again with std.
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_data()
    }
}

/// Where code comes from on a miss.
pub trait CodeSource: Send + Sync + 'static {
    /// The zip whose hex sha256 is `digest` (the cache verifies it).
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, CodeCacheError>;
}

/// A folder of `<hex sha256>.zip` files: the API's code store.
#[derive(Debug, Clone)]
pub struct DirectorySource {
    pub dir: PathBuf,
}

impl CodeSource for DirectorySource {
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, CodeCacheError> {
        let path = self.dir.join(format!("{digest}.zip"));
        match std::fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CodeCacheError::NotFound {
                digest: digest.to_string(),
            }),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// Use order and sizes of the entries on disk.
#[derive(Debug, Default)]
struct Lru {
    /// digest -> (size, use tick)
    entries: HashMap<String, (u64, u64)>,
    /// use tick -> digest
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, digest: &str, size: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((old_size, old_tick)) = self.entries.insert(digest.to_string(), (size, tick)) {
            self.order.remove(&old_tick);
            self.bytes -= old_size;
        }
        self.order.insert(tick, digest.to_string());
        self.bytes += size;
    }

    fn remove(&mut self, digest: &str) {
        if let Some((size, tick)) = self.entries.remove(digest) {
            self.order.remove(&tick);
            self.bytes -= size;
        }
    }

    /// Entries to remove, oldest first, until the total fits `max` (never `keep`).
    fn evict(&mut self, max: u64, keep: &str) -> Vec<String> {
        let mut out = Vec::new();
        let candidates: Vec<String> = self.order.values().cloned().collect();
        for d in candidates {
            if self.bytes <= max {
                break;
            }
            if d != keep {
                self.remove(&d);
                out.push(d);
            }
        }
        out
    }
}

/// Counters, for tests and (later) metrics.
#[derive(Debug, Default)]
pub struct CodeCacheStats {
    pub hits: AtomicU64,
    pub fills: AtomicU64,
    pub corrupt: AtomicU64,
    pub evictions: AtomicU64,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    file_io: FileIo,
    source: Box<dyn CodeSource>,
    lru: Mutex<Lru>,
    fills: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: CodeCacheStats,
}

/// The code cache. Cheap to clone.
#[derive(Clone)]
pub struct CodeCache {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl CodeCache {
    /// Opens (or creates) the cache in `dir`, holding at most `max_bytes` (beyond the entry being
    /// read), filled from `source`, with the default [`FileIo`].
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        source: impl CodeSource,
    ) -> Result<CodeCache, CodeCacheError> {
        Self::open_with(dir, max_bytes, source, FileIo::default())
    }

    /// [`CodeCache::open`] with the file IO chosen.
    pub fn open_with(
        dir: &Path,
        max_bytes: u64,
        source: impl CodeSource,
        file_io: FileIo,
    ) -> Result<CodeCache, CodeCacheError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().map_err(io(&entry.path()))?;
            if is_digest(&name) && meta.is_file() {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, name, meta.len()));
            } else if name.starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        found.sort();
        let mut lru = Lru::default();
        for (_, name, size) in &found {
            lru.touch(name, *size);
        }
        let cache = CodeCache {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                max_bytes,
                file_io: file_io.effective(),
                source: Box::new(source),
                lru: Mutex::new(lru),
                fills: Mutex::default(),
                stats: CodeCacheStats::default(),
            }),
        };
        let evicted = lock(&cache.inner.lru).evict(max_bytes, "");
        cache.remove_files(&evicted);
        tracing::info!(entries = found.len(), dir = %dir.display(), "code cache opened");
        Ok(cache)
    }

    /// The zip whose hex sha256 is `digest`, verified.
    pub async fn get(&self, digest: &str) -> Result<Vec<u8>, CodeCacheError> {
        if !is_digest(digest) {
            return Err(CodeCacheError::BadDigest(digest.to_string()));
        }
        let fill_lock = lock(&self.inner.fills)
            .entry(digest.to_string())
            .or_default()
            .clone();
        let result = {
            let _filling = fill_lock.lock().await;
            let inner = self.inner.clone();
            let digest = digest.to_string();
            tokio::task::spawn_blocking(move || inner.get_blocking(&digest))
                .await
                .map_err(CodeCacheError::Task)?
        };
        // Forget the lock once nobody else holds it (the map holds one reference, we hold one).
        let mut fills = lock(&self.inner.fills);
        if Arc::strong_count(&fill_lock) == 2 {
            fills.remove(digest);
        }
        result
    }

    /// Whether `digest` has an entry on disk (not verified).
    pub fn contains(&self, digest: &str) -> bool {
        lock(&self.inner.lru).entries.contains_key(digest)
    }

    /// The bytes the entries take.
    pub fn size_bytes(&self) -> u64 {
        lock(&self.inner.lru).bytes
    }

    /// How many entries the cache holds.
    pub fn entry_count(&self) -> usize {
        lock(&self.inner.lru).entries.len()
    }

    /// The file IO in use.
    pub fn file_io(&self) -> FileIo {
        self.inner.file_io
    }

    pub fn stats(&self) -> &CodeCacheStats {
        &self.inner.stats
    }

    /// The file of an entry.
    pub fn entry_path(&self, digest: &str) -> PathBuf {
        self.inner.dir.join(digest)
    }

    fn remove_files(&self, digests: &[String]) {
        self.inner.remove_files(digests);
    }
}

impl Inner {
    fn remove_files(&self, digests: &[String]) {
        for d in digests {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(self.dir.join(d));
        }
    }

    /// Runs on the blocking pool under the digest's fill lock.
    fn get_blocking(&self, digest: &str) -> Result<Vec<u8>, CodeCacheError> {
        let path = self.dir.join(digest);
        let known = lock(&self.lru).entries.get(digest).map(|&(size, _)| size);
        match self.file_io.read(&path, known) {
            Ok(bytes) => {
                if hex::encode(Sha256::digest(&bytes)) == digest {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    lock(&self.lru).touch(digest, bytes.len() as u64);
                    // The use order survives a restart through the modification time.
                    if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                    return Ok(bytes);
                }
                tracing::warn!(%digest, "code cache entry is corrupt; fetching it again");
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                lock(&self.lru).remove(digest);
                let _ = std::fs::remove_file(&path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                lock(&self.lru).remove(digest);
            }
            Err(e) => return Err(io(&path)(e)),
        }
        let bytes = self.source.fetch(digest)?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != digest {
            return Err(CodeCacheError::SourceCorrupt {
                digest: digest.to_string(),
                actual,
            });
        }
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            ".tmp-{digest}-{}",
            crate::sandbox::new_request_id()
        ));
        let write = || -> std::io::Result<()> {
            self.file_io.write_synced(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        let evicted = {
            let mut lru = lock(&self.lru);
            lru.touch(digest, bytes.len() as u64);
            lru.evict(self.max_bytes, digest)
        };
        self.remove_files(&evicted);
        Ok(bytes)
    }
}

/// The cache at scrape time: its size on disk and its event counts. Registered once per cache
/// (the agent's cores share one), not per environment set.
impl crate::metrics::Collect for CodeCache {
    fn collect(&self, gauges: &mut crate::metrics::GaugeSet) {
        gauges.add(
            "hearth_code_cache_bytes",
            "Bytes the code cache's entries take on disk.",
            &[],
            self.size_bytes() as f64,
        );
        gauges.add(
            "hearth_code_cache_entries",
            "Entries (code zips, one per digest) the code cache holds.",
            &[],
            self.entry_count() as f64,
        );
        let stats = self.stats();
        const CACHE: &str = "hearth_code_cache_events_total";
        const CACHE_HELP: &str = "Code cache events: hits, fills from the code source, corrupt entries found, evictions.";
        for (what, n) in [
            ("hit", &stats.hits),
            ("fill", &stats.fills),
            ("corrupt", &stats.corrupt),
            ("eviction", &stats.evictions),
        ] {
            gauges.add_counter(
                CACHE,
                CACHE_HELP,
                &[("event", what)],
                n.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// The real directory source, counting its fetches.
    struct Counting {
        dir: DirectorySource,
        fetches: Arc<AtomicUsize>,
    }

    impl CodeSource for Counting {
        fn fetch(&self, digest: &str) -> Result<Vec<u8>, CodeCacheError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.dir.fetch(digest)
        }
    }

    fn put(dir: &Path, bytes: &[u8]) -> String {
        let d = hex::encode(Sha256::digest(bytes));
        std::fs::write(dir.join(format!("{d}.zip")), bytes).unwrap();
        d
    }

    fn setup(max: u64) -> (tempfile::TempDir, CodeCache, Arc<AtomicUsize>) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("store")).unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let cache = open(tmp.path(), max, &fetches);
        (tmp, cache, fetches)
    }

    fn open(root: &Path, max: u64, fetches: &Arc<AtomicUsize>) -> CodeCache {
        CodeCache::open(
            &root.join("cache"),
            max,
            Counting {
                dir: DirectorySource {
                    dir: root.join("store"),
                },
                fetches: fetches.clone(),
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_fill_per_digest_under_concurrent_gets() {
        let (tmp, cache, fetches) = setup(1 << 20);
        let d = put(&tmp.path().join("store"), b"code one");
        let gets: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                let d = d.clone();
                tokio::spawn(async move { c.get(&d).await.unwrap() })
            })
            .collect();
        for g in gets {
            assert_eq!(g.await.unwrap(), b"code one");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().hits.load(Ordering::SeqCst), 15);
    }

    #[tokio::test]
    async fn least_recently_used_entries_are_evicted() {
        let (tmp, cache, fetches) = setup(25);
        let store = tmp.path().join("store");
        let a = put(&store, &[b'a'; 10]);
        let b = put(&store, &[b'b'; 10]);
        let c = put(&store, &[b'c'; 10]);
        cache.get(&a).await.unwrap();
        cache.get(&b).await.unwrap();
        cache.get(&a).await.unwrap(); // a is now newer than b
        cache.get(&c).await.unwrap(); // 30 > 25: b goes
        assert!(cache.contains(&a) && cache.contains(&c) && !cache.contains(&b));
        assert!(!cache.entry_path(&b).exists());
        assert_eq!(cache.size_bytes(), 20);
        assert_eq!(cache.entry_count(), 2);
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        cache.get(&b).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 4);
        // Bigger than the whole cache: served, and the only one left.
        let big = put(&store, &[b'x'; 40]);
        assert_eq!(cache.get(&big).await.unwrap().len(), 40);
        assert!(cache.contains(&big) && !cache.contains(&a));
    }

    #[tokio::test]
    async fn entries_survive_a_restart_in_their_use_order() {
        let (tmp, cache, fetches) = setup(25);
        let store = tmp.path().join("store");
        let a = put(&store, &[b'a'; 10]);
        let b = put(&store, &[b'b'; 10]);
        cache.get(&a).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.get(&b).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.get(&a).await.unwrap();
        drop(cache);
        std::fs::write(tmp.path().join("cache/.tmp-leftover"), b"x").unwrap();
        let cache = open(tmp.path(), 25, &fetches);
        assert!(!tmp.path().join("cache/.tmp-leftover").exists());
        assert_eq!(cache.size_bytes(), 20);
        assert_eq!(cache.get(&a).await.unwrap(), [b'a'; 10]);
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "served from disk");
        let c = put(&store, &[b'c'; 10]);
        cache.get(&c).await.unwrap();
        assert!(
            cache.contains(&a) && !cache.contains(&b),
            "b was the oldest"
        );
    }

    #[tokio::test]
    async fn a_corrupt_entry_is_rejected_and_fetched_again() {
        let (tmp, cache, fetches) = setup(1 << 20);
        let d = put(&tmp.path().join("store"), b"the real code");
        cache.get(&d).await.unwrap();
        std::fs::write(cache.entry_path(&d), b"the evil code").unwrap();
        assert_eq!(cache.get(&d).await.unwrap(), b"the real code");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert_eq!(cache.stats().corrupt.load(Ordering::SeqCst), 1);
        assert_eq!(
            std::fs::read(cache.entry_path(&d)).unwrap(),
            b"the real code"
        );
    }

    #[test]
    fn both_file_io_paths_read_and_write_the_same_bytes() {
        assert_eq!(
            FileIo::Uring.effective(),
            FileIo::Uring,
            "io_uring is refused on this machine (kernel.io_uring_disabled, seccomp?)"
        );
        for file_io in [FileIo::Std, FileIo::Uring] {
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("f");
            file_io.write_synced(&p, b"hello").unwrap();
            assert_eq!(
                file_io.write_synced(&p, b"again").unwrap_err().kind(),
                std::io::ErrorKind::AlreadyExists,
                "{file_io:?} creates exclusively"
            );
            assert_eq!(file_io.read(&p, Some(5)).unwrap(), b"hello");
            assert_eq!(file_io.read(&p, None).unwrap(), b"hello");
            // Another length than the index says: read whole all the same.
            std::fs::write(&p, b"longer now").unwrap();
            assert_eq!(file_io.read(&p, Some(5)).unwrap(), b"longer now");
            std::fs::write(&p, b"ab").unwrap();
            assert_eq!(file_io.read(&p, Some(5)).unwrap(), b"ab");
            let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
            let q = tmp.path().join("big");
            file_io.write_synced(&q, &big).unwrap();
            assert_eq!(file_io.read(&q, Some(big.len() as u64)).unwrap(), big);
            assert_eq!(
                file_io
                    .read(&tmp.path().join("missing"), Some(1))
                    .unwrap_err()
                    .kind(),
                std::io::ErrorKind::NotFound
            );
        }
    }

    #[tokio::test]
    async fn the_cache_works_the_same_over_std_file_io() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("store")).unwrap();
        let cache = CodeCache::open_with(
            &tmp.path().join("cache"),
            1 << 20,
            DirectorySource {
                dir: tmp.path().join("store"),
            },
            FileIo::Std,
        )
        .unwrap();
        assert_eq!(cache.file_io(), FileIo::Std);
        let d = put(&tmp.path().join("store"), b"plain code");
        assert_eq!(cache.get(&d).await.unwrap(), b"plain code");
        std::fs::write(cache.entry_path(&d), b"plain evil").unwrap();
        assert_eq!(cache.get(&d).await.unwrap(), b"plain code");
        assert_eq!(cache.stats().corrupt.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bad_digests_missing_and_corrupt_sources_are_errors() {
        let (tmp, cache, _) = setup(1 << 20);
        assert!(matches!(
            cache.get("../../etc/passwd").await,
            Err(CodeCacheError::BadDigest(_))
        ));
        let missing = "0".repeat(64);
        assert!(matches!(
            cache.get(&missing).await,
            Err(CodeCacheError::NotFound { .. })
        ));
        let d = put(&tmp.path().join("store"), b"good");
        std::fs::write(tmp.path().join(format!("store/{d}.zip")), b"bad").unwrap();
        assert!(matches!(
            cache.get(&d).await,
            Err(CodeCacheError::SourceCorrupt { .. })
        ));
        assert!(!cache.contains(&d));
    }
}
