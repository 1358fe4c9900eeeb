//! Interrupt remapping in a real KVM VM on this machine (split irqchip, our VT-d with
//! `intremap=on,eim=on`): a small guest of our own programs the interrupt remapping table
//! (IRTEs in its RAM, IRTA, SIRTP, IRE through GCMD) and the IOAPIC's entries in remappable
//! format, and takes what arrives.
//!
//! The interrupts come from two sources: the serial port's line, which KVM injects from its
//! eventfd on the route of IOAPIC pin 4 (the route holds the IRTE's translation; while the
//! translation faults the eventfd is watched in user space and each signal is a request the
//! unit blocks), and a test device driving pin 10 through the IOAPIC model, whose delivery is a
//! request to the unit (KVM_SIGNAL_MSI of what it lets through). The entries' own vector field
//! holds a vector whose handler counts bypasses: nothing may arrive there.
//!
//! A second guest has 288 vCPUs (x2APIC IDs up to 287, which only x2APIC mode with interrupt
//! remapping lets a guest address): every processor starts in x2APIC mode, as firmware leaves
//! such a machine, and sees its own x2APIC ID, the MADT in its RAM lists them all, and an
//! interrupt the IRTE sends to APIC 287 reaches that vCPU through KVM's route.
//!
//! Without /dev/kvm these tests skip loudly, and fail when CI=true.

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use integration::small_guest::vtd::{
    copy_fsts, enable_remapping, fault_events_to, fault_record, gcmd, irte, take_fault_record,
    write_irte,
};
use integration::small_guest::{
    asm64, idt_gate, kvm_available, load_idt_and_enable_apic, power_off, program_entry, read_u32,
    read_u64, take_pending, vm_with_irqchip, wait_for_count, watchdog, Capture, IoapicLineDriver,
    LAPIC_EOI, RESULTS,
};
use viommu::descriptor::encode;
use viommu::intremap::IRTA_EIME;
use viommu::regs::*;
use viommu::FaultReason;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::layout::VTD_REGS_START;
use vmm::config::ViommuConfig;
use vmm::devices::ioapic::IOAPIC_SOURCE_ID;
use vmm::{Irqchip, VmExit};

const IDT: u64 = 0x31_0000;
const IDTR: u64 = 0x31_1000;
/// The guest's interrupt remapping table: 16 entries (IRTA.S = 3), x2APIC mode.
const IRT: u64 = 0x40_0000;
const IRTA: u64 = IRT | IRTA_EIME | 3;
const QUEUE: u64 = 0x41_0000;
const STATUS: u64 = 0x41_1000;
/// The vectors the IRTEs name: before and after the guest's invalidation.
const V_REMAPPED: u32 = 0x61;
const V_AFTER_IEC: u32 = 0x62;
/// The vector field of the remappable entries (Linux puts the pin there): never delivered.
const V_BYPASS: u32 = 0x30;
/// The unit's fault event, compatibility format: the unit's own interrupts are not remapped.
const V_FAULT: u32 = 0x70;
/// Counters (u64) and what the guest copies out.
const REMAPPED: u64 = RESULTS;
const BYPASSED: u64 = RESULTS + 8;
const FAULTS: u64 = RESULTS + 16;
const AFTER_IEC: u64 = RESULTS + 24;
/// Fault records 0..3 as the guest read them, 16 bytes each.
const RECORDS: u64 = RESULTS + 32;
const FSTS_AT_END: u64 = RESULTS + 80;
/// COM1 and its IOAPIC pin; IER bit 1 enables the THR-empty interrupt.
const COM1: u32 = 0x3f8;
const COM1_PIN: u32 = 4;
const IER_THRE: u32 = 1 << 1;
/// The test device driving pin 10 (1: asserted, 0: not).
const LINE_DEV: u64 = 0xf000_0000;
const LINE_PIN: u32 = 10;
/// A PCI requester ID that is not the IOAPIC's.
const OTHER_SID: u16 = 0x0018;
/// The interrupt index past the 16-entry table.
const BAD_HANDLE: u32 = 20;

/// The high half of a remappable-format redirection entry for interrupt index `index`
/// (VT-d spec 5.1.5.1: format bit 48, index 14:0 in bits 63:49).
fn remappable_high(index: u32) -> u32 {
    (index & 0x7fff) << 17 | 1 << 16
}

