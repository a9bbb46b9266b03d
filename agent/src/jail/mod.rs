//! The jail for `hearth vmm` processes, after Firecracker's jailer: `hearth jail` ([`run()`]) runs
//! as root, checks the files it is given ([`paths`]), puts the VMM in a per-VM cgroup limiting
//! memory and CPU ([`cgroup`]), in new mount, pid, network, IPC and UTS namespaces, `pivot_root`ed
//! into `<jail_base>/<id>/root` holding only its files, the shared libraries of `hearth`
//! ([`libs`]) and its device nodes ([`mounts`]), with
//! resource limits, only the descriptors it is handed, an empty environment and an unprivileged
//! uid/gid ([`limits`]), and execs `hearth vmm` there. The agent builds that command line and
//! spawns the jailed VMM with [`launch`], for booted microVMs, template VMs and VMs restored into
//! the pools alike (a restore gets the snapshot's state and memory files mounted read-only; a
//! pool's VMM spawned ahead of its restore, `--await-restore`, gets them mounted at its spawn; a
//! template VM gets its build folder, which its uid owns, mounted read-write at `/out` for its
//! snapshot).
//!
//! A jailed VMM cannot read `/sys`, so it cannot tell hardware KVM from PVM by itself: on a PVM
//! host it builds its VM (which PVM allows) and fails only when the guest runs.

pub mod cgroup;
pub mod launch;
pub mod libs;
pub mod limits;
pub mod mounts;
pub mod paths;
pub mod run;

pub use launch::{JailConfig, LaunchError, UID_BASE, VmJail, output_inside, snapshot_inside};
pub use run::{DEFAULT_JAIL_BASE, JailArgs, run};
