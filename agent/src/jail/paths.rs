//! Checking what the jail is given: the VM id, and each file the VMM needs.
//!
//! A file is opened with `O_PATH | O_NOFOLLOW` and checked through that descriptor: a symlink, a
//! hard link (more than one name), or anything that is not a regular file is refused. A bind
//! mount's source must lie in the caller's mount namespace, so the jailed child opens each file
//! again in its own namespace ([`CheckedFile::reopen`]), checks it is the same file (device and
//! inode) and passes the checks again, and bind-mounts that descriptor (`/proc/self/fd/N`): the
//! path cannot be swapped between the check and the mount.
//!
//! A folder the VMM may write into ([`check_output_folder`]) is checked the same way, and must
//! already belong to the VM's uid: the jail never hands a VM write access to anything its uid
//! did not own before.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The longest VM id.
pub const MAX_ID_LEN: usize = 64;

/// A path or id the jail refuses.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The id has characters other than ASCII letters, digits and `-`, or a bad length.
    #[error(
        "the VM id {0:?} must be 1 to {MAX_ID_LEN} ASCII letters, digits or '-' (not starting with '-')"
    )]
    BadId(String),
    /// The path is not absolute.
    #[error("{what} {path:?} is not an absolute path")]
    NotAbsolute { what: &'static str, path: PathBuf },
    /// The path cannot be opened.
    #[error("cannot open {what} {path:?}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path is a symlink.
    #[error("{what} {path:?} is a symlink; give the file itself")]
    Symlink { what: &'static str, path: PathBuf },
    /// The path has other names (hard links).
    #[error("{what} {path:?} has {links} hard links; give a file with exactly one name")]
    HardLink {
        what: &'static str,
        path: PathBuf,
        links: u64,
    },
    /// The path is not a regular file.
    #[error("{what} {path:?} is not a regular file")]
    NotFile { what: &'static str, path: PathBuf },
    /// The path names another file than the one checked before.
    #[error("{what} {path:?} was replaced while the jail was being built")]
    Replaced { what: &'static str, path: PathBuf },
    /// A folder the jail uses is a symlink or not a folder.
    #[error("{0:?} is not a folder (or is a symlink)")]
    NotDir(PathBuf),
    /// A folder the VMM would write into belongs to another uid than the VM's.
    #[error("{what} {path:?} belongs to uid {owner}, not to the VM's uid {uid}")]
    NotOwned {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
}

/// Checks a VM id: it names folders and cgroups, so it is kept to `[A-Za-z0-9-]`.
pub fn check_id(id: &str) -> Result<(), PathError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PathError::BadId(id.to_string()))
    }
}

/// Which checks a file passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A file given for the VMM: no symlink, one name.
    Given,
    /// A program or library: symlinks followed, any number of names.
    Program,
    /// A folder the VMM writes into: no symlink, owned by this uid.
    OutputFolder(u32),
}

/// A file that passed the checks, held open (`O_PATH`) until it is mounted.
#[derive(Debug)]
pub struct CheckedFile {
    /// What it is, for messages (`kernel`, `initrd`, ...).
    pub what: &'static str,
    /// Where it was found.
    pub source: PathBuf,
    /// Its absolute path inside the jail.
    pub inside: PathBuf,
    kind: Kind,
    fd: File,
}

impl CheckedFile {
    /// The path that reaches exactly the checked file (for the bind mount).
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Opens the path again (in the current mount namespace) and checks it is still the same
    /// file, passing the same checks.
    pub fn reopen(&self) -> Result<CheckedFile, PathError> {
        let again = match self.kind {
            Kind::Program => check_program(self.what, &self.source, &self.inside)?,
            Kind::Given => check_file(self.what, &self.inside, &self.source)?,
            Kind::OutputFolder(uid) => {
                check_output_folder(self.what, &self.inside, &self.source, uid)?
            }
        };
        let (a, b) = (metadata(self)?, metadata(&again)?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(PathError::Replaced {
                what: self.what,
                path: self.source.clone(),
            });
        }
        Ok(again)
    }
}

fn metadata(file: &CheckedFile) -> Result<std::fs::Metadata, PathError> {
    file.fd.metadata().map_err(|source| PathError::Open {
        what: file.what,
        path: file.source.clone(),
        source,
    })
}