/// Emits a new THR-empty edge of the serial port: IIR read (the UART raises THR empty again
/// only once the last one was acknowledged, which no handler did when it was blocked), IER off,
/// then on.
fn serial_edge(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, COM1 + 2)?;
    a.in_(al, dx)?;
    a.mov(dx, COM1 + 1)?;
    a.xor(al, al)?;
    a.out(dx, al)?;
    a.mov(al, IER_THRE)?;
    a.out(dx, al)
}

/// A handler counting into `counter`; `serial` handlers acknowledge the UART (IIR read).
fn handler(a: &mut CodeAssembler, counter: u64, serial: bool) -> Result<(), IcedError> {
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(rax, counter)?;
    a.inc(qword_ptr(rax))?;
    if serial {
        a.mov(dx, COM1 + 2)?;
        a.in_(al, dx)?;
    }
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.iretq()
}

#[test]
fn interrupts_arrive_remapped_to_the_irte_vector_and_bad_requests_leave_fault_records() {
    if !kvm_available() {
        return;
    }
    let [wait_lo, wait_hi] = encode::wait(Some((STATUS, 1)), false, false);
    let [iec_lo, iec_hi] = encode::interrupt_entry_cache(None);
    let code = asm64(|a| {
        let labels: Vec<CodeLabel> = (0..4).map(|_| a.create_label()).collect();
        let [mut on_remapped, mut on_after, mut on_bypass, mut on_fault] =
            <[CodeLabel; 4]>::try_from(labels).expect("four labels");
        idt_gate(a, IDT, V_REMAPPED.into(), on_remapped)?;
        idt_gate(a, IDT, V_AFTER_IEC.into(), on_after)?;
        idt_gate(a, IDT, V_BYPASS.into(), on_bypass)?;
        idt_gate(a, IDT, V_FAULT.into(), on_fault)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        a.mov(r12, VTD_REGS_START)?;
        // The table: entry 0 for the IOAPIC, entry 1 not present, entry 2 for another
        // requester.
        write_irte(a, IRT, 0, irte(V_REMAPPED, IOAPIC_SOURCE_ID.0))?;
        write_irte(a, IRT, 2, irte(V_REMAPPED, OTHER_SID))?;
        fault_events_to(a, r12, V_FAULT)?;
        // Queued invalidation, then the table pointer and remapping on.
        a.xor(eax, eax)?;
        a.mov(qword_ptr(r12 + IQT_REG), rax)?;
        a.mov(rax, QUEUE)?;
        a.mov(qword_ptr(r12 + IQA_REG), rax)?;
        gcmd(a, r12, GCMD_QIE, GSTS_QIES)?;
        enable_remapping(a, r12, IRTA, GCMD_QIE)?;

        // 1. The serial line through entry 0: KVM delivers the IRTE's vector.
        program_entry(a, COM1_PIN, V_BYPASS, remappable_high(0))?;
        serial_edge(a)?;
        wait_for_count(a, REMAPPED, 1)?;
        // 2. A handle past the table: blocked, the signal taken in user space faults.
        program_entry(a, COM1_PIN, V_BYPASS, remappable_high(BAD_HANDLE))?;
        serial_edge(a)?;
        wait_for_count(a, FAULTS, 1)?;
        take_fault_record(a, r12, RECORDS, 0)?;
        // 3. An entry that is not present.
        program_entry(a, COM1_PIN, V_BYPASS, remappable_high(1))?;
        serial_edge(a)?;
        wait_for_count(a, FAULTS, 2)?;
        take_fault_record(a, r12, RECORDS, 1)?;
        // 4. The test device's pin through an entry for another requester: the IOAPIC's own
        //    delivery, blocked by source validation.
        program_entry(a, LINE_PIN, V_BYPASS, remappable_high(2))?;
        a.mov(rax, LINE_DEV)?;
        a.mov(dword_ptr(rax), 1u32)?;
        a.mov(dword_ptr(rax), 0u32)?;
        wait_for_count(a, FAULTS, 3)?;
        take_fault_record(a, r12, RECORDS, 2)?;
        // 5. Entry 1 made present, then an interrupt-entry-cache invalidation and a wait: the
        //    serial line (still on entry 1) is delivered again, with the new vector.
        write_irte(a, IRT, 1, irte(V_AFTER_IEC, IOAPIC_SOURCE_ID.0))?;
        a.mov(rcx, QUEUE)?;
        for (i, q) in [iec_lo, iec_hi, wait_lo, wait_hi].into_iter().enumerate() {
            a.mov(rax, q)?;
            a.mov(qword_ptr(rcx + 8 * i as i32), rax)?;
        }
        a.mov(rax, 2u64 << IQ_INDEX_SHIFT)?;
        a.mov(qword_ptr(r12 + IQT_REG), rax)?;
        let mut completed = a.create_label();
        a.set_label(&mut completed)?;
        a.mov(rax, STATUS)?;
        a.cmp(dword_ptr(rax), 1)?;
        a.jne(completed)?;
        serial_edge(a)?;
        wait_for_count(a, AFTER_IEC, 1)?;
        // Anything still pending comes in now (and would be counted).
        take_pending(a)?;
        a.mov(dx, COM1 + 1)?;
        a.xor(al, al)?;
        a.out(dx, al)?;
        copy_fsts(a, r12, FSTS_AT_END)?;
        power_off(a)?;

        a.set_label(&mut on_remapped)?;
        handler(a, REMAPPED, true)?;
        a.set_label(&mut on_after)?;
        handler(a, AFTER_IEC, true)?;
        a.set_label(&mut on_bypass)?;
        handler(a, BYPASSED, true)?;
        a.set_label(&mut on_fault)?;
        handler(a, FAULTS, false)
    });
    let out = Capture::default();
    let vmm = vm_with_irqchip(code, 1, Irqchip::Split, Some(ViommuConfig::default()), &out);
    let io = vmm.ioapic().expect("our IOAPIC").clone();
    let writes = Arc::new(Mutex::new(Vec::new()));
    vmm.mmio_bus()
        .insert(
            Arc::new(Mutex::new(IoapicLineDriver {
                ioapic: io,
                pin: LINE_PIN as u8,
                writes: writes.clone(),
            })),
            LINE_DEV,
            0x1000,
        )
        .unwrap();
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d").clone();
    watchdog(&vmm, 20);
    let mut stats = None;
    let outcome = vmm.run_with(|_| stats = Some(vmm::devices::vtd::lock(&unit).stats()));
    assert_eq!(outcome.expect("run"), VmExit::PowerOff, "{}", out.text());
    assert_eq!(
        read_u64(&mem, REMAPPED),
        1,
        "one interrupt at the IRTE's vector"
    );
    assert_eq!(
        read_u64(&mem, AFTER_IEC),
        1,
        "and one at the new one after the IEC"
    );
    assert_eq!(
        read_u64(&mem, BYPASSED),
        0,
        "nothing at the entries' own vector"
    );
    assert_eq!(
        read_u64(&mem, FAULTS),
        3,
        "one fault event per blocked request"
    );
    let ioapic = IOAPIC_SOURCE_ID.0;
    assert_eq!(
        fault_record(&mem, RECORDS, 0),
        (
            ioapic,
            FaultReason::IrIndexBeyondTable as u64,
            BAD_HANDLE.into()
        ),
        "a bad handle"
    );
    assert_eq!(
        fault_record(&mem, RECORDS, 1),
        (ioapic, FaultReason::IrEntryNotPresent as u64, 1),
        "a not-present IRTE"
    );
    assert_eq!(
        fault_record(&mem, RECORDS, 2),
        (ioapic, FaultReason::IrSourceIdMismatch as u64, 2),
        "a source-ID mismatch"
    );
    assert_eq!(
        read_u32(&mem, FSTS_AT_END) & (FSTS_PPF | FSTS_PFO),
        0,
        "every record taken, none lost"
    );
    assert_eq!(*writes.lock().unwrap(), [1, 0]);
    let stats = stats.expect("the counters");
    assert_eq!(stats.interrupt_faults, 3);
    assert!(stats.interrupts_remapped >= 2, "{stats:?}");
    assert!(
        stats.iec_invalidations >= 3,
        "SIRTP, IRE and the descriptor: {stats:?}"
    );
}

