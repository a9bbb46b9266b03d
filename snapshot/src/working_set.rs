//! Working-set files: the pages of a memory file that a restored guest needed, recorded so that a
//! later restore of the same snapshot can bring them in before the guest runs instead of taking a
//! fault for each. Two kinds ([`SetKind`]):
//! - `<memory file>.ws`, the pages a userfaultfd restore had to serve (read or written), which a
//!   userfaultfd restore copies in ahead;
//! - `<memory file>.written.ws`, the pages a file-mapped restore's guest wrote (the mapping's
//!   private copies), which a file-mapped restore copies on write ahead: the guest's first write
//!   to each then costs neither a read fault and a second, copying fault, nor an exit at all when
//!   the first touch is the write.
//!
//! Layout (little-endian): magic `HEARTHWS`, format version (u32), the kind (u32: 0 served,
//! 1 written), the memory file's size and digest (u64 each: the set belongs to that memory file
//! and no other), the page count (u64), that many page indices (u64, strictly increasing, inside
//! the memory file), and a CRC-64 over all of the above. It is untrusted input: the size is capped
//! and every field is checked before a page index is used.

use crate::memory_file::{MemoryFileInfo, PAGE_SIZE};
use crate::state_file::{CRC64, replace_with};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file's magic number.
pub const MAGIC: &[u8; 8] = b"HEARTHWS";
/// The format version (not the release version).
pub const VERSION: u32 = 1;
/// Bytes before the page indices.
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8;
/// The most pages a set may name (64 GiB of guest RAM).
const MAX_PAGES: u64 = 16 << 20;

/// A working-set file could not be written or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read.
    #[error("cannot read the working-set file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file could not be written.
    #[error("cannot write the working-set file {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// Another user than this one or root owns it, or others may write it.
    #[error("the working-set file {0} is not acceptable")]
    Permissions(PathBuf, #[source] crate::access::AccessError),
    /// Not a working-set file, or cut short.
    #[error("the working-set file {0} is truncated or not a working-set file ({1} bytes)")]
    Truncated(PathBuf, u64),
    /// Another format version.
    #[error("the working-set file {path} has format version {found}; this build reads {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The checksum does not match.
    #[error("the working-set file {0} is corrupted (checksum mismatch)")]
    Checksum(PathBuf),
    /// It was recorded for another memory file.
    #[error("the working-set file {0} belongs to another snapshot's memory file")]
    OtherSnapshot(PathBuf),
    /// A set of the other kind (served pages where written ones were asked for, or the reverse).
    #[error("the working-set file {path} holds {found}; {wanted} were asked for")]
    Kind {
        /// The file.
        path: PathBuf,
        /// What it holds.
        found: &'static str,
        /// What the reader wanted.
        wanted: &'static str,
    },
    /// A page index is out of order or outside the memory file.
    #[error("the working-set file {0} names page {1}, out of order or outside the memory file")]
    BadPage(PathBuf, u64),
}

/// What the pages of a working set are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// Pages a userfaultfd restore served: every page the guest touched.
    Served,
    /// Pages a file-mapped restore's guest wrote: its private copies.
    Written,
}

impl SetKind {
    fn code(self) -> u32 {
        match self {
            SetKind::Served => 0,
            SetKind::Written => 1,
        }
    }

    fn name(code: u32) -> &'static str {
        match code {
            0 => "served pages",
            1 => "written pages",
            _ => "pages of an unknown kind",
        }
    }

    /// Where the set of this kind for the memory file `mem` is kept: `<mem>.ws` (served) or
    /// `<mem>.written.ws` (written).
    pub fn path_for(self, mem: &Path) -> PathBuf {
        let mut name = mem.as_os_str().to_os_string();
        name.push(match self {
            SetKind::Served => ".ws",
            SetKind::Written => ".written.ws",
        });
        PathBuf::from(name)
    }
}

/// The pages of a memory file a restored guest used, in increasing order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pages: Vec<u64>,
}

impl WorkingSet {
    /// The set of `pages` (any order, repeats dropped).
    pub fn new(mut pages: Vec<u64>) -> Self {
        pages.sort_unstable();
        pages.dedup();
        WorkingSet { pages }
    }

    /// The page indices, increasing.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Runs of consecutive pages as (first page, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in &self.pages {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    /// Writes the set, of `kind`, for the memory file `memory`, to `path` (replaced whole, or
    /// left as it was).
    pub fn write(
        &self,
        path: &Path,
        memory: &MemoryFileInfo,
        kind: SetKind,
    ) -> Result<(), WorkingSetError> {
        let bytes = self.encode(memory, kind);
        replace_with(path, |f| f.write_all(&bytes))
            .map(drop)
            .map_err(|e| WorkingSetError::Write(path.to_path_buf(), e))
    }

