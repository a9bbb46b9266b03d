//! The agent's side of the jail: a uid/gid and limits per VM, the `hearth jail` command line, and
//! the jailed VMM spawned through [`VmmProcess::spawn_jailed`].
//!
//! The configuration handed to [`JailConfig::spawn`] (a boot), [`JailConfig::spawn_writing_to`] (a
//! boot that writes a snapshot: a template) or [`JailConfig::spawn_awaiting_restore`] (a restore)
//! names the kernel, initrd and snapshot files by their host paths (the jail checks them and mounts
//! them at `/kernel`, `/initrd`, `/snapshot.state`, `/snapshot.mem`; a folder to write into at
//! `/out`, [`output_inside`]) and every socket or log by its path inside the jail (the root is
//! writable by the VM's uid; [`VmJail::host_path`] tells where such a path lies on this
//! host). A socket the agent itself listens on in the jail (the vsock `<uds>_<port>` ones) must be
//! handed to the VM's uid with [`VmJail::give`], or the VMM cannot connect to it.
//!
//! The jailer removes the jail folder and the cgroup when its VMM ends; a jailer that is itself
//! killed cannot, so whoever held the VM calls [`JailConfig::clean_up`] once the jailer is gone:
//! it ends what still runs in the cgroup and removes the cgroup and the folder.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use hearth_vmm::{ProcessError, SnapshotFiles, VmConfig, VmmProcess};

use super::cgroup::{CgroupError, CgroupVersion, JailCgroup};
use super::paths::{self, PathError};
use super::run::{DEFAULT_CGROUP_PARENT, DEFAULT_JAIL_BASE};

/// First uid (and gid) given to jailed VMMs: above the container sandboxes' ranges
/// (`200000 + 1024 * 65536`).
pub const UID_BASE: u32 = 90_000_000;
/// Distinct uids handed out before they are reused.
pub const UID_SLOTS: u32 = 65_536;
/// Memory a VMM needs on top of guest RAM (its own heap, page tables, thread stacks), MiB.
pub const VMM_OVERHEAD_MIB: u64 = 128;
/// Room on top of guest RAM for the largest file a VMM writes (a snapshot's memory), bytes.
const FSIZE_SLACK: u64 = 16 << 20;

static NEXT_UID_SLOT: AtomicU32 = AtomicU32::new(0);

/// Errors starting a jailed VMM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The VM id cannot name a jail.
    #[error(transparent)]
    Id(#[from] PathError),
    /// The jail root could not be prepared.
    #[error("cannot {what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The jailed VMM did not start.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A cgroup left behind could not be found or removed.
    #[error("cannot remove the cgroup a jail left behind")]
    Cgroup(#[from] CgroupError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.to_path_buf();
    move |source| LaunchError::Io { what, path, source }
}

/// How VMMs are jailed on this host.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The `hearth` binary: run as `hearth jail`, and the program the jail executes.
    pub hearth_binary: PathBuf,
    /// Where the jails are made (`<jail_base>/<id>/root`).
    pub jail_base: PathBuf,
    /// First uid/gid of the per-VM ones ([`UID_SLOTS`] of them).
    pub uid_base: u32,
    /// The cgroup, under the agent's own, holding the per-VM cgroups.
    pub cgroup_parent: String,
    /// The cgroup version; `None`: v2 where it has the controllers, else v1.
    pub cgroup_version: Option<CgroupVersion>,
    /// The CPU period of the cgroup, microseconds.
    pub cpu_period_us: u64,
    /// RLIMIT_NOFILE of each VMM.
    pub rlimit_nofile: u64,
}

impl JailConfig {
    /// Defaults: jails under `/srv/hearth/jail`, uids from [`UID_BASE`], 2048 open files.
    pub fn new(hearth_binary: PathBuf) -> Self {
        JailConfig {
            hearth_binary,
            jail_base: PathBuf::from(DEFAULT_JAIL_BASE),
            uid_base: UID_BASE,
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
            cgroup_version: None,
            cpu_period_us: 100_000,
            rlimit_nofile: 2048,
        }
    }

    /// A jail for VM `id` running `config`: its own uid/gid, a memory limit of guest RAM plus
    /// [`VMM_OVERHEAD_MIB`], one CPU per vCPU, files up to guest RAM plus 16 MiB.
    pub fn jail_for(&self, id: &str, config: &VmConfig) -> Result<VmJail, LaunchError> {
        paths::check_id(id)?;
        let uid = self.uid_base + NEXT_UID_SLOT.fetch_add(1, Ordering::Relaxed) % UID_SLOTS;
        Ok(VmJail {
            id: id.to_string(),
            uid,
            gid: uid,
            root: self.jail_base.join(id).join("root"),
            memory_limit_mib: u64::from(config.mem_mib) + VMM_OVERHEAD_MIB,
            cpu_quota_us: Some(self.cpu_period_us * u64::from(config.vcpus)),
            rlimit_fsize: Some(config.mem_bytes() + FSIZE_SLACK),
            keep_fds: Vec::new(),
        })
    }

