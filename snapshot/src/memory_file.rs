//! The memory file: guest RAM as one flat file (the regions one after the other), sparse: only
//! pages that are not all zero are written, the rest stay holes. Its [`MemoryFileInfo`] (size,
//! non-zero page count and an XXH64 digest of the non-zero pages with their indices) goes into the
//! state file.
//!
//! Restoring opens the file once ([`MemoryFile::open`]), checks it on that descriptor (a regular
//! file of the expected size, owned by this user or root and writable by nobody else: see
//! [`crate::access`]; and the digest of its non-zero pages, read through the data extents that
//! `SEEK_DATA`/`SEEK_HOLE` report), and hands that same descriptor to the VMM to map privately. A file swapped or rewritten before the
//! check is refused; one rewritten after it by its owner is not caught (the owner is trusted).
//!
//! Reading all of the data back costs time on every restore, so the writer also records the
//! file's identity (device, inode, size, change time), once the file is complete and has its
//! final mode ([`crate::access::FILE_MODE`], given at creation: no `chmod` comes after): a file that still has it has not been
//! written since (the change time moves on every write and cannot be set back by its owner), and
//! its contents are not read again. A copy, or a file touched in any way, gets the full check.

use crate::pagemap::{PageKind, Pagemap};
use crate::state_file::replace_with;
use nix::unistd::{Whence, lseek};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh64::Xxh64;

/// The page size the file is laid out in.
pub const PAGE_SIZE: usize = crate::pagemap::PAGE_SIZE;
/// How much is read at a time when checking the file.
const READ_CHUNK: usize = 1 << 20;

/// What the state file records about the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileInfo {
    /// The file's size: all of guest RAM, bytes.
    pub size: u64,
    /// Pages written (not all zero).
    pub data_pages: u64,
    /// XXH64 (seed 0) over each non-zero page, in order, preceded by its page index (u64 LE). Not
    /// CRC-64: over 52 MB of guest RAM, CRC-64 took 408-443 ms in the test host and XXH64 36-47 ms
    /// (a program hashing 52 MB three times under QEMU TCG; natively 36 against 7 ms).
    pub digest: u64,
    /// The file as written, to skip reading it again while it is unchanged.
    pub identity: Option<FileIdentity>,
}

/// Which file, and its last change: equal identities mean the same file, not written since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size.
    pub size: u64,
    /// Change time, seconds.
    pub ctime: i64,
    /// Change time, nanoseconds.
    pub ctime_nsec: i64,
}

impl FileIdentity {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// How a memory file was found good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The very file written, unchanged since: its contents were not read.
    Identity,
    /// Its contents were read and matched the digest.
    Digest,
}

/// Figures from writing a memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// What the state file records.
    pub info: MemoryFileInfo,
    /// Bytes written (the rest are holes).
    pub written_bytes: u64,
}

/// A memory file could not be written or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// A region is not a whole number of pages.
    #[error("a memory region of {0} bytes is not a whole number of {PAGE_SIZE}-byte pages")]
    RegionSize(usize),
    /// The file could not be created or written.
    #[error("cannot write the memory file {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The file could not be opened or read.
    #[error("cannot read the memory file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Seeking for data or holes failed.
    #[error("cannot find the data in the memory file {0}")]
    Seek(PathBuf, #[source] nix::Error),
    /// Not a regular file.
    #[error("the memory file {0} is not a regular file")]
    NotRegular(PathBuf),
    /// Another user than this one or root owns it, or others may write it.
    #[error(
        "the memory file {path} is owned by uid {uid} with mode {mode:o}; it must belong to this user (uid {euid}) or root and be writable by nobody else"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its mode bits.
        mode: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// The file's size is not guest RAM's.
    #[error("the memory file is {found} bytes; the snapshot's guest RAM is {expected} bytes")]
    Size {
        /// The snapshot's size.
        expected: u64,
        /// The file's.
        found: u64,
    },
    /// Guest RAM mapped privately from a memory file that was its RAM file has pages of its own
    /// since (`backing::check_unchanged`): a later snapshot would not describe the file.
    #[error(
        "guest RAM has {0} pages of its own since its file became the memory file: a later snapshot would not match that file"
    )]
    Diverged(u64),
    /// The contents changed since the snapshot was taken (or are corrupted).
    #[error(
        "the memory file does not match its snapshot: {found_pages} non-zero pages with digest {found:#018x}, expected {expected_pages} with {expected:#018x}"
    )]
    Digest {
        /// Pages found.
        found_pages: u64,
        /// Digest found.
        found: u64,
        /// Pages recorded.
        expected_pages: u64,
        /// Digest recorded.
        expected: u64,
    },
}

