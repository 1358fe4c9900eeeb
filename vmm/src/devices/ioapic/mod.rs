//! The I/O APIC for KVM's split irqchip: a user-space model of the Intel 82093AA (datasheet
//! 290566-001) at version 0x20, i.e. with the EOI register of the ICH/PCH IOxAPIC, 24 pins.
//!
//! Registers (MMIO): IOREGSEL at +0x00 selects, IOWIN at +0x10 reads and writes the selected
//! register (dword accesses only); EOI at +0x40 takes a vector. Indirect registers: ID (0x00),
//! version (0x01), arbitration (0x02), redirection entries (0x10 + 2n low, 0x11 + 2n high).
//!
//! A plain state machine: it never touches KVM. What it drives is an [`IoapicOutput`], which the
//! VMM implements over KVM in [`kvm`]: it sends interrupt messages (KVM_SIGNAL_MSI, through the
//! VT-d's interrupt remapping when that is on), keeps the KVM GSI routes of lines that KVM
//! injects from an eventfd in line with the entries, forwards EOIs to those lines (VFIO INTx
//! resample) and runs the storm guard's timer.
//!
//! Lines driven through [`Ioapic::set_irq`] get the full 82093AA semantics: an edge is delivered
//! when an unmasked line rises and is lost when masked; a level-triggered line is delivered while
//! asserted, sets remote IRR and is delivered again at the EOI of its vector if still asserted.
//! Lines that KVM injects itself (irqfds on the pin's route) bypass that state: remote IRR stays
//! clear for them, and their device learns of the EOI from [`IoapicOutput::end_of_interrupt`].

pub mod kvm;
mod rte;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use viommu::SourceId;
use vm_device::debug_limited;
use vm_device::interrupt::MsiMessage;

use crate::devices::bus::BusDevice;

pub use rte::{Addressing, DeliveryMode, RedirectionEntry, TriggerMode};

/// Input pins, hence redirection entries.
pub const IOAPIC_NUM_PINS: usize = 24;
/// The IOAPIC's ID after reset, as the MADT and the DMAR table's device scope name it.
pub const IOAPIC_ID: u8 = 0;
/// The requester ID of the IOAPIC's interrupt requests to the remapping unit, as the DMAR
/// table's IOAPIC device scope announces it (so IRTEs can validate it as any device's): bus
/// 0xff, which no PCI function of ours can have (the root complex has bus 0 only, without
/// bridges), device 0, function 0, where QEMU's q35 puts its IOAPIC too.
pub const IOAPIC_SOURCE_ID: SourceId = SourceId(0xff00);
/// The MMIO window at [`crate::arch::x86_64::layout::IOAPIC_START`].
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;

// Direct registers (82093AA datasheet, 3.1; ICH9 datasheet, 13.5.1 for the EOI register).
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;

// Indirect registers (82093AA datasheet, 3.2).
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_FIRST: u8 = 0x10;
const REG_REDIRECTION_LAST: u8 = REG_REDIRECTION_FIRST + 2 * IOAPIC_NUM_PINS as u8 - 1;

/// ID and arbitration ID: bits 27:24.
const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0xf;
/// Version 0x20 (the IOxAPIC with an EOI register); bits 23:16 the highest entry index.
const VERSION: u32 = 0x20;
const VERSION_MAX_ENTRY_SHIFT: u32 = 16;

/// Re-deliveries of a level-triggered line in a row, each at the EOI of the one before, after
/// which the next waits [`STORM_DELAY`]: a guest that EOIs without quieting the device then
/// still makes progress, as on real hardware, which does not re-deliver instantly (QEMU's and
/// KVM's IOAPICs use the same guard and figures).
pub const STORM_THRESHOLD: u32 = 10_000;
/// How long a re-delivery held back by the storm guard waits.
pub const STORM_DELAY: Duration = Duration::from_millis(10);

/// What a pin's entry asks of the lines that reach KVM without the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinState {
    /// The message the entry makes (see [`RedirectionEntry::message`]); meaningful while masked
    /// too: the EOI of an interrupt in service must still come back to the IOAPIC.
    pub message: MsiMessage,
    /// Nothing may be delivered for the pin.
    pub masked: bool,
    pub trigger: TriggerMode,
}

impl PinState {
    fn of(e: RedirectionEntry) -> Self {
        Self {
            message: e.message(),
            masked: e.masked(),
            trigger: e.trigger(),
        }
    }
}

