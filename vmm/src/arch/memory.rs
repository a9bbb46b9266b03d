//! Guest memory: one or two anonymous mappings around the 32-bit MMIO hole.
//!
//! Each mapping starts on a 2 MiB boundary and is advised for transparent huge pages, so that
//! guest-physical and host-virtual addresses agree modulo 2 MiB and KVM can back the guest with
//! 2 MiB pages in its two-dimensional page tables. Measured in the test host (nested SVM under
//! QEMU TCG), a 4 KiB-mapped guest took ~17,000-28,000 nested page faults to boot, each a costly
//! exit; huge mappings need a few hundred.

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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

/// Maps `size` bytes of guest memory (not touched, so not resident until used).
///
/// The mappings are never unmapped: guest memory lives as long as the VMM process, which runs one
/// VM and exits with it.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let addr = map_aligned(len)?;
        // SAFETY: `addr` is the start of a fresh private anonymous mapping of `len` readable and
        // writable bytes made above; nothing else refers to it, and it is never unmapped, so it
        // outlives the region.
        let builder = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr) };
        let region = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Region(base.0, e.to_string()))?;
        let region = GuestRegionMmap::new(region, base)
            .ok_or_else(|| MemoryError::Region(base.0, "the region overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(0, e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
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
