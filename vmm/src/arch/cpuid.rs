//! CPUID for each vCPU: KVM's supported set, normalized so the guest sees a KVM hypervisor, one
//! package of `count` single-thread cores, its own APIC id, and the TSC-deadline timer; and the
//! XCR0 each vCPU starts with, so that leaf 0xd's sizes match the state the guest enables.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_XSTATE: u32 = 0xd;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Normalizes `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `id` of `count`.
pub fn normalize(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(id);
    let count = u32::from(count.max(1));
    // Bits needed to number the cores in the package.
    let core_bits = 32 - (count - 1).leading_zeros();
    for e in cpuid.as_mut_slice().iter_mut() {
        normalize_entry(e, apic_id, count, core_bits, tsc_deadline);
    }
}

/// The XCR0 a vCPU boots with: every user state component (x87, SSE, AVX, ...) in `cpuid`'s
/// leaf 0xd.0 EDX:EAX; `None` without that leaf (no XSAVE).
///
/// KVM sizes leaf 0xd.0 EBX (the XSAVE area for the enabled components) from the vCPU's XCR0,
/// which is 1 (x87 only, 576 bytes) after reset, and resizes it when the guest's XSETBV exits to
/// KVM. Where XSETBV does not exit (nested SVM under QEMU TCG, the test host), the guest enables
/// x87|SSE|AVX but still reads 576: Linux then warns "XSAVE consistency problem: size 832 !=
/// kernel_size 576" and turns XSAVE (and with it AVX) off. Starting with the XCR0 the guest's
/// kernel will set makes the size right either way; XCR0 does nothing until the guest sets
/// CR4.OSXSAVE, and the guest's own XSETBV still decides what it enables.
pub fn boot_xcr0(cpuid: &CpuId) -> Option<u64> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_XSTATE && e.index == 0)
        .map(|e| (u64::from(e.edx) << 32) | u64::from(e.eax))
        .filter(|xcr0| xcr0 & 0x3 == 0x3)
}

fn normalize_entry(
    e: &mut kvm_cpuid_entry2,
    apic_id: u32,
    count: u32,
    core_bits: u32,
    tsc_deadline: bool,
) {
    match e.function {
        LEAF_FEATURES => {
            e.ebx = (e.ebx & 0x0000_ffff) | (count << 16) | (apic_id << 24);
            e.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    // Core level: `count` cores.
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_FEATURES => {
            if count > 1 {
                e.ecx |= AMD_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !AMD_ECX_CMP_LEGACY;
            }
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        LEAF_AMD_EXT_APIC => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff; // one thread per core, core id = APIC id
            e.ecx = 0; // node 0, one node
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0500_0800,
            ..Default::default()
        }
    }

    #[test]
    fn leaf_one_carries_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 1)]).unwrap();
        normalize(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        let topo = cpuid.as_slice()[1];
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 4, 3));
    }

    #[test]
    fn boot_xcr0_enables_every_supported_user_component() {
        // Leaf 0xd.0 as the test host's KVM reports it: x87|SSE|AVX, 832 bytes at most.
        let xstate = kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 0,
            eax: 0x7,
            ebx: 0x240,
            ecx: 0x340,
            ..Default::default()
        };
        let avx = kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 2,
            eax: 0x100,
            ebx: 0x240,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), avx, xstate]).unwrap();
        normalize(&mut cpuid, 0, 1, false);
        assert_eq!(boot_xcr0(&cpuid), Some(0x7));
        // The leaf itself is KVM's: it resizes EBX from the XCR0 it is given.
        assert_eq!(cpuid.as_slice()[2], xstate);
    }

    #[test]
    fn boot_xcr0_is_none_without_xsave() {
        let cpuid = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        assert_eq!(boot_xcr0(&cpuid), None);
    }
}
