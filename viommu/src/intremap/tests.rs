use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::{mem, Mem, TEST_MEM_SIZE};
use vm_device::interrupt::*;

const TABLE: u64 = 0x10_0000;
const DEV: SourceId = SourceId(0x0018); // 00:03.0

fn write_irte(m: &Mem, index: u32, lo: u64, hi: u64) {
    let addr = TABLE + u64::from(index) * 16;
    m.write_obj(lo, GuestAddress(addr)).expect("in memory");
    m.write_obj(hi, GuestAddress(addr + 8)).expect("in memory");
}

/// A present xAPIC-mode IRTE: vector, physical destination APIC id, fixed delivery.
fn irte_xapic(vector: u8, apic: u8) -> u64 {
    IRTE_LO_P | u64::from(vector) << 16 | u64::from(apic) << 40
}

fn state(entries_log2: u64, x2apic: bool) -> RemapState {
    RemapState {
        enabled: true,
        compat_allowed: false,
        table: Some(RemapTable::from_irta(
            TABLE | (entries_log2 - 1) | if x2apic { IRTA_EIME } else { 0 },
            true,
        )),
        unverified_source: None,
    }
}

fn fault_of(r: Result<MsiMessage, RemapFault>) -> (FaultReason, u16, bool) {
    let f = r.expect_err("the request must be blocked");
    (f.reason, f.index, f.fpd)
}

#[test]
fn irta_gives_base_size_and_mode() {
    let t = RemapTable::from_irta(0x1234_5000 | IRTA_EIME | 0xf, true);
    assert_eq!((t.base, t.entries, t.x2apic), (0x1234_5000, 65536, true));
    let t = RemapTable::from_irta(0x1234_5000 | IRTA_EIME, false);
    assert_eq!((t.entries, t.x2apic), (2, false), "EIME needs ECAP.EIM");
}

#[test]
fn requests_pass_unchanged_while_remapping_is_off() {
    let m = mem();
    let msg = MsiMessage::new(0xfee0_1000, 0x41);
    let off = RemapState::default();
    assert_eq!(translate(&m, &off, DEV, msg), Ok(msg));
    let remappable = MsiMessage::remappable(3);
    assert_eq!(translate(&m, &off, DEV, remappable), Ok(remappable));
}

#[test]
fn handle_and_subhandle_make_the_index() {
    let m = MsiMessage::remappable(0x8123);
    assert!(m.is_remappable() && m.is_interrupt());
    assert_eq!(m.handle(), 0x8123);
    assert_eq!(m.interrupt_index(), 0x8123);
    let shv = MsiMessage::new(m.address | MSI_ADDRESS_SHV, 5);
    assert_eq!(shv.interrupt_index(), 0x8128);
    let no_shv = MsiMessage::new(m.address, 5);
    assert_eq!(no_shv.interrupt_index(), 0x8123, "data ignored without SHV");
}

#[test]
fn xapic_entry_gives_vector_destination_and_modes() {
    let m = mem();
    let lo = irte_xapic(0x45, 3) | IRTE_LO_DM | IRTE_LO_RH | IRTE_LO_TM | 1 << IRTE_LO_DLM_SHIFT;
    write_irte(&m, 7, lo, 0);
    let out = translate(&m, &state(8, false), DEV, MsiMessage::remappable(7)).unwrap();
    assert_eq!(
        out.address,
        0xfee0_3000 | MSI_ADDRESS_REDIRECTION_HINT | MSI_ADDRESS_DEST_MODE_LOGICAL
    );
    assert_eq!(
        out.data,
        0x45 | 1 << 8 | MSI_DATA_TRIGGER_LEVEL | MSI_DATA_LEVEL_ASSERT
    );
    // Edge, physical, fixed.
    write_irte(&m, 7, irte_xapic(0x30, 0xfe), 0);
    let out = translate(&m, &state(8, false), DEV, MsiMessage::remappable(7)).unwrap();
    assert_eq!((out.address, out.data), (0xfee0_0000 | 0xfe << 12, 0x30));
}

#[test]
fn x2apic_entry_gives_a_32_bit_destination() {
    let m = mem();
    write_irte(&m, 1, IRTE_LO_P | 0x60 << 16 | 0x0001_2345 << 32, 0);
    let out = translate(&m, &state(8, true), DEV, MsiMessage::remappable(1)).unwrap();
    assert_eq!(out.address & 0xffff_ffff, 0xfee0_0000 | 0x45 << 12);
    assert_eq!(
        out.address >> 40,
        0x123,
        "destination bits 31:8 in address 63:40"
    );
    assert_eq!(out.data, 0x60);
}

