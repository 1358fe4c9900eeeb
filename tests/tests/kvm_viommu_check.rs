//! The VT-d protocol checker in a real KVM VM on this machine: small guests that each commit one
//! IOMMU driver bug on purpose while edu DMAs behind the unit, flagged with the right kind,
//! IOVA, descriptor and the guest instruction behind it; the same guests without the bug are
//! clean; with the checker off the stale-translation guest reads the stale data, as it would on
//! hardware; with ATS on edu, a device-TLB left holding a remapped page is flagged and the
//! device reads the stale data, as on hardware. (The fourth bug of the set, an IRTE changed without an interrupt-entry-cache
//! invalidation, is `kvm_viommu_check_iec`'s: it needs the split irqchip and interrupt
//! remapping.)

use iced_x86::code_asm::*;
use integration::small_guest::{asm64_labels, kvm_available, read_u64, Capture, CODE, RESULTS};
use integration::vtd_guest::{edu_dma, enable_edu, vm_with_vtd, watchdog};
use viommu::check::{Kind, Violation};
use viommu::descriptor::encode;
use viommu::regs::*;
use viommu::testing::Tables;
use viommu::{Perm, SourceId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::layout::{PCI_ECAM_START, VTD_REGS_START};
use vmm::config::ViommuConfig;
use vmm::devices::vtd;
use vmm::VmExit;

const TABLES: u64 = 0x60_0000;
const QUEUE: u64 = 0x54_0000;
const STATUS: u64 = 0x54_1000;
/// Two pages the IOVA maps in turn, each filled with its own pattern.
const PAGE_A: u64 = 0x50_0000;
const PAGE_B: u64 = 0x50_1000;
const PATTERN_A: u64 = 0xaaaa_aaaa_0000_000a;
const PATTERN_B: u64 = 0xbbbb_bbbb_0000_000b;
const IOVA: u64 = 0x0800_0000;
/// Where the guest's results page is mapped for edu, which writes each DMA's data there (its
/// buffer is not in its BAR, as on QEMU's); apart from IOVA's pages and never changed.
const RESULTS_IOVA: u64 = 0x0801_0000;
const DOMAIN: u16 = 1;
const EDU: SourceId = SourceId(0x0008);
/// Context entry translation type 01b (VT-d 9.3): untranslated requests and translation
/// requests, as Linux sets it for a device whose ATS it enables.
const TT_DEVICE_TLB: u64 = 0b01 << 2;
/// edu's ATS Control register (its ATS capability is at 0x100, the control at +6), through
/// ECAM: extended configuration space is out of the 0xcf8/0xcfc mechanism's reach.
const EDU_ATS_CONTROL: u64 = PCI_ECAM_START + (1 << 15) + 0x106;
const ATS_ENABLE: u32 = 0x8000;

/// The unit as a driver developer runs it: the hardware path (no caching mode), the checker on.
fn checked() -> ViommuConfig {
    ViommuConfig {
        caching_mode: false,
        check: true,
        ..ViommuConfig::default()
    }
}

/// The set-up descriptors every guest submits first: global context and IOTLB invalidations
/// and a wait, in queue slots 0 to 2.
fn setup_slots() -> Vec<[u64; 2]> {
    vec![
        encode::context_global(),
        encode::iotlb_global(),
        encode::wait(Some((STATUS, 1)), false, false),
    ]
}

/// Emits the set-up: root table, queue, the set-up descriptors, translation on; rbx = the
/// register block, r12 = edu's BAR0. Clobbers rax, edx.
fn set_up(a: &mut CodeAssembler) -> Result<(), IcedError> {
    enable_edu(a)?;
    a.mov(rbx, VTD_REGS_START)?;
    a.mov(rax, TABLES)?;
    a.mov(qword_ptr(rbx + RTADDR_REG), rax)?;
    a.mov(dword_ptr(rbx + GCMD_REG), GCMD_SRTP)?;
    a.xor(eax, eax)?;
    a.mov(qword_ptr(rbx + IQT_REG), rax)?;
    a.mov(rax, QUEUE)?;
    a.mov(qword_ptr(rbx + IQA_REG), rax)?;
    a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE)?;
    submit(a, 3)?;
    a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE | GCMD_TE)
}

