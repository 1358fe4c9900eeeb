//! The VT-d protocol checker's fourth driver bug in a real KVM VM on this machine (split
//! irqchip, interrupt remapping): a small guest routes edu's MSI through an IRTE, takes it,
//! changes the IRTE to another vector and raises edu again. Without the interrupt-entry-cache
//! invalidation the unit still delivers through the cached entry, at the old vector, as hardware
//! does, and the checker flags the stale IRTE at the wait that follows, with its index, the
//! wait's queue slot and the instruction after the tail write; with the invalidation the MSI
//! arrives at the new vector and the checker is silent.
//!
//! Without /dev/kvm this test skips loudly, and fails when CI=true.

use iced_x86::code_asm::*;
use integration::small_guest::edu::{self, enable_msi, load_bar0, EDU_IRQ_RAISE};
use integration::small_guest::vtd::{enable_remapping, gcmd, irte, write_irte};
use integration::small_guest::{
    asm64_labels, idt_gate, kvm_available, load_idt_and_enable_apic, power_off, read_u32, read_u64,
    vm_with_irqchip, wait_for_count, watchdog, Capture, CODE, RESULTS,
};
use viommu::check::Kind;
use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::SourceId;
use vm_device::interrupt::MsiMessage;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::layout::VTD_REGS_START;
use vmm::config::ViommuConfig;
use vmm::{Irqchip, VmExit};

const IDT: u64 = 0x31_0000;
const IDTR: u64 = 0x31_1000;
/// The interrupt remapping table: 16 entries (IRTA.S = 3), xAPIC mode.
const IRT: u64 = 0x40_0000;
const IRTA: u64 = IRT | 3;
const QUEUE: u64 = 0x54_0000;
const STATUS: u64 = 0x54_1000;
/// The vector IRTE 0 names first, and the one the guest changes it to.
const V_OLD: u32 = 0x61;
const V_NEW: u32 = 0x62;
const RAISED: u32 = 0x10;
const EDU: SourceId = SourceId(0x0008);
/// MSIs taken at each vector, and edu's status as each handler read it.
const OLD: u64 = RESULTS;
const NEW: u64 = RESULTS + 8;
const OLD_STATUS: u64 = RESULTS + 16;
const NEW_STATUS: u64 = RESULTS + 20;

/// The guest (r12: the unit's registers, r13: edu's BAR0); with `bug` it skips the
/// interrupt-entry-cache invalidation. The label is the instruction after the tail write that
/// submits the wait (and, without the bug, the invalidation before it).
fn guest(bug: bool) -> (Vec<u8>, [u64; 1]) {
    asm64_labels(|a| {
        let mut on_old = a.create_label();
        let mut on_new = a.create_label();
        let mut after_submit = a.create_label();
        idt_gate(a, IDT, V_OLD.into(), on_old)?;
        idt_gate(a, IDT, V_NEW.into(), on_new)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        a.mov(r12, VTD_REGS_START)?;
        load_bar0(a, r13d)?;
        write_irte(a, IRT, 0, irte(V_OLD, EDU.0))?;
        // The queue (IQT = 0 first, as Linux does), then the table and remapping on.
        a.xor(eax, eax)?;
        a.mov(qword_ptr(r12 + IQT_REG as i32), rax)?;
        a.mov(rax, QUEUE)?;
        a.mov(qword_ptr(r12 + IQA_REG as i32), rax)?;
        gcmd(a, r12, GCMD_QIE, GSTS_QIES)?;
        enable_remapping(a, r12, IRTA, GCMD_QIE)?;
        // edu: bus mastering, MSI through IRTE 0.
        enable_msi(a, MsiMessage::remappable(0).address as u32, 0)?;
        // The first MSI fills the interrupt-entry cache.
        a.mov(dword_ptr(r13 + EDU_IRQ_RAISE), RAISED)?;
        wait_for_count(a, OLD, 1)?;
        // The IRTE changes; the fixed driver invalidates it (slot 0) and waits (slot 1) first.
        write_irte(a, IRT, 0, irte(V_NEW, EDU.0))?;
        if !bug {
            a.mov(rax, 2u64 << IQ_INDEX_SHIFT)?;
            a.mov(qword_ptr(r12 + IQT_REG as i32), rax)?;
            a.set_label(&mut after_submit)?;
        }
        a.mov(dword_ptr(r13 + EDU_IRQ_RAISE), RAISED)?;
        if bug {
            wait_for_count(a, OLD, 2)?;
            // Only a wait (slot 0 of its queue) follows.
            a.mov(rax, 1u64 << IQ_INDEX_SHIFT)?;
            a.mov(qword_ptr(r12 + IQT_REG as i32), rax)?;
            a.set_label(&mut after_submit)?;
        } else {
            wait_for_count(a, NEW, 1)?;
        }
        // power_off starts at a label of its own.
        a.nop()?;
        power_off(a)?;

        a.set_label(&mut on_old)?;
        edu::handler(a, r13, OLD, OLD_STATUS, false)?;
        a.set_label(&mut on_new)?;
        edu::handler(a, r13, NEW, NEW_STATUS, false)?;
        Ok([after_submit])
    })
}

#[test]
fn an_irte_changed_without_an_iec_invalidation_is_flagged_and_edu_msi_keeps_the_old_vector() {
    if !kvm_available() {
        return;
    }
    for bug in [true, false] {
        let (code, [after_submit]) = guest(bug);
        let out = Capture::default();
        let config = ViommuConfig {
            caching_mode: false,
            check: true,
            ..ViommuConfig::default()
        };
        let vmm = vm_with_irqchip(code, 1, Irqchip::Split, Some(config), &out);
        assert_eq!(vmm.add_edu().expect("add edu"), EDU, "edu at 00:01.0");
        let mem = vmm.guest_memory().clone();
        let slots = if bug {
            vec![encode::wait(Some((STATUS, 1)), false, false)]
        } else {
            vec![
                encode::interrupt_entry_cache(Some((0, 0))),
                encode::wait(Some((STATUS, 1)), false, false),
            ]
        };
        for (i, d) in slots.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(QUEUE + i as u64 * 16))
                .expect("guest memory");
        }
        let unit = vmm.vtd().expect("a VT-d").clone();
        watchdog(&vmm, 20);
        assert_eq!(vmm.run().expect("run"), VmExit::PowerOff, "{}", out.text());
        assert_eq!(read_u32(&mem, STATUS), 1, "the guest's wait completed");
        assert_eq!(read_u32(&mem, OLD_STATUS), RAISED);
        let violations = vmm::devices::vtd::lock(&unit).violations().to_vec();
        if !bug {
            assert_eq!((read_u64(&mem, OLD), read_u64(&mem, NEW)), (1, 1));
            assert_eq!(violations, vec![], "invalidated: clean");
            continue;
        }
        assert_eq!(
            (read_u64(&mem, OLD), read_u64(&mem, NEW)),
            (2, 0),
            "the cached entry, as on hardware"
        );
        let kinds: Vec<Kind> = violations.iter().map(|v| v.kind).collect();
        assert_eq!(kinds, vec![Kind::StaleIrte], "{violations:?}");
        let v = &violations[0];
        assert_eq!((v.source, v.index), (Some(EDU), Some(0)), "{v}");
        assert_eq!(v.descriptor, Some(0), "the wait's queue slot");
        assert_eq!(v.spec, Kind::StaleIrte.spec());
        let at = v.at.expect("the tail write behind the wait");
        assert_eq!((at.vcpu, at.rip), (0, after_submit), "{v}");
        assert!(after_submit > CODE);
    }
}
