//! The register file: what the table promises for every register (reset values, read-only,
//! read-write and write-1-to-clear bits, 32-bit halves, reserved offsets), and the image a VMM
//! publishes, held equal to what guest reads return.

use proptest::prelude::*;

use super::*;
use crate::registers::{locate, Derived, Instances, Register, Storage, Width, REGISTERS};

/// A unit with state in every kind of register: queued invalidation and translation on, a fault
/// recorded and its event pending, an invalidation completion pending.
fn busy() -> Fixture {
    let mut f = fixture();
    f.linux_boot();
    let _ = f.vtd.translate(DEV, 0x9000, Access::Write);
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::wait(None, true, false)]);
    assert!(f.r32(FSTS_REG) & FSTS_PPF != 0 && f.r32(ICS_REG) & ICS_IWC != 0);
    f
}

fn image(vtd: &Vtd<Mem>) -> [u64; REG_IMAGE_WORDS] {
    let mut image = [0; REG_IMAGE_WORDS];
    vtd.register_image(&mut image);
    image
}

/// Every 8- and 4-byte read of the window returns what the register image holds there.
fn assert_image_matches_reads(vtd: &Vtd<Mem>) {
    for (i, &word) in image(vtd).iter().enumerate() {
        let offset = i as u64 * 8;
        assert_eq!(
            Driver::read64(vtd, offset),
            word,
            "8-byte read at {offset:#x}"
        );
        for half in 0..2u64 {
            let at = offset + half * 4;
            let want = (word >> (half * 32)) as u32;
            assert_eq!(Driver::read32(vtd, at), want, "4-byte read at {at:#x}");
        }
    }
}

/// Every register of the window with its offset: single ones, and each fault record's
/// quadwords up to `records`.
fn instances(records: usize) -> Vec<(u64, &'static Register)> {
    REGISTERS
        .iter()
        .flat_map(|r| {
            let count = match r.instances {
                Instances::One => 1,
                Instances::PerFaultRecord => records,
            };
            (0..count as u64).map(move |k| (r.offset + k * FRCD_REG_SIZE, r))
        })
        .collect()
}

impl Fixture {
    /// Reads the register `r` at `offset` with one access of its width.
    fn read(&self, offset: u64, r: &Register) -> u64 {
        match r.width {
            Width::W32 => u64::from(self.r32(offset)),
            Width::W64 => self.r64(offset),
        }
    }

    /// Writes the register `r` at `offset` with one access of its width.
    fn write(&mut self, offset: u64, r: &Register, v: u64) {
        match r.width {
            Width::W32 => self.w32(offset, v as u32),
            Width::W64 => self.w64(offset, v),
        }
    }
}

#[test]
fn every_register_reads_its_reset_value() {
    let f = fixture();
    let cap = CAP_ND_16BIT
        | CAP_CM
        | CAP_SAGAW_39
        | CAP_SAGAW_48
        | 47 << CAP_MGAW_SHIFT
        | (FRCD_REG_BASE / 16) << CAP_FRO_SHIFT
        | CAP_SLLPS_2M
        | CAP_SLLPS_1G
        | CAP_PSI
        | 7 << CAP_NFR_SHIFT
        | MAMV << CAP_MAMV_SHIFT
        | CAP_DWD
        | CAP_DRD
        | CAP_ESRTPS;
    let ecap = ECAP_C | ECAP_QI | ECAP_PT | (IOTLB_REG_BASE / 16) << ECAP_IRO_SHIFT;
    for (offset, r) in instances(MAX_FAULT_RECORDS) {
        let want = match r.storage {
            Storage::Stored { reset } => reset,
            Storage::WriteOnly => 0,
            Storage::Derived(Derived::Capability) => cap,
            Storage::Derived(Derived::ExtendedCapability) => ecap,
            // No fault, no queue error, the queue at its start.
            Storage::Derived(
                Derived::FaultStatus
                | Derived::QueueHead
                | Derived::FaultRecord { .. }
                | Derived::QueueErrorRecord,
            ) => 0,
        };
        assert_eq!(f.read(offset, r), want, "{} at {offset:#x}", r.name);
    }
    // What the table says, spelled out for the registers whose reset is not zero.
    assert_eq!(f.r32(VER_REG), VER_VALUE);
    assert_eq!(f.r32(FECTL_REG), ECTL_IM);
    assert_eq!(f.r32(IECTL_REG), ECTL_IM);
}

