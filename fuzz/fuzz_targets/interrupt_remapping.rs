//! Interrupt remapping over arbitrary IRTE tables, IRTA values, GCMD commands and requests: no
//! panic, and never a delivered interrupt the table does not allow. Whatever the guest wrote,
//! a remappable request delivered while remapping is on carries the vector and destination of
//! a present IRTE inside the table, whose source validation the requester passes (unless the
//! interrupt-entry cache serves it, which may hold an entry the table no longer does).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::cache::CacheConfig;
use viommu::intremap::IRTA_EIME;
use viommu::regs::*;
use viommu::testing::Driver;
use viommu::{SourceId, VtdConfig};
use viommu_fuzz::{in_ram, Guest};
use vm_device::interrupt::MsiMessage;
use vm_memory::{Bytes, GuestAddress};

#[derive(Arbitrary, Debug)]
enum Op {
    Irta(u64),
    Gcmd(u32),
    /// An IRTE written at `index` of the table IRTA points at.
    Irte {
        index: u8,
        lo: u64,
        hi: u64,
    },
    Memory {
        addr: u64,
        value: u64,
    },
    Request {
        source: u16,
        addr: u32,
        data: u32,
        remappable: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    x2apic: bool,
    /// The interrupt-entry cache on: a request may then be served from an entry the table no
    /// longer holds (as on hardware), so only what does not depend on the entry is checked.
    iec: bool,
    ops: Vec<Op>,
}

/// The IRTE at `index` of the table at `base`, as the guest left it.
fn irte(g: &Guest, base: u64, index: u32) -> Option<(u64, u64)> {
    let addr = base.checked_add(u64::from(index) * 16)?;
    let lo = g.mem.read_obj::<u64>(GuestAddress(addr)).ok()?;
    let hi = g.mem.read_obj::<u64>(GuestAddress(addr + 8)).ok()?;
    Some((lo, hi))
}

fuzz_target!(|input: Input| {
    let iec = if input.iec {
        CacheConfig::HARDWARE.iec
    } else {
        0
    };
    let mut g = Guest::new(VtdConfig {
        interrupt_remapping: true,
        x2apic: input.x2apic,
        caches: CacheConfig {
            iec,
            ..CacheConfig::HARDWARE
        },
        check: input.iec,
        ..VtdConfig::default()
    });
    // The IRTA in force: what the last SIRTP latched.
    let mut latched: Option<u64> = None;
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Irta(v) => Driver::write64(&mut g.vtd, IRTA_REG, in_ram(v) & !0xfff | v & 0xfff),
            Op::Gcmd(v) => {
                Driver::write32(&mut g.vtd, GCMD_REG, v);
                if v & GCMD_SIRTP != 0 {
                    latched = Some(Driver::read64(&g.vtd, IRTA_REG));
                }
            }
            Op::Irte { index, lo, hi } => {
                let base = Driver::read64(&g.vtd, IRTA_REG) & !0xfff;
                let addr = base + u64::from(index) * 16;
                let _ = g.mem.write_obj(lo, GuestAddress(addr));
                let _ = g.mem.write_obj(hi, GuestAddress(addr + 8));
            }
            Op::Memory { addr, value } => g.write_mem(addr, value),
            Op::Request {
                source,
                addr,
                data,
                remappable,
            } => {
                let mut addr = 0xfee0_0000 | u64::from(addr & 0xf_ffff);
                if remappable {
                    addr |= 1 << 4;
                }
                let msg = MsiMessage::new(addr, data);
                let source = SourceId(source);
                let out = g.vtd.remap_interrupt(source, msg);
                let enabled = Driver::read32(&g.vtd, GSTS_REG) & GSTS_IRES != 0;
                let Some(out) = out else { continue };
                if !enabled {
                    assert_eq!(out, msg, "untouched while remapping is off");
                    continue;
                }
                if !msg.is_remappable() {
                    assert_eq!(out, msg, "a passed compatibility request is unchanged");
                    let gsts = Driver::read32(&g.vtd, GSTS_REG);
                    assert!(
                        gsts & GSTS_CFIS != 0,
                        "compatibility format passed without CFI"
                    );
                    continue;
                }
                let irta = latched.expect("remapping delivered without a table pointer");
                let entries = 2u32 << (irta & 0xf);
                let index = msg.interrupt_index();
                assert!(
                    index < entries,
                    "index {index} beyond {entries} entries delivered"
                );
                if input.iec {
                    continue;
                }
                let (lo, hi) = irte(&g, irta & !0xfff, index).expect("entry was readable");
                assert!(lo & 1 != 0, "not-present entry delivered");
                assert_eq!(out.data & 0xff, ((lo >> 16) & 0xff) as u32, "vector");
                let x2apic = input.x2apic && irta & IRTA_EIME != 0;
                let dest = (out.address >> 12) as u32 & 0xff | (out.address >> 32) as u32 & !0xff;
                let want = if x2apic {
                    (lo >> 32) as u32
                } else {
                    (lo >> 40) as u32 & 0xff
                };
                assert_eq!(dest, want, "destination");
                let (svt, sq, sid) = ((hi >> 18) & 3, (hi >> 16) & 3, hi as u16);
                if svt == 1 {
                    let ignore = [0u16, 4, 6, 7][sq as usize];
                    assert_eq!(source.0 | ignore, sid | ignore, "source validation");
                }
                assert!(svt != 3, "reserved source validation type delivered");
            }
        }
    }
});
