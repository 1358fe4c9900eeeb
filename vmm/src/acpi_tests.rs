//! Checks of ACPI table checksums, pointers and content.

use super::*;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn build(vcpus: u32, extra: Vec<Vec<u8>>) -> Vec<(u64, Vec<u8>)> {
    AcpiTables::build(&AcpiConfig {
        vcpus,
        ram_size: 512 << 20,
        extra_tables: extra,
        pcat_compat: true,
    })
    .unwrap()
    .blobs
}

fn find<'a>(blobs: &'a [(u64, Vec<u8>)], sig: &[u8]) -> &'a (u64, Vec<u8>) {
    blobs.iter().find(|(_, b)| &b[..sig.len()] == sig).unwrap()
}

#[test]
fn every_table_checksums_to_zero_and_has_its_length() {
    let blobs = build(2, vec![]);
    let (addr, rsdp) = &blobs[0];
    assert_eq!(*addr, 0xe0000);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    // The FACS has no checksum nor OEM fields (ACPI 6.4, 5.2.10).
    for (_, t) in blobs[1..].iter().filter(|(_, t)| &t[..4] != b"FACS") {
        assert_eq!(sum(t), 0, "{}", String::from_utf8_lossy(&t[..4]));
        assert_eq!(u32_at(t, 4) as usize, t.len());
        assert_eq!(&t[10..16], b"VMMVTD");
    }
}

#[test]
fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
    let blobs = build(1, vec![]);
    let xsdt_addr = u64_at(&blobs[0].1, 24);
    let (xa, xsdt) = find(&blobs, b"XSDT");
    assert_eq!(*xa, xsdt_addr);
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    let sigs: Vec<&[u8]> = entries
        .iter()
        .map(|a| &blobs.iter().find(|(b, _)| b == a).unwrap().1[..4])
        .collect();
    assert_eq!(sigs, vec![&b"FACP"[..], b"APIC", b"MCFG"]);
    let (_, fadt) = find(&blobs, b"FACP");
    let (dsdt_addr, _) = find(&blobs, b"DSDT");
    assert_eq!(u64_at(fadt, 140), *dsdt_addr, "X_DSDT");
    // Flags: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP (bit 10).
    assert_eq!(u32_at(fadt, 112) & (1 << 20 | 1 << 10), 1 << 20 | 1 << 10);
    // IA-PC boot flags (offset 109): no VGA, no CMOS RTC.
    assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0x24);
    // Reset register: system I/O at our PM port, value 1.
    assert_eq!(fadt[116], 1);
    assert_eq!(u64_at(fadt, 120), ACPI_PM_PORT);
    assert_eq!(fadt[128], ACPI_RESET_VALUE);
    // Sleep control register (offset 244) at the PM port.
    assert_eq!(fadt[244], 1);
    assert_eq!(u64_at(fadt, 248), ACPI_PM_PORT);
    // Tables do not overlap.
    let mut spans: Vec<(u64, u64)> = blobs
        .iter()
        .map(|(a, b)| (*a, *a + b.len() as u64))
        .collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
}

#[test]
fn fadt_names_the_facs_and_the_pc_pm_block() {
    let tables = AcpiTables::build(&AcpiConfig {
        vcpus: 1,
        ram_size: 512 << 20,
        extra_tables: vec![],
        pcat_compat: true,
    })
    .unwrap();
    let (_, fadt) = find(&tables.blobs, b"FACP");
    let (facs_addr, facs) = find(&tables.blobs, b"FACS");
    assert_eq!(*facs_addr, tables.facs_addr);
    assert_eq!(facs_addr % 64, 0);
    assert_eq!(u32_at(facs, 4), 64, "FACS length");
    assert_eq!(u32_at(facs, 12), 0, "no waking vector yet");
    assert_eq!(u64::from(u32_at(fadt, 36)), *facs_addr, "FIRMWARE_CTRL");
    // PM1a_EVT_BLK, PM1a_CNT_BLK, PM_TMR_BLK and their lengths, as QEMU's PC has them.
    assert_eq!(u32_at(fadt, 56), 0x600);
    assert_eq!(u32_at(fadt, 64), 0x604);
    assert_eq!(u32_at(fadt, 76), 0x608);
    assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 4));
    // The X_ forms: system I/O, the register's width.
    for (off, port, bits) in [(148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)] {
        assert_eq!((fadt[off], fadt[off + 1]), (1, bits), "GAS at {off}");
        assert_eq!(u64_at(fadt, off + 4), port);
    }
}

