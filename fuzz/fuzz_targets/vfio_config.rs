//! A passed-through function's configuration space, BARs and MSI/MSI-X table under arbitrary
//! guest accesses (the passthrough crate against its fake VFIO device). Besides "no panic",
//! after every access: no memory BAR decodes over guest RAM, no two BARs overlap, every
//! attached MSI/MSI-X vector is unmasked and routed to an interrupt address, and INTx is
//! attached exactly while neither MSI nor MSI-X is enabled.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use passthrough::function::PciFunction;
use passthrough::testing::{BumpAllocator, FakeDevice, FakeRoutes};
use vm_device::pci::bar::BarKind;

const RAM: [(u64, u64); 2] = [(0, 0x8000_0000), (0x1_0000_0000, 0x1_4000_0000)];

#[derive(Arbitrary, Debug)]
enum Op {
    ReadConfig(u16),
    WriteConfig {
        reg: u16,
        offset: u8,
        data: Vec<u8>,
    },
    /// Writes to the registers that matter most: command, BARs, the capabilities at 0x40.
    WriteHot {
        which: u8,
        offset: u8,
        value: u32,
        len: u8,
    },
    ReadBar {
        index: u8,
        offset: u32,
        len: u8,
    },
    WriteBar {
        index: u8,
        offset: u32,
        data: Vec<u8>,
    },
    MsixEntry {
        vector: u8,
        addr_low: u16,
        data: u32,
        masked: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: u8,
    ops: Vec<Op>,
}

fn check(f: &PciFunction<FakeDevice>, routes: &FakeRoutes) {
    let bars: Vec<_> = f.bars().cloned().collect();
    for b in &bars {
        let end = b.addr + b.size;
        if b.kind != BarKind::Io {
            for (s, e) in RAM {
                assert!(
                    end <= s || e <= b.addr,
                    "BAR{} {:#x} over RAM",
                    b.index,
                    b.addr
                );
            }
        }
        for o in &bars {
            let same = (o.kind == BarKind::Io) == (b.kind == BarKind::Io);
            if o.index != b.index && same {
                assert!(end <= o.addr || o.addr + o.size <= b.addr, "BARs overlap");
            }
        }
    }
    let st = routes.state();
    let msi_on = f.msi().is_some_and(|m| m.enabled());
    let msix_on = f.msix().is_some_and(|m| m.enabled());
    let intx = f.intx_live();
    assert_eq!(
        intx.is_some(),
        !msi_on && !msix_on && f.read_config(0x3c / 4) >> 8 & 0xff != 0
    );
    for &gsi in &st.attached {
        if Some(gsi) == intx {
            continue;
        }
        let msg = st
            .routes
            .get(&gsi)
            .expect("an attached MSI vector has a route");
        assert_eq!(msg.address & 0xffff_ffff_fff0_0000, 0xfee0_0000);
    }
    if let Some(m) = f.msix() {
        let v = f.msix_vectors();
        for i in 0..v.len() {
            assert!(
                !v.attached(i) || !m.masked(i),
                "masked MSI-X vector {i} attached"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let dev = match input.device % 3 {
        0 => FakeDevice::nvme_like(),
        1 => FakeDevice::edu_like(),
        _ => FakeDevice::intx_only(),
    };
    let routes = FakeRoutes::default();
    let Ok(mut f) = PciFunction::new("fuzz", dev, Box::new(routes.clone()), &|pin| {
        Some(9 + u32::from(pin))
    }) else {
        return;
    };
    f.place_bars(&mut BumpAllocator::new(0xc000_0000, RAM.to_vec()))
        .expect("BARs fit");
    for op in input.ops.iter().take(512) {
        match op {
            Op::ReadConfig(reg) => {
                let _ = f.read_config(usize::from(*reg));
            }
            Op::WriteConfig { reg, offset, data } => {
                let _ = f.write_config(usize::from(*reg), usize::from(*offset), data);
            }
            Op::WriteHot {
                which,
                offset,
                value,
                len,
            } => {
                let reg = [1usize, 4, 5, 6, 7, 8, 9, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15]
                    [usize::from(*which) % 13];
                let len = usize::from(*len % 4) + 1;
                let off = usize::from(*offset) % (5 - len);
                let _ = f.write_config(reg, off, &value.to_le_bytes()[..len]);
            }
            Op::ReadBar { index, offset, len } => {
                let mut buf = vec![0u8; usize::from(*len % 9)];
                f.read_bar(usize::from(*index % 7), u64::from(*offset), &mut buf);
            }
            Op::WriteBar {
                index,
                offset,
                data,
            } => {
                f.write_bar(usize::from(*index % 7), u64::from(*offset), data);
            }
            Op::MsixEntry {
                vector,
                addr_low,
                data,
                masked,
            } => {
                let base = 0x2000 + u64::from(*vector % 8) * 16;
                let addr = 0xfee0_0000u64 | u64::from(*addr_low);
                f.write_bar(0, base, &addr.to_le_bytes());
                f.write_bar(0, base + 8, &data.to_le_bytes());
                f.write_bar(0, base + 12, &u32::from(*masked).to_le_bytes());
            }
        }
        check(&f, &routes);
    }
});
