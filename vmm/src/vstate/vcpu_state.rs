//! The saved state of one vCPU, as KVM reports it: general and special registers, XSAVE (FPU,
//! SSE, AVX...), XCRs, every MSR KVM lists that it can read, the local APIC, the MP state, pending
//! events, debug registers, the TSC frequency, and the CPUID the VMM gave it (which a restore
//! checks against what this host would give, instead of trusting it), and its TSC offset.
//!
//! `save` runs on the vCPU's own thread while it is paused; `restore` on a vCPU just created.
//!
//! The guest's TSC and its kvmclock must keep the relation they had when saved: Linux's
//! clocksource watchdog compares them every half second, and a skew of a few hundred microseconds
//! marks the TSC unstable (a printk, a clocksource switch in a kthread, sched_clock unstable: tens
//! of milliseconds of guest work in a nested VM, right when a restored clone should answer). The
//! MSR read of the TSC and the VM's clock read are apart by however long the vCPU threads took
//! to save, so the restore sets each vCPU's TSC offset from the saved offset and the clock's
//! (kvmclock, host TSC) pairs, as KVM's documentation of `KVM_VCPU_TSC_OFFSET` describes.

use kvm_bindings::{
    KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, KVMIO, Msrs, kvm_cpuid_entry2, kvm_debugregs,
    kvm_device_attr, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::ioctl_with_ref;

vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

/// The TSC deadline MSR: restored after the local APIC, which would otherwise disarm it.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

/// Saving or restoring a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU ioctl {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The MSR buffer could not be built.
    #[error("cannot build an MSR buffer of {0} entries")]
    MsrBuffer(usize),
    /// KVM refused to set an MSR from the snapshot.
    #[error("KVM refused MSR {0:#x} from the snapshot")]
    MsrRefused(u32),
    /// The snapshot's CPUID is not what this host gives a vCPU.
    #[error(
        "the snapshot was taken on a CPU this host does not match (CPUID leaf {function:#x} index {index:#x} differs)"
    )]
    CpuidMismatch {
        /// The first leaf that differs.
        function: u32,
        /// Its sub-leaf.
        index: u32,
    },
    /// The snapshot's CPUID has another number of entries.
    #[error("the snapshot's CPUID has {saved} entries; this host gives {host}")]
    CpuidCount {
        /// In the snapshot.
        saved: usize,
        /// On this host.
        host: usize,
    },
    /// The TSC runs at another frequency here and KVM cannot scale it.
    #[error(
        "the snapshot's TSC ran at {saved} kHz; this host's at {host} kHz and it cannot be scaled"
    )]
    TscFrequency {
        /// In the snapshot.
        saved: u32,
        /// Here.
        host: u32,
        /// Why scaling failed.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One CPUID entry (the fields of `kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// KVM's flags.
    pub flags: u32,
    /// Registers.
    pub eax: u32,
    /// Registers.
    pub ebx: u32,
    /// Registers.
    pub ecx: u32,
    /// Registers.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// The state of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuKvmState {
    /// The vCPU's index.
    pub id: u8,
    /// The CPUID it was given.
    pub cpuid: Vec<CpuidEntry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// MSRs: index and value.
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The guest TSC's frequency, kHz.
    pub tsc_khz: u32,
    /// The guest TSC minus the host's (`KVM_VCPU_TSC_OFFSET`), where KVM has it (Linux 5.16+).
    pub tsc_offset: Option<u64>,
}

fn tsc_offset_attr(addr: u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr,
    }
}

/// The vCPU's TSC offset, or `None` where KVM does not have the attribute.
pub fn tsc_offset(fd: &VcpuFd) -> Option<u64> {
    let mut offset = 0u64;
    let attr = tsc_offset_attr((&raw mut offset).expose_provenance() as u64);
    // SAFETY: KVM_GET_DEVICE_ATTR on a vCPU fd reads `attr` and writes one u64 at `attr.addr`,
    // a pointer to `offset` (mutable, alive for the call).
    let rc = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) };
    (rc == 0).then_some(offset)
}

/// Sets the vCPU's TSC offset.
pub fn set_tsc_offset(fd: &VcpuFd, offset: u64) -> Result<(), VcpuStateError> {
    let attr = tsc_offset_attr((&raw const offset).expose_provenance() as u64);
    // SAFETY: KVM_SET_DEVICE_ATTR on a vCPU fd reads `attr` and the u64 at `attr.addr`, which is
    // `offset`, alive for the call.
    let rc = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if rc != 0 {
        return Err(VcpuStateError::Ioctl(
            "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
            kvm_ioctls::Error::last(),
        ));
    }
    Ok(())
}

fn msr_buffer(indices: &[u32]) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrBuffer(indices.len()))
}

fn msr_entries(values: &[(u32, u64)]) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrBuffer(values.len()))
}