#[test]
fn madt_lists_each_cpu_and_the_ioapic() {
    let blobs = build(3, vec![]);
    let (_, madt) = find(&blobs, b"APIC");
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    let mut off = 44;
    let mut lapics = vec![];
    let mut ioapic = None;
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        match ty {
            0 => lapics.push((madt[off + 3], u32_at(madt, off + 4))),
            1 => ioapic = Some(u32_at(madt, off + 4)),
            _ => panic!("unexpected MADT entry {ty}"),
        }
        off += len;
    }
    assert_eq!(lapics, vec![(0, 1), (1, 1), (2, 1)]);
    assert_eq!(ioapic, Some(0xfec0_0000));
}

#[test]
fn madt_lists_apic_ids_above_254_in_x2apic_entries() {
    let blobs = build(288, vec![]);
    let (_, madt) = find(&blobs, b"APIC");
    assert_eq!(sum(madt), 0);
    assert_eq!(u32_at(madt, 4) as usize, madt.len());
    let mut off = 44;
    // (type, APIC ID, processor UID, flags) of every processor entry.
    let mut cpus = vec![];
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        match (ty, len) {
            (0, 8) => cpus.push((
                0,
                u32::from(madt[off + 3]),
                u32::from(madt[off + 2]),
                u32_at(madt, off + 4),
            )),
            // ACPI 6.4, 5.2.12.12: reserved (2), x2APIC ID, flags, processor UID.
            (9, 16) => {
                assert_eq!(&madt[off + 2..off + 4], &[0, 0], "reserved");
                cpus.push((
                    9,
                    u32_at(madt, off + 4),
                    u32_at(madt, off + 12),
                    u32_at(madt, off + 8),
                ));
            }
            (1, 12) => {}
            other => panic!("unexpected MADT entry {other:?}"),
        }
        off += len;
    }
    assert_eq!(cpus.len(), 288);
    for (id, &(ty, apic, uid, flags)) in cpus.iter().enumerate() {
        let id = id as u32;
        assert_eq!((apic, uid, flags), (id, id, 1), "processor {id}");
        assert_eq!(ty, if id <= 254 { 0 } else { 9 }, "processor {id}");
    }
}

#[test]
fn madt_says_pcat_compat_only_with_pics() {
    assert_eq!(u32_at(&madt(1, true), 40), 1);
    let split = madt(1, false);
    assert_eq!(u32_at(&split, 40), 0, "no 8259s with the split irqchip");
    assert_eq!(sum(&split), 0);
}

#[test]
fn mcfg_points_at_ecam() {
    let blobs = build(1, vec![]);
    let (_, m) = find(&blobs, b"MCFG");
    assert_eq!(u64_at(m, 44), PCI_ECAM_START);
    assert_eq!((m[54], m[55]), (0, 255), "bus range");
}

#[test]
fn dsdt_has_host_bridge_pvpanic_and_s5() {
    let blobs = build(1, vec![]);
    let (_, d) = find(&blobs, b"DSDT");
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    assert!(has(&[0x41, 0xd0, 0x0a, 0x08]), "EISA ID PNP0A08");
    assert!(has(b"QEMU0001\0"));
    assert!(has(b"_S5_"));
    // pvpanic IO descriptor: 0x47, decode16, min 0x505, max 0x505, align 1, len 1.
    assert!(has(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
    assert!(has(b"_PRT"));
    // Slot 3 INTB: Package(4) { 0x0003FFFF, One, Zero, 0x14 (GSI 20) }.
    assert!(has(&[
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 0x14
    ]));
    // The 32-bit window as a DWord memory descriptor min/max.
    assert!(has(&0xc000_0000u32.to_le_bytes()) && has(&0xdfff_ffffu32.to_le_bytes()));
}

#[test]
fn extra_tables_are_linked() {
    let mut dmar = Sdt::new(*b"DMAR", 48, 1, OEM_ID, OEM_TABLE_ID, 1);
    dmar.update_checksum();
    let blobs = build(1, vec![dmar.as_slice().to_vec()]);
    let (addr, _) = find(&blobs, b"DMAR");
    let (_, xsdt) = find(&blobs, b"XSDT");
    assert_eq!(u64_at(xsdt, 36 + 3 * 8), *addr);
}