/// Whether `page` is all zero. A page with data mostly shows it in its first bytes, so those are
/// looked at first, with an early exit (this halved the zero check of a 52 MB snapshot in the
/// test host); the rest is an OR over the whole page (this vectorizes, an early exit does not).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let head = page.len().min(64);
    if page[..head].iter().any(|&b| b != 0) {
        return false;
    }
    page[head..].iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Feeds the non-zero pages of `bytes` (page `first_page` onwards) into `digest`; returns how many.
fn digest_pages(digest: &mut Xxh64, bytes: &[u8], first_page: u64) -> u64 {
    let mut n = 0;
    for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
        if !is_zero(page) {
            digest.update(&(first_page + i as u64).to_le_bytes());
            digest.update(page);
            n += 1;
        }
    }
    n
}

/// One region of guest RAM to write.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    /// The region as mapped in this process.
    pub bytes: &'a [u8],
    /// The file (and offset in it) the mapping shows wherever it holds no private page: the
    /// memory file of a restored VM (mapped privately, or served through userfaultfd). `None`:
    /// anonymous memory, zero wherever no page was ever touched.
    pub backing: Option<(&'a File, u64)>,
}

impl<'a> Region<'a> {
    /// Anonymous memory (or any bytes of this process).
    pub fn anonymous(bytes: &'a [u8]) -> Self {
        Region {
            bytes,
            backing: None,
        }
    }
}

/// Writes `regions` (guest RAM, in guest-address order) to `path`, leaving zero pages as holes.
/// The caller makes sure nothing writes the regions meanwhile (the VM is paused).
pub fn write(path: &Path, regions: &[&[u8]]) -> Result<WriteStats, MemoryFileError> {
    let regions: Vec<Region<'_>> = regions.iter().map(|r| Region::anonymous(r)).collect();
    write_regions(path, &regions)
}

/// Writes `regions` to `path` sparsely without touching a page that was never touched.
///
/// Each page's contents come from where they are: a page the process holds privately (written,
/// copied on write, swapped out) from the mapping; any other page of a file-backed region from
/// the backing file (`pread`, only inside its data extents, found with `SEEK_DATA`/`SEEK_HOLE`);
/// an untouched page of anonymous memory is zero and is skipped unread. Which pages are private
/// comes from `/proc/self/pagemap` ([`crate::pagemap`]); where it cannot be read, every page of
/// the mapping is read (correct, but holes get faulted in). All-zero pages stay holes.
pub fn write_regions(path: &Path, regions: &[Region<'_>]) -> Result<WriteStats, MemoryFileError> {
    for r in regions {
        if r.bytes.len() % PAGE_SIZE != 0 {
            return Err(MemoryFileError::RegionSize(r.bytes.len()));
        }
    }
    let io = |e| MemoryFileError::Write(path.to_path_buf(), e);
    let size: u64 = regions.iter().map(|r| r.bytes.len() as u64).sum();
    let mut pagemap = match Pagemap::open() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "no /proc/self/pagemap: reading every page of guest RAM");
            None
        }
    };
    let mut out_stats = (0u64, 0u64, 0u64);
    let file = replace_with(path, |file| {
        file.set_len(size)?;
        let mut out = SparseOut::new(file);
        let mut kinds = Vec::new();
        let mut file_offset = 0u64;
        for region in regions {
            let pages = region.bytes.len() / PAGE_SIZE;
            let addr = region.bytes.as_ptr() as usize;
            match &mut pagemap {
                // Page-aligned: a mapping (guest RAM always is).
                Some(map) if addr.is_multiple_of(PAGE_SIZE) => {
                    map.kinds(addr, pages, &mut kinds)?
                }
                _ => {
                    kinds.clear();
                    kinds.resize(pages, PageKind::Private);
                }
            }
            let data = match region.backing {
                Some((backing, at)) => data_extents(backing, at, region.bytes.len() as u64)?,
                None => Vec::new(),
            };
            write_region(
                &mut out,
                region,
                &kinds,
                &data,
                file_offset / PAGE_SIZE as u64,
            )?;
            file_offset += region.bytes.len() as u64;
        }
        out.flush()?;
        out_stats = (out.data_pages, out.written, out.digest.digest());
        Ok(())
    })
    .map_err(io)?;
    let (data_pages, written, digest) = out_stats;
    // After the rename, which may change the file's change time.
    let meta = file.metadata().map_err(io)?;
    Ok(WriteStats {
        info: MemoryFileInfo {
            size,
            data_pages,
            digest,
            identity: Some(FileIdentity::of(&meta)),
        },
        written_bytes: written,
    })
}

