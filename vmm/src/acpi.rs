//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT): how the guest finds its vCPUs, the IOAPIC, the
//! serial port, the virtio-mmio devices and the sleep/reset register. The Debian cloud kernel
//! has no MP-table parser and no virtio-mmio command-line devices, so ACPI is the only way.

use crate::arch::layout::{
    ACPI_END, ACPI_RESET_VALUE, ACPI_SLEEP_PORT, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, SERIAL_GSI,
};
use crate::arch::memory::GuestMemory;
use acpi_tables::Aml;
use acpi_tables::aml::{
    self, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

const OEM_ID: [u8; 6] = *b"HEARTH";
const OEM_TABLE: [u8; 8] = *b"HEARTHVM";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// A virtio-mmio device as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt.
    pub gsi: u32,
}

/// The tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("the ACPI tables ({0} bytes) do not fit in their area")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
    /// A device window is outside 32-bit space.
    #[error("virtio-mmio window {0:#x} is above 4 GiB")]
    WindowAbove4G(u64),
}

/// The DSDT body: COM1, each virtio-mmio device, and `_S5_`.
pub fn dsdt_body(devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &0u8);
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&com1_io, &com1_irq]),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let mut names = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let base = u32::try_from(dev.base).map_err(|_| AcpiError::WindowAbove4G(dev.base))?;
        let size = u32::try_from(dev.size).map_err(|_| AcpiError::WindowAbove4G(dev.base))?;
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &(i as u32));
        let window = Memory32Fixed::new(true, base, size);
        let irq = Interrupt::new(true, true, false, false, dev.gsi);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&window, &irq]));
        names.push((format!("V{i:03X}"), hid, uid, crs));
    }
    let virtio: Vec<aml::Device> = names
        .iter()
        .map(|(path, hid, uid, crs)| aml::Device::new(Path::new(path), vec![hid, uid, crs]))
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);

    // S5 (soft off): SLP_TYP 5, written to the sleep control register.
    Name::new("_S5_".into(), &Package::new(vec![&5u8, &0u8, &0u8, &0u8])).to_aml_bytes(&mut body);
    Ok(body)
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Writes all tables from [`ACPI_START`]; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices)?);
    let dsdt_bytes = dsdt.as_slice().to_vec();

    let fadt_addr = align8(dsdt_addr + dsdt_bytes.len() as u64);
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = sleep_reg;
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"HEARTHVM").into();
    let mut fadt_bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut fadt_bytes);

    let madt_addr = align8(fadt_addr + fadt_bytes.len() as u64);
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(1, IOAPIC_ADDR, 0));
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);

    let xsdt_addr = align8(madt_addr + madt_bytes.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);
    for (addr, bytes) in [
        (rsdp_addr, &rsdp_bytes),
        (dsdt_addr, &dsdt_bytes),
        (fadt_addr, &fadt_bytes),
        (madt_addr, &madt_bytes),
        (xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::GuestWrite)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let mem = crate::arch::memory::create(128 << 20).unwrap();
        let devs = [MmioDeviceInfo {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        }];
        let rsdp = write_tables(&mem, 2, &devs).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(xsdt)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, 36 + 16);
        let mut whole = vec![0u8; len];
        mem.read_slice(&mut whole, GuestAddress(xsdt)).unwrap();
        assert!(checksum_ok(&whole));
        for i in 0..2 {
            let at = u64::from_le_bytes(whole[36 + 8 * i..44 + 8 * i].try_into().unwrap());
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(at)).unwrap();
            let l = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; l];
            mem.read_slice(&mut t, GuestAddress(at)).unwrap();
            assert!(checksum_ok(&t), "table {:?}", std::str::from_utf8(&h[..4]));
        }
    }

    #[test]
    fn dsdt_names_every_virtio_device() {
        let devs: Vec<_> = (0..3)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let body = dsdt_body(&devs).unwrap();
        let count = body.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 3);
        assert!(body.windows(4).any(|w| w == b"V002"));
    }
}
