use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};

use super::dma::{BUFFER_ADDR, DEFAULT_DMA_MASK};
use super::*;
use vm_device::pci::spec::{
    PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_COMMAND_MEMORY, PCI_INTERRUPT_LINE, PCI_MSI_FLAGS_ENABLE,
    PCI_STATUS_CAP_LIST, PCI_STATUS_INTERRUPT,
};

/// edu's requester id: 00:01.0.
fn source() -> SourceId {
    SourceId::new(0, 1, 0)
}

const MSI_ADDRESS: u64 = 0xfee0_1000;
const MSI_DATA: u16 = 0x4031;

/// The MSIs edu sent (its sender is bound to its requester id, as the device manager's are).
#[derive(Clone, Default)]
struct Msis(Arc<Mutex<Vec<MsiMessage>>>);

impl MsiSender for Msis {
    fn send(&self, message: MsiMessage) {
        self.0.lock().unwrap().push(message);
    }
}

impl Msis {
    fn sent(&self) -> Vec<MsiMessage> {
        self.0.lock().unwrap().clone()
    }
}

/// The levels edu drove its INTx wire to, one entry a change.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<bool>>>);

impl IrqLine for Wire {
    fn set_level(&self, asserted: bool) {
        self.0.lock().unwrap().push(asserted);
    }
}

