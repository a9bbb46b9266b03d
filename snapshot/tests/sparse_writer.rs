//! The memory-file writer on real mappings: a private mapping of an earlier memory file (a
//! restored VM's guest RAM) and anonymous memory. What it writes must equal what the mapping
//! shows, stay sparse, and the writer must not fault in a page that was never touched.

use hearth_snapshot::memory_file::{self, MemoryFile, PAGE_SIZE, Region};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

const PAGES: usize = 512;

/// A private mapping of `len` bytes, of `file` or anonymous.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, file: Option<&File>) -> Self {
        use std::os::fd::AsRawFd;
        let (flags, fd) = match file {
            Some(f) => (libc::MAP_PRIVATE, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping at an address the kernel picks; nothing else is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        // SAFETY: advice on the mapping just made; huge pages would make one touch fault in 512.
        unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
        Mapping {
            addr: addr.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live for `len` bytes while `self` is, and only this test uses it.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }

    fn read(&self, page: usize) -> u8 {
        // SAFETY: inside the mapping; a volatile read so that the touch is not optimized away.
        unsafe { self.addr.add(page * PAGE_SIZE + 1).read_volatile() }
    }

    fn write(&self, page: usize, value: u8) {
        // SAFETY: inside the mapping, which is writable.
        unsafe {
            std::ptr::write_bytes(self.addr.add(page * PAGE_SIZE), value, PAGE_SIZE);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing refers to any more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// How many pages of `m` are in this process's page tables (present or swapped).
fn mapped_pages(m: &Mapping) -> usize {
    let map = File::open("/proc/self/pagemap").unwrap();
    let mut buf = vec![0u8; PAGES * 8];
    map.read_exact_at(&mut buf, (m.addr as usize / PAGE_SIZE * 8) as u64)
        .unwrap();
    buf.chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (3 << 62) != 0)
        .count()
}

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_restored_mapping_is_written_sparsely_without_faulting_holes() {
    let dir = tempfile::tempdir().unwrap();
    // The first memory file: data in pages 3, 10..20 and 200.
    let mut ram = vec![0u8; PAGES * PAGE_SIZE];
    for p in [3].into_iter().chain(10..20).chain([200]) {
        ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(p as u8 | 1);
    }
    let first = dir.path().join("first.mem");
    let info = memory_file::write(&first, &[&ram]).unwrap().info;
    let file = MemoryFile::open(&first, &info).unwrap().into_file();
    let m = Mapping::new(PAGES * PAGE_SIZE, Some(&file));
    // The restored guest reads a data page and a hole, writes a hole, rewrites a data page and
    // zeroes another.
    assert_eq!(m.read(11), 11 | 1);
    assert_eq!(m.read(100), 0);
    m.write(300, 0x77);
    m.write(12, 0x55);
    m.write(3, 0);
    let mut expected = ram.clone();
    expected[300 * PAGE_SIZE..301 * PAGE_SIZE].fill(0x77);
    expected[12 * PAGE_SIZE..13 * PAGE_SIZE].fill(0x55);
    expected[3 * PAGE_SIZE..4 * PAGE_SIZE].fill(0);
    let touched = mapped_pages(&m);

    let second = dir.path().join("second.mem");
    let stats = memory_file::write_regions(
        &second,
        &[Region {
            bytes: m.bytes(),
            backing: Some((&file, 0)),
        }],
    )
    .unwrap();
    assert_eq!(mapped_pages(&m), touched, "the writer faulted pages in");
    assert_eq!(stats.info.data_pages, 12, "pages 10..20, 200 and 300");
    assert_eq!(stats.written_bytes, 12 * PAGE_SIZE as u64);
    assert!(
        allocated(&second) <= 16 * PAGE_SIZE as u64,
        "{} bytes allocated",
        allocated(&second)
    );
    assert_eq!(std::fs::read(&second).unwrap(), expected);
    assert!(MemoryFile::open(&second, &stats.info).is_ok());
}

#[test]
fn anonymous_memory_is_written_without_faulting_untouched_pages() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mapping::new(PAGES * PAGE_SIZE, None);
    m.write(1, 1);
    m.write(2, 0);
    assert_eq!(m.read(50), 0);
    m.write(400, 9);
    let touched = mapped_pages(&m);
    let path = dir.path().join("anon.mem");
    let stats = memory_file::write_regions(&path, &[Region::anonymous(m.bytes())]).unwrap();
    assert_eq!(mapped_pages(&m), touched, "the writer faulted pages in");
    assert_eq!(stats.info.data_pages, 2);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes, m.bytes());
    assert!(allocated(&path) <= 8 * PAGE_SIZE as u64);
}

/// A RAM file taken as the memory file and mapped privately since (`backing`): a later snapshot
/// is refused once a page of the mapping became the process's own.
#[test]
fn a_given_ram_file_mapped_privately_is_checked_unchanged() {
    use hearth_snapshot::backing;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mem");
    let file = backing::create(&path, (PAGES * PAGE_SIZE) as u64).unwrap();
    file.write_all_at(&[7u8; PAGE_SIZE], 3 * PAGE_SIZE as u64)
        .unwrap();
    let m = Mapping::new(PAGES * PAGE_SIZE, Some(&file));
    assert_eq!(m.read(3), 7);
    let stats = backing::adopt(&file, &path, &path, &[m.bytes()], backing::Punch::None).unwrap();
    assert_eq!(stats.info.data_pages, 1);
    backing::check_unchanged(&[m.bytes()]).unwrap();
    m.write(5, 1);
    match backing::check_unchanged(&[m.bytes()]) {
        Err(memory_file::MemoryFileError::Diverged(1)) => {}
        other => panic!("a page of its own went unnoticed: {other:?}"),
    }
}
