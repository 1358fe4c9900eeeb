//! The IOAPIC through its registers, as a guest drives it, with a recording output.

use std::sync::{Arc, Mutex};

use super::*;

const BASE: u64 = 0xfec0_0000;
const VECTOR: u8 = 0x31;
/// Low dword of an unmasked level-triggered entry with VECTOR (fixed, physical).
const LEVEL: u32 = 0x8000 | VECTOR as u32;
/// Low dword of an unmasked edge-triggered entry with VECTOR.
const EDGE: u32 = VECTOR as u32;
const MASK: u32 = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
enum Event {
    Changed(u8, PinState),
    Delivered(u8, MsiMessage),
    Eoi(u8),
    Deferred(Duration),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn deliveries(&self) -> Vec<u8> {
        self.take()
            .into_iter()
            .filter_map(|e| match e {
                Event::Delivered(pin, _) => Some(pin),
                _ => None,
            })
            .collect()
    }
}

impl IoapicOutput for Recorder {
    fn pin_changed(&mut self, pin: u8, state: PinState) {
        self.0.lock().unwrap().push(Event::Changed(pin, state));
    }
    fn deliver(&mut self, pin: u8, message: MsiMessage) {
        self.0.lock().unwrap().push(Event::Delivered(pin, message));
    }
    fn end_of_interrupt(&mut self, pin: u8) {
        self.0.lock().unwrap().push(Event::Eoi(pin));
    }
    fn schedule_deferred_service(&mut self, delay: Duration) {
        self.0.lock().unwrap().push(Event::Deferred(delay));
    }
}

fn ioapic() -> (Ioapic, Recorder) {
    let rec = Recorder::default();
    (Ioapic::new(Box::new(rec.clone())), rec)
}

fn select(io: &mut Ioapic, reg: u8) {
    io.write(BASE, IOREGSEL, &u32::from(reg).to_le_bytes());
}

fn write_reg(io: &mut Ioapic, reg: u8, value: u32) {
    select(io, reg);
    io.write(BASE, IOWIN, &value.to_le_bytes());
}

fn read_reg(io: &mut Ioapic, reg: u8) -> u32 {
    select(io, reg);
    let mut b = [0u8; 4];
    io.read(BASE, IOWIN, &mut b);
    u32::from_le_bytes(b)
}

fn low(pin: u8) -> u8 {
    0x10 + 2 * pin
}

/// Programs `pin` as Linux does: high half first, then the low half.
fn program(io: &mut Ioapic, pin: u8, low_half: u32, high_half: u32) {
    write_reg(io, low(pin) + 1, high_half);
    write_reg(io, low(pin), low_half);
}

fn entry(io: &mut Ioapic, pin: u8) -> u64 {
    u64::from(read_reg(io, low(pin))) | (u64::from(read_reg(io, low(pin) + 1)) << 32)
}

fn remote_irr(io: &mut Ioapic, pin: u8) -> bool {
    read_reg(io, low(pin)) & (1 << 14) != 0
}

