//! Which sources a VMM executable was built from. `vmm/build.rs` digests the VMM's sources, its
//! seccomp filters, the snapshot crate and the lock file into [`BUILD_ID`]; every executable that
//! links this crate and runs [`crate::cli::run`] carries [`MARK`] in its bytes, so
//! [`crate::process::vmm_program`] can tell whether a `hearth-vmm` beside `hearth` runs the same VMM
//! code (a rebuild of one executable without the other leaves a stale one, whatever the file
//! times say).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// This build's digest (hex).
pub const BUILD_ID: &str = env!("HEARTH_VMM_BUILD_ID");

/// The bytes that mark an executable as this build.
pub static MARK: &str = concat!("hearth-vmm-build-id=", env!("HEARTH_VMM_BUILD_ID"), ";");

/// Keeps [`MARK`] in the executable (the linker drops what nothing uses).
pub fn keep_mark() {
    std::hint::black_box(MARK.as_ptr());
}

/// Whether the executable `bytes` carries this build's mark.
pub fn carries_this_build(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, MARK.as_bytes()).is_some()
}

/// A version of a file: its path, inode, size and modification time.
type FileVersion = (PathBuf, u64, u64, Option<SystemTime>);

/// Files already checked, with the verdict.
static CHECKED: Mutex<Vec<(FileVersion, bool)>> = Mutex::new(Vec::new());

/// Whether the file at `path` is an executable of this build; each version of a file is read once
/// per process. A file that cannot be read is not.
pub fn file_is_this_build(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    use std::os::unix::fs::MetadataExt as _;
    let version: FileVersion = (
        path.to_path_buf(),
        meta.ino(),
        meta.len(),
        meta.modified().ok(),
    );
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, verdict)) = checked.iter().find(|(v, _)| *v == version) {
        return *verdict;
    }
    let verdict = std::fs::read(path).is_ok_and(|bytes| carries_this_build(&bytes));
    checked.retain(|((p, ..), _)| p != path);
    checked.push((version, verdict));
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_names_this_build_only() {
        assert_eq!(BUILD_ID.len(), 32);
        assert!(BUILD_ID.bytes().all(|b| b.is_ascii_hexdigit()));
        let mut exe = b"\x7fELF...".to_vec();
        exe.extend_from_slice(MARK.as_bytes());
        exe.extend_from_slice(b"...");
        assert!(carries_this_build(&exe));
        let other = MARK.replace(BUILD_ID, &"0".repeat(32));
        assert!(!carries_this_build(other.as_bytes()));
        assert!(!carries_this_build(&MARK.as_bytes()[..MARK.len() - 1]));
    }

    #[test]
    fn files_are_checked_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth-vmm");
        assert!(!file_is_this_build(&path));
        std::fs::write(&path, MARK).unwrap();
        assert!(file_is_this_build(&path));
        std::fs::write(&path, "hearth-vmm-build-id=another;").unwrap();
        assert!(!file_is_this_build(&path));
    }
}
