//! `hearth-snapshot`: save and restore of Hearth microVMs, and pools of restored VMs.
//!
//! Owns: the snapshot file format (state file and sparse memory file), restore into a fresh
//! `hearth vmm` process, templates per guest image and memory size, and pools of restored VMs.
//!
//! Relies on: `hearth-vmm` for the state of each component and for the VMM process.
//!
//! Must not touch: function code or invokes (that is `agent`).
#![forbid(unsafe_code)]
