//! Reaping children as PID 1, without stealing the exit status of children someone waits for.
//!
//! Every process orphaned inside the sandbox becomes the init's child, so the init must reap them or
//! they stay zombies. The reaper thread peeks at exited children with `waitid(WNOWAIT)` and reaps
//! only those that are not *managed*, and only after [`GRACE`], so an owner that reaps its child
//! promptly (tokio's `Child::wait`, std's blocking `wait`) gets its status even without registering. Code that starts a child and waits for it itself (e.g. with
//! `tokio::process::Child::wait`) must start it through [`spawn_managed`] and call [`release`] once
//! it has collected the exit status. Spawning under the reaper's lock closes the race between the
//! fork and the registration.

use std::collections::{HashMap, HashSet};
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

/// Starts the reaper thread (once).
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("reaper".into()).spawn(|| {
            let mut seen = HashMap::new();
            loop {
                reap_one(&mut seen);
            }
        });
        if let Err(e) = spawned {
            crate::console!("cannot start the reaper thread: {e}");
        }
    });
}

/// Waits until some child has exited, then reaps every exited child that is neither managed nor
/// younger (as a zombie) than [`GRACE`].
fn reap_one(seen: &mut HashMap<u32, Instant>) {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into our siginfo_t; WNOWAIT leaves the child waitable.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        // ECHILD (no children) or EINTR: look again later.
        seen.clear();
        std::thread::sleep(Duration::from_millis(100));
        return;
    }
    // waitid keeps answering with the same child while it is a zombie, so a managed zombie would
    // hide the others: find every zombie child in /proc instead.
    if reap_unmanaged_zombies(seen) == 0 {
        // Only managed or young zombies: their owners may reap them; look again shortly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long an unmanaged zombie is left to whoever started it (e.g. tokio's child reaping, which
/// follows SIGCHLD within milliseconds) before the reaper collects it.
pub const GRACE: Duration = Duration::from_millis(500);

/// Reaps every zombie child that is not managed and has been a zombie for [`GRACE`]; returns how
/// many.
fn reap_unmanaged_zombies(seen: &mut HashMap<u32, Instant>) -> usize {
    let me = std::process::id();
    let zombies = zombie_children(me);
    seen.retain(|pid, _| zombies.contains(pid));
    let now = Instant::now();
    let set = managed();
    let mut reaped = 0;
    for pid in zombies {
        let first = *seen.entry(pid).or_insert(now);
        if set.contains(&pid) || now.duration_since(first) < GRACE {
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
            reaped += 1;
        }
    }
    reaped
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
}
