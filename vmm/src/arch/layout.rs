//! The guest-physical address map.

/// GDT (4 entries).
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty, limit 7).
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories (one per identity-mapped GiB).
pub const PD_ADDR: u64 = 0xb000;
/// GiB identity-mapped by the boot page tables.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Most bytes of command line, including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Top of the conventional memory below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables start here (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// The end of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded (1 MiB).
pub const KERNEL_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole (3 GiB); RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio windows start here, one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio devices.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// The serial port's GSI.
pub const SERIAL_GSI: u32 = 4;
/// IOAPIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (needed on Intel; three pages below the IOAPIC).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// The ACPI sleep/reset register port (HW-reduced ACPI).
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// Value written to [`ACPI_SLEEP_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
