//! One passed-through PCI function as the guest sees it: configuration space virtualized over
//! the VFIO device, BAR accesses the VMM traps, and the interrupts behind MSI, MSI-X and INTx.
//!
//! What the guest reads and writes in configuration space:
//! - BARs: ours (the shared model, [`vm_device::pci::bar`]); the device's stay where the host
//!   put them.
//! - Expansion ROM: hidden (reads zero, writes ignored).
//! - Command: forwarded (the device needs memory decode and bus mastering), and the guest's
//!   I/O and memory decode bits decide where BARs decode.
//! - Interrupt line: ours (the GSI INTx is wired to). Interrupt pin: the device's when we can
//!   wire its INTx, else 0. As on real hardware, INTx is live until the guest enables MSI or
//!   MSI-X and comes back when it turns them off (VFIO allows one kind at a time).
//! - MSI and MSI-X capabilities: emulated (`msi.rs`, `msix.rs`); the rest of the capability
//!   list and everything else: the device's, through VFIO (which filters what is unsafe).

use vm_device::pci::bar::{Bar, BarAllocator, BarKind, BarMove, Bars, PlaceError};
use vm_device::pci::configuration::{merge_bytes, valid_access};
use vm_device::pci::spec::*;
use vm_device::{debug_limited, error_limited};

use crate::access::{IrqKind, MmapArea, RegionInfo, VfioAccess, BAR0_REGION, CONFIG_REGION};
use crate::irq::{Intx, IrqError, IrqRoutes, Vectors};
use crate::msi::{MsiCap, MsiUpdate};
use crate::msix::{MsixCap, MsixUpdate};

/// Host page size assumed for mmap granularity around the MSI-X table.
pub const PAGE_SIZE: u64 = 4096;

/// A passed-through PCI function.
pub struct PciFunction<D: VfioAccess> {
    name: String,
    dev: D,
    routes: Box<dyn IrqRoutes>,
    bars: Bars,
    /// The VFIO region behind each BAR (size 0 where there is none).
    regions: [RegionInfo; PCI_NUM_BARS],
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
    msi_vectors: Vectors,
    msix_vectors: Vectors,
    /// The GSI INTx is wired to, when the device has INTx and the VMM gave one.
    intx_gsi: Option<u32>,
    /// INTx while live.
    intx: Option<Intx>,
    command: u16,
    interrupt_line: u8,
    interrupt_pin: u8,
}

fn config_u32(dev: &dyn VfioAccess, off: usize) -> u32 {
    let mut b = [0xffu8; 4];
    dev.read(CONFIG_REGION, off as u64, &mut b);
    u32::from_le_bytes(b)
}

impl<D: VfioAccess> PciFunction<D> {
    /// Takes over `dev` (named `name` in logs): resets it, finds its BARs and capabilities.
    /// A device with an interrupt pin (1 = INTA .. 4 = INTD) gets its INTx wired to the GSI
    /// `intx_gsi(pin)` gives, if any.
    pub fn new(
        name: impl Into<String>,
        dev: D,
        mut routes: Box<dyn IrqRoutes>,
        intx_gsi: &dyn Fn(u8) -> Option<u32>,
    ) -> Result<Self, IrqError> {
        let name = name.into();
        dev.reset();
        let regions: [RegionInfo; PCI_NUM_BARS] =
            std::array::from_fn(|i| dev.region(BAR0_REGION + i as u32).unwrap_or_default());
        let bars = Bars::discover(
            |i| config_u32(&dev, PCI_BASE_ADDRESS_0 + 4 * i),
            |i| regions[i].size,
        );
        let (msi, msix) = Self::find_caps(&name, &dev);
        let pin = (config_u32(&dev, PCI_INTERRUPT_LINE) >> 8) as u8;
        let mut intx = None;
        let mut interrupt_pin = 0;
        let mut interrupt_line = 0;
        let has_intx = (1..=4).contains(&pin) && dev.irq_count(IrqKind::Intx) > 0;
        let wired = if has_intx { intx_gsi(pin) } else { None };
        if let Some(gsi) = wired {
            intx = Some(Intx::enable(&dev, routes.as_mut(), gsi)?);
            interrupt_pin = pin;
            interrupt_line = gsi as u8;
        }
        log::info!(
            "{name}: BARs {:?}, MSI {}, MSI-X {}, INTx {}",
            bars.iter()
                .map(|b| (b.index, b.kind, b.size))
                .collect::<Vec<_>>(),
            msi.as_ref()
                .map_or("no".into(), |m| format!("{} vectors", m.capable())),
            msix.as_ref()
                .map_or("no".into(), |m| format!("{} vectors", m.vectors())),
            intx.as_ref()
                .map_or("no".into(), |i| format!("GSI {}", i.gsi())),
        );
        Ok(Self {
            name,
            dev,
            routes,
            bars,
            regions,
            msi,
            msix,
            msi_vectors: Vectors::new(IrqKind::Msi),
            msix_vectors: Vectors::new(IrqKind::Msix),
            intx_gsi: wired,
            intx,
            command: 0,
            interrupt_line,
            interrupt_pin,
        })
    }

