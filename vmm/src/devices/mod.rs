//! The devices a guest sees: the port-IO and MMIO buses, the 8250 serial console, the legacy
//! ports (i8042 reset, CMOS, the ACPI sleep register), and the virtio devices.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;