#[test]
fn subhandle_selects_the_entry() {
    let m = mem();
    write_irte(&m, 10, irte_xapic(0x31, 0), 0);
    write_irte(&m, 12, irte_xapic(0x33, 0), 0);
    let base = MsiMessage::remappable(10);
    let msg = MsiMessage::new(base.address | MSI_ADDRESS_SHV, 2);
    let out = translate(&m, &state(8, false), DEV, msg).unwrap();
    assert_eq!(out.data & 0xff, 0x33);
}

#[test]
fn reserved_request_bits_fault_with_reason_0x20() {
    let m = mem();
    write_irte(&m, 1, irte_xapic(0x31, 0), 0);
    let msg = MsiMessage::new(MsiMessage::remappable(1).address, 1 << 16);
    assert_eq!(
        fault_of(translate(&m, &state(8, false), DEV, msg)),
        (FaultReason::IrRequestReserved, 1, false)
    );
}

#[test]
fn index_beyond_the_table_faults_with_reason_0x21() {
    let m = mem();
    // 2^(S+1) = 4 entries.
    assert_eq!(
        fault_of(translate(
            &m,
            &state(2, false),
            DEV,
            MsiMessage::remappable(4)
        )),
        (FaultReason::IrIndexBeyondTable, 4, false)
    );
    assert!(translate(&m, &state(2, false), DEV, MsiMessage::remappable(3)).is_err());
    let no_table = RemapState {
        enabled: true,
        ..RemapState::default()
    };
    assert_eq!(
        fault_of(translate(&m, &no_table, DEV, MsiMessage::remappable(0))).0,
        FaultReason::IrIndexBeyondTable
    );
}

#[test]
fn not_present_entry_faults_with_reason_0x22_and_honours_fpd() {
    let m = mem();
    write_irte(&m, 2, 0, 0);
    let s = state(8, false);
    assert_eq!(
        fault_of(translate(&m, &s, DEV, MsiMessage::remappable(2))),
        (FaultReason::IrEntryNotPresent, 2, false)
    );
    write_irte(&m, 2, IRTE_LO_FPD, 0);
    assert_eq!(
        fault_of(translate(&m, &s, DEV, MsiMessage::remappable(2))),
        (FaultReason::IrEntryNotPresent, 2, true)
    );
}

#[test]
fn table_outside_guest_memory_faults_with_reason_0x23() {
    let m = mem();
    let s = RemapState {
        enabled: true,
        compat_allowed: false,
        table: Some(RemapTable::from_irta((TEST_MEM_SIZE - 0x1000) | 0xf, false)),
        unverified_source: None,
    };
    assert_eq!(
        fault_of(translate(&m, &s, DEV, MsiMessage::remappable(0x200))),
        (FaultReason::IrTableAccess, 0x200, false)
    );
    let top = RemapState {
        table: Some(RemapTable::from_irta(!0xfff | 0xf, false)),
        ..s
    };
    assert_eq!(
        fault_of(translate(&m, &top, DEV, MsiMessage::remappable(0xffff))).0,
        FaultReason::IrTableAccess,
        "no wrap at the top of the address space"
    );
}

#[test]
fn every_reserved_irte_field_faults_with_reason_0x24() {
    let m = mem();
    let good = irte_xapic(0x40, 1);
    let cases: [(u64, u64, &str); 9] = [
        (good | 1 << 12, 0, "bit 12"),
        (good | 1 << 14, 0, "bit 14"),
        (good | 1 << 24, 0, "bit 24"),
        (good | IRTE_LO_IM, 0, "posted without CAP.PI"),
        (good | 1 << 32, 0, "xAPIC destination bits 39:32"),
        (good | 1 << 50, 0, "xAPIC destination bits 63:48"),
        (good, 1 << 20, "bit 84"),
        (good, 0b11 << IRTE_HI_SVT_SHIFT, "SVT 11b"),
        (good | 0b011 << IRTE_LO_DLM_SHIFT, 0, "delivery mode 011b"),
    ];
    for (lo, hi, what) in cases {
        write_irte(&m, 5, lo, hi);
        assert_eq!(
            fault_of(translate(
                &m,
                &state(8, false),
                DEV,
                MsiMessage::remappable(5)
            )),
            (FaultReason::IrEntryReserved, 5, false),
            "{what}"
        );
    }
    write_irte(&m, 5, good | IRTE_LO_FPD | 1 << 12, 0);
    assert!(
        fault_of(translate(
            &m,
            &state(8, false),
            DEV,
            MsiMessage::remappable(5)
        ))
        .2
    );
    // In x2APIC mode the whole destination field is valid.
    write_irte(&m, 5, good | 1 << 32 | 1 << 50, 0);
    assert!(translate(&m, &state(8, true), DEV, MsiMessage::remappable(5)).is_ok());
}

