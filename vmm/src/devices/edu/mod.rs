//! QEMU's `edu` (hw/misc/edu.c; its manual is QEMU's docs/specs/edu.rst), the educational PCI
//! device that kvm-unit-tests' `intel_iommu` test and driver courses use: identification and
//! liveness registers, a factorial unit, an interrupt status the guest raises and
//! acknowledges, and a DMA engine ([`dma`]) whose transfers go through the virtual VT-d when
//! the function sits behind it. Its interrupts are INTx (INTA#, level) until the guest enables
//! its MSI capability (64-bit, one vector). Behind a unit with device-TLBs it is also a PCI
//! Express function with Address Translation Services ([`ats`]).
//!
//! A plain state machine: it raises interrupts through the [`MsiSender`] and [`IrqLine`] it is
//! given and reaches memory through guest RAM or the VT-d model, so its tests need no KVM.
//!
//! The factorial is ready when its register write completes (QEMU computes it on a thread): the
//! computing status bit never reads set, and "raise an interrupt when done" raises it at once.

pub mod ats;
pub mod dma;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use passthrough::msi::MsiCap;
use viommu::SourceId;
use vm_device::debug_limited;
use vm_device::pci::bar::{Bar, BarAllocator, BarKind, BarMove};
use vm_device::pci::configuration::{valid_access, PciConfiguration, PciIds};
use vm_device::pci::device::{PciDevice, PciDeviceError};
use vm_device::pci::spec::{
    PCI_CAP_ID_MSI, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_MSI_FLAGS_64BIT,
};

use crate::devices::interrupt::IrqLine;
use crate::devices::vtd::SharedVtd;
use ats::EduAts;
use dma::{Direction, DmaEngine};
use vm_device::interrupt::{MsiMessage, MsiSender};

/// PCI identity of QEMU's edu.
pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;
/// Size of BAR0 (1 MiB of MMIO).
pub const EDU_BAR0_SIZE: u64 = 1 << 20;

// BAR0 registers (edu.rst, "MMIO area spec").
const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_FACTORIAL: u64 = 0x08;
const REG_STATUS: u64 = 0x20;
const REG_IRQ_STATUS: u64 = 0x24;
const REG_IRQ_RAISE: u64 = 0x60;
const REG_IRQ_ACK: u64 = 0x64;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
/// Registers below this offset take 4-byte accesses only, those from it on 4- or 8-byte ones;
/// other accesses read as all ones and write nothing, as every offset that is no register.
const WIDE_REGS_START: u64 = 0x80;

/// Identification: version 1.0 (0xRRrr00ed).
const ID_VALUE: u32 = 0x0100_00ed;
/// Status register: a factorial is being computed (read-only); raise [`IRQ_FACTORIAL`] when
/// one is done.
const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQ_FACTORIAL: u32 = 0x80;
/// What the device itself puts in the interrupt status register (edu.c FACT_IRQ, DMA_IRQ).
pub const IRQ_FACTORIAL: u32 = 0x001;
pub const IRQ_DMA: u32 = 0x100;
/// DMA command register: start; direction (set: buffer to RAM); raise [`IRQ_DMA`] when done.
const DMA_CMD_START: u64 = 0x1;
const DMA_CMD_TO_RAM: u64 = 0x2;
const DMA_CMD_IRQ: u64 = 0x4;
/// The MSI capability: where QEMU's edu has it (its one capability), ID and no next pointer;
/// with ATS the PCI Express capability follows it.
const MSI_CAP_OFFSET: u8 = 0x40;
const MSI_CAP_HEADER: u16 = PCI_CAP_ID_MSI as u16;
const MSI_CAP_HEADER_THEN_PCIE: u16 = MSI_CAP_HEADER | (ats::PCIE_CAP_OFFSET as u16) << 8;
/// INTA#.
const INTERRUPT_PIN_INTA: u8 = 1;

