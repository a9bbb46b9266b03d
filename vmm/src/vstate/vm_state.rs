//! The saved state of the KVM VM beside the vCPUs: the in-kernel irqchip (PIC master and slave,
//! IOAPIC), the PIT and the KVM clock, with the host TSC at the moment the clock was read (so a
//! restore can keep each vCPU's TSC in step with the clock: see `vcpu_state`).

use super::vm::Vm;
use kvm_bindings::{
    KVM_CLOCK_HOST_TSC, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2,
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
    /// The host TSC when `clock` was read.
    pub clock_host_tsc: u64,
}

/// The host's TSC, read here.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter and touches no memory; every x86-64 CPU has it.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
}

/// The KVM clock and the host TSC at that moment: KVM's own reading where it gives one
/// (`KVM_CLOCK_HOST_TSC`, when it runs the VM on a master clock), else one taken right after.
fn clock_and_host_tsc(vm: &Vm) -> Result<(kvm_clock_data, u64), VmStateError> {
    let clock = vm
        .fd()
        .get_clock()
        .map_err(|e| VmStateError::Ioctl("KVM_GET_CLOCK", e))?;
    let tsc = if clock.flags & KVM_CLOCK_HOST_TSC != 0 {
        clock.host_tsc
    } else {
        rdtsc()
    };
    Ok((clock, tsc))
}

/// What to add to a vCPU's saved TSC offset so that its TSC keeps the relation to kvmclock it had
/// at the save: `guest TSC - kvmclock * f` is the same for the saved pair (`saved_ns` kvmclock,
/// `saved_tsc` host TSC) and the pair read after the clock was set (`now_ns`, `now_tsc`), `f` the
/// guest TSC's frequency (`tsc_khz`). `None` when it does not fit (a TSC from another epoch).
pub fn tsc_shift(
    saved_ns: u64,
    saved_tsc: u64,
    now_ns: u64,
    now_tsc: u64,
    tsc_khz: u32,
) -> Option<i64> {
    let host = i128::from(saved_tsc) - i128::from(now_tsc);
    let clock = i128::from(saved_ns) - i128::from(now_ns);
    i64::try_from(host - clock * i128::from(tsc_khz) / 1_000_000).ok()
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
        let (clock, clock_host_tsc) = clock_and_host_tsc(vm)?;
        Ok(VmKvmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .fd()
                .get_pit2()
                .map_err(|e| VmStateError::Ioctl("KVM_GET_PIT2", e))?,
            clock,
            clock_host_tsc,
        })
    }

    /// Sets the KVM clock of `vm` to the saved value, before its vCPUs are restored; returns what
    /// to add to each vCPU's saved TSC offset ([`tsc_shift`]) for a guest TSC of `tsc_khz`.
    pub fn restore_clock(&self, vm: &Vm, tsc_khz: u32) -> Result<Option<i64>, VmStateError> {
        // Only the clock value is restored; flags describe the source host's clock.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.fd()
            .set_clock(&clock)
            .map_err(|e| VmStateError::Ioctl("KVM_SET_CLOCK", e))?;
        let (now, now_tsc) = clock_and_host_tsc(vm)?;
        Ok(tsc_shift(
            self.clock.clock,
            self.clock_host_tsc,
            now.clock,
            now_tsc,
            tsc_khz,
        ))
    }

    /// Puts the irqchip and PIT state into `vm` (after its vCPUs are restored).
    pub fn restore_chips(&self, vm: &Vm) -> Result<(), VmStateError> {
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
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip)
                .map_err(|e| VmStateError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::tsc_shift;

    #[test]
    fn tsc_shift_keeps_tsc_minus_clock() {
        // 1 GHz guest TSC (1 cycle per ns). Saved: kvmclock 5_000 at host TSC 100_000. After the
        // clock was set to 5_000, read again 20 ns later at host TSC 900_020: kvmclock 5_020.
        let shift = tsc_shift(5_000, 100_000, 5_020, 900_020, 1_000_000).unwrap();
        // A guest TSC of host + offset + shift at host 900_020 must be 20 cycles past what it was
        // at host 100_000.
        let offset = 42i64;
        assert_eq!(900_020 + offset + shift, 100_000 + offset + 20);
        // The same host: only the clock's own progress counts.
        assert_eq!(tsc_shift(1_000, 50, 1_000, 50, 2_500_000), Some(0));
        assert_eq!(tsc_shift(0, u64::MAX, u64::MAX, 0, u32::MAX), None);
    }
}
