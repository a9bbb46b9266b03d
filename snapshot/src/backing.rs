//! Guest RAM that is its own memory file: a template VM's RAM can live in a file (on a tmpfs,
//! mounted with huge pages) that the VMM maps shared, so that taking its snapshot copies
//! nothing: the file already holds every page. [`create`] makes that file (with the snapshot
//! files' mode, [`crate::access::FILE_MODE`], from the start); [`adopt`] makes it the snapshot's
//! memory file once the VM is paused: it digests the non-zero pages exactly as
//! [`crate::memory_file`] defines the digest (so a restore that reads the file back accepts it),
//! optionally punches holes where whole pages are zero, moves the file to the snapshot's path
//! (a rename on the same file system) and records its identity last.
//!
//! The caller must never let the guest write that mapping again: a write through a shared
//! mapping of a tmpfs file moves neither its change time nor its identity, and would change the
//! memory of every clone restored from it. The VMM remaps the guest's RAM privately right after
//! and refuses to resume such a VM.

use crate::memory_file::{
    FileIdentity, MemoryFileError, MemoryFileInfo, PAGE_SIZE, data_extents, is_zero,
};
use crate::pagemap::{PageKind, Pagemap};
use nix::fcntl::{FallocateFlags, fallocate};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use xxhash_rust::xxh64::Xxh64;

/// Which all-zero pages of the file [`adopt`] turns into holes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Punch {
    /// None: the file keeps every page the guest touched (on a huge-page tmpfs, whole 2 MiB
    /// pages), and clones can map them whole.
    #[default]
    None,
    /// Whole 2 MiB pages that are all zero, [`HUGE_PAGE`]-aligned: no huge page is split.
    HugePages,
    /// Every all-zero page (splitting the huge pages they lie in).
    Pages,
}

/// A huge page: 2 MiB.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Figures from adopting a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdoptStats {
    /// What the state file records.
    pub info: MemoryFileInfo,
    /// Bytes of the file's data extents looked at.
    pub scanned_bytes: u64,
    /// Bytes of all-zero pages turned into holes.
    pub punched_bytes: u64,
}

/// Creates the file at `path` (any file of that name is removed first) that backs `size` bytes of
/// guest RAM: empty (all holes), open for reading and writing, mode
/// [`crate::access::FILE_MODE`].
pub fn create(path: &Path, size: u64) -> Result<File, MemoryFileError> {
    let io = |e| MemoryFileError::Write(path.to_path_buf(), e);
    let file = crate::access::create(path).map_err(io)?;
    file.set_len(size).map_err(io)?;
    Ok(file)
}

/// Whether `to` can take the file `file` by a rename: its folder is on the file's device.
pub fn can_move_to(file: &File, to: &Path) -> bool {
    let folder = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (file.metadata(), std::fs::metadata(folder)) {
        (Ok(f), Ok(d)) => f.dev() == d.dev(),
        _ => false,
    }
}

/// Checks that `regions`, private mappings of a file that [`adopt`] already made a memory file,
/// still show that file everywhere: no page of them has become this process's own (a device
/// that wrote guest memory since), so digesting them digests the file. For a later snapshot of
/// the same paused VM.
pub fn check_unchanged(regions: &[&[u8]]) -> Result<(), MemoryFileError> {
    let pagemap_error = |e| MemoryFileError::Read("/proc/self/pagemap".into(), e);
    let mut map = Pagemap::open().map_err(pagemap_error)?;
    let mut kinds = Vec::new();
    let mut own = 0u64;
    for region in regions {
        map.kinds(
            region.as_ptr() as usize,
            region.len() / PAGE_SIZE,
            &mut kinds,
        )
        .map_err(pagemap_error)?;
        own += kinds.iter().filter(|&&k| k == PageKind::Private).count() as u64;
    }
    if own > 0 {
        return Err(MemoryFileError::Diverged(own));
    }
    Ok(())
}

