//! The userfaultfd restore mode: guest RAM is anonymous memory registered with a userfaultfd, and
//! a handler thread fills the 2 MiB block around each page on the first touch of any page in it
//! (by a vCPU through KVM, or by a device) from the snapshot's memory file: `pread`, then
//! `UFFDIO_COPY` for runs of pages with data and `UFFDIO_ZEROPAGE` for runs of zero pages. The
//! pages of a working set recorded on an earlier restore (the faulting pages) can be copied in
//! before the vCPUs run, and the pages that faulted can be recorded for the next restore.
//!
//! The userfaultfd comes from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`, which a jail can hand in
//! as a device node) or else the `userfaultfd(2)` system call; never in user-mode-only mode, since
//! KVM touches guest memory from the kernel. The few kernel ABI definitions it needs
//! (`linux/userfaultfd.h`) are written out here: the `userfaultfd` crate generates them with
//! bindgen, which needs libclang at build time, which these hosts lack.

use crate::arch::memory::{GuestMemory, ram_ranges};
use crate::seccomp::{self, ThreadKind};
use hearth_snapshot::{MemoryFileInfo, SetKind, WorkingSet, WorkingSetError};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

const PAGE: usize = 4096;
/// Bytes copied per `UFFDIO_COPY` when prefetching.
const PREFETCH_CHUNK: usize = 1 << 20;
/// A fault is served with the whole block of the memory file around it (2 MiB-aligned in the
/// file, so in guest-physical memory): one fault, one read and a few ioctls bring in what a
/// guest touching its memory page by page would take 512 faults for (each a costly exit in a
/// nested VM). Data pages are copied, zero pages mapped to the zero page (no memory).
const BLOCK: usize = 2 << 20;

