//! Initial register state: 64-bit long mode with our own GDT and identity page tables, as the
//! Linux 64-bit boot protocol requires; flat 32-bit protected mode without paging, as the
//! multiboot protocol requires; or plain real mode for small test guests.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors setting up boot structures in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory write failed.
    #[error("cannot write the boot {what} at guest address {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

// CR0/CR4/EFER bits (Intel SDM Vol. 3A, 2.5 and 2.2.1).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page table entry bits (Intel SDM Vol. 3A, 4.5): present, writable, page size (2 MiB leaf).
const PTE_P_RW: u64 = 0x3;
const PDE_PS: u64 = 0x80;
/// One page directory per identity-mapped GiB.
const BOOT_PD_PAGES: u64 = 4;

/// The boot GDT: null, 32-bit flat code (0x08, multiboot), __BOOT_CS (0x10, 64-bit code),
/// __BOOT_DS (0x18, flat data, also multiboot's), TSS (0x20). Access/flags words as in Linux's
/// arch/x86/boot/pm.c (0xa09b, 0xc093, 0x808b); 0xc09b is 0xa09b with D set instead of L.
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE32_INDEX: u16 = 1;
const CODE_INDEX: u16 = 2;
const DATA_INDEX: u16 = 3;
const TSS_INDEX: u16 = 4;

/// Encodes a segment descriptor (Intel SDM Vol. 3A, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// Decodes descriptor `entry` at GDT index `index` into KVM's segment form.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With G set, the limit counts 4 KiB units.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_u64(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: u64,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::Write { what, addr, source })
}

/// Writes the GDT, an empty IDT and identity page tables for the first 4 GiB (Linux needs
/// its image, zero page and command line mapped; small test guests also reach the MMIO hole).
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write_u64(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write_u64(mem, "IDT", BOOT_IDT_START, 0)?;
    write_u64(mem, "PML4", PML4_START, PDPTE_START | PTE_P_RW)?;
    for gib in 0..BOOT_PD_PAGES {
        let pd = PDE_START + gib * 0x1000;
        write_u64(mem, "PDPT", PDPTE_START + gib * 8, pd | PTE_P_RW)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            write_u64(mem, "PD", pd + i * 8, addr | PDE_PS | PTE_P_RW)?;
        }
    }
    Ok(())
}

/// Loads `code` into CS and `data` into every data segment register.
fn set_segments(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = data;
    }
}

/// Special registers for 64-bit long mode with the boot GDT and page tables, built on `base`
/// (the vCPU's current sregs, so KVM-owned fields such as the APIC base stay intact).
pub fn long_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *base;
    let code = segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    set_segments(&mut sregs, code, data);
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for the multiboot entry (Multiboot 0.6.96, 3.2): CS a 32-bit flat
/// execute/read segment, DS/ES/FS/GS/SS 32-bit flat read/write segments, CR0.PE set and PG clear,
/// no PAE or long mode. GDTR points at the boot GDT the selectors come from, though the kernel
/// may not rely on it.
pub fn protected_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *base;
    let code = segment_from_gdt(BOOT_GDT[CODE32_INDEX as usize], CODE32_INDEX);
    let data = segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    set_segments(&mut sregs, code, data);
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
    sregs.cr4 &= !X86_CR4_PAE;
    sregs.efer &= !(EFER_LME | EFER_LMA);
    sregs
}

/// Special registers for a vCPU leaving reset in real mode with CS = `cs_selector` (Intel SDM
/// Vol. 3A, 10.1.1, Table 10-1), as firmware hands over to an OS's S3 waking vector: every
/// segment a 64 KiB real-mode segment, descriptor tables at 0, paging, PAE and long mode off,
/// caches on. Built on `base` for the fields KVM owns; `apic_base` is the caller's to set.
pub fn reset_real_mode_sregs(base: &kvm_sregs, cs_selector: u16) -> kvm_sregs {
    let mut sregs = *base;
    let segment = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Types (SDM Vol. 3A, 3.4.5.1): 0xb code execute/read accessed, 0x3 data read/write
    // accessed; system types 0x2 LDT and 0xb busy TSS.
    set_segments(&mut sregs, segment(cs_selector, 0xb), segment(0, 0x3));
    sregs.ldt = kvm_segment {
        s: 0,
        type_: 0x2,
        ..segment(0, 0)
    };
    sregs.tr = kvm_segment {
        s: 0,
        type_: 0xb,
        ..segment(0, 0)
    };
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cr0 = X86_CR0_ET;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.cr8 = 0;
    sregs.efer = 0;
    sregs
}

/// Special registers for flat real mode: code and data at segment 0.
pub fn real_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut sregs = *base;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    sregs
}

/// General registers for the Linux 64-bit entry: RSI points at the zero page.
pub fn linux_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and reads as 1 (Intel SDM Vol. 1, 3.4.3)
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// General registers for a 32-bit protected-mode entry at `eip` with `eax` and `ebx` set (the
/// multiboot magic and information address); EFLAGS with IF clear.
pub fn protected_mode_regs(eip: u32, eax: u32, ebx: u32) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and reads as 1 (Intel SDM Vol. 1, 3.4.3)
        rip: u64::from(eip),
        rax: u64::from(eax),
        rbx: u64::from(ebx),
        ..Default::default()
    }
}

/// Initial FPU state: x87 control word and MXCSR at their reset values (Intel SDM Vol. 1,
/// 8.1.5 and 10.2.3.1).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let cs = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(cs.selector, 0x10);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(ds.selector, 0x18);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let cs32 = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs32.selector, 0x08);
        assert_eq!(
            (cs32.l, cs32.db, cs32.g, cs32.present, cs32.s),
            (0, 1, 1, 1, 1)
        );
        assert_eq!((cs32.type_, cs32.base, cs32.limit), (0xb, 0, 0xffff_ffff));
    }

    #[test]
    fn reset_real_mode_leaves_long_mode_behind() {
        let base = long_mode_sregs(&kvm_sregs::default());
        // ACPI's waking vector 0x1000: CS 0x100, IP 0.
        let s = reset_real_mode_sregs(&base, 0x100);
        assert_eq!(
            (s.cs.selector, s.cs.base, s.cs.limit),
            (0x100, 0x1000, 0xffff)
        );
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_), (0, 0, 0xb));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.selector, seg.base, seg.limit, seg.type_),
                (0, 0, 0xffff, 3)
            );
        }
        assert_eq!((s.tr.s, s.tr.type_, s.tr.present), (0, 0xb, 1));
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (X86_CR0_ET, 0, 0, 0));
        assert_eq!(s.idt.base, 0);
    }

    #[test]
    fn protected_mode_is_flat_32_bit_without_paging() {
        let base = long_mode_sregs(&kvm_sregs::default());
        let s = protected_mode_sregs(&base);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x08, 1, 0));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.selector, seg.db, seg.base, seg.limit),
                (0x18, 1, 0, 0xffff_ffff)
            );
        }
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), 0);
        let r = protected_mode_regs(0x40_00bc, 0x2bad_b002, 0x9000);
        assert_eq!(
            (r.rip, r.rax, r.rbx, r.rflags),
            (0x40_00bc, 0x2bad_b002, 0x9000, 2)
        );
    }

    #[test]
    fn page_tables_identity_map_first_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        let top: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(top, 0xffe0_0000 | 0x83);
        let sregs = long_mode_sregs(&kvm_sregs::default());
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
    }
}
