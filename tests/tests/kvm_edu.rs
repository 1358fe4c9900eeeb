//! The emulated edu (`--edu`, `Vmm::add_edu`) driven by a small guest of ours on this machine's
//! KVM, with each irqchip: the guest finds edu at 00:01.0 with BAR0 placed and decoding and its
//! interrupt line set (as firmware leaves them; the guest sets neither), checks liveness,
//! computes a factorial whose completion interrupt arrives as INTx through the IOAPIC pin the
//! line names (KVM's IOAPIC, or ours with the split irqchip), then enables MSI and takes a
//! raised interrupt and a DMA's completion interrupt as MSIs; each handler reads the interrupt
//! status and acknowledges it, which lowers INTx before the EOI.
//!
//! Without /dev/kvm these tests skip loudly, and fail when CI=true.

use std::time::Duration;

use iced_x86::code_asm::*;
use integration::small_guest::edu::*;
use integration::small_guest::{
    asm64, idt_gate, kvm_available, load_idt_and_enable_apic, power_off, read_u32, read_u64,
    take_pending, wait_for_count, Capture, CODE, IOAPIC_SEL, IOAPIC_WIN, RESULTS,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::{BootSource, CpuMode, Irqchip, MachineConfig, SerialIn, VmExit, Vmm};

const IDT: u64 = 0x31_0000;
const IDTR: u64 = 0x31_1000;
/// RAM the DMA reads.
const DMA_SRC: u64 = 0x40_0000;
const INTX_VECTOR: u32 = 0x61;
const MSI_VECTOR: u32 = 0x62;
/// Redirection entry bits: active low, level-triggered (what the `_PRT` says for PCI INTx).
const RTE_ACTIVE_LOW: u32 = 1 << 13;
const RTE_LEVEL: u32 = 1 << 15;

// Results, at RESULTS: what the guest saw.
const R_INTX_COUNT: u64 = RESULTS;
const R_MSI_COUNT: u64 = RESULTS + 8;
const R_BAR0: u64 = RESULTS + 16;
const R_LINE_PIN: u64 = RESULTS + 20;
const R_COMMAND: u64 = RESULTS + 24;
const R_LIVENESS: u64 = RESULTS + 28;
const R_FACTORIAL: u64 = RESULTS + 32;
const R_INTX_STATUS: u64 = RESULTS + 36;
/// One dword an MSI: the interrupt status its handler read.
const R_MSI_STATUS: u64 = RESULTS + 40;
/// INTx deliveries that found edu's status already clear (see `edu::level_handler`).
const R_INTX_SPURIOUS: u64 = RESULTS + 56;

fn guest() -> Vec<u8> {
    asm64(|a| {
        let mut on_intx = a.create_label();
        let mut on_msi = a.create_label();
        idt_gate(a, IDT, u64::from(INTX_VECTOR), on_intx)?;
        idt_gate(a, IDT, u64::from(MSI_VECTOR), on_msi)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        // What firmware left: BAR0, the interrupt line, the command register.
        load_bar0(a, r12d)?;
        a.mov(rbx, R_BAR0)?;
        a.mov(dword_ptr(rbx), eax)?;
        select(a, CFG_INTERRUPT_LINE)?;
        a.in_(eax, dx)?;
        a.mov(rbx, R_LINE_PIN)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.movzx(r13d, al)?; // the IOAPIC pin
        select(a, CFG_COMMAND)?;
        a.in_(eax, dx)?;
        a.mov(rbx, R_COMMAND)?;
        a.mov(dword_ptr(rbx), eax)?;
        // Bus mastering, as a driver turns it on (kvm-unit-tests' pci_enable_defaults).
        a.or(eax, COMMAND_BUS_MASTER)?;
        a.out(dx, ax)?;
        // Liveness.
        a.mov(dword_ptr(r12 + EDU_LIVENESS), 0x1234u32)?;
        a.mov(eax, dword_ptr(r12 + EDU_LIVENESS))?;
        a.mov(rbx, R_LIVENESS)?;
        a.mov(dword_ptr(rbx), eax)?;
        // INTx on the line's pin: level, active low, vector INTX_VECTOR, to APIC 0.
        a.mov(rbx, IOAPIC_SEL)?;
        a.mov(rcx, IOAPIC_WIN)?;
        a.lea(eax, dword_ptr(r13 * 2 + 0x11))?;
        a.mov(dword_ptr(rbx), eax)?;
        a.mov(dword_ptr(rcx), 0u32)?;
        a.lea(eax, dword_ptr(r13 * 2 + 0x10))?;
        a.mov(dword_ptr(rbx), eax)?;
        a.mov(dword_ptr(rcx), RTE_LEVEL | RTE_ACTIVE_LOW | INTX_VECTOR)?;
        // A factorial that interrupts when done.
        a.mov(dword_ptr(r12 + EDU_STATUS), 0x80u32)?;
        a.mov(dword_ptr(r12 + EDU_FACTORIAL), 5u32)?;
        wait_for_count(a, R_INTX_COUNT, 1)?;
        a.mov(eax, dword_ptr(r12 + EDU_FACTORIAL))?;
        a.mov(rbx, R_FACTORIAL)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.mov(dword_ptr(r12 + EDU_STATUS), 0u32)?;
        // MSI: address 0xfee00000 (APIC 0), data MSI_VECTOR, then enable (capability at 0x40).
        select(a, CFG_MSI_ADDRESS_LO)?;
        a.mov(eax, 0xfee0_0000u32)?;
        a.out(dx, eax)?;
        select(a, CFG_MSI_ADDRESS_HI)?;
        a.xor(eax, eax)?;
        a.out(dx, eax)?;
        select(a, CFG_MSI_DATA)?;
        a.mov(eax, MSI_VECTOR)?;
        a.out(dx, eax)?;
        select(a, CFG_MSI_CONTROL)?;
        a.in_(eax, dx)?;
        a.or(eax, MSI_ENABLE)?;
        a.out(dx, eax)?;
        // A raised interrupt, then a DMA from RAM to the buffer that interrupts when done.
        a.mov(dword_ptr(r12 + EDU_IRQ_RAISE), 0x10u32)?;
        wait_for_count(a, R_MSI_COUNT, 1)?;
        a.mov(rax, DMA_SRC)?;
        a.mov(qword_ptr(r12 + EDU_DMA_SRC), rax)?;
        a.mov(rax, 0x4_0000u64)?;
        a.mov(qword_ptr(r12 + EDU_DMA_DST), rax)?;
        a.mov(qword_ptr(r12 + EDU_DMA_COUNT), 64)?;
        a.mov(qword_ptr(r12 + EDU_DMA_CMD), 0x5)?;
        wait_for_count(a, R_MSI_COUNT, 2)?;
        // Anything still pending comes in now (and would be counted).
        take_pending(a)?;
        power_off(a)?;
        a.set_label(&mut on_intx)?;
        level_handler(a, r12, R_INTX_COUNT, R_INTX_SPURIOUS, R_INTX_STATUS)?;
        a.set_label(&mut on_msi)?;
        handler(a, r12, R_MSI_COUNT, R_MSI_STATUS, true)
    })
}

fn run(irqchip: Irqchip) {
    let out = Capture::default();
    let vmm = Vmm::build(MachineConfig {
        vcpus: 1,
        memory_size: 64 << 20,
        boot: BootSource::RawWithIrqchip {
            image: guest(),
            load_addr: CODE,
            mode: CpuMode::LongMode { rip: CODE },
        },
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        viommu: None,
        devices: Vec::new(),
        irqchip,
    })
    .expect("build the VM");
    let source = vmm.add_edu().expect("add edu");
    assert_eq!(source.to_string(), "00:01.0");
    let mem = vmm.guest_memory().clone();
    mem.write_slice(&[0x5a; 64], GuestAddress(DMA_SRC))
        .expect("the DMA source is guest RAM");
    let exit = vmm.exit_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        exit.request(VmExit::Failed("no power-off within 20 s".into()));
    });
    assert_eq!(vmm.run().expect("run"), VmExit::PowerOff, "{irqchip:?}");
    let what = format!("{irqchip:?}");
    let bar0 = read_u32(&mem, R_BAR0);
    assert!(
        (0xc000_0000..0xe000_0000).contains(&bar0) && bar0.is_multiple_of(1 << 20),
        "{what}: BAR0 {bar0:#x} placed in the 32-bit window"
    );
    let line_pin = read_u32(&mem, R_LINE_PIN);
    assert_eq!(
        line_pin & 0xffff,
        0x0111,
        "{what}: INTA#, line 17 (the _PRT's GSI for slot 1)"
    );
    assert_eq!(
        read_u32(&mem, R_COMMAND) & 0x6,
        0x2,
        "{what}: memory decoding on, bus mastering off"
    );
    assert_eq!(read_u32(&mem, R_LIVENESS), !0x1234, "{what}: liveness");
    assert_eq!(read_u32(&mem, R_FACTORIAL), 120, "{what}: 5!");
    assert_eq!(
        read_u64(&mem, R_INTX_COUNT),
        1,
        "{what}: one INTx, lowered by the acknowledge"
    );
    // At most the one redelivery this machine's KVM makes when its early EOI overtakes the
    // acknowledge; a line the acknowledge did not lower would come back at every EOI.
    assert!(
        read_u64(&mem, R_INTX_SPURIOUS) <= 1,
        "{what}: {} INTx deliveries after the acknowledge",
        read_u64(&mem, R_INTX_SPURIOUS)
    );
    assert_eq!(
        read_u32(&mem, R_INTX_STATUS),
        0x1,
        "{what}: the factorial's interrupt"
    );
    assert_eq!(
        read_u64(&mem, R_MSI_COUNT),
        2,
        "{what}: two MSIs, no INTx once MSI is on"
    );
    assert_eq!(
        [
            read_u32(&mem, R_MSI_STATUS),
            read_u32(&mem, R_MSI_STATUS + 4)
        ],
        [0x10, 0x100],
        "{what}: the raised interrupt, then the DMA's"
    );
}

#[test]
fn edu_interrupts_reach_the_guest_as_intx_through_kvms_ioapic_and_as_msis() {
    if kvm_available() {
        run(Irqchip::Kernel);
    }
}

#[test]
fn edu_interrupts_reach_the_guest_as_intx_through_our_ioapic_and_as_msis() {
    if kvm_available() {
        run(Irqchip::Split);
    }
}