#[test]
fn ioregsel_keeps_its_low_byte() {
    let (mut io, _) = ioapic();
    io.write(BASE, IOREGSEL, &0xdead_be12u32.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(BASE, IOREGSEL, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x12);
    io.write(BASE, IOREGSEL, &[0x01]);
    let mut b = [0u8; 1];
    io.read(BASE, IOREGSEL, &mut b);
    assert_eq!(b, [0x01], "byte accesses reach IOREGSEL too");
}

#[test]
fn id_register_holds_four_bits_and_arbitration_mirrors_it() {
    let (mut io, _) = ioapic();
    assert_eq!(read_reg(&mut io, 0x00), 0);
    write_reg(&mut io, 0x00, 0xffff_ffff);
    assert_eq!(read_reg(&mut io, 0x00), 0x0f00_0000, "ID is bits 27:24");
    assert_eq!(
        read_reg(&mut io, 0x02),
        0x0f00_0000,
        "arbitration ID follows"
    );
    write_reg(&mut io, 0x02, 0);
    assert_eq!(
        read_reg(&mut io, 0x02),
        0x0f00_0000,
        "arbitration is read-only"
    );
}

#[test]
fn version_register_says_0x20_with_24_entries_and_is_read_only() {
    let (mut io, _) = ioapic();
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
    write_reg(&mut io, 0x01, 0);
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
}

#[test]
fn every_entry_resets_masked_and_takes_its_writable_bits() {
    let (mut io, rec) = ioapic();
    for pin in 0..24u8 {
        assert_eq!(entry(&mut io, pin), 0x1_0000, "pin {pin} after reset");
    }
    for pin in 0..24u8 {
        program(&mut io, pin, 0xffff_ffff, 0xffff_ffff);
        // Reserved 47:17 read as zero; delivery status (12) and remote IRR (14) read-only.
        assert_eq!(entry(&mut io, pin), 0xffff_0000_0001_afff, "pin {pin}");
    }
    // Each pin changed twice (high, then low half); nothing was delivered.
    let events = rec.take();
    assert_eq!(events.len(), 48);
    assert!(events.iter().all(|e| matches!(e, Event::Changed(..))));
}

#[test]
fn registers_outside_the_table_read_zero_and_ignore_writes() {
    let (mut io, rec) = ioapic();
    for reg in (0x03..0x10).chain(0x40..=0xff) {
        write_reg(&mut io, reg, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, reg), 0, "register {reg:#x}");
    }
    assert_eq!(
        entry(&mut io, 23),
        0x1_0000,
        "no write spilled into an entry"
    );
    assert!(rec.take().is_empty());
}

#[test]
fn iowin_takes_dword_accesses_only() {
    let (mut io, rec) = ioapic();
    select(&mut io, low(0));
    io.write(BASE, IOWIN, &[0x31, 0x80]);
    io.write(BASE, IOWIN, &0u64.to_le_bytes());
    assert_eq!(
        entry(&mut io, 0),
        0x1_0000,
        "partial and wide writes are dropped"
    );
    select(&mut io, 0x01);
    let mut b = [0xffu8; 2];
    io.read(BASE, IOWIN, &mut b);
    assert_eq!(b, [0, 0], "partial reads read zero");
    assert!(rec.take().is_empty());
}

#[test]
fn other_offsets_read_zero() {
    let (mut io, _) = ioapic();
    for offset in [0x04, 0x08, 0x14, 0x20, 0x40, 0x44, 0xffc] {
        let mut b = [0xffu8; 4];
        io.read(BASE, offset, &mut b);
        assert_eq!(b, [0; 4], "offset {offset:#x}");
    }
}

#[test]
fn entry_changes_report_the_pin_state_and_identical_rewrites_do_not() {
    let (mut io, rec) = ioapic();
    program(&mut io, 4, EDGE, 0x0300_0000);
    let want = PinState {
        message: MsiMessage {
            address: 0xfee0_3000,
            data: u32::from(VECTOR),
        },
        masked: false,
        trigger: TriggerMode::Edge,
    };
    assert_eq!(rec.take().last(), Some(&Event::Changed(4, want)));
    assert_eq!(io.pin_state(4), Ok(want));
    program(&mut io, 4, EDGE, 0x0300_0000);
    assert!(rec.take().is_empty(), "nothing changed");
    // Polarity is no part of the message: no route change either.
    write_reg(&mut io, low(4), EDGE | (1 << 13));
    assert!(rec.take().is_empty());
    write_reg(&mut io, low(4), EDGE | MASK);
    assert_eq!(
        rec.take(),
        [Event::Changed(
            4,
            PinState {
                masked: true,
                ..want
            }
        )]
    );
    io.refresh_routes();
    let events = rec.take();
    assert_eq!(events.len(), 24, "refresh reports every pin");
    assert!(events.contains(&Event::Changed(
        4,
        PinState {
            masked: true,
            ..want
        }
    )));
    assert_eq!(io.pin_state(24), Err(InvalidPin(24)));
}

