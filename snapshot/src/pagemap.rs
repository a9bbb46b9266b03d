//! What this process's page tables say about a range of its own memory, from
//! `/proc/self/pagemap` (one little-endian u64 per 4 KiB page: bit 63 present, bit 62 swapped,
//! bit 61 a page of a file or shared memory rather than a private anonymous one).
//!
//! Reading it touches no page of the range: a page never touched stays unallocated. It was chosen
//! over `mincore(2)` because mincore only says whether a page is in the page cache, not whether the
//! mapping holds a private copy of it, and over reading the pages themselves because that faults
//! holes in (a file mapping's hole allocates a page cache page on tmpfs; a userfaultfd-registered
//! mapping would have the page served). A process may always read the flags of its own entries
//! (only the frame numbers are hidden without CAP_SYS_ADMIN).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The page size pagemap entries describe.
pub const PAGE_SIZE: usize = 4096;
/// Entries read at a time.
const CHUNK_PAGES: usize = 64 * 1024;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// What one page of a mapping is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Not in the page tables: never touched (anonymous memory: zero; a file mapping: the file).
    Absent,
    /// A private page of this process (written, copied on write, the shared zero page, or swapped
    /// out): its contents are the mapping's.
    Private,
    /// A page of the file (or shared memory) the range maps, unchanged by this process.
    File,
}

impl PageKind {
    fn of(entry: u64) -> Self {
        if entry & SWAPPED != 0 {
            // Only private anonymous pages are swapped through page table entries.
            PageKind::Private
        } else if entry & PRESENT == 0 {
            PageKind::Absent
        } else if entry & FILE_OR_SHARED != 0 {
            PageKind::File
        } else {
            PageKind::Private
        }
    }
}

/// This process's page map, open.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    buf: Vec<u8>,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> std::io::Result<Self> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
            buf: Vec::new(),
        })
    }

    /// The kind of each of the `pages` pages from `addr` (page-aligned), into `out` (cleared first).
    pub fn kinds(
        &mut self,
        addr: usize,
        pages: usize,
        out: &mut Vec<PageKind>,
    ) -> std::io::Result<()> {
        out.clear();
        out.reserve(pages);
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK_PAGES);
            self.buf.resize(n * 8, 0);
            let at = ((addr / PAGE_SIZE + done) * 8) as u64;
            self.file.read_exact_at(&mut self.buf, at)?;
            out.extend(self.buf.chunks_exact(8).map(|e| {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                PageKind::of(u64::from_le_bytes(b))
            }));
            done += n;
        }
        Ok(())
    }

    /// The pages of `regions` (each a page-aligned address and a length in bytes) that are this
    /// process's own ([`PageKind::Private`]), numbered as if the regions lay one after the other
    /// from page 0: the page indices of the file they map privately when it holds them in that
    /// order, as a memory file holds guest RAM.
    pub fn private_pages(&mut self, regions: &[(usize, usize)]) -> std::io::Result<Vec<u64>> {
        let mut pages = Vec::new();
        let mut kinds = Vec::new();
        let mut first = 0u64;
        for &(addr, len) in regions {
            let count = len / PAGE_SIZE;
            self.kinds(addr, count, &mut kinds)?;
            pages.extend(
                kinds
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| **k == PageKind::Private)
                    .map(|(i, _)| first + i as u64),
            );
            first += count as u64;
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bits() {
        assert_eq!(PageKind::of(0), PageKind::Absent);
        assert_eq!(PageKind::of(PRESENT | 123), PageKind::Private);
        assert_eq!(PageKind::of(PRESENT | FILE_OR_SHARED), PageKind::File);
        assert_eq!(PageKind::of(SWAPPED | 5), PageKind::Private);
    }

    #[test]
    fn a_written_vector_is_private_and_readable() {
        let mut v = vec![0u8; 64 * PAGE_SIZE];
        let start = v.as_ptr() as usize;
        let first = start.next_multiple_of(PAGE_SIZE);
        let i = (first - start) + PAGE_SIZE;
        v[i] = 1;
        let mut kinds = Vec::new();
        Pagemap::open()
            .unwrap()
            .kinds(first, 8, &mut kinds)
            .unwrap();
        assert_eq!(kinds.len(), 8);
        assert_eq!(kinds[1], PageKind::Private);
    }

    #[test]
    fn private_pages_are_numbered_across_regions() {
        let mut a = vec![0u8; 16 * PAGE_SIZE];
        let mut b = vec![0u8; 16 * PAGE_SIZE];
        let first_page = |v: &Vec<u8>| (v.as_ptr() as usize).next_multiple_of(PAGE_SIZE);
        let (fa, fb) = (first_page(&a), first_page(&b));
        let (oa, ob) = (fa - a.as_ptr() as usize, fb - b.as_ptr() as usize);
        a[oa + 2 * PAGE_SIZE] = 1;
        b[ob + 3 * PAGE_SIZE] = 1;
        let pages = Pagemap::open()
            .unwrap()
            .private_pages(&[(fa, 8 * PAGE_SIZE), (fb, 8 * PAGE_SIZE)])
            .unwrap();
        // A vector's other pages may be private too (the allocator wrote them): the written
        // ones are there, numbered across the two regions.
        assert!(pages.contains(&2), "{pages:?}");
        assert!(pages.contains(&(8 + 3)), "{pages:?}");
        assert!(pages.iter().all(|&p| p < 16));
    }
}