/// `n!` modulo 2^32, as edu's 32-bit unit computes it. From 34! on the product holds 2^32 as a
/// factor, so it is 0: no guest value makes this loop long.
fn factorial(n: u32) -> u32 {
    (1..=n.min(34)).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// How edu raises interrupts.
pub struct EduInterrupts {
    /// Where its MSIs go.
    pub msi: Arc<dyn MsiSender>,
    /// Its INTA# wire, when the machine has an interrupt controller to wire it to; without one
    /// it reports no interrupt pin.
    pub intx: Option<Box<dyn IrqLine>>,
}

/// The emulated edu function.
pub struct Edu {
    config: PciConfiguration,
    msi: MsiCap,
    /// The MSI capability's ID and next pointer.
    msi_header: u16,
    /// ATS and the device-TLB, when the unit offers device-TLBs.
    ats: Option<EduAts>,
    /// Its requester id: how the VT-d knows its DMA and its interrupts.
    source: SourceId,
    interrupts: EduInterrupts,
    /// What the INTx wire was last driven to.
    intx_asserted: bool,
    /// The complement of what the guest last wrote to the liveness register.
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma: DmaEngine,
    dma_cmd: u64,
}

impl Edu {
    /// An edu that is requester `source`, whose DMA reaches `mem` directly or through `iommu`,
    /// raising `interrupts`; with ATS when `iommu` offers device-TLBs.
    pub fn new(
        mem: GuestMemoryMmap,
        source: SourceId,
        iommu: Option<SharedVtd>,
        interrupts: EduInterrupts,
    ) -> Self {
        let mut config = PciConfiguration::new(PciIds {
            vendor: EDU_VENDOR,
            device: EDU_DEVICE,
            // PCI_CLASS_OTHERS (0xff00): base class ff, subclass 00, as QEMU's edu reports.
            class: 0xff,
            subclass: 0x00,
            prog_if: 0,
            revision: 0x10,
        });
        config
            .add_bar(0, BarKind::Mmio32, EDU_BAR0_SIZE, false)
            .expect("BAR0 of a fresh header is free");
        config.set_capabilities_pointer(MSI_CAP_OFFSET);
        if interrupts.intx.is_some() {
            config.set_interrupt_pin(INTERRUPT_PIN_INTA);
        }
        let ats = iommu
            .as_ref()
            .and_then(|unit| EduAts::attach(&mut config, unit, source));
        Edu {
            config,
            msi: MsiCap::new(MSI_CAP_OFFSET.into(), PCI_MSI_FLAGS_64BIT),
            msi_header: if ats.is_some() {
                MSI_CAP_HEADER_THEN_PCIE
            } else {
                MSI_CAP_HEADER
            },
            ats,
            source,
            interrupts,
            intx_asserted: false,
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma: DmaEngine::new(mem, iommu),
            dma_cmd: 0,
        }
    }

    fn bus_master(&self) -> bool {
        self.config.command() & PCI_COMMAND_MASTER != 0
    }

    /// ORs `bits` into the interrupt status and, if it is then non-zero, signals it: one MSI
    /// per call while MSI is enabled (as QEMU's edu), else INTx asserted.
    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        if self.irq_status == 0 {
            return;
        }
        if !self.msi.enabled() {
            self.update_intx();
            return;
        }
        // An MSI is a memory write: a function with bus mastering off cannot make it.
        if !self.bus_master() {
            debug_limited!("edu: MSI dropped: bus mastering is off");
            return;
        }
        let m = self.msi.message(0);
        self.interrupts.msi.send(MsiMessage::new(m.address, m.data));
    }

    /// Clears `bits` of the interrupt status; INTx goes down once none is left.
    fn acknowledge(&mut self, bits: u32) {
        self.irq_status &= !bits;
        self.update_intx();
    }

    /// Drives INTx from the state: requested while an interrupt is pending and MSI is off
    /// (Status.Interrupt Status shows the request), on the wire unless the command register's
    /// Interrupt Disable holds it off (PCI 3.0, 6.2.2 and 6.2.3).
    fn update_intx(&mut self) {
        let Some(line) = &self.interrupts.intx else {
            return;
        };
        let requested = self.irq_status != 0 && !self.msi.enabled();
        self.config.set_interrupt_status(requested);
        let asserted = requested && self.config.command() & PCI_COMMAND_INTX_DISABLE == 0;
        if asserted != self.intx_asserted {
            self.intx_asserted = asserted;
            line.set_level(asserted);
        }
    }

    fn start_dma(&mut self, cmd: u64) {
        self.dma_cmd = cmd;
        if self.bus_master() {
            let direction = if cmd & DMA_CMD_TO_RAM != 0 {
                Direction::ToRam
            } else {
                Direction::ToDevice
            };
            self.dma.transfer(self.source, direction);
        } else {
            debug_limited!("edu: DMA moved nothing: bus mastering is off");
        }
        self.dma_cmd &= !DMA_CMD_START;
        if cmd & DMA_CMD_IRQ != 0 {
            self.raise(IRQ_DMA);
        }
    }

    /// The register at `offset` read with `size` bytes, or None for an access that is no
    /// register read.
    fn read_register(&self, offset: u64, size: usize) -> Option<u64> {
        if !register_access(offset, size) {
            return None;
        }
        Some(match offset {
            REG_ID => ID_VALUE.into(),
            REG_LIVENESS => self.liveness.into(),
            REG_FACTORIAL => self.factorial.into(),
            REG_STATUS => self.status.into(),
            REG_IRQ_STATUS => self.irq_status.into(),
            REG_DMA_SRC => self.dma.src,
            REG_DMA_DST => self.dma.dst,
            REG_DMA_COUNT => self.dma.count,
            REG_DMA_CMD => self.dma_cmd,
            _ => return None,
        })
    }

    /// A write of `value` (`size` bytes, zero-extended) to the register at `offset`.
    fn write_register(&mut self, offset: u64, size: usize, value: u64) {
        if !register_access(offset, size) {
            debug_limited!("edu: {size}-byte write at {offset:#x} ignored");
            return;
        }
        let low = value as u32;
        match offset {
            REG_LIVENESS => self.liveness = !low,
            REG_FACTORIAL => {
                self.factorial = factorial(low);
                if self.status & STATUS_IRQ_FACTORIAL != 0 {
                    self.raise(IRQ_FACTORIAL);
                }
            }
            REG_STATUS => {
                self.status = (self.status & STATUS_COMPUTING) | (low & STATUS_IRQ_FACTORIAL)
            }
            REG_IRQ_RAISE => self.raise(low),
            REG_IRQ_ACK => self.acknowledge(low),
            REG_DMA_SRC => self.dma.src = value,
            REG_DMA_DST => self.dma.dst = value,
            REG_DMA_COUNT => self.dma.count = value,
            // A command without the start bit is not taken (QEMU keeps the old one).
            REG_DMA_CMD if value & DMA_CMD_START != 0 => self.start_dma(value),
            _ => debug_limited!("edu: write of {value:#x} at {offset:#x} ignored"),
        }
    }
}

