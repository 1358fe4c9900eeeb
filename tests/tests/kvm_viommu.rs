//! The virtual VT-d in a real KVM VM on this machine: a small guest of our own reaches its
//! registers through MMIO exits, drives its invalidation queue in guest RAM, and takes its
//! completion and fault-event interrupts as MSIs delivered through KVM; an emulated DMA device
//! behind it faults on an unmapped IOVA and the guest reads the fault record, in legacy mode and
//! in scalable mode through a first-stage table.

use iced_x86::code_asm::*;
use integration::small_guest::vtd::fault_events_to;
use integration::small_guest::{
    asm64, counting_handler, idt_gate, kvm_available, load_idt_and_enable_apic, print, read_u32,
    read_u64, Capture, PM1A_CNT, RESULTS, SLP_S5,
};
use integration::vtd_guest::{self, enable_edu, vm_with_vtd as vm_with_vtd_config, watchdog};
use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::tables::TableMode;
use viommu::testing::{FirstStageFlags, ScalableTables, Tables};
use viommu::{FaultReason, Perm, SourceId};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::layout::VTD_REGS_START;
use vmm::config::ViommuConfig;
use vmm::devices::vtd;
use vmm::{VmExit, Vmm};

const QUEUE: u64 = 0x30_0000;
const STATUS: u64 = 0x31_0000;
const TOKEN: u32 = 0xc0_ffee;

/// A VM with our VT-d running `code` at CODE in long mode, its serial output in `out`; with
/// `irqchip` the guest has the in-kernel LAPIC/IOAPIC (and powers off rather than halts).
fn vm_with_vtd(code: Vec<u8>, irqchip: bool, out: &Capture) -> Vmm {
    vm_with_vtd_config(code, irqchip, out, ViommuConfig::default())
}

/// Emits code (rbx = the register block) that enables the queue at QUEUE, 256 entries, after
/// writing IQT = 0 with 8 bytes, as Linux's `dmar_enable_qi` does. Clobbers rax.
fn enable_queue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.xor(eax, eax)?;
    a.mov(qword_ptr(rbx + IQT_REG), rax)?;
    a.mov(rax, QUEUE)?;
    a.mov(qword_ptr(rbx + IQA_REG), rax)?; // 256 entries at QUEUE
    a.mov(eax, GCMD_QIE)?;
    a.mov(dword_ptr(rbx + GCMD_REG), eax)
}

#[test]
fn guest_reads_vtd_registers_and_completes_a_wait_through_the_queue() {
    if !kvm_available() {
        return;
    }
    // A wait descriptor writing TOKEN to STATUS (6.5.2.8), then an invalid one (type 7).
    let [wait_lo, wait_hi] = encode::wait(Some((STATUS, TOKEN)), false, false);
    let code = asm64(|a| {
        a.mov(rbx, VTD_REGS_START)?;
        a.mov(eax, dword_ptr(rbx + VER_REG))?;
        a.mov(dword_ptr(RESULTS), eax)?;
        a.mov(rax, qword_ptr(rbx + CAP_REG))?;
        a.mov(rcx, RESULTS + 8)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rcx, QUEUE)?;
        a.mov(rax, wait_lo)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rax, wait_hi)?;
        a.mov(qword_ptr(rcx + 8), rax)?;
        a.mov(rax, 7u64)?;
        a.mov(qword_ptr(rcx + 16), rax)?;
        a.xor(eax, eax)?;
        a.mov(qword_ptr(rcx + 24), rax)?;
        enable_queue(a)?;
        a.mov(rax, 1u64 << IQ_INDEX_SHIFT)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // one descriptor
        a.mov(eax, dword_ptr(rbx + GSTS_REG))?;
        a.mov(rcx, RESULTS + 16)?;
        a.mov(dword_ptr(rcx), eax)?;
        a.mov(rax, 2u64 << IQ_INDEX_SHIFT)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // the invalid descriptor
        a.mov(eax, dword_ptr(rbx + FSTS_REG))?;
        a.mov(dword_ptr(rcx + 4), eax)?;
        a.mov(rax, qword_ptr(rbx + IQH_REG))?;
        a.mov(qword_ptr(rcx + 8), rax)?;
        print(a, "done\n")?;
        a.hlt()
    });
    let out = Capture::default();
    let vmm = vm_with_vtd(code, false, &out);
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d was asked for").clone();
    assert_eq!(vmm.run().expect("run"), VmExit::Halted);
    assert_eq!(out.text(), "done\n");

    assert_eq!(read_u32(&mem, RESULTS), VER_VALUE, "VER");
    let cap = read_u64(&mem, RESULTS + 8);
    assert!(cap & CAP_CM != 0, "caching mode is on");
    assert_eq!((cap >> CAP_MGAW_SHIFT) & 0x3f, 47, "MGAW");
    assert_eq!(read_u32(&mem, STATUS), TOKEN, "the wait wrote its status");
    assert!(read_u32(&mem, RESULTS + 16) & GSTS_QIES != 0, "GSTS.QIES");
    assert!(read_u32(&mem, RESULTS + 20) & FSTS_IQE != 0, "FSTS.IQE");
    assert_eq!(
        read_u64(&mem, RESULTS + 24),
        1 << IQ_INDEX_SHIFT,
        "IQH stays at the bad one"
    );
    let stats = vtd::lock(&unit).stats();
    assert_eq!(stats.descriptors, 2);
    assert_eq!(stats.waits, 1);
    assert_eq!(stats.descriptors_by_type.invalid, 1);
}

