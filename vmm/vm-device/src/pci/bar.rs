//! The BAR registers of one PCI function, emulated or passed through (PCI Local Bus 3.0,
//! 6.2.5.1): declared by the device model or discovered from a host device, placed by the
//! platform's allocator, sized and moved by the guest.
//!
//! The guest sees these registers, never a host device's: a passed-through device keeps decoding
//! at its host addresses, and a BAR only says where in guest-physical (or port) space its region
//! appears. As on real hardware (and QEMU), a BAR decodes where its register points only while
//! its decode bit in the command register is set: Linux clears decoding while it sizes and
//! reprograms BARs, so the sizing pattern and half-written 64-bit addresses are never mapped.
//! With decoding on, a write moves the BAR at once, except the all-ones sizing pattern.
//!
//! A move to a place that makes no sense (over guest RAM, over another BAR of the function, past
//! the address space) is contained: the BAR keeps decoding at its last good place, the register
//! keeps what the guest wrote, and a (rate-limited) warning is logged; a later good write moves
//! it from there. A move the platform refuses afterwards (the bus has another device there, or
//! the device cannot follow) is undone with [`Bars::revert`], which puts the register back too.

use crate::pci::configuration::merge_bytes;
use crate::pci::spec::*;
use crate::warn_limited;

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

impl BarKind {
    /// Whether the BAR decodes I/O ports (else memory).
    pub fn is_io(self) -> bool {
        self == BarKind::Io
    }

    /// The smallest size a BAR of this kind can have.
    pub fn min_size(self) -> u64 {
        match self {
            BarKind::Io => PCI_IO_BAR_MIN_SIZE,
            BarKind::Mmio32 | BarKind::Mmio64 => PCI_MEM_BAR_MIN_SIZE,
        }
    }

    /// Whether the command register `command` enables decoding of this kind.
    pub fn decodes(self, command: u16) -> bool {
        let bit = if self.is_io() {
            PCI_COMMAND_IO
        } else {
            PCI_COMMAND_MEMORY
        };
        command & bit != 0
    }
}

/// One BAR and where it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index 0..6 (a 64-bit BAR's low half).
    pub index: usize,
    pub kind: BarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
    pub prefetchable: bool,
    /// Where the BAR decodes in guest-physical (or port) space.
    pub addr: u64,
}

impl Bar {
    /// Whether `[start, end)` overlaps this BAR.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.addr.saturating_add(self.size) && self.addr < end
    }
}

/// A BAR that now decodes elsewhere: unmap at `old`, map at `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index 0..6.
    pub index: usize,
    pub kind: BarKind,
    /// Previous address.
    pub old: u64,
    /// New address.
    pub new: u64,
    pub size: u64,
}

/// Why an address range could not be allocated.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// Alignment must be a power of two.
    #[error("alignment {0:#x} is not a power of two")]
    BadAlignment(u64),
    /// The window has no room left.
    #[error("no room for {size:#x} bytes aligned to {align:#x} in {start:#x}..{end:#x}")]
    Exhausted {
        size: u64,
        align: u64,
        start: u64,
        end: u64,
    },
}

/// The platform's address map as BAR placement sees it: the windows BARs are allocated from,
/// and the guest RAM no memory BAR may decode over.
pub trait BarAllocator {
    /// A naturally aligned address for `size` bytes (a power of two) of `kind`.
    fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError>;

    /// Guest RAM, as `[start, end)` ranges.
    fn guest_ram(&self) -> Vec<(u64, u64)>;
}

/// A BAR could not be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot place BAR{index} ({size:#x} bytes): {source}")]
pub struct PlaceError {
    pub index: usize,
    pub size: u64,
    pub source: AllocError,
}

/// A BAR a device model declares that a type-0 header cannot hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeclareError {
    /// Only BARs 0..6 exist.
    #[error("BAR{index} does not exist (a type-0 header has {PCI_NUM_BARS})")]
    NoSuchBar { index: usize },
    /// A 64-bit BAR needs the next register for its upper half.
    #[error("64-bit BAR{index} has no register left for its upper half")]
    NoUpperHalf { index: usize },
    /// The register already belongs to a BAR.
    #[error("BAR{index} is already declared (or is a 64-bit BAR's upper half)")]
    Taken { index: usize },
}

