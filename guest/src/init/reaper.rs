//! Reaping children as PID 1, without stealing the exit status of children someone waits for.
//!
//! Every process orphaned inside the sandbox becomes the init's child, so the init must reap them or
//! they stay zombies. The reaper thread looks for zombie children in /proc and reaps only those
//! that are not *managed*, and only after [`GRACE`], so an owner that reaps its child promptly
//! (tokio's `Child::wait`, std's blocking `wait`) gets its status even without registering. Code
//! that starts a child and waits for it itself (e.g. with `tokio::process::Child::wait`) must start
//! it through [`spawn_managed`] and call [`release`] once it has collected the exit status.
//! Spawning under the reaper's lock closes the race between the fork and the registration.
//!
//! The reaper is event-driven: it sleeps until a child exits ([`ChildExits`], a `SIGCHLD` handler
//! that shares the signal with tokio's) or until a young zombie's grace ends, so an idle guest (a
//! restored pool VM, say) makes no timer wake-ups for it.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

fn managed() -> MutexGuard<'static, HashSet<u32>> {
    static MANAGED: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    MANAGED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Spawns a child with `spawn` and registers it (by `pid_of`) so the reaper leaves it to its owner.
pub fn spawn_managed<T, E>(
    spawn: impl FnOnce() -> Result<T, E>,
    pid_of: impl Fn(&T) -> Option<u32>,
) -> Result<T, E> {
    let mut set = managed();
    let child = spawn()?;
    if let Some(pid) = pid_of(&child) {
        set.insert(pid);
    }
    Ok(child)
}

/// Forgets a managed child once its owner has reaped it.
pub fn release(pid: u32) {
    managed().remove(&pid);
}

/// Whether `pid` is managed.
pub fn is_managed(pid: u32) -> bool {
    managed().contains(&pid)
}

/// How long the reaper sleeps between looks when it cannot be told of exits (no `SIGCHLD`
/// handler: only if the eventfd or the handler could not be set up).
const FALLBACK_POLL: Duration = Duration::from_millis(100);

/// Starts the reaper thread (once).
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        // Installed here, before the thread, so no exit between now and its first look is missed.
        let exits = match ChildExits::install() {
            Ok(exits) => Some(exits),
            Err(e) => {
                crate::console!("reaper: no SIGCHLD wake-up ({e}); polling every 100 ms");
                None
            }
        };
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                let mut seen = HashMap::new();
                loop {
                    let next = reap_unmanaged_zombies(&mut seen);
                    match exits {
                        Some(exits) => {
                            exits.wait(next);
                        }
                        None => {
                            std::thread::sleep(next.unwrap_or(FALLBACK_POLL).min(FALLBACK_POLL))
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            crate::console!("cannot start the reaper thread: {e}");
        }
    });
}

/// How long an unmanaged zombie is left to whoever started it (e.g. tokio's child reaping, which
/// follows SIGCHLD within milliseconds) before the reaper collects it.
pub const GRACE: Duration = Duration::from_millis(500);

