//! An emulated `edu` (QEMU's hw/misc/edu.c test device) DMA engine: a PCI function whose DMA
//! goes through the virtual VT-d when it sits behind it, so a guest IOMMU driver's mappings,
//! faults and fault events can be tested with a device whose every access the VMM sees.
//!
//! Modelled: the identification and liveness registers, the DMA source, destination, count and
//! command registers, and the 4 KiB device buffer at device address 0x40000. A DMA runs to
//! completion (or to its first fault) during the command write, so the command's start bit
//! always reads back clear. Not modelled: the factorial unit and interrupts (raise, status and
//! acknowledge registers read as zero): software polls the command register.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use viommu::{Access, SourceId, PAGE_SIZE};

use vm_device::pci::bar::{Bar, BarAllocator, BarKind, BarMove};
use vm_device::pci::configuration::{PciConfiguration, PciIds};
use vm_device::pci::device::{PciDevice, PciDeviceError};
use vm_device::{debug_limited, warn_limited};

use crate::devices::vtd::{self, SharedVtd};

/// PCI identity of QEMU's edu.
pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;
/// Size of BAR0 (1 MiB of MMIO).
pub const EDU_BAR0_SIZE: u64 = 1 << 20;

// Register offsets in BAR0 (QEMU docs/specs/edu.rst).
const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_CNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
/// Identification: version 1.0 and 0xed.
const ID_VALUE: u32 = 0x0100_00ed;
/// DMA command bits: start; direction (set: device buffer to RAM).
const DMA_CMD_START: u64 = 1 << 0;
const DMA_CMD_TO_RAM: u64 = 1 << 1;
/// The device buffer, in the device's own address space.
const BUFFER_ADDR: u64 = 0x4_0000;
const BUFFER_SIZE: u64 = 4096;

/// The emulated edu function.
pub struct Edu {
    config: PciConfiguration,
    mem: GuestMemoryMmap,
    /// The remapping unit its DMA goes through, and its requester id there.
    iommu: Option<(SharedVtd, SourceId)>,
    liveness: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_cnt: u64,
    buffer: Box<[u8; BUFFER_SIZE as usize]>,
}

impl Edu {
    /// An edu whose DMA reaches `mem` directly, or through `iommu` as requester `source`.
    pub fn new(mem: GuestMemoryMmap, iommu: Option<(SharedVtd, SourceId)>) -> Self {
        let mut config = PciConfiguration::new(PciIds {
            vendor: EDU_VENDOR,
            device: EDU_DEVICE,
            // "Unclassified device", as QEMU's edu reports.
            class: 0x00,
            subclass: 0xff,
            prog_if: 0,
            revision: 0x10,
        });
        config
            .add_bar(0, BarKind::Mmio32, EDU_BAR0_SIZE, false)
            .expect("BAR0 of a fresh header is free");
        Edu {
            config,
            mem,
            iommu,
            liveness: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_cnt: 0,
            buffer: Box::new([0; BUFFER_SIZE as usize]),
        }
    }

