//! Guest memory: one or two anonymous mappings around the 32-bit MMIO hole, or, restoring a
//! snapshot, private (copy-on-write) mappings of its memory file, so that clones of one snapshot
//! share the pages they have not written through the host's page cache.
//!
//! Booted guests' anonymous mappings start on a 2 MiB boundary and are advised for transparent
//! huge pages, so that guest-physical and host-virtual addresses agree modulo 2 MiB and KVM can
//! back the guest with 2 MiB pages in its two-dimensional page tables. Measured in the test host
//! (nested SVM under QEMU TCG), a 4 KiB-mapped guest took ~17,000-28,000 nested page faults to
//! boot, each a costly exit; huge mappings need about 40. With `huge_pages: hugetlb` they are
//! 2 MiB pages of the host's hugetlbfs pool instead ([`create_with`]), reserved when mapped and
//! zeroed once when touched (transparent huge pages are zeroed twice on hosts with
//! `init_on_alloc=1`): in the test host, the VMM's start-up to the first `KVM_RUN` took 179-247 ms
//! p50 against 440-523 ms (`hearth-perf boot --hugetlb`).
//!
//! A template VM (`VmConfig::ram_file`) has its RAM in a file instead, mapped shared at the same
//! 2 MiB-aligned addresses ([`RamFile`]): on a tmpfs mounted with huge pages the guest still gets
//! 2 MiB pages, and the snapshot's memory file is that file, taken as it is
//! (`hearth_snapshot::backing`). Right after, the mapping is replaced by a private one of the same
//! file, so nothing the VMM or the guest does later can change the snapshot.

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::config::{HugePages, RamFileConfig};
use hearth_snapshot::MemoryFileError;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory as the VMM uses it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The mapping failed.
    #[error("cannot map {0} bytes of guest memory")]
    Map(usize, #[source] std::io::Error),
    /// vm-memory refused the mapping.
    #[error("cannot use the guest memory mapping at {0:#x}: {1}")]
    Region(u64, String),
    /// Mapping the memory file failed.
    #[error("cannot map the memory file ({0} bytes at offset {1})")]
    MapFile(usize, u64, #[source] vm_memory::mmap::MmapRegionError),
    /// The mapped regions do not form guest memory.
    #[error("cannot assemble guest memory from the memory file: {0}")]
    Assemble(String),
    /// The memory file descriptor could not be duplicated.
    #[error("cannot duplicate the memory file descriptor")]
    Dup(#[source] std::io::Error),
    /// The file backing guest RAM could not be created.
    #[error("cannot create the file backing guest RAM")]
    RamFile(#[source] MemoryFileError),
    /// The hugetlbfs pool could not back guest RAM (the bytes asked for, the bytes free).
    #[error(
        "cannot map {len} bytes of guest RAM from the host's 2 MiB hugetlbfs pool ({free} free; is vm.nr_hugepages large enough?)",
        len = .0,
        free = .1.map_or("none".to_string(), |b| format!("{b} bytes"))
    )]
    Hugetlb(usize, Option<u64>, #[source] std::io::Error),
    /// Mapping the file backing guest RAM failed.
    #[error("cannot map {0} bytes of the file backing guest RAM at offset {1}")]
    MapRamFile(usize, u64, #[source] std::io::Error),
    /// A page named for copying ahead lies outside guest RAM.
    #[error("page {0} of the memory file is outside guest RAM")]
    PageOutside(u64),
    /// Copying pages ahead failed (`MADV_POPULATE_WRITE` needs Linux 5.14 or later).
    #[error("cannot copy {1} pages of guest RAM from page {0} ahead (MADV_POPULATE_WRITE)")]
    CopyAhead(u64, u64, #[source] std::io::Error),
    /// The page table flags of guest RAM could not be read.
    #[error("cannot read which pages of guest RAM were written (/proc/self/pagemap)")]
    Pagemap(#[source] std::io::Error),
}

/// The size of a huge page, and the alignment of every guest RAM mapping.
const HUGE_PAGE: usize = 2 << 20;

/// The RAM ranges for `size` bytes: below the MMIO hole, and the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// The end of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Maps `size` bytes of guest memory (not touched, so not resident until used), advised for
/// transparent huge pages.
///
/// The mappings are never unmapped: guest memory lives as long as the VMM process, which runs one
/// VM and exits with it.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    create_with(size, HugePages::Transparent)
}

/// [`create`] with the huge pages `huge` names: transparent ones, or 2 MiB pages of the host's
/// hugetlbfs pool, reserved here for all of `size` (a short pool fails now, not in the guest).
pub fn create_with(size: u64, huge: HugePages) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let (addr, flags) = match huge {
            HugePages::Transparent => (
                map_aligned(len)?,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            HugePages::Hugetlb => (map_hugetlb(len)?, HUGETLB_FLAGS),
        };
        // SAFETY: `addr` is the start of a fresh private anonymous mapping of `len` readable and
        // writable bytes made above; nothing else refers to it, and it is never unmapped, so it
        // outlives the region.
        let builder = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr) };
        let region = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| MemoryError::Region(base.0, e.to_string()))?;
        let region = GuestRegionMmap::new(region, base)
            .ok_or_else(|| MemoryError::Region(base.0, "the region overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(0, e.to_string()))
}

/// A private anonymous mapping of 2 MiB hugetlbfs pages; without `MAP_NORESERVE`, so the pages
/// are reserved from the pool now.
const HUGETLB_FLAGS: libc::c_int =
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;

/// The bytes of free pages in the host's default hugetlbfs pool (`HugePages_Free` times
/// `Hugepagesize` in `/proc/meminfo`); `None` when that cannot be read.
pub fn hugetlb_free_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(field("HugePages_Free:")? * field("Hugepagesize:")? * 1024)
}

/// Maps `len` bytes of hugetlbfs pages, 2 MiB-aligned by the kernel (which rounds `len` up to
/// whole pages; the configuration's validation already makes guest RAM whole 2 MiB pages).
fn map_hugetlb(len: usize) -> Result<*mut u8, MemoryError> {
    // SAFETY: a new anonymous mapping at an address the kernel picks; no existing memory is
    // affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            HUGETLB_FLAGS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        let error = std::io::Error::last_os_error();
        return Err(MemoryError::Hugetlb(len, hugetlb_free_bytes(), error));
    }
    Ok(raw as *mut u8)
}

/// Guest RAM backed by a file mapped shared (a template VM: [`RamFileConfig`]).
#[derive(Debug)]
pub struct RamFile {
    file: File,
    /// Where the file is now (it moves to the snapshot's memory file path).
    path: PathBuf,
    punch: hearth_snapshot::backing::Punch,
    /// Each mapping: host address, length, offset in the file.
    maps: Vec<(usize, usize, u64)>,
    /// Whether the file became a snapshot's memory file (the mappings are private since).
    given: bool,
}

impl RamFile {
    /// Creates the file `config` names for `size` bytes of guest RAM and maps it shared, each
    /// range on a 2 MiB boundary and advised for huge pages.
    pub fn create(
        config: &RamFileConfig,
        size: u64,
    ) -> Result<(GuestMemory, RamFile), MemoryError> {
        let file =
            hearth_snapshot::backing::create(&config.path, size).map_err(MemoryError::RamFile)?;
        let mut regions = Vec::new();
        let mut maps = Vec::new();
        let mut offset = 0u64;
        for (base, len) in ram_ranges(size) {
            let addr = map_aligned(len)?;
            map_file_at(addr as usize, len, &file, offset, libc::MAP_SHARED)?;
            // SAFETY: `addr` is the start of a mapping of `len` readable and writable bytes made
            // above (the file replaced the reservation in place); nothing else refers to it, and
            // it is never unmapped (only replaced in place by `give`), so it outlives the region.
            let builder = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr) };
            let region = builder
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
                .map_err(|e| MemoryError::Region(base.0, e.to_string()))?;
            let region = GuestRegionMmap::new(region, base)
                .ok_or_else(|| MemoryError::Region(base.0, "the region overflows".into()))?;
            regions.push(region);
            maps.push((addr as usize, len, offset));
            offset += len as u64;
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Region(0, e.to_string()))?;
        let ram = RamFile {
            file,
            path: config.path.clone(),
            punch: config.punch,
            maps,
            given: false,
        };
        Ok((mem, ram))
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the file is now.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which all-zero pages become holes at the snapshot.
    pub fn punch(&self) -> hearth_snapshot::backing::Punch {
        self.punch
    }

    /// Whether the file became a snapshot's memory file: the guest must not run again.
    pub fn given(&self) -> bool {
        self.given
    }

    /// Records that the file, now at `path`, is a snapshot's memory file, and maps guest RAM
    /// privately from it at the same addresses: later writes (a device's, or a guest's) go to
    /// private copies and never reach the file. Called with the VM paused.
    pub fn give(&mut self, path: &Path) -> Result<(), MemoryError> {
        self.path = path.to_path_buf();
        self.given = true;
        for &(addr, len, offset) in &self.maps {
            map_file_at(addr, len, &self.file, offset, libc::MAP_PRIVATE)?;
        }
        Ok(())
    }
}

