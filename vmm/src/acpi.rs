//! ACPI tables (acpi_tables crate): RSDP, XSDT, FADT (hardware-reduced), FACS, DSDT, MADT,
//! MCFG, plus any extra tables a later component brings (the DMAR table of the VT-d model).
//!
//! Layout from 0xe0000: RSDP, XSDT, the FACS (64-byte aligned), then each table 8-byte aligned.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::interrupts::MAX_XAPIC_ID;
use crate::arch::x86_64::layout::{
    pci_mmio64_start, ACPI_END, APIC_START, IOAPIC_START, PCI_ECAM_START, PCI_MMIO32_SIZE,
    PCI_MMIO32_START, PCI_MMIO64_SIZE, RSDP_START,
};
use crate::devices::acpi_pm::{ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
use crate::devices::acpi_pm1::{
    PM1_CNT_LEN, PM1_CNT_OFFSET, PM1_EVT_LEN, PM1_EVT_OFFSET, PM_BLOCK_PORT, PM_TMR_LEN,
    PM_TMR_OFFSET,
};
use crate::devices::ioapic::IOAPIC_ID;
use crate::devices::legacy::serial::{COM1_IRQ, COM1_PORT};
use crate::devices::pvpanic::PVPANIC_PORT;
use crate::pci::bus::{intx_gsi, NUM_SLOTS};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"VMMVTD";
/// OEM table ID.
pub const OEM_TABLE_ID: [u8; 8] = *b"VMMVTD01";
const OEM_REVISION: u32 = 1;

// MADT (ACPI 6.4, 5.2.12): flags bit 0 PCAT_COMPAT (dual 8259s present); structure types.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
/// Processor Local x2APIC structure (ACPI 6.4, 5.2.12.12): 32-bit APIC IDs and processor UIDs.
const MADT_TYPE_X2APIC: u8 = 9;
const MADT_LAPIC_ENABLED: u32 = 1;

// FADT IA-PC boot architecture flags (ACPI 6.4, Table 5.11): VGA not present (bit 2), CMOS RTC
// not present (bit 5). Linux keeps time with kvmclock; the RTC at 0x70 is there for programs
// that drive PC hardware directly (kvm-unit-tests), and an ACPI OS is told to leave it alone.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Size of a standard table header (ACPI 6.4, 5.2.6).
const HEADER_LEN: u32 = 36;
/// The FACS is 64-byte aligned (ACPI 6.4, 5.2.10).
const FACS_ALIGN: u64 = 64;
/// Offset of the FACS's Firmware Waking Vector, where an OS leaves its S3 resume address
/// (ACPI 6.4, Table 5.14).
pub const FACS_WAKING_VECTOR_OFFSET: u64 = 12;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables overflow their area.
    #[error("ACPI tables need {need:#x} bytes, only {have:#x} fit below 1 MiB")]
    TooBig { need: u64, have: u64 },
    /// Guest memory write failed.
    #[error("cannot write ACPI table {sig} at {addr:#x}: {source}")]
    Write {
        sig: String,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// vCPU count; APIC IDs are 0..n.
    pub vcpus: u32,
    /// Guest RAM, to place the 64-bit PCI window.
    pub ram_size: u64,
    /// Complete extra tables (header and checksum included), e.g. DMAR.
    pub extra_tables: Vec<Vec<u8>>,
    /// Whether a pair of 8259 PICs is present (MADT PCAT_COMPAT): with the in-kernel
    /// irqchip only. Newer Linux (upstream i8259.c since 2024) trusts the flag instead of
    /// probing for the PIC, and would then test its timer through a PIC that is not there.
    pub pcat_compat: bool,
}

/// The RSDP and the tables, each with its guest address.
pub struct AcpiTables {
    /// (address, bytes) pairs, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Where the FACS is.
    pub facs_addr: u64,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// A GAS for a `len`-byte register at I/O `port`, accessed as a whole.
fn io_register_gas(port: u64, len: u8) -> GAS {
    let size = match len {
        2 => AccessSize::WordAccess,
        4 => AccessSize::DwordAccess,
        _ => AccessSize::ByteAccess,
    };
    GAS::new(AddressSpace::SystemIo, len * 8, 0, size, port)
}

/// The hardware-reduced FADT (ACPI 6.4, 5.2.9 and 4.1): the sleep control/status and reset
/// registers all live at our PM port. The PC PM1a event/control blocks and PM timer are named
/// too, for programs that use them directly; an OS in hardware-reduced mode ignores the PM1
/// blocks. `facs_addr` is the FACS, where an OS leaves its S3 waking vector.
pub fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        // The 32-bit field: the FACS lies below 1 MiB, and that is the one programs read.
        .firmware_ctrl_32(facs_addr as u32)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    for (port, len, legacy, legacy_len, x) in [
        (
            PM_BLOCK_PORT + PM1_EVT_OFFSET,
            PM1_EVT_LEN,
            &mut f.pm1a_evt_blk,
            &mut f.pm1_evt_len,
            &mut f.x_pm1a_evt_blk,
        ),
        (
            PM_BLOCK_PORT + PM1_CNT_OFFSET,
            PM1_CNT_LEN,
            &mut f.pm1a_cnt_blk,
            &mut f.pm1_cnt_len,
            &mut f.x_pm1a_cnt_blk,
        ),
        (
            PM_BLOCK_PORT + PM_TMR_OFFSET,
            PM_TMR_LEN,
            &mut f.pm_tmr_blk,
            &mut f.pm_tmr_len,
            &mut f.x_pm_tmr_blk,
        ),
    ] {
        *legacy = (port as u32).into();
        *legacy_len = len;
        *x = io_register_gas(port, len);
    }
    f.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    f.reset_reg = io_gas(ACPI_PM_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    f.sleep_control_reg = io_gas(ACPI_PM_PORT);
    f.sleep_status_reg = io_gas(ACPI_PM_PORT);
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMMVTD\0\0").into();
    to_bytes(&f.finalize())
}

/// The DSDT: PCI host bridge with its windows, COM1, pvpanic, and the S5 sleep type.
pub fn dsdt(ram_size: u64) -> Vec<u8> {
    let mmio64 = pci_mmio64_start(ram_size);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64,
        mmio64 + PCI_MMIO64_SIZE - 1,
        None,
    );
    let pci_crs =
        aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mem32, &mem64]);
    // _PRT (ACPI 6.4, 6.2.13): for every slot and pin, Package { address (slot << 16 | 0xFFFF:
    // any function), pin, source 0 (a GSI, not a link device), GSI }.
    let prt_fields: Vec<(u32, u8, u32)> = (1..NUM_SLOTS as u8)
        .flat_map(|slot| (0..4u8).map(move |pin| (slot, pin)))
        .map(|(slot, pin)| ((u32::from(slot) << 16) | 0xffff, pin, intx_gsi(slot, pin)))
        .collect();
    let prt_entries: Vec<aml::Package> = prt_fields
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(prt_entries.iter().map(|p| p as &dyn Aml).collect());
    let pci0 = to_bytes(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &pci_crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    ));

    let com1_io = aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1 = to_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    ));

    let pvpanic_io = aml::IO::new(PVPANIC_PORT as u16, PVPANIC_PORT as u16, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic = to_bytes(&aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &pvpanic_crs),
        ],
    ));

    let s5 = to_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLP_TYP]),
    ));

    let mut t = Sdt::new(*b"DSDT", HEADER_LEN, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for obj in [pci0, com1, pvpanic, s5] {
        t.append_slice(&obj);
    }
    t.as_slice().to_vec()
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = processor UID = index; an x2APIC
/// structure for APIC IDs above 254) and the IOAPIC at GSI 0; PCAT_COMPAT says whether 8259
/// PICs are present too.
pub fn madt(vcpus: u32, pcat_compat: bool) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"APIC",
        HEADER_LEN + 8,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, if pcat_compat { MADT_PCAT_COMPAT } else { 0 });
    for id in 0..vcpus {
        let e: Vec<u8> = match u8::try_from(id) {
            // From 255, the xAPIC broadcast ID, on: x2APIC structures, as QEMU's.
            Ok(id8) if id <= MAX_XAPIC_ID => [MADT_TYPE_LAPIC, 8, id8, id8]
                .into_iter()
                .chain(MADT_LAPIC_ENABLED.to_le_bytes())
                .collect(),
            // Type, length, reserved, x2APIC ID, flags, ACPI processor UID.
            _ => [MADT_TYPE_X2APIC, 16, 0, 0]
                .into_iter()
                .chain(id.to_le_bytes())
                .chain(MADT_LAPIC_ENABLED.to_le_bytes())
                .chain(id.to_le_bytes())
                .collect(),
        };
        t.append_slice(&e);
    }
    let mut ioapic = vec![MADT_TYPE_IOAPIC, 12, IOAPIC_ID, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    t.as_slice().to_vec()
}

