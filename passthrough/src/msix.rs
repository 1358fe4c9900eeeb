//! The MSI-X capability and its table, emulated; the PBA read from the device (PCI Local Bus
//! 3.0, 6.8.2).
//!
//! The table lives in a BAR. Guest accesses to it are trapped and land here, never on the
//! device: VFIO programs the device's real table when MSI-X is enabled through
//! VFIO_DEVICE_SET_IRQS, and each guest entry becomes the KVM route of that vector's eventfd.
//! Accesses that are not one aligned dword or qword, or that fall past the last entry, are
//! ignored (reads return zero), as the spec allows for malformed accesses.

use vm_device::pci::configuration::merge_bytes;
use vm_device::pci::spec::*;
use vm_device::{debug_limited, warn_limited};

use vm_device::interrupt::MsiMessage;

/// What the interrupt side must do after a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixUpdate {
    None,
    /// MSI-X turned on: enable `vectors` vectors in VFIO, route and unmask each as the table says.
    Enable {
        vectors: usize,
    },
    /// MSI-X turned off.
    Disable,
    /// The function mask changed: re-mask every vector.
    MaskAll,
    /// Table entry `i` changed while enabled: re-route or re-mask it.
    Vector(usize),
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// The emulated MSI-X capability at `offset`, with its table.
#[derive(Clone, Debug)]
pub struct MsixCap {
    offset: usize,
    control: u16,
    table_reg: u32,
    pba_reg: u32,
    entries: Vec<Entry>,
}

impl MsixCap {
    /// The capability at `offset` with the device's control word and table/PBA registers.
    pub fn new(offset: usize, control: u16, table_reg: u32, pba_reg: u32) -> Self {
        let n = usize::from(control & PCI_MSIX_FLAGS_QSIZE) + 1;
        Self {
            offset,
            control: control & PCI_MSIX_FLAGS_QSIZE,
            table_reg,
            pba_reg,
            // Every entry starts masked (6.8.2.9: vector control reset value 1).
            entries: vec![
                Entry {
                    ctrl: PCI_MSIX_ENTRY_CTRL_MASKBIT,
                    ..Default::default()
                };
                n
            ],
        }
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Whether config byte `off` lies in the capability (12 bytes).
    pub fn contains(&self, off: usize) -> bool {
        off >= self.offset && off < self.offset + 12
    }

    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    pub fn enabled(&self) -> bool {
        self.control & PCI_MSIX_FLAGS_ENABLE != 0
    }

    fn function_masked(&self) -> bool {
        self.control & PCI_MSIX_FLAGS_MASKALL != 0
    }

    /// The BAR holding the table and the table's offset in it.
    pub fn table(&self) -> (usize, u64) {
        (
            (self.table_reg & PCI_MSIX_BIR_MASK) as usize,
            u64::from(self.table_reg & !PCI_MSIX_BIR_MASK),
        )
    }

    /// Table size in bytes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * PCI_MSIX_ENTRY_SIZE
    }

    /// The BAR holding the PBA, its offset and size in bytes (one bit per vector, in qwords).
    pub fn pba(&self) -> (usize, u64, u64) {
        (
            (self.pba_reg & PCI_MSIX_BIR_MASK) as usize,
            u64::from(self.pba_reg & !PCI_MSIX_BIR_MASK),
            (self.entries.len() as u64).div_ceil(64) * 8,
        )
    }

    /// Whether the vector is masked, by its entry or the function mask.
    pub fn masked(&self, i: usize) -> bool {
        self.function_masked()
            || self
                .entries
                .get(i)
                .is_none_or(|e| e.ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT != 0)
    }

    /// The message of vector `i`.
    pub fn message(&self, i: usize) -> MsiMessage {
        let e = self.entries.get(i).copied().unwrap_or_default();
        MsiMessage {
            address: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
            data: e.data,
        }
    }

    /// Reads the config dword at `reg_off` inside the capability; `header` as the device has it.
    pub fn read(&self, reg_off: usize, header: u16) -> u32 {
        match reg_off.saturating_sub(self.offset) & !3 {
            0 => u32::from(header) | u32::from(self.control) << 16,
            PCI_MSIX_TABLE => self.table_reg,
            PCI_MSIX_PBA => self.pba_reg,
            _ => 0,
        }
    }

    /// Guest write at config byte `off`: only the enable and function-mask bits are writable.
    pub fn write(&mut self, off: usize, data: &[u8]) -> MsixUpdate {
        let Some(rel) = off.checked_sub(self.offset) else {
            return MsixUpdate::None;
        };
        if rel & !3 != 0 {
            return MsixUpdate::None;
        }
        let value = merge_bytes(self.read(self.offset, 0), rel & 3, data);
        let ctl = (value >> 16) as u16;
        let writable = PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL;
        let before = self.control;
        self.control = (self.control & !writable) | (ctl & writable);
        match (before & PCI_MSIX_FLAGS_ENABLE != 0, self.enabled()) {
            (false, true) => MsixUpdate::Enable {
                vectors: self.vectors(),
            },
            (true, false) => MsixUpdate::Disable,
            (true, true) if (before ^ self.control) & PCI_MSIX_FLAGS_MASKALL != 0 => {
                MsixUpdate::MaskAll
            }
            _ => MsixUpdate::None,
        }
    }