    /// The guest-physical address and contiguous length for a DMA to `addr`, or None when the
    /// remapping unit refuses it (it has then recorded and signalled the fault).
    fn translate(&self, addr: u64, access: Access) -> Option<(u64, u64)> {
        match &self.iommu {
            Some((unit, source)) => vtd::lock(unit).translate(*source, addr, access).ok(),
            None => Some((addr, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))),
        }
    }

    /// Runs the DMA the registers describe, stopping at the first refused page.
    fn run_dma(&mut self, cmd: u64) {
        let to_ram = cmd & DMA_CMD_TO_RAM != 0;
        let (buf_addr, ram_addr) = if to_ram {
            (self.dma_src, self.dma_dst)
        } else {
            (self.dma_dst, self.dma_src)
        };
        let len = self.dma_cnt;
        // The transfer must lie within the device buffer (QEMU stops the machine otherwise).
        let Some(off) = buf_addr
            .checked_sub(BUFFER_ADDR)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= BUFFER_SIZE))
        else {
            warn_limited!(
                "edu: DMA of {len:#x} bytes at device address {buf_addr:#x} is outside the buffer"
            );
            return;
        };
        let access = if to_ram { Access::Write } else { Access::Read };
        let mut done = 0;
        while done < len {
            let Some((gpa, room)) = ram_addr
                .checked_add(done)
                .and_then(|iova| self.translate(iova, access))
            else {
                debug_limited!("edu: DMA stopped at {:#x}: not translated", ram_addr + done);
                return;
            };
            let n = room.min(len - done);
            let at = (off + done) as usize..(off + done + n) as usize;
            let moved = if to_ram {
                self.mem.write_slice(&self.buffer[at], GuestAddress(gpa))
            } else {
                self.mem.read_slice(&mut self.buffer[at], GuestAddress(gpa))
            };
            if moved.is_err() {
                debug_limited!("edu: DMA stopped at guest-physical {gpa:#x}: not guest RAM");
                return;
            }
            done += n;
        }
    }

    fn read_reg(&self, offset: u64) -> u64 {
        match offset {
            REG_ID => u64::from(ID_VALUE),
            REG_LIVENESS => u64::from(!self.liveness),
            REG_DMA_SRC => self.dma_src,
            REG_DMA_DST => self.dma_dst,
            REG_DMA_CNT => self.dma_cnt,
            o if (BUFFER_ADDR..BUFFER_ADDR + BUFFER_SIZE).contains(&o) => {
                u64::from(self.buffer[(o - BUFFER_ADDR) as usize])
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u64) {
        match offset {
            REG_LIVENESS => self.liveness = value as u32,
            REG_DMA_SRC => self.dma_src = value,
            REG_DMA_DST => self.dma_dst = value,
            REG_DMA_CNT => self.dma_cnt = value,
            REG_DMA_CMD if value & DMA_CMD_START != 0 => self.run_dma(value),
            _ => {}
        }
    }
}

impl PciDevice for Edu {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write_reg(reg, offset, data)
    }

    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        Ok(self.config.place_bars(alloc)?)
    }

    fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
        // Registers are 4 or 8 bytes wide; the buffer is byte-addressed.
        let mut v = 0u64;
        for (i, b) in data.iter_mut().enumerate().take(8) {
            if (BUFFER_ADDR..BUFFER_ADDR + BUFFER_SIZE).contains(&offset) {
                *b = self.read_reg(offset + i as u64) as u8;
            } else {
                if i == 0 {
                    v = self.read_reg(offset);
                }
                *b = (v >> (8 * i)) as u8;
            }
        }
    }

    fn write_bar(&mut self, _index: usize, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        if (BUFFER_ADDR..BUFFER_ADDR + BUFFER_SIZE).contains(&offset) {
            for (i, byte) in data.iter().enumerate() {
                let at = offset - BUFFER_ADDR + i as u64;
                if at < BUFFER_SIZE {
                    self.buffer[at as usize] = *byte;
                }
            }
            return;
        }
        self.write_reg(offset, u64::from_le_bytes(b));
    }

    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.config.revert_bar(index, addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    fn write64(e: &mut Edu, off: u64, v: u64) {
        e.write_bar(0, off, &v.to_le_bytes());
    }

    #[test]
    fn identifies_and_answers_liveness_with_the_complement() {
        let mut e = Edu::new(mem(), None);
        let mut b = [0u8; 4];
        e.read_bar(0, REG_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), ID_VALUE);
        e.write_bar(0, REG_LIVENESS, &0x1234u32.to_le_bytes());
        e.read_bar(0, REG_LIVENESS, &mut b);
        assert_eq!(u32::from_le_bytes(b), !0x1234);
    }

    #[test]
    fn dma_without_an_iommu_copies_ram_to_the_buffer_and_back() {
        let m = mem();
        m.write_slice(&[7u8; 100], GuestAddress(0x1ff0)).unwrap();
        let mut e = Edu::new(m.clone(), None);
        write64(&mut e, REG_DMA_SRC, 0x1ff0);
        write64(&mut e, REG_DMA_DST, BUFFER_ADDR);
        write64(&mut e, REG_DMA_CNT, 100);
        write64(&mut e, REG_DMA_CMD, DMA_CMD_START);
        write64(&mut e, REG_DMA_SRC, BUFFER_ADDR);
        write64(&mut e, REG_DMA_DST, 0x8000);
        write64(&mut e, REG_DMA_CMD, DMA_CMD_START | DMA_CMD_TO_RAM);
        let mut back = [0u8; 100];
        m.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, [7u8; 100]);
    }

    #[test]
    fn dma_outside_the_buffer_or_guest_ram_is_dropped_without_panic() {
        let mut e = Edu::new(mem(), None);
        write64(&mut e, REG_DMA_SRC, u64::MAX - 4);
        write64(&mut e, REG_DMA_DST, BUFFER_ADDR + 4000);
        write64(&mut e, REG_DMA_CNT, 200);
        write64(&mut e, REG_DMA_CMD, DMA_CMD_START);
        write64(&mut e, REG_DMA_DST, BUFFER_ADDR);
        write64(&mut e, REG_DMA_CMD, DMA_CMD_START);
        write64(&mut e, REG_DMA_CNT, u64::MAX);
        write64(&mut e, REG_DMA_CMD, DMA_CMD_START | DMA_CMD_TO_RAM);
    }

    #[test]
    fn a_guest_repeating_bad_dmas_cannot_flood_the_log() {
        use vm_device::ratelimit::{capture::lines_logged_by, BURST};
        let mut e = Edu::new(mem(), None);
        let lines = lines_logged_by(|| {
            for _ in 0..10_000 {
                write64(&mut e, REG_DMA_DST, BUFFER_ADDR + 4000);
                write64(&mut e, REG_DMA_CNT, 200);
                write64(&mut e, REG_DMA_CMD, DMA_CMD_START); // outside the buffer
                write64(&mut e, REG_DMA_DST, BUFFER_ADDR);
                write64(&mut e, REG_DMA_SRC, 2 << 20);
                write64(&mut e, REG_DMA_CMD, DMA_CMD_START); // not guest RAM
            }
        });
        assert!(
            lines.len() <= 2 * BURST as usize,
            "{} lines for 20000 bad DMAs",
            lines.len()
        );
    }
}