/// Maps `len` bytes of `file` from `offset` at `addr` (replacing what is mapped there: a
/// reservation of ours, or an earlier mapping of the same guest RAM), readable and writable,
/// shared or private as `flags` says, advised for huge pages.
fn map_file_at(
    addr: usize,
    len: usize,
    file: &File,
    offset: u64,
    flags: libc::c_int,
) -> Result<(), MemoryError> {
    // SAFETY: `addr..addr + len` is a range this module mapped for guest RAM; MAP_FIXED replaces
    // it in place, so every pointer to it stays valid (KVM follows the new mapping through its
    // MMU notifier). The descriptor is open for the call.
    let raw = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(MemoryError::MapRamFile(
            len,
            offset,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: advice on the mapping just made; a host without huge pages keeps 4 KiB pages.
    unsafe { libc::madvise(raw, len, libc::MADV_HUGEPAGE) };
    Ok(())
}

/// Maps `len` bytes (a multiple of 4 KiB) of private anonymous memory starting on a 2 MiB
/// boundary, advised for huge pages: a larger reservation is made and its unaligned ends cut off.
fn map_aligned(len: usize) -> Result<*mut u8, MemoryError> {
    let reserve = len + HUGE_PAGE;
    // SAFETY: a new anonymous mapping at an address the kernel picks; no existing memory is
    // affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(MemoryError::Map(len, std::io::Error::last_os_error()));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the reservation just made and outside [aligned, aligned +
    // len), which is all that is kept; nothing refers to them yet.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: a host without transparent huge pages keeps 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// Maps `file` (guest RAM of `size` bytes, the regions one after the other) privately: guest
/// writes go to private copies, never to the file.
pub fn map_file(file: &File, size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let fd = file.try_clone().map_err(MemoryError::Dup)?;
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(len, offset, e))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| MemoryError::Assemble(format!("region at {addr:?} overflows")))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Assemble(e.to_string()))
}

