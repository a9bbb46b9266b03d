//! `hearth-snapshot`: the files a Hearth microVM snapshot is made of.
//!
//! Owns: the state file format (`state_file`: magic, a format version of its own, a size cap, a
//! CRC-64 over the postcard-encoded state), the memory file (`memory_file`: guest RAM, sparse,
//! with a digest of its non-zero pages that is checked on the very descriptor the VMM then maps;
//! written without faulting in pages never touched, using `pagemap`: this process's page table
//! flags) and the working-set files (`working_set`: the pages a userfaultfd restore served, or a
//! file-mapped restore's guest wrote, checked, to prefetch on the next restore). Who may read them and whose files a restore accepts is
//! `access`: every file is created 0644 (restored by other users than its writer: the jailed
//! VMMs' own uids), and only files of this user or root, writable by nobody else, are read.
//! `backing`: guest RAM that is its own memory file (a template VM's RAM in a file on a tmpfs,
//! mapped shared): its snapshot digests it in place, punches holes for zero pages if asked and
//! renames it into place instead of writing a copy.
//! All are untrusted on the way in: every read is bounded and checked before anything is built
//! from it. Templates and pools of restored VMs are the agent's (`hearth_agent::pool`).
//!
//! Relies on: nothing of Hearth. `hearth-vmm` depends on this crate: it saves each component's
//! state beside the component and hands the whole to [`state_file`], and guest RAM to
//! [`memory_file`].
//!
//! Must not touch: function code or invokes (that is `agent`), KVM or devices (that is `vmm`).
#![forbid(unsafe_code)]

pub mod access;
pub mod backing;
pub mod memory_file;
pub mod pagemap;
pub mod state_file;
pub mod working_set;

pub use access::{AccessError, FILE_MODE};
pub use backing::AdoptStats;
pub use memory_file::{
    Checked, FileIdentity, MemoryFile, MemoryFileError, MemoryFileInfo, Region, WriteStats,
};
pub use state_file::{FORMAT_VERSION, MAX_STATE_FILE, StateFileError};
pub use working_set::{SetKind, WorkingSet, WorkingSetError};
