//! The BAR registers of a passed-through function: discovered from the device, placed by the
//! VMM's allocator, sized and moved by the guest (PCI Local Bus 3.0, 6.2.5.1).
//!
//! The guest sees our registers, never the device's: the device keeps decoding at its host
//! addresses, and a guest BAR only says where in guest-physical space its region appears.
//! As on real hardware (and QEMU), a BAR decodes where its register points only while its
//! decode bit in the command register is set, so the sizing pattern and half-written 64-bit
//! addresses are never mapped. A move to a place that makes no sense (over guest RAM, over
//! another BAR of this function, past the address space) is contained: the BAR keeps
//! decoding at its last good place, the register keeps what the guest wrote, and a warning
//! is logged; a later good write moves it from there.

use crate::access::{RegionInfo, VfioAccess, BAR0_REGION, CONFIG_REGION};
use crate::spec::*;

/// What kind of address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mmio32,
    Mmio64,
}

/// One BAR of the function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub kind: BarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
    pub prefetchable: bool,
    /// Where the BAR decodes in guest-physical (or port) space.
    pub addr: u64,
    /// The VFIO region behind it.
    pub region: RegionInfo,
}

/// A BAR that now decodes elsewhere: unmap at `old`, map at `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub index: usize,
    pub kind: BarKind,
    pub old: u64,
    pub new: u64,
    pub size: u64,
}

/// Places a BAR in the guest's PCI windows (the VMM's allocator).
pub trait BarAllocator {
    /// A naturally aligned address for `size` bytes of `kind`, or a reason.
    fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, String>;
}

/// The BAR registers 0..5.
#[derive(Debug, Default)]
pub struct Bars {
    bars: [Option<Bar>; PCI_NUM_BARS],
    /// The guest-visible register values.
    regs: [u32; PCI_NUM_BARS],
    /// Guest RAM ranges `[start, end)` no memory BAR may cover.
    ram: Vec<(u64, u64)>,
}

fn read_config_u32(dev: &dyn VfioAccess, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    dev.read(CONFIG_REGION, offset as u64, &mut b);
    u32::from_le_bytes(b)
}

impl Bars {
    /// Discovers the BARs from the device's BAR registers (their type bits) and VFIO's region
    /// sizes. `ram` lists the guest RAM ranges memory BARs must stay clear of.
    pub fn discover(dev: &dyn VfioAccess, ram: Vec<(u64, u64)>) -> Self {
        let mut bars = Bars {
            ram,
            ..Default::default()
        };
        let mut index = 0;
        while index < PCI_NUM_BARS {
            let raw = read_config_u32(dev, PCI_BASE_ADDRESS_0 + 4 * index);
            let region = dev.region(BAR0_REGION + index as u32).unwrap_or_default();
            let kind = if raw & PCI_BASE_ADDRESS_SPACE_IO != 0 {
                BarKind::Io
            } else if raw & PCI_BASE_ADDRESS_MEM_TYPE_64 != 0 && index + 1 < PCI_NUM_BARS {
                BarKind::Mmio64
            } else {
                BarKind::Mmio32
            };
            let step = if kind == BarKind::Mmio64 { 2 } else { 1 };
            if region.size > 0 {
                let min = if kind == BarKind::Io { 4 } else { 16 };
                let size = region.size.max(min).next_power_of_two();
                let prefetchable = kind != BarKind::Io && raw & PCI_BASE_ADDRESS_MEM_PREFETCH != 0;
                bars.bars[index] = Some(Bar {
                    index,
                    kind,
                    size,
                    prefetchable,
                    addr: 0,
                    region,
                });
                bars.set_address(index, 0);
            }
            index += step;
        }
        bars
    }

    /// Places every BAR with `alloc`; returns them.
    pub fn place(
        &mut self,
        alloc: &mut dyn BarAllocator,
    ) -> Result<Vec<Bar>, (usize, u64, String)> {
        let mut placed = Vec::new();
        for index in 0..PCI_NUM_BARS {
            let Some(bar) = self.bars[index].clone() else {
                continue;
            };
            let addr = alloc
                .allocate(bar.kind, bar.size)
                .map_err(|e| (index, bar.size, e))?;
            self.set_address(index, addr);
            if let Some(b) = self.bars[index].as_mut() {
                b.addr = addr;
                placed.push(b.clone());
            }
        }
        Ok(placed)
    }

    /// BAR `index`, if the function has one there.
    pub fn get(&self, index: usize) -> Option<&Bar> {
        self.bars.get(index)?.as_ref()
    }

    /// All BARs.
    pub fn iter(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().flatten()
    }

    /// The BAR decoding guest address `addr` of `kind`'s space, with the offset into it.
    pub fn find(&self, io: bool, addr: u64) -> Option<(&Bar, u64)> {
        self.iter().find_map(|b| {
            let off = addr.checked_sub(b.addr)?;
            ((b.kind == BarKind::Io) == io && off < b.size).then_some((b, off))
        })
    }

