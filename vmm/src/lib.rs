//! `hearth-vmm`: a minimal KVM virtual machine monitor for one Hearth microVM.
//!
//! Owns: guest memory, vCPU threads, the in-kernel irqchip and PIT, bzImage loading and boot
//! parameters, ACPI tables, the devices (8250 serial, i8042, virtio-mmio transport, virtio-vsock with
//! a Unix-socket backend), the saved state of each of those and snapshot/restore of the whole VM
//! (the file formats are `hearth-snapshot`'s), per-thread seccomp filters, the `hearth vmm` process (one VM a process)
//! and its control socket, and the Rust API the agent uses to start and control such processes.
//!
//! Relies on: `/dev/kvm` being hardware KVM (VMX/SVM), the rust-vmm crates, and a guest kernel and
//! initramfs handed to it by the caller.
//!
//! Must not touch: function code, the Lambda APIs, pools and scheduling (those belong to `agent`
//! and `snapshot`), or anything on the host beyond the paths and sockets it is given.
//!
//! Layout: `kvm` (what /dev/kvm is), `config` (the VM description), `arch` (x86_64 memory map,
//! boot protocol, CPU state, CPUID; guest memory: anonymous, a mapped snapshot, or for a template
//! VM a file mapped shared that its snapshot takes as the memory file without a copy), `acpi`, `devices` (buses, serial, legacy ports, virtio),
//! `vstate` (the KVM VM and the vCPU threads), `runtime` (the event loop and VM state machine),
//! `control` (the control protocol), `seccomp`, `filtered_thread` (the VMM's threads started
//! ahead of the VM, their filters installed), `builder` (config to VM), `persist` (a VM's saved
//! state and taking a snapshot; each component saves its own state beside it), `restore`
//! (snapshot to VM; the file mode can copy on write ahead the pages an earlier restore's guest
//! wrote), `uffd` (the userfaultfd restore mode: guest RAM served from the memory file
//! by a handler thread), `awaiting` (a VMM started ahead of its restore, `--await-restore`: the KVM
//! VM and vCPUs set up before the snapshot is named, then a `Restore` command on the control socket
//! restores it with the same checks), `cli` (`hearth vmm`),
//! `process` (the agent's handle on a `hearth vmm` child, and which executable it runs),
//! `build_id` (which sources an executable's VMM was built from),
//! `kvm_test` (running VM tests where hardware KVM is). `src/bin/hearth-vmm.rs` is the VMM as its
//! own small executable (`hearth vmm` without the rest of Hearth), built static and non-PIE by
//! the set-up; spawned VMMs run it where it is built.

pub mod acpi;
pub mod arch;
pub mod awaiting;
pub mod build_id;
pub mod builder;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod filtered_thread;
pub mod kvm;
pub mod kvm_test;
pub mod persist;
pub mod process;
pub mod ratelimit;
pub mod restore;
pub mod runtime;
pub mod seccomp;
pub mod uffd;
pub mod vsock;
pub mod vstate;

pub use config::{VmConfig, VsockConfig};
pub use control::VmState;
pub use process::{MemoryUsage, ProcessError, VmmProcess};
pub use restore::{RestoreMode, SnapshotFiles};
