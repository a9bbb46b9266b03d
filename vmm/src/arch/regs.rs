//! The boot CPU state for the 64-bit Linux entry: identity page tables, GDT and IDT in guest
//! memory, general and segment registers, FPU, MSRs and the local APIC's LINT pins.

use super::layout::*;
use super::memory::GuestMemory;
use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Setting the boot CPU state failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing page tables or descriptor tables into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// A vCPU ioctl failed.
    #[error("vCPU ioctl {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    Msrs,
    /// KVM set fewer MSRs than asked.
    #[error("KVM set {0} of {1} MSRs")]
    MsrsPartial(usize, usize),
}

/// A GDT entry from flags, base and limit (the layout of the x86 segment descriptor).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    let granular = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first 4 GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|e| RegsError::GuestWrite("the GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| RegsError::GuestWrite("the IDT", e))?;
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(|e| RegsError::GuestWrite("the PML4", e))?;
    let mut pd = vec![0u8; 4096 * IDENTITY_MAPPED_GIB as usize];
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd_addr = PD_ADDR + gib * 4096;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(|e| RegsError::GuestWrite("the PDPT", e))?;
        for i in 0..512u64 {
            let entry = (((gib << 9) + i) << 21) | 0x83;
            let at = ((gib * 512 + i) * 8) as usize;
            pd[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        }
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(|e| RegsError::GuestWrite("the page directories", e))
}

/// Sets the registers of the boot CPU (or, for the others, only what KVM's reset leaves wrong).
pub fn setup_vcpu(vcpu: &VcpuFd, entry: GuestAddress, boot_cpu: bool) -> Result<(), RegsError> {
    setup_fpu(vcpu)?;
    setup_msrs(vcpu)?;
    setup_lint(vcpu)?;
    if boot_cpu {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| RegsError::Ioctl("KVM_SET_REGS", e))?;
        setup_sregs(vcpu)?;
    }
    Ok(())
}

fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Ioctl("KVM_GET_SREGS", e))?;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Ioctl("KVM_SET_SREGS", e))
}

fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Ioctl("KVM_SET_FPU", e))
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MSR_IA32_MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE | MTRR_TYPE_WRBACK,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs)?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Ioctl("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::MsrsPartial(set, entries.len()));
    }
    Ok(())
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], at: usize) -> u32 {
    u32::from_le_bytes([
        regs[at] as u8,
        regs[at + 1] as u8,
        regs[at + 2] as u8,
        regs[at + 3] as u8,
    ])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], at: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[at + i] = *b as std::os::raw::c_char;
    }
}

fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Ioctl("KVM_GET_LAPIC", e))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Ioctl("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_expected_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (code.selector, code.l, code.present, code.type_, code.limit),
            (8, 1, 1, 0xb, 0xffff_ffff)
        );
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (data.selector, data.db, data.type_, data.s),
            (0x10, 1, 3, 1)
        );
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = crate::arch::memory::create(128 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 4 * 4096 - 8)).unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }
}
