//! Guest code programming our virtual VT-d's interrupt remapping and reading its fault records
//! (VT-d spec 9.10 for the IRTE, 11.4 for the registers), and what the host reads back.

use iced_x86::code_asm::{
    dword_ptr, eax, qword_ptr, rax, rcx, AsmRegister64, CodeAssembler, IcedError,
};
use viommu::regs::{
    FEADDR_REG, FECTL_REG, FEDATA_REG, FRCD_HI_F, FRCD_HI_FR_MASK, FRCD_HI_FR_SHIFT, FRCD_REG_BASE,
    FSTS_REG, GCMD_IRE, GCMD_REG, GCMD_SIRTP, GSTS_IRES, GSTS_IRTPS, GSTS_REG, IRTA_REG,
};
use vm_device::interrupt::MSI_ADDRESS_WINDOW;
use vm_memory::GuestMemoryMmap;

use super::read_u64;

/// An IRTE's source validation against a requester ID (SVT = 01b, 9.10) with SQ = 00b: all 16
/// bits of the requester ID compared.
pub const SVT_REQUESTER_ID: u64 = 1 << 18;

/// The IRTE (low, high) for fixed delivery of `vector` to APIC 0 (in xAPIC and x2APIC mode
/// alike), present, checked against requester `sid`.
pub fn irte(vector: u32, sid: u16) -> (u64, u64) {
    (
        1 | u64::from(vector) << 16,
        SVT_REQUESTER_ID | u64::from(sid),
    )
}

/// Emits the write of IRTE `(lo, hi)` at `index` of the table at `table`. Clobbers rax, rcx.
pub fn write_irte(
    a: &mut CodeAssembler,
    table: u64,
    index: u64,
    (lo, hi): (u64, u64),
) -> Result<(), IcedError> {
    a.mov(rcx, table + 16 * index)?;
    a.mov(rax, lo)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.mov(rax, hi)?;
    a.mov(qword_ptr(rcx + 8), rax)
}

/// Emits a GCMD write of `value` to the register block at `regs`, then waits for GSTS to show
/// `status`. Clobbers rax.
pub fn gcmd(
    a: &mut CodeAssembler,
    regs: AsmRegister64,
    value: u32,
    status: u32,
) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    a.mov(dword_ptr(regs + GCMD_REG as i32), value)?;
    a.set_label(&mut wait)?;
    a.mov(eax, dword_ptr(regs + GSTS_REG as i32))?;
    a.and(eax, status)?;
    a.jz(wait)
}

/// Emits the programming of the unit's fault event (registers at `regs`): fixed delivery of
/// `vector` to APIC 0, unmasked. Clobbers nothing.
pub fn fault_events_to(
    a: &mut CodeAssembler,
    regs: AsmRegister64,
    vector: u32,
) -> Result<(), IcedError> {
    a.mov(dword_ptr(regs + FEDATA_REG as i32), vector)?;
    a.mov(
        dword_ptr(regs + FEADDR_REG as i32),
        MSI_ADDRESS_WINDOW as u32,
    )?;
    a.mov(dword_ptr(regs + FECTL_REG as i32), 0u32)
}

/// Emits the latching of the table `irta` describes (IRTA, then GCMD.SIRTP) and interrupt
/// remapping's enabling (GCMD.IRE), each waited for in GSTS; `keep` holds the persistent GCMD
/// bits already set (GCMD is written whole, 11.4.4). Clobbers rax.
pub fn enable_remapping(
    a: &mut CodeAssembler,
    regs: AsmRegister64,
    irta: u64,
    keep: u32,
) -> Result<(), IcedError> {
    a.mov(rax, irta)?;
    a.mov(qword_ptr(regs + IRTA_REG as i32), rax)?;
    gcmd(a, regs, keep | GCMD_SIRTP, GSTS_IRTPS)?;
    gcmd(a, regs, keep | GCMD_IRE, GSTS_IRES)
}

/// Emits the copy of FSTS to `to`. Clobbers eax, rcx.
pub fn copy_fsts(a: &mut CodeAssembler, regs: AsmRegister64, to: u64) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(regs + FSTS_REG as i32))?;
    a.mov(rcx, to)?;
    a.mov(dword_ptr(rcx), eax)
}

/// Emits the copy of fault record `n` of the register block at `regs` to `records + 16 n`,
/// then its clearing (F is write-1-to-clear), so that the next fault raises the fault event
/// again. Clobbers rax, rcx.
pub fn take_fault_record(
    a: &mut CodeAssembler,
    regs: AsmRegister64,
    records: u64,
    n: u64,
) -> Result<(), IcedError> {
    let reg = (FRCD_REG_BASE + 16 * n) as i32;
    a.mov(rcx, records + 16 * n)?;
    a.mov(rax, qword_ptr(regs + reg))?;
    a.mov(qword_ptr(rcx), rax)?;
    a.mov(rax, qword_ptr(regs + reg + 8))?;
    a.mov(qword_ptr(rcx + 8), rax)?;
    a.mov(rax, FRCD_HI_F)?;
    a.mov(qword_ptr(regs + reg + 8), rax)
}

/// Fault record `n` as [`take_fault_record`] copied it to `records`: (requester ID, reason,
/// interrupt index, which an interrupt-remapping fault records in FI's bits 63:48). Panics
/// unless the record was pending (F set).
pub fn fault_record(mem: &GuestMemoryMmap, records: u64, n: u64) -> (u16, u64, u64) {
    let lo = read_u64(mem, records + 16 * n);
    let hi = read_u64(mem, records + 16 * n + 8);
    assert_ne!(hi & FRCD_HI_F, 0, "record {n} was pending");
    (
        hi as u16,
        (hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT,
        lo >> 48,
    )
}
