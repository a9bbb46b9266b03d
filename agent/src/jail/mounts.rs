//! The jail's file system, built in the jailed process's own mount namespace: the mount tree made
//! private, the jail root bind-mounted onto itself, each checked file bind-mounted read-only into
//! it, a folder the VMM writes into (if any) bind-mounted read-write, a small tmpfs `/dev` holding
//! only the device nodes the VMM needs, then `pivot_root` into the root and the old root detached.
//!
//! Where the current root cannot be pivoted (an initramfs `rootfs`, as inside the QEMU test host),
//! the root is moved over `/` and entered with `chroot` instead; the old root is then shadowed,
//! not detached, and unreachable once the process has dropped its privileges.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chown};

use super::paths::CheckedFile;

/// `/dev/kvm`: the KVM device, misc 10:232.
pub const KVM_DEVICE: (u64, u64) = (10, 232);

/// Mount errors.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount-related call failed.
    #[error("cannot {what} {path:?}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("cannot {what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Sys { what, path, source }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Io { what, path, source }
}

/// A device node made in the jail's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its name under `/dev`.
    pub name: &'static str,
    /// Major, minor.
    pub dev: (u64, u64),
    /// Permission bits.
    pub mode: u32,
    /// Owned by the VM's uid/gid (else by root).
    pub for_vm: bool,
}

/// The device nodes for a VMM: `kvm` (and `userfaultfd` where the host has it) for the VM's user,
/// `null` and `urandom` for everyone.
pub fn vmm_devices() -> Vec<DeviceNode> {
    let mut nodes = vec![
        DeviceNode {
            name: "kvm",
            dev: KVM_DEVICE,
            mode: 0o660,
            for_vm: true,
        },
        DeviceNode {
            name: "null",
            dev: (1, 3),
            mode: 0o666,
            for_vm: false,
        },
        DeviceNode {
            name: "urandom",
            dev: (1, 9),
            mode: 0o666,
            for_vm: false,
        },
    ];
    // A misc device with a dynamic minor: take the host's numbers.
    if let Ok(meta) = std::fs::metadata("/dev/userfaultfd") {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if meta.file_type().is_char_device() {
            let rdev = meta.rdev();
            nodes.push(DeviceNode {
                name: "userfaultfd",
                dev: (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
                mode: 0o600,
                for_vm: true,
            });
        }
    }
    nodes
}

/// Stops mount events from propagating between this namespace and the host's.
pub fn make_private() -> Result<(), MountError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make private", Path::new("/")))
}

/// Bind-mounts `root` onto itself, so it is a mount point `pivot_root` can enter.
pub fn bind_root(root: &Path) -> Result<(), MountError> {
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind the jail root", root))?;
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(sys("remount nosuid,nodev", root))
}

/// Makes the folders of `inside` under `root` (owned by root), refusing a symlink on the way.
fn make_parents(root: &Path, inside: &Path) -> Result<PathBuf, MountError> {
    let rel = inside.strip_prefix("/").unwrap_or(inside);
    let mut dir = root.to_path_buf();
    let parents: Vec<_> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        let std::path::Component::Normal(c) = c else {
            return Err(io("place", inside)(std::io::Error::other(
                "only plain names may appear in a path inside the jail",
            )));
        };
        dir.push(c);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create", &dir)(e)),
        }
        super::paths::check_dir(&dir).map_err(|e| MountError::Io {
            what: "use",
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
    }
    Ok(root.join(rel))
}

/// Bind-mounts `file` read-only at its place inside the jail root (`exec`: may be executed or
/// mapped executable).
pub fn bind_file(root: &Path, file: &CheckedFile, exec: bool) -> Result<(), MountError> {
    let target = make_parents(root, &file.inside)?;
    // The mount point: an empty file, created without following a symlink planted there.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o444)
            .open(&target)
            .map_err(io("create the mount point", &target))?;
    }
    let mut flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !exec {
        flags |= MsFlags::MS_NOEXEC;
    }
    bind_with(file, &target, flags, "remount read-only")
}

/// Bind-mounts the checked `source` on `target`, then remounts the bind with `flags`.
fn bind_with(
    source: &CheckedFile,
    target: &Path,
    flags: MsFlags,
    remount: &'static str,
) -> Result<(), MountError> {
    mount(
        Some(&source.fd_path()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind-mount", target))?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(sys(remount, target))
}

/// Makes the folder `dir`, or takes the one there if it is a real folder (not a symlink).
fn make_dir(dir: &Path) -> Result<(), MountError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => super::paths::check_dir(dir)
            .map_err(|e| MountError::Io {
                what: "use",
                path: dir.to_path_buf(),
                source: std::io::Error::other(e),
            }),
        Err(e) => Err(io("create", dir)(e)),
    }
}

/// Bind-mounts the checked folder `folder` read-write (but `nosuid`, `nodev`, `noexec`) at its
/// place inside the jail root: the one place outside its root where the VMM may write (a
/// template's snapshot).
pub fn bind_output_folder(root: &Path, folder: &CheckedFile) -> Result<(), MountError> {
    let target = make_parents(root, &folder.inside)?;
    make_dir(&target)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    bind_with(folder, &target, flags, "remount nosuid,nodev,noexec")
}

/// Mounts a small tmpfs on `<root>/dev` holding `nodes`, then makes it read-only (the nodes stay
/// usable: a read-only file system does not stop writes to devices).
pub fn make_dev(root: &Path, nodes: &[DeviceNode], uid: Uid, gid: Gid) -> Result<(), MountError> {
    let dev = root.join("dev");
    make_dir(&dev)?;
    let fs_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        fs_flags,
        Some("mode=755,size=64k,nr_inodes=16"),
    )
    .map_err(sys("mount a tmpfs on", &dev))?;
    for node in nodes {
        let path = dev.join(node.name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(node.mode),
            makedev(node.dev.0, node.dev.1),
        )
        .map_err(sys("make the device node", &path))?;
        // mknod applies the umask; set the mode exactly.
        std::fs::set_permissions(
            &path,
            std::os::unix::fs::PermissionsExt::from_mode(node.mode),
        )
        .map_err(io("set the mode of", &path))?;
        if node.for_vm {
            chown(&path, Some(uid), Some(gid)).map_err(sys("chown", &path))?;
        }
    }
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | fs_flags,
        None::<&str>,
    )
    .map_err(sys("remount read-only", &dev))
}

/// Enters `root` (already a mount point): `pivot_root` with the old root detached, or, where the
/// current root is an initramfs, a move over `/` and `chroot`. The working folder ends at `/`.
pub fn enter_root(root: &Path) -> Result<(), MountError> {
    nix::unistd::chdir(root).map_err(sys("enter", root))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked on `.`: detach it.
            umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root", root))?;
        }
        Err(nix::Error::EINVAL) => {
            tracing::warn!(
                "pivot_root refused (the current root is an initramfs); moving the jail over / and chrooting"
            );
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("move the jail root over /", root))?;
            nix::unistd::chroot(".").map_err(sys("chroot into", root))?;
        }
        Err(e) => return Err(sys("pivot_root into", root)(e)),
    }
    nix::unistd::chdir("/").map_err(sys("enter", Path::new("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_gets_kvm_and_the_basic_nodes() {
        let nodes = vmm_devices();
        let kvm = nodes.iter().find(|n| n.name == "kvm").unwrap();
        assert_eq!((kvm.dev, kvm.for_vm), ((10, 232), true));
        for name in ["null", "urandom"] {
            let n = nodes.iter().find(|n| n.name == name).unwrap();
            assert!(!n.for_vm && n.mode == 0o666);
        }
    }
}