#[test]
fn async_queue_tail_write_completes_through_a_kvm_doorbell_while_the_guest_polls_memory() {
    if !kvm_available() {
        return;
    }
    let [wait_lo, wait_hi] = encode::wait(Some((STATUS, TOKEN)), false, false);
    let code = asm64(|a| {
        let mut poll = a.create_label();
        let mut done = a.create_label();
        let mut end = a.create_label();
        a.mov(rbx, VTD_REGS_START)?;
        a.mov(rcx, QUEUE)?;
        a.mov(rax, wait_lo)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rax, wait_hi)?;
        a.mov(qword_ptr(rcx + 8), rax)?;
        enable_queue(a)?;
        // IQT: the doorbell of tail 1, written with 4 bytes as Linux does.
        a.mov(eax, 1u32 << IQ_INDEX_SHIFT)?;
        a.mov(dword_ptr(rbx + IQT_REG), eax)?;
        // Poll the status word as Linux's qi_submit_sync does, reading FSTS each round (from
        // the read-only register page), for at most 2^32 rounds.
        a.mov(rcx, STATUS)?;
        a.mov(rdx, 1u64 << 32)?;
        a.set_label(&mut poll)?;
        a.mov(eax, dword_ptr(rcx))?;
        a.cmp(eax, TOKEN)?;
        a.je(done)?;
        a.mov(eax, dword_ptr(rbx + FSTS_REG))?;
        a.pause()?;
        a.dec(rdx)?;
        a.jnz(poll)?;
        print(a, "timeout\n")?;
        a.hlt()?;
        // IQH, from the register page, moves past the wait once the queue ran.
        a.set_label(&mut done)?;
        let mut head = a.create_label();
        a.mov(rdx, 1u64 << 32)?;
        a.set_label(&mut head)?;
        a.mov(rax, qword_ptr(rbx + IQH_REG))?;
        a.cmp(rax, 1 << IQ_INDEX_SHIFT)?;
        a.je(end)?;
        a.pause()?;
        a.dec(rdx)?;
        a.jnz(head)?;
        a.set_label(&mut end)?;
        a.mov(qword_ptr(RESULTS), rax)?;
        print(a, "done\n")?;
        a.hlt()
    });
    let out = Capture::default();
    let config = ViommuConfig {
        async_queue: true,
        ..ViommuConfig::default()
    };
    let vmm = vm_with_vtd_config(code, false, &out, config);
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d was asked for").clone();
    assert_eq!(vmm.run().expect("run"), VmExit::Halted);
    assert_eq!(out.text(), "done\n");
    assert_eq!(read_u32(&mem, STATUS), TOKEN, "the wait wrote its status");
    assert_eq!(
        read_u64(&mem, RESULTS),
        1 << IQ_INDEX_SHIFT,
        "the page shows the new IQH"
    );
    let bells = unit.doorbells().expect("queue=async sets up doorbells");
    // Both IQT writes (8 bytes of 0 at set-up, then 4 bytes of tail 1) rang; the trapped IQA
    // and GCMD writes in between carried the first out before themselves.
    assert_eq!(
        bells.carried_out(),
        2,
        "the tail writes went through KVM's doorbells"
    );
    assert_eq!(vtd::lock(&unit).stats().waits, 1);
}