impl Wire {
    fn levels(&self) -> Vec<bool> {
        self.0.lock().unwrap().clone()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
}

/// An edu on `mem` (no VT-d) with recorded MSIs and INTx, bus mastering on.
fn edu_on(mem: GuestMemoryMmap) -> (Edu, Msis, Wire) {
    let (msis, wire) = (Msis::default(), Wire::default());
    let interrupts = EduInterrupts {
        msi: Arc::new(msis.clone()),
        intx: Some(Box::new(wire.clone())),
    };
    let mut e = Edu::new(mem, source(), None, interrupts);
    command(&mut e, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    (e, msis, wire)
}

fn edu() -> (Edu, Msis, Wire) {
    edu_on(mem())
}

fn read32(e: &mut Edu, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn read64(e: &mut Edu, off: u64) -> u64 {
    let mut b = [0u8; 8];
    e.read_bar(0, off, &mut b);
    u64::from_le_bytes(b)
}

fn write32(e: &mut Edu, off: u64, v: u32) {
    e.write_bar(0, off, &v.to_le_bytes());
}

fn write64(e: &mut Edu, off: u64, v: u64) {
    e.write_bar(0, off, &v.to_le_bytes());
}

fn config_write(e: &mut Edu, at: usize, data: &[u8]) -> Vec<BarMove> {
    e.write_config_register(at / 4, at % 4, data)
}

fn config_read(e: &mut Edu, at: usize) -> u32 {
    e.read_config_register(at / 4)
}

fn command(e: &mut Edu, bits: u16) {
    config_write(e, PCI_COMMAND, &bits.to_le_bytes());
}

/// Programs the MSI capability (64-bit) with MSI_ADDRESS/MSI_DATA and enables it, as
/// kvm-unit-tests' `pci_setup_msi` does.
fn enable_msi(e: &mut Edu) {
    let cap = usize::from(MSI_CAP_OFFSET);
    config_write(e, cap + 4, &(MSI_ADDRESS as u32).to_le_bytes());
    config_write(e, cap + 8, &((MSI_ADDRESS >> 32) as u32).to_le_bytes());
    config_write(e, cap + 12, &u32::from(MSI_DATA).to_le_bytes());
    config_write(e, cap + 2, &PCI_MSI_FLAGS_ENABLE.to_le_bytes());
}

#[test]
fn identifies_itself_and_answers_liveness_with_the_complement() {
    let (mut e, _, _) = edu();
    assert_eq!(read32(&mut e, REG_ID), 0x0100_00ed);
    write32(&mut e, REG_LIVENESS, 0x1234);
    assert_eq!(read32(&mut e, REG_LIVENESS), !0x1234);
    write32(&mut e, REG_ID, 0);
    assert_eq!(read32(&mut e, REG_ID), 0x0100_00ed, "read-only");
}

#[test]
fn accesses_edu_does_not_take_read_all_ones_and_write_nothing() {
    let (mut e, _, _) = edu();
    // Below 0x80 only 4-byte accesses; 8 bytes at the ID or liveness register is none.
    assert_eq!(read64(&mut e, REG_ID), u64::MAX);
    let mut two = [0u8; 2];
    e.read_bar(0, REG_ID, &mut two);
    assert_eq!(two, [0xff; 2]);
    e.write_bar(0, REG_LIVENESS, &[1, 2]);
    e.write_bar(0, REG_LIVENESS, &7u64.to_le_bytes());
    assert_eq!(read32(&mut e, REG_LIVENESS), 0, "neither write took");
    // Offsets that are no register, the write-only ones and the middle of a DMA register.
    for off in [0x0c, 0x60, 0x64, 0x84, 0xa0, BUFFER_ADDR, EDU_BAR0_SIZE - 4] {
        assert_eq!(read32(&mut e, off), u32::MAX, "offset {off:#x}");
    }
    // The device buffer is reached by DMA only, not through BAR0 (as QEMU's edu).
    write32(&mut e, BUFFER_ADDR, 0x1234);
    assert_eq!(read32(&mut e, BUFFER_ADDR), u32::MAX);
}

#[test]
fn dma_registers_take_4_and_8_byte_accesses_and_4_byte_writes_zero_extend() {
    let (mut e, _, _) = edu();
    write64(&mut e, REG_DMA_SRC, 0x1_2345_6789);
    assert_eq!(read64(&mut e, REG_DMA_SRC), 0x1_2345_6789);
    assert_eq!(read32(&mut e, REG_DMA_SRC), 0x2345_6789, "the low half");
    write32(&mut e, REG_DMA_SRC, 0xabcd);
    assert_eq!(read64(&mut e, REG_DMA_SRC), 0xabcd);
    write64(&mut e, REG_DMA_DST, 7);
    write64(&mut e, REG_DMA_COUNT, 9);
    assert_eq!(
        (read64(&mut e, REG_DMA_DST), read64(&mut e, REG_DMA_COUNT)),
        (7, 9)
    );
}

#[test]
fn factorial_is_computed_modulo_2_32_and_ready_at_once() {
    let (mut e, _, _) = edu();
    for (n, want) in [
        (0, 1),
        (1, 1),
        (5, 120),
        (12, 479_001_600),
        // 13! = 6227020800, which wraps in edu's 32-bit unit.
        (13, (6_227_020_800u64 % (1 << 32)) as u32),
        (33, 0x8000_0000),
        (34, 0),
        (u32::MAX, 0),
    ] {
        write32(&mut e, REG_FACTORIAL, n);
        assert_eq!(read32(&mut e, REG_STATUS) & STATUS_COMPUTING, 0);
        assert_eq!(read32(&mut e, REG_FACTORIAL), want, "{n}!");
    }
    assert_eq!(
        factorial(20),
        (2_432_902_008_176_640_000u64 % (1 << 32)) as u32
    );
}

#[test]
fn factorial_raises_its_interrupt_only_when_the_status_register_asks() {
    let (mut e, _, wire) = edu();
    write32(&mut e, REG_FACTORIAL, 4);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 0, "not asked");
    write32(&mut e, REG_STATUS, STATUS_IRQ_FACTORIAL | STATUS_COMPUTING);
    assert_eq!(
        read32(&mut e, REG_STATUS),
        STATUS_IRQ_FACTORIAL,
        "the computing bit is read-only"
    );
    write32(&mut e, REG_FACTORIAL, 4);
    assert_eq!(read32(&mut e, REG_FACTORIAL), 24);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), IRQ_FACTORIAL);
    assert_eq!(wire.levels(), [true]);
    write32(&mut e, REG_IRQ_ACK, IRQ_FACTORIAL);
    write32(&mut e, REG_STATUS, 0);
    write32(&mut e, REG_FACTORIAL, 3);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 0);
    assert_eq!(wire.levels(), [true, false]);
}

