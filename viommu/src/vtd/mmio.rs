//! Guest accesses to the register window, as the table in [`super::registers`] describes them,
//! and what a write starts: global commands, fault and completion events.

use vm_memory::GuestMemoryBackend;

use super::registers::{
    self, Derived, Effect, Location, Storage, Width, Write, DERIVED, FAULT_RECORD_WORDS, REGISTERS,
    WORDS,
};
use super::Vtd;
use crate::check::{CacheKey, RegisterWrite};
use crate::record::Event;
use crate::regs::*;
use crate::tables::TableMode;

/// Which bits of a 64-bit register a 4-byte access at its low half covers.
pub(super) const LOW_HALF: u64 = 0xffff_ffff;

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Handles a guest read of `data.len()` bytes at `offset` in the register window. Reads have
    /// no side effects.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let value = match data.len() {
            4 if offset.is_multiple_of(4) => u64::from(self.read_dword(offset)),
            8 if offset.is_multiple_of(8) => self.read_qword(offset),
            _ => {
                vm_device::warn_limited!("VT-d: ignoring {}-byte read at {offset:#x}", data.len());
                0
            }
        };
        data.fill(0);
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Handles a guest write of `data` at `offset` in the register window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.record_event(Event::write(offset, data));
        // Everything one write triggers (a whole queue of descriptors) shares one walk budget.
        self.walk_left = self.config.walk_budget;
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.write_dword(offset, u32::from_le_bytes(b));
            }
            8 if offset.is_multiple_of(8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                let v = u64::from_le_bytes(b);
                match registers::locate(offset) {
                    Some(loc) if loc.register.width == Width::W64 => {
                        self.write_register(loc, v, u64::MAX)
                    }
                    // Two 32-bit registers (or reserved halves), low one first.
                    _ => {
                        self.write_dword(offset, v as u32);
                        self.write_dword(offset + 4, (v >> 32) as u32);
                    }
                }
            }
            _ => {
                vm_device::warn_limited!("VT-d: ignoring {}-byte write at {offset:#x}", data.len())
            }
        }
    }

    /// The register window as the guest would read it with 8-byte loads: `image[i]` is what an
    /// 8-byte read at offset `8 * i` returns (a 4-byte read returns one half of it). Reads have
    /// no side effects in VT-d, so a VMM can publish this image in a read-only page and let the
    /// guest read registers without exits.
    pub fn register_image(&self, image: &mut [u64; REG_IMAGE_WORDS]) {
        image.fill(0);
        self.visit_registers(|offset, word| image[(offset / 8) as usize] = word);
    }

    /// Calls `f(offset, word)` for every 8-byte word of the window that holds a register, with
    /// the value an 8-byte read there returns; every other word reads as zero. A VMM calls this
    /// after every change, so it walks precomputed words rather than decoding offsets.
    pub fn visit_registers(&self, mut f: impl FnMut(u64, u64)) {
        let mut words = self.regs.words();
        for (place, d) in DERIVED {
            words[place.word] |= (self.derived(d, 0) & place.mask) << place.shift;
        }
        for (offset, word) in WORDS.into_iter().zip(words) {
            f(offset, word);
        }
        for record in 0..self.config.fault_records {
            let base = record as u64 * FRCD_REG_SIZE;
            for (offset, half) in FAULT_RECORD_WORDS {
                f(base + offset, self.faults.read(record, half));
            }
        }
    }

    /// The value of table entry `slot` (repetition `instance`).
    fn value(&self, slot: usize, instance: usize) -> u64 {
        match REGISTERS.get(slot).map(|r| r.storage) {
            Some(Storage::Stored { .. }) => self.regs.at(slot),
            Some(Storage::Derived(d)) => self.derived(d, instance),
            Some(Storage::WriteOnly) | None => 0,
        }
    }

    /// A value the unit computes from its state.
    fn derived(&self, d: Derived, instance: usize) -> u64 {
        match d {
            Derived::Capability => self.cap,
            Derived::ExtendedCapability => self.ecap,
            Derived::FaultStatus => u64::from(self.fsts()),
            Derived::QueueHead => self.iqh << IQ_INDEX_SHIFT,
            Derived::FaultRecord { half } => self.faults.read(instance, half),
            Derived::QueueErrorRecord => self.queue_errors.value(),
        }
    }

    fn read_dword(&self, offset: u64) -> u32 {
        registers::locate(offset).map_or(0, |loc| {
            (self.value(loc.slot, loc.instance) >> ((offset - loc.base) * 8)) as u32
        })
    }

    fn read_qword(&self, offset: u64) -> u64 {
        match registers::locate(offset) {
            Some(loc) if loc.register.width == Width::W64 => self.value(loc.slot, loc.instance),
            _ => u64::from(self.read_dword(offset)) | u64::from(self.read_dword(offset + 4)) << 32,
        }
    }

    fn write_dword(&mut self, offset: u64, v: u32) {
        let Some(loc) = registers::locate(offset) else {
            vm_device::debug_limited!("VT-d: write {v:#x} to reserved {offset:#x} dropped");
            return;
        };
        let shift = (offset - loc.base) * 8;
        self.write_register(loc, u64::from(v) << shift, LOW_HALF << shift);
    }

    /// Writes the bits `written` of the register at `loc` from `value`.
    fn write_register(&mut self, loc: Location, value: u64, written: u64) {
        let register = loc.register;
        let w = Write {
            instance: loc.instance,
            written,
            value: value & written & register.writable(),
        };
        if register.writable() & written == 0 {
            vm_device::debug_limited!(
                "VT-d: write {value:#x} to read-only {} at {:#x} dropped",
                register.name,
                loc.base
            );
        }
        if let Storage::Stored { .. } = register.storage {
            self.regs.write(loc.slot, &w);
        }
        if let Some(effect) = register.effect {
            if self.check.enabled() {
                self.check.set_write(Some(RegisterWrite {
                    name: register.name,
                    offset: loc.base,
                    value: value & written,
                }));
            }
            self.apply(effect, w);
            self.check.set_write(None);
        }
    }

    /// Carries out what a write to a register starts (the table names which).
    fn apply(&mut self, effect: Effect, w: Write) {
        match effect {
            Effect::GlobalCommand => self.write_gcmd(w.value as u32),
            Effect::ContextInvalidation => {
                if w.value & CCMD_ICC != 0 {
                    self.register_context_invalidation();
                }
            }
            Effect::IotlbInvalidation => {
                if w.value & IOTLB_IVT != 0 {
                    self.register_iotlb_invalidation();
                }
            }
            Effect::FaultStatus => self.clear_fault_status(w.value as u32),
            Effect::FaultEventControl => {
                // Unmasking with an interrupt pending delivers it (11.4.7.2).
                let fectl = self.regs.get32::<FECTL_REG>();
                if fectl & ECTL_IM == 0 && fectl & ECTL_IP != 0 {
                    self.send_fault_msi();
                }
            }
            Effect::FaultRecord => {
                self.faults.write(w.instance, 1, w.value);
                self.retire_fault_event();
            }
            Effect::ProtectedMemory => {
                if self.regs.get32::<PMEN_REG>() & PMEN_EPM != 0 {
                    self.regs.set_bits::<PMEN_REG>(PMEN_PRS);
                } else {
                    self.regs.clear_bits::<PMEN_REG>(PMEN_PRS);
                }
            }
            Effect::QueueTail => {
                if w.written & LOW_HALF != 0 {
                    self.process_queue();
                }
            }
            Effect::CompletionStatus => {
                if w.value & u64::from(ICS_IWC) != 0 {
                    // Clearing IWC retires a pending completion interrupt (11.4.9.4).
                    self.regs.clear_bits::<IECTL_REG>(ECTL_IP);
                }
            }
            Effect::InterruptTableAddress => {
                if !self.config.x2apic {
                    self.regs.clear_bits::<IRTA_REG>(crate::intremap::IRTA_EIME);
                }
            }
            Effect::RootTableAddress => {
                if !self.caps.scalable {
                    self.regs.clear_bits::<RTADDR_REG>(RTADDR_TTM_SCALABLE);
                }
            }
            Effect::QueueAddress => {
                if !self.caps.scalable {
                    self.regs.clear_bits::<IQA_REG>(IQA_DW);
                }
            }
            Effect::CompletionEventControl => {
                let iectl = self.regs.get32::<IECTL_REG>();
                if iectl & ECTL_IM == 0 && iectl & ECTL_IP != 0 {
                    self.regs.clear_bits::<IECTL_REG>(ECTL_IP);
                    self.send_completion_msi();
                }
            }
        }
    }

    /// FSTS as software reads it (11.4.7.1).
    pub(super) fn fsts(&self) -> u32 {
        let mut v = self.fsts_errors | (self.faults.fri() as u32) << FSTS_FRI_SHIFT;
        if self.faults.pfo() {
            v |= FSTS_PFO;
        }
        if self.faults.ppf() {
            v |= FSTS_PPF;
        }
        v
    }

    /// Software cleared the FSTS bits `clear` (RW1C).
    fn clear_fault_status(&mut self, clear: u32) {
        if clear & FSTS_PFO != 0 {
            self.faults.clear_pfo();
        }
        // IQE and ITE stop the queue (6.5.2.10); clearing the one that stopped it, with the
        // other clear, resumes fetching at IQH (where software fixed the bad descriptor, or
        // past the wait the time-out aborted).
        let stopped = self.fsts_errors & (FSTS_IQE | FSTS_ITE);
        self.fsts_errors &= !clear;
        self.retire_fault_event();
        if stopped != 0 && self.fsts_errors & (FSTS_IQE | FSTS_ITE) == 0 {
            self.process_queue();
        }
    }

    /// Signals the fault event for a new condition, given FSTS before it arose (7.3): only when
    /// no earlier condition was still waiting for software.
    pub(super) fn fault_event(&mut self, fsts_before: u32) {
        if fsts_before & FSTS_EVENT_CONDITIONS != 0 {
            return;
        }
        self.regs.set_bits::<FECTL_REG>(ECTL_IP);
        if self.regs.get32::<FECTL_REG>() & ECTL_IM == 0 {
            self.send_fault_msi();
        }
    }

    fn send_fault_msi(&mut self) {
        self.regs.clear_bits::<FECTL_REG>(ECTL_IP);
        let addr = self.regs.get::<FEUADDR_REG>() << 32 | self.regs.get::<FEADDR_REG>();
        self.msi.send(addr, self.regs.get32::<FEDATA_REG>());
    }

    /// Clears FECTL.IP once software has serviced every fault condition.
    fn retire_fault_event(&mut self) {
        if self.fsts() & FSTS_EVENT_CONDITIONS == 0 {
            self.regs.clear_bits::<FECTL_REG>(ECTL_IP);
        }
    }

    /// Signals the invalidation completion event (6.5.2.8, 11.4.9.5).
    pub(super) fn completion_event(&mut self) {
        if self.regs.get32::<ICS_REG>() & ICS_IWC != 0 {
            return;
        }
        self.regs.set_bits::<ICS_REG>(ICS_IWC);
        if self.regs.get32::<IECTL_REG>() & ECTL_IM != 0 {
            self.regs.set_bits::<IECTL_REG>(ECTL_IP);
        } else {
            self.send_completion_msi();
        }
    }

    fn send_completion_msi(&mut self) {
        let addr = self.regs.get::<IEUADDR_REG>() << 32 | self.regs.get::<IEADDR_REG>();
        self.msi.send(addr, self.regs.get32::<IEDATA_REG>());
    }

    /// GCMD (11.4.4.1): TE and QIE are persistent (software writes their wanted state every
    /// time); SRTP and WBF are one-shot commands completed at once.
    fn write_gcmd(&mut self, v: u32) {
        if v & GCMD_SRTP != 0 {
            let rtaddr = self.regs.get::<RTADDR_REG>();
            self.root_table = rtaddr & RTADDR_RTA_MASK;
            // The register keeps TTM = 01b only where ECAP.SMTS allows it.
            self.root_mode = if rtaddr & RTADDR_TTM_MASK == RTADDR_TTM_SCALABLE {
                TableMode::Scalable
            } else {
                TableMode::Legacy
            };
            vm_device::debug_limited!(
                "VT-d: {:?} root table at {:#x}",
                self.root_mode,
                self.root_table
            );
            self.regs.set_bits::<GSTS_REG>(GSTS_RTPS);
            // ESRTPS (6.6): setting the root pointer invalidates every translation cache, the
            // IOTLB and the context and PASID caches included, so every device is synced over
            // its whole space (diffed: a repeated SRTP over unchanged tables costs no host call).
            for space in self.spaces.values_mut() {
                space.invalidate(crate::space::FULL);
            }
            self.caches.clear_translations(&mut self.stats.caches);
            self.check.forget(|k| {
                matches!(
                    k,
                    CacheKey::Iotlb(_) | CacheKey::Context(_) | CacheKey::Pasid(..)
                )
            });
            self.refresh_views();
        }
        let qie = v & GCMD_QIE != 0;
        if qie != (self.regs.get32::<GSTS_REG>() & GSTS_QIES != 0) {
            if qie {
                self.iqh = 0;
                // A fresh queue: no time-out of the old one is pending in it.
                self.timed_out = None;
                self.regs.set_bits::<GSTS_REG>(GSTS_QIES);
                vm_device::debug_limited!(
                    "VT-d: queued invalidation enabled, IQA {:#x}",
                    self.regs.get::<IQA_REG>()
                );
            } else {
                self.regs.clear_bits::<GSTS_REG>(GSTS_QIES);
            }
        }
        let te = v & GCMD_TE != 0;
        if te != self.translation_enabled() {
            if te {
                self.regs.set_bits::<GSTS_REG>(GSTS_TES);
            } else {
                self.regs.clear_bits::<GSTS_REG>(GSTS_TES);
            }
            vm_device::debug_limited!(
                "VT-d: translation {}",
                if te { "enabled" } else { "disabled" }
            );
            self.refresh_views();
        }
        if self.config.interrupt_remapping {
            self.interrupt_remapping_command(v);
        }
        // WBF completes at once: WBFS never reads as set. SFL and EAFL do nothing (no advanced
        // fault logging).
    }
}