/// The host address and length of each region of `mem`, in order: in a memory file the regions
/// lie one after the other from offset 0.
fn host_ranges(mem: &GuestMemory) -> Vec<(usize, usize)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect()
}

/// Makes the private copies of the memory-file pages `runs` names ((first page, count), pages
/// of 4 KiB numbered through the regions one after the other) in `mem`, a private mapping of
/// that file ([`map_file`]), before the guest runs: each is faulted in for writing, copied from
/// the page cache, with `MADV_POPULATE_WRITE`. The contents do not change; only who holds them.
pub fn copy_on_write_ahead(
    mem: &GuestMemory,
    runs: impl IntoIterator<Item = (u64, u64)>,
) -> Result<(), MemoryError> {
    const PAGE: u64 = 4096;
    // (first memory-file page, pages, host address) of each region.
    let mut regions = Vec::new();
    let mut next = 0u64;
    for (addr, len) in host_ranges(mem) {
        let pages = len as u64 / PAGE;
        regions.push((next, pages, addr));
        next += pages;
    }
    for (first, count) in runs {
        let (mut page, end) = (first, first.saturating_add(count));
        // A run may cross from one region into the next: each piece is advised on its own.
        while page < end {
            let Some(&(region_first, pages, addr)) =
                regions.iter().find(|&&(f, n, _)| page >= f && page < f + n)
            else {
                return Err(MemoryError::PageOutside(page));
            };
            let n = end.min(region_first + pages) - page;
            let start = addr + ((page - region_first) * PAGE) as usize;
            // SAFETY: `start..start + n pages` lies inside a region of `mem`, a live mapping this
            // module made; populating it writes nothing the guest could see (each page is copied
            // from the file as it is) and moves no mapping.
            let rc = unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    (n * PAGE) as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(MemoryError::CopyAhead(
                    page,
                    n,
                    std::io::Error::last_os_error(),
                ));
            }
            page += n;
        }
    }
    Ok(())
}