/// Emits a tail write that submits the queue up to slot `tail`.
fn submit(a: &mut CodeAssembler, tail: u64) -> Result<(), IcedError> {
    a.mov(rax, tail << IQ_INDEX_SHIFT)?;
    a.mov(qword_ptr(rbx + IQT_REG), rax)
}

/// Emits an edu DMA of 8 bytes from `iova` into its buffer, then one of them out to
/// RESULTS + 8 * `slot` (through RESULTS_IOVA).
fn dma_read(a: &mut CodeAssembler, iova: u64, slot: u64) -> Result<(), IcedError> {
    edu_dma(a, iova, 8, false)?;
    edu_dma(a, RESULTS_IOVA + 8 * slot, 8, true)
}

/// Emits a guest write of `value` to the page-table entry at `pte`.
fn write_pte(a: &mut CodeAssembler, pte: u64, value: u64) -> Result<(), IcedError> {
    a.mov(rcx, pte)?;
    a.mov(rax, value)?;
    a.mov(qword_ptr(rcx), rax)
}

/// The guest's tables: edu's context entry in DOMAIN (allowing translation requests when
/// `ats`), IOVA mapped to PAGE_A, RESULTS_IOVA to RESULTS. Returns the address of IOVA's leaf
/// entry.
fn tables(mem: &GuestMemoryMmap, ats: bool) -> u64 {
    let mut t = Tables::at(mem, TABLES);
    let pt = t.context(EDU, DOMAIN, 3);
    if ats {
        let [lo, hi] = t.read_context_raw(EDU);
        t.write_context_raw(EDU, lo | TT_DEVICE_TLB, hi);
    }
    t.map(pt, IOVA, PAGE_A, 0x1000, Perm::RW);
    t.map(pt, RESULTS_IOVA, RESULTS, 0x1000, Perm::RW);
    t.leaf_pte_addr(pt, IOVA)
}

/// The leaf entry address the tables put IOVA's mapping at (the host writes the same tables
/// into every guest's memory, so it is known before the code is assembled).
fn leaf_entry() -> u64 {
    let scratch =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("scratch memory");
    tables(&scratch, false)
}

/// What a guest run left: the violations the checker kept and the guest's results.
struct Run {
    violations: Vec<Violation>,
    results: Vec<u64>,
    checked: bool,
}

/// Runs `code` with the unit as `config`, the queue holding `slots`, guest memory holding the
/// tables (allowing ATS when the unit has device-TLBs) and both pages' patterns.
fn run(config: ViommuConfig, code: Vec<u8>, slots: &[[u64; 2]]) -> Run {
    let ats = config.device_iotlb;
    let vmm = vm_with_vtd(code, false, &Capture::default(), config);
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d was asked for").clone();
    let source = vmm.add_edu().expect("add edu");
    assert_eq!(source, EDU, "edu sits at 00:01.0");
    tables(&mem, ats);
    for (page, pattern) in [(PAGE_A, PATTERN_A), (PAGE_B, PATTERN_B)] {
        mem.write_obj(pattern, GuestAddress(page))
            .expect("guest memory");
    }
    for (i, d) in slots.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(QUEUE + i as u64 * 16))
            .expect("guest memory");
    }
    watchdog(&vmm);
    assert_eq!(vmm.run().expect("run"), VmExit::Halted);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(STATUS)).expect("status"),
        u32::from(slots.len() > 3) + 1,
        "the guest's last wait completed"
    );
    let unit = vtd::lock(&unit);
    Run {
        violations: unit.violations().to_vec(),
        results: (0..4).map(|i| read_u64(&mem, RESULTS + 8 * i)).collect(),
        checked: unit.check_counts().enabled,
    }
}

fn kinds(r: &Run) -> Vec<Kind> {
    r.violations.iter().map(|v| v.kind).collect()
}