/// Where the contents of a run of pages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Zero: skipped unread.
    Zero,
    /// The mapping.
    Mapping,
    /// The backing file.
    Backing,
}

/// Writes one region, whose first page is page `first_page` of the memory file.
fn write_region<'a>(
    out: &mut SparseOut<'_, 'a>,
    region: &Region<'a>,
    kinds: &[PageKind],
    data: &[(u64, u64)],
    first_page: u64,
) -> std::io::Result<()> {
    let pages = kinds.len();
    let page_len = PAGE_SIZE as u64;
    let mut extents = data.iter().peekable();
    let mut source_of = |i: usize| -> Source {
        match kinds[i] {
            PageKind::Private => Source::Mapping,
            PageKind::Absent | PageKind::File if region.backing.is_some() => {
                let at = i as u64 * page_len;
                while extents.peek().is_some_and(|&&(_, end)| end <= at) {
                    extents.next();
                }
                match extents.peek() {
                    Some(&&(start, _)) if start < at + page_len => Source::Backing,
                    _ => Source::Zero,
                }
            }
            // A file page without a backing file: read what the mapping shows.
            PageKind::File => Source::Mapping,
            PageKind::Absent => Source::Zero,
        }
    };
    let mut buf = Vec::new();
    let mut i = 0;
    while i < pages {
        let source = source_of(i);
        let start = i;
        i += 1;
        while i < pages && i - start < READ_CHUNK / PAGE_SIZE && source_of(i) == source {
            i += 1;
        }
        match source {
            Source::Zero => {}
            Source::Mapping => {
                let bytes: &'a [u8] = &region.bytes[start * PAGE_SIZE..i * PAGE_SIZE];
                for (k, page) in bytes.chunks(PAGE_SIZE).enumerate() {
                    if !is_zero(page) {
                        out.push(first_page + (start + k) as u64, page)?;
                    }
                }
            }
            Source::Backing => {
                let Some((backing, at)) = region.backing else {
                    continue;
                };
                buf.resize((i - start) * PAGE_SIZE, 0);
                backing.read_exact_at(&mut buf, at + start as u64 * page_len)?;
                out.write_now(first_page + start as u64, &buf)?;
            }
        }
    }
    Ok(())
}

