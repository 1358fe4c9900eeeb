//! Arbitrary register accesses and guest-memory writes against the unit.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu::regs::{REG_IMAGE_WORDS, REG_WINDOW_SIZE};
use viommu::VtdConfig;
use viommu_fuzz::Guest;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u16, wide: bool },
    Write { offset: u16, wide: bool, value: u64 },
    Mem { addr: u64, value: u64 },
    Odd { offset: u16, len: u8 },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut g = Guest::new(VtdConfig::default());
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
            } => {
                let b = value.to_le_bytes();
                let n = if wide { 8 } else { 4 };
                g.vtd
                    .mmio_write(u64::from(offset) % REG_WINDOW_SIZE, &b[..n]);
            }
            Op::Mem { addr, value } => g.write_mem(addr, value),
            Op::Odd { offset, len } => {
                let mut b = [0u8; 16];
                let n = usize::from(len % 17);
                g.vtd.mmio_read(u64::from(offset), &mut b[..n]);
                g.vtd.mmio_write(u64::from(offset), &b[..n]);
            }
        }
        g.check_always();
    }
    // The image a VMM publishes as the guest's read-only register page reads as the registers do.
    let mut image = [0u64; REG_IMAGE_WORDS];
    g.vtd.register_image(&mut image);
    for (i, &word) in image.iter().enumerate() {
        let mut b = [0u8; 8];
        g.vtd.mmio_read(i as u64 * 8, &mut b);
        assert_eq!(
            u64::from_le_bytes(b),
            word,
            "register image at {:#x}",
            i * 8
        );
    }
    g.check_quiesced();
});