/// Asserts what a guest that remapped IOVA from PAGE_A to PAGE_B between two DMAs read: with
/// `bug` (a missing invalidation) the old page twice, served from the `stale` cache; else the
/// old page, then the new one. Unless the checker was on and the bug committed, asserts that
/// nothing was flagged; returns whether there are violations to look at.
fn remap_flagged(r: &Run, bug: bool, check: bool, stale: &str) -> bool {
    assert_eq!(r.results[0], PATTERN_A, "through the first mapping");
    if bug {
        assert_eq!(r.results[1], PATTERN_A, "{stale}");
    } else {
        assert_eq!(r.results[1], PATTERN_B, "invalidated: the new page");
    }
    if !check {
        assert!(!r.checked && r.violations.is_empty());
        return false;
    }
    if !bug {
        assert_eq!(
            r.violations,
            vec![],
            "the same guest without the bug is clean"
        );
        return false;
    }
    true
}

/// KVM reports a completed MMIO write's exit with RIP past the instruction: the instruction a
/// driver developer looks for ends at the address the checker names.
fn assert_after(v: &Violation, ip: u64) {
    let at = v.at.expect("the instruction behind the register write");
    assert_eq!((at.vcpu, at.rip), (0, ip), "{v}");
}

#[test]
fn a_pte_changed_without_invalidation_is_flagged_stale_and_the_device_reads_the_old_page() {
    if !kvm_available() {
        return;
    }
    let pte = leaf_entry();
    // bug: the PTE now maps PAGE_B, no invalidation, then an unrelated wait (which the
    // checker takes as the driver declaring its invalidations done).
    for (bug, check) in [(true, true), (false, true), (true, false)] {
        let mut slots = setup_slots();
        if !bug {
            slots.push(encode::iotlb_page(DOMAIN, IOVA, 0, false));
        }
        slots.push(encode::wait(Some((STATUS, 2)), false, false));
        let tail = slots.len() as u64;
        let (code, [after_wait]) = asm64_labels(|a| {
            let mut after_wait = a.create_label();
            set_up(a)?;
            dma_read(a, IOVA, 0)?;
            write_pte(a, pte, PAGE_B | 3)?;
            if !bug {
                submit(a, tail)?;
            }
            dma_read(a, IOVA, 1)?;
            if bug {
                submit(a, tail)?;
            }
            a.set_label(&mut after_wait)?;
            a.hlt()?;
            Ok([after_wait])
        });
        let config = ViommuConfig { check, ..checked() };
        let r = run(config, code, &slots);
        if !remap_flagged(&r, bug, check, "the stale IOTLB entry, as on hardware") {
            continue;
        }
        assert_eq!(kinds(&r), vec![Kind::StaleIotlb], "{:?}", r.violations);
        let v = &r.violations[0];
        assert_eq!(
            (v.source, v.domain, v.iova),
            (Some(EDU), Some(DOMAIN), Some(IOVA))
        );
        assert_eq!(v.descriptor, Some(3), "the wait that found it still stale");
        assert_eq!(v.register.map(|w| w.name), Some("IQT"));
        assert_after(v, after_wait);
        let request = v.request_at.expect("the edu command write behind the DMA");
        assert!((CODE..after_wait).contains(&request.rip), "{v}");
    }
}

#[test]
fn a_psi_misaligned_to_its_mask_is_flagged_with_its_address() {
    if !kvm_available() {
        return;
    }
    for addr in [IOVA + 0x1000, IOVA] {
        let mut slots = setup_slots();
        slots.push(encode::iotlb_page(DOMAIN, addr, 1, false));
        slots.push(encode::wait(Some((STATUS, 2)), false, false));
        let (code, [after]) = asm64_labels(|a| {
            let mut after = a.create_label();
            set_up(a)?;
            submit(a, 5)?;
            a.set_label(&mut after)?;
            a.hlt()?;
            Ok([after])
        });
        let r = run(checked(), code, &slots);
        if addr == IOVA {
            assert_eq!(r.violations, vec![], "aligned to its 2 pages: clean");
            continue;
        }
        assert_eq!(kinds(&r), vec![Kind::MisalignedInvalidation]);
        let v = &r.violations[0];
        assert_eq!((v.iova, v.domain), (Some(addr), Some(DOMAIN)));
        assert_eq!(v.descriptor, Some(3), "the PSI's queue slot");
        assert_eq!(v.spec, Kind::MisalignedInvalidation.spec());
        assert_after(v, after);
    }
}