#[test]
fn compatibility_format_is_blocked_unless_cfis_in_xapic_mode() {
    let m = mem();
    let compat = MsiMessage::new(0xfee0_2000, 0x55);
    let mut s = state(8, false);
    assert_eq!(
        fault_of(translate(&m, &s, DEV, compat)),
        (FaultReason::IrCompatibilityBlocked, 0, false)
    );
    s.compat_allowed = true;
    assert_eq!(translate(&m, &s, DEV, compat), Ok(compat));
    let mut x2 = state(8, true);
    x2.compat_allowed = true;
    assert_eq!(
        fault_of(translate(&m, &x2, DEV, compat)).0,
        FaultReason::IrCompatibilityBlocked,
        "x2APIC mode blocks compatibility format whatever CFI says"
    );
}

#[test]
fn an_unverified_source_skips_source_validation_and_no_other_check() {
    let m = mem();
    let ioapic = SourceId::new(0xff, 0, 0);
    let mut s = state(8, false);
    let rid_of_another = SVT_REQUESTER_ID << IRTE_HI_SVT_SHIFT | 0x20; // 00:04.0
    write_irte(&m, 9, irte_xapic(0x40, 1), rid_of_another);
    let request = MsiMessage::remappable(9);
    assert_eq!(
        fault_of(translate(&m, &s, ioapic, request)).0,
        FaultReason::IrSourceIdMismatch
    );
    s.unverified_source = Some(ioapic);
    assert!(translate(&m, &s, ioapic, request).is_ok());
    assert_eq!(
        fault_of(translate(&m, &s, DEV, request)).0,
        FaultReason::IrSourceIdMismatch,
        "only that requester"
    );
    write_irte(&m, 9, 0, rid_of_another);
    assert_eq!(
        fault_of(translate(&m, &s, ioapic, request)).0,
        FaultReason::IrEntryNotPresent
    );
}

#[test]
fn source_validation_honours_sq_and_bus_ranges() {
    let m = mem();
    let lo = irte_xapic(0x40, 1);
    let sid = SourceId::new(0, 3, 0);
    let sibling = SourceId::new(0, 3, 5); // function bits 101b
    let s = state(8, false);
    let verdict = |hi: u64, source: SourceId| {
        write_irte(&m, 9, lo, hi);
        translate(&m, &s, source, MsiMessage::remappable(9))
    };
    let rid = |sq: u64| SVT_REQUESTER_ID << IRTE_HI_SVT_SHIFT | sq << IRTE_HI_SQ_SHIFT | 0x18;
    assert!(verdict(rid(0), sid).is_ok());
    assert_eq!(
        fault_of(verdict(rid(0), sibling)),
        (FaultReason::IrSourceIdMismatch, 9, false)
    );
    assert!(
        verdict(rid(1), SourceId::new(0, 3, 4)).is_ok(),
        "SQ 01 ignores bit 2"
    );
    assert!(verdict(rid(1), sibling).is_err(), "but not bit 0");
    assert!(verdict(rid(2), SourceId::new(0, 3, 6)).is_ok());
    assert!(
        verdict(rid(3), sibling).is_ok(),
        "SQ 11 ignores the function"
    );
    assert!(verdict(rid(3), SourceId::new(0, 4, 0)).is_err());
    let range = SVT_BUS_RANGE << IRTE_HI_SVT_SHIFT | 0x0204;
    assert!(verdict(range, SourceId::new(3, 9, 1)).is_ok());
    assert!(verdict(range, SourceId::new(5, 0, 0)).is_err());
    assert!(
        verdict(0, SourceId::new(9, 9, 1)).is_ok(),
        "SVT 00: no check"
    );
    write_irte(&m, 9, lo | IRTE_LO_FPD, rid(0));
    assert!(fault_of(translate(&m, &s, sibling, MsiMessage::remappable(9))).2);
}

#[test]
fn iec_scopes_cover_aligned_index_ranges() {
    let at = |i| MsiMessage::remappable(i);
    let s = IecScope::Index { index: 5, mask: 2 };
    assert!(s.covers(&at(4)) && s.covers(&at(7)));
    assert!(!s.covers(&at(3)) && !s.covers(&at(8)));
    assert!(!s.covers(&MsiMessage::new(0xfee0_0000, 0x30)));
    assert!(IecScope::Global.covers(&MsiMessage::new(0xfee0_0000, 0x30)));
    let top = IecScope::Index {
        index: 0xffff,
        mask: 31,
    };
    assert!(top.covers(&at(0)), "a mask past 16 bits covers everything");
    assert_eq!(s.merge(s), s);
    assert_eq!(
        s.merge(IecScope::Index { index: 1, mask: 0 }),
        IecScope::Global
    );
}