/// The IOAPIC's view of the rest of the machine.
///
/// Messages are handed over as the IOAPIC writes them, in compatibility or remappable format:
/// an implementation with interrupt remapping translates them (and records faults for what it
/// cannot deliver), one without sends compatibility-format messages as they are. The model
/// calls it with its own state consistent, under whatever lock the VMM keeps it in: an
/// implementation must not call back into the IOAPIC.
pub trait IoapicOutput: Send {
    /// `pin`'s entry changed what [`PinState`] says (or [`Ioapic::refresh_routes`] asks for
    /// everything again, e.g. after the remapping table changed). The KVM route of GSI `pin`
    /// follows the message, also while masked, because KVM derives which vectors' EOIs exit to
    /// user space from the level-triggered routes of GSIs 0..24; lines injected by KVM stop
    /// while masked. Not a request for an interrupt: a remapping fault here is not recorded.
    fn pin_changed(&mut self, pin: u8, state: PinState);

    /// Sends `pin`'s interrupt now.
    fn deliver(&mut self, pin: u8, message: MsiMessage);

    /// The EOI of level-triggered `pin`'s vector arrived (broadcast or through the EOI
    /// register): a device driving the line outside the model re-checks it.
    fn end_of_interrupt(&mut self, pin: u8);

    /// The storm guard held a re-delivery back: call [`Ioapic::service_deferred`] after `delay`.
    fn schedule_deferred_service(&mut self, delay: Duration);
}

/// The IOAPIC, shared by the MMIO bus, the vCPUs (EOI exits) and its storm guard's timer.
pub type SharedIoapic = Arc<Mutex<Ioapic>>;

