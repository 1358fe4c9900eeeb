//! Arbitrary register accesses and guest-memory writes against the unit, legacy-only or
//! offering scalable mode, checked against the register table: reserved bits and write-only
//! registers read zero, a write that starts nothing changes exactly the bits the table says, and
//! the image a VMM publishes reads as the registers.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::registers::{locate, Instances, Register, Storage, Width, REGISTERS};
use viommu::regs::{FRCD_REG_SIZE, REG_IMAGE_WORDS, REG_WINDOW_SIZE};
use viommu::testing::Driver;
use viommu::VtdConfig;
use viommu_fuzz::{Guest, Mem};

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        wide: bool,
    },
    Write {
        offset: u16,
        wide: bool,
        value: u64,
    },
    /// A write to a register of the table (a fault record's by `record`), at its upper half
    /// with `upper`: where random offsets seldom land.
    RegisterWrite {
        register: u8,
        record: u8,
        upper: bool,
        wide: bool,
        value: u64,
    },
    Mem {
        addr: u64,
        value: u64,
    },
    Odd {
        offset: u16,
        len: u8,
    },
}

/// The offset `Op::RegisterWrite` names.
fn register_offset(register: u8, record: u8, upper: bool) -> u64 {
    let r = &REGISTERS[usize::from(register) % REGISTERS.len()];
    let instance = match r.instances {
        Instances::One => 0,
        Instances::PerFaultRecord => u64::from(record % 10),
    };
    r.offset + instance * FRCD_REG_SIZE + if upper { 4 } else { 0 }
}

/// Writes `value` (`wide`: 8 bytes, else its low 4) at `offset` and checks what the table
/// says of the write.
fn write(g: &mut Guest, offset: u64, wide: bool, value: u64) {
    let n: u64 = if wide { 8 } else { 4 };
    let before = image(&g.vtd);
    let b = value.to_le_bytes();
    g.vtd.mmio_write(offset, &b[..n as usize]);
    let after = image(&g.vtd);
    if !offset.is_multiple_of(n) {
        assert_eq!(after, before, "a misaligned write at {offset:#x} was taken");
    } else if !acts(offset, n) {
        let value = if wide { value } else { value & 0xffff_ffff };
        check_inert_write(&before, &after, offset, n, value);
    }
}

type Image = [u64; REG_IMAGE_WORDS];

fn image(vtd: &viommu::Vtd<Mem>) -> Image {
    let mut image = [0; REG_IMAGE_WORDS];
    vtd.register_image(&mut image);
    image
}

/// The value of `r` at `offset` in `image`.
fn value_in(image: &Image, offset: u64, r: &Register) -> u64 {
    let word = image[(offset / 8) as usize];
    match r.width {
        Width::W64 => word,
        Width::W32 => (word >> ((offset % 8) * 8)) & 0xffff_ffff,
    }
}

/// Every register's reserved bits read as zero, and write-only registers read as zero.
fn check_reserved_bits(image: &Image, records: usize) {
    for r in REGISTERS {
        let count = match r.instances {
            Instances::One => 1,
            Instances::PerFaultRecord => records as u64,
        };
        for k in 0..count {
            let offset = r.offset + k * FRCD_REG_SIZE;
            let v = value_in(image, offset, r);
            assert_eq!(v & r.reserved(), 0, "{} at {offset:#x}: {v:#x}", r.name);
            if r.storage == Storage::WriteOnly {
                assert_eq!(v, 0, "write-only {} reads {v:#x}", r.name);
            }
        }
    }
}

/// After an aligned write of `value` (`len` bytes at `offset`) that started nothing: the
/// registers it covered changed as their masks say and nothing else changed.
fn check_inert_write(before: &Image, after: &Image, offset: u64, len: u64, value: u64) {
    let mut expected = *before;
    for d in (offset..offset + len).step_by(4) {
        let Some(loc) = locate(d) else { continue };
        let r = loc.register;
        let (bits, written) = if r.width == Width::W64 && len == 8 {
            (value, u64::MAX)
        } else {
            // One 4-byte unit: a 32-bit register, or one half of a 64-bit one.
            let unit = (value >> ((d - offset) * 8)) & 0xffff_ffff;
            let shift = (d - loc.base) * 8;
            (unit << shift, 0xffff_ffff << shift)
        };
        if r.width == Width::W64 && len == 8 && d != loc.base {
            continue; // the upper half of the 64-bit register just handled
        }
        let old = value_in(before, loc.base, r);
        let new = match r.storage {
            Storage::Stored { .. } => {
                let v = bits & written;
                ((old & !(r.rw & written)) | (v & r.rw)) & !(v & r.rw1c)
            }
            Storage::WriteOnly | Storage::Derived(_) => old,
        };
        let word = &mut expected[(loc.base / 8) as usize];
        *word = match r.width {
            Width::W64 => new,
            Width::W32 => {
                let at = (loc.base % 8) * 8;
                (*word & !(0xffff_ffff << at)) | new << at
            }
        };
    }
    for (i, (&want, &got)) in expected.iter().zip(after.iter()).enumerate() {
        assert_eq!(
            got,
            want,
            "word {:#x} after a {len}-byte write of {value:#x} at {offset:#x}",
            i * 8
        );
    }
}

/// Does an aligned `len`-byte write at `offset` reach a register whose write starts something?
fn acts(offset: u64, len: u64) -> bool {
    (offset..offset + len)
        .step_by(4)
        .filter_map(locate)
        .any(|loc| loc.register.effect.is_some())
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (scalable, ops) = input;
    let config = VtdConfig {
        scalable_mode: scalable,
        ..VtdConfig::default()
    };
    let mut g = Guest::new(config);
    for op in ops.iter().take(256) {
        match *op {
            Op::Read { offset, wide } => {
                let mut b = [0u8; 8];
                let n = if wide { 8 } else { 4 };
                g.vtd
                    .mmio_read(u64::from(offset) % REG_WINDOW_SIZE, &mut b[..n]);
            }
            Op::Write {
                offset,
                wide,
                value,
            } => write(&mut g, u64::from(offset) % REG_WINDOW_SIZE, wide, value),
            Op::RegisterWrite {
                register,
                record,
                upper,
                wide,
                value,
            } => write(
                &mut g,
                register_offset(register, record, upper),
                wide,
                value,
            ),
            Op::Mem { addr, value } => g.write_mem(addr, value),
            Op::Odd { offset, len } => {
                let mut b = [0u8; 16];
                let n = usize::from(len % 17);
                g.vtd.mmio_read(u64::from(offset), &mut b[..n]);
                g.vtd.mmio_write(u64::from(offset), &b[..n]);
            }
        }
        check_reserved_bits(&image(&g.vtd), config.fault_records);
        g.check_always();
    }
    // The image a VMM publishes as the guest's read-only register page reads as the registers do.
    for (i, &word) in image(&g.vtd).iter().enumerate() {
        let offset = i as u64 * 8;
        assert_eq!(
            Driver::read64(&g.vtd, offset),
            word,
            "8-byte read at {offset:#x}"
        );
        for half in 0..2 {
            let at = offset + half * 4;
            let want = (word >> (half * 32)) as u32;
            assert_eq!(Driver::read32(&g.vtd, at), want, "4-byte read at {at:#x}");
        }
    }
    g.check_quiesced();
});
