//! KVM state: the VM (irqchip, PIT, memory slots, irqfds, ioeventfds) and the vCPU threads, and
//! the saved state of each (`vcpu_state`, `vm_state`) for snapshots.

pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