#[test]
fn edges_deliver_on_rising_lines_of_unmasked_pins_only() {
    let (mut io, rec) = ioapic();
    program(&mut io, 4, EDGE | MASK, 0);
    rec.take();
    io.pulse(4).unwrap();
    assert!(rec.take().is_empty(), "masked");
    write_reg(&mut io, low(4), EDGE);
    assert_eq!(
        rec.deliveries(),
        Vec::<u8>::new(),
        "an edge on a masked pin is not held pending"
    );
    io.set_irq(4, true).unwrap();
    io.set_irq(4, true).unwrap();
    assert_eq!(
        rec.take(),
        [Event::Delivered(
            4,
            MsiMessage {
                address: 0xfee0_0000,
                data: u32::from(VECTOR),
            }
        )],
        "one delivery per rising edge"
    );
    io.set_irq(4, false).unwrap();
    io.pulse(4).unwrap();
    io.pulse(4).unwrap();
    assert_eq!(rec.deliveries(), [4, 4]);
    // An EOI for the vector does nothing for an edge-triggered pin.
    io.end_of_interrupt(VECTOR);
    assert!(rec.take().is_empty());
    assert!(!remote_irr(&mut io, 4));
}

#[test]
fn level_line_sets_remote_irr_and_is_redelivered_at_eoi_while_asserted() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    rec.take();
    io.set_irq(16, true).unwrap();
    let events = rec.take();
    assert_eq!(
        events,
        [Event::Delivered(
            16,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0xc000 | u32::from(VECTOR),
            }
        )]
    );
    assert!(remote_irr(&mut io, 16));
    io.set_irq(16, true).unwrap();
    assert!(rec.take().is_empty(), "remote IRR holds the next one back");
    io.end_of_interrupt(VECTOR + 1);
    assert!(rec.take().is_empty(), "another vector's EOI");
    assert!(remote_irr(&mut io, 16));
    io.end_of_interrupt(VECTOR);
    assert!(matches!(
        rec.take()[..],
        [Event::Eoi(16), Event::Delivered(16, _)]
    ));
    assert!(remote_irr(&mut io, 16), "delivered again");
    io.set_irq(16, false).unwrap();
    io.end_of_interrupt(VECTOR);
    assert_eq!(rec.take(), [Event::Eoi(16)], "deasserted: no re-delivery");
    assert!(!remote_irr(&mut io, 16));
    io.set_irq(16, true).unwrap();
    assert_eq!(rec.deliveries(), [16], "a new assertion delivers at once");
}

#[test]
fn masked_level_line_is_delivered_when_unmasked_if_still_asserted() {
    let (mut io, rec) = ioapic();
    program(&mut io, 17, LEVEL | MASK, 0);
    io.set_irq(17, true).unwrap();
    rec.take();
    assert!(!remote_irr(&mut io, 17), "no side effect while masked");
    write_reg(&mut io, low(17), LEVEL);
    assert!(matches!(
        rec.take()[..],
        [Event::Changed(17, _), Event::Delivered(17, _)]
    ));
    assert!(remote_irr(&mut io, 17));
    // Masked while in service: the EOI clears remote IRR but delivers nothing until unmasked.
    write_reg(&mut io, low(17), LEVEL | MASK);
    io.end_of_interrupt(VECTOR);
    assert!(matches!(
        rec.take()[..],
        [Event::Changed(17, _), Event::Eoi(17)]
    ));
    assert!(!remote_irr(&mut io, 17));
    write_reg(&mut io, low(17), LEVEL);
    assert_eq!(rec.deliveries(), [17]);
    // A line that dropped while masked is not delivered at unmask.
    write_reg(&mut io, low(17), LEVEL | MASK);
    io.end_of_interrupt(VECTOR);
    io.set_irq(17, false).unwrap();
    write_reg(&mut io, low(17), LEVEL);
    assert_eq!(rec.deliveries(), Vec::<u8>::new());
}

#[test]
fn eoi_reaches_every_level_pin_with_the_vector_and_only_those() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    program(&mut io, 20, LEVEL | MASK, 0);
    program(&mut io, 5, EDGE, 0);
    program(&mut io, 21, LEVEL + 1, 0);
    rec.take();
    io.end_of_interrupt(VECTOR);
    assert_eq!(
        rec.take(),
        [Event::Eoi(16), Event::Eoi(20)],
        "level pins with the vector, masked or not; remote IRR was clear: nothing delivered"
    );
}

