//! A whole VM's saved state (what the state file holds: each component's state, saved beside
//! the component) and taking a snapshot of a paused VM: the vCPUs save themselves on their own
//! threads (`vstate::vcpu_state`), this module saves the rest and writes the state file and the
//! sparse memory file (`hearth_snapshot`). Restoring is `restore`.
//!
//! A template VM whose RAM is a file ([`crate::arch::memory::RamFile`]) writes no memory file:
//! its RAM file is digested in place and becomes the snapshot's memory file
//! ([`SnapshotParts::write_taking_ram_file`]); the VM may not run again after that.

use crate::arch::memory::{GuestMemory, RamFile};
use crate::devices::serial::{SerialDevice, SerialPersist};
use crate::devices::virtio::MmioTransport;
use crate::devices::virtio::persist::MmioTransportState;
use crate::devices::virtio::vsock::persist::VsockState;
use crate::devices::virtio::vsock::{Vsock, VsockUnixBackend};
use crate::vstate::vcpu_state::VcpuKvmState;
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::{VmKvmState, VmStateError};
use hearth_snapshot::{
    MemoryFileError, MemoryFileInfo, StateFileError, backing, memory_file, state_file,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Taking a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A vCPU could not be saved.
    #[error("cannot save vCPU {0}: {1}")]
    Vcpu(u8, String),
    /// The VM's KVM state could not be saved.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// The memory file could not be written.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// Guest RAM could not be remapped privately after its file became the memory file.
    #[error(transparent)]
    Remap(#[from] crate::arch::memory::MemoryError),
    /// A later snapshot of a VM whose RAM file already became a memory file, elsewhere.
    #[error(
        "this VM's RAM already became the memory file {0}: a later snapshot must name that file"
    )]
    RamFileGiven(std::path::PathBuf),
}

/// The vsock device and its transport, saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsockSnapshot {
    /// The virtio-mmio transport.
    pub transport: MmioTransportState,
    /// The device.
    pub device: VsockState,
}

/// Everything the state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmmState {
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// The memory file.
    pub memory: MemoryFileInfo,
    /// The VM's KVM state.
    pub vm: VmKvmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuKvmState>,
    /// The serial console.
    pub serial: SerialPersist,
    /// The vsock device, if the VM has one.
    pub vsock: Option<VsockSnapshot>,
}

/// Figures from taking a snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotStats {
    /// The state file's size, bytes.
    pub state_bytes: u64,
    /// Bytes of guest RAM written to the memory file (the rest are holes).
    pub memory_written: u64,
    /// Guest RAM, bytes.
    pub memory_size: u64,
    /// Milliseconds writing the memory file.
    pub memory_ms: f64,
    /// Whether the memory file is the VM's RAM file, taken in place (nothing written).
    pub memory_in_place: bool,
    /// Bytes of all-zero pages turned into holes in the RAM file.
    pub memory_punched: u64,
}

/// The vsock transport and device of a running VM.
pub type VsockParts = (
    Arc<Mutex<MmioTransport>>,
    Arc<Mutex<Vsock<VsockUnixBackend>>>,
);

/// The parts of a running VM a snapshot reads, shared with the event loop.
pub struct SnapshotParts {
    /// The KVM VM.
    pub vm: Arc<Vm>,
    /// Guest memory.
    pub mem: GuestMemory,
    /// The serial console.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The vsock transport and device.
    pub vsock: Option<VsockParts>,
}

/// Guest RAM as regions to write, in guest-address order: each a byte slice, with the memory file
/// it shows where it holds no private page (a restored VM's, mapped or served by userfaultfd).
///
/// The caller makes sure nothing writes guest memory while the slices live: the vCPUs are paused
/// and the devices run only on the calling (event-loop) thread.
fn guest_ram(mem: &GuestMemory) -> Vec<memory_file::Region<'_>> {
    mem.iter()
        .map(|region| memory_file::Region {
            // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`, which outlives
            // the returned slices (they borrow it); nothing writes it meanwhile (see above).
            bytes: unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) },
            backing: region.file_offset().map(|f| (f.file(), f.start())),
        })
        .collect()
}

