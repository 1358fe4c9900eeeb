//! Interrupt remapping in the unit: capabilities, GCMD commands, remapped requests and their
//! faults, and the interrupt-entry cache as the routes a VMM holds.

use std::sync::{Arc, Mutex};

use super::*;
use crate::intremap::{IecScope, InterruptRoutes, Translate, IRTA_EIME};
use crate::testing::DRIVER_STATUS;
use vm_device::interrupt::MsiMessage;

const IRT: u64 = 30 << 20;
const IR_DEV: SourceId = SourceId(0x0018);

fn ir_config(x2apic: bool) -> VtdConfig {
    VtdConfig {
        interrupt_remapping: true,
        x2apic,
        ..VtdConfig::default()
    }
}

fn ir_fixture() -> Fixture {
    fixture_with(ir_config(true), SimHost::new())
}

fn write_irte(f: &Fixture, index: u64, lo: u64, hi: u64) {
    f.mem.write_obj(lo, GuestAddress(IRT + index * 16)).unwrap();
    f.mem
        .write_obj(hi, GuestAddress(IRT + index * 16 + 8))
        .unwrap();
}

/// A present x2APIC IRTE for `vector` on APIC `dest`, checked against IR_DEV's requester id.
fn irte(vector: u8, dest: u32) -> (u64, u64) {
    (
        1 | u64::from(vector) << 16 | u64::from(dest) << 32,
        1 << 18 | u64::from(IR_DEV.0),
    )
}

/// A route as a VMM holds it: the source, the guest's message, what KVM would deliver.
type Route = (SourceId, MsiMessage, Option<MsiMessage>);

#[derive(Clone, Default)]
struct Routes {
    table: Arc<Mutex<Vec<Route>>>,
    scopes: Arc<Mutex<Vec<IecScope>>>,
    /// The wait status word's value each time the routes were re-translated.
    status_seen: Arc<Mutex<Vec<u32>>>,
    mem: Option<Mem>,
}

impl InterruptRoutes for Routes {
    fn retranslate(&mut self, scope: IecScope, translate: &mut Translate<'_>) {
        self.scopes.lock().unwrap().push(scope);
        if let Some(m) = &self.mem {
            let status = m.read_obj::<u32>(GuestAddress(DRIVER_STATUS)).unwrap();
            self.status_seen.lock().unwrap().push(status);
        }
        for (source, msg, out) in self.table.lock().unwrap().iter_mut() {
            if scope.covers(msg) {
                *out = translate(*source, *msg).ok();
            }
        }
    }
}