/// The data extents of `file` in `[at, at + len)`, relative to `at`, rounded out to whole pages
/// (`SEEK_DATA`/`SEEK_HOLE`): what is not in them reads as zero.
pub fn data_extents(file: &File, at: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let page = PAGE_SIZE as u64;
    let end = at + len;
    let mut extents = Vec::new();
    let mut pos = at;
    while pos < end {
        let data = match lseek(file.as_fd(), pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = lseek(file.as_fd(), data as i64, Whence::SeekHole)? as u64;
        let (s, e) = (
            data / page * page,
            hole.div_ceil(page).saturating_mul(page).min(end),
        );
        extents.push((s.max(at) - at, e - at));
        pos = e.max(pos + page);
    }
    Ok(extents)
}

/// Most pages written by one `pwritev` (the kernel's `IOV_MAX` is 1024).
const MAX_IOVECS: usize = 1024;

/// The memory file being written: non-zero pages gathered into runs of consecutive file pages,
/// digested in order, and written straight from where they lie (guest RAM, or a read buffer) with
/// `pwritev`: no copy into a buffer of our own first. Over 52 MB of guest RAM that copy cost
/// about as much as the write itself in the test host.
struct SparseOut<'f, 'a> {
    file: &'f File,
    run: Vec<&'a [u8]>,
    run_page: u64,
    digest: Xxh64,
    data_pages: u64,
    written: u64,
}

impl<'f, 'a> SparseOut<'f, 'a> {
    fn new(file: &'f File) -> Self {
        SparseOut {
            file,
            run: Vec::with_capacity(MAX_IOVECS),
            run_page: 0,
            digest: Xxh64::new(0),
            data_pages: 0,
            written: 0,
        }
    }

    /// Adds non-zero page `index`; pages must come in increasing order. The page is written at
    /// the next [`flush`](Self::flush) at the latest, so it must stay unchanged until then.
    fn push(&mut self, index: u64, page: &'a [u8]) -> std::io::Result<()> {
        let next = self.run_page + self.run.len() as u64;
        if !self.run.is_empty() && (index != next || self.run.len() >= MAX_IOVECS) {
            self.flush()?;
        }
        if self.run.is_empty() {
            self.run_page = index;
        }
        self.digest.update(&index.to_le_bytes());
        self.digest.update(page);
        self.run.push(page);
        self.data_pages += 1;
        Ok(())
    }

    /// Digests and writes the non-zero pages of `bytes` (page `first` onwards) at once: for bytes
    /// that do not live as long as the writer (a read buffer that is reused).
    fn write_now(&mut self, first: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.flush()?;
        // Consecutive non-zero pages of `bytes`, as page indices [a, b).
        let mut run: Option<(usize, usize)> = None;
        for (k, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            if is_zero(page) {
                if let Some((a, b)) = run.take() {
                    self.write_at(first + a as u64, &bytes[a * PAGE_SIZE..b * PAGE_SIZE])?;
                }
                continue;
            }
            self.digest.update(&(first + k as u64).to_le_bytes());
            self.digest.update(page);
            self.data_pages += 1;
            run = Some((run.map_or(k, |(a, _)| a), k + 1));
        }
        if let Some((a, b)) = run {
            self.write_at(first + a as u64, &bytes[a * PAGE_SIZE..b * PAGE_SIZE])?;
        }
        Ok(())
    }

    fn write_at(&mut self, page: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, page * PAGE_SIZE as u64)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut at = self.run_page * PAGE_SIZE as u64;
        let mut left: &[&[u8]] = &self.run;
        // Skips what a short write took, down to the byte.
        let mut skip = 0usize;
        while !left.is_empty() {
            let mut iov: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(left.len());
            iov.push(std::io::IoSlice::new(&left[0][skip..]));
            iov.extend(left[1..].iter().map(|p| std::io::IoSlice::new(p)));
            let n = match nix::sys::uio::pwritev(self.file.as_fd(), &iov, at as i64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            self.written += n as u64;
            at += n as u64;
            let mut n = n;
            while let Some(first) = left.first() {
                let rest = first.len() - skip;
                if n < rest {
                    skip += n;
                    break;
                }
                n -= rest;
                skip = 0;
                left = &left[1..];
            }
        }
        self.run.clear();
        Ok(())
    }
}

/// A checked memory file, open for mapping.
#[derive(Debug)]
pub struct MemoryFile {
    file: File,
    info: MemoryFileInfo,
    checked: Checked,
}

impl MemoryFile {
    /// Opens `path`, and checks on that descriptor that it is the memory file `expected` describes.
    pub fn open(path: &Path, expected: &MemoryFileInfo) -> Result<Self, MemoryFileError> {
        let io = |e| MemoryFileError::Read(path.to_path_buf(), e);
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(MemoryFileError::NotRegular(path.to_path_buf()));
        }
        if let Err(e) = crate::access::check(&meta) {
            return Err(MemoryFileError::Permissions {
                path: path.to_path_buf(),
                uid: e.uid,
                mode: e.mode,
                euid: e.euid,
            });
        }
        if meta.len() != expected.size {
            return Err(MemoryFileError::Size {
                expected: expected.size,
                found: meta.len(),
            });
        }
        if expected.identity == Some(FileIdentity::of(&meta)) {
            return Ok(MemoryFile {
                file,
                info: *expected,
                checked: Checked::Identity,
            });
        }
        let (found_pages, found) = digest_file(&file, expected.size, path)?;
        if found_pages != expected.data_pages || found != expected.digest {
            return Err(MemoryFileError::Digest {
                found_pages,
                found,
                expected_pages: expected.data_pages,
                expected: expected.digest,
            });
        }
        Ok(MemoryFile {
            file,
            info: *expected,
            checked: Checked::Digest,
        })
    }

    /// How it was found good.
    pub fn checked(&self) -> Checked {
        self.checked
    }

    /// What it holds.
    pub fn info(&self) -> &MemoryFileInfo {
        &self.info
    }

    /// The checked descriptor, to map.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// The digest of the non-zero pages of `file` (`size` bytes), read through its data extents.
fn digest_file(file: &File, size: u64, path: &Path) -> Result<(u64, u64), MemoryFileError> {
    let page = PAGE_SIZE as u64;
    let mut digest = Xxh64::new(0);
    let mut pages = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(file.as_fd(), pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            // ENXIO: no data after `pos`.
            Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(MemoryFileError::Seek(path.to_path_buf(), e)),
        };
        let hole = match lseek(file.as_fd(), data as i64, Whence::SeekHole) {
            Ok(off) => off as u64,
            Err(e) => return Err(MemoryFileError::Seek(path.to_path_buf(), e)),
        };
        // Whole pages, never before what was already read.
        let start = (data / page * page).max(pos);
        let end = hole.div_ceil(page).saturating_mul(page).min(size);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(READ_CHUNK);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| MemoryFileError::Read(path.to_path_buf(), e))?;
            pages += digest_pages(&mut digest, &buf[..n], at / page);
            at += n as u64;
        }
        pos = end.max(pos + page);
    }
    Ok((pages, digest.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regions() -> (Vec<u8>, Vec<u8>) {
        let mut low = vec![0u8; 64 * PAGE_SIZE];
        low[5 * PAGE_SIZE + 3] = 1;
        low[6 * PAGE_SIZE..7 * PAGE_SIZE].fill(0xaa);
        low[40 * PAGE_SIZE] = 9;
        let mut high = vec![0u8; 16 * PAGE_SIZE];
        high[15 * PAGE_SIZE + PAGE_SIZE - 1] = 7;
        (low, high)
    }

    #[test]
    fn zero_pages_are_told_from_pages_with_data_anywhere() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        for at in [0, 63, 64, PAGE_SIZE - 1] {
            page[at] = 1;
            assert!(!is_zero(&page), "a byte at {at}");
            page[at] = 0;
        }
    }

    #[test]
    fn sparse_round_trip_and_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let (low, high) = regions();
        let stats = write(&path, &[&low, &high]).unwrap();
        assert_eq!(stats.info.size, 80 * PAGE_SIZE as u64);
        assert_eq!(stats.info.data_pages, 4);
        assert_eq!(stats.written_bytes, 4 * PAGE_SIZE as u64);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..low.len()], &low[..]);
        assert_eq!(&bytes[low.len()..], &high[..]);
        // Holes are holes where the file system keeps them (tmpfs and ext4 do).
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(blocks < bytes.len() as u64, "{blocks} bytes allocated");
        let checked = MemoryFile::open(&path, &stats.info).unwrap();
        assert_eq!(checked.info(), &stats.info);
        assert_eq!(checked.checked(), Checked::Identity);
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy).unwrap();
        let checked = MemoryFile::open(&copy, &stats.info).unwrap();
        assert_eq!(checked.checked(), Checked::Digest);
    }

    #[test]
    fn runs_longer_than_one_pwritev_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        // 2,500 pages with data in a row (over two `pwritev`s of MAX_IOVECS pages), a hole, more.
        let mut ram = vec![0u8; 3000 * PAGE_SIZE];
        for page in (0..2500).chain(2600..2700) {
            ram[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill((page % 251) as u8 | 1);
        }
        let stats = write(&path, &[&ram]).unwrap();
        assert_eq!(stats.info.data_pages, 2600);
        assert_eq!(stats.written_bytes, 2600 * PAGE_SIZE as u64);
        assert_eq!(std::fs::read(&path).unwrap(), ram);
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy).unwrap();
        assert_eq!(
            MemoryFile::open(&copy, &stats.info).unwrap().checked(),
            Checked::Digest
        );
    }

    #[test]
    fn changed_truncated_or_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let (low, high) = regions();
        let info = write(&path, &[&low, &high]).unwrap().info;
        // One byte changed in a data page, then in a hole.
        for at in [6 * PAGE_SIZE as u64 + 10, 20 * PAGE_SIZE as u64] {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut old = [0u8; 1];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut old, at)
                .unwrap();
            f.write_all_at(&[old[0] ^ 0x10], at).unwrap();
            let err = MemoryFile::open(&path, &info).unwrap_err();
            assert!(matches!(err, MemoryFileError::Digest { .. }), "{err}");
            f.write_all_at(&old, at).unwrap();
            let back = MemoryFile::open(&path, &info).unwrap();
            assert_eq!(back.checked(), Checked::Digest, "written since: read again");
        }
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(info.size - PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            MemoryFile::open(&path, &info),
            Err(MemoryFileError::Size { .. })
        ));
        f.set_len(info.size).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        assert!(matches!(
            MemoryFile::open(&path, &info),
            Err(MemoryFileError::Permissions { .. })
        ));
        assert!(matches!(
            MemoryFile::open(&dir.path().join("missing"), &info),
            Err(MemoryFileError::Read(..))
        ));
        assert!(matches!(
            write(&path, &[&low[..100]]),
            Err(MemoryFileError::RegionSize(100))
        ));
    }

    /// Fails loudly unless this is root: handing a file to another user needs `chown`.
    fn as_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test gives a file to another user (chown): run it as root"
        );
    }

    #[test]
    fn a_new_file_is_readable_by_all_and_keeps_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        // A private leftover of the same name is replaced by a file of the pool's mode.
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let (low, high) = regions();
        let info = write(&path, &[&low, &high]).unwrap().info;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, crate::access::FILE_MODE);
        assert_eq!(info.identity, Some(FileIdentity::of(&meta)));
        // No chmod after the identity: the restore skips the digest.
        let checked = MemoryFile::open(&path, &info).unwrap();
        assert_eq!(checked.checked(), Checked::Identity);
    }

    #[test]
    fn files_of_root_or_this_user_are_taken_others_refused() {
        as_root();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let (low, high) = regions();
        let info = write(&path, &[&low, &high]).unwrap().info;
        // Root's file: taken (the jailed VMM's case, where root is not this user, is
        // `access::check_as`'s test).
        MemoryFile::open(&path, &info).unwrap();
        // Another user's: refused, whatever its contents.
        std::os::unix::fs::chown(&path, Some(4242), Some(4242)).unwrap();
        match MemoryFile::open(&path, &info) {
            Err(MemoryFileError::Permissions { uid: 4242, .. }) => {}
            other => panic!("another user's memory file was not refused: {other:?}"),
        }
        std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        MemoryFile::open(&path, &info).unwrap();
        // Group-writable: refused.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o664))
            .unwrap();
        assert!(matches!(
            MemoryFile::open(&path, &info),
            Err(MemoryFileError::Permissions { mode: 0o664, .. })
        ));
    }

    proptest! {
        #[test]
        fn digest_of_the_file_is_the_digest_written(pages in proptest::collection::vec((0usize..48, any::<u8>()), 0..12)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("mem");
            let mut mem = vec![0u8; 48 * PAGE_SIZE];
            for (p, v) in &pages {
                mem[p * PAGE_SIZE + (*v as usize % PAGE_SIZE)] = *v;
            }
            let info = write(&path, &[&mem]).unwrap().info;
            prop_assert_eq!(std::fs::read(&path).unwrap(), mem);
            prop_assert!(MemoryFile::open(&path, &info).is_ok());
        }
    }
}