/// The memory-file pages (numbered as in [`copy_on_write_ahead`]) that `mem`, a private mapping
/// of a memory file, holds its own copies of: the pages the guest (or a device for it) wrote.
pub fn written_pages(mem: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    hearth_snapshot::pagemap::Pagemap::open()
        .and_then(|mut p| p.private_pages(&host_ranges(mem)))
        .map_err(MemoryError::Pagemap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages copied ahead become the mapping's own, with the file's contents; the rest stay the
    /// file's; a page outside guest RAM is refused.
    #[test]
    fn pages_copied_on_write_ahead_are_private_and_unchanged() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.mem");
        let mut data = vec![0u8; 8 << 20];
        for (i, page) in data.chunks_mut(4096).enumerate() {
            page[0] = i as u8;
        }
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mem = map_file(&file, data.len() as u64).unwrap();
        assert_eq!(written_pages(&mem).unwrap(), Vec::<u64>::new());
        copy_on_write_ahead(&mem, [(2, 3), (100, 1)]).unwrap();
        assert_eq!(written_pages(&mem).unwrap(), vec![2, 3, 4, 100]);
        for page in [1u64, 2, 4, 100, 101] {
            let byte: u8 = mem.read_obj(GuestAddress(page * 4096)).unwrap();
            assert_eq!(byte, page as u8, "page {page}");
        }
        assert!(matches!(
            copy_on_write_ahead(&mem, [(2047, 2)]),
            Err(MemoryError::PageOutside(2048))
        ));
    }

    #[test]
    fn mappings_start_on_huge_page_boundaries() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mem = create(4 << 30).unwrap();
        let mut n = 0;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0);
            n += 1;
        }
        assert_eq!(n, 2);
    }

    /// With a hugetlbfs pool big enough, guest RAM comes from it (2 MiB-aligned, readable and
    /// writable); without, creating it fails at once, naming the pool's setting.
    #[test]
    fn hugetlb_guest_ram_comes_from_the_pool_or_fails_naming_it() {
        use vm_memory::{Bytes, GuestMemoryBackend};
        let free = hugetlb_free_bytes().expect("/proc/meminfo has the hugetlb pool");
        let size = 8u64 << 20;
        match create_with(size, HugePages::Hugetlb) {
            Ok(mem) => {
                assert!(free >= size, "{free} bytes free in the pool, yet mapped");
                let host = mem.get_host_address(GuestAddress(0)).unwrap();
                assert_eq!(host as usize % HUGE_PAGE, 0);
                mem.write_obj(0xfeed_u64, GuestAddress(size - 8)).unwrap();
                assert_eq!(mem.read_obj::<u64>(GuestAddress(size - 8)).unwrap(), 0xfeed);
            }
            Err(e) => {
                assert!(free < size, "{free} bytes free in the pool, yet: {e}");
                assert!(e.to_string().contains("vm.nr_hugepages"), "{e}");
            }
        }
    }

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn file_mappings_are_private() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(128 << 20).unwrap();
        file.write_all_at(b"saved", 0x1000).unwrap();
        let mem = map_file(&File::open(&path).unwrap(), 128 << 20).unwrap();
        let mut buf = [0u8; 5];
        mem.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"saved");
        mem.write_slice(b"guest", GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 5];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"saved");
    }

    #[test]
    fn ram_in_a_file_is_shared_until_given_then_private() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let config = RamFileConfig {
            path: path.clone(),
            punch: Default::default(),
        };
        let (mem, mut ram) = RamFile::create(&config, 128 << 20).unwrap();
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0);
        }
        mem.write_slice(b"guest", GuestAddress(0x3000)).unwrap();
        let mut in_file = [0u8; 5];
        ram.file().read_exact_at(&mut in_file, 0x3000).unwrap();
        assert_eq!(&in_file, b"guest", "written through to the file");
        let moved = dir.path().join("vm.mem");
        std::fs::rename(&path, &moved).unwrap();
        ram.give(&moved).unwrap();
        assert!(ram.given());
        let mut seen = [0u8; 5];
        mem.read_slice(&mut seen, GuestAddress(0x3000)).unwrap();
        assert_eq!(&seen, b"guest", "the same memory, now mapped privately");
        mem.write_slice(b"later", GuestAddress(0x3000)).unwrap();
        ram.file().read_exact_at(&mut in_file, 0x3000).unwrap();
        assert_eq!(&in_file, b"guest", "later writes stay private");
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(10 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 10 << 30);
        assert_eq!(low_ram_end(10 << 30), MMIO_GAP_START);
    }
}
