//! The emulated edu's MSIs through our VT-d's interrupt remapping in a real KVM VM on this
//! machine (split irqchip, `intremap=on,eim=on`): a small guest of our own programs the
//! interrupt remapping table (IRTEs in its RAM, IRTA, SIRTP and IRE through GCMD), enables edu's
//! bus mastering and MSI with the capability in remappable format (VT-d spec 5.1.5.2), and
//! raises edu interrupts (IRQ_RAISE).
//!
//! Each MSI is a request of edu's requester ID, 00:01.0, that the unit translates before KVM
//! delivers it: through an entry naming edu it arrives at the entry's vector; a handle past the
//! table, a not-present entry, an entry naming another requester and a compatibility-format MSI
//! (the table is in xAPIC mode and GCMD.CFI clear) are blocked, each leaving its fault record
//! and raising the unit's fault event, itself a compatibility-format MSI the unit does not
//! remap. The MSI data holds a vector of its own (in remappable format without SHV the data's
//! low 16 bits are an unused subhandle): nothing may arrive there.
//!
//! Without /dev/kvm this test skips loudly, and fails when CI=true.

use iced_x86::code_asm::*;
use integration::small_guest::edu::{
    self, config_write, enable_msi, load_bar0, CFG_MSI_ADDRESS_LO, EDU_IRQ_ACK, EDU_IRQ_RAISE,
};
use integration::small_guest::vtd::{
    copy_fsts, enable_remapping, fault_events_to, fault_record, irte, take_fault_record, write_irte,
};
use integration::small_guest::{
    asm64, counting_handler, idt_gate, kvm_available, load_idt_and_enable_apic, power_off,
    read_u32, read_u64, take_pending, vm_with_irqchip, wait_for_count, watchdog, Capture, RESULTS,
};
use viommu::regs::{FSTS_PFO, FSTS_PPF};
use viommu::{FaultReason, SourceId};
use vm_device::interrupt::{MsiMessage, MSI_ADDRESS_WINDOW};
use vmm::arch::x86_64::layout::VTD_REGS_START;
use vmm::config::ViommuConfig;
use vmm::{Irqchip, VmExit};

const IDT: u64 = 0x31_0000;
const IDTR: u64 = 0x31_1000;
/// The guest's interrupt remapping table: 16 entries (IRTA.S = 3), xAPIC mode (EIME clear), in
/// which GCMD.CFI decides whether compatibility-format requests pass.
const IRT: u64 = 0x40_0000;
const IRTA: u64 = IRT | 3;
/// The vector entry 0 (and entry 2) names.
const V_REMAPPED: u32 = 0x61;
/// The vector in the MSI data: never delivered.
const V_BYPASS: u32 = 0x30;
/// The unit's fault event, compatibility format: the unit's own interrupts are not remapped.
const V_FAULT: u32 = 0x70;
/// What the guest raises in edu's interrupt status.
const RAISED: u32 = 0x10;
/// edu's requester ID, and one that is not (00:02.0).
const EDU_SID: u16 = 0x0008;
const OTHER_SID: u16 = 0x0010;
/// The interrupt index past the 16-entry table.
const BAD_HANDLE: u16 = 20;

/// Counters (u64) and what the guest copies out.
const REMAPPED: u64 = RESULTS;
const BYPASSED: u64 = RESULTS + 8;
const FAULTS: u64 = RESULTS + 16;
/// edu's interrupt status as the handler at V_REMAPPED (and at V_BYPASS) read it.
const REMAPPED_STATUS: u64 = RESULTS + 24;
const BYPASSED_STATUS: u64 = RESULTS + 28;
const FSTS_AT_END: u64 = RESULTS + 32;
/// Fault records 0 to 3 as the guest read them, 16 bytes each.
const RECORDS: u64 = RESULTS + 64;

/// The MSI address of a remappable-format request for interrupt index `index` without
/// subhandle (VT-d spec 5.1.5.2: format bit 4, handle 14:0 in bits 19:5, handle 15 in bit 2).
fn remappable(index: u16) -> u32 {
    MsiMessage::remappable(index).address as u32
}

/// The blocked requests, in order: edu's MSI address and the fault record it must leave
/// (reason, interrupt index).
fn blocked() -> [(u32, FaultReason, u16); 4] {
    [
        (
            remappable(BAD_HANDLE),
            FaultReason::IrIndexBeyondTable,
            BAD_HANDLE,
        ),
        (remappable(1), FaultReason::IrEntryNotPresent, 1),
        (remappable(2), FaultReason::IrSourceIdMismatch, 2),
        // Compatibility format, to APIC 0: with remapping on and CFI clear, blocked (5.1.4).
        (
            MSI_ADDRESS_WINDOW as u32,
            FaultReason::IrCompatibilityBlocked,
            0,
        ),
    ]
}