// linux/userfaultfd.h: _IOC(dir, 0xAA, nr, size) = dir << 30 | size << 16 | 0xAA << 8 | nr.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` (24 bytes).
pub const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x02, struct uffdio_range)` (16 bytes).
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)` (40 bytes).
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)` (32 bytes).
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Bits of `uffdio_register.ioctls`: `1 << _UFFDIO_COPY | 1 << _UFFDIO_ZEROPAGE`.
const NEEDED_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);
/// `sizeof(struct uffd_msg)`.
const MSG_SIZE: usize = 32;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// The userfaultfd mode could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither /dev/userfaultfd nor the system call gave a userfaultfd.
    #[error(
        "cannot create a userfaultfd (/dev/userfaultfd: {dev}; userfaultfd(2): {syscall}); the `file` restore mode needs none"
    )]
    Create {
        /// Why /dev/userfaultfd failed.
        dev: std::io::Error,
        /// Why the system call failed.
        syscall: std::io::Error,
    },
    /// An ioctl on the userfaultfd failed.
    #[error("{0} on the userfaultfd failed")]
    Ioctl(&'static str, #[source] std::io::Error),
    /// The kernel cannot copy or zero pages into the registered range.
    #[error("the kernel's userfaultfd lacks UFFDIO_COPY or UFFDIO_ZEROPAGE (ioctls {0:#x})")]
    Unsupported(u64),
    /// Guest memory could not be mapped.
    #[error("cannot map {0} bytes of guest memory")]
    Map(usize, #[source] std::io::Error),
    /// vm-memory refused the mapping.
    #[error("cannot use the guest memory mapping: {0}")]
    Region(String),
    /// The memory file could not be read.
    #[error("cannot read the memory file")]
    Read(#[source] std::io::Error),
    /// The working-set file is bad.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// The handler thread could not start.
    #[error("cannot start the userfaultfd handler thread")]
    Spawn(#[source] std::io::Error),
    /// The handler thread's seccomp filter could not be installed.
    #[error("the userfaultfd handler thread: {0}")]
    Seccomp(String),
}

/// One registered range of guest RAM and where its pages are in the memory file.
#[derive(Debug, Clone, Copy)]
struct Range {
    host: usize,
    len: usize,
    file_offset: u64,
}

/// Guest RAM and the memory file it is served from.
struct Layout {
    ranges: Vec<Range>,
}

impl Layout {
    /// The range holding host address `addr`.
    fn find(&self, addr: usize) -> Option<&Range> {
        self.ranges
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len)
    }

    /// The host address of memory-file offset `offset` and the bytes left in its range.
    fn host_of(&self, offset: u64) -> Option<(usize, usize)> {
        self.ranges.iter().find_map(|r| {
            let rel = offset.checked_sub(r.file_offset)?;
            (rel < r.len as u64).then(|| (r.host + rel as usize, r.len - rel as usize))
        })
    }
}

/// A userfaultfd.
struct Uffd(OwnedFd);

impl Uffd {
    fn create() -> Result<Self, UffdError> {
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW on the device takes the new descriptor's flags by
                // value and returns a new descriptor or -1.
                let fd = unsafe {
                    libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC)
                };
                if fd >= 0 {
                    // SAFETY: a fresh descriptor this process now owns.
                    return Ok(Uffd(unsafe { OwnedFd::from_raw_fd(fd) }));
                }
                std::io::Error::last_os_error()
            }
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(UffdError::Create {
                dev,
                syscall: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor this process now owns.
        Ok(Uffd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// An ioctl whose argument is `arg`; Err(errno) on failure.
    fn ioctl<T>(&self, request: u64, arg: &mut T) -> Result<(), std::io::Error> {
        // SAFETY: every request used here takes a pointer to its struct, which `arg` is (the
        // request numbers encode the sizes of the structs above, checked by a test).
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, arg as *mut T) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn handshake(&self) -> Result<(), UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        self.ioctl(UFFDIO_API, &mut api)
            .map_err(|e| UffdError::Ioctl("UFFDIO_API", e))
    }

    fn register(&self, host: usize, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
            .map_err(|e| UffdError::Ioctl("UFFDIO_REGISTER", e))?;
        if reg.ioctls & NEEDED_IOCTLS != NEEDED_IOCTLS {
            return Err(UffdError::Unsupported(reg.ioctls));
        }
        Ok(())
    }

    /// Copies `src` to host address `dst` (not yet present) and wakes whoever waits on it. A
    /// page already there (EEXIST) counts as done.
    fn copy(&self, dst: usize, src: &[u8]) -> Result<(), std::io::Error> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                ..Default::default()
            };
            match self.ioctl(UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    return self.wake(dst, src.len());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Maps the zero page at the `len` bytes (whole pages) from `dst` and wakes whoever waits on
    /// them. A page already there (EEXIST) ends it early: the rest are served when touched.
    fn zero(&self, dst: usize, len: usize) -> Result<(), std::io::Error> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst as u64,
                    len: len as u64,
                },
                ..Default::default()
            };
            match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return self.wake(dst, len),
                Err(e) => return Err(e),
            }
        }
    }

    fn wake(&self, dst: usize, len: usize) -> Result<(), std::io::Error> {
        let mut r = UffdioRange {
            start: dst as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }
}

/// How a userfaultfd restore goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UffdOptions {
    /// Copy the pages of this working-set file in before the vCPUs run.
    pub prefetch: Option<PathBuf>,
    /// Record the pages served, for [`UffdServer::save_working_set`].
    pub record: bool,
    /// Install the handler thread's seccomp filter.
    pub seccomp: bool,
}

/// The running handler: guest RAM is served from the memory file while this lives (the thread
/// ends with the process).
pub struct UffdServer {
    served: Option<Arc<Mutex<Vec<u64>>>>,
    info: MemoryFileInfo,
}

impl UffdServer {
    /// Writes the pages served so far (if recording) as the working set of the memory file, to
    /// `path`. Returns how many pages it names.
    pub fn save_working_set(&self, path: &std::path::Path) -> Result<usize, UffdError> {
        let Some(served) = &self.served else {
            return Ok(0);
        };
        let pages = served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let ws = WorkingSet::new(pages);
        ws.write(path, &self.info, SetKind::Served)?;
        Ok(ws.pages().len())
    }
}

/// Maps `size` bytes of guest RAM registered with a new userfaultfd, to be served from `file`
/// (the checked memory file `info` describes), prefetches the working set if asked, and starts
/// the handler thread.
pub fn map(
    file: File,
    info: &MemoryFileInfo,
    options: &UffdOptions,
) -> Result<(GuestMemory, UffdServer), UffdError> {
    let started = Instant::now();
    let prefetch = match &options.prefetch {
        Some(path) => Some(WorkingSet::read(path, info, SetKind::Served)?),
        None => None,
    };
    let uffd = Uffd::create()?;
    uffd.handshake()?;
    let mut regions = Vec::new();
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(info.size) {
        // SAFETY: a new private anonymous mapping at an address the kernel picks; nothing else is
        // affected. It is never unmapped: guest memory lives as long as the process.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(UffdError::Map(len, std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping just made: pages are served 4 KiB at a time.
        unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
        uffd.register(addr as usize, len)?;
        let fd = file.try_clone().map_err(UffdError::Read)?;
        // SAFETY: `addr` is the start of the fresh anonymous mapping of `len` bytes made above,
        // never unmapped; the file offset only records what the mapping shows (a snapshot of it
        // reads the pages never served from there).
        let builder = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr.cast()) };
        let region = builder
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| UffdError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(region, base)
            .ok_or_else(|| UffdError::Region("the region overflows".into()))?;
        regions.push(region);
        ranges.push(Range {
            host: addr as usize,
            len,
            file_offset: offset,
        });
        offset += len as u64;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| UffdError::Region(e.to_string()))?;
    let layout = Layout { ranges };
    let mut present = Present::new(info.size);
    if let Some(ws) = &prefetch {
        copy_in(&uffd, &layout, &file, ws)?;
        for &page in ws.pages() {
            present.set(page);
        }
        tracing::debug!(
            pages = ws.pages().len(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "working set prefetched"
        );
    }
    let served = options.record.then(|| Arc::new(Mutex::new(Vec::new())));
    let handler = Handler {
        uffd,
        layout,
        file,
        served: served.clone(),
        present,
        faults: 0,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let with_seccomp = options.seccomp;
    std::thread::Builder::new()
        .name("uffd".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if with_seccomp && let Err(e) = seccomp::install(ThreadKind::Uffd) {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
            let _ = tx.send(Ok(()));
            handler.run();
        })
        .map_err(UffdError::Spawn)?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(UffdError::Seccomp(e)),
        Err(_) => return Err(UffdError::Seccomp("the thread ended at once".into())),
    }
    Ok((
        mem,
        UffdServer {
            served,
            info: *info,
        },
    ))
}

/// Whether `bytes` are all zero.
fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Copies the pages of `ws` in, a run at a time.
fn copy_in(uffd: &Uffd, layout: &Layout, file: &File, ws: &WorkingSet) -> Result<(), UffdError> {
    let mut buf = vec![0u8; PREFETCH_CHUNK];
    for (first, count) in ws.runs() {
        let mut at = first * PAGE as u64;
        let end = (first + count) * PAGE as u64;
        while at < end {
            // The set was checked against the memory file's size, which is guest RAM's.
            let Some((host, left)) = layout.host_of(at) else {
                break;
            };
            let n = ((end - at) as usize).min(left).min(PREFETCH_CHUNK);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(UffdError::Read)?;
            uffd.copy(host, &buf[..n])
                .map_err(|e| UffdError::Ioctl("UFFDIO_COPY", e))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Which pages of guest RAM (by memory-file page index) have been served.
struct Present(Vec<u64>);

impl Present {
    fn new(size: u64) -> Self {
        Present(vec![0; (size / PAGE as u64).div_ceil(64) as usize])
    }

    fn get(&self, page: u64) -> bool {
        self.0
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    fn set(&mut self, page: u64) {
        if let Some(w) = self.0.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }
}

/// The handler thread's state.
struct Handler {
    uffd: Uffd,
    layout: Layout,
    file: File,
    served: Option<Arc<Mutex<Vec<u64>>>>,
    present: Present,
    faults: u64,
}

impl Handler {
    /// Serves page faults until the process ends. A failure leaves a guest thread waiting for a
    /// page forever, so it ends the process.
    fn run(mut self) {
        let mut msgs = [0u8; MSG_SIZE * 16];
        let mut block = vec![0u8; BLOCK];
        loop {
            // SAFETY: reads into a local buffer of the length given.
            let n = unsafe {
                libc::read(
                    self.uffd.0.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    msgs.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.fail("read", e);
            }
            for msg in msgs[..n as usize].chunks_exact(MSG_SIZE) {
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(&msg[16..24]);
                let addr = u64::from_le_bytes(a) as usize & !(PAGE - 1);
                if let Err(e) = self.serve(addr, &mut block) {
                    self.fail("serving a page", e);
                }
            }
        }
    }

    /// Serves a fault at `addr` (page-aligned): the not yet served pages of its block, or, if
    /// the page itself is marked served already (a second fault queued for it, or a page a
    /// partial copy skipped), that page alone.
    fn serve(&mut self, addr: usize, buf: &mut [u8]) -> Result<(), std::io::Error> {
        let Some(range) = self.layout.find(addr).copied() else {
            return Err(std::io::Error::other(format!(
                "a fault at {addr:#x}, outside guest RAM"
            )));
        };
        let offset = range.file_offset + (addr - range.host) as u64;
        let page = offset / PAGE as u64;
        // Recorded before the faulting thread is woken, so that it is there for whoever that
        // thread tells.
        if let Some(served) = &self.served {
            served
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(page);
        }
        self.faults += 1;
        if self.present.get(page) {
            let one = &mut buf[..PAGE];
            self.file.read_exact_at(one, offset)?;
            return if is_zero(one) {
                self.uffd.zero(addr, PAGE)
            } else {
                self.uffd.copy(addr, one)
            };
        }
        let range_end = range.file_offset + range.len as u64;
        let start = (offset & !(BLOCK as u64 - 1)).max(range.file_offset);
        let end = (start - start % BLOCK as u64 + BLOCK as u64).min(range_end);
        let len = (end - start) as usize;
        self.file.read_exact_at(&mut buf[..len], start)?;
        let host_of = |off: u64| range.host + (off - range.file_offset) as usize;
        // Runs of unserved pages of one kind (zero or data), each served with one ioctl.
        let pages = len / PAGE;
        let mut i = 0;
        while i < pages {
            let p = start / PAGE as u64 + i as u64;
            if self.present.get(p) {
                i += 1;
                continue;
            }
            let zero = is_zero(&buf[i * PAGE..(i + 1) * PAGE]);
            let mut j = i + 1;
            while j < pages
                && !self.present.get(start / PAGE as u64 + j as u64)
                && is_zero(&buf[j * PAGE..(j + 1) * PAGE]) == zero
            {
                j += 1;
            }
            let dst = host_of(start + (i * PAGE) as u64);
            if zero {
                self.uffd.zero(dst, (j - i) * PAGE)?;
            } else {
                self.uffd.copy(dst, &buf[i * PAGE..j * PAGE])?;
            }
            for k in i..j {
                self.present.set(start / PAGE as u64 + k as u64);
            }
            i = j;
        }
        Ok(())
    }

    fn fail(&self, what: &str, e: std::io::Error) -> ! {
        tracing::error!(error = %e, faults = self.faults, "userfaultfd handler: {what} failed; ending the VMM");
        // SAFETY: ends the process at once (exit_group); a guest thread would otherwise wait for
        // its page forever.
        unsafe { libc::_exit(70) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn ioctl_numbers_match_the_struct_sizes() {
        let ioc =
            |dir: u64, nr: u64, size: usize| (dir << 30) | ((size as u64) << 16) | (0xaa << 8) | nr;
        assert_eq!(UFFDIO_API, ioc(3, 0x3f, size_of::<UffdioApi>()));
        assert_eq!(UFFDIO_REGISTER, ioc(3, 0x00, size_of::<UffdioRegister>()));
        assert_eq!(UFFDIO_WAKE, ioc(2, 0x02, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_COPY, ioc(3, 0x03, size_of::<UffdioCopy>()));
        assert_eq!(UFFDIO_ZEROPAGE, ioc(3, 0x04, size_of::<UffdioZeropage>()));
        assert_eq!(USERFAULTFD_IOC_NEW, ioc(0, 0x00, 0));
        let json = include_str!("../seccomp/filters.json");
        for (name, value) in [
            ("UFFDIO_COPY", UFFDIO_COPY),
            ("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE),
            ("UFFDIO_WAKE", UFFDIO_WAKE),
        ] {
            let rule = format!("\"val\": {value}, \"comment\": \"{name} = {value:#x}\"");
            assert!(json.contains(&rule), "filters.json lacks {rule}");
        }
    }

    /// Whether the page at `addr` is in this process's page tables.
    fn present(addr: usize) -> bool {
        let map = File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        map.read_exact_at(&mut e, (addr / PAGE * 8) as u64).unwrap();
        u64::from_le_bytes(e) >> 63 == 1
    }

    #[test]
    fn pages_are_served_on_touch_recorded_and_prefetched() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.mem");
        let size = 8usize << 20;
        let mut ram = vec![0u8; size];
        for p in [0usize, 5, 6, 1000, 2047] {
            ram[p * PAGE..(p + 1) * PAGE].fill(p as u8 | 0x80);
        }
        let info = hearth_snapshot::memory_file::write(&path, &[&ram])
            .unwrap()
            .info;
        let open = || {
            hearth_snapshot::MemoryFile::open(&path, &info)
                .unwrap()
                .into_file()
        };
        let options = UffdOptions {
            prefetch: None,
            record: true,
            seccomp: true,
        };
        let (mem, server) = map(open(), &info, &options).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert!(!present(host + 5 * PAGE));
        let mut b = [0u8; 2];
        for (page, want) in [(5u64, 0x85u8), (6, 0x86), (7, 0), (2047, 0xff)] {
            mem.read_slice(&mut b, GuestAddress(page * PAGE as u64 + 100))
                .unwrap();
            assert_eq!(b, [want, want], "page {page}");
        }
        // Written after being served: the guest's, not the file's.
        mem.write_slice(&[1, 2], GuestAddress(5 * PAGE as u64))
            .unwrap();
        mem.read_slice(&mut b, GuestAddress(5 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [1, 2]);
        // One fault served page 5's whole 2 MiB block (data and zero pages), none of the next.
        for page in [0usize, 6, 7, 511] {
            assert!(present(host + page * PAGE), "page {page} was not served");
        }
        assert!(!present(host + 512 * PAGE));
        let ws_path = SetKind::Served.path_for(&path);
        let n = server.save_working_set(&ws_path).unwrap();
        let ws = WorkingSet::read(&ws_path, &info, SetKind::Served).unwrap();
        assert_eq!(
            ws.pages(),
            [5, 2047],
            "the faulting pages are the working set"
        );
        assert_eq!(n, 2);

        let options = UffdOptions {
            prefetch: Some(ws_path.clone()),
            record: false,
            seccomp: true,
        };
        let (mem, _server) = map(open(), &info, &options).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        for page in [5usize, 2047] {
            assert!(
                present(host + page * PAGE),
                "page {page} was not prefetched"
            );
        }
        assert!(!present(host + 6 * PAGE));
        assert!(!present(host + 1000 * PAGE));
        // A prefetched page's block is served around it on the first fault there.
        mem.read_slice(&mut b, GuestAddress(6 * PAGE as u64 + 8))
            .unwrap();
        assert_eq!(b, [0x86, 0x86]);
        mem.read_slice(&mut b, GuestAddress(5 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [0x85, 0x85]);
        mem.read_slice(&mut b, GuestAddress(1000 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [0xe8, 0xe8]);

        // A damaged working set is refused with a clear error before anything is mapped.
        let mut bytes = std::fs::read(&ws_path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&ws_path, &bytes).unwrap();
        let err = map(open(), &info, &options).err().unwrap();
        assert!(err.to_string().contains("corrupted"), "{err}");
    }

    #[test]
    fn layout_finds_ranges_both_ways() {
        let layout = Layout {
            ranges: vec![
                Range {
                    host: 0x10000,
                    len: 0x4000,
                    file_offset: 0,
                },
                Range {
                    host: 0x90000,
                    len: 0x2000,
                    file_offset: 0x4000,
                },
            ],
        };
        assert_eq!(layout.find(0x13fff).map(|r| r.file_offset), Some(0));
        assert_eq!(layout.find(0x91000).map(|r| r.file_offset), Some(0x4000));
        assert!(layout.find(0x14000).is_none());
        assert_eq!(layout.host_of(0x1000), Some((0x11000, 0x3000)));
        assert_eq!(layout.host_of(0x5000), Some((0x91000, 0x1000)));
        assert_eq!(layout.host_of(0x6000), None);
    }
}
