//! The KVM VM: created with the in-kernel irqchip and PIT, guest memory registered, vCPUs created
//! with normalized CPUID and their boot state.

use crate::arch::memory::GuestMemory;
use crate::arch::{cpuid, layout, regs};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Setting up the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM ioctl {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// KVM lacks a capability Hearth needs.
    #[error("KVM lacks the capability {0:?}")]
    MissingCap(Cap),
    /// Setting a vCPU's boot state failed.
    #[error("cannot set up vCPU {0}")]
    Vcpu(u8, #[source] regs::RegsError),
    /// Restoring a vCPU's saved state failed.
    #[error("cannot restore vCPU {0}")]
    Restore(u8, #[source] super::vcpu_state::VcpuStateError),
}

/// A KVM VM with its irqchip, PIT and memory.
pub struct Vm {
    fd: VmFd,
    supported_cpuid: kvm_bindings::CpuId,
    tsc_deadline: bool,
    msr_indices: std::sync::Arc<Vec<u32>>,
}

impl Vm {
    /// Creates the VM and registers `mem`.
    pub fn new(mem: &GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in [
            Cap::Irqchip,
            Cap::Pit2,
            Cap::Irqfd,
            Cap::Ioeventfd,
            Cap::UserMemory,
            Cap::ExtCpuid,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_indices = std::sync::Arc::new(
            kvm.get_msr_index_list()
                .map_err(|e| VmError::Ioctl("KVM_GET_MSR_INDEX_LIST", e))?
                .as_slice()
                .to_vec(),
        );
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        fd.set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live anonymous mapping of `memory_size` bytes owned by `mem`,
            // which the VMM keeps alive (it is cloned into every user) for as long as the VM runs.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(Vm {
            fd,
            supported_cpuid,
            tsc_deadline,
            msr_indices,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates vCPU `id` of `count` with CPUID, registers and LAPIC set for the kernel at `entry`.
    pub fn create_vcpu(&self, id: u8, count: u8, entry: GuestAddress) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
        let cpuid = self.vcpu_cpuid(id, count);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
        if let Some(xcr0) = cpuid::boot_xcr0(&cpuid) {
            let mut xcrs = kvm_bindings::kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].value = xcr0;
            vcpu.set_xcrs(&xcrs)
                .map_err(|e| VmError::Ioctl("KVM_SET_XCRS", e))?;
        }
        regs::setup_vcpu(&vcpu, entry, id == 0).map_err(|e| VmError::Vcpu(id, e))?;
        Ok(vcpu)
    }

    /// The CPUID vCPU `id` of `count` gets on this host.
    pub fn vcpu_cpuid(&self, id: u8, count: u8) -> kvm_bindings::CpuId {
        let mut cpuid = self.supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, id, count, self.tsc_deadline);
        cpuid
    }

    /// The MSRs KVM lists for saving a vCPU.
    pub fn msr_indices(&self) -> &std::sync::Arc<Vec<u32>> {
        &self.msr_indices
    }

    /// Creates vCPU `id` of `count` from its saved state; the saved CPUID must be this host's.
    pub fn restore_vcpu(
        &self,
        count: u8,
        state: &super::vcpu_state::VcpuKvmState,
        tsc_shift: Option<i64>,
    ) -> Result<VcpuFd, VmError> {
        let id = state.id;
        let cpuid = self.vcpu_cpuid(id, count);
        state
            .check_cpuid(cpuid.as_slice())
            .map_err(|e| VmError::Restore(id, e))?;
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
        state
            .restore(&vcpu, tsc_shift)
            .map_err(|e| VmError::Restore(id, e))?;
        Ok(vcpu)
    }

    /// Delivers `evt` as an edge on `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))
    }

    /// Signals `evt` on a guest write of `datamatch` to `addr` (a virtio queue notification).
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmError::Ioctl("KVM_IOEVENTFD", e))
    }
}