/// Reaps every zombie child that is not managed and has been a zombie for [`GRACE`]; returns how
/// long until the youngest unmanaged zombie left waiting reaches [`GRACE`] (`None`: none waits, so
/// only the next exit gives the reaper work: a managed zombie is its owner's to reap).
fn reap_unmanaged_zombies(seen: &mut HashMap<u32, Instant>) -> Option<Duration> {
    let me = std::process::id();
    let zombies = zombie_children(me);
    seen.retain(|pid, _| zombies.contains(pid));
    let now = Instant::now();
    let set = managed();
    let mut next: Option<Duration> = None;
    for pid in zombies {
        let first = *seen.entry(pid).or_insert(now);
        if set.contains(&pid) {
            continue;
        }
        if let Some(left) = grace_left(first, now) {
            next = Some(next.map_or(left, |n| n.min(left)));
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        let mut status = 0;
        // SAFETY: reaps exactly this child; status is a valid int to write into. The lock is held
        // so a concurrent spawn_managed cannot register a reused pid in between.
        if unsafe { libc::waitpid(raw, &mut status, libc::WNOHANG) } == raw {
            seen.remove(&pid);
        }
    }
    next
}

/// How much of [`GRACE`] is left to a zombie first seen at `first` (`None`: it is over).
fn grace_left(first: Instant, now: Instant) -> Option<Duration> {
    GRACE
        .checked_sub(now.saturating_duration_since(first))
        .filter(|left| !left.is_zero())
}

/// The eventfd the `SIGCHLD` handler writes to (-1 until [`ChildExits::install`]).
static EXIT_FD: AtomicI32 = AtomicI32::new(-1);

/// The `SIGCHLD` action that was in place before ours, which ours chains to (tokio's, through
/// signal-hook-registry, if it registered first; signal-hook-registry chains to ours otherwise).
static PREVIOUS: OnceLock<PreviousAction> = OnceLock::new();

/// A saved `sigaction` (plain data: a handler address, flags and a mask).
struct PreviousAction(libc::sigaction);

// SAFETY: the sigaction is plain data (addresses and bits), never mutated after it is saved.
unsafe impl Sync for PreviousAction {}
// SAFETY: as above.
unsafe impl Send for PreviousAction {}

/// Child exits as a readable eventfd: a `SIGCHLD` handler bumps it, the reaper sleeps on it.
#[derive(Clone, Copy)]
pub struct ChildExits {
    fd: i32,
}

impl ChildExits {
    /// Creates the eventfd and installs the `SIGCHLD` handler (once per process; later calls
    /// return the same one).
    pub fn install() -> std::io::Result<ChildExits> {
        static INSTALLED: OnceLock<Result<ChildExits, i32>> = OnceLock::new();
        let installed = INSTALLED.get_or_init(|| Self::install_once().map_err(errno_of));
        installed.map_err(std::io::Error::from_raw_os_error)
    }

    fn install_once() -> std::io::Result<ChildExits> {
        // SAFETY: eventfd(2) with constant flags; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sigaction is plain data; all-zero is a valid value (SIG_DFL, no flags).
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current action into `previous`; sets nothing.
        if unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut previous) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if previous.sa_sigaction == libc::SIG_IGN {
            // Children would be reaped by the kernel and a handler would change that.
            return Err(std::io::Error::other("SIGCHLD is ignored"));
        }
        let _ = PREVIOUS.set(PreviousAction(previous));
        EXIT_FD.store(fd.as_raw_fd(), Ordering::SeqCst);
        // SAFETY: as above.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigchld as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset_t to clear.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that only does async-signal-safe work (an atomic load, a
        // write(2) to an eventfd, errno save and restore, and the previous handler).
        if unsafe { libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut()) } != 0 {
            let e = std::io::Error::last_os_error();
            EXIT_FD.store(-1, Ordering::SeqCst);
            return Err(e);
        }
        // Leaked on purpose: the handler may write to it for the life of the process.
        Ok(ChildExits {
            fd: fd.into_raw_fd(),
        })
    }

    /// Sleeps until a child has exited since the last wait, or for `timeout` (`None`: no limit).
    /// Returns whether an exit woke it.
    pub fn wait(self, timeout: Option<Duration>) -> bool {
        let ms = timeout.map_or(-1, |t| {
            // Round up so a short wait does not become a busy loop of zero-length polls.
            i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let mut poll = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the length given. Its result does not matter: it returns
        // on an exit, at the limit, or with EINTR when the handler ran on this very thread (and
        // has then already bumped the eventfd); the read below tells which.
        let _ = unsafe { libc::poll(&mut poll, 1, ms) };
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a u64 from the non-blocking eventfd (clearing it).
        let read = unsafe { libc::read(self.fd, (&raw mut count).cast(), 8) };
        read == 8 && count > 0
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The `SIGCHLD` handler: wakes the reaper, then runs the action that was there before.
extern "C" fn on_sigchld(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saved and restored so the interrupted code sees its own.
    let errno = unsafe { *libc::__errno_location() };
    let fd = EXIT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; 8 bytes from a u64 to the eventfd.
        let _ = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
    if let Some(PreviousAction(previous)) = PREVIOUS.get() {
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the saved address is a three-argument handler.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(sig, info, context);
            } else {
                // SAFETY: without SA_SIGINFO the saved address is a one-argument handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(sig);
            }
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Pids of `parent`'s children that are zombies, from /proc.
fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(state, ppid)| state == 'Z' && ppid == parent)
        })
        .collect()
}

