//! KVM state: the VM (irqchip, PIT, memory slots, irqfds, ioeventfds) and the vCPU threads.

pub mod vcpu;
pub mod vm;
