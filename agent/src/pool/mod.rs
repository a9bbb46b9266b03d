//! Pools of restored microVMs: what makes a microVM cold start fast. Lambda keeps empty VMs per
//! memory size ready and hands out the smallest that fits; so does this module.
//!
//! - [`template`]: per (guest kernel, initramfs, memory size, vCPUs), a VM booted once, paused
//!   at the init's `Ready` and snapshotted into a folder keyed by a digest of those inputs;
//!   rebuilt (the stale folder replaced) when an input changes.
//! - [`vm`]: one pooled VM, restored from a template in its own `hearth vmm` process (spawned
//!   ahead of the restore with `--await-restore`, then sent a `Restore`: [`AheadVm`]), paused once
//!   its init has answered after the restore (on a control connection opened right after the
//!   start, with its first request in the same write; the init's re-announced `Ready` is not
//!   waited for); resumed and refreshed (identity, entropy, clock) on that connection when
//!   claimed.
//! - [`pools`]: a pool per memory size ([`DEFAULT_SIZES`] by default), refilled in the background
//!   at a bounded rate, each keeping one VMM spawned ahead for its next refill;
//!   [`PoolSet::claim`] takes the smallest size that fits within a timeout.
//! - [`guest`]: the blocking host side of the init's ready connection and control port (a
//!   connection is retried, briefly, when a guest turns it away right after its restore).
//!
//! The microVM sandbox starts from a claimed VM when its configuration carries a [`PoolSet`]
//! (`MicrovmConfig::pool`), then injects the function's code as for a booted VM.
//!
//! Relies on: `hearth_vmm::VmmProcess` (spawn, spawn ahead, restore, pause, resume, snapshot),
//! the jail ([`crate::jail`]: `JailConfig::spawn_awaiting_restore` with the
//! template's snapshot files, `clean_up`) and the init's control protocol (`Ping`, `Refresh`). Must not touch: function code (the sandbox injects it
//! after a claim) or the snapshot files' format (`hearth-snapshot`'s).
//!
//! Figures (inside the QEMU TCG test host, 1 vCPU, debug `hearth` binary, this 2-core machine
//! shared with other builds; `cargo nextest run -p hearth-agent --test pool --no-capture`,
//! 2026-11-28), so compare ratios rather than absolute times:
//! - a 128 MiB template: built (boot to `Ready`, ping, pause, snapshot) in 13 s, 29 s when the
//!   53 MB kernel is hashed for the first time; found again in 3-8 ms; its memory file is 128 MiB
//!   long with 52 MiB allocated.
//! - a restore to a paused VM whose init answered: 2.0-2.6 s; a claim that waits for that
//!   refill, 2.0-5.7 s. With the VMM spawned ahead (2026-11-29, same test): a claim that waits
//!   for the refill 866 ms; spawn and restore in a row 581 ms, jailed 1352 ms.
//! - an idle pooled 128 MiB VM: RSS 30.4 MB (guest RAM 14.9 MB, the VMM's own 15.5 MB), PSS
//!   24 MB when the VMM's text is shared with a second VM (29.5 MB alone).
//! - a claim from a full pool (check, resume, the init's answer, refresh): 79-200 ms (resume
//!   11-26 ms, answer 32-113 ms, refresh with clock correction 35-93 ms); up to 0.4-0.9 s in
//!   runs where the machine was busier.
//! - the echo function's cold start, A/B in the same test-host run, three runs: through a
//!   claimed 256 MiB VM 12.4 / 22.3 / 16.4 s to the response (init 10.5 / 18.7 / 13.0 s),
//!   against 14.0 / 15.3 / 18.5 s in a booted VM (init 6.6 / 5.7 / 10.4 s). The restored VM's
//!   VMM takes about 3,400 page faults and 2.9-5.1 s of system CPU in that time, the booted
//!   one's 1,260 and 1.5-1.8 s: a restored VM's RAM is a private file mapping faulted in 4 KiB
//!   pages (copy on write) where a booted VM's anonymous RAM gets huge pages, which nested TCG
//!   makes costly; the refill of the claimed VM's place (a restore) also runs meanwhile on the
//!   test host's one CPU. The guest console shows no clock or watchdog complaint after a
//!   restore. The runs vary by tens of percent with the machine's load: measure on hardware
//!   KVM before drawing conclusions.

pub mod guest;
pub mod pools;
pub mod template;
pub mod vm;

pub use pools::{
    ClaimedVm, DEFAULT_SIZES, IdleVm, PoolConfig, PoolError, PoolSet, PoolSize, PoolStats,
};
pub use template::{Template, TemplateError, TemplateSpec};
pub use vm::{Activated, AheadVm, ClaimedParts, PooledVm, PooledVmError, ReadyLink, VmHome};
