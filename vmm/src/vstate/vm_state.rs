//! The saved state of the KVM VM beside the vCPUs: the in-kernel irqchip (PIC master and slave,
//! IOAPIC), the PIT and the KVM clock.

use super::vm::Vm;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use serde::{Deserialize, Serialize};

/// Saving or restoring the VM's state failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("VM ioctl {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// An irqchip record is for another chip than its place says.
    #[error("the snapshot's irqchip record {0} is for chip {1}")]
    ChipId(&'static str, u32),
}

/// The VM-wide KVM state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &Vm, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.fd()
        .get_irqchip(&mut chip)
        .map_err(|e| VmStateError::Ioctl("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

impl VmKvmState {
    /// Reads the state of `vm` (its vCPUs paused).
    pub fn save(vm: &Vm) -> Result<Self, VmStateError> {
        Ok(VmKvmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .fd()
                .get_pit2()
                .map_err(|e| VmStateError::Ioctl("KVM_GET_PIT2", e))?,
            clock: vm
                .fd()
                .get_clock()
                .map_err(|e| VmStateError::Ioctl("KVM_GET_CLOCK", e))?,
        })
    }

    /// Puts the state into `vm` (after its vCPUs are restored).
    pub fn restore(&self, vm: &Vm) -> Result<(), VmStateError> {
        for (name, chip, id) in [
            ("PIC master", &self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            ("PIC slave", &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("IOAPIC", &self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(VmStateError::ChipId(name, chip.chip_id));
            }
        }
        let fd = vm.fd();
        fd.set_pit2(&self.pit)
            .map_err(|e| VmStateError::Ioctl("KVM_SET_PIT2", e))?;
        // Only the clock value is restored; flags describe the source host's clock.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock)
            .map_err(|e| VmStateError::Ioctl("KVM_SET_CLOCK", e))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip)
                .map_err(|e| VmStateError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