    fn entry_field(&self, off: u64) -> Option<(usize, usize)> {
        let i = usize::try_from(off / PCI_MSIX_ENTRY_SIZE).ok()?;
        (i < self.entries.len()).then_some((i, (off % PCI_MSIX_ENTRY_SIZE) as usize / 4))
    }

    fn valid_access(&self, off: u64, len: usize) -> bool {
        matches!(len, 4 | 8)
            && off.is_multiple_of(len as u64)
            && off
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.table_len())
    }

    /// Guest read of `data.len()` bytes at offset `off` of the table.
    pub fn read_table(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.valid_access(off, data.len()) {
            debug_limited!(
                "MSI-X table read of {} bytes at {off:#x} ignored",
                data.len()
            );
            return;
        }
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            if let Some((i, f)) = self.entry_field(off + 4 * k as u64) {
                let e = self.entries[i];
                let v = [e.addr_lo, e.addr_hi, e.data, e.ctrl][f];
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Guest write at offset `off` of the table; returns the vectors it changed.
    pub fn write_table(&mut self, off: u64, data: &[u8]) -> Vec<MsixUpdate> {
        if !self.valid_access(off, data.len()) {
            warn_limited!(
                "MSI-X table write of {} bytes at {off:#x} ignored (table holds {} entries)",
                data.len(),
                self.entries.len()
            );
            return Vec::new();
        }
        let mut changed = Vec::new();
        for (k, chunk) in data.chunks(4).enumerate() {
            let Some((i, f)) = self.entry_field(off + 4 * k as u64) else {
                continue;
            };
            let e = &mut self.entries[i];
            let v = merge_bytes(0, 0, chunk);
            let before = *e;
            match f {
                0 => e.addr_lo = v & !0x3,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.ctrl = v & PCI_MSIX_ENTRY_CTRL_MASKBIT,
            }
            let differs = (before.addr_lo, before.addr_hi, before.data, before.ctrl)
                != (e.addr_lo, e.addr_hi, e.data, e.ctrl);
            if differs && self.enabled() && !changed.contains(&MsixUpdate::Vector(i)) {
                changed.push(MsixUpdate::Vector(i));
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> MsixCap {
        // 4 vectors, table in BAR0 at 0x2000, PBA in BAR0 at 0x3000.
        MsixCap::new(0x40, 3, 0x2000, 0x3000)
    }

    #[test]
    fn table_and_pba_placement_from_the_bir_registers() {
        let c = MsixCap::new(0x40, 7, 0x2004, 0x3004);
        assert_eq!(c.table(), (4, 0x2000));
        assert_eq!(c.table_len(), 8 * 16);
        assert_eq!(c.pba(), (4, 0x3000, 8));
    }

    #[test]
    fn entries_start_masked_and_enable_reports_vectors() {
        let mut c = cap();
        assert!((0..4).all(|i| c.masked(i)));
        assert_eq!(
            c.write(0x42, &PCI_MSIX_FLAGS_ENABLE.to_le_bytes()),
            MsixUpdate::Enable { vectors: 4 }
        );
        assert_eq!(
            c.read(0x40, 0x0011) >> 16,
            u32::from(PCI_MSIX_FLAGS_ENABLE | 3)
        );
        assert_eq!(
            c.write(
                0x43,
                &[((PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL) >> 8) as u8]
            ),
            MsixUpdate::MaskAll
        );
        assert_eq!(c.write(0x42, &[0, 0]), MsixUpdate::Disable);
    }

    #[test]
    fn table_writes_change_one_vector_each() {
        let mut c = cap();
        c.write(0x42, &PCI_MSIX_FLAGS_ENABLE.to_le_bytes());
        let addr = 0xfee0_0000u64 | 0x1000;
        assert_eq!(
            c.write_table(0x10, &addr.to_le_bytes()),
            vec![MsixUpdate::Vector(1)]
        );
        assert_eq!(
            c.write_table(0x18, &0x41u32.to_le_bytes()),
            vec![MsixUpdate::Vector(1)]
        );
        assert_eq!(
            c.write_table(0x1c, &0u32.to_le_bytes()),
            vec![MsixUpdate::Vector(1)]
        );
        assert!(!c.masked(1));
        assert_eq!(
            c.message(1),
            MsiMessage {
                address: addr,
                data: 0x41
            }
        );
        assert!(
            c.write_table(0x1c, &0u32.to_le_bytes()).is_empty(),
            "no change, no update"
        );
        let mut back = [0u8; 8];
        c.read_table(0x10, &mut back);
        assert_eq!(u64::from_le_bytes(back), addr);
    }

    #[test]
    fn out_of_range_and_malformed_table_accesses_are_ignored() {
        let mut c = cap();
        c.write(0x42, &PCI_MSIX_FLAGS_ENABLE.to_le_bytes());
        assert!(
            c.write_table(0x40, &0u32.to_le_bytes()).is_empty(),
            "vector 4 of 4"
        );
        assert!(c.write_table(u64::MAX - 3, &0u32.to_le_bytes()).is_empty());
        assert!(c.write_table(0x1d, &[0]).is_empty(), "byte write");
        assert!(
            c.write_table(0x12, &0u32.to_le_bytes()).is_empty(),
            "unaligned"
        );
        let mut b = [0xaau8; 4];
        c.read_table(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(c.masked(1) && c.masked(99));
    }
}