    /// Walks the capability list (PCI 3.0, 6.7) for MSI and MSI-X; a looping or broken list
    /// ends the walk.
    fn find_caps(name: &str, dev: &dyn VfioAccess) -> (Option<MsiCap>, Option<MsixCap>) {
        let (mut msi, mut msix) = (None, None);
        let status = (config_u32(dev, PCI_COMMAND) >> 16) as u16;
        if status & PCI_STATUS_CAP_LIST == 0 {
            return (None, None);
        }
        let mut ptr = (config_u32(dev, PCI_CAPABILITY_LIST) & 0xfc) as usize;
        // At most 48 capabilities fit in 192 bytes; more means a loop.
        for _ in 0..48 {
            if !(0x40..PCI_CONFIG_SIZE).contains(&ptr) {
                break;
            }
            let head = config_u32(dev, ptr);
            match head as u8 {
                PCI_CAP_ID_MSI => msi = Some(MsiCap::new(ptr, (head >> 16) as u16)),
                PCI_CAP_ID_MSIX => {
                    let table = config_u32(dev, ptr + PCI_MSIX_TABLE);
                    let pba = config_u32(dev, ptr + PCI_MSIX_PBA);
                    msix = Some(MsixCap::new(ptr, (head >> 16) as u16, table, pba));
                }
                _ => {}
            }
            ptr = ((head >> 8) & 0xfc) as usize;
        }
        if (0x40..PCI_CONFIG_SIZE).contains(&ptr) {
            log::warn!("{name}: capability list longer than 48 entries; walk stopped");
        }
        (msi, msix)
    }

    /// The device name used in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VFIO device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Places all BARs with `alloc`.
    pub fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PlaceError> {
        self.bars.place(alloc)
    }