/// The guest: r12 holds the unit's registers, r13 edu's BAR0.
fn guest() -> Vec<u8> {
    asm64(|a| {
        let mut on_remapped = a.create_label();
        let mut on_bypass = a.create_label();
        let mut on_fault = a.create_label();
        idt_gate(a, IDT, V_REMAPPED.into(), on_remapped)?;
        idt_gate(a, IDT, V_BYPASS.into(), on_bypass)?;
        idt_gate(a, IDT, V_FAULT.into(), on_fault)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        a.mov(r12, VTD_REGS_START)?;
        load_bar0(a, r13d)?;
        // The table: entry 0 for edu (all 16 bits of the requester ID compared), entry 1 not
        // present, entry 2 for another requester.
        write_irte(a, IRT, 0, irte(V_REMAPPED, EDU_SID))?;
        write_irte(a, IRT, 2, irte(V_REMAPPED, OTHER_SID))?;
        fault_events_to(a, r12, V_FAULT)?;
        // The table pointer, then remapping on (CFI clear).
        enable_remapping(a, r12, IRTA, 0)?;
        // edu: bus mastering (an MSI is a memory write), then MSI through entry 0.
        enable_msi(a, remappable(0), V_BYPASS)?;

        // 1. Through entry 0: the handler at the IRTE's vector acknowledges edu.
        a.mov(dword_ptr(r13 + EDU_IRQ_RAISE), RAISED)?;
        wait_for_count(a, REMAPPED, 1)?;
        // 2. Each blocked request: a fault event, whose record the guest copies and clears;
        //    edu's interrupt, which nobody took, is acknowledged for the next.
        for (n, (address, _, _)) in blocked().into_iter().enumerate() {
            config_write(a, CFG_MSI_ADDRESS_LO, address)?;
            a.mov(dword_ptr(r13 + EDU_IRQ_RAISE), RAISED)?;
            wait_for_count(a, FAULTS, n as i32 + 1)?;
            take_fault_record(a, r12, RECORDS, n as u64)?;
            a.mov(dword_ptr(r13 + EDU_IRQ_ACK), RAISED)?;
        }
        // Anything still pending comes in now (and would be counted).
        take_pending(a)?;
        copy_fsts(a, r12, FSTS_AT_END)?;
        power_off(a)?;

        a.set_label(&mut on_remapped)?;
        edu::handler(a, r13, REMAPPED, REMAPPED_STATUS, false)?;
        a.set_label(&mut on_bypass)?;
        edu::handler(a, r13, BYPASSED, BYPASSED_STATUS, false)?;
        a.set_label(&mut on_fault)?;
        counting_handler(a, FAULTS)
    })
}

#[test]
fn edu_msis_arrive_at_the_irte_vector_and_each_blocked_msi_leaves_its_fault_record_and_delivers_nothing(
) {
    if !kvm_available() {
        return;
    }
    let out = Capture::default();
    let vmm = vm_with_irqchip(
        guest(),
        1,
        Irqchip::Split,
        Some(ViommuConfig::default()),
        &out,
    );
    let source = vmm.add_edu().expect("add edu");
    assert_eq!(source, SourceId(EDU_SID), "edu at 00:01.0");
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d").clone();
    watchdog(&vmm, 20);
    let mut stats = None;
    let outcome = vmm.run_with(|_| stats = Some(vmm::devices::vtd::lock(&unit).stats()));
    assert_eq!(outcome.expect("run"), VmExit::PowerOff, "{}", out.text());
    assert_eq!(read_u64(&mem, REMAPPED), 1, "one MSI, at the IRTE's vector");
    assert_eq!(
        read_u32(&mem, REMAPPED_STATUS),
        RAISED,
        "the raised interrupt"
    );
    assert_eq!(
        read_u64(&mem, BYPASSED),
        0,
        "nothing at the MSI data's vector"
    );
    assert_eq!(
        read_u64(&mem, FAULTS),
        4,
        "one fault event per blocked request"
    );
    for (n, (_, reason, index)) in blocked().into_iter().enumerate() {
        assert_eq!(
            fault_record(&mem, RECORDS, n as u64),
            (EDU_SID, reason as u64, index.into()),
            "record {n}: {reason:?} from edu"
        );
    }
    assert_eq!(
        read_u32(&mem, FSTS_AT_END) & (FSTS_PPF | FSTS_PFO),
        0,
        "every record taken, none lost"
    );
    let stats = stats.expect("the counters");
    assert_eq!(stats.interrupts_remapped, 1, "{stats:?}");
    assert_eq!(stats.interrupt_faults, 4, "{stats:?}");
}
