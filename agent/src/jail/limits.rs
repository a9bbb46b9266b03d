//! What the jailed process may use and who it is: resource limits (`RLIMIT_NOFILE`,
//! `RLIMIT_FSIZE`), the descriptors it keeps, and its credentials (no supplementary groups, the
//! VM's gid and uid, no new privileges, killed when its jailer dies).

use std::os::fd::RawFd;

use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

/// Errors applying limits or credentials.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// A system call failed.
    #[error("cannot {0}")]
    Sys(String, #[source] nix::Error),
    /// Listing the open descriptors failed.
    #[error("cannot list the open file descriptors")]
    ListFds(#[source] std::io::Error),
    /// A descriptor to keep is not open.
    #[error("file descriptor {0} is to be passed to the VMM but is not open")]
    NotOpen(RawFd),
    /// The jailer exited before its child could take over.
    #[error("the jailer exited before the VMM started")]
    ParentGone,
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> LimitsError {
    let what = what.into();
    move |e| LimitsError::Sys(what, e)
}

/// The resource limits of a jailed VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// Most open file descriptors.
    pub nofile: u64,
    /// Largest file it may write, bytes; `None`: unlimited.
    pub fsize: Option<u64>,
}

impl Rlimits {
    /// Sets both limits, soft and hard alike.
    pub fn apply(&self) -> Result<(), LimitsError> {
        setrlimit(Resource::RLIMIT_NOFILE, self.nofile, self.nofile)
            .map_err(sys(format!("set RLIMIT_NOFILE to {}", self.nofile)))?;
        let fsize = self.fsize.unwrap_or(RLIM_INFINITY);
        setrlimit(Resource::RLIMIT_FSIZE, fsize, fsize)
            .map_err(sys(format!("set RLIMIT_FSIZE to {fsize}")))
    }
}

/// Marks every open descriptor above 2 close-on-exec except `keep`, whose flag is cleared so the
/// exec'd program inherits them. Needs `/proc` (call it before leaving the host's root); any
/// descriptor opened afterwards must be close-on-exec (the standard library's are).
pub fn close_on_exec_except(keep: &[RawFd]) -> Result<(), LimitsError> {
    let mut open: Vec<RawFd> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(LimitsError::ListFds)? {
        let entry = entry.map_err(LimitsError::ListFds)?;
        if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            open.push(fd);
        }
    }
    for fd in keep {
        if !open.contains(fd) || set_cloexec(*fd, false).is_err() {
            return Err(LimitsError::NotOpen(*fd));
        }
    }
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // The directory listing's own descriptor is gone by now: EBADF is expected for it.
        match set_cloexec(fd, true) {
            Ok(()) | Err(nix::Error::EBADF) => {}
            Err(e) => return Err(sys(format!("mark fd {fd} close-on-exec"))(e)),
        }
    }
    Ok(())
}

fn set_cloexec(fd: RawFd, on: bool) -> Result<(), nix::Error> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes the descriptor flags of `fd` (an integer the kernel checks; a
    // closed one gives EBADF); no memory is passed.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, flag) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Drops every privilege: no supplementary groups, then gid, then uid (real, effective, saved),
/// then no new privileges. Afterwards asks for SIGKILL when the jailer dies (a change of uid
/// clears that setting, so it comes last) and checks the jailer is still there (`parent_alive`).
pub fn drop_to(uid: Uid, gid: Gid, parent_alive: impl Fn() -> bool) -> Result<(), LimitsError> {
    setgroups(&[]).map_err(sys("drop the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(sys(format!("set the gid to {gid}")))?;
    setresuid(uid, uid, uid).map_err(sys(format!("set the uid to {uid}")))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("set no_new_privs"))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(sys("set the parent-death signal"))?;
    if !parent_alive() {
        return Err(LimitsError::ParentGone);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_to_keep_must_be_open() {
        assert!(matches!(
            close_on_exec_except(&[9999]),
            Err(LimitsError::NotOpen(9999))
        ));
    }
}
