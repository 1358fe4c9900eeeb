//! A fake VFIO device and fake interrupt routes, for unit tests and the fuzz target: devices
//! shaped like QEMU's NVMe and edu, and a routing table that records what is attached.

use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use vm_device::pci::bar::{AllocError, BarAllocator, BarKind};

use crate::access::{IrqKind, IrqSetError, MmapArea, RegionInfo, VfioAccess, CONFIG_REGION};
use crate::irq::{IrqRoutes, RouteError};
use vm_device::interrupt::MsiMessage;

#[derive(Default)]
pub struct FakeState {
    pub config: Vec<u8>,
    pub regions: Vec<Option<RegionInfo>>,
    pub bar_data: Vec<Vec<u8>>,
    pub irqs: [u32; 3],
    /// What happened, in order: "reset", "enable MSI-X 4", "disable MSI", "cfg-write 0x4".
    pub log: Vec<String>,
}

/// A device whose state tests inspect through a shared handle.
#[derive(Clone, Default)]
pub struct FakeDevice(pub Arc<Mutex<FakeState>>);

fn kind_slot(kind: IrqKind) -> usize {
    kind.index() as usize
}

impl FakeDevice {
    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn base(vendor: u16, device: u16) -> FakeDevice {
        let mut s = FakeState {
            config: vec![0; 4096],
            regions: vec![None; 9],
            bar_data: vec![Vec::new(); 6],
            ..Default::default()
        };
        s.config[0..2].copy_from_slice(&vendor.to_le_bytes());
        s.config[2..4].copy_from_slice(&device.to_le_bytes());
        s.regions[CONFIG_REGION as usize] = Some(RegionInfo {
            size: 4096,
            readable: true,
            writable: true,
            ..Default::default()
        });
        FakeDevice(Arc::new(Mutex::new(s)))
    }

    pub fn put32(&self, off: usize, v: u32) {
        self.state().config[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn add_bar(&self, index: usize, raw: u32, size: u64, mmap: bool) {
        self.put32(0x10 + 4 * index, raw);
        let mut s = self.state();
        s.regions[index] = Some(RegionInfo {
            size,
            fd_offset: (index as u64) << 40,
            readable: true,
            writable: true,
            mmap_areas: if mmap {
                vec![MmapArea { offset: 0, size }]
            } else {
                Vec::new()
            },
            msix_mappable: false,
        });
        s.bar_data[index] = vec![0; size as usize];
    }

    /// Like QEMU's NVMe: BAR0 64-bit 16 KiB (MSI-X table at 0x2000, PBA at 0x3000, 4
    /// vectors), capabilities MSI-X at 0x40 then a PM capability at 0x60.
    pub fn nvme_like() -> FakeDevice {
        let d = Self::base(0x1b36, 0x0010);
        d.add_bar(0, 0x4, 0x4000, true);
        d.put32(0x04, 0x0010 << 16); // status: capability list
        d.put32(0x34, 0x40);
        d.put32(0x40, 0x0003_6011); // MSI-X, next 0x60, 4 vectors
        d.put32(0x44, 0x2000);
        d.put32(0x48, 0x3000);
        d.put32(0x60, 0x0003_0001); // PM, end of list
        d.put32(0x3c, 0x0100); // INTA
        d.state().irqs = [1, 1, 4];
        d
    }

    /// Like QEMU's edu: BAR0 32-bit 1 MiB, MSI (64-bit, one vector) at 0x40, an I/O BAR 2.
    pub fn edu_like() -> FakeDevice {
        let d = Self::base(0x1234, 0x11e8);
        d.add_bar(0, 0x0, 0x10_0000, true);
        d.add_bar(2, 0x1, 0x20, false);
        d.put32(0x04, 0x0010 << 16);
        d.put32(0x34, 0x40);
        d.put32(0x40, 0x0080_0005); // MSI, end, 64-bit
        d.put32(0x3c, 0x0100);
        d.state().irqs = [1, 1, 0];
        d
    }

    /// INTx only, no capabilities.
    pub fn intx_only() -> FakeDevice {
        let d = Self::base(0x8086, 0x1234);
        d.add_bar(0, 0x0, 0x1000, true);
        d.put32(0x3c, 0x0100);
        d.state().irqs = [1, 0, 0];
        d
    }
}

impl VfioAccess for FakeDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.state().regions.get(index as usize).cloned().flatten()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        let s = self.state();
        let src = if index == CONFIG_REGION {
            &s.config
        } else {
            match s.bar_data.get(index as usize) {
                Some(d) => d,
                None => {
                    data.fill(0xff);
                    return;
                }
            }
        };
        let off = offset as usize;
        match src.get(off..off + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0xff),
        }
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        let mut s = self.state();
        s.log.push(format!("write {index} {offset:#x} {data:x?}"));
        let dst = if index == CONFIG_REGION {
            &mut s.config
        } else {
            match s.bar_data.get_mut(index as usize) {
                Some(d) => d,
                None => return,
            }
        };
        let off = offset as usize;
        if let Some(bytes) = dst.get_mut(off..off + data.len()) {
            bytes.copy_from_slice(data);
        }
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.state().irqs[kind_slot(kind)]
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), IrqSetError> {
        self.state()
            .log
            .push(format!("enable {kind} {}", fds.len()));
        Ok(())
    }

    fn disable_irq(&self, kind: IrqKind) -> Result<(), IrqSetError> {
        self.state().log.push(format!("disable {kind}"));
        Ok(())
    }

    fn set_intx_resample(&self, _fd: &EventFd) -> Result<(), IrqSetError> {
        self.state().log.push("resample INTx".into());
        Ok(())
    }

    fn reset(&self) {
        self.state().log.push("reset".into());
    }
}

