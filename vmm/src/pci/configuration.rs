//! A type-0 PCI configuration space with write masks and BAR sizing (PCI Local Bus 3.0, 6.1
//! and 6.2.5), shared by our emulated PCI functions.

/// Bytes of PCI Express extended configuration space per function.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Dword registers per function.
pub const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

// Header register indices (dwords) and fields (PCI Local Bus 3.0, Figure 6-1).
const REG_ID: usize = 0;
const REG_COMMAND_STATUS: usize = 1;
const REG_CLASS: usize = 2;
const REG_HEADER: usize = 3;
/// First BAR register.
pub const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_INTERRUPT: usize = 15;
// Writable command bits: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
// BAR type bits (PCI 3.0, 6.2.5.1).
const BAR_IO: u32 = 0x1;
const BAR_MEM64: u32 = 0x4;
const BAR_PREFETCH: u32 = 0x8;

/// What kind of address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mmio32,
    /// 64-bit memory (takes two BAR registers).
    Mmio64,
}

/// A BAR's current placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Kind of space.
    pub kind: BarKind,
    /// Size in bytes (power of two).
    pub size: u64,
    /// Address the guest (or our allocator) programmed.
    pub addr: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A BAR the guest moved: unmap at `old`, map at `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index 0..6.
    pub index: usize,
    /// Kind of space.
    pub kind: BarKind,
    /// Previous address.
    pub old: u64,
    /// New address.
    pub new: u64,
    /// Size.
    pub size: u64,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision.
    pub revision: u8,
}

/// The configuration space of one function.
pub struct PciConfiguration {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    bars: [Option<Bar>; NUM_BARS],
}

impl PciConfiguration {
    /// A type-0 header for `ids`, no BARs, no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut regs = Box::new([0u32; NUM_REGS]);
        let mut writable = Box::new([0u32; NUM_REGS]);
        regs[REG_ID] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        regs[REG_CLASS] = u32::from(ids.class) << 24
            | u32::from(ids.subclass) << 16
            | u32::from(ids.prog_if) << 8
            | u32::from(ids.revision);
        regs[REG_SUBSYSTEM] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        writable[REG_COMMAND_STATUS] = COMMAND_WRITABLE;
        // Cache line size and latency timer are read/write scratch for the OS.
        writable[REG_HEADER] = 0x0000_ffff;
        // Interrupt line is scratch for the OS; pin 0: no INTx.
        writable[REG_INTERRUPT] = 0xff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
        }
    }

    /// Declares BAR `index` of `size` bytes (a power of two, at least 16 for memory and 4 for
    /// I/O) at `addr`. A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, bar: Bar) {
        let size_mask = !(bar.size.max(4) - 1);
        let reg = REG_BAR0 + index;
        match bar.kind {
            BarKind::Io => {
                self.regs[reg] = (bar.addr as u32 & size_mask as u32) | BAR_IO;
                self.writable[reg] = size_mask as u32 & !0x3;
            }
            BarKind::Mmio32 => {
                let pf = if bar.prefetchable { BAR_PREFETCH } else { 0 };
                self.regs[reg] = (bar.addr as u32 & size_mask as u32) | pf;
                self.writable[reg] = size_mask as u32 & !0xf;
            }
            BarKind::Mmio64 => {
                let pf = if bar.prefetchable { BAR_PREFETCH } else { 0 };
                self.regs[reg] = (bar.addr as u32 & size_mask as u32) | BAR_MEM64 | pf;
                self.writable[reg] = size_mask as u32 & !0xf;
                self.regs[reg + 1] = (bar.addr >> 32) as u32;
                self.writable[reg + 1] = (size_mask >> 32) as u32;
            }
        }
        self.bars[index] = Some(bar);
    }

    /// The BAR at `index`, if declared.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Reads dword register `reg`; out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Sets a read-only register (for capabilities set up by the device model).
    pub fn set_reg(&mut self, reg: usize, value: u32, writable: u32) {
        if reg < NUM_REGS {
            self.regs[reg] = value;
            self.writable[reg] = writable;
        }
    }

    /// The memory and I/O decode enables of the command register.
    pub fn decode_enabled(&self, kind: BarKind) -> bool {
        let cmd = self.regs[REG_COMMAND_STATUS];
        match kind {
            BarKind::Io => cmd & 1 != 0,
            _ => cmd & 2 != 0,
        }
    }

    /// Writes `data` at byte `offset` of register `reg`, honoring the write mask. Returns the
    /// BAR moves this causes.
    ///
    /// As on real hardware (and QEMU), a BAR is mapped where its register points only while
    /// its decode bit in the command register is set: Linux clears decoding while it sizes and
    /// reprograms BARs, so moves take effect when decoding is turned back on, and the sizing
    /// pattern or half-written 64-bit addresses are never mapped. With decoding on, a write
    /// moves the BAR at once, except the all-ones sizing pattern.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        if reg >= NUM_REGS || offset as usize + data.len() > 4 || data.is_empty() {
            log::debug!(
                "ignored config write reg {reg} offset {offset} len {}",
                data.len()
            );
            return Vec::new();
        }
        let shift = offset * 8;
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * i);
        }
        let field_mask = if data.len() == 4 {
            0xffff_ffff
        } else {
            ((1u32 << (8 * data.len())) - 1) << shift
        };
        let mask = self.writable[reg] & field_mask;
        let old = self.regs[reg];
        self.regs[reg] = (old & !mask) | ((value << shift) & mask);

        if reg == REG_COMMAND_STATUS {
            return (0..NUM_BARS).filter_map(|i| self.sync_bar(i)).collect();
        }
        let Some(index) = self.bar_of_reg(reg) else {
            return Vec::new();
        };
        if data.len() == 4 && value == 0xffff_ffff {
            return Vec::new();
        }
        self.sync_bar(index).into_iter().collect()
    }

    /// Follows BAR `index`'s register if its decoding is on and it points elsewhere.
    fn sync_bar(&mut self, index: usize) -> Option<BarMove> {
        let bar = self.bars[index]?;
        if !self.decode_enabled(bar.kind) {
            return None;
        }
        let new_addr = self.bar_address(index, bar.kind);
        if new_addr == bar.addr {
            return None;
        }
        if let Some(b) = self.bars[index].as_mut() {
            b.addr = new_addr;
        }
        Some(BarMove {
            index,
            kind: bar.kind,
            old: bar.addr,
            new: new_addr,
            size: bar.size,
        })
    }

    /// Puts BAR `index` back at `addr` (after a move the platform refused).
    pub fn revert_bar(&mut self, index: usize, addr: u64) {
        if let Some(bar) = self.bars.get(index).copied().flatten() {
            self.add_bar(index, Bar { addr, ..bar });
        }
    }

    /// The BAR a register belongs to (the high half of a 64-bit BAR belongs to its low half).
    fn bar_of_reg(&self, reg: usize) -> Option<usize> {
        let i = reg.checked_sub(REG_BAR0)?;
        if i >= NUM_BARS {
            return None;
        }
        if self.bars[i].is_some() {
            return Some(i);
        }
        if i > 0 && self.bars[i - 1].is_some_and(|b| b.kind == BarKind::Mmio64) {
            return Some(i - 1);
        }
        None
    }

    fn bar_address(&self, index: usize, kind: BarKind) -> u64 {
        let low = self.regs[REG_BAR0 + index];
        match kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Mmio32 => u64::from(low & !0xf),
            BarKind::Mmio64 => {
                u64::from(low & !0xf) | u64::from(self.regs[REG_BAR0 + index + 1]) << 32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(PciIds {
            vendor: 0x1234,
            device: 0x11e8,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
        })
    }

    #[test]
    fn ids_and_read_only_fields() {
        let mut c = cfg();
        assert_eq!(c.read_reg(0), 0x11e8_1234);
        assert_eq!(c.read_reg(2), 0xff00_0001);
        assert!(c.write_reg(0, 0, &[0, 0, 0, 0]).is_empty());
        assert_eq!(c.read_reg(0), 0x11e8_1234, "IDs are read-only");
        assert!(c.write_reg(1, 0, &[0xff, 0xff]).is_empty());
        assert_eq!(
            c.read_reg(1),
            0x0407,
            "only decode/master/INTx-disable bits stick"
        );
        assert!(c.decode_enabled(BarKind::Mmio32));
        assert_eq!(c.read_reg(NUM_REGS), 0xffff_ffff);
    }

    fn enable_mem(c: &mut PciConfiguration) -> Vec<BarMove> {
        c.write_reg(1, 0, &[0x2, 0])
    }

    #[test]
    fn bar32_sizing_and_move() {
        let mut c = cfg();
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Mmio32,
                size: 0x10_0000,
                addr: 0xc000_0000,
                prefetchable: false,
            },
        );
        assert!(enable_mem(&mut c).is_empty());
        assert_eq!(c.read_reg(REG_BAR0), 0xc000_0000);
        assert!(c.write_reg(REG_BAR0, 0, &[0xff; 4]).is_empty());
        assert_eq!(c.read_reg(REG_BAR0), 0xfff0_0000, "size probe");
        assert!(c
            .write_reg(REG_BAR0, 0, &0xc000_0000u32.to_le_bytes())
            .is_empty());
        let mv = c.write_reg(REG_BAR0, 0, &0xc010_0000u32.to_le_bytes());
        assert_eq!(mv.len(), 1);
        assert_eq!(
            (mv[0].old, mv[0].new, mv[0].size),
            (0xc000_0000, 0xc010_0000, 0x10_0000)
        );
        assert_eq!(c.bar(0).unwrap().addr, 0xc010_0000);
    }

    #[test]
    fn bar64_moves_when_decoding_is_enabled() {
        let mut c = cfg();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Mmio64,
                size: 0x4000,
                addr: 0x1_0000_0000,
                prefetchable: true,
            },
        );
        assert_eq!(c.read_reg(REG_BAR0 + 2), 0xc);
        assert_eq!(c.read_reg(REG_BAR0 + 3), 1);
        // Decoding off (reset state): sizing and reprogramming map nothing.
        assert!(c.write_reg(REG_BAR0 + 2, 0, &[0xff; 4]).is_empty());
        assert!(c.write_reg(REG_BAR0 + 3, 0, &[0xff; 4]).is_empty());
        assert_eq!(c.read_reg(REG_BAR0 + 2), 0xffff_c00c);
        assert_eq!(c.read_reg(REG_BAR0 + 3), 0xffff_ffff);
        assert!(c
            .write_reg(REG_BAR0 + 2, 0, &0x8000u32.to_le_bytes())
            .is_empty());
        assert!(c.write_reg(REG_BAR0 + 3, 0, &2u32.to_le_bytes()).is_empty());
        // Turning memory decoding on applies the new address once.
        let mv = enable_mem(&mut c);
        assert_eq!(mv.len(), 1);
        assert_eq!(
            (mv[0].index, mv[0].old, mv[0].new),
            (2, 0x1_0000_0000, 0x2_0000_8000)
        );
        assert!(enable_mem(&mut c).is_empty());
    }

    #[test]
    fn partial_writes_and_io_bar() {
        let mut c = cfg();
        c.add_bar(
            1,
            Bar {
                kind: BarKind::Io,
                size: 0x20,
                addr: 0x1000,
                prefetchable: false,
            },
        );
        assert_eq!(c.read_reg(REG_BAR0 + 1), 0x1001);
        assert!(
            c.write_reg(REG_BAR0 + 1, 1, &[0x20]).is_empty(),
            "I/O decode off"
        );
        let mv = c.write_reg(1, 0, &[0x1]);
        assert_eq!((mv[0].old, mv[0].new), (0x1000, 0x2000));
        c.write_reg(15, 0, &[0x0b]);
        assert_eq!(c.read_reg(15) & 0xff, 0x0b);
        assert!(
            c.write_reg(15, 3, &[1, 2]).is_empty(),
            "access past the dword is ignored"
        );
    }
}
