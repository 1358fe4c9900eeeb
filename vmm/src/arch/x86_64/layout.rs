//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00  RAM (boot structures below, then free low memory)
//! 0x0009_fc00 .. 0x0010_0000  EBDA / legacy ROM area (reserved; ACPI tables at 0xe0000)
//! 0x0010_0000 .. RAM_32_END   RAM (kernel at 1 MiB, initramfs at the top)
//! 0xc000_0000 .. 0xe000_0000  PCI 32-bit MMIO window (BARs)
//! 0xe000_0000 .. 0xf000_0000  PCI ECAM (MCFG), 256 buses
//! 0xf000_0000 .. 0xfec0_0000  platform MMIO devices
//! 0xfec0_0000                 IOAPIC
//! 0xfed9_0000 .. +0x1000      reserved for the VT-d register block (DMAR DRHD)
//! 0xfee0_0000                 LAPIC
//! 0xff00_0000 .. +0x1_0000    pc-testdev's memory-like MMIO area (kvm-unit-tests' "ioram")
//! 4 GiB ..                    RAM above the hole, then the PCI 64-bit MMIO window
//! ```

/// Boot GDT. The Linux 64-bit boot protocol wants __BOOT_CS at selector 0x10 and __BOOT_DS at
/// 0x18 (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: one PML4, one PDPT, four PDs (0xb000..0xf000) of 2 MiB pages
/// identity-mapping 4 GiB.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass (boot protocol 2.06+ reads cmdline_size).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the Extended BIOS Data Area: conventional memory ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// RSDP: Linux also scans 0xe0000..0x100000 for it (ACPI 6.4, 5.2.5.1), besides reading
/// boot_params.acpi_rsdp_addr.
pub const RSDP_START: u64 = 0xe0000;
/// End of the area for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// The real-mode reset vector F000:FFF0 (Intel SDM Vol. 3A, 9.1.4). There is no BIOS: a
/// small stub there resets the VM (see `boot::write_reset_stub`).
pub const RESET_VECTOR: u64 = 0xffff0;
/// The kernel's protected-mode code is loaded here (boot protocol code32_start default).
pub const HIMEM_START: u64 = 0x10_0000;

/// End of RAM below 4 GiB: the 32-bit MMIO hole starts here.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// PCI 32-bit MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (PCI Express Base 4.0, 7.2.2): 1 MiB per bus.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size for buses 0..=255.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Platform MMIO devices of ours (not PCI).
pub const PLATFORM_MMIO_START: u64 = 0xf000_0000;
/// IOAPIC base (Intel 82093AA datasheet default; MADT IOAPIC entry).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The VT-d remapping unit's register block (the address QEMU's intel-iommu uses).
pub const VTD_REGS_START: u64 = 0xfed9_0000;
/// Size of the VT-d register page.
pub const VTD_REGS_SIZE: u64 = 0x1000;
/// Local APIC base (Intel SDM Vol. 3A, 11.4.1, IA32_APIC_BASE default).
pub const APIC_START: u64 = 0xfee0_0000;
/// pc-testdev's MMIO area, where QEMU's PC has it (hw/misc/pc-testdev.c; kvm-unit-tests'
/// `IORAM_BASE_PHYS`), and its size.
pub const PC_TESTDEV_IOMEM_START: u64 = 0xff00_0000;
pub const PC_TESTDEV_IOMEM_SIZE: u64 = 0x1_0000;
/// Start of RAM above the hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the PCI 64-bit MMIO window placed after RAM.
pub const PCI_MMIO64_SIZE: u64 = 0x4_0000_0000;

/// First I/O port handed to PCI I/O BARs (below are legacy devices).
pub const PCI_IO_START: u16 = 0x1000;
/// Size of the PCI I/O window.
pub const PCI_IO_SIZE: u16 = 0xf000;

/// The smallest guest we accept: kernel, initramfs and boot structures need room.
pub const MIN_MEMORY_SIZE: u64 = 32 << 20;

/// TSS and identity map pages KVM needs on Intel (KVM_SET_TSS_ADDR): three pages just below
/// the BIOS area, inside the MMIO hole, as Firecracker does.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Start of the 64-bit PCI window for a guest with `ram_size` bytes of RAM: after the RAM above
/// 4 GiB, aligned to 1 GiB.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    let high = ram_size.saturating_sub(MEM_32BIT_GAP_START);
    (RAM_64BIT_START + high).next_multiple_of(1 << 30)
}

/// The RAM regions, as (guest address, size): below the hole, and above 4 GiB if any is left.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    let low = ram_size.min(MEM_32BIT_GAP_START);
    let mut regions = vec![(0, low)];
    if ram_size > low {
        regions.push((RAM_64BIT_START, ram_size - low));
    }
    regions
}

// The windows must not overlap the fixed devices; checked at compile time.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= PLATFORM_MMIO_START);
const _: () = assert!(PLATFORM_MMIO_START < IOAPIC_START && IOAPIC_START < VTD_REGS_START);
const _: () = assert!(VTD_REGS_START + VTD_REGS_SIZE <= APIC_START);
const _: () = assert!(APIC_START + 0x1000 <= PC_TESTDEV_IOMEM_START);
const _: () = assert!(PC_TESTDEV_IOMEM_START + PC_TESTDEV_IOMEM_SIZE <= KVM_TSS_ADDRESS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)]
        );
        assert_eq!(pci_mmio64_start(256 << 20), 0x1_0000_0000);
        assert_eq!(pci_mmio64_start(4 << 30), 0x1_4000_0000);
    }
}
