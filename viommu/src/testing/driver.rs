//! A guest driver programming the unit through its registers.

use vm_memory::{Bytes, GuestAddress};

use super::Mem;
use crate::PAGE_SIZE;

/// Programs a [`crate::Vtd`] through its registers the way Linux's intel-iommu driver does.
pub struct Driver {
    /// Shadow of GCMD's persistent bits, as Linux keeps `iommu->gcmd`.
    gcmd: u32,
    pub queue: u64,
    /// Descriptors the queue holds.
    pub queue_entries: u64,
    /// 256-bit descriptors (IQA.DW), as Linux uses whenever the unit reports ECAP.SMTS: each
    /// descriptor given to [`Driver::submit`] is written with its upper 128 bits zero.
    pub wide: bool,
    /// Descriptor index of the tail.
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
            wide: false,
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

    /// Bytes one descriptor takes in the queue.
    fn descriptor_size(&self) -> u64 {
        if self.wide {
            crate::regs::WIDE_DESCRIPTOR_SIZE
        } else {
            crate::regs::DESCRIPTOR_SIZE
        }
    }

    /// Sets up and enables queued invalidation (`dmar_enable_qi`): 2^QS pages of descriptors.
    pub fn enable_qi<M: vm_memory::GuestMemoryBackend>(&mut self, vtd: &mut crate::Vtd<M>) {
        use crate::regs::*;
        let per_page = PAGE_SIZE / self.descriptor_size();
        let qs = (self.queue_entries / per_page).trailing_zeros() as u64;
        let dw = if self.wide { IQA_DW } else { 0 };
        self.tail = 0;
        Self::write64(vtd, IQT_REG, 0);
        Self::write64(vtd, IQA_REG, self.queue | dw | qs);
        self.gcmd |= GCMD_QIE;
        Self::write32(vtd, GCMD_REG, self.gcmd);
    }

    /// Points the unit at the legacy-mode root table `root` (`iommu_set_root_entry`).
    pub fn set_root<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        root: u64,
    ) {
        use crate::regs::*;
        Self::write64(vtd, RTADDR_REG, root);
        Self::write32(vtd, GCMD_REG, self.gcmd | GCMD_SRTP);
    }

    /// Points the unit at the scalable-mode root table `root` (RTADDR.TTM = 01b), as Linux
    /// does when it runs the unit in scalable mode.
    pub fn set_scalable_root<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        root: u64,
    ) {
        self.set_root(vtd, root | crate::regs::RTADDR_TTM_SCALABLE);
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

    /// The IQT value of the current tail (its queue offset in 128-bit units, bits 18:4).
    pub fn tail_register(&self) -> u64 {
        self.tail * self.descriptor_size()
    }

    /// Queues `descs` at the tail and writes IQT once.
    pub fn submit<M: vm_memory::GuestMemoryBackend>(
        &mut self,
        vtd: &mut crate::Vtd<M>,
        mem: &Mem,
        descs: &[[u64; 2]],
    ) {
        for d in descs {
            let addr = self.queue + self.tail * self.descriptor_size();
            let wide = [d[0], d[1], 0, 0];
            let bytes = if self.wide { &wide[..] } else { &d[..] };
            for (i, w) in bytes.iter().enumerate() {
                mem.write_obj(*w, GuestAddress(addr + i as u64 * 8))
                    .expect("queue in memory");
            }
            self.tail = (self.tail + 1) % self.queue_entries;
        }
        Self::write64(vtd, crate::regs::IQT_REG, self.tail_register());
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