#[test]
fn remapping_is_advertised_only_when_configured() {
    let f = fixture();
    assert_eq!(f.r64(ECAP_REG) & (ECAP_IR | ECAP_EIM), 0);
    assert_eq!(f.r64(CAP_REG) & CAP_ESIRTPS, 0);
    let f = fixture_with(ir_config(false), SimHost::new());
    assert_eq!(f.r64(ECAP_REG) & (ECAP_IR | ECAP_EIM), ECAP_IR);
    assert_ne!(f.r64(CAP_REG) & CAP_ESIRTPS, 0);
    let f = ir_fixture();
    assert_eq!(f.r64(ECAP_REG) & (ECAP_IR | ECAP_EIM), ECAP_IR | ECAP_EIM);
    let bad = Vtd::new(
        VtdConfig {
            x2apic: true,
            ..VtdConfig::default()
        },
        mem(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    );
    assert_eq!(
        bad.err(),
        Some(ConfigError::ExtendedInterruptModeWithoutRemapping)
    );
}

#[test]
fn gcmd_sets_the_table_pointer_remapping_and_compatibility_status() {
    let mut f = ir_fixture();
    f.w64(IRTA_REG, IRT | IRTA_EIME | 7);
    assert_eq!(f.r64(IRTA_REG), IRT | IRTA_EIME | 7);
    assert_eq!(f.r32(GSTS_REG) & GSTS_IRTPS, 0);
    f.w32(GCMD_REG, GCMD_SIRTP);
    assert_ne!(f.r32(GSTS_REG) & GSTS_IRTPS, 0);
    // Linux writes GCMD as GSTS | command: the one-shot SIRTP repeats harmlessly.
    let gsts = f.r32(GSTS_REG);
    f.w32(GCMD_REG, gsts | GCMD_IRE);
    assert_ne!(f.r32(GSTS_REG) & GSTS_IRES, 0);
    assert!(f.vtd.interrupt_remapping_enabled());
    let gsts = f.r32(GSTS_REG);
    f.w32(GCMD_REG, gsts | GCMD_CFI);
    assert_ne!(f.r32(GSTS_REG) & GSTS_CFIS, 0);
    let gsts = f.r32(GSTS_REG);
    f.w32(GCMD_REG, gsts & !(GCMD_IRE | GCMD_CFI));
    assert_eq!(f.r32(GSTS_REG) & (GSTS_IRES | GSTS_CFIS), 0);
    assert_ne!(f.r32(GSTS_REG) & GSTS_IRTPS, 0, "IRTPS stays");
}

#[test]
fn remapping_commands_are_ignored_without_ecap_ir() {
    let mut f = fixture();
    f.w64(IRTA_REG, IRT | IRTA_EIME | 7);
    assert_eq!(
        f.r64(IRTA_REG),
        IRT | 7,
        "EIME is reserved without ECAP.EIM"
    );
    f.w32(GCMD_REG, GCMD_SIRTP | GCMD_IRE | GCMD_CFI);
    assert_eq!(f.r32(GSTS_REG) & (GSTS_IRTPS | GSTS_IRES | GSTS_CFIS), 0);
    let compat = MsiMessage::new(0xfee0_1000, 0x40);
    assert_eq!(f.vtd.remap_interrupt(IR_DEV, compat), Some(compat));
}

#[test]
fn remapped_requests_deliver_what_the_irte_says() {
    let mut f = ir_fixture();
    let (lo, hi) = irte(0x51, 0x1_0003);
    write_irte(&f, 4, lo, hi);
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    let out = f
        .vtd
        .remap_interrupt(IR_DEV, MsiMessage::remappable(4))
        .unwrap();
    assert_eq!(out.data, 0x51);
    assert_eq!(out.address, 0xfee0_3000 | 0x100 << 40);
    assert_eq!(f.vtd.stats().interrupts_remapped, 1);
    assert!(f.msi.take().is_empty(), "no fault event");
}

#[test]
fn a_blocked_request_leaves_a_fault_record_with_its_index_and_raises_the_fault_event() {
    let mut f = ir_fixture();
    f.w32(FEDATA_REG, 0x77);
    f.w32(FEADDR_REG, 0xfee0_0000);
    f.w32(FECTL_REG, 0);
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    // Entry 9 is not present.
    assert_eq!(
        f.vtd.remap_interrupt(IR_DEV, MsiMessage::remappable(9)),
        None
    );
    let lo = f.r64(FRCD_REG_BASE);
    let hi = f.r64(FRCD_REG_BASE + 8);
    assert_eq!(lo, 9 << 48, "interrupt index in FI bits 63:48");
    assert_eq!((hi >> 32) & 0xff, FaultReason::IrEntryNotPresent as u64);
    assert_eq!(hi & 0xffff, u64::from(IR_DEV.0));
    assert_eq!(hi & FRCD_HI_T, 0, "an interrupt request is a write");
    assert_ne!(hi & FRCD_HI_F, 0);
    assert_ne!(f.r32(FSTS_REG) & FSTS_PPF, 0);
    assert_eq!(
        f.msi.take(),
        vec![(0xfee0_0000, 0x77)],
        "not remapped itself"
    );
    let s = f.vtd.stats();
    assert_eq!((s.interrupt_faults, s.faults), (1, 0));
}

#[test]
fn fpd_keeps_the_fault_out_of_the_records() {
    let mut f = ir_fixture();
    let (lo, _) = irte(0x51, 3);
    // Source validation against another device, with FPD.
    write_irte(&f, 2, lo | 1 << 1, 1 << 18 | 0x0100);
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    assert_eq!(
        f.vtd.remap_interrupt(IR_DEV, MsiMessage::remappable(2)),
        None
    );
    assert_eq!(f.r64(FRCD_REG_BASE + 8) & FRCD_HI_F, 0);
    assert_eq!(f.vtd.stats().interrupt_faults, 1);
}

#[test]
fn iec_invalidation_retranslates_routes_before_the_wait_completes() {
    let mut f = ir_fixture();
    let routes = Routes {
        mem: Some(f.mem.clone()),
        ..Routes::default()
    };
    routes
        .table
        .lock()
        .unwrap()
        .extend([4u16, 5].map(|i| (IR_DEV, MsiMessage::remappable(i), None)));
    f.vtd.set_interrupt_routes(Box::new(routes.clone()));
    f.drv.enable_qi(&mut f.vtd);
    let (lo, hi) = irte(0x51, 1);
    write_irte(&f, 4, lo, hi);
    write_irte(&f, 5, irte(0x41, 1).0, hi);
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    // SIRTP and IRE each invalidated the whole cache.
    assert_eq!(
        *routes.scopes.lock().unwrap(),
        [IecScope::Global, IecScope::Global]
    );
    let out = |i: usize| routes.table.lock().unwrap()[i].2.map(|m| m.data & 0xff);
    assert_eq!((out(0), out(1)), (Some(0x51), Some(0x41)));
    // The guest retargets both entries but invalidates only entry 4: entry 5's route keeps
    // the old translation, as a hardware interrupt-entry cache would.
    write_irte(&f, 4, irte(0x60, 1).0, hi);
    write_irte(&f, 5, irte(0x61, 1).0, hi);
    routes.status_seen.lock().unwrap().clear();
    f.sync(&[encode::interrupt_entry_cache(Some((4, 0)))]);
    assert_eq!((out(0), out(1)), (Some(0x60), Some(0x41)));
    assert_eq!(
        *routes.status_seen.lock().unwrap(),
        [0],
        "routes re-translated before the wait wrote its status"
    );
    f.sync(&[encode::interrupt_entry_cache(None)]);
    assert_eq!(out(1), Some(0x61));
    // A route whose entry goes away stops delivering.
    write_irte(&f, 4, 0, 0);
    f.sync(&[encode::interrupt_entry_cache(Some((4, 1)))]);
    assert_eq!(out(0), None);
    assert_eq!(f.vtd.stats().iec_invalidations, 5);
    assert_eq!(f.vtd.stats().descriptors_by_type.interrupt_entry_cache, 3);
}

#[test]
fn compatibility_format_follows_cfi_and_is_blocked_in_x2apic_mode() {
    let compat = MsiMessage::new(0xfee0_1000, 0x40);
    let mut f = fixture_with(ir_config(false), SimHost::new());
    f.drv.set_interrupt_remapping(&mut f.vtd, IRT | 7, true);
    assert_eq!(f.vtd.remap_interrupt(IR_DEV, compat), None);
    let gsts = f.r32(GSTS_REG);
    f.w32(GCMD_REG, gsts | GCMD_CFI);
    assert_eq!(f.vtd.remap_interrupt(IR_DEV, compat), Some(compat));
    let mut f = ir_fixture();
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    let gsts = f.r32(GSTS_REG);
    f.w32(GCMD_REG, gsts | GCMD_CFI);
    assert_eq!(f.vtd.remap_interrupt(IR_DEV, compat), None);
    assert_eq!(
        (f.r64(FRCD_REG_BASE + 8) >> 32) & 0xff,
        FaultReason::IrCompatibilityBlocked as u64
    );
}

#[test]
fn a_route_translation_counts_as_remapped_but_records_no_fault() {
    let mut f = ir_fixture();
    let (lo, hi) = irte(0x51, 2);
    write_irte(&f, 4, lo, hi);
    let compat = MsiMessage::new(0xfee0_1000, 0x40);
    assert_eq!(f.vtd.translate_route(IR_DEV, compat), Ok(compat));
    assert_eq!(f.vtd.stats().interrupts_remapped, 0, "remapping is off");
    f.drv
        .set_interrupt_remapping(&mut f.vtd, IRT | IRTA_EIME | 7, true);
    let out = f
        .vtd
        .translate_route(IR_DEV, MsiMessage::remappable(4))
        .unwrap();
    assert_eq!((out.address, out.data), (0xfee0_2000, 0x51));
    assert_eq!(f.vtd.stats().interrupts_remapped, 1);
    let fault = f
        .vtd
        .translate_route(IR_DEV, MsiMessage::remappable(9))
        .unwrap_err();
    assert_eq!(fault.reason, FaultReason::IrEntryNotPresent);
    assert_eq!(f.r64(FRCD_REG_BASE + 8) & FRCD_HI_F, 0, "no fault record");
    let s = f.vtd.stats();
    assert_eq!((s.interrupts_remapped, s.interrupt_faults), (1, 0));
}