/// The reference decoding the property test holds `translate` to: the spec's bit positions,
/// read one field at a time.
fn reference(
    entries: &[(u64, u64)],
    x2apic: bool,
    source: SourceId,
    index: u32,
) -> Result<(u8, u32), FaultReason> {
    let Some(&(lo, hi)) = entries.get(index as usize) else {
        return Err(FaultReason::IrIndexBeyondTable);
    };
    let bit = |v: u64, b: u32| (v >> b) & 1;
    let field =
        |v: u64, hi_bit: u32, lo_bit: u32| (v >> lo_bit) & ((1 << (hi_bit - lo_bit + 1)) - 1);
    if bit(lo, 0) == 0 {
        return Err(FaultReason::IrEntryNotPresent);
    }
    let dlm = field(lo, 7, 5);
    let dest_reserved = !x2apic && (field(lo, 39, 32) != 0 || field(lo, 63, 48) != 0);
    if field(lo, 14, 12) != 0
        || bit(lo, 15) != 0
        || field(lo, 31, 24) != 0
        || dest_reserved
        || field(hi, 63, 20) != 0
        || field(hi, 19, 18) == 3
        || dlm == 3
        || dlm == 6
    {
        return Err(FaultReason::IrEntryReserved);
    }
    let sid = field(hi, 15, 0) as u16;
    let allowed = match field(hi, 19, 18) {
        0 => true,
        1 => {
            let ignore = [0u16, 4, 6, 7][field(hi, 17, 16) as usize];
            source.0 & !ignore == sid & !ignore
        }
        _ => (sid >> 8) as u8 <= source.bus() && source.bus() <= sid as u8,
    };
    if !allowed {
        return Err(FaultReason::IrSourceIdMismatch);
    }
    let dest = if x2apic {
        field(lo, 63, 32) as u32
    } else {
        field(lo, 47, 40) as u32
    };
    Ok((field(lo, 23, 16) as u8, dest))
}

fn irte_strategy() -> impl Strategy<Value = (u64, u64)> {
    // Mostly well-formed entries (present, sane reserved bits), some arbitrary ones.
    let sane = (
        any::<u8>(),
        any::<u32>(),
        0u64..3,
        any::<u16>(),
        0u64..4,
        0u64..8,
    )
        .prop_map(|(vector, dest, svt, sid, sq, dlm)| {
            let dlm = if dlm == 3 || dlm == 6 { 0 } else { dlm };
            (
                1 | dlm << 5 | u64::from(vector) << 16 | u64::from(dest) << 32,
                svt << 18 | sq << 16 | u64::from(sid),
            )
        });
    prop_oneof![3 => sane, 1 => (any::<u64>(), any::<u64>())]
}

proptest! {
    #[test]
    fn translation_matches_the_reference_and_never_exceeds_the_table(
        entries in prop::collection::vec(irte_strategy(), 1..16),
        x2apic: bool,
        source: u16,
        handle: u16,
        subhandle: u16,
        shv: bool,
    ) {
        let m = mem();
        for (i, &(lo, hi)) in entries.iter().enumerate() {
            write_irte(&m, i as u32, lo, hi);
        }
        // The table is sized to a power of two at least as large as the entries written; the
        // ones past them read as zero (not present).
        let log2 = (entries.len() as u64).next_power_of_two().trailing_zeros().max(1);
        let s = state(u64::from(log2), x2apic);
        let size = 1usize << log2;
        let mut table = entries.clone();
        table.resize(size, (0, 0));
        let handle = handle % 32;
        let mut msg = MsiMessage::remappable(handle);
        if shv {
            msg = MsiMessage::new(msg.address | MSI_ADDRESS_SHV, u32::from(subhandle % 16));
        }
        let source = SourceId(source);
        let index = msg.interrupt_index();
        match (translate(&m, &s, source, msg), reference(&table, x2apic, source, index)) {
            (Ok(out), Ok((vector, dest))) => {
                prop_assert_eq!(out.data & 0xff, u32::from(vector));
                let got = (out.address >> 12) as u32 & 0xff | ((out.address >> 32) as u32 & !0xff);
                prop_assert_eq!(got, dest);
                prop_assert!(out.address & MSI_ADDRESS_FORMAT_REMAPPABLE == 0, "delivered in compatibility format");
            }
            (Err(f), Err(reason)) => {
                prop_assert_eq!(f.reason, reason);
                prop_assert_eq!(u32::from(f.index), index);
            }
            (got, want) => prop_assert!(false, "translate {:?}, reference {:?}", got, want),
        }
    }
}