#[test]
fn eoi_register_acts_as_a_broadcast_eoi_of_its_low_byte() {
    let (mut io, rec) = ioapic();
    program(&mut io, 18, LEVEL, 0);
    io.set_irq(18, true).unwrap();
    rec.take();
    io.write(BASE, IOEOI, &u32::from(VECTOR + 1).to_le_bytes());
    assert!(rec.take().is_empty());
    assert!(remote_irr(&mut io, 18));
    io.write(
        BASE,
        IOEOI,
        &(0xffff_ff00 | u32::from(VECTOR)).to_le_bytes(),
    );
    assert!(matches!(
        rec.take()[..],
        [Event::Eoi(18), Event::Delivered(18, _)]
    ));
    io.set_irq(18, false).unwrap();
    io.write(BASE, IOEOI, &[VECTOR]);
    assert_eq!(rec.take(), [Event::Eoi(18)]);
    assert!(!remote_irr(&mut io, 18));
    let mut b = [0xffu8; 4];
    io.read(BASE, IOEOI, &mut b);
    assert_eq!(b, [0; 4], "the EOI register is write-only");
}

#[test]
fn switching_an_entry_to_edge_clears_remote_irr() {
    let (mut io, rec) = ioapic();
    program(&mut io, 19, LEVEL, 0);
    io.set_irq(19, true).unwrap();
    assert!(remote_irr(&mut io, 19));
    // Linux on IOAPICs without an EOI register: mask, edge, then level again.
    write_reg(&mut io, low(19), EDGE | MASK);
    assert!(!remote_irr(&mut io, 19));
    rec.take();
    write_reg(&mut io, low(19), LEVEL);
    assert!(matches!(
        rec.take()[..],
        [Event::Changed(19, _), Event::Delivered(19, _)]
    ));
    // A level entry rewritten as level keeps its remote IRR.
    write_reg(&mut io, low(19), LEVEL | (1 << 13));
    assert!(remote_irr(&mut io, 19));
}

#[test]
fn delivery_status_always_reads_idle() {
    let (mut io, _) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    io.set_irq(16, true).unwrap();
    assert_eq!(read_reg(&mut io, low(16)) & (1 << 12), 0);
    write_reg(&mut io, low(16), LEVEL | (1 << 12));
    assert_eq!(read_reg(&mut io, low(16)) & (1 << 12), 0);
}

#[test]
fn polarity_does_not_invert_lines() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL | (1 << 13), 0);
    rec.take();
    io.set_irq(16, false).unwrap();
    assert!(rec.take().is_empty());
    io.set_irq(16, true).unwrap();
    assert_eq!(rec.deliveries(), [16]);
}

#[test]
fn remappable_entry_delivers_its_remappable_message() {
    let (mut io, rec) = ioapic();
    // Interrupt index 0x8005: bits 14:0 in 63:49, bit 15 in bit 11; format bit 48.
    let high = (0x0005 << 17) | (1 << 16);
    program(&mut io, 16, LEVEL | (1 << 11), high);
    io.set_irq(16, true).unwrap();
    let delivered = rec
        .take()
        .into_iter()
        .find_map(|e| match e {
            Event::Delivered(16, m) => Some(m),
            _ => None,
        })
        .expect("delivered");
    assert_eq!(delivered.address, 0xfee0_0000 | (0x0005 << 5) | 0x10 | 0x4);
    // The vector still identifies the EOI (VT-d spec 5.1.5.1: it must equal the IRTE's).
    io.end_of_interrupt(VECTOR);
    assert_eq!(rec.deliveries(), [16]);
}

#[test]
fn storm_guard_defers_the_redelivery_after_the_threshold() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    io.set_irq(16, true).unwrap();
    rec.take();
    for n in 1..STORM_THRESHOLD {
        io.end_of_interrupt(VECTOR);
        assert!(remote_irr(&mut io, 16), "re-delivery {n} is immediate");
    }
    rec.take();
    io.end_of_interrupt(VECTOR);
    assert_eq!(
        rec.take(),
        [Event::Eoi(16), Event::Deferred(STORM_DELAY)],
        "the threshold'th re-delivery waits"
    );
    assert!(!remote_irr(&mut io, 16));
    io.service_deferred();
    assert_eq!(rec.deliveries(), [16]);
    assert!(remote_irr(&mut io, 16));
    // The count starts over.
    io.end_of_interrupt(VECTOR);
    assert_eq!(rec.deliveries(), [16]);
    // Nothing deferred: servicing again delivers nothing.
    io.service_deferred();
    assert!(rec.take().is_empty());
}