/// Vectors the unit's two interrupts carry, and where the guest's handlers count them.
const COMPLETION_VECTOR: u64 = 0x50;
const FAULT_VECTOR: u64 = 0x51;
const IDT: u64 = 0x31_1000;
const IDTR: u64 = 0x31_2000;

/// Spins until the u64 at `counter` is at least 1, with interrupts on.
fn wait_for(a: &mut CodeAssembler, counter: u64) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut again)?;
    a.cli()?;
    a.mov(rax, counter)?;
    a.cmp(qword_ptr(rax), 1)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(again)?;
    a.set_label(&mut done)?;
    a.sti()
}

#[test]
fn completion_and_fault_events_reach_the_guest_as_msis_through_kvm() {
    if !kvm_available() {
        return;
    }
    // A wait asking for the completion interrupt, then an invalid descriptor (type 7), whose
    // queue error raises the fault event.
    let [wait_lo, wait_hi] = encode::wait(None, true, false);
    let completions = RESULTS;
    let faults = RESULTS + 8;
    let code = asm64(|a| {
        let mut on_completion = a.create_label();
        let mut on_fault = a.create_label();
        let mut off = a.create_label();
        idt_gate(a, IDT, COMPLETION_VECTOR, on_completion)?;
        idt_gate(a, IDT, FAULT_VECTOR, on_fault)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        a.sti()?;
        a.mov(rbx, VTD_REGS_START)?;
        // Both events at APIC 0 (address 0xFEE00000), fixed delivery of their vectors, unmasked.
        a.mov(dword_ptr(rbx + IEDATA_REG), COMPLETION_VECTOR as u32)?;
        a.mov(dword_ptr(rbx + IEADDR_REG), 0xfee0_0000u32)?;
        a.mov(dword_ptr(rbx + IECTL_REG), 0u32)?; // unmask
        fault_events_to(a, rbx, FAULT_VECTOR as u32)?;
        a.mov(rcx, QUEUE)?;
        a.mov(rax, wait_lo)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rax, wait_hi)?;
        a.mov(qword_ptr(rcx + 8), rax)?;
        a.mov(rax, 7u64)?;
        a.mov(qword_ptr(rcx + 16), rax)?;
        a.xor(eax, eax)?;
        a.mov(qword_ptr(rcx + 24), rax)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // 0
        a.mov(rax, QUEUE)?;
        a.mov(qword_ptr(rbx + IQA_REG), rax)?;
        a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE)?;
        a.mov(rax, 1u64 << IQ_INDEX_SHIFT)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // the wait
        wait_for(a, completions)?;
        a.mov(rax, 2u64 << IQ_INDEX_SHIFT)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // the invalid descriptor
        wait_for(a, faults)?;
        a.mov(eax, dword_ptr(rbx + FSTS_REG))?;
        a.mov(rcx, RESULTS + 16)?;
        a.mov(dword_ptr(rcx), eax)?;
        a.mov(eax, dword_ptr(rbx + ICS_REG))?;
        a.mov(dword_ptr(rcx + 4), eax)?;
        a.set_label(&mut off)?;
        a.mov(dx, PM1A_CNT)?;
        a.mov(al, SLP_S5)?;
        a.out(dx, al)?;
        a.hlt()?;
        a.jmp(off)?;
        a.set_label(&mut on_completion)?;
        counting_handler(a, completions)?;
        a.set_label(&mut on_fault)?;
        counting_handler(a, faults)
    });
    let out = Capture::default();
    let vmm = vm_with_vtd(code, true, &out);
    let mem = vmm.guest_memory().clone();
    watchdog(&vmm);
    assert_eq!(vmm.run().expect("run"), VmExit::PowerOff);
    assert_eq!(read_u64(&mem, completions), 1, "one completion MSI");
    assert_eq!(read_u64(&mem, faults), 1, "one fault-event MSI");
    assert!(read_u32(&mem, RESULTS + 16) & FSTS_IQE != 0, "FSTS.IQE");
    assert!(read_u32(&mem, RESULTS + 20) & ICS_IWC != 0, "ICS.IWC");
}