#[test]
fn read_only_and_reserved_bits_ignore_writes_whole_and_by_halves() {
    let mut f = busy();
    for (offset, r) in instances(VtdConfig::default().fault_records) {
        if r.storage == Storage::WriteOnly {
            continue;
        }
        // Every read-only and reserved bit set, read-write bits as they are, RW1C bits zero.
        let current = f.read(offset, r);
        let v = (!r.writable() | (current & r.rw)) & r.width.mask();
        let before = image(&f.vtd);
        f.write(offset, r, v);
        assert_eq!(image(&f.vtd), before, "{} at {offset:#x}", r.name);
        if r.width == Width::W64 {
            f.w32(offset, v as u32);
            f.w32(offset + 4, (v >> 32) as u32);
            assert_eq!(image(&f.vtd), before, "{} halves at {offset:#x}", r.name);
        }
    }
    // GCMD reads as zero: rewrite its persistent commands with every reserved bit (IRE, SIRTP
    // and CFI among them, as ECAP.IR is clear).
    let gcmd = REGISTERS
        .iter()
        .find(|r| r.offset == GCMD_REG)
        .expect("GCMD");
    let before = image(&f.vtd);
    f.w32(GCMD_REG, GCMD_TE | GCMD_QIE | gcmd.reserved() as u32);
    assert_eq!(image(&f.vtd), before);
    assert_eq!(f.r32(GCMD_REG), 0);
}

#[test]
fn read_write_bits_read_back_whole_and_by_halves() {
    for r in REGISTERS.iter().filter(|r| r.effect.is_none()) {
        let Storage::Stored { reset } = r.storage else {
            continue;
        };
        let mut f = fixture();
        let ro = reset & r.ro;
        f.write(r.offset, r, u64::MAX);
        assert_eq!(f.read(r.offset, r), ro | r.rw, "{}: all ones", r.name);
        f.write(r.offset, r, 0);
        assert_eq!(f.read(r.offset, r), ro, "{}: all zeros", r.name);
        if r.width == Width::W64 {
            f.w32(r.offset, u32::MAX);
            assert_eq!(
                f.r64(r.offset),
                ro | (r.rw & 0xffff_ffff),
                "{}: low",
                r.name
            );
            f.w32(r.offset + 4, u32::MAX);
            assert_eq!(f.r64(r.offset), ro | r.rw, "{}: high", r.name);
            f.w32(r.offset, 0);
            assert_eq!(
                f.r64(r.offset),
                ro | (r.rw & !0xffff_ffff),
                "{}: low cleared",
                r.name
            );
            assert_eq!(
                u64::from(f.r32(r.offset + 4)),
                r.rw >> 32,
                "{}: high half",
                r.name
            );
        }
    }
}

#[test]
fn write_one_to_clear_bits_clear_on_one_and_stay_on_zero() {
    let rw1c: Vec<&str> = REGISTERS
        .iter()
        .filter(|r| r.rw1c != 0)
        .map(|r| r.name)
        .collect();
    assert_eq!(
        rw1c,
        ["FSTS", "ICS", "FRCD.HI"],
        "a new RW1C register needs its case here"
    );
    let config = VtdConfig {
        fault_records: 1,
        ..VtdConfig::default()
    };
    let mut f = fixture_with(config, SimHost::new());
    f.linux_boot();
    // ICS.IWC, from a wait descriptor that asked for an interrupt.
    f.drv
        .submit(&mut f.vtd, &f.mem, &[encode::wait(None, true, false)]);
    f.w32(ICS_REG, !ICS_IWC);
    assert_eq!(f.r32(ICS_REG), ICS_IWC, "writing 0 leaves IWC");
    f.w32(ICS_REG, ICS_IWC);
    assert_eq!(f.r32(ICS_REG), 0);
    // FRCD.F, then FSTS.PFO from a second fault with the only record still full, and FSTS.IQE
    // from a descriptor of unknown type.
    for bus in 1..=2 {
        let _ = f.vtd.translate(SourceId::new(bus, 0, 0), 0, Access::Read);
    }
    f.drv.submit(&mut f.vtd, &f.mem, &[[0x7, 0]]);
    let set = FSTS_PFO | FSTS_PPF | FSTS_IQE;
    assert_eq!(f.r32(FSTS_REG) & set, set);
    f.w32(FSTS_REG, !FSTS_RW1C);
    assert_eq!(f.r32(FSTS_REG) & set, set, "writing 0 leaves PFO and IQE");
    f.w32(FSTS_REG, FSTS_PFO);
    assert_eq!(
        f.r32(FSTS_REG) & set,
        FSTS_PPF | FSTS_IQE,
        "only PFO clears"
    );
    // Fix the bad descriptor first: clearing IQE restarts the queue at it.
    let bad = f.drv.queue + (f.r64(IQH_REG) >> IQ_INDEX_SHIFT) * DESCRIPTOR_SIZE;
    f.mem
        .write_obj(encode::iotlb_global(), GuestAddress(bad))
        .expect("queue in memory");
    f.w32(FSTS_REG, FSTS_IQE);
    assert_eq!(f.r32(FSTS_REG) & set, FSTS_PPF);
    let hi = FRCD_REG_BASE + 8;
    f.w64(hi, !FRCD_HI_F);
    f.w32(hi, u32::MAX);
    assert!(f.r64(hi) & FRCD_HI_F != 0, "F stays unless written as 1");
    f.w32(hi + 4, (FRCD_HI_F >> 32) as u32);
    assert_eq!(
        f.r64(hi) & FRCD_HI_F,
        0,
        "a 4-byte write to the upper half clears F"
    );
    assert_eq!(f.r32(FSTS_REG) & FSTS_PPF, 0);
}