/// Why the guest's new address for a BAR was not followed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoveRefused {
    #[error("{size:#x} bytes at {new:#x} wrap the address space")]
    Wraps { new: u64, size: u64 },
    #[error("I/O range {new:#x}..{end:#x} is past port 0xffff")]
    PastIoSpace { new: u64, end: u64 },
    #[error("address 0 is guest RAM")]
    AtZero,
    #[error("{new:#x}..{end:#x} overlaps guest RAM {ram_start:#x}..{ram_end:#x}")]
    OverRam {
        new: u64,
        end: u64,
        ram_start: u64,
        ram_end: u64,
    },
    #[error("{new:#x}..{end:#x} overlaps BAR{other} at {other_addr:#x}")]
    OverBar {
        new: u64,
        end: u64,
        other: usize,
        other_addr: u64,
    },
}

/// The BAR registers 0..5 of one function.
#[derive(Debug, Default)]
pub struct Bars {
    bars: [Option<Bar>; PCI_NUM_BARS],
    /// The guest-visible register values.
    regs: [u32; PCI_NUM_BARS],
    /// Guest RAM ranges `[start, end)` no memory BAR may cover (known once placed).
    ram: Vec<(u64, u64)>,
}

impl Bars {
    /// No BARs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares BAR `index` of `kind` with room for `size` bytes (rounded up to a power of
    /// two, at least the kind's minimum). A 64-bit BAR also takes register `index + 1`. It
    /// decodes nowhere until [`Bars::place`] puts it somewhere.
    pub fn declare(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), DeclareError> {
        if index >= PCI_NUM_BARS {
            return Err(DeclareError::NoSuchBar { index });
        }
        let upper = index + 1;
        if kind == BarKind::Mmio64 && upper >= PCI_NUM_BARS {
            return Err(DeclareError::NoUpperHalf { index });
        }
        let taken = |i: usize| self.owner(i).is_some();
        if taken(index) || (kind == BarKind::Mmio64 && taken(upper)) {
            return Err(DeclareError::Taken { index });
        }
        self.bars[index] = Some(Bar {
            index,
            kind,
            size: size.max(kind.min_size()).next_power_of_two(),
            prefetchable: prefetchable && !kind.is_io(),
            addr: 0,
        });
        self.set_register(index, 0);
        Ok(())
    }

    /// Discovers the BARs of a device from its BAR registers' type bits (`register(i)`) and the
    /// size of the region behind each (`size(i)`, 0 when there is none).
    pub fn discover(register: impl Fn(usize) -> u32, size: impl Fn(usize) -> u64) -> Self {
        let mut bars = Bars::new();
        let mut index = 0;
        while index < PCI_NUM_BARS {
            let raw = register(index);
            let kind = if raw & PCI_BASE_ADDRESS_SPACE_IO != 0 {
                BarKind::Io
            } else if raw & PCI_BASE_ADDRESS_MEM_TYPE_64 != 0 && index + 1 < PCI_NUM_BARS {
                BarKind::Mmio64
            } else {
                BarKind::Mmio32
            };
            let bytes = size(index);
            if bytes > 0 {
                let prefetchable = raw & PCI_BASE_ADDRESS_MEM_PREFETCH != 0;
                // Cannot fail: the index is in range and nothing before it took it.
                let _ = bars.declare(index, kind, bytes, prefetchable);
            }
            index += if kind == BarKind::Mmio64 { 2 } else { 1 };
        }
        bars
    }