/// Whether a `size`-byte access at `offset` may reach a register (edu.rst: only 4-byte accesses
/// below 0x80, 4- or 8-byte ones from 0x80 on).
fn register_access(offset: u64, size: usize) -> bool {
    size == 4 || (size == 8 && offset >= WIDE_REGS_START)
}

impl PciDevice for Edu {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        let at = reg.saturating_mul(4);
        if self.msi.contains(at) {
            self.msi.read(at, self.msi_header)
        } else {
            self.config.read_reg(reg)
        }
    }

    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        let at = reg.saturating_mul(4);
        let moves = if self.msi.contains(at) {
            if valid_access(offset, data.len()) {
                // What the write changed is read from the capability when an interrupt comes.
                let _ = self.msi.write(at + offset, data);
            }
            Vec::new()
        } else {
            let moves = self.config.write_reg(reg, offset, data);
            if let Some(ats) = &self.ats {
                ats.config_written(&self.config, reg);
            }
            moves
        };
        // MSI Enable and Interrupt Disable decide where a pending interrupt shows.
        self.update_intx();
        moves
    }

    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        Ok(self.config.place_bars(alloc)?)
    }

    fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
        let value = self.read_register(offset, data.len()).unwrap_or(u64::MAX);
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(u64::MAX) as u8;
        }
    }

    fn write_bar(&mut self, _index: usize, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        self.write_register(offset, data.len(), u64::from_le_bytes(bytes));
    }

    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.config.revert_bar(index, addr);
    }
}