/// The emulated-edu test's memory: source, two destinations, a canary no IOVA maps, the guest's
/// VT-d tables, its invalidation queue and wait status.
const E_SRC: u64 = 0x50_0000;
const E_DST: u64 = 0x50_1000;
const E_DST2: u64 = 0x50_2000;
const E_CANARY: u64 = 0x52_0000;
const E_TABLES: u64 = 0x60_0000;
const E_QUEUE: u64 = 0x54_0000;
const E_STATUS: u64 = 0x54_1000;
const E_IOVA_SRC: u64 = 0x0800_0000;
const E_IOVA_DST: u64 = 0x0800_1000;
const E_IOVA_DST2: u64 = 0x0800_2000;
const E_LEN: u64 = 2048;
/// Emits one edu DMA of E_LEN bytes (`to_ram`: buffer to `ram`, else `ram` to buffer).
fn edu_dma(a: &mut CodeAssembler, ram: u64, to_ram: bool) -> Result<(), IcedError> {
    vtd_guest::edu_dma(a, ram, E_LEN, to_ram)
}

/// How the edu guest sets up the unit: the root table's RTADDR value, the queue's IQA value and
/// the IQT value that submits the set-up descriptors the host wrote there.
struct EduSetup {
    rtaddr: u64,
    iqa: u64,
    iqt: u64,
}

/// A guest that points the unit at its tables, submits the set-up descriptors, turns
/// translation on, then has edu copy E_SRC to E_DST and E_DST2 through mapped IOVAs and to
/// E_CANARY through an unmapped one, taking the fault event and reading FSTS and fault record 0
/// into RESULTS + 16 ... 32 (RESULTS + 40 is 0xbad if the set-up's wait did not complete).
fn edu_guest(setup: &EduSetup) -> Vec<u8> {
    let faults = RESULTS;
    asm64(|a| {
        let mut on_fault = a.create_label();
        let mut off = a.create_label();
        let mut fail = a.create_label();
        idt_gate(a, IDT, FAULT_VECTOR, on_fault)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        a.sti()?;
        // edu is 00:01.0: BAR0, then memory decode and bus mastering.
        enable_edu(a)?;
        // The VT-d: fault events to the handler, root table, queued invalidation, translation.
        a.mov(rbx, VTD_REGS_START)?;
        fault_events_to(a, rbx, FAULT_VECTOR as u32)?;
        a.mov(rax, setup.rtaddr)?;
        a.mov(qword_ptr(rbx + RTADDR_REG), rax)?;
        a.mov(dword_ptr(rbx + GCMD_REG), GCMD_SRTP)?;
        a.xor(eax, eax)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // 0
        a.mov(rax, setup.iqa)?;
        a.mov(qword_ptr(rbx + IQA_REG), rax)?;
        a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE)?;
        a.mov(rax, setup.iqt)?;
        a.mov(qword_ptr(rbx + IQT_REG), rax)?; // the set-up invalidations and a wait
        a.mov(rax, E_STATUS)?;
        a.cmp(dword_ptr(rax), 1)?;
        a.jne(fail)?;
        a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE | GCMD_TE)?;
        // Mapped: source to buffer, buffer to destination.
        edu_dma(a, E_IOVA_SRC, false)?;
        edu_dma(a, E_IOVA_DST, true)?;
        // Not mapped: the canary's guest-physical address as an IOVA.
        edu_dma(a, E_CANARY, true)?;
        wait_for(a, faults)?;
        a.mov(eax, dword_ptr(rbx + FSTS_REG))?;
        a.mov(rcx, RESULTS + 16)?;
        a.mov(dword_ptr(rcx), eax)?;
        a.mov(rax, qword_ptr(rbx + FRCD_REG_BASE))?; // fault record 0, low: the page address
        a.mov(qword_ptr(rcx + 8), rax)?;
        a.mov(rax, qword_ptr(rbx + FRCD_REG_BASE + 8))?; // high: F, type, PASID, reason, SID
        a.mov(qword_ptr(rcx + 16), rax)?;
        // The device still works.
        edu_dma(a, E_IOVA_DST2, true)?;
        a.jmp(off)?;
        a.set_label(&mut fail)?;
        a.mov(rax, RESULTS + 40)?;
        a.mov(dword_ptr(rax), 0xbad_u32)?;
        a.set_label(&mut off)?;
        a.mov(dx, PM1A_CNT)?;
        a.mov(al, SLP_S5)?;
        a.out(dx, al)?;
        a.hlt()?;
        a.jmp(off)?;
        a.set_label(&mut on_fault)?;
        counting_handler(a, faults)
    })
}