    /// The BARs as they decode now.
    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter()
    }

    /// BAR `index`.
    pub fn bar(&self, index: usize) -> Option<&Bar> {
        self.bars.get(index)
    }

    /// The parts of BAR `index` that may be mapped straight into the guest (offsets in the
    /// BAR, page aligned): VFIO's mmappable areas minus the pages holding the MSI-X table or
    /// PBA, which must stay trapped.
    pub fn mmap_areas(&self, index: usize) -> Vec<MmapArea> {
        let Some(bar) = self.bars.get(index) else {
            return Vec::new();
        };
        if bar.kind == BarKind::Io {
            return Vec::new();
        }
        let region = &self.regions[index];
        let mut holes = Vec::new();
        if let Some(m) = &self.msix {
            let (tbar, toff) = m.table();
            if tbar == index {
                holes.push((toff, toff + m.table_len()));
            }
            let (pbar, poff, plen) = m.pba();
            if pbar == index {
                holes.push((poff, poff + plen));
            }
        }
        let holes: Vec<(u64, u64)> = holes
            .into_iter()
            .map(|(s, e)| (s & !(PAGE_SIZE - 1), e.next_multiple_of(PAGE_SIZE)))
            .collect();
        let mut out = Vec::new();
        for area in &region.mmap_areas {
            let mut pieces = vec![(area.offset, area.offset + area.size)];
            for &(hs, he) in &holes {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if he <= s || e <= hs {
                            vec![(s, e)]
                        } else {
                            [(s, hs.max(s)), (he.min(e), e)]
                                .into_iter()
                                .filter(|(a, b)| a < b)
                                .collect()
                        }
                    })
                    .collect();
            }
            out.extend(
                pieces
                    .into_iter()
                    .filter(|(s, e)| s % PAGE_SIZE == 0 && (e - s) % PAGE_SIZE == 0)
                    .map(|(s, e)| MmapArea {
                        offset: s,
                        size: e - s,
                    }),
            );
        }
        out
    }

    /// Guest read of config dword `reg` (0..1024).
    pub fn read_config(&self, reg: usize) -> u32 {
        let off = reg * 4;
        if reg >= PCIE_CONFIG_REGS {
            return u32::MAX;
        }
        match off {
            PCI_BASE_ADDRESS_0..PCI_BASE_ADDRESS_5_END => {
                self.bars.read_reg((off - PCI_BASE_ADDRESS_0) / 4)
            }
            PCI_ROM_ADDRESS => 0,
            PCI_COMMAND => {
                let dev = config_u32(&self.dev, off);
                let decode = PCI_COMMAND_IO | PCI_COMMAND_MEMORY;
                (dev & !u32::from(decode)) | u32::from(self.command & decode)
            }
            PCI_INTERRUPT_LINE => {
                let dev = config_u32(&self.dev, off);
                (dev & 0xffff_0000)
                    | u32::from(self.interrupt_pin) << 8
                    | u32::from(self.interrupt_line)
            }
            _ => {
                if let Some(m) = self.msi.as_ref().filter(|m| m.contains(off)) {
                    return m.read(off, config_u32(&self.dev, m.offset()) as u16);
                }
                if let Some(m) = self.msix.as_ref().filter(|m| m.contains(off)) {
                    return m.read(off, config_u32(&self.dev, m.offset()) as u16);
                }
                config_u32(&self.dev, off)
            }
        }
    }

    /// Guest write of `data` at byte `offset` of config dword `reg`; returns the BAR moves the
    /// VMM must apply. Malformed accesses are ignored.
    pub fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        if reg >= PCIE_CONFIG_REGS || !valid_access(offset, data.len()) {
            debug_limited!(
                "{}: config write of {} bytes at register {reg} offset {offset} ignored",
                self.name,
                data.len()
            );
            return Vec::new();
        }
        let dword = reg * 4;
        let off = dword + offset;
        match dword {
            PCI_BASE_ADDRESS_0..PCI_BASE_ADDRESS_5_END => self
                .bars
                .write_reg((dword - PCI_BASE_ADDRESS_0) / 4, offset, data, self.command)
                .into_iter()
                .collect(),
            PCI_ROM_ADDRESS => Vec::new(),
            PCI_COMMAND => {
                self.dev.write(CONFIG_REGION, off as u64, data);
                let cmd = merge_bytes(u32::from(self.command), offset, data) as u16;
                self.command = cmd;
                self.bars.sync_all(cmd)
            }
            PCI_INTERRUPT_LINE => {
                if offset == 0 {
                    self.interrupt_line = data[0];
                }
                Vec::new()
            }
            _ => {
                if self.msi.as_ref().is_some_and(|m| m.contains(off)) {
                    self.msi_write(off, data);
                } else if self.msix.as_ref().is_some_and(|m| m.contains(off)) {
                    self.msix_write(off, data);
                } else {
                    self.dev.write(CONFIG_REGION, off as u64, data);
                }
                Vec::new()
            }
        }
    }

    /// The VMM could not follow a BAR move: the BAR (and its register) go back to `addr`.
    pub fn revert_bar(&mut self, index: usize, addr: u64) {
        self.bars.revert(index, addr);
    }

    fn log_irq(&self, what: &str, r: Result<(), IrqError>) {
        if let Err(e) = r {
            error_limited!("{}: {what}: {e}", self.name);
        }
    }

    /// INTx off before MSI or MSI-X goes on.
    fn intx_off(&mut self) {
        if let Some(mut intx) = self.intx.take() {
            intx.disable(&self.dev, self.routes.as_mut());
        }
    }

    /// INTx back once neither MSI nor MSI-X is on.
    fn intx_on(&mut self) {
        let msi_on = self.msi.as_ref().is_some_and(MsiCap::enabled);
        let msix_on = self.msix.as_ref().is_some_and(MsixCap::enabled);
        let Some(gsi) = self
            .intx_gsi
            .filter(|_| self.intx.is_none() && !msi_on && !msix_on)
        else {
            return;
        };
        match Intx::enable(&self.dev, self.routes.as_mut(), gsi) {
            Ok(intx) => self.intx = Some(intx),
            Err(e) => error_limited!("{}: INTx back on GSI {gsi}: {e}", self.name),
        }
    }

    fn msi_write(&mut self, off: usize, data: &[u8]) {
        let Some(msi) = self.msi.as_mut() else { return };
        let update = msi.write(off, data);
        let msi = msi.clone();
        let r = match update {
            MsiUpdate::None => Ok(()),
            MsiUpdate::Enable { vectors } => {
                self.intx_off();
                self.msix_vectors.disable(&self.dev, self.routes.as_mut());
                self.msi_vectors
                    .enable(&self.dev, self.routes.as_mut(), vectors, |i| {
                        (msi.message(i), msi.masked(i))
                    })
            }
            MsiUpdate::Disable => {
                self.msi_vectors.disable(&self.dev, self.routes.as_mut());
                self.intx_on();
                Ok(())
            }
            MsiUpdate::Reprogram => (0..self.msi_vectors.len()).try_for_each(|i| {
                self.msi_vectors
                    .update(self.routes.as_mut(), i, msi.message(i), msi.masked(i))
            }),
        };
        self.log_irq("MSI", r);
    }

    fn msix_write(&mut self, off: usize, data: &[u8]) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        let update = msix.write(off, data);
        self.apply_msix(update);
    }

    fn apply_msix(&mut self, update: MsixUpdate) {
        if let MsixUpdate::Enable { .. } = update {
            self.intx_off();
        }
        let Some(msix) = self.msix.as_ref() else {
            return;
        };
        let r = match update {
            MsixUpdate::None => Ok(()),
            MsixUpdate::Enable { vectors } => {
                self.msi_vectors.disable(&self.dev, self.routes.as_mut());
                self.msix_vectors
                    .enable(&self.dev, self.routes.as_mut(), vectors, |i| {
                        (msix.message(i), msix.masked(i))
                    })
            }
            MsixUpdate::Disable => {
                self.msix_vectors.disable(&self.dev, self.routes.as_mut());
                self.intx_on();
                Ok(())
            }
            MsixUpdate::MaskAll => (0..self.msix_vectors.len()).try_for_each(|i| {
                self.msix_vectors
                    .update(self.routes.as_mut(), i, msix.message(i), msix.masked(i))
            }),
            MsixUpdate::Vector(i) => {
                self.msix_vectors
                    .update(self.routes.as_mut(), i, msix.message(i), msix.masked(i))
            }
        };
        self.log_irq("MSI-X", r);
    }

    /// Which emulated MSI-X structure, if any, `[off, off + len)` of BAR `index` touches.
    fn msix_part(&self, index: usize, off: u64) -> Option<(bool, u64)> {
        let m = self.msix.as_ref()?;
        let (tbar, toff) = m.table();
        if tbar == index && off >= toff && off < toff + m.table_len() {
            return Some((true, off - toff));
        }
        let (pbar, poff, plen) = m.pba();
        (pbar == index && off >= poff && off < poff + plen).then(|| (false, off - poff))
    }

    fn in_bar(&self, index: usize, off: u64, len: usize) -> bool {
        self.bars.get(index).is_some() && {
            let size = self.regions[index].size;
            off.checked_add(len as u64).is_some_and(|e| e <= size)
        }
    }

    /// Guest read inside BAR `index` at `off` (a trapped access).
    pub fn read_bar(&self, index: usize, off: u64, data: &mut [u8]) {
        if !self.in_bar(index, off, data.len()) {
            data.fill(0xff);
            return;
        }
        match self.msix_part(index, off) {
            Some((true, rel)) => self.msix.as_ref().map_or((), |m| m.read_table(rel, data)),
            // The PBA is the device's (VFIO lets it be read).
            _ => self.dev.read(index as u32, off, data),
        }
    }

    /// Guest write inside BAR `index` at `off` (a trapped access).
    pub fn write_bar(&mut self, index: usize, off: u64, data: &[u8]) {
        if !self.in_bar(index, off, data.len()) {
            debug_limited!(
                "{}: write of {} bytes past BAR{index} at {off:#x} ignored",
                self.name,
                data.len()
            );
            return;
        }
        match self.msix_part(index, off) {
            Some((true, rel)) => {
                let updates = self
                    .msix
                    .as_mut()
                    .map(|m| m.write_table(rel, data))
                    .unwrap_or_default();
                for u in updates {
                    self.apply_msix(u);
                }
            }
            Some((false, _)) => {
                debug_limited!("{}: write to the read-only PBA ignored", self.name)
            }
            None => self.dev.write(index as u32, off, data),
        }
    }

    /// The emulated MSI capability, if the device has one.
    pub fn msi(&self) -> Option<&MsiCap> {
        self.msi.as_ref()
    }

    /// The emulated MSI-X capability and table, if the device has them.
    pub fn msix(&self) -> Option<&MsixCap> {
        self.msix.as_ref()
    }

    /// The GSI INTx is delivered on while it is live.
    pub fn intx_live(&self) -> Option<u32> {
        self.intx.as_ref().map(Intx::gsi)
    }

    /// MSI-X vectors enabled now (for tests and diagnostics).
    pub fn msix_vectors(&self) -> &Vectors {
        &self.msix_vectors
    }

    /// MSI vectors enabled now.
    pub fn msi_vectors(&self) -> &Vectors {
        &self.msi_vectors
    }
}

impl<D: VfioAccess> Drop for PciFunction<D> {
    /// Interrupts off, GSIs back, and the device reset so it stops any DMA it was doing.
    fn drop(&mut self) {
        self.msi_vectors.disable(&self.dev, self.routes.as_mut());
        self.msix_vectors.disable(&self.dev, self.routes.as_mut());
        if let Some(intx) = self.intx.as_mut() {
            intx.disable(&self.dev, self.routes.as_mut());
        }
        self.dev.reset();
    }
}

#[cfg(test)]
#[path = "function_tests.rs"]
mod tests;