#[test]
fn thirty_two_bit_reads_of_every_64_bit_register_return_its_halves() {
    let f = busy();
    for (offset, r) in instances(VtdConfig::default().fault_records) {
        if r.width == Width::W64 {
            let v = f.r64(offset);
            assert_eq!(f.r32(offset), v as u32, "{} low", r.name);
            assert_eq!(f.r32(offset + 4), (v >> 32) as u32, "{} high", r.name);
        }
    }
}

#[test]
fn reserved_offsets_read_zero_and_drop_writes() {
    let mut f = busy();
    let before = image(&f.vtd);
    let reserved: Vec<u64> = (0..REG_WINDOW_SIZE)
        .step_by(4)
        .filter(|&o| locate(o).is_none())
        .collect();
    assert!(reserved.contains(&0x30) && reserved.contains(&0x98) && reserved.contains(&0x110));
    for &offset in &reserved {
        f.w32(offset, u32::MAX);
        assert_eq!(f.r32(offset), 0, "{offset:#x}");
        if offset.is_multiple_of(8) && reserved.contains(&(offset + 4)) {
            f.w64(offset, u64::MAX);
            assert_eq!(f.r64(offset), 0, "{offset:#x}");
        }
    }
    assert_eq!(image(&f.vtd), before);
    // Beyond the window, and fault records past CAP.NFR, are reserved too.
    f.w64(REG_WINDOW_SIZE, u64::MAX);
    let past = FRCD_REG_BASE + 8 * FRCD_REG_SIZE;
    f.w64(past + 8, u64::MAX);
    assert_eq!((f.r64(past), f.r64(past + 8)), (0, 0));
    assert_eq!(image(&f.vtd), before);
}

/// Offsets worth writing: every register's (and a fault record's), or anywhere in the window.
fn offset() -> impl Strategy<Value = u64> {
    let registers: Vec<u64> = instances(2).into_iter().map(|(o, _)| o).collect();
    prop_oneof![
        3 => prop::sample::select(registers).prop_flat_map(|o| prop_oneof![Just(o), Just(o + 4)]),
        1 => (0..REG_WINDOW_SIZE / 4).prop_map(|d| d * 4),
    ]
}

/// Values worth writing: all ones, all zeros, single bits, anything.
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(0u64),
        (0..64u32).prop_map(|b| 1u64 << b),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn register_image_equals_reads_after_random_writes(
        writes in prop::collection::vec((offset(), any::<bool>(), value()), 1..40)
    ) {
        let mut f = busy();
        for (offset, wide, v) in writes {
            if wide {
                f.w64(offset & !7, v);
            } else {
                f.w32(offset, v as u32);
            }
            assert_image_matches_reads(&f.vtd);
        }
    }
}

#[test]
fn reset_values_report_the_configured_capabilities() {
    let f = fixture();
    assert_eq!(f.r32(VER_REG), 0x10);
    let cap = f.r64(CAP_REG);
    assert_eq!(cap & 7, 6, "16-bit domain ids");
    assert!(cap & CAP_CM != 0);
    assert_eq!((cap >> 8) & 0x1f, 0b110, "SAGAW 39 and 48");
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
    assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD_REG_BASE);
    assert_eq!((cap >> 40) & 0xff, 7, "NFR is 8");
    assert_eq!((cap >> 48) & 0x3f, 18, "MAMV");
    assert!(cap & CAP_PSI != 0 && cap & CAP_SLLPS_2M != 0 && cap & CAP_SLLPS_1G != 0);
    let ecap = f.r64(ECAP_REG);
    assert!(ecap & ECAP_QI != 0 && ecap & ECAP_PT != 0 && ecap & ECAP_C != 0);
    assert_eq!(((ecap >> 8) & 0x3ff) * 16, IOTLB_REG_BASE);
    assert_eq!(f.r32(GSTS_REG), 0);
    assert_eq!(f.r32(FECTL_REG), ECTL_IM, "fault event masked at reset");
    assert_eq!(f.r32(IECTL_REG), ECTL_IM);
}

