//! x86_64 specifics: the guest-physical layout, guest memory, loading the kernel (`elf_reader`:
//! reading an ELF kernel without its zero `SHT_NOBITS` bytes), the boot CPU state and CPUID.

pub mod boot;
pub mod cpuid;
pub mod elf_reader;
pub mod layout;
pub mod memory;
pub mod regs;