impl SnapshotParts {
    /// Writes the snapshot of the paused VM whose vCPUs saved `vcpus`.
    pub fn write(
        &self,
        vcpus: Vec<VcpuKvmState>,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotStats, SnapshotError> {
        let saved = self.save_devices()?;
        let t = Instant::now();
        let written = memory_file::write_regions(mem_path, &guest_ram(&self.mem))?;
        let memory_ms = t.elapsed().as_secs_f64() * 1000.0;
        let state_bytes = saved.write(vcpus, written.info, state_path)?;
        Ok(SnapshotStats {
            state_bytes,
            memory_written: written.written_bytes,
            memory_size: written.info.size,
            memory_ms,
            memory_in_place: false,
            memory_punched: 0,
        })
    }

    /// [`SnapshotParts::write`] for a VM whose RAM is the file `ram`: that file becomes the
    /// memory file at `mem_path` (digested in place, renamed there), and guest RAM is mapped
    /// privately from then on. Where `mem_path` is on another file system, the memory file is
    /// written as for any VM and the RAM file stays the VM's.
    pub fn write_taking_ram_file(
        &self,
        vcpus: Vec<VcpuKvmState>,
        state_path: &Path,
        mem_path: &Path,
        ram: &mut RamFile,
    ) -> Result<SnapshotStats, SnapshotError> {
        if ram.given() && ram.path() != mem_path {
            return Err(SnapshotError::RamFileGiven(ram.path().to_path_buf()));
        }
        if !backing::can_move_to(ram.file(), mem_path) {
            tracing::warn!(
                ram_file = %ram.path().display(),
                memory_file = %mem_path.display(),
                "the memory file is on another file system than the RAM file: writing a copy"
            );
            return self.write(vcpus, state_path, mem_path);
        }
        let saved = self.save_devices()?;
        let t = Instant::now();
        let regions: Vec<&[u8]> = guest_ram(&self.mem).iter().map(|r| r.bytes).collect();
        if ram.given() {
            // Mapped privately since the last snapshot: it must still be the file, unchanged.
            backing::check_unchanged(&regions)?;
        }
        let adopted = backing::adopt(ram.file(), ram.path(), mem_path, &regions, ram.punch())?;
        drop(regions);
        ram.give(mem_path)?;
        let memory_ms = t.elapsed().as_secs_f64() * 1000.0;
        let state_bytes = saved.write(vcpus, adopted.info, state_path)?;
        Ok(SnapshotStats {
            state_bytes,
            memory_written: 0,
            memory_size: adopted.info.size,
            memory_ms,
            memory_in_place: true,
            memory_punched: adopted.punched_bytes,
        })
    }

    /// Saves the VM's KVM state and the devices (the vCPUs are saved on their own threads).
    fn save_devices(&self) -> Result<SavedDevices, SnapshotError> {
        let vm = VmKvmState::save(&self.vm)?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .save();
        let vsock = self
            .vsock
            .as_ref()
            .map(|(transport, device)| VsockSnapshot {
                transport: transport
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .save(),
                device: device.lock().unwrap_or_else(PoisonError::into_inner).save(),
            });
        Ok(SavedDevices { vm, serial, vsock })
    }
}

/// What [`SnapshotParts::save_devices`] saved, for the state file.
struct SavedDevices {
    vm: VmKvmState,
    serial: SerialPersist,
    vsock: Option<VsockSnapshot>,
}

impl SavedDevices {
    /// Writes the state file with `vcpus` and the memory file's record; returns its size.
    fn write(
        self,
        vcpus: Vec<VcpuKvmState>,
        memory: MemoryFileInfo,
        state_path: &Path,
    ) -> Result<u64, SnapshotError> {
        let state = VmmState {
            mem_bytes: memory.size,
            memory,
            vm: self.vm,
            vcpus,
            serial: self.serial,
            vsock: self.vsock,
        };
        Ok(state_file::write(state_path, &state)?)
    }
}
