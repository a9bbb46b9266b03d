//! x86_64 specifics: the guest-physical layout, guest memory, loading the kernel, the boot CPU
//! state and CPUID.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod regs;