/// Locks the IOAPIC. A vCPU that panicked holding it left consistent state (every method
/// completes its update before calling out), so a poisoned lock is taken over. Its output takes
/// the VT-d's lock (interrupt remapping) and KVM's routing table's while it is held: nothing that
/// holds those may lock the IOAPIC (see `crate::devices::vtd::intremap`).
pub fn lock(ioapic: &SharedIoapic) -> MutexGuard<'_, Ioapic> {
    ioapic.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pin number past the last redirection entry (a VMM bug, not a guest's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("IOAPIC pin {0} does not exist (pins 0..{IOAPIC_NUM_PINS})")]
pub struct InvalidPin(pub u8);

/// The device.
pub struct Ioapic {
    id: u32,
    select: u8,
    entries: [RedirectionEntry; IOAPIC_NUM_PINS],
    /// Input lines asserted, one bit a pin.
    lines: u32,
    /// Per pin, re-deliveries at EOI in a row (the storm guard's count).
    redeliveries: [u32; IOAPIC_NUM_PINS],
    /// Pins whose re-delivery the storm guard deferred.
    deferred: u32,
    output: Box<dyn IoapicOutput>,
}

fn bit(pin: usize) -> u32 {
    1 << pin
}

impl Ioapic {
    /// An IOAPIC in its reset state (ID 0, every entry masked) driving `output`. The output
    /// starts from that state: it hears of pins only when they change.
    pub fn new(output: Box<dyn IoapicOutput>) -> Self {
        Self {
            id: 0,
            select: 0,
            entries: [RedirectionEntry::default(); IOAPIC_NUM_PINS],
            lines: 0,
            redeliveries: [0; IOAPIC_NUM_PINS],
            deferred: 0,
            output,
        }
    }

    fn pin_index(pin: u8) -> Result<usize, InvalidPin> {
        let i = usize::from(pin);
        if i < IOAPIC_NUM_PINS {
            Ok(i)
        } else {
            Err(InvalidPin(pin))
        }
    }

    /// The state of `pin`'s entry, as [`IoapicOutput::pin_changed`] reports it.
    pub fn pin_state(&self, pin: u8) -> Result<PinState, InvalidPin> {
        Ok(PinState::of(self.entries[Self::pin_index(pin)?]))
    }

    /// Drives input line `pin`: `asserted` is the line's logical state (the polarity bit is
    /// the guest's knowledge of the wire, not an inversion here).
    pub fn set_irq(&mut self, pin: u8, asserted: bool) -> Result<(), InvalidPin> {
        let i = Self::pin_index(pin)?;
        let was = self.lines & bit(i) != 0;
        if asserted {
            self.lines |= bit(i);
        } else {
            self.lines &= !bit(i);
        }
        let e = self.entries[i];
        match e.trigger() {
            // 82093AA 3.2.4: an edge on a masked pin is ignored, not held pending.
            TriggerMode::Edge => {
                if asserted && !was && !e.masked() {
                    self.output.deliver(pin, e.message());
                }
            }
            TriggerMode::Level => self.service(i),
        }
        Ok(())
    }

    /// One edge on `pin`: the line rises and falls.
    pub fn pulse(&mut self, pin: u8) -> Result<(), InvalidPin> {
        self.set_irq(pin, true)?;
        self.set_irq(pin, false)
    }

    /// Delivers level-triggered pin `i` if its line is asserted and the entry lets it.
    fn service(&mut self, i: usize) {
        let e = &mut self.entries[i];
        if e.trigger() != TriggerMode::Level
            || e.masked()
            || e.remote_irr()
            || self.lines & bit(i) == 0
        {
            return;
        }
        e.set_remote_irr(true);
        let message = e.message();
        self.output.deliver(i as u8, message);
    }

    /// An EOI for `vector`: a local APIC's broadcast (KVM_EXIT_IOAPIC_EOI) or a write to the
    /// EOI register. Every level-triggered entry with that vector has its remote IRR cleared
    /// and, if its line is still asserted, is delivered again.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for i in 0..IOAPIC_NUM_PINS {
            let e = self.entries[i];
            if e.vector() != vector || e.trigger() != TriggerMode::Level {
                continue;
            }
            self.output.end_of_interrupt(i as u8);
            if !e.remote_irr() {
                continue;
            }
            self.entries[i].set_remote_irr(false);
            if e.masked() || self.lines & bit(i) == 0 {
                self.redeliveries[i] = 0;
                continue;
            }
            self.redeliveries[i] += 1;
            if self.redeliveries[i] >= STORM_THRESHOLD {
                debug_limited!("IOAPIC pin {i}: interrupt storm, re-delivery deferred");
                self.redeliveries[i] = 0;
                self.deferred |= bit(i);
                self.output.schedule_deferred_service(STORM_DELAY);
            } else {
                self.service(i);
            }
        }
    }

    /// Delivers what the storm guard held back (see [`IoapicOutput::schedule_deferred_service`]).
    pub fn service_deferred(&mut self) {
        let deferred = std::mem::take(&mut self.deferred);
        for i in (0..IOAPIC_NUM_PINS).filter(|&i| deferred & bit(i) != 0) {
            self.service(i);
        }
    }

    /// Reports every pin to the output again, e.g. after the interrupt remapping table changed.
    pub fn refresh_routes(&mut self) {
        for (i, e) in self.entries.iter().enumerate() {
            self.output.pin_changed(i as u8, PinState::of(*e));
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id << ID_SHIFT,
            REG_VERSION => VERSION | ((IOAPIC_NUM_PINS as u32 - 1) << VERSION_MAX_ENTRY_SHIFT),
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let r = self.select - REG_REDIRECTION_FIRST;
                let bits = self.entries[usize::from(r / 2)].bits();
                if r % 2 == 1 {
                    (bits >> 32) as u32
                } else {
                    bits as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> ID_SHIFT) & ID_MASK,
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let r = self.select - REG_REDIRECTION_FIRST;
                self.write_entry(usize::from(r / 2), r % 2 == 1, value);
            }
            // Version and arbitration are read-only; the rest is unimplemented space.
            other => debug_limited!("IOAPIC: write {value:#x} to read-only register {other:#x}"),
        }
    }

    fn write_entry(&mut self, i: usize, high: bool, value: u32) {
        let old = self.entries[i];
        let mut new = old.with_half_written(high, value);
        // Remote IRR means nothing for an edge-triggered entry; Linux relies on switching an
        // entry to edge and back to clear it on IOAPICs without an EOI register.
        if new.trigger() == TriggerMode::Edge {
            new.set_remote_irr(false);
        }
        self.entries[i] = new;
        self.redeliveries[i] = 0;
        if PinState::of(old) != PinState::of(new) {
            self.output.pin_changed(i as u8, PinState::of(new));
        }
        // An unmasked, still asserted level-triggered line is delivered now.
        self.service(i);
    }
}

/// Little-endian bytes of `value` into `data` (as many as it holds).
fn put(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

impl BusDevice for Ioapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (IOREGSEL, _) => put(data, u32::from(self.select)),
            (IOWIN, 4) => put(data, self.read_register()),
            _ => debug_limited!(
                "IOAPIC: {}-byte read at offset {offset:#x} reads zero",
                data.len()
            ),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Bits 7:0 select; the rest of IOREGSEL is reserved.
            (IOREGSEL, [select, ..]) => self.select = *select,
            (IOWIN, [a, b, c, d]) => self.write_register(u32::from_le_bytes([*a, *b, *c, *d])),
            // The EOI register compares its low 8 bits with every entry's vector.
            (IOEOI, [vector, ..]) => self.end_of_interrupt(*vector),
            _ => debug_limited!(
                "IOAPIC: {}-byte write at offset {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
