//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC ID and the VM's topology
//! (one socket, `n` cores, one thread each) filled in, for any number of vCPUs KVM allows: the
//! 8-bit fields of the legacy leaves saturate, and the extended topology leaves (0xb, 0x1f,
//! AMD's 0x8000_001e) carry the full 32-bit x2APIC ID a guest with more than 255 vCPUs needs.

use kvm_bindings::kvm_cpuid_entry2;

// Leaf 1 (Intel SDM Vol. 2A, CPUID): EBX[31:24] initial APIC ID, EBX[23:16] max logical
// processor IDs per package; EDX[28] HTT; ECX[21] x2APIC; ECX[31] hypervisor present (reserved
// for VMMs).
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_COUNT_SHIFT: u32 = 16;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 0xb / 0x1f: extended topology; ECX[15:8] level type (1 = SMT, 2 = core), EBX[15:0]
// logical processors at the level, EDX the x2APIC ID.
const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;
const TOPO_EBX_COUNT_MASK: u32 = 0xffff;
// Leaf 4: EAX[31:26] max core IDs per package minus one.
const LEAF4_CORES_SHIFT: u32 = 26;
const LEAF4_CORES_MAX: u32 = 0x3f;
// AMD leaf 0x8000_0008 ECX (AMD APM Vol. 3, E.4.7): [7:0] NC, cores per package minus one;
// [15:12] ApicIdSize, the APIC ID bits that number the cores (which Linux prefers to NC).
const AMD_NC_MASK: u32 = 0xff;
const AMD_APIC_ID_SIZE_SHIFT: u32 = 12;
const AMD_APIC_ID_SIZE_MASK: u32 = 0xf << AMD_APIC_ID_SIZE_SHIFT;
// AMD leaf 0x8000_001e (AMD APM Vol. 3, E.4.15): EAX the extended APIC ID; EBX[7:0] core ID,
// [15:8] threads per core minus one; ECX[7:0] node ID, [10:8] nodes per processor minus one.
const AMD_CORE_ID_MASK: u32 = 0xff;

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for the vCPU with APIC ID `apic_id` of
/// `cpu_count`; `x2apic` offers x2APIC mode (KVM emulates it with its in-kernel local APIC).
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], apic_id: u32, cpu_count: u32, x2apic: bool) {
    let count = cpu_count.max(1);
    // Bits needed to number the cores: the core level's x2APIC ID shift.
    let core_shift = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // 8-bit fields: the low byte of the APIC ID, as hardware reports it.
                e.ebx = (e.ebx & 0x0000_ffff)
                    | ((apic_id & 0xff) << LEAF1_EBX_APIC_ID_SHIFT)
                    | (count.min(0xff) << LEAF1_EBX_COUNT_SHIFT);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if x2apic {
                    e.ecx |= LEAF1_ECX_X2APIC;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cache leaves: keep the cache description, state our core count.
                e.eax = (e.eax & !(LEAF4_CORES_MAX << LEAF4_CORES_SHIFT))
                    | ((count - 1).min(LEAF4_CORES_MAX) << LEAF4_CORES_SHIFT);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core: SMT shift 0
                        e.ebx = 1;
                        e.ecx = (TOPO_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count & TOPO_EBX_COUNT_MASK;
                        e.ecx = (TOPO_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0: invalid, ends enumeration
                    }
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !(AMD_NC_MASK | AMD_APIC_ID_SIZE_MASK))
                    | (count - 1).min(AMD_NC_MASK)
                    | (core_shift << AMD_APIC_ID_SIZE_SHIFT);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = apic_id & AMD_CORE_ID_MASK; // one thread per core
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xabcd,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
        ];
        patch_cpuid(&mut e, 3, 4, true);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xabcd);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_X2APIC, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx >> 8), (3, 1, 1));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
        assert_eq!(e[3].ecx >> 8, 0);
        assert_eq!(e[4].eax >> 26, 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![entry(1, 0), entry(0x8000_0008, 0)];
        patch_cpuid(&mut e, 0, 1, false);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[0].ecx & LEAF1_ECX_X2APIC, 0, "no local APIC in KVM");
        assert_eq!(e[1].ecx & 0xffff, 0);
    }

    #[test]
    fn beyond_255_vcpus_the_8_bit_fields_saturate_and_the_x2apic_id_is_whole() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x1f, 1),
            entry(4, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        e[5].ecx = 0xffff_0000;
        patch_cpuid(&mut e, 287, 288, true);
        assert_eq!(e[0].ebx >> 24, 287 & 0xff, "leaf 1: the ID's low byte");
        assert_eq!((e[0].ebx >> 16) & 0xff, 0xff, "leaf 1: the count saturates");
        assert_eq!(e[1].edx, 287, "leaf 0xb: the whole x2APIC ID");
        assert_eq!(
            (e[2].eax, e[2].ebx, e[2].edx),
            (9, 288, 287),
            "2^9 >= 288 cores"
        );
        assert_eq!((e[3].eax, e[3].ebx), (9, 288), "leaf 0x1f as 0xb");
        assert_eq!(e[4].eax >> 26, 0x3f, "leaf 4: saturates");
        assert_eq!(e[5].ecx & 0xff, 0xff, "AMD NC saturates");
        assert_eq!((e[5].ecx >> 12) & 0xf, 9, "AMD ApicIdSize numbers them all");
        assert_eq!(e[5].ecx >> 16, 0xffff, "the rest of ECX kept");
        assert_eq!(
            (e[6].eax, e[6].ebx & 0xff00),
            (287, 0),
            "AMD extended APIC ID"
        );
    }
}
