//! QEMU's firmware configuration device (QEMU docs/specs/fw_cfg.rst), its traditional x86 I/O
//! interface: a 16-bit selector at port 0x510 and an 8-bit data port at 0x511. No DMA interface
//! (FW_CFG_ID bit 1 clear): nothing we run needs it.
//!
//! kvm-unit-tests reads the CPU count here to know how many APs to wait for in its SMP
//! bring-up (lib/x86/smp.c), and the RAM size; an unanswered read (all ones from an empty port)
//! hangs that bring-up waiting for 65535 CPUs.

use std::collections::BTreeMap;

use vm_device::debug_limited;

use crate::devices::bus::BusDevice;

/// The selector port; the data port is the next one.
pub const FW_CFG_PORT: u64 = 0x510;
/// Selector and data ports.
pub const FW_CFG_LEN: u64 = 2;
const DATA_OFFSET: u64 = 1;

// Item keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h, the same in Linux's uapi).
/// "QEMU".
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Feature bitmap, u32 little-endian.
pub const FW_CFG_ID: u16 = 0x01;
/// Guest RAM in bytes, u64 little-endian.
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// vCPUs present at boot, u16 little-endian.
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// The most vCPUs the machine can have, u16 little-endian.
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// The file directory: a big-endian u32 count, then 64-byte entries.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// Selector bit 14: the write channel. Data port writes are ignored since QEMU 2.4; the bit
/// selects the same item.
const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// FW_CFG_ID bit 0: the traditional (selector/data port) interface.
const FW_CFG_ID_TRADITIONAL: u32 = 1 << 0;

/// What the items describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwCfgConfig {
    /// vCPUs at boot (FW_CFG_NB_CPUS).
    pub boot_cpus: u16,
    /// The most vCPUs the machine supports (FW_CFG_MAX_CPUS).
    pub max_cpus: u16,
    /// Guest RAM bytes (FW_CFG_RAM_SIZE).
    pub ram_size: u64,
}

/// The device: read-only items, a selected key and an offset into its item.
#[derive(Debug)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// A device serving the items for `c`.
    pub fn new(c: FwCfgConfig) -> Self {
        let items = BTreeMap::from([
            (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
            (FW_CFG_ID, FW_CFG_ID_TRADITIONAL.to_le_bytes().to_vec()),
            (FW_CFG_RAM_SIZE, c.ram_size.to_le_bytes().to_vec()),
            (FW_CFG_NB_CPUS, c.boot_cpus.to_le_bytes().to_vec()),
            (FW_CFG_MAX_CPUS, c.max_cpus.to_le_bytes().to_vec()),
            // No files.
            (FW_CFG_FILE_DIR, 0u32.to_be_bytes().to_vec()),
        ]);
        Self {
            items,
            selected: FW_CFG_SIGNATURE,
            offset: 0,
        }
    }

    /// Selects `key`; the next data read starts at the item's first byte.
    pub fn select(&mut self, key: u16) {
        self.selected = key & !FW_CFG_WRITE_CHANNEL;
        self.offset = 0;
    }

    /// The next byte of the selected item: 0 past its end or for a key with no item.
    pub fn read_byte(&mut self) -> u8 {
        match self
            .items
            .get(&self.selected)
            .and_then(|i| i.get(self.offset))
        {
            Some(&b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // QEMU answers reads at either port with data bytes; a wider read gets the next bytes
        // in order, as the spec says of wide data register reads.
        for b in data.iter_mut() {
            *b = self.read_byte();
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            // A byte write at either port is a data write, ignored since QEMU 2.4.
            (_, &[b]) => debug_limited!("fw_cfg: data write {b:#x} ignored"),
            _ => debug_limited!(
                "fw_cfg: {}-byte write at port {:#x} ignored",
                data.len(),
                FW_CFG_PORT + offset.min(DATA_OFFSET)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> FwCfg {
        FwCfg::new(FwCfgConfig {
            boot_cpus: 4,
            max_cpus: 4,
            ram_size: 512 << 20,
        })
    }

    /// Selects `key` with a 16-bit write, as kvm-unit-tests' `outw` does, and reads `n` bytes
    /// one at a time from the data port.
    fn read_item(d: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        d.write(FW_CFG_PORT, 0, &key.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0xaa];
                d.read(FW_CFG_PORT, DATA_OFFSET, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_read_as_qemu_serves_them() {
        let mut d = device();
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 2), [4, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_MAX_CPUS, 2), [4, 0]);
        assert_eq!(
            read_item(&mut d, FW_CFG_RAM_SIZE, 8),
            (512u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut d, FW_CFG_FILE_DIR, 4), [0; 4]);
    }

    #[test]
    fn past_the_end_and_unknown_keys_read_zero() {
        let mut d = device();
        // kvm-unit-tests reads its dummy MAX_RAM key 0x11 as a u64: no item, zero.
        assert_eq!(read_item(&mut d, 0x11, 8), [0; 8]);
        assert_eq!(read_item(&mut d, 0x8000, 2), [0; 2]);
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 4), [4, 0, 0, 0]);
        // Reading on past the end stays at zero; re-selecting starts over.
        let mut b = [0xaa; 2];
        d.read(FW_CFG_PORT, DATA_OFFSET, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 1), [4]);
    }

    #[test]
    fn writes_other_than_a_16_bit_selector_change_nothing() {
        let mut d = device();
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 1), b"Q");
        // A byte write to either port is a (dropped) data write, not a select.
        d.write(FW_CFG_PORT, 0, &[FW_CFG_NB_CPUS as u8]);
        d.write(FW_CFG_PORT, DATA_OFFSET, &[0]);
        d.write(FW_CFG_PORT, 0, &[5, 0, 0, 0]);
        let mut b = [0u8; 3];
        d.read(FW_CFG_PORT, DATA_OFFSET, &mut b);
        assert_eq!(&b, b"EMU", "wide reads take the next bytes in order");
        // The write-channel bit selects the same item.
        assert_eq!(
            read_item(&mut d, FW_CFG_WRITE_CHANNEL | FW_CFG_NB_CPUS, 2),
            [4, 0]
        );
    }

    #[test]
    fn ignored_writes_a_guest_repeats_cannot_flood_the_log() {
        use vm_device::ratelimit::{capture::lines_logged_by, BURST};

        let mut d = device();
        let lines = lines_logged_by(|| {
            for _ in 0..10_000 {
                d.write(FW_CFG_PORT, DATA_OFFSET, &[0]);
                d.write(FW_CFG_PORT, 0, &[5, 0, 0, 0]);
            }
        });
        assert!(
            lines.len() <= 2 * BURST as usize,
            "{} lines for 20000 ignored writes",
            lines.len()
        );
    }
}