/// Routes recorded in a shared table.
#[derive(Default)]
pub struct RouteState {
    pub next: u32,
    pub routes: std::collections::BTreeMap<u32, MsiMessage>,
    pub attached: std::collections::BTreeSet<u32>,
    pub freed: Vec<u32>,
    pub resampled: Vec<u32>,
}

#[derive(Clone, Default)]
pub struct FakeRoutes(pub Arc<Mutex<RouteState>>);

impl FakeRoutes {
    pub fn state(&self) -> std::sync::MutexGuard<'_, RouteState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl IrqRoutes for FakeRoutes {
    fn allocate_gsi(&mut self) -> Result<u32, RouteError> {
        let mut s = self.state();
        s.next += 1;
        Ok(23 + s.next)
    }

    fn free_gsi(&mut self, gsi: u32) {
        let mut s = self.state();
        s.routes.remove(&gsi);
        s.freed.push(gsi);
    }

    fn set_msi_route(&mut self, gsi: u32, msg: MsiMessage) -> Result<(), RouteError> {
        self.state().routes.insert(gsi, msg);
        Ok(())
    }

    fn attach_irqfd(
        &mut self,
        _fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> Result<(), RouteError> {
        let mut s = self.state();
        s.attached.insert(gsi);
        if resample.is_some() {
            s.resampled.push(gsi);
        }
        Ok(())
    }

    fn detach_irqfd(&mut self, _fd: &EventFd, gsi: u32) -> Result<(), RouteError> {
        self.state().attached.remove(&gsi);
        Ok(())
    }
}

/// Places memory BARs one after another from an address, naturally aligned; every I/O BAR at
/// port 0xc000. Guest RAM is what it is told.
pub struct BumpAllocator {
    next: u64,
    ram: Vec<(u64, u64)>,
}

impl BumpAllocator {
    /// Memory BARs from `start`, in a guest whose RAM is `ram` (`[start, end)` ranges).
    pub fn new(start: u64, ram: Vec<(u64, u64)>) -> Self {
        Self { next: start, ram }
    }
}

impl BarAllocator for BumpAllocator {
    fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError> {
        if kind == BarKind::Io {
            return Ok(0xc000);
        }
        let a = self.next.next_multiple_of(size);
        self.next = a + size;
        Ok(a)
    }

    fn guest_ram(&self) -> Vec<(u64, u64)> {
        self.ram.clone()
    }
}
