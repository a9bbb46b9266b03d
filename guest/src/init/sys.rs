//! Thin, checked wrappers over the system calls the init needs: mounts, module loading, the
//! loopback interface, vsock sockets, reboot, clocks.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::InitError;

fn cstring(s: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Sys {
        what: format!("NUL byte in {s:?}"),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn sys_err(what: impl Into<String>) -> InitError {
    InitError::Sys {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// Mounts `fstype` at `target` (created if missing). An already mounted target (EBUSY) is fine.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|source| InitError::Sys {
        what: format!("mkdir {target}"),
        source,
    })?;
    let (src, tgt, fst) = (cstring(source)?, cstring(target)?, cstring(fstype)?);
    let data = data.map(cstring).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is a valid NUL-terminated string (or null for data) that outlives the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), flags, data_ptr) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(InitError::Sys {
            what: format!("mount {fstype} on {target}"),
            source: err,
        });
    }
    Ok(())
}

/// Loads a kernel module from a file with `finit_module(2)`. Already loaded (EEXIST) is fine.
pub fn load_module(path: &Path) -> Result<(), InitError> {
    let file = File::open(path).map_err(|source| InitError::Sys {
        what: format!("open module {}", path.display()),
        source,
    })?;
    let params = cstring("")?;
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags; both
    // arguments are valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(InitError::Sys {
            what: format!("finit_module {}", path.display()),
            source: err,
        });
    }
    Ok(())
}

/// Sets IFF_UP on the loopback interface.
pub fn loopback_up() -> Result<(), InitError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys_err("socket(AF_INET) for lo"));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags member of our ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(sys_err("SIOCGIFFLAGS lo"));
    }
    // SAFETY: the kernel filled ifru_flags above; reading and writing that union member is valid.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads our initialized ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(sys_err("SIOCSIFFLAGS lo"));
    }
    Ok(())
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> Result<OwnedFd, io::Error> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects a vsock stream to `cid:port`. The raw OS error tells the caller whether to retry.
pub fn vsock_connect(cid: u32, port: u32) -> Result<File, io::Error> {
    let sock = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(sock))
}

/// A listening vsock stream socket on `port` (any local CID).
pub fn vsock_listen(port: u32) -> Result<OwnedFd, io::Error> {
    let sock = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Accepts one connection on a listening socket (retrying on EINTR).
pub fn accept(listener: &OwnedFd) -> Result<File, io::Error> {
    loop {
        // SAFETY: accept4 with null address pointers is allowed; the result is checked.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor we own.
            return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Shuts down the writing half of a socket, so the peer reads end-of-stream.
/// Waits until what was written to the console (stderr) has gone out of the serial port: the
/// tty sends it from interrupts, after `write` returned. Not a tty (a test): returns at once.
pub fn drain_console() {
    // SAFETY: tcdrain(3) on file descriptor 2; an error (not a tty) is ignored.
    unsafe { libc::tcdrain(libc::STDERR_FILENO) };
}

pub fn shutdown_write(sock: &File) {
    // SAFETY: shutdown(2) on a descriptor we own; failure is harmless here.
    unsafe {
        libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR);
    }
}

/// Whether something waits to be read on `sock` now (data, or the peer's end of stream), without
/// waiting: `poll` for `POLLIN` with a zero timeout. Not `FIONREAD`: a vsock stream socket has no
/// `ioctl` in Linux 6.1 (`sock_no_ioctl`, so `EOPNOTSUPP`), while its `poll` reports queued bytes.
/// An error counts as nothing waiting.
pub fn readable_now(sock: &impl AsFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: sock.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the count given; a zero timeout returns at once.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}

/// Sets a receive timeout on a socket.
pub fn set_read_timeout(sock: &File, ms: u64) {
    let tv = libc::timeval {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
    };
    // SAFETY: tv is a valid timeval and its size is passed; failure only loses the timeout.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// Flushes file systems and reboots (`RB_AUTOBOOT`) or powers off (`RB_POWER_OFF`). Returns only
/// if the kernel refuses.
pub fn reboot(power_off: bool) -> io::Error {
    // Never reboot a host by accident (tests, or the binary started outside a sandbox).
    if getpid() != 1 {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not PID 1: refusing to reboot",
        );
    }
    let cmd = if power_off {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    io::Error::last_os_error()
}

/// Milliseconds since the kernel started (CLOCK_BOOTTIME).
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Number of online CPUs.
pub fn cpus_online() -> u32 {
    // SAFETY: sysconf takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}

/// Our process id.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Waits for any child; `None` when there are none (ECHILD). Retries on EINTR.
pub fn wait_any() -> Option<(i32, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid int to write into.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            return Some((pid, status));
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `bytes` to the kernel's input pool as full entropy and makes the kernel's random
/// generator reseed from it at once (a clone restored from a snapshot must not repeat the
/// random numbers of its siblings).
pub fn add_entropy(bytes: &[u8]) -> Result<(), io::Error> {
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    let bits =
        i32::try_from(bytes.len() * 8).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        i32::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its two ints; the
    // buffer holds exactly that and lives across the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buf` from the kernel's random generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), io::Error> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// CLOCK_REALTIME, ns since the epoch.
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Sets CLOCK_REALTIME to `ns` since the epoch.
pub fn set_realtime_ns(ns: u64) -> Result<(), io::Error> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec it is given.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> Result<(), io::Error> {
    // SAFETY: sethostname reads `name.len()` bytes of `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