/// Runs the edu guest with a VT-d of `config`: `tables` writes the guest's translation tables
/// for edu's source id (the IOVAs E_IOVA_* mapped, E_CANARY not) and returns the set-up
/// descriptors, which go into the queue `descriptor_size` bytes apart. Checks the data and the
/// fault record common to both modes and returns the unit, guest memory and the record's high
/// quadword.
fn run_edu_guest(
    config: ViommuConfig,
    setup: &EduSetup,
    descriptor_size: u64,
    tables: impl FnOnce(&vm_memory::GuestMemoryMmap, SourceId) -> Vec<[u64; 2]>,
) -> (vtd::SharedVtd, vm_memory::GuestMemoryMmap, u64) {
    let vmm = vm_with_vtd_config(edu_guest(setup), true, &Capture::default(), config);
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d was asked for").clone();
    let source = vmm.add_edu().expect("add edu");
    assert_eq!(source, SourceId::new(0, 1, 0), "edu sits at 00:01.0");
    let pattern: Vec<u8> = (0..E_LEN as u32).map(|i| (i * 13 + 7) as u8).collect();
    let canary = vec![0xa5u8; E_LEN as usize];
    mem.write_slice(&pattern, GuestAddress(E_SRC))
        .expect("guest memory");
    mem.write_slice(&canary, GuestAddress(E_CANARY))
        .expect("guest memory");
    for (i, d) in tables(&mem, source).iter().enumerate() {
        // A 256-bit descriptor's upper half stays zero (the queue page starts zeroed).
        mem.write_obj(*d, GuestAddress(E_QUEUE + i as u64 * descriptor_size))
            .expect("guest memory");
    }
    watchdog(&vmm);
    assert_eq!(vmm.run().expect("run"), VmExit::PowerOff);
    assert_eq!(
        read_u32(&mem, RESULTS + 40),
        0,
        "the guest's VT-d set-up failed"
    );
    let read = |addr: u64| {
        let mut v = vec![0u8; E_LEN as usize];
        mem.read_slice(&mut v, GuestAddress(addr))
            .expect("guest memory");
        v
    };
    assert_eq!(read(E_DST), pattern, "DMA through mapped IOVAs");
    assert_eq!(
        read(E_CANARY),
        canary,
        "the unmapped IOVA reached no guest memory"
    );
    assert_eq!(read(E_DST2), pattern, "the device works after the fault");
    assert_eq!(read_u64(&mem, RESULTS), 1, "one fault-event MSI");
    assert!(read_u32(&mem, RESULTS + 16) & FSTS_PPF != 0, "FSTS.PPF");
    assert_eq!(
        read_u64(&mem, RESULTS + 24),
        E_CANARY,
        "the fault record's address"
    );
    let hi = read_u64(&mem, RESULTS + 32);
    assert!(hi & FRCD_HI_F != 0, "F set");
    assert_eq!(
        hi & FRCD_HI_SID_MASK,
        u64::from(source.0),
        "the fault record's source id"
    );
    assert_eq!(hi & FRCD_HI_T, 0, "a write request");
    (unit, mem, hi)
}