/// Reads every MSR of `indices` KVM can read (KVM stops at the first it cannot: that one is
/// skipped and the rest read on).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let mut buf = msr_buffer(chunk)?;
        let n = fd
            .get_msrs(&mut buf)
            .map_err(|e| VcpuStateError::Ioctl("KVM_GET_MSRS", e))?;
        out.extend(buf.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Entry n could not be read: skip it.
        let advance = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[advance..];
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, values: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for chunk in values.chunks(MSR_CHUNK) {
        let buf = msr_entries(chunk)?;
        let n = fd
            .set_msrs(&buf)
            .map_err(|e| VcpuStateError::Ioctl("KVM_SET_MSRS", e))?;
        if n < chunk.len() {
            return Err(VcpuStateError::MsrRefused(chunk[n].0));
        }
    }
    Ok(())
}

impl VcpuKvmState {
    /// Reads the state of the (paused) vCPU `fd`; `cpuid` is what it was given, `msr_indices`
    /// the MSRs KVM lists.
    pub fn save(
        id: u8,
        fd: &VcpuFd,
        cpuid: &[kvm_cpuid_entry2],
        msr_indices: &[u32],
    ) -> Result<Self, VcpuStateError> {
        let io = |what| move |e| VcpuStateError::Ioctl(what, e);
        Ok(VcpuKvmState {
            id,
            cpuid: cpuid.iter().map(CpuidEntry::from).collect(),
            // Events first: reading them settles what KVM would inject on the next entry.
            events: fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(io("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(io("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(io("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(io("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            tsc_khz: fd.get_tsc_khz().map_err(io("KVM_GET_TSC_KHZ"))?,
            tsc_offset: tsc_offset(fd),
        })
    }

    /// Checks the saved CPUID against `host` (what this host gives this vCPU).
    pub fn check_cpuid(&self, host: &[kvm_cpuid_entry2]) -> Result<(), VcpuStateError> {
        if host.len() != self.cpuid.len() {
            return Err(VcpuStateError::CpuidCount {
                saved: self.cpuid.len(),
                host: host.len(),
            });
        }
        for (saved, host) in self.cpuid.iter().zip(host) {
            if *saved != CpuidEntry::from(host) {
                return Err(VcpuStateError::CpuidMismatch {
                    function: saved.function,
                    index: saved.index,
                });
            }
        }
        Ok(())
    }

    /// Puts the state into a new vCPU whose CPUID is already set. `tsc_shift` (see
    /// [`super::vm_state::tsc_shift`]): what to add to the saved TSC offset so that the guest TSC
    /// keeps its relation to the (already restored) kvmclock; without it, or where the TSC is
    /// scaled here, the TSC is restored from the saved MSR value.
    pub fn restore(&self, fd: &VcpuFd, tsc_shift: Option<i64>) -> Result<(), VcpuStateError> {
        let io = |what| move |e| VcpuStateError::Ioctl(what, e);
        let host_khz = fd.get_tsc_khz().map_err(io("KVM_GET_TSC_KHZ"))?;
        let scaled = host_khz != self.tsc_khz;
        if scaled {
            fd.set_tsc_khz(self.tsc_khz)
                .map_err(|source| VcpuStateError::TscFrequency {
                    saved: self.tsc_khz,
                    host: host_khz,
                    source,
                })?;
        }
        fd.set_regs(&self.regs).map_err(io("KVM_SET_REGS"))?;
        // SAFETY: `xsave` is a whole `kvm_xsave` (the legacy 4 KiB area KVM_GET_XSAVE filled), so
        // KVM reads no further than the struct.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(io("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(io("KVM_SET_XCRS"))?;
        fd.set_sregs(&self.sregs).map_err(io("KVM_SET_SREGS"))?;
        let (deadline, others): (Vec<_>, Vec<_>) = self
            .msrs
            .iter()
            .partition(|(index, _)| *index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &others)?;
        // After the MSRs (IA32_TSC among them), before the deadline is armed against it.
        if let (Some(shift), Some(offset), false) = (tsc_shift, self.tsc_offset, scaled) {
            set_tsc_offset(fd, offset.wrapping_add_signed(shift))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(io("KVM_SET_MP_STATE"))?;
        fd.set_lapic(&self.lapic).map_err(io("KVM_SET_LAPIC"))?;
        write_msrs(fd, &deadline)?;
        fd.set_vcpu_events(&self.events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(io("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_check_names_the_first_difference() {
        let host = vec![
            kvm_cpuid_entry2 {
                function: 1,
                eax: 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ..Default::default()
            },
        ];
        let mut state = VcpuKvmState {
            id: 0,
            cpuid: host.iter().map(CpuidEntry::from).collect(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            msrs: vec![(0x10, 5)],
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            debugregs: Default::default(),
            tsc_khz: 1,
            tsc_offset: Some(7),
        };
        state.check_cpuid(&host).unwrap();
        state.cpuid[1].ebx = 1;
        assert!(matches!(
            state.check_cpuid(&host),
            Err(VcpuStateError::CpuidMismatch { function: 7, .. })
        ));
        state.cpuid.pop();
        assert!(matches!(
            state.check_cpuid(&host),
            Err(VcpuStateError::CpuidCount { saved: 1, host: 2 })
        ));
        // The state round-trips through postcard.
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: VcpuKvmState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.cpuid, state.cpuid);
        assert_eq!(back.tsc_offset, Some(7));
    }
}
