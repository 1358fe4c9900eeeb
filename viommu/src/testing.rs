//! Test doubles shared by unit tests, property tests, benchmarks and fuzz targets: a host that
//! behaves like VFIO type1, and a writer of guest root, context and page tables.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::host::{HostDma, HostDmaError, HostOp};
use crate::walk::{perm_bits, PageTable};
use crate::{Perm, SourceId, PAGE_SIZE};

// The errnos VFIO type1 answers with (Linux include/uapi/asm-generic/errno-base.h).
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;

/// Guest memory used by tests.
pub type Mem = GuestMemoryMmap<()>;

/// Size of the guest memory [`mem`] makes.
pub const TEST_MEM_SIZE: u64 = 64 << 20;
/// Where [`Tables`] starts allocating table pages; data pages used by tests sit below.
pub const TABLES_BASE: u64 = 40 << 20;

/// A guest memory of [`TEST_MEM_SIZE`] bytes at address 0.
pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE as usize)])
        .expect("anonymous test memory")
}

/// A host that keeps VFIO type1v2's rules: a map may not overlap an existing mapping, an unmap
/// removes whole mappings and refuses to cut one, and the number of mappings is limited.
#[derive(Clone, Debug)]
pub struct SimHost {
    maps: BTreeMap<u64, (u64, u64, Perm)>,
    limit: usize,
    pub map_calls: u64,
    pub unmap_calls: u64,
    /// Host mappings removed: the host IOTLB flushes VFIO type1 would issue.
    pub flushes: u64,
}

impl Default for SimHost {
    fn default() -> Self {
        Self::new()
    }
}

impl SimHost {
    /// A host with VFIO type1's default limit of 65535 mappings.
    pub fn new() -> Self {
        Self::with_limit(65535)
    }

    pub fn with_limit(limit: usize) -> Self {
        SimHost {
            maps: BTreeMap::new(),
            limit,
            map_calls: 0,
            unmap_calls: 0,
            flushes: 0,
        }
    }

    /// Number of host mappings.
    pub fn mappings(&self) -> usize {
        self.maps.len()
    }

    /// The host mappings as (IOVA, length, guest-physical address, permissions), by IOVA.
    pub fn extents(&self) -> Vec<(u64, u64, u64, Perm)> {
        self.maps
            .iter()
            .map(|(&iova, &(len, gpa, perm))| (iova, len, gpa, perm))
            .collect()
    }

    /// What the host translates, page by page: IOVA to (guest-physical address, permissions).
    pub fn page_map(&self) -> BTreeMap<u64, (u64, Perm)> {
        let mut pages = BTreeMap::new();
        for (&iova, &(len, gpa, perm)) in &self.maps {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                pages.insert(iova + off, (gpa + off, perm));
            }
        }
        pages
    }

    /// The error VFIO type1 would return, as its errno.
    fn refuse(op: HostOp, iova: u64, len: u64, errno: i32) -> HostDmaError {
        HostDmaError::new(op, iova, len, std::io::Error::from_raw_os_error(errno))
    }
}

impl HostDma for SimHost {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.map_calls += 1;
        let end = iova
            .checked_add(len)
            .ok_or_else(|| Self::refuse(HostOp::Map, iova, len, EINVAL))?;
        if len == 0 || !(iova | gpa | len).is_multiple_of(PAGE_SIZE) || perm.is_none() {
            return Err(Self::refuse(HostOp::Map, iova, len, EINVAL));
        }
        let overlaps = self
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > iova);
        if overlaps {
            return Err(Self::refuse(HostOp::Map, iova, len, EEXIST));
        }
        if self.maps.len() >= self.limit {
            return Err(Self::refuse(HostOp::Map, iova, len, ENOSPC));
        }
        self.maps.insert(iova, (len, gpa, perm));
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.unmap_calls += 1;
        let end = iova.saturating_add(len);
        let cut_start = self
            .maps
            .range(..iova)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > iova);
        let cut_end = self
            .maps
            .range(..end)
            .next_back()
            .is_some_and(|(&k, &(l, _, _))| k + l > end);
        if cut_start || cut_end {
            // Type1 refuses an unmap that would split a mapping.
            return Err(Self::refuse(HostOp::Unmap, iova, len, EINVAL));
        }
        let keys: Vec<u64> = self.maps.range(iova..end).map(|(&k, _)| k).collect();
        for k in &keys {
            self.maps.remove(k);
        }
        self.flushes += keys.len() as u64;
        Ok(())
    }
}