/// Makes `file`, now at `from` and mapped by this process as `regions` (guest RAM in file order,
/// shared mappings of it), the memory file at `to`. The caller makes sure nothing writes the
/// regions meanwhile (the VM is paused) and that `to` is on the same file system
/// ([`can_move_to`]).
///
/// Only the file's data extents are looked at (`SEEK_DATA`/`SEEK_HOLE`: a page never touched is
/// a hole and is not faulted in); their non-zero pages are digested in order; with `punch`, runs
/// of all-zero pages become holes as `punch` says (`fallocate(PUNCH_HOLE)`).
pub fn adopt(
    file: &File,
    from: &Path,
    to: &Path,
    regions: &[&[u8]],
    punch: Punch,
) -> Result<AdoptStats, MemoryFileError> {
    let read = |e| MemoryFileError::Read(from.to_path_buf(), e);
    let write = |e| MemoryFileError::Write(to.to_path_buf(), e);
    for r in regions {
        if r.len() % PAGE_SIZE != 0 {
            return Err(MemoryFileError::RegionSize(r.len()));
        }
    }
    let size: u64 = regions.iter().map(|r| r.len() as u64).sum();
    let found = file.metadata().map_err(read)?.len();
    if found != size {
        return Err(MemoryFileError::Size {
            expected: size,
            found,
        });
    }
    let extents = data_extents(file, 0, size).map_err(read)?;
    let page_len = PAGE_SIZE as u64;
    let mut digest = Xxh64::new(0);
    let (mut data_pages, mut scanned) = (0u64, 0u64);
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    let mut base = 0u64;
    for region in regions {
        let len = region.len() as u64;
        for &(s, e) in &extents {
            let (s, e) = (s.max(base), e.min(base + len));
            if s >= e {
                continue;
            }
            scanned += e - s;
            let bytes = &region[(s - base) as usize..(e - base) as usize];
            for (k, page) in bytes.chunks(PAGE_SIZE).enumerate() {
                let at = s + k as u64 * page_len;
                if !is_zero(page) {
                    digest.update(&(at / page_len).to_le_bytes());
                    digest.update(page);
                    data_pages += 1;
                } else if punch != Punch::None {
                    match zero_runs.last_mut() {
                        Some(run) if run.1 == at => run.1 += page_len,
                        _ => zero_runs.push((at, at + page_len)),
                    }
                }
            }
        }
        base += len;
    }
    let mut punched = 0u64;
    for (s, e) in zero_runs {
        let (s, e) = match punch {
            Punch::HugePages => (s.next_multiple_of(HUGE_PAGE), e / HUGE_PAGE * HUGE_PAGE),
            _ => (s, e),
        };
        if s >= e {
            continue;
        }
        fallocate(
            file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            s as i64,
            (e - s) as i64,
        )
        .map_err(|e| write(e.into()))?;
        punched += e - s;
    }
    if from != to {
        std::fs::rename(from, to).map_err(write)?;
    }
    // Last: the rename and the holes move the change time.
    let meta = file.metadata().map_err(write)?;
    Ok(AdoptStats {
        info: MemoryFileInfo {
            size,
            data_pages,
            digest: digest.digest(),
            identity: Some(FileIdentity::of(&meta)),
        },
        scanned_bytes: scanned,
        punched_bytes: punched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_file::{Checked, MemoryFile, PAGE_SIZE};
    use std::os::unix::fs::FileExt;

    /// Writes `ram` into a new backing file (as a guest writing its shared mapping would).
    fn backing(dir: &Path, ram: &[u8]) -> (std::path::PathBuf, File) {
        let path = dir.join("ram");
        let file = create(&path, ram.len() as u64).unwrap();
        for (i, page) in ram.chunks(PAGE_SIZE).enumerate() {
            // Touched pages, zero or not, are data; untouched ones stay holes.
            if i % 3 != 2 {
                file.write_all_at(page, (i * PAGE_SIZE) as u64).unwrap();
            }
        }
        (path, file)
    }

    fn ram() -> Vec<u8> {
        let mut ram = vec![0u8; 64 * PAGE_SIZE];
        for page in [0usize, 1, 4, 30, 31, 63] {
            ram[page * PAGE_SIZE + page] = page as u8 | 1;
        }
        ram
    }

    #[test]
    fn an_adopted_file_has_the_written_files_digest_and_restores() {
        for punch in [Punch::None, Punch::HugePages, Punch::Pages] {
            let dir = tempfile::tempdir().unwrap();
            let ram = ram();
            // What the copying writer records for the same RAM.
            let written = crate::memory_file::write(&dir.path().join("written"), &[&ram])
                .unwrap()
                .info;
            let (from, file) = backing(dir.path(), &ram);
            let to = dir.path().join("vm.mem");
            assert!(can_move_to(&file, &to));
            let (low, high) = ram.split_at(40 * PAGE_SIZE);
            let stats = adopt(&file, &from, &to, &[low, high], punch).unwrap();
            assert_eq!(stats.info.size, written.size);
            assert_eq!(stats.info.data_pages, written.data_pages);
            assert_eq!(stats.info.digest, written.digest);
            assert!(!from.exists() && to.exists(), "moved into place");
            assert_eq!(std::fs::read(&to).unwrap(), ram);
            // 64 pages: less than a huge page, so only `Pages` punches any.
            assert_eq!(stats.punched_bytes > 0, punch == Punch::Pages);
            let checked = MemoryFile::open(&to, &stats.info).unwrap();
            assert_eq!(checked.checked(), Checked::Identity);
            // Read back in full (a copy), the digest matches too.
            let copy = dir.path().join("copy");
            std::fs::copy(&to, &copy).unwrap();
            let checked = MemoryFile::open(&copy, &stats.info).unwrap();
            assert_eq!(checked.checked(), Checked::Digest);
            // Adopting again in place gives the same record, and the file stays.
            let again = adopt(&file, &to, &to, &[low, high], punch).unwrap();
            assert_eq!(again.info.digest, stats.info.digest);
            assert!(to.exists());
        }
    }

    #[test]
    fn only_whole_zero_huge_pages_are_punched_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let huge = HUGE_PAGE as usize;
        // Three huge pages, all touched: data in the first, zero the second, data at the end
        // of the third.
        let mut ram = vec![0u8; 3 * huge];
        ram[10] = 1;
        ram[3 * huge - 1] = 2;
        let path = dir.path().join("ram");
        let file = create(&path, ram.len() as u64).unwrap();
        file.write_all_at(&ram, 0).unwrap();
        let stats = adopt(&file, &path, &path, &[&ram], Punch::HugePages).unwrap();
        assert_eq!(stats.punched_bytes, HUGE_PAGE);
        assert_eq!(stats.info.data_pages, 2);
        let extents = data_extents(&file, 0, ram.len() as u64).unwrap();
        assert!(
            extents
                .iter()
                .all(|&(s, e)| e <= HUGE_PAGE || s >= 2 * HUGE_PAGE),
            "the zero huge page is a hole: {extents:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), ram);
        MemoryFile::open(&path, &stats.info).unwrap();
    }

    #[test]
    fn a_backing_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ram = ram();
        let (from, file) = backing(dir.path(), &ram);
        let err = adopt(&file, &from, &from, &[&ram[..PAGE_SIZE]], Punch::None).unwrap_err();
        assert!(matches!(err, MemoryFileError::Size { .. }), "{err}");
    }
}
