//! The configuration space of an emulated PCI function (a type-0 header with write masks, PCI
//! Local Bus 3.0, 6.1 and 6.2), its BARs kept by the shared [`Bars`] model.

use crate::debug_limited;
use crate::pci::bar::{Bar, BarAllocator, BarKind, BarMove, Bars, DeclareError, PlaceError};
use crate::pci::spec::*;

/// `old` with `data` written at byte `offset` (bytes past the dword are dropped).
pub fn merge_bytes(old: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = offset.checked_add(i).and_then(|at| bytes.get_mut(at)) {
            *slot = *b;
        }
    }
    u32::from_le_bytes(bytes)
}

/// Whether a config access of `len` bytes at byte `offset` of a dword register is well formed
/// (within the dword, not empty). Others are ignored, as the root complex never issues them.
pub fn valid_access(offset: usize, len: usize) -> bool {
    len > 0 && offset.checked_add(len).is_some_and(|end| end <= 4)
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    pub revision: u8,
}

// Dword registers of the header.
const REG_ID: usize = PCI_VENDOR_ID / 4;
const REG_COMMAND: usize = PCI_COMMAND / 4;
const REG_CLASS: usize = PCI_CLASS_REVISION / 4;
const REG_CACHE_LINE: usize = PCI_CACHE_LINE_SIZE / 4;
const REG_BAR0: usize = PCI_BASE_ADDRESS_0 / 4;
const REG_BAR_END: usize = PCI_BASE_ADDRESS_5_END / 4;
const REG_SUBSYSTEM: usize = PCI_SUBSYSTEM_VENDOR_ID / 4;
const REG_CAPABILITY_LIST: usize = PCI_CAPABILITY_LIST / 4;
const REG_INTERRUPT: usize = PCI_INTERRUPT_LINE / 4;

/// Command bits an emulated function implements: I/O and memory decode, bus master, INTx
/// disable.
const COMMAND_WRITABLE: u32 =
    (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE) as u32;

/// The configuration space of one emulated function.
pub struct PciConfiguration {
    regs: Box<[u32; PCIE_CONFIG_REGS]>,
    writable: Box<[u32; PCIE_CONFIG_REGS]>,
    bars: Bars,
}