const ENTRY: u64 = 16;

/// Writes guest root, context and second-level tables into guest memory, as a guest driver
/// would, allocating table pages upwards from [`TABLES_BASE`].
pub struct Tables {
    mem: Mem,
    /// Address of the root table.
    pub root: u64,
    next: u64,
}

impl Tables {
    /// Allocates an empty root table.
    pub fn new(mem: &Mem) -> Self {
        Self::at(mem, TABLES_BASE)
    }

    /// Allocates an empty root table at `base`, tables following it.
    pub fn at(mem: &Mem, base: u64) -> Self {
        let mut t = Tables {
            mem: mem.clone(),
            root: 0,
            next: base,
        };
        t.root = t.alloc();
        t
    }

    /// Continues with the root table at `root`, allocating new tables upwards from `next`.
    pub fn resume(mem: &Mem, root: u64, next: u64) -> Self {
        Tables {
            mem: mem.clone(),
            root,
            next,
        }
    }

    /// Allocates a zeroed table page.
    pub fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += PAGE_SIZE;
        self.mem
            .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(a))
            .expect("table page within test memory");
        a
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).expect("readable")
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).expect("writable");
    }

    pub fn read_root_raw(&self, bus: u8) -> u64 {
        self.read_u64(self.root + u64::from(bus) * ENTRY)
    }

    pub fn write_root_raw(&self, bus: u8, lo: u64) {
        self.write_u64(self.root + u64::from(bus) * ENTRY, lo);
    }

    fn context_table(&mut self, bus: u8) -> u64 {
        let lo = self.read_root_raw(bus);
        if lo & 1 != 0 {
            return lo & !0xfff;
        }
        let t = self.alloc();
        self.write_root_raw(bus, t | 1);
        t
    }

    fn context_addr(&mut self, sid: SourceId) -> u64 {
        self.context_table(sid.bus()) + u64::from(sid.devfn()) * ENTRY
    }

    pub fn read_context_raw(&mut self, sid: SourceId) -> [u64; 2] {
        let a = self.context_addr(sid);
        [self.read_u64(a), self.read_u64(a + 8)]
    }

    pub fn write_context_raw(&mut self, sid: SourceId, lo: u64, hi: u64) {
        let a = self.context_addr(sid);
        self.write_u64(a, lo);
        self.write_u64(a + 8, hi);
    }

    /// Allocates an empty second-level table of `levels` levels.
    pub fn page_table(&mut self, levels: u8) -> PageTable {
        PageTable {
            root: self.alloc(),
            levels,
        }
    }

    /// Points `sid`'s context entry at `pt` in `domain` (translation type multi-level).
    pub fn attach(&mut self, sid: SourceId, domain: u16, pt: PageTable) {
        let aw = u64::from(pt.levels - 2);
        self.write_context_raw(sid, pt.root | 1, aw | u64::from(domain) << 8);
    }

    /// Makes `sid`'s context entry a pass-through entry in `domain`.
    pub fn attach_pass_through(&mut self, sid: SourceId, domain: u16) {
        self.write_context_raw(sid, 0b10 << 2 | 1, 2 | u64::from(domain) << 8);
    }

    /// Gives `sid` a new, empty page table of `levels` levels in `domain`.
    pub fn context(&mut self, sid: SourceId, domain: u16, levels: u8) -> PageTable {
        let pt = self.page_table(levels);
        self.attach(sid, domain, pt);
        pt
    }

    /// Address of the entry at `level` for `iova`, allocating tables above it.
    fn entry_addr(&mut self, pt: PageTable, iova: u64, level: u8) -> u64 {
        let mut table = pt.root;
        for l in (level + 1..=pt.levels).rev() {
            let shift = 12 + 9 * (u32::from(l) - 1);
            let e = table + ((iova >> shift) & 511) * 8;
            let v = self.read_u64(e);
            table = if v & 3 != 0 && v & (1 << 7) == 0 {
                v & 0x000f_ffff_ffff_f000
            } else {
                let t = self.alloc();
                self.write_u64(e, t | 3);
                t
            };
        }
        let shift = 12 + 9 * (u32::from(level) - 1);
        table + ((iova >> shift) & 511) * 8
    }

    /// Address of the level-1 entry for `iova`, allocating tables above it.
    pub fn leaf_pte_addr(&mut self, pt: PageTable, iova: u64) -> u64 {
        self.entry_addr(pt, iova, 1)
    }

    /// Maps `len` bytes at `iova` to `gpa` with 4 KiB pages.
    pub fn map(&mut self, pt: PageTable, iova: u64, gpa: u64, len: u64, perm: Perm) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.entry_addr(pt, iova + off, 1);
            self.write_u64(e, (gpa + off) | perm_bits(perm));
        }
    }

    /// Maps one large page at `level` (2: 2 MiB, 3: 1 GiB).
    pub fn map_large(&mut self, pt: PageTable, iova: u64, gpa: u64, level: u8, perm: Perm) {
        let e = self.entry_addr(pt, iova, level);
        self.write_u64(e, gpa | perm_bits(perm) | 1 << 7);
    }

    /// Clears the 4 KiB entries over `len` bytes at `iova`.
    pub fn unmap(&mut self, pt: PageTable, iova: u64, len: u64) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.entry_addr(pt, iova + off, 1);
            self.write_u64(e, 0);
        }
    }
}