/// The 288-vCPU guest's real-mode segment at 0x10000 (SIPI vector 0x10), clear of the boot
/// page tables and stack: the application processors' code and interrupt handler, the counters
/// and the bitmap of x2APIC IDs seen.
const AP_SEGMENT: u16 = 0x1000;
const AP_BASE: u64 = (AP_SEGMENT as u64) << 4;
const SIPI_VECTOR: u32 = (AP_BASE >> 12) as u32;
const AP_CODE: u64 = AP_BASE;
const AP_HANDLER: u64 = AP_BASE + 0x100;
const STARTED: u64 = AP_BASE + 0x1000;
const HITS: u64 = AP_BASE + 0x1004;
const HIT_ID: u64 = AP_BASE + 0x1008;
const SEEN: u64 = AP_BASE + 0x1100;
const BSP_APIC_BASE: u64 = AP_BASE + 0x100c;
const MANY: u32 = 288;
/// The APIC ID the remapped interrupt is sent to: one no xAPIC ID can name.
const TARGET: u32 = MANY - 1;

/// An offset in the APs' segment.
fn ap_offset(addr: u64) -> u64 {
    addr - AP_BASE
}

/// An application processor's code, real mode at AP_CODE (CS = AP_SEGMENT): record its x2APIC
/// ID (CPUID 0xb EDX) in the bitmap, count itself, then halt; the target enables its local
/// APIC (in x2APIC mode from the start, as firmware leaves a machine with APIC IDs above 254)
/// and takes interrupts, whose real-mode handler (AP_HANDLER, IVT entry V_REMAPPED) counts
/// them and records who took them.
fn ap_code() -> (Vec<u8>, Vec<u8>) {
    let mut a = CodeAssembler::new(16).expect("16-bit assembler");
    let assembled = (|| -> Result<Vec<u8>, IcedError> {
        let mut halt = a.create_label();
        a.cli()?;
        a.mov(ax, u32::from(AP_SEGMENT))?;
        a.mov(ds, ax)?;
        a.mov(eax, 0xbu32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.lock().bts(dword_ptr(ap_offset(SEEN)), edx)?;
        a.lock().inc(dword_ptr(ap_offset(STARTED)))?;
        a.cmp(edx, TARGET)?;
        a.jne(halt)?;
        // The target's local APIC, software enabled through the x2APIC MSR of the
        // spurious-vector register (0x80f; SDM Vol. 3, 10.12): it started in x2APIC mode, or
        // the MSR access faults and the guest triple-faults.
        a.mov(ecx, 0x80fu32)?;
        a.mov(eax, 0x1ffu32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.sti()?;
        a.set_label(&mut halt)?;
        a.hlt()?;
        a.jmp(halt)?;
        a.assemble(ap_offset(AP_CODE))
    })();
    let code = assembled.expect("AP code assembles");
    let mut h = CodeAssembler::new(16).expect("16-bit assembler");
    let handler = (|| -> Result<Vec<u8>, IcedError> {
        h.push(ds)?;
        h.mov(ax, u32::from(AP_SEGMENT))?;
        h.mov(ds, ax)?;
        h.lock().inc(dword_ptr(ap_offset(HITS)))?;
        h.mov(eax, 0xbu32)?;
        h.xor(ecx, ecx)?;
        h.cpuid()?;
        h.mov(dword_ptr(ap_offset(HIT_ID)), edx)?;
        // EOI through the x2APIC MSR 0x80b.
        h.mov(ecx, 0x80bu32)?;
        h.xor(eax, eax)?;
        h.xor(edx, edx)?;
        h.wrmsr()?;
        h.pop(ds)?;
        h.iret()?;
        h.assemble(ap_offset(AP_HANDLER))
    })();
    (code, handler.expect("AP handler assembles"))
}

#[test]
fn a_288_vcpu_guest_starts_every_cpu_with_its_x2apic_id_and_a_remapped_interrupt_reaches_apic_287()
{
    if !kvm_available() {
        return;
    }
    // The boot processor: its own bit, the real-mode IVT entry of V_REMAPPED, an IRTE sending
    // V_REMAPPED to x2APIC ID TARGET and the serial pin through it, then INIT and two SIPIs to
    // all the others; once all have counted themselves, a serial edge, and wait for the hit.
    let code = asm64(|a| {
        a.mov(eax, 0xbu32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(rax, SEEN)?;
        a.lock().bts(dword_ptr(rax), edx)?;
        a.mov(rax, u64::from(V_REMAPPED) * 4)?;
        a.mov(
            dword_ptr(rax),
            u32::from(AP_SEGMENT) << 16 | ap_offset(AP_HANDLER) as u32,
        )?;
        write_irte(
            a,
            IRT,
            0,
            (1 | u64::from(V_REMAPPED) << 16 | u64::from(TARGET) << 32, 0),
        )?;
        a.mov(r12, VTD_REGS_START)?;
        enable_remapping(a, r12, IRTA, 0)?;
        program_entry(a, COM1_PIN, V_BYPASS, remappable_high(0))?;
        // The boot processor started in x2APIC mode (IA32_APIC_BASE bit 10).
        a.mov(ecx, 0x1bu32)?;
        a.rdmsr()?;
        a.mov(rcx, BSP_APIC_BASE)?;
        a.mov(dword_ptr(rcx), eax)?;
        // INIT, then SIPI (to AP_CODE) twice, to all excluding self, through the x2APIC ICR
        // (MSR 0x830; SDM Vol. 3, 10.6.1 and 10.12.9: shorthand 11b, level assert).
        let sipi = 0xc_4600 | SIPI_VECTOR;
        for icr in [0xc_4500u32, sipi, sipi] {
            a.mov(ecx, 0x830u32)?;
            a.mov(eax, icr)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            for _ in 0..256 {
                a.pause()?;
            }
        }
        let mut all = a.create_label();
        a.set_label(&mut all)?;
        a.pause()?;
        a.mov(rax, STARTED)?;
        a.cmp(dword_ptr(rax), MANY - 1)?;
        a.jb(all)?;
        serial_edge(a)?;
        let mut hit = a.create_label();
        a.set_label(&mut hit)?;
        a.pause()?;
        a.mov(rax, HITS)?;
        a.cmp(dword_ptr(rax), 1)?;
        a.jb(hit)?;
        a.mov(dx, COM1 + 1)?;
        a.xor(al, al)?;
        a.out(dx, al)?;
        power_off(a)
    });
    let out = Capture::default();
    let vmm = vm_with_irqchip(
        code,
        MANY,
        Irqchip::Split,
        Some(ViommuConfig::default()),
        &out,
    );
    let mem = vmm.guest_memory().clone();
    let (ap, handler) = ap_code();
    mem.write_slice(&ap, GuestAddress(AP_CODE)).unwrap();
    mem.write_slice(&handler, GuestAddress(AP_HANDLER)).unwrap();
    let madt = madt_processors(&mem);
    watchdog(&vmm, 60);
    let outcome = vmm.run();
    let started = read_u32(&mem, STARTED);
    assert_eq!(
        outcome.expect("run"),
        VmExit::PowerOff,
        "{started} APs started"
    );
    assert_eq!(started, MANY - 1, "every application processor ran");
    assert_eq!(
        read_u32(&mem, BSP_APIC_BASE) & 0xd00,
        0xd00,
        "the BSP started enabled, in x2APIC mode"
    );
    let seen: Vec<u32> = (0..MANY)
        .filter(|id| read_u32(&mem, SEEN + u64::from(id / 32) * 4) & 1 << (id % 32) != 0)
        .collect();
    assert_eq!(seen, (0..MANY).collect::<Vec<_>>(), "each x2APIC ID once");
    assert_eq!(read_u32(&mem, HITS), 1, "one remapped interrupt");
    assert_eq!(read_u32(&mem, HIT_ID), TARGET, "at x2APIC ID 287");
    assert_eq!(
        madt,
        (0..MANY).collect::<Vec<_>>(),
        "the guest's MADT lists every APIC ID"
    );
}

/// The APIC IDs of the enabled processors the MADT in guest memory lists (types 0 and 9).
fn madt_processors(mem: &GuestMemoryMmap) -> Vec<u32> {
    let xsdt = read_u64(mem, 0xe0000 + 24);
    let len = u64::from(read_u32(mem, xsdt + 4));
    let madt = (36..len)
        .step_by(8)
        .map(|o| read_u64(mem, xsdt + o))
        .find(|&t| read_u32(mem, t) == u32::from_le_bytes(*b"APIC"))
        .expect("a MADT");
    let mut bytes = vec![0u8; read_u32(mem, madt + 4) as usize];
    mem.read_slice(&mut bytes, GuestAddress(madt))
        .expect("the MADT in guest memory");
    let mut ids = Vec::new();
    let mut off = 44;
    while off + 2 <= bytes.len() {
        let (ty, len) = (bytes[off], usize::from(bytes[off + 1]));
        let field =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        match ty {
            0 if field(off + 4) & 1 != 0 => ids.push(u32::from(bytes[off + 3])),
            9 if field(off + 8) & 1 != 0 => ids.push(field(off + 4)),
            _ => {}
        }
        off += len.max(2);
    }
    ids
}