    /// The arguments of `hearth jail` for `jail` with these host files, up to and including `--`.
    pub fn jail_args(
        &self,
        jail: &VmJail,
        kernel: Option<&Path>,
        initrd: Option<&Path>,
        snapshot: Option<&SnapshotFiles>,
        output_dir: Option<&Path>,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["jail".into()];
        let mut flag = |name: &str, value: OsString| {
            args.push(format!("--{name}").into());
            args.push(value);
        };
        flag("id", jail.id.clone().into());
        flag("jail-base", self.jail_base.clone().into());
        flag("uid", jail.uid.to_string().into());
        flag("gid", jail.gid.to_string().into());
        if let Some(k) = kernel {
            flag("kernel", k.into());
        }
        if let Some(i) = initrd {
            flag("initrd", i.into());
        }
        if let Some(s) = snapshot {
            flag("snapshot-state", s.state.clone().into());
            flag("snapshot-mem", s.mem.clone().into());
        }
        if let Some(o) = output_dir {
            flag("output-dir", o.into());
        }
        flag(
            "exec-file",
            hearth_vmm::process::vmm_program(&self.hearth_binary).into(),
        );
        flag("memory-limit-mib", jail.memory_limit_mib.to_string().into());
        if let Some(q) = jail.cpu_quota_us {
            flag("cpu-quota-us", q.to_string().into());
        }
        flag("cpu-period-us", self.cpu_period_us.to_string().into());
        flag("cgroup-parent", self.cgroup_parent.clone().into());
        if let Some(v) = self.cgroup_version {
            let v = match v {
                CgroupVersion::V1 => "v1",
                CgroupVersion::V2 => "v2",
            };
            flag("cgroup-version", v.into());
        }
        flag("rlimit-nofile", self.rlimit_nofile.to_string().into());
        if let Some(f) = jail.rlimit_fsize {
            flag("rlimit-fsize", f.to_string().into());
        }
        for fd in &jail.keep_fds {
            flag("keep-fd", fd.to_string().into());
        }
        args.push("--".into());
        args
    }

    /// Makes the jail root now, owned by the VM's uid/gid, so the agent can place its listening
    /// sockets in it before the VMM starts (the jail takes an existing root as it is).
    pub fn prepare(&self, jail: &VmJail) -> Result<(), LaunchError> {
        std::fs::create_dir_all(&jail.root).map_err(io("create", &jail.root))?;
        paths::check_dir(&jail.root)?;
        std::os::unix::fs::chown(&jail.root, Some(jail.uid), Some(jail.gid))
            .map_err(io("chown", &jail.root))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&jail.root, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &jail.root))
    }

    /// Spawns `hearth vmm` for `config` in `jail` (a fresh boot) and waits until its control socket
    /// answers. `config.kernel` and `config.initrd` are host paths; the control socket, vsock and
    /// serial log paths are inside the jail. The jail removes its folder and cgroup when the VMM
    /// exits. Restores go through [`JailConfig::spawn_awaiting_restore`].
    pub fn spawn(&self, jail: &VmJail, config: &VmConfig) -> Result<VmmProcess, LaunchError> {
        self.spawn_with(jail, config, None, None, &[])
    }

    /// Spawns `hearth vmm` for `config` in `jail` (a fresh boot, as [`JailConfig::spawn`]) with
    /// the host folder `output_dir` mounted read-write at [`output_inside`], where the VMM writes
    /// what it is asked to (a template's snapshot). `output_dir` must already belong to the VM's
    /// uid ([`VmJail::give`]); the jail refuses it otherwise.
    pub fn spawn_writing_to(
        &self,
        jail: &VmJail,
        config: &VmConfig,
        output_dir: &Path,
    ) -> Result<VmmProcess, LaunchError> {
        self.spawn_with(jail, config, None, Some(output_dir), &[])
    }

    /// Spawns `hearth vmm --await-restore` for `config` in `jail`, with the snapshot `files`
    /// (host paths) already mounted in the jail, and waits until its control socket answers:
    /// the VMM awaits a `Restore` of [`SnapshotFiles`] as it sees them ([`snapshot_inside`]).
    pub fn spawn_awaiting_restore(
        &self,
        jail: &VmJail,
        config: &VmConfig,
        files: &SnapshotFiles,
    ) -> Result<VmmProcess, LaunchError> {
        self.spawn_with(jail, config, Some(files), None, &["--await-restore".into()])
    }

    fn spawn_with(
        &self,
        jail: &VmJail,
        config: &VmConfig,
        snapshot: Option<&SnapshotFiles>,
        output_dir: Option<&Path>,
        extra: &[OsString],
    ) -> Result<VmmProcess, LaunchError> {
        let args = self.jail_args(
            jail,
            Some(&config.kernel),
            config.initrd.as_deref(),
            snapshot,
            output_dir,
        );
        let mut inside = config.clone();
        inside.kernel = PathBuf::from("/kernel");
        inside.initrd = config.initrd.as_ref().map(|_| PathBuf::from("/initrd"));
        Ok(crate::cores::unpinned(|| {
            VmmProcess::spawn_jailed(&self.hearth_binary, &args, &jail.root, &inside, extra)
        })?)
    }
}