/// State and parent pid from a `/proc/<pid>/stat` line (the command name may hold spaces and `)`).
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_children_are_registered_and_released() {
        let child = spawn_managed(
            || std::process::Command::new("true").spawn(),
            |c| Some(c.id()),
        )
        .unwrap();
        let pid = child.id();
        assert!(is_managed(pid));
        let mut child = child;
        assert!(child.wait().unwrap().success());
        release(pid);
        assert!(!is_managed(pid));
        let err = spawn_managed(
            || std::process::Command::new("/no/such").spawn(),
            |c| Some(c.id()),
        );
        assert!(err.is_err());
    }

    #[test]
    fn stat_lines() {
        assert_eq!(parse_stat("42 (sh) Z 1 42 42 0 -1"), Some(('Z', 1)));
        assert_eq!(parse_stat("7 (a) b) c) S 3 7"), Some(('S', 3)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn grace_runs_out() {
        let now = Instant::now();
        assert_eq!(grace_left(now, now), Some(GRACE));
        let left = grace_left(now, now + Duration::from_millis(100)).unwrap();
        assert_eq!(left, GRACE - Duration::from_millis(100));
        assert_eq!(grace_left(now, now + GRACE), None);
        assert_eq!(grace_left(now + GRACE, now), Some(GRACE));
    }

    /// The only test that installs the handler, so it knows what was there before (one process
    /// per test under nextest; also true when tests share a process).
    #[test]
    fn a_child_exit_wakes_the_wait_and_the_previous_handler_still_runs() {
        static EARLIER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        extern "C" fn earlier(_: libc::c_int) {
            EARLIER.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: test-only: installs a one-argument handler that only bumps an atomic.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = earlier as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: a valid sigaction; the previous one is not needed.
        let rc = unsafe { libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
        let exits = ChildExits::install().unwrap();
        while exits.wait(Some(Duration::ZERO)) {}
        // Nothing exits: the wait runs out (retried, as other tests in this process may spawn).
        let ran_out = (0..20).any(|_| {
            let t = Instant::now();
            !exits.wait(Some(Duration::from_millis(50))) && t.elapsed() >= Duration::from_millis(45)
        });
        assert!(ran_out);
        // A child exits: the wait ends well before its limit.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let t = Instant::now();
        assert!(exits.wait(Some(Duration::from_secs(30))));
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(child.wait().unwrap().success());
        assert!(EARLIER.load(Ordering::SeqCst) >= 1);
        // The same one is handed out again.
        assert_eq!(ChildExits::install().unwrap().fd, exits.fd);
    }

    #[test]
    fn unmanaged_zombies_are_reaped_after_their_grace() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !zombie_children(std::process::id()).contains(&pid) {
            assert!(Instant::now() < deadline, "the child never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut seen = HashMap::new();
        // Young: left alone, and the reaper is told when to look again.
        let next = reap_unmanaged_zombies(&mut seen).expect("a young zombie waits");
        assert!(next <= GRACE);
        assert!(seen.contains_key(&pid));
        std::thread::sleep(next);
        // Old enough: reaped, so its owner finds no child left to wait for.
        assert_eq!(reap_unmanaged_zombies(&mut seen), None);
        assert!(!seen.contains_key(&pid));
        assert!(child.wait().is_err());
    }
}