#[test]
fn storm_count_restarts_when_the_line_drops_or_the_entry_is_written() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    io.set_irq(16, true).unwrap();
    for _ in 1..STORM_THRESHOLD {
        io.end_of_interrupt(VECTOR);
    }
    write_reg(&mut io, low(16), LEVEL);
    rec.take();
    io.end_of_interrupt(VECTOR);
    assert_eq!(rec.deliveries(), [16], "the write reset the count");
    for _ in 1..STORM_THRESHOLD - 1 {
        io.end_of_interrupt(VECTOR);
    }
    io.set_irq(16, false).unwrap();
    io.end_of_interrupt(VECTOR);
    io.set_irq(16, true).unwrap();
    rec.take();
    io.end_of_interrupt(VECTOR);
    assert_eq!(rec.deliveries(), [16], "the quiet EOI reset the count");
}

#[test]
fn deferred_pin_masked_meanwhile_is_not_delivered() {
    let (mut io, rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    io.set_irq(16, true).unwrap();
    for _ in 0..STORM_THRESHOLD {
        io.end_of_interrupt(VECTOR);
    }
    write_reg(&mut io, low(16), LEVEL | MASK);
    rec.take();
    io.service_deferred();
    assert!(rec.take().is_empty());
}

#[test]
fn bad_accesses_and_storms_a_guest_repeats_cannot_flood_the_log() {
    use vm_device::ratelimit::{capture::lines_logged_by, BURST};

    let (mut io, _rec) = ioapic();
    program(&mut io, 16, LEVEL, 0);
    io.set_irq(16, true).unwrap();
    let lines = lines_logged_by(|| {
        for _ in 0..10_000 {
            io.read(BASE, IOEOI, &mut [0u8; 4]);
            io.write(BASE, IOWIN, &[1, 2]);
            write_reg(&mut io, REG_VERSION, 0);
        }
        // Every EOI of the asserted line re-delivers it: 30 storms' worth.
        for _ in 0..30 * STORM_THRESHOLD {
            io.end_of_interrupt(VECTOR);
            io.service_deferred();
        }
    });
    assert!(
        lines.len() <= 4 * BURST as usize,
        "{} lines for 30000 bad accesses and 30 storms",
        lines.len()
    );
}

#[test]
fn pins_past_the_table_are_refused() {
    let (mut io, rec) = ioapic();
    assert_eq!(io.set_irq(24, true), Err(InvalidPin(24)));
    assert_eq!(io.pulse(255), Err(InvalidPin(255)));
    assert!(rec.take().is_empty());
}

#[test]
fn hostile_register_traffic_never_panics_and_keeps_the_invariants() {
    let (mut io, rec) = ioapic();
    // A xorshift sequence over offsets, sizes, selects and values.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let offset = [0x00, 0x10, 0x40, 0x04, 0x13, 0xfff][(r % 6) as usize];
        let len = [1, 2, 4, 8][((r >> 8) % 4) as usize];
        let bytes = next().to_le_bytes();
        if (r >> 16) & 1 == 0 {
            io.write(BASE, offset, &bytes[..len]);
        } else {
            let mut b = vec![0u8; len];
            io.read(BASE, offset, &mut b);
        }
        let pin = ((r >> 24) % 24) as u8;
        io.set_irq(pin, (r >> 32) & 1 == 1).unwrap();
        if (r >> 33) & 1 == 1 {
            io.end_of_interrupt((r >> 40) as u8);
        }
    }
    for pin in 0..24u8 {
        let e = entry(&mut io, pin);
        assert_eq!(
            e & 0x0000_ffff_fffe_1000,
            0,
            "pin {pin}: reserved or status bits set"
        );
        if e & (1 << 15) == 0 {
            assert_eq!(e & (1 << 14), 0, "pin {pin}: remote IRR on an edge entry");
        }
    }
    rec.take();
}