#[test]
fn intx_is_a_level_held_until_every_raised_bit_is_acknowledged() {
    let (mut e, msis, wire) = edu();
    assert_eq!(
        config_read(&mut e, PCI_INTERRUPT_LINE) >> 8 & 0xff,
        1,
        "INTA#"
    );
    write32(&mut e, REG_IRQ_RAISE, 0);
    assert!(wire.levels().is_empty(), "raising nothing raises nothing");
    write32(&mut e, REG_IRQ_RAISE, 0x5);
    write32(&mut e, REG_IRQ_RAISE, 0x10);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 0x15);
    assert_eq!(wire.levels(), [true], "asserted once, held");
    let status = |e: &mut Edu| (config_read(e, PCI_COMMAND) >> 16) as u16;
    assert_ne!(status(&mut e) & PCI_STATUS_INTERRUPT, 0);
    write32(&mut e, REG_IRQ_ACK, 0x4);
    assert_eq!(wire.levels(), [true], "bits still pending");
    write32(&mut e, REG_IRQ_ACK, 0x11);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 0);
    assert_eq!(wire.levels(), [true, false]);
    assert_eq!(status(&mut e) & PCI_STATUS_INTERRUPT, 0);
    assert!(msis.sent().is_empty(), "no MSI while it is disabled");
}

