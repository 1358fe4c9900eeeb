//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC ID and the VM's topology
//! (one socket, `n` cores, one thread each) filled in.

use kvm_bindings::kvm_cpuid_entry2;

// Leaf 1 (Intel SDM Vol. 2A, CPUID): EBX[31:24] initial APIC ID, EBX[23:16] max logical
// processor IDs per package; EDX[28] HTT; ECX[31] hypervisor present (reserved for VMMs).
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_COUNT_SHIFT: u32 = 16;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 0xb / 0x1f: extended topology; ECX[15:8] level type (1 = SMT, 2 = core).
const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;
// Leaf 4: EAX[31:26] max core IDs per package minus one.
const LEAF4_CORES_SHIFT: u32 = 26;
// AMD leaf 0x8000_0008 ECX[7:0] NC: cores per package minus one (AMD APM Vol. 3, E.4.7).
const AMD_NC_MASK: u32 = 0xff;

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `cpu_id` of `cpu_count`.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_id);
    let count = u32::from(cpu_count);
    // Bits needed to number the cores: the core level's x2APIC ID shift.
    let core_shift = 32 - (count.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                    | (count << LEAF1_EBX_COUNT_SHIFT);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cache leaves: keep the cache description, state our core count.
                e.eax = (e.eax & !(0x3f << LEAF4_CORES_SHIFT))
                    | ((count - 1).min(0x3f) << LEAF4_CORES_SHIFT);
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
                        e.ebx = count;
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
                e.ecx = (e.ecx & !AMD_NC_MASK) | (count - 1);
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
        patch_cpuid(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xabcd);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx >> 8), (3, 1, 1));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
        assert_eq!(e[3].ecx >> 8, 0);
        assert_eq!(e[4].eax >> 26, 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![entry(1, 0), entry(0x8000_0008, 0)];
        patch_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[1].ecx & 0xff, 0);
    }
}