#[test]
fn read_only_registers_ignore_writes() {
    let mut f = fixture();
    let (cap, ecap) = (f.r64(CAP_REG), f.r64(ECAP_REG));
    f.w64(CAP_REG, 0);
    f.w64(ECAP_REG, 0);
    f.w32(VER_REG, 0);
    f.w32(GSTS_REG, u32::MAX);
    f.w64(IQH_REG, 0x50);
    assert_eq!((f.r64(CAP_REG), f.r64(ECAP_REG)), (cap, ecap));
    assert_eq!(f.r32(VER_REG), 0x10);
    assert_eq!(f.r32(GSTS_REG), 0);
    assert_eq!(f.r64(IQH_REG), 0);
    assert_eq!(f.r32(GCMD_REG), 0, "GCMD is write-only");
}

#[test]
fn sixty_four_bit_registers_take_two_32_bit_halves() {
    let mut f = fixture();
    f.w32(RTADDR_REG, 0x1234_5000);
    f.w32(RTADDR_REG + 4, 0x1);
    assert_eq!(f.r64(RTADDR_REG), 0x1_1234_5000);
    assert_eq!(f.r32(RTADDR_REG + 4), 1);
    f.w32(RTADDR_REG, 0x7000);
    assert_eq!(
        f.r64(RTADDR_REG),
        0x1_0000_7000,
        "a low write keeps the high half"
    );
}

#[test]
fn eight_byte_access_to_a_32_bit_pair_reaches_both_registers() {
    let mut f = fixture();
    f.w64(FEADDR_REG, 0x1_fee0_0000);
    assert_eq!(f.r32(FEADDR_REG), 0xfee0_0000);
    assert_eq!(f.r32(FEUADDR_REG), 0x1);
    assert_eq!(f.r64(FEADDR_REG), 0x1_fee0_0000);
}

#[test]
fn odd_sized_or_misaligned_accesses_are_ignored() {
    let mut f = fixture();
    f.vtd.mmio_write(FEDATA_REG, &[1, 2]);
    f.vtd.mmio_write(FEDATA_REG + 1, &[1, 2, 3, 4]);
    assert_eq!(f.r32(FEDATA_REG), 0);
    let mut b = [0xffu8; 2];
    f.vtd.mmio_read(VER_REG, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    f.vtd.mmio_read(0xfff, &mut b[..1]);
    f.vtd.mmio_read(REG_WINDOW_SIZE + 0x100, &mut b);
    assert_eq!(b, [0; 4], "beyond the window reads zero");
}

#[test]
fn register_image_matches_every_guest_read() {
    let mut f = fixture();
    f.linux_boot();
    // Some state in every kind of register: a fault record, FSTS, the queue, FECTL.
    let _ = f.vtd.translate(DEV, 0x9000, Access::Write);
    // A distinct value in every register a write can set without starting a command.
    for (i, reg) in [
        FEDATA_REG,
        FEADDR_REG,
        FEUADDR_REG,
        PLMBASE_REG,
        PLMLIMIT_REG,
        PHMBASE_REG,
        PHMBASE_REG + 4,
        PHMLIMIT_REG,
        PHMLIMIT_REG + 4,
        IEDATA_REG,
        IEADDR_REG,
        IEUADDR_REG,
        IRTA_REG,
        IRTA_REG + 4,
        RTADDR_REG + 4,
        AFLOG_REG,
        IVA_REG,
        IVA_REG + 4,
    ]
    .into_iter()
    .enumerate()
    {
        let v = 0x1111_1000u32.wrapping_mul(i as u32 + 1) | 0x10;
        f.vtd.mmio_write(reg, &v.to_le_bytes());
    }
    let mut image = [0u64; REG_IMAGE_WORDS];
    f.vtd.register_image(&mut image);
    assert_ne!(
        image[(FRCD_REG_BASE / 8) as usize + 1],
        0,
        "the fault is recorded"
    );
    assert_image_matches_reads(&f.vtd);
}

#[test]
fn a_guest_repeating_bad_accesses_and_descriptors_cannot_flood_the_log() {
    use vm_device::ratelimit::{capture::lines_logged_by, BURST};
    let mut f = fixture();
    f.drv.enable_qi(&mut f.vtd);
    let lines = lines_logged_by(|| {
        for _ in 0..5_000 {
            f.vtd.mmio_write(GCMD_REG, &[0u8; 2]); // bad size
            let mut b = [0u8; 3];
            f.vtd.mmio_read(FSTS_REG, &mut b);
            f.w64(CCMD_REG, CCMD_ICC); // granularity 0: ignored
                                       // An invalid descriptor stops the queue with IQE; clearing IQE retries it.
            f.drv.submit(&mut f.vtd, &f.mem, &[[0xf, 0]]);
            f.w32(FSTS_REG, FSTS_IQE);
            let iqh = f.r64(IQH_REG);
            f.w64(IQT_REG, iqh);
        }
    });
    assert!(
        lines.len() <= 6 * BURST as usize,
        "{} lines for 20000 bad accesses",
        lines.len()
    );
}