#[test]
fn interrupt_disable_holds_the_wire_off_but_not_the_interrupt_status() {
    let (mut e, _, wire) = edu();
    command(
        &mut e,
        PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
    );
    write32(&mut e, REG_IRQ_RAISE, 1);
    assert!(wire.levels().is_empty());
    let status = (config_read(&mut e, PCI_COMMAND) >> 16) as u16;
    assert_ne!(status & PCI_STATUS_INTERRUPT, 0, "still requested");
    command(&mut e, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    assert_eq!(wire.levels(), [true], "asserted once allowed");
    command(
        &mut e,
        PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
    );
    assert_eq!(wire.levels(), [true, false]);
}

#[test]
fn msi_capability_is_the_one_capability_64_bit_with_one_vector() {
    let (mut e, _, _) = edu();
    let status = (config_read(&mut e, PCI_COMMAND) >> 16) as u16;
    assert_ne!(status & PCI_STATUS_CAP_LIST, 0);
    assert_eq!(config_read(&mut e, PCI_CAPABILITY_LIST) & 0xff, 0x40);
    let header = config_read(&mut e, 0x40);
    assert_eq!(header & 0xffff, 0x0005, "MSI, no next capability");
    assert_eq!(
        (header >> 16) as u16,
        PCI_MSI_FLAGS_64BIT,
        "64-bit, one vector, no masking, disabled"
    );
    enable_msi(&mut e);
    assert_eq!(config_read(&mut e, 0x44), MSI_ADDRESS as u32);
    assert_eq!(config_read(&mut e, 0x4c), u32::from(MSI_DATA));
    assert_eq!(config_read(&mut e, 0x40) >> 16 & 1, 1, "enabled");
}

#[test]
fn with_msi_enabled_each_raise_sends_one_message_and_intx_stays_down() {
    let (mut e, msis, wire) = edu();
    write32(&mut e, REG_IRQ_RAISE, 1);
    assert_eq!(wire.levels(), [true]);
    // Enabling MSI takes the pending interrupt off INTx (PCI 3.0, 6.8.3.3: never both).
    enable_msi(&mut e);
    assert_eq!(wire.levels(), [true, false]);
    write32(&mut e, REG_IRQ_ACK, 1);
    write32(&mut e, REG_IRQ_RAISE, 0x2);
    write32(&mut e, REG_IRQ_RAISE, 0x2);
    let one = MsiMessage::new(MSI_ADDRESS, u32::from(MSI_DATA));
    assert_eq!(
        msis.sent(),
        [one, one],
        "one message a raise, as QEMU's edu"
    );
    write32(&mut e, REG_IRQ_ACK, 0x2);
    assert_eq!(msis.sent().len(), 2, "acknowledging sends nothing");
    assert_eq!(wire.levels(), [true, false]);
    // MSI off with an interrupt pending: it shows on INTx again.
    write32(&mut e, REG_IRQ_RAISE, 0x8);
    config_write(&mut e, 0x42, &0u16.to_le_bytes());
    assert_eq!(wire.levels(), [true, false, true]);
}

#[test]
fn msi_needs_bus_mastering() {
    let (mut e, msis, wire) = edu();
    enable_msi(&mut e);
    command(&mut e, PCI_COMMAND_MEMORY);
    write32(&mut e, REG_IRQ_RAISE, 1);
    assert!(msis.sent().is_empty(), "an MSI is a memory write");
    assert!(wire.levels().is_empty());
    command(&mut e, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    write32(&mut e, REG_IRQ_RAISE, 1);
    assert_eq!(msis.sent().len(), 1);
}

#[test]
fn without_an_interrupt_controller_edu_reports_no_pin() {
    let interrupts = EduInterrupts {
        msi: Arc::new(Msis::default()),
        intx: None,
    };
    let mut e = Edu::new(mem(), source(), None, interrupts);
    assert_eq!(config_read(&mut e, PCI_INTERRUPT_LINE) >> 8 & 0xff, 0);
    write32(&mut e, REG_IRQ_RAISE, 1);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 1);
}

/// Starts a DMA of `len` bytes from `src` to `dst` with command `cmd` (start added).
fn dma(e: &mut Edu, src: u64, dst: u64, len: u64, cmd: u64) {
    write64(e, REG_DMA_SRC, src);
    write64(e, REG_DMA_DST, dst);
    write64(e, REG_DMA_COUNT, len);
    write64(e, REG_DMA_CMD, cmd | DMA_CMD_START);
}

#[test]
fn dma_without_an_iommu_copies_ram_to_the_buffer_and_back() {
    let m = mem();
    m.write_slice(&[7u8; 100], GuestAddress(0x1ff0)).unwrap();
    let (mut e, _, _) = edu_on(m.clone());
    dma(&mut e, 0x1ff0, BUFFER_ADDR, 100, 0);
    dma(&mut e, BUFFER_ADDR, 0x8000, 100, DMA_CMD_TO_RAM);
    let mut back = [0u8; 100];
    m.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
    assert_eq!(back, [7u8; 100]);
    assert_eq!(
        read32(&mut e, REG_DMA_CMD),
        DMA_CMD_TO_RAM as u32,
        "done: the start bit reads clear, the rest as written"
    );
    write64(&mut e, REG_DMA_CMD, DMA_CMD_IRQ);
    assert_eq!(
        read32(&mut e, REG_DMA_CMD),
        DMA_CMD_TO_RAM as u32,
        "a command without start is not taken"
    );
}

#[test]
fn dma_reaches_only_the_addresses_of_edus_28_bit_mask() {
    let m = mem();
    m.write_slice(&[9u8; 16], GuestAddress(0x3000)).unwrap();
    let (mut e, _, _) = edu_on(m.clone());
    dma(&mut e, (DEFAULT_DMA_MASK + 1) | 0x3000, BUFFER_ADDR, 16, 0);
    dma(&mut e, BUFFER_ADDR, 0x5000, 16, DMA_CMD_TO_RAM);
    let mut back = [0u8; 16];
    m.read_slice(&mut back, GuestAddress(0x5000)).unwrap();
    assert_eq!(back, [9u8; 16], "address bits above the mask are dropped");
}

#[test]
fn dma_completion_raises_its_interrupt_when_the_command_asks() {
    let (mut e, msis, wire) = edu();
    dma(&mut e, 0x1000, BUFFER_ADDR, 8, 0);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), 0);
    dma(&mut e, 0x1000, BUFFER_ADDR, 8, DMA_CMD_IRQ);
    assert_eq!(read32(&mut e, REG_IRQ_STATUS), IRQ_DMA);
    assert_eq!(wire.levels(), [true]);
    write32(&mut e, REG_IRQ_ACK, IRQ_DMA);
    enable_msi(&mut e);
    dma(&mut e, BUFFER_ADDR, 0x2000, 8, DMA_CMD_TO_RAM | DMA_CMD_IRQ);
    assert_eq!(
        msis.sent(),
        [MsiMessage::new(MSI_ADDRESS, u32::from(MSI_DATA))]
    );
    // A transfer that moves nothing (outside the buffer) still completes and interrupts.
    dma(
        &mut e,
        BUFFER_ADDR + 4000,
        0x2000,
        200,
        DMA_CMD_TO_RAM | DMA_CMD_IRQ,
    );
    assert_eq!(msis.sent().len(), 2);
    assert_eq!(read32(&mut e, REG_DMA_CMD) & DMA_CMD_START as u32, 0);
}

