//! Times what a VMM does with the register file on every change and on every trapped access,
//! and prints one line per operation:
//!
//! `op=NAME ns=X`
//!
//! `visit` is [`viommu::Vtd::visit_registers`] into a page the way the VMM's read-only mirror
//! renders it (compare each word, store the changed ones), the cost paid after every register
//! write or queue submission; `image` is [`viommu::Vtd::register_image`]; `read32`/`read64`
//! are one guest register read of each size, averaged over the whole window. Each figure is the
//! best of several runs over a unit with a recorded fault and queued invalidation on.

use std::hint::black_box;
use std::time::Instant;

use viommu::regs::*;
use viommu::testing::{mem, Driver, ManualClock, Mem, RecordingMsi, SimHost, Tables};
use viommu::{Access, SourceId, Vtd, VtdConfig};

const DEV: SourceId = SourceId(0x0018);
const ROUNDS: u32 = 20;
const ITERATIONS: u32 = 100_000;

/// A unit as a booted Linux guest leaves it, with one fault recorded.
fn unit() -> Vtd<Mem> {
    let m = mem();
    let mut vtd = Vtd::new(
        VtdConfig::default(),
        m.clone(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    )
    .expect("valid config");
    vtd.attach(DEV, Box::new(SimHost::new())).expect("attach");
    let mut t = Tables::new(&m);
    t.context(DEV, 1, 4);
    let mut drv = Driver::new();
    drv.enable_qi(&mut vtd);
    drv.set_root(&mut vtd, t.root);
    drv.set_translation(&mut vtd, true);
    let _ = vtd.translate(DEV, 0x9000, Access::Write);
    vtd
}

/// Best time per call of `f` over `ROUNDS` rounds of `ITERATIONS` calls, in nanoseconds.
fn best_ns(mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(ITERATIONS)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let vtd = unit();
    let mut page = [0u64; REG_IMAGE_WORDS];
    let visit = best_ns(|| {
        black_box(&vtd).visit_registers(|offset, word| {
            let slot = &mut page[(offset / 8) as usize % REG_IMAGE_WORDS];
            if *slot != word {
                *slot = word;
            }
        });
        black_box(&page);
    });
    println!("op=visit ns={visit:.1}");
    let mut image = [0u64; REG_IMAGE_WORDS];
    let image_ns = best_ns(|| {
        black_box(&vtd).register_image(&mut image);
        black_box(&image);
    });
    println!("op=image ns={image_ns:.1}");
    let mut vtd = vtd;
    for (name, width) in [("read32", 4u64), ("read64", 8)] {
        let mut offset = 0;
        let ns = best_ns(|| {
            let mut b = [0u8; 8];
            black_box(&mut vtd).mmio_read(offset, &mut b[..width as usize]);
            black_box(b);
            offset = (offset + width) % REG_WINDOW_SIZE;
        });
        println!("op={name} ns={ns:.1}");
    }
}