fn open_path(what: &'static str, path: &Path, follow: bool) -> Result<File, PathError> {
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute {
            what,
            path: path.to_path_buf(),
        });
    }
    let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| PathError::Open {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// Opens `path` itself (`O_PATH | O_NOFOLLOW`) with its metadata, refusing a symlink.
fn open_no_symlink(
    what: &'static str,
    path: &Path,
) -> Result<(File, std::fs::Metadata), PathError> {
    let fd = open_path(what, path, false)?;
    let meta = fd.metadata().map_err(|source| PathError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(PathError::Symlink {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok((fd, meta))
}

/// Checks a file the VMM reads (kernel, initrd, snapshot files), to appear at `inside` in the
/// jail: the path itself must be a regular file with exactly one name.
pub fn check_file(
    what: &'static str,
    inside: &Path,
    path: &Path,
) -> Result<CheckedFile, PathError> {
    let (fd, meta) = open_no_symlink(what, path)?;
    let path = path.to_path_buf();
    if !meta.file_type().is_file() {
        return Err(PathError::NotFile { what, path });
    }
    if meta.nlink() > 1 {
        return Err(PathError::HardLink {
            what,
            path,
            links: meta.nlink(),
        });
    }
    Ok(CheckedFile {
        what,
        source: path,
        inside: inside.to_path_buf(),
        kind: Kind::Given,
        fd,
    })
}

/// Checks the program the jail runs (the `hearth` binary): a regular file, symlinks followed
/// (cargo hard-links its outputs, so the link count is not checked either).
pub fn check_program(
    what: &'static str,
    path: &Path,
    inside: &Path,
) -> Result<CheckedFile, PathError> {
    let fd = open_path(what, path, true)?;
    let meta = fd.metadata().map_err(|source| PathError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(PathError::NotFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(CheckedFile {
        what,
        source: path.to_path_buf(),
        inside: inside.to_path_buf(),
        kind: Kind::Program,
        fd,
    })
}

/// Checks a folder the VMM writes into (a template's snapshot), to appear at `inside` in the jail:
/// the path itself must be a folder (not a symlink to one) that belongs to `uid`, the VM's.
pub fn check_output_folder(
    what: &'static str,
    inside: &Path,
    path: &Path,
    uid: u32,
) -> Result<CheckedFile, PathError> {
    let (fd, meta) = open_no_symlink(what, path)?;
    let path = path.to_path_buf();
    if !meta.file_type().is_dir() {
        return Err(PathError::NotDir(path));
    }
    if meta.uid() != uid {
        return Err(PathError::NotOwned {
            what,
            path,
            owner: meta.uid(),
            uid,
        });
    }
    Ok(CheckedFile {
        what,
        source: path,
        inside: inside.to_path_buf(),
        kind: Kind::OutputFolder(uid),
        fd,
    })
}

/// Checks that `path` is a real folder (not a symlink to one).
pub fn check_dir(path: &Path) -> Result<(), PathError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        _ => Err(PathError::NotDir(path.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for good in ["vm-1", "A0", "551e7604-e35c-42b3-b825-416853441234"] {
            check_id(good).unwrap();
        }
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(matches!(check_id(bad), Err(PathError::BadId(_))), "{bad:?}");
        }
    }

    #[test]
    fn symlinks_hard_links_and_folders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel");
        std::fs::write(&file, b"k").unwrap();
        let checked = check_file("kernel", Path::new("/kernel"), &file).unwrap();
        assert_eq!(checked.inside, Path::new("/kernel"));
        checked.reopen().unwrap();
        std::fs::rename(dir.path().join("kernel"), dir.path().join("old")).unwrap();
        std::fs::write(&file, b"other").unwrap();
        let err = checked.reopen().unwrap_err();
        assert!(matches!(err, PathError::Replaced { .. }), "{err}");
        let checked = check_file("kernel", Path::new("/kernel"), &file).unwrap();
        assert!(checked.fd_path().starts_with("/proc/self/fd"));

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = check_file("kernel", Path::new("/kernel"), &link).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("symlink"));

        let hard = dir.path().join("hard");
        std::fs::hard_link(&file, &hard).unwrap();
        let err = check_file("kernel", Path::new("/kernel"), &file).unwrap_err();
        assert!(matches!(err, PathError::HardLink { links: 2, .. }), "{err}");

        let err = check_file("initrd", Path::new("/initrd"), dir.path()).unwrap_err();
        assert!(matches!(err, PathError::NotFile { .. }), "{err}");
        let err = check_file("initrd", Path::new("/initrd"), Path::new("relative")).unwrap_err();
        assert!(matches!(err, PathError::NotAbsolute { .. }), "{err}");
        let err =
            check_file("initrd", Path::new("/initrd"), &dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, PathError::Open { .. }), "{err}");
    }

    #[test]
    fn an_output_folder_must_be_a_real_folder_of_the_vms_uid() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let uid = std::fs::metadata(&out).unwrap().uid();
        let checked = check_output_folder("output folder", Path::new("/out"), &out, uid).unwrap();
        assert_eq!(checked.inside, Path::new("/out"));
        checked.reopen().unwrap();
        let err =
            check_output_folder("output folder", Path::new("/out"), &out, uid + 1).unwrap_err();
        assert!(matches!(err, PathError::NotOwned { .. }), "{err}");
        assert!(err.to_string().contains("belongs to uid"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let err = check_output_folder("output folder", Path::new("/out"), &link, uid).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"f").unwrap();
        let err = check_output_folder("output folder", Path::new("/out"), &file, uid).unwrap_err();
        assert!(matches!(err, PathError::NotDir(_)), "{err}");
        // Replaced by another folder of the same name between the check and the mount.
        std::fs::rename(&out, dir.path().join("old")).unwrap();
        std::fs::create_dir(&out).unwrap();
        let err = checked.reopen().unwrap_err();
        assert!(matches!(err, PathError::Replaced { .. }), "{err}");
    }

    #[test]
    fn folders_must_not_be_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        check_dir(dir.path()).unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(check_dir(&link).is_err());
    }
}