impl PciConfiguration {
    /// A type-0 header for `ids`, no BARs, no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut regs = Box::new([0u32; PCIE_CONFIG_REGS]);
        let mut writable = Box::new([0u32; PCIE_CONFIG_REGS]);
        regs[REG_ID] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        regs[REG_CLASS] = u32::from(ids.class) << 24
            | u32::from(ids.subclass) << 16
            | u32::from(ids.prog_if) << 8
            | u32::from(ids.revision);
        regs[REG_SUBSYSTEM] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        writable[REG_COMMAND] = COMMAND_WRITABLE;
        // Cache line size and latency timer are read/write scratch for the OS.
        writable[REG_CACHE_LINE] = 0x0000_ffff;
        // Interrupt line is scratch for the OS; pin 0: no INTx.
        writable[REG_INTERRUPT] = 0xff;
        Self {
            regs,
            writable,
            bars: Bars::new(),
        }
    }

    /// Declares BAR `index` of `kind` and `size` bytes; it decodes once placed
    /// ([`PciConfiguration::place_bars`]). A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), DeclareError> {
        self.bars.declare(index, kind, size, prefetchable)
    }

    /// Places the declared BARs with `alloc`; returns them.
    pub fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PlaceError> {
        self.bars.place(alloc)
    }

    /// The BAR at `index`, if declared.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied()
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND] as u16
    }

    /// Sets the interrupt pin the function reports (1 = INTA# .. 4 = INTD#, 0: none; PCI 3.0,
    /// 6.2.4). The interrupt line stays the OS's (or firmware's) to write.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let shift = 8 * (PCI_INTERRUPT_PIN % 4);
        let reg = &mut self.regs[REG_INTERRUPT];
        *reg = (*reg & !(0xff << shift)) | u32::from(pin) << shift;
    }

    /// Points the capabilities pointer at `first` and sets Status.Capabilities List (PCI 3.0,
    /// 6.7). The capability registers themselves are the device model's: it answers accesses
    /// inside them.
    pub fn set_capabilities_pointer(&mut self, first: u8) {
        self.regs[REG_CAPABILITY_LIST] = u32::from(first);
        self.set_status_bit(PCI_STATUS_CAP_LIST, true);
    }

    /// Sets Status.Interrupt Status, which reflects the function's INTx# (PCI 3.0, 6.2.3).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        self.set_status_bit(PCI_STATUS_INTERRUPT, asserted);
    }

    fn set_status_bit(&mut self, bit: u16, set: bool) {
        let bit = u32::from(bit) << 16;
        if set {
            self.regs[REG_COMMAND] |= bit;
        } else {
            self.regs[REG_COMMAND] &= !bit;
        }
    }

    /// Reads dword register `reg`; out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if (REG_BAR0..REG_BAR_END).contains(&reg) {
            return self.bars.read_reg(reg - REG_BAR0);
        }
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Sets a register and the bits of it the guest may write (for capabilities the device
    /// model sets up). The BAR registers are the [`Bars`]' and not set this way.
    pub fn set_reg(&mut self, reg: usize, value: u32, writable: u32) {
        if reg < PCIE_CONFIG_REGS && !(REG_BAR0..REG_BAR_END).contains(&reg) {
            self.regs[reg] = value;
            self.writable[reg] = writable;
        }
    }

    /// Writes `data` at byte `offset` of register `reg`, honouring the write masks. Returns the
    /// BAR moves this causes (see [`crate::pci::bar`] for when a BAR moves).
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        if reg >= PCIE_CONFIG_REGS || !valid_access(offset, data.len()) {
            debug_limited!(
                "config write of {} bytes at register {reg} offset {offset} ignored",
                data.len()
            );
            return Vec::new();
        }
        if (REG_BAR0..REG_BAR_END).contains(&reg) {
            let command = self.command();
            return self
                .bars
                .write_reg(reg - REG_BAR0, offset, data, command)
                .into_iter()
                .collect();
        }
        let old = self.regs[reg];
        let value = merge_bytes(old, offset, data);
        self.regs[reg] = (old & !self.writable[reg]) | (value & self.writable[reg]);
        if reg == REG_COMMAND {
            return self.bars.sync_all(self.command());
        }
        Vec::new()
    }

    /// Puts BAR `index` back at `addr` (after a move the platform refused).
    pub fn revert_bar(&mut self, index: usize, addr: u64) {
        self.bars.revert(index, addr);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pci::bar::AllocError;

    /// Places BARs at the addresses it holds, in order.
    struct At(Vec<u64>);

    impl BarAllocator for At {
        fn allocate(&mut self, _: BarKind, _: u64) -> Result<u64, AllocError> {
            Ok(self.0.remove(0))
        }
        fn guest_ram(&self) -> Vec<(u64, u64)> {
            vec![(0, 0x8000_0000)]
        }
    }

    /// A function with edu's IDs and nothing else.
    pub(crate) fn cfg() -> PciConfiguration {
        PciConfiguration::new(PciIds {
            vendor: 0x1234,
            device: 0x11e8,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
        })
    }

    /// A function with one BAR `index` of `kind` placed at `addr`.
    fn with_bar(
        index: usize,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
        addr: u64,
    ) -> PciConfiguration {
        let mut c = cfg();
        c.add_bar(index, kind, size, prefetchable).unwrap();
        c.place_bars(&mut At(vec![addr])).unwrap();
        c
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
        assert!(BarKind::Mmio32.decodes(c.command()));
        assert_eq!(c.read_reg(PCIE_CONFIG_REGS), 0xffff_ffff);
    }

    fn enable_mem(c: &mut PciConfiguration) -> Vec<BarMove> {
        c.write_reg(1, 0, &[0x2, 0])
    }

    #[test]
    fn bar32_sizing_and_move() {
        let mut c = with_bar(0, BarKind::Mmio32, 0x10_0000, false, 0xc000_0000);
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
        let mut c = with_bar(2, BarKind::Mmio64, 0x4000, true, 0x1_0000_0000);
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
        let mut c = with_bar(1, BarKind::Io, 0x20, false, 0x1000);
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

    #[test]
    fn capability_registers_set_by_the_model_honour_their_write_mask() {
        let mut c = cfg();
        c.set_reg(0x10, 0x1234_0005, 0xffff_0000);
        c.write_reg(0x10, 0, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_reg(0x10), 0xffff_0005);
        c.set_reg(REG_BAR0, 0xdead_beef, u32::MAX);
        assert_eq!(c.read_reg(REG_BAR0), 0, "BAR registers are the BAR model's");
    }

    #[test]
    fn pin_capabilities_and_interrupt_status_are_read_only_to_the_guest() {
        let mut c = cfg();
        c.set_interrupt_pin(1);
        c.set_capabilities_pointer(0x40);
        c.set_interrupt_status(true);
        c.write_reg(REG_INTERRUPT, 0, &[0x11, 0x04]);
        c.write_reg(REG_CAPABILITY_LIST, 0, &[0x80]);
        c.write_reg(REG_COMMAND, 2, &[0, 0]);
        assert_eq!(c.read_reg(REG_INTERRUPT), 0x0111, "line written, pin kept");
        assert_eq!(c.read_reg(REG_CAPABILITY_LIST), 0x40);
        let status = (c.read_reg(REG_COMMAND) >> 16) as u16;
        assert_eq!(status, PCI_STATUS_CAP_LIST | PCI_STATUS_INTERRUPT);
        c.set_interrupt_status(false);
        assert_eq!((c.read_reg(REG_COMMAND) >> 16) as u16, PCI_STATUS_CAP_LIST);
        assert!(c.write_reg(REG_COMMAND, 0, &[0x06, 0]).is_empty());
        assert_eq!(
            c.command(),
            0x6,
            "the command half is untouched by status bits"
        );
    }

    #[test]
    fn merge_bytes_drops_bytes_past_the_dword() {
        assert_eq!(merge_bytes(0x1122_3344, 1, &[0xaa, 0xbb]), 0x11bb_aa44);
        assert_eq!(merge_bytes(0x1122_3344, 3, &[0xaa, 0xbb]), 0xaa22_3344);
        assert_eq!(merge_bytes(0x1122_3344, usize::MAX, &[0xaa]), 0x1122_3344);
        assert!(valid_access(0, 4) && valid_access(3, 1));
        assert!(!valid_access(3, 2) && !valid_access(0, 0) && !valid_access(usize::MAX, 1));
    }
}