    /// Places every BAR with `alloc`, and learns the guest RAM moves must keep clear of.
    /// Returns the BARs as placed.
    pub fn place(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PlaceError> {
        self.ram = alloc.guest_ram();
        let mut placed = Vec::new();
        for index in 0..PCI_NUM_BARS {
            let Some(bar) = self.bars[index] else {
                continue;
            };
            let addr = alloc
                .allocate(bar.kind, bar.size)
                .map_err(|source| PlaceError {
                    index,
                    size: bar.size,
                    source,
                })?;
            self.set_address(index, addr);
            placed.extend(self.bars[index]);
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

    /// Guest read of BAR register `reg` (0..6). Unimplemented BARs read as zero.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Guest write of bytes `data` at byte `offset` of BAR register `reg` (0..6). Returns the
    /// move it causes when `command` enables the BAR's decoding. The all-ones sizing pattern
    /// reads back the size mask (the low bits are type bits and read only).
    pub fn write_reg(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
        command: u16,
    ) -> Option<BarMove> {
        let (index, upper) = self.owner(reg)?;
        let bar = self.bars[index]?;
        let size_mask = !(bar.size - 1);
        let (writable, type_bits) = match (bar.kind, upper) {
            (_, true) => ((size_mask >> 32) as u32, 0),
            (BarKind::Io, false) => (
                size_mask as u32 & PCI_BASE_ADDRESS_IO_MASK,
                self.regs[reg] & !PCI_BASE_ADDRESS_IO_MASK,
            ),
            (_, false) => (
                size_mask as u32 & PCI_BASE_ADDRESS_MEM_MASK,
                self.regs[reg] & !PCI_BASE_ADDRESS_MEM_MASK,
            ),
        };
        let value = merge_bytes(self.regs[reg], offset, data);
        self.regs[reg] = (value & writable) | type_bits;
        let sizing = data.len() == 4 && offset == 0 && value == u32::MAX;
        if sizing || !bar.kind.decodes(command) {
            return None;
        }
        self.sync(index)
    }

    /// After a write to the command register: the moves of every BAR whose decoding `command`
    /// enables and whose register points elsewhere.
    pub fn sync_all(&mut self, command: u16) -> Vec<BarMove> {
        let live: Vec<usize> = self
            .iter()
            .filter(|b| b.kind.decodes(command))
            .map(|b| b.index)
            .collect();
        live.into_iter().filter_map(|i| self.sync(i)).collect()
    }

    /// Puts BAR `index` back at `addr`, register included, after the platform could not follow
    /// a move.
    pub fn revert(&mut self, index: usize, addr: u64) {
        if self.get(index).is_some() {
            self.set_address(index, addr);
        }
    }

    /// Makes BAR `index` decode at `addr` and its register say so.
    fn set_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars[index].as_mut() else {
            return;
        };
        bar.addr = addr;
        self.set_register(index, addr);
    }

    /// Writes `addr` into BAR `index`'s register(s), with its type bits.
    fn set_register(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars[index] else {
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

    /// The address BAR `index`'s register(s) hold.
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
        let bar = self.bars[index]?;
        let new = self.register_address(index, bar.kind);
        if new == bar.addr {
            return None;
        }
        if let Err(why) = self.check_place(&bar, new) {
            warn_limited!(
                "BAR{index} move {:#x} -> {new:#x} ignored: {why}; it keeps decoding at {:#x}",
                bar.addr,
                bar.addr
            );
            return None;
        }
        if let Some(b) = self.bars[index].as_mut() {
            b.addr = new;
        }
        Some(BarMove {
            index,
            kind: bar.kind,
            old: bar.addr,
            new,
            size: bar.size,
        })
    }

    /// Whether `bar` may decode at `new`.
    fn check_place(&self, bar: &Bar, new: u64) -> Result<(), MoveRefused> {
        let end = new.checked_add(bar.size).ok_or(MoveRefused::Wraps {
            new,
            size: bar.size,
        })?;
        if bar.kind.is_io() {
            if end > PCI_IO_SPACE_SIZE {
                return Err(MoveRefused::PastIoSpace { new, end });
            }
        } else if new == 0 {
            return Err(MoveRefused::AtZero);
        } else if let Some(&(ram_start, ram_end)) =
            self.ram.iter().find(|(s, e)| new < *e && *s < end)
        {
            return Err(MoveRefused::OverRam {
                new,
                end,
                ram_start,
                ram_end,
            });
        }
        let clash = self.iter().find(|other| {
            other.index != bar.index
                && other.kind.is_io() == bar.kind.is_io()
                && other.overlaps(new, end)
        });
        match clash {
            Some(other) => Err(MoveRefused::OverBar {
                new,
                end,
                other: other.index,
                other_addr: other.addr,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "bar_tests.rs"]
mod tests;