    fn encode(&self, memory: &MemoryFileInfo, kind: SetKind) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.pages.len() * 8 + 8);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&kind.code().to_le_bytes());
        b.extend_from_slice(&memory.size.to_le_bytes());
        b.extend_from_slice(&memory.digest.to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        let crc = CRC64.checksum(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks the set at `path`, which must be of `kind` and belong to the memory file
    /// `memory`.
    pub fn read(
        path: &Path,
        memory: &MemoryFileInfo,
        kind: SetKind,
    ) -> Result<Self, WorkingSetError> {
        use std::io::Read;
        let err = |e| WorkingSetError::Read(path.to_path_buf(), e);
        let file = std::fs::File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        crate::access::check(&meta)
            .map_err(|e| WorkingSetError::Permissions(path.to_path_buf(), e))?;
        let cap = HEADER as u64 + MAX_PAGES * 8 + 8;
        let mut bytes = Vec::new();
        file.take(cap + 1).read_to_end(&mut bytes).map_err(err)?;
        Self::decode(&bytes, path, memory, kind)
    }

    fn decode(
        bytes: &[u8],
        path: &Path,
        memory: &MemoryFileInfo,
        kind: SetKind,
    ) -> Result<Self, WorkingSetError> {
        let p = || path.to_path_buf();
        let truncated = || WorkingSetError::Truncated(p(), bytes.len() as u64);
        let u64_at = |at: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if bytes.len() < HEADER + 8 || &bytes[..8] != MAGIC {
            return Err(truncated());
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&bytes[8..12]);
        let found = u32::from_le_bytes(v);
        if found != VERSION {
            return Err(WorkingSetError::Version { path: p(), found });
        }
        let count = u64_at(HEADER - 8);
        if count > MAX_PAGES || bytes.len() as u64 != HEADER as u64 + count * 8 + 8 {
            return Err(truncated());
        }
        let body = bytes.len() - 8;
        if CRC64.checksum(&bytes[..body]) != u64_at(body) {
            return Err(WorkingSetError::Checksum(p()));
        }
        v.copy_from_slice(&bytes[12..16]);
        let found = u32::from_le_bytes(v);
        if found != kind.code() {
            return Err(WorkingSetError::Kind {
                path: p(),
                found: SetKind::name(found),
                wanted: SetKind::name(kind.code()),
            });
        }
        if u64_at(16) != memory.size || u64_at(24) != memory.digest {
            return Err(WorkingSetError::OtherSnapshot(p()));
        }
        let limit = memory.size / PAGE_SIZE as u64;
        let mut pages = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let page = u64_at(HEADER + i * 8);
            if page >= limit || pages.last().is_some_and(|&last| last >= page) {
                return Err(WorkingSetError::BadPage(p(), page));
            }
            pages.push(page);
        }
        Ok(WorkingSet { pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> MemoryFileInfo {
        MemoryFileInfo {
            size: 1024 * PAGE_SIZE as u64,
            data_pages: 10,
            digest: 0x1234,
            identity: None,
        }
    }

    #[test]
    fn round_trip_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = SetKind::Served.path_for(&dir.path().join("vm.mem"));
        assert!(path.ends_with("vm.mem.ws"));
        let written = SetKind::Written.path_for(&dir.path().join("vm.mem"));
        assert!(written.ends_with("vm.mem.written.ws"));
        let ws = WorkingSet::new(vec![7, 3, 4, 5, 3, 100]);
        assert_eq!(ws.pages(), &[3, 4, 5, 7, 100]);
        assert_eq!(ws.runs(), vec![(3, 3), (7, 1), (100, 1)]);
        ws.write(&path, &info(), SetKind::Served).unwrap();
        assert_eq!(
            WorkingSet::read(&path, &info(), SetKind::Served).unwrap(),
            ws
        );
        ws.write(&written, &info(), SetKind::Written).unwrap();
        assert_eq!(
            WorkingSet::read(&written, &info(), SetKind::Written).unwrap(),
            ws
        );
    }

    #[test]
    fn the_file_is_readable_by_all_and_only_root_or_this_users_is_read() {
        use crate::access::TestRead;
        let dir = tempfile::tempdir().unwrap();
        let path = SetKind::Served.path_for(&dir.path().join("vm.mem"));
        let ws = WorkingSet::new(vec![1, 2]);
        ws.write(&path, &info(), SetKind::Served).unwrap();
        crate::access::check_owner_and_mode_rules(&path, |p| {
            match WorkingSet::read(p, &info(), SetKind::Served) {
                Ok(read) if read == ws => TestRead::Read,
                Err(WorkingSetError::Permissions(..)) => TestRead::Refused,
                other => panic!("unexpected: {other:?}"),
            }
        });
    }

    #[test]
    fn damaged_or_foreign_sets_are_refused() {
        let path = Path::new("x.ws");
        let ws = WorkingSet::new(vec![1, 2, 9]);
        let good = ws.encode(&info(), SetKind::Served);
        assert!(WorkingSet::decode(&good, path, &info(), SetKind::Served).is_ok());
        let mut flipped = good.clone();
        flipped[HEADER + 3] ^= 1;
        assert!(matches!(
            WorkingSet::decode(&flipped, path, &info(), SetKind::Served),
            Err(WorkingSetError::Checksum(_))
        ));
        assert!(matches!(
            WorkingSet::decode(&good[..good.len() - 3], path, &info(), SetKind::Served),
            Err(WorkingSetError::Truncated(..))
        ));
        let mut version = good.clone();
        version[8] = 9;
        assert!(matches!(
            WorkingSet::decode(&version, path, &info(), SetKind::Served),
            Err(WorkingSetError::Version { found: 9, .. })
        ));
        let mut other = info();
        other.digest = 1;
        assert!(matches!(
            WorkingSet::decode(&good, path, &other, SetKind::Served),
            Err(WorkingSetError::OtherSnapshot(_))
        ));
        let mut small = info();
        small.size = 4 * PAGE_SIZE as u64;
        let outside = ws.encode(&small, SetKind::Served);
        assert!(matches!(
            WorkingSet::decode(&outside, path, &small, SetKind::Served),
            Err(WorkingSetError::BadPage(_, 9))
        ));
        assert!(WorkingSet::decode(b"garbage", path, &info(), SetKind::Served).is_err());
    }
}