/// Where a jail mounts a snapshot's state file.
const SNAPSHOT_STATE_INSIDE: &str = "/snapshot.state";
/// Where a jail mounts a snapshot's memory file.
const SNAPSHOT_MEM_INSIDE: &str = "/snapshot.mem";

/// Where [`JailConfig::spawn_writing_to`] mounts its folder, as the jailed VMM sees it.
pub fn output_inside() -> PathBuf {
    PathBuf::from(super::run::OUTPUT_INSIDE)
}

/// A snapshot's files as a jailed VMM sees them (where [`JailConfig::spawn_awaiting_restore`]
/// mounts them).
pub fn snapshot_inside() -> SnapshotFiles {
    SnapshotFiles {
        state: PathBuf::from(SNAPSHOT_STATE_INSIDE),
        mem: PathBuf::from(SNAPSHOT_MEM_INSIDE),
    }
}

impl JailConfig {
    /// Removes what the jail of `jail` left behind when its jailer could not clean up (it was
    /// killed): ends any process still in the VM's cgroup, removes the cgroup and the jail folder
    /// `<jail_base>/<id>`. Call only once the jailer has exited; a jail cleaned up by its jailer
    /// leaves nothing to do (two checks for folders that are gone).
    pub fn clean_up(&self, jail: &VmJail) -> Result<(), LaunchError> {
        if let Some(cgroup) =
            JailCgroup::leftover(&self.cgroup_parent, &jail.id, self.cgroup_version)?
        {
            tracing::warn!(id = %jail.id, dirs = ?cgroup.dirs(), "removing the cgroup of a jail whose jailer is gone");
            cgroup.kill_all()?;
            cgroup.remove()?;
        }
        let folder = self.jail_base.join(&jail.id);
        match std::fs::remove_dir_all(&folder) {
            Ok(()) => {
                tracing::warn!(folder = %folder.display(), "removed the folder of a jail whose jailer is gone");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &folder)(e)),
        }
    }
}

/// One VM's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmJail {
    /// The VM id (names the jail folder and the cgroup).
    pub id: String,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// The jail root on this host: `<jail_base>/<id>/root`.
    pub root: PathBuf,
    /// The cgroup's memory limit, MiB.
    pub memory_limit_mib: u64,
    /// The cgroup's CPU quota per period, microseconds (`None`: unlimited).
    pub cpu_quota_us: Option<u64>,
    /// RLIMIT_FSIZE, bytes (`None`: unlimited).
    pub rlimit_fsize: Option<u64>,
    /// Descriptors passed to the VMM besides 0, 1 and 2 (they must not be close-on-exec here).
    pub keep_fds: Vec<RawFd>,
}

impl VmJail {
    /// Where `inside` (a path inside the jail) lies on this host.
    pub fn host_path(&self, inside: &Path) -> PathBuf {
        self.root.join(inside.strip_prefix("/").unwrap_or(inside))
    }

    /// Hands a file the agent made in the jail (a listening socket) to the VM's uid/gid.
    pub fn give(&self, host_path: &Path) -> Result<(), LaunchError> {
        std::os::unix::fs::chown(host_path, Some(self.uid), Some(self.gid))
            .map_err(io("chown", host_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_every_limit_and_file() {
        let jc = JailConfig::new(PathBuf::from("/usr/bin/hearth"));
        let mut config = VmConfig::new("/k/vmlinux");
        config.mem_mib = 256;
        config.vcpus = 2;
        let mut jail = jc.jail_for("vm-1", &config).unwrap();
        jail.keep_fds.push(7);
        assert!(jail.uid >= UID_BASE && jail.uid == jail.gid);
        assert_eq!(jail.memory_limit_mib, 256 + VMM_OVERHEAD_MIB);
        assert_eq!(jail.cpu_quota_us, Some(200_000));
        assert_eq!(jail.root, Path::new("/srv/hearth/jail/vm-1/root"));
        assert_eq!(
            jail.host_path(Path::new("/control.sock")),
            Path::new("/srv/hearth/jail/vm-1/root/control.sock")
        );
        let args: Vec<String> = jc
            .jail_args(
                &jail,
                Some(Path::new("/k/vmlinux")),
                None,
                None,
                Some(Path::new("/t/.build-x")),
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for needle in [
            "jail --id vm-1 --jail-base /srv/hearth/jail",
            "--kernel /k/vmlinux",
            "--exec-file /usr/bin/hearth",
            "--memory-limit-mib 384",
            "--cpu-quota-us 200000",
            "--rlimit-nofile 2048",
            "--keep-fd 7",
            "--output-dir /t/.build-x",
        ] {
            assert!(joined.contains(needle), "{needle:?} not in {joined}");
        }
        assert_eq!(args.last().map(String::as_str), Some("--"));
        assert!(!joined.contains("--initrd"));
    }

    #[test]
    fn bad_ids_are_refused_before_anything_is_made() {
        let jc = JailConfig::new(PathBuf::from("/usr/bin/hearth"));
        assert!(matches!(
            jc.jail_for("../x", &VmConfig::new("/k")),
            Err(LaunchError::Id(_))
        ));
    }
}
