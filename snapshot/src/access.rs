//! Who may read snapshot files, and whose files a restore accepts.
//!
//! Writing: every snapshot file (state, memory, working set) is created with [`FILE_MODE`],
//! 0644 (set again on the new file's descriptor, before anything is written to it, where the
//! umask narrowed it), so nothing changes the file's mode afterwards: a `chmod` would move its change
//! time, and with it the identity the memory file's record carries, so every restore would fall
//! back to reading and digesting the whole file. Readable by every user because a snapshot is
//! restored by other users than the one that wrote it: a template is written by the agent (root)
//! and restored by jailed VMMs, each under a uid of its own that cannot be listed in advance.
//! Who reaches the files is decided by the folder they are in: keep a snapshot of a guest that
//! holds secrets in a folder only its owner can enter (the agent's templates hold a freshly booted
//! guest with no function in it, in a root-only folder; the jail bind-mounts the two files it
//! needs read-only into each VM's root).
//!
//! Reading: a file is accepted when it is owned by this process's effective user or by root, and
//! neither its group nor others may write it ([`check`]). Root is trusted anyway (it can do
//! anything a forged file could); any other user's file could have been written or rewritten by
//! that user at will, so it is refused, as a file others may write is.

use std::os::unix::fs::MetadataExt;

/// The mode snapshot files are created with: read-write for the owner, readable by all.
pub const FILE_MODE: u32 = 0o644;

/// Mode bits that let others than the owner change a file.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// A snapshot file whose owner or mode a restore does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "it is owned by uid {uid} with mode {mode:o}; it must belong to this user (uid {euid}) or root and be writable by nobody else"
)]
pub struct AccessError {
    /// The file's owner.
    pub uid: u32,
    /// Its permission bits.
    pub mode: u32,
    /// This process's effective uid.
    pub euid: u32,
}

/// Whether a file owned by `uid` may be read by a process whose effective uid is `euid`.
pub fn owner_trusted(uid: u32, euid: u32) -> bool {
    uid == euid || uid == 0
}

/// Checks the owner and mode of a snapshot file (its metadata from the open descriptor).
pub fn check(meta: &std::fs::Metadata) -> Result<(), AccessError> {
    check_as(meta.uid(), meta.mode(), nix::unistd::geteuid().as_raw())
}

/// [`check`] for a file owned by `uid` with `mode`, read by effective uid `euid`.
pub fn check_as(uid: u32, mode: u32, euid: u32) -> Result<(), AccessError> {
    if owner_trusted(uid, euid) && mode & WRITABLE_BY_OTHERS == 0 {
        Ok(())
    } else {
        Err(AccessError {
            uid,
            mode: mode & 0o7777,
            euid,
        })
    }
}

/// Creates `path` afresh for writing (a file of that name is removed first), with exactly
/// [`FILE_MODE`].
///
/// A new file gets the mode the umask leaves of [`FILE_MODE`]; only where the umask narrowed it
/// is it set again (`fchmod`, before any byte is written and long before the identity is
/// recorded). So the usual umask (022) costs no `fchmod`, which the VMM's seccomp filter, where
/// snapshots are written, may not allow.
pub(crate) fn create(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Readable too: a template VM's guest RAM file is mapped shared from this descriptor.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    if file.metadata()?.mode() & 0o7777 != FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

/// What reading a snapshot file gave, for [`check_owner_and_mode_rules`].
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TestRead {
    /// Read, and what was written.
    Read,
    /// Refused for its owner or mode.
    Refused,
}

/// For the tests of each file kind: `path`, just written by this (root) process, has
/// [`FILE_MODE`]; `read` refuses it while it belongs to uid 4242, reads it back once root owns it
/// again, and refuses it once others may write it.
#[cfg(test)]
pub(crate) fn check_owner_and_mode_rules(
    path: &std::path::Path,
    read: impl Fn(&std::path::Path) -> TestRead,
) {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test gives a file to another user (chown): run it as root"
    );
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(meta.mode() & 0o7777, FILE_MODE);
    std::os::unix::fs::chown(path, Some(4242), None).unwrap();
    assert_eq!(read(path), TestRead::Refused, "another user's file");
    std::os::unix::fs::chown(path, Some(0), None).unwrap();
    assert_eq!(read(path), TestRead::Read, "root's file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o646)).unwrap();
    assert_eq!(read(path), TestRead::Refused, "a file others may write");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_and_the_own_user_are_trusted_nobody_else() {
        assert!(check_as(1000, 0o100644, 1000).is_ok(), "own file");
        assert!(check_as(0, 0o100644, 1000).is_ok(), "root's file");
        assert!(check_as(0, 0o100600, 0).is_ok(), "root reading its own");
        assert!(check_as(0, 0o100444, 90_000_001).is_ok(), "a jailed VMM");
        let err = check_as(1001, 0o100644, 1000).unwrap_err();
        assert_eq!(err.uid, 1001);
        assert!(err.to_string().contains("uid 1001"), "{err}");
        assert!(
            check_as(1001, 0o100644, 0).is_err(),
            "not even root takes another user's file"
        );
        for mode in [0o100664, 0o100646, 0o100666] {
            let err = check_as(0, mode, 0).unwrap_err();
            assert_eq!(err.mode, mode & 0o7777);
        }
    }

    #[test]
    fn files_are_created_with_the_mode_even_over_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // A private leftover of that name is replaced by a new file of the mode.
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Held open, so the old inode stays allocated and its number cannot be reused at once.
        let old_file = std::fs::File::open(&path).unwrap();
        let old = old_file.metadata().unwrap().ino();
        let file = create(&path).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.mode() & 0o7777, FILE_MODE);
        assert_eq!(meta.len(), 0);
        assert_ne!(meta.ino(), old, "a new file");
        check(&meta).unwrap();
    }
}