#[test]
fn an_iova_reused_before_the_wait_of_its_unmap_is_flagged() {
    if !kvm_available() {
        return;
    }
    let pte = leaf_entry();
    for bug in [true, false] {
        let mut slots = setup_slots();
        slots.push(encode::iotlb_page(DOMAIN, IOVA, 0, false));
        slots.push(encode::wait(Some((STATUS, 2)), false, false));
        let (code, [dma]) = asm64_labels(|a| {
            let mut dma = a.create_label();
            set_up(a)?;
            dma_read(a, IOVA, 0)?;
            // Unmap: the PTE cleared and its PSI queued; the buggy driver does not wait.
            write_pte(a, pte, 0)?;
            submit(a, if bug { 4 } else { 5 })?;
            // Reuse: the IOVA mapped to another page and handed to the device.
            write_pte(a, pte, PAGE_B | 3)?;
            a.set_label(&mut dma)?;
            dma_read(a, IOVA, 1)?;
            if bug {
                submit(a, 5)?;
            }
            a.hlt()?;
            Ok([dma])
        });
        let r = run(checked(), code, &slots);
        assert_eq!(r.results[..2], [PATTERN_A, PATTERN_B]);
        if !bug {
            assert_eq!(r.violations, vec![], "waited for: clean");
            continue;
        }
        assert_eq!(kinds(&r), vec![Kind::ReuseBeforeWait], "{:?}", r.violations);
        let v = &r.violations[0];
        assert_eq!((v.source, v.iova), (Some(EDU), Some(IOVA)));
        assert_eq!(v.descriptor, Some(3), "the PSI not waited for");
        let request = v.request_at.expect("the edu command write");
        assert!(request.rip > dma, "{v}");
    }
}

#[test]
fn a_device_tlb_left_holding_a_remapped_page_is_flagged_and_the_device_reads_the_old_page() {
    if !kvm_available() {
        return;
    }
    let pte = leaf_entry();
    // The driver remaps IOVA and invalidates the IOTLB (a PSI and its wait); then, in the next
    // submission, the device-TLB invalidation (Linux's order) or, the bug, a wait alone.
    for (bug, check) in [(true, true), (false, true), (true, false)] {
        let mut slots = setup_slots();
        slots.push(encode::iotlb_page(DOMAIN, IOVA, 0, false));
        slots.push(encode::wait(Some((STATUS, 2)), false, false));
        let iotlb_tail = slots.len() as u64;
        if !bug {
            slots.push(encode::device_iotlb(EDU, IOVA, false));
        }
        slots.push(encode::wait(Some((STATUS, 2)), false, false));
        let tail = slots.len() as u64;
        let (code, [after_wait]) = asm64_labels(|a| {
            let mut after_wait = a.create_label();
            set_up(a)?;
            a.mov(rcx, EDU_ATS_CONTROL)?;
            a.mov(word_ptr(rcx), ATS_ENABLE)?;
            dma_read(a, IOVA, 0)?;
            write_pte(a, pte, PAGE_B | 3)?;
            submit(a, iotlb_tail)?;
            submit(a, tail)?;
            a.set_label(&mut after_wait)?;
            dma_read(a, IOVA, 1)?;
            a.hlt()?;
            Ok([after_wait])
        });
        let config = ViommuConfig {
            device_iotlb: true,
            check,
            ..checked()
        };
        let r = run(config, code, &slots);
        if !remap_flagged(&r, bug, check, "the stale device-TLB entry, as on hardware") {
            continue;
        }
        // The missing invalidation, found at the wait after the IOTLB one's; then the translated
        // request that used the stale entry, found when the VM stopped.
        assert_eq!(
            kinds(&r),
            vec![Kind::MissingDeviceTlbInvalidation, Kind::StaleDeviceTlb],
            "{:?}",
            r.violations
        );
        for v in &r.violations {
            assert_eq!(
                (v.source, v.domain, v.iova),
                (Some(EDU), Some(DOMAIN), Some(IOVA)),
                "{v}"
            );
        }
        let missing = &r.violations[0];
        assert_eq!(
            missing.descriptor,
            Some(tail - 1),
            "the wait that found it still cached"
        );
        assert_eq!(missing.register.map(|w| w.name), Some("IQT"));
        assert_after(missing, after_wait);
        let stale = &r.violations[1];
        let request = stale
            .request_at
            .expect("the edu command write behind the DMA");
        assert!(request.rip > after_wait, "the second DMA: {stale}");
    }
}