/// A [`SimHost`] the test keeps a handle to after giving the unit a [`HostDma`].
#[derive(Clone, Default)]
pub struct SharedHost(pub std::sync::Arc<std::sync::Mutex<SimHost>>);

impl SharedHost {
    pub fn new(host: SimHost) -> Self {
        SharedHost(std::sync::Arc::new(std::sync::Mutex::new(host)))
    }

    pub fn get(&self) -> std::sync::MutexGuard<'_, SimHost> {
        // A poisoned lock means another test thread panicked: that test reports the failure.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HostDma for SharedHost {
    fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), HostDmaError> {
        self.get().map(iova, gpa, len, perm)
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.get().unmap(iova, len)
    }
}

/// An [`crate::MsiSink`] that records the messages sent.
#[derive(Clone, Default)]
pub struct RecordingMsi(pub std::sync::Arc<std::sync::Mutex<Vec<(u64, u32)>>>);

impl RecordingMsi {
    pub fn take(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl crate::MsiSink for RecordingMsi {
    fn send(&self, addr: u64, data: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, data));
    }
}

/// A [`crate::Clock`] that moves only when told to.
#[derive(Clone, Default)]
pub struct ManualClock(pub std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    pub fn advance(&self, d: std::time::Duration) {
        self.0
            .fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::Clock for ManualClock {
    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Programs a [`crate::Vtd`] through its registers the way Linux's intel-iommu driver does.
pub struct Driver {
    /// Shadow of GCMD's persistent bits, as Linux keeps `iommu->gcmd`.
    gcmd: u32,
    pub queue: u64,
    pub queue_entries: u64,
    tail: u64,
    /// Where wait descriptors write their status.
    pub status: u64,
}

/// Where [`Driver`] puts the invalidation queue and the wait status word by default.
pub const DRIVER_QUEUE: u64 = 36 << 20;
pub const DRIVER_STATUS: u64 = (36 << 20) - 0x1000;

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    pub fn new() -> Self {
        Driver {
            gcmd: 0,
            queue: DRIVER_QUEUE,
            queue_entries: 256,
            tail: 0,
            status: DRIVER_STATUS,
        }
    }

    pub fn write32<M: vm_memory::GuestMemoryBackend>(vtd: &mut crate::Vtd<M>, off: u64, v: u32) {
        vtd.mmio_write(off, &v.to_le_bytes());
    }

    pub fn write64<M: vm_memory::GuestMemoryBackend>(vtd: &mut crate::Vtd<M>, off: u64, v: u64) {
        vtd.mmio_write(off, &v.to_le_bytes());
    }

    pub fn read32<M: vm_memory::GuestMemoryBackend>(vtd: &crate::Vtd<M>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        vtd.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read64<M: vm_memory::GuestMemoryBackend>(vtd: &crate::Vtd<M>, off: u64) -> u64 {
        let mut b = [0u8; 8];
        vtd.mmio_read(off, &mut b);
        u64::from_le_bytes(b)
    }

    /// Sets up and enables queued invalidation (`dmar_enable_qi`).
    pub fn enable_qi<M: vm_memory::GuestMemoryBackend>(&mut self, vtd: &mut crate::Vtd<M>) {
        use crate::regs::*;
        let qs = (self.queue_entries / 256).trailing_zeros() as u64;
        self.tail = 0;
        Self::write64(vtd, IQT_REG, 0);
        Self::write64(vtd, IQA_REG, self.queue | qs);
        self.gcmd |= GCMD_QIE;
        Self::write32(vtd, GCMD_REG, self.gcmd);
    }

    /// Points the unit at `root` (`iommu_set_root_entry`).
    pub fn set_root<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        root: u64,
    ) {
        use crate::regs::*;
        Self::write64(vtd, RTADDR_REG, root);
        Self::write32(vtd, GCMD_REG, self.gcmd | GCMD_SRTP);
    }

    /// Enables or disables DMA remapping (`iommu_enable_translation`).
    pub fn set_translation<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        on: bool,
    ) {
        use crate::regs::*;
        if on {
            self.gcmd |= GCMD_TE;
        } else {
            self.gcmd &= !GCMD_TE;
        }
        Self::write32(vtd, GCMD_REG, self.gcmd);
    }

    /// Points the unit at the interrupt remapping table `irta` and turns remapping on or off,
    /// as Linux's `iommu_set_irq_remapping` and `iommu_enable_irq_remapping` do (compatibility
    /// format stays blocked).
    pub fn set_interrupt_remapping<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        irta: u64,
        on: bool,
    ) {
        use crate::regs::*;
        Self::write64(vtd, IRTA_REG, irta);
        Self::write32(vtd, GCMD_REG, self.gcmd | GCMD_SIRTP);
        if on {
            self.gcmd |= GCMD_IRE;
        } else {
            self.gcmd &= !GCMD_IRE;
        }
        self.gcmd &= !GCMD_CFI;
        Self::write32(vtd, GCMD_REG, self.gcmd);
    }

    /// Queues `descs` at the tail and writes IQT once.
    pub fn submit<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        mem: &Mem,
        descs: &[[u64; 2]],
    ) {
        for d in descs {
            let addr = self.queue + self.tail * 16;
            mem.write_obj(*d, GuestAddress(addr))
                .expect("queue in memory");
            self.tail = (self.tail + 1) % self.queue_entries;
        }
        Self::write64(vtd, crate::regs::IQT_REG, self.tail << 4);
    }

    /// Queues `descs` plus a wait descriptor writing `token` to the status word, submits them,
    /// and returns whether the wait completed (`qi_submit_sync`).
    pub fn submit_sync<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        mem: &Mem,
        descs: &[[u64; 2]],
        token: u32,
    ) -> bool {
        let mut all = descs.to_vec();
        all.push(crate::descriptor::encode::wait(
            Some((self.status, token)),
            false,
            false,
        ));
        mem.write_obj(0u32, GuestAddress(self.status))
            .expect("status in memory");
        self.submit(vtd, mem, &all);
        mem.read_obj::<u32>(GuestAddress(self.status)).ok() == Some(token)
    }
}