#[test]
fn an_emulated_device_dma_to_an_unmapped_iova_is_recorded_as_a_fault_the_guest_reads() {
    if !kvm_available() {
        return;
    }
    let setup = EduSetup {
        rtaddr: E_TABLES,
        iqa: E_QUEUE,
        iqt: 3 << IQ_INDEX_SHIFT,
    };
    let (_, _, hi) = run_edu_guest(ViommuConfig::default(), &setup, 16, |mem, source| {
        let mut t = Tables::at(mem, E_TABLES);
        let pt = t.context(source, 1, 3);
        for (iova, gpa) in [
            (E_IOVA_SRC, E_SRC),
            (E_IOVA_DST, E_DST),
            (E_IOVA_DST2, E_DST2),
        ] {
            t.map(pt, iova, gpa, 0x1000, Perm::RW);
        }
        vec![
            encode::context_global(),
            encode::iotlb_global(),
            encode::wait(Some((E_STATUS, 1)), false, false),
        ]
    });
    assert_eq!(
        (hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT,
        FaultReason::WriteNotPermitted as u64,
        "reason: write to a page without write permission"
    );
}

#[test]
fn an_emulated_device_dmas_through_a_first_stage_table_and_a_not_present_entry_faults_with_71h() {
    if !kvm_available() {
        return;
    }
    // Scalable mode, as Linux runs it: the scalable-mode root table, a queue of 256-bit
    // descriptors (one page: 128 of them), a global PASID-cache, context and IOTLB flush.
    let setup = EduSetup {
        rtaddr: E_TABLES | RTADDR_TTM_SCALABLE,
        iqa: E_QUEUE | IQA_DW,
        iqt: 4 * WIDE_DESCRIPTOR_SIZE,
    };
    let config = ViommuConfig {
        scalable_mode: true,
        first_stage: true,
        ..ViommuConfig::default()
    };
    let leaf = std::cell::Cell::new(0u64);
    let (unit, mem, hi) = run_edu_guest(config, &setup, WIDE_DESCRIPTOR_SIZE, |mem, source| {
        let mut t = ScalableTables::at(mem, E_TABLES);
        // Edu's requests carry no PASID: they use RID_PASID 0, a first-stage table here.
        t.context(source, 2, 0, false);
        let table = t.first_stage_table();
        for (iova, gpa) in [
            (E_IOVA_SRC, E_SRC),
            (E_IOVA_DST, E_DST),
            (E_IOVA_DST2, E_DST2),
        ] {
            t.map_first_stage(table, iova, gpa, 0x1000, FirstStageFlags::USER_RW);
        }
        t.first_stage(source, 0, 1, table);
        leaf.set(t.first_stage_entry_addr(table, E_IOVA_DST, 1));
        vec![
            encode::pasid_cache_global(),
            encode::context_global(),
            encode::iotlb_global(),
            encode::wait(Some((E_STATUS, 1)), false, false),
        ]
    });
    assert_eq!(
        (hi & FRCD_HI_FR_MASK) >> FRCD_HI_FR_SHIFT,
        FaultReason::FirstStageEntryNotPresent as u64,
        "reason 71h: the first-stage entry is not present"
    );
    assert_eq!(
        hi & (FRCD_HI_PP | FRCD_HI_PV_MASK),
        0,
        "a request without a PASID records none, though RID_PASID translated it"
    );
    let stats = vtd::lock(&unit).stats();
    assert_eq!(vtd::lock(&unit).root_table_mode(), TableMode::Scalable);
    assert_eq!(stats.wide_descriptors, 4);
    assert_eq!(stats.descriptors_by_type.pasid_cache, 1);
    assert!(stats.first_stage_walks >= 4, "{}", stats.first_stage_walks);
    // The leaf the device wrote through is accessed and dirty.
    let pte = read_u64(&mem, leaf.get());
    assert_eq!(
        pte & (1 << 5 | 1 << 6),
        1 << 5 | 1 << 6,
        "A and D: {pte:#x}"
    );
}
