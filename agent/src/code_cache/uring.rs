//! The code cache's file IO through io_uring (the `io-uring` crate).
//!
//! Each thread that does code-cache IO (tokio's blocking pool) keeps one small ring with one
//! registered (direct) file slot. A whole read is one submission: `OPENAT` into the slot, `READ`
//! of the expected length plus one byte (to see a file that grew), `CLOSE`, hard-linked so each
//! runs whatever the one before returned: one `io_uring_enter` where `std::fs::read` makes five
//! system calls. A synced write is `OPENAT` (create, exclusive), `WRITE`, `FDATASYNC`, `CLOSE`
//! the same way. The first thread whose ring cannot be made (io_uring disabled by
//! `kernel.io_uring_disabled`, a seccomp filter, an old kernel) turns io_uring off for the
//! process; callers then use std (`None` from [`read`] and [`write_synced`]).

use std::cell::RefCell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, squeue, types};

/// Set once a ring could not be made: io_uring is off for this process.
static REFUSED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// The direct file slot each ring registers. Direct descriptors live only in the ring, never in
/// the file table (so no `O_CLOEXEC`, which the kernel refuses for them).
const SLOT: u32 = 0;

/// Whether io_uring is (still) used.
pub(super) fn available() -> bool {
    !REFUSED.load(Ordering::Relaxed) && with_ring(|_| Ok(())).is_some()
}

fn new_ring() -> std::io::Result<IoUring> {
    let ring = IoUring::new(8)?;
    ring.submitter().register_files_sparse(1)?;
    Ok(ring)
}

/// Runs `f` on this thread's ring; `None` when io_uring is refused. A ring whose use failed is
/// dropped (a fresh one is made next time).
fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> std::io::Result<T>) -> Option<std::io::Result<T>> {
    if REFUSED.load(Ordering::Relaxed) {
        return None;
    }
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match new_ring() {
                Ok(ring) => *slot = Some(ring),
                Err(e) => {
                    if !REFUSED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "io_uring refused; the code cache uses plain file IO");
                    }
                    return None;
                }
            }
        }
        let ring = slot.as_mut()?;
        let result = f(ring);
        if result.is_err() {
            *slot = None;
        }
        Some(result)
    })
}

/// Pushes `entries` (their user data is their index) as one submission and waits for all their
/// completions; returns their results in order.
///
/// # Safety
/// Every buffer and path the entries point to must stay valid until this returns. If it returns
/// an error the operations may still be in flight: the caller must then leak those buffers.
unsafe fn run<const N: usize>(
    ring: &mut IoUring,
    entries: [squeue::Entry; N],
) -> std::io::Result<[i32; N]> {
    // SAFETY: the caller keeps what the entries point to alive until every completion is in.
    unsafe { ring.submission().push_multiple(&entries) }
        .map_err(|_| std::io::Error::other("the io_uring submission queue is full"))?;
    let mut results = [0i32; N];
    let mut seen = 0;
    while seen < N {
        match ring.submit_and_wait(N - seen) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            if let Some(r) = usize::try_from(cqe.user_data())
                .ok()
                .and_then(|i| results.get_mut(i))
            {
                *r = cqe.result();
                seen += 1;
            }
        }
    }
    Ok(results)
}

fn check(result: i32) -> std::io::Result<usize> {
    usize::try_from(result).map_err(|_| std::io::Error::from_raw_os_error(-result))
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in a path"))
}

/// Reads the file at `path`, expected to be `len` bytes. `None`: io_uring is refused, or the
/// file is not `len` bytes long (the caller reads it with std).
pub(super) fn read(path: &Path, len: u64) -> Option<std::io::Result<Vec<u8>>> {
    let want = usize::try_from(len).ok()?.checked_add(1)?;
    let want_u32 = u32::try_from(want).ok()?;
    let path = match c_path(path) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(want);
    let result = with_ring(|ring| {
        let slot = types::DestinationSlot::try_from_slot_target(SLOT)
            .map_err(|_| std::io::Error::other("bad io_uring file slot"))?;
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .file_index(Some(slot))
            .flags(libc::O_RDONLY)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(0);
        let read = opcode::Read::new(types::Fixed(SLOT), buf.as_mut_ptr(), want_u32)
            .offset(0)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(1);
        let close = opcode::Close::new(types::Fixed(SLOT)).build().user_data(2);
        // SAFETY: `path` and `buf` outlive the call; on an error `buf` is leaked below.
        unsafe { run(ring, [open, read, close]) }
    });
    let [opened, got, _closed] = match result? {
        Ok(r) => r,
        Err(e) => {
            // The read may still be in flight into `buf`.
            std::mem::forget(buf);
            return Some(Err(e));
        }
    };
    if let Err(e) = check(opened) {
        return Some(Err(e));
    }
    match check(got) {
        Ok(n) if n as u64 == len => {
            // SAFETY: the kernel wrote `n` bytes into `buf`, whose capacity is `want` > `n`.
            unsafe { buf.set_len(n) };
            Some(Ok(buf))
        }
        // Another length than expected: let std read it whole.
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Creates the file `path` (it must not exist), writes `bytes` and syncs its data. `None`:
/// io_uring is refused or the write came up short (the caller removes the file and uses std).
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Option<std::io::Result<()>> {
    let len = u32::try_from(bytes.len()).ok()?;
    let path = match c_path(path) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let result = with_ring(|ring| {
        let slot = types::DestinationSlot::try_from_slot_target(SLOT)
            .map_err(|_| std::io::Error::other("bad io_uring file slot"))?;
        let hard = squeue::Flags::IO_HARDLINK;
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .file_index(Some(slot))
            .flags(libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)
            .mode(0o644)
            .build()
            .flags(hard)
            .user_data(0);
        let write = opcode::Write::new(types::Fixed(SLOT), bytes.as_ptr(), len)
            .offset(0)
            .build()
            .flags(hard)
            .user_data(1);
        let sync = opcode::Fsync::new(types::Fixed(SLOT))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(hard)
            .user_data(2);
        let close = opcode::Close::new(types::Fixed(SLOT)).build().user_data(3);
        // SAFETY: `path` and `bytes` outlive the call (`bytes` is borrowed from the caller, who
        // cannot free it before we return; after an error nothing writes into it).
        unsafe { run(ring, [open, write, sync, close]) }
    });
    let [opened, wrote, synced, closed] = match result? {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let checked = (|| {
        check(opened)?;
        let n = check(wrote)?;
        check(synced)?;
        check(closed)?;
        Ok(n)
    })();
    match checked {
        Ok(n) if n == bytes.len() => Some(Ok(())),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    }
}