/// The MCFG: ECAM for segment 0, buses 0..=255 (PCI Firmware Specification 3.2, 4.1.2).
pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, 255);
    to_bytes(&m)
}

impl AcpiTables {
    /// Lays out all tables for `cfg`.
    pub fn build(cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        let align = |a: u64| a.next_multiple_of(8);
        let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);
        // XSDT entries: FADT, MADT, MCFG, extras.
        let n_entries = 3 + cfg.extra_tables.len() as u64;
        let xsdt_end = xsdt_addr + u64::from(HEADER_LEN) + 8 * n_entries;
        let facs_addr = xsdt_end.next_multiple_of(FACS_ALIGN);
        let mut next = align(facs_addr + FACS::len() as u64);

        let dsdt = dsdt(cfg.ram_size);
        let dsdt_addr = next;
        next = align(next + dsdt.len() as u64);
        let mut tables = vec![(facs_addr, to_bytes(&FACS::new())), (dsdt_addr, dsdt)];
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        let mut others = vec![
            fadt(dsdt_addr, facs_addr),
            madt(cfg.vcpus, cfg.pcat_compat),
            mcfg(),
        ];
        others.extend(cfg.extra_tables.iter().cloned());
        for t in others {
            xsdt.add_entry(next);
            let len = t.len() as u64;
            tables.push((next, t));
            next = align(next + len);
        }
        if next > ACPI_END {
            return Err(AcpiError::TooBig {
                need: next - RSDP_START,
                have: ACPI_END - RSDP_START,
            });
        }
        let mut blobs = vec![
            (RSDP_START, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, to_bytes(&xsdt)),
        ];
        blobs.extend(tables);
        Ok(Self { blobs, facs_addr })
    }

    /// Writes every table to guest memory; returns the RSDP address.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<u64, AcpiError> {
        for (addr, bytes) in &self.blobs {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|source| AcpiError::Write {
                    sig: String::from_utf8_lossy(&bytes[..4.min(bytes.len())]).into_owned(),
                    addr: *addr,
                    source,
                })?;
        }
        Ok(RSDP_START)
    }
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