#[test]
fn dma_with_bus_mastering_off_moves_nothing() {
    let m = mem();
    m.write_slice(&[5u8; 8], GuestAddress(0x1000)).unwrap();
    let (mut e, _, _) = edu_on(m.clone());
    command(&mut e, PCI_COMMAND_MEMORY);
    dma(&mut e, 0x1000, BUFFER_ADDR, 8, 0);
    command(&mut e, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    dma(&mut e, BUFFER_ADDR, 0x4000, 8, DMA_CMD_TO_RAM);
    let mut back = [1u8; 8];
    m.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
    assert_eq!(back, [0u8; 8], "the buffer never got the bytes");
}

#[test]
fn dma_outside_the_buffer_or_guest_ram_is_dropped_without_panic() {
    let (mut e, _, _) = edu();
    dma(&mut e, u64::MAX - 4, BUFFER_ADDR + 4000, 200, 0);
    dma(&mut e, u64::MAX - 4, BUFFER_ADDR, 200, 0);
    dma(&mut e, BUFFER_ADDR, 0x10, u64::MAX, DMA_CMD_TO_RAM);
    dma(&mut e, BUFFER_ADDR, DEFAULT_DMA_MASK, 4096, DMA_CMD_TO_RAM);
}

#[test]
fn a_guest_repeating_bad_dmas_cannot_flood_the_log() {
    use vm_device::ratelimit::{capture::lines_logged_by, BURST};
    let (mut e, _, _) = edu();
    let lines = lines_logged_by(|| {
        for _ in 0..10_000 {
            dma(&mut e, 0, BUFFER_ADDR + 4000, 200, 0); // outside the buffer
            dma(&mut e, 2 << 20, BUFFER_ADDR, 200, 0); // not guest RAM
        }
    });
    assert!(
        lines.len() <= 2 * BURST as usize,
        "{} lines for 20000 bad DMAs",
        lines.len()
    );
}

#[test]
fn config_writes_outside_the_capability_reach_the_header() {
    let (mut e, _, _) = edu();
    config_write(&mut e, PCI_INTERRUPT_LINE, &[17]);
    assert_eq!(config_read(&mut e, PCI_INTERRUPT_LINE) & 0xff, 17);
    // A malformed access inside the capability is dropped.
    config_write(&mut e, 0x43, &[1, 2]);
    assert_eq!(config_read(&mut e, 0x40) >> 16 & 1, 0);
}

#[path = "ats_tests.rs"]
mod ats;