    fn set_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = &self.bars[index] else {
            return;
        };
        let mask = !(bar.size - 1);
        match bar.kind {
            BarKind::Io => {
                self.regs[index] = (addr as u32 & mask as u32 & PCI_BASE_ADDRESS_IO_MASK)
                    | PCI_BASE_ADDRESS_SPACE_IO
            }
            BarKind::Mmio32 | BarKind::Mmio64 => {
                let mut low = addr as u32 & mask as u32 & PCI_BASE_ADDRESS_MEM_MASK;
                if bar.prefetchable {
                    low |= PCI_BASE_ADDRESS_MEM_PREFETCH;
                }
                if bar.kind == BarKind::Mmio64 {
                    low |= PCI_BASE_ADDRESS_MEM_TYPE_64;
                    self.regs[index + 1] = (addr >> 32) as u32 & (mask >> 32) as u32;
                }
                self.regs[index] = low;
            }
        }
    }

    /// The BAR owning register `reg` (0..6) and whether `reg` is its upper half.
    fn owner(&self, reg: usize) -> Option<(usize, bool)> {
        if self.bars.get(reg)?.is_some() {
            return Some((reg, false));
        }
        let prev = reg.checked_sub(1)?;
        match &self.bars[prev] {
            Some(b) if b.kind == BarKind::Mmio64 => Some((prev, true)),
            _ => None,
        }
    }

    /// Guest read of BAR register `reg` (0..6). Unimplemented BARs read as zero.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Guest write of bytes `data` at byte `offset` of BAR register `reg`. Returns the move
    /// it causes when `decoding(kind)` says the BAR decodes. The all-ones sizing pattern
    /// reads back the size mask (the low bits are type bits and read only).
    pub fn write_reg(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
        decoding: impl Fn(BarKind) -> bool,
    ) -> Option<BarMove> {
        let (index, upper) = self.owner(reg)?;
        let bar = self.bars[index].as_ref()?;
        let mask64 = !(bar.size - 1);
        let (writable, type_bits) = match (bar.kind, upper) {
            (_, true) => ((mask64 >> 32) as u32, 0),
            (BarKind::Io, false) => (
                mask64 as u32 & PCI_BASE_ADDRESS_IO_MASK,
                self.regs[reg] & !PCI_BASE_ADDRESS_IO_MASK,
            ),
            (_, false) => (
                mask64 as u32 & PCI_BASE_ADDRESS_MEM_MASK,
                self.regs[reg] & !PCI_BASE_ADDRESS_MEM_MASK,
            ),
        };
        let value = merge_bytes(self.regs[reg], offset, data);
        self.regs[reg] = (value & writable) | type_bits;
        let kind = bar.kind;
        let sizing = data.len() == 4 && offset == 0 && value == u32::MAX;
        if sizing || !decoding(kind) {
            return None;
        }
        self.sync(index)
    }

    /// Applies the registers of every BAR whose decoding `decoding` now enables.
    pub fn sync_all(&mut self, decoding: impl Fn(BarKind) -> bool) -> Vec<BarMove> {
        let live: Vec<usize> = (0..PCI_NUM_BARS)
            .filter(|&i| self.bars[i].as_ref().is_some_and(|b| decoding(b.kind)))
            .collect();
        live.into_iter().filter_map(|i| self.sync(i)).collect()
    }

    fn register_address(&self, index: usize, kind: BarKind) -> u64 {
        let low = self.regs[index];
        match kind {
            BarKind::Io => u64::from(low & PCI_BASE_ADDRESS_IO_MASK),
            BarKind::Mmio32 => u64::from(low & PCI_BASE_ADDRESS_MEM_MASK),
            BarKind::Mmio64 => {
                u64::from(low & PCI_BASE_ADDRESS_MEM_MASK) | u64::from(self.regs[index + 1]) << 32
            }
        }
    }

    /// Moves BAR `index` to where its register points, unless that place makes no sense.
    fn sync(&mut self, index: usize) -> Option<BarMove> {
        let bar = self.bars[index].as_ref()?;
        let new = self.register_address(index, bar.kind);
        if new == bar.addr {
            return None;
        }
        if let Err(why) = self.check_place(index, new) {
            log::warn!(
                "BAR{index} move {:#x} -> {new:#x} ignored: {why}; it keeps decoding at {:#x}",
                bar.addr,
                bar.addr
            );
            return None;
        }
        let bar = self.bars[index].as_mut()?;
        let mv = BarMove {
            index,
            kind: bar.kind,
            old: bar.addr,
            new,
            size: bar.size,
        };
        bar.addr = new;
        Some(mv)
    }

    fn check_place(&self, index: usize, new: u64) -> Result<(), String> {
        let bar = self.bars[index].as_ref().ok_or("no such BAR")?;
        let end = new
            .checked_add(bar.size)
            .ok_or_else(|| format!("{:#x} bytes at {new:#x} wrap the address space", bar.size))?;
        if bar.kind == BarKind::Io {
            if end > 0x1_0000 {
                return Err(format!("I/O range {new:#x}..{end:#x} is past port 0xffff"));
            }
        } else if new == 0 {
            return Err("address 0 is guest RAM".into());
        } else if let Some((s, e)) = self.ram.iter().find(|(s, e)| new < *e && *s < end) {
            return Err(format!(
                "{new:#x}..{end:#x} overlaps guest RAM {s:#x}..{e:#x}"
            ));
        }
        for other in self.iter() {
            let same_space = (other.kind == BarKind::Io) == (bar.kind == BarKind::Io);
            if other.index != index
                && same_space
                && new < other.addr + other.size
                && other.addr < end
            {
                return Err(format!(
                    "{new:#x}..{end:#x} overlaps BAR{} at {:#x}",
                    other.index, other.addr
                ));
            }
        }
        Ok(())
    }

    /// Puts BAR `index` back at `addr` after the VMM could not follow a move (its register
    /// keeps the guest's value).
    pub fn revert(&mut self, index: usize, addr: u64) {
        if let Some(b) = self.bars.get_mut(index).and_then(Option::as_mut) {
            b.addr = addr;
        }
    }
}

/// `old` with `data` written at byte `offset` (bytes past the dword are dropped).
pub fn merge_bytes(old: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(offset + i) {
            *slot = *b;
        }
    }
    u32::from_le_bytes(bytes)
}
