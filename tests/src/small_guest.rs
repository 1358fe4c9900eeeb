//! Small guests of our own on this machine's KVM: code assembled with iced-x86 at test time and
//! run through the vmm library. Without /dev/kvm the tests skip loudly, and fail when CI=true.
//!
//! [`edu`] drives the emulated edu, [`vtd`] programs our VT-d's interrupt remapping.

pub mod edu;
pub mod vtd;

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use iced_x86::code_asm::{
    al, dword_ptr, dx, eax, qword_ptr, rax, rbx, rcx, CodeAssembler, CodeLabel, IcedError,
};
use iced_x86::BlockEncoderOptions;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::ViommuConfig;
use vmm::devices::bus::BusDevice;
use vmm::devices::ioapic::{self, SharedIoapic};
use vmm::{BootSource, CpuMode, Irqchip, MachineConfig, SerialIn, VmExit, Vmm};

/// Where 64-bit test code is loaded and entered.
pub const CODE: u64 = 0x10_0000;
/// Scratch RAM the guest stores results to.
pub const RESULTS: u64 = 0x20_0000;
/// IOAPIC register select and window (82093AA datasheet, 3.0); redirection entry N is
/// registers 0x10 + 2N (low: vector, bit 13 active low, bit 15 level, bit 16 mask) and
/// 0x11 + 2N (destination).
pub const IOAPIC_SEL: u64 = 0xfec0_0000;
pub const IOAPIC_WIN: u64 = 0xfec0_0010;
/// The local APIC's EOI register (Intel SDM Vol. 3, 11.4.1).
pub const LAPIC_EOI: u64 = 0xfee0_00b0;
/// ACPI PM1a control port and the S5 + SLP_EN value the vmm powers off on.
pub const PM1A_CNT: u32 = 0x3c0;
pub const SLP_S5: u32 = (5 << 2) | 0x20;

/// Returns false (after saying why) when the tests cannot run here; panics under CI.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    let msg = "/dev/kvm is missing: the direct KVM small-guest tests cannot run";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// The guest's serial output, captured.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Reads a u32 the guest stored in RAM.
pub fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).expect("guest RAM read")
}

/// Reads a u64 the guest stored in RAM.
pub fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).expect("guest RAM read")
}

/// Assembles `f`'s 64-bit code at [`CODE`].
pub fn asm64(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    f(&mut a).expect("test code assembles");
    a.assemble(CODE).expect("test code assembles")
}

/// Assembles `f`'s 64-bit code at [`CODE`], with the addresses of the labels `f` returns.
pub fn asm64_labels<const N: usize>(
    f: impl FnOnce(&mut CodeAssembler) -> Result<[CodeLabel; N], IcedError>,
) -> (Vec<u8>, [u64; N]) {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    let labels = f(&mut a).expect("test code assembles");
    let r = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .expect("test code assembles");
    let ips = labels.map(|l| r.label_ip(&l).expect("a label of this code"));
    (r.inner.code_buffer, ips)
}

/// Emits code printing `s` on COM1.
pub fn print(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, 0x3f8u32)?;
    for b in s.bytes() {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Emits code that writes a 64-bit interrupt gate for `vector` to `handler` into the IDT at
/// `idt` (Intel SDM Vol. 3, 6.14.1). Clobbers rax, rbx, cx.
pub fn idt_gate(
    a: &mut CodeAssembler,
    idt: u64,
    vector: u64,
    handler: iced_x86::code_asm::CodeLabel,
) -> Result<(), IcedError> {
    use iced_x86::code_asm::{ax, cs, cx, dword_ptr, eax, ptr, rax, rbx, word_ptr};
    a.lea(rax, ptr(handler))?;
    a.mov(rbx, idt + vector * 16)?;
    a.mov(word_ptr(rbx), ax)?;
    a.mov(cx, cs)?;
    a.mov(word_ptr(rbx + 2), cx)?;
    a.mov(word_ptr(rbx + 4), 0x8e00u32)?;
    a.shr(rax, 16u32)?;
    a.mov(word_ptr(rbx + 6), ax)?;
    a.shr(rax, 16u32)?;
    a.mov(dword_ptr(rbx + 8), eax)?;
    a.mov(dword_ptr(rbx + 12), 0u32)
}

/// Emits code that loads the IDT at `idt` through a descriptor written at `idtr`, and
/// software-enables the local APIC (spurious-vector register, SDM Vol. 3, 11.9). Clobbers rax,
/// rbx.
pub fn load_idt_and_enable_apic(
    a: &mut CodeAssembler,
    idt: u64,
    idtr: u64,
) -> Result<(), IcedError> {
    use iced_x86::code_asm::{dword_ptr, ptr, qword_ptr, rax, rbx, word_ptr};
    a.mov(rbx, idtr)?;
    a.mov(word_ptr(rbx), 0xfffu32)?;
    a.mov(rax, idt)?;
    a.mov(qword_ptr(rbx + 2), rax)?;
    a.lidt(ptr(rbx))?;
    a.mov(rbx, 0xfee0_00f0u64)?;
    a.mov(dword_ptr(rbx), 0x1ffu32)
}

/// Emits code writing `high` then `low` (as Linux does) to IOAPIC redirection entry `pin`.
/// Clobbers rbx, rcx.
pub fn program_entry(
    a: &mut CodeAssembler,
    pin: u32,
    low: u32,
    high: u32,
) -> Result<(), IcedError> {
    a.mov(rbx, IOAPIC_SEL)?;
    a.mov(rcx, IOAPIC_WIN)?;
    a.mov(dword_ptr(rbx), 0x11 + 2 * pin)?;
    a.mov(dword_ptr(rcx), high)?;
    a.mov(dword_ptr(rbx), 0x10 + 2 * pin)?;
    a.mov(dword_ptr(rcx), low)
}

/// Emits code reading the low half of IOAPIC entry `pin` into eax. Clobbers rbx, rcx.
pub fn read_entry(a: &mut CodeAssembler, pin: u32) -> Result<(), IcedError> {
    a.mov(rbx, IOAPIC_SEL)?;
    a.mov(rcx, IOAPIC_WIN)?;
    a.mov(dword_ptr(rbx), 0x10 + 2 * pin)?;
    a.mov(eax, dword_ptr(rcx))
}

/// Emits a wait, interrupts on, until the u64 at `counter` reaches `n`; interrupts are off
/// after it. Clobbers rax.
pub fn wait_for_count(a: &mut CodeAssembler, counter: u64, n: i32) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.mov(rax, counter)?;
    a.cmp(qword_ptr(rax), n)?;
    a.jae(done)?;
    // STI's shadow covers the HLT: no wake-up is lost between the check and the halt.
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)
}

/// Emits a short window with interrupts on: anything still pending comes in now (and is
/// counted by its handler). Interrupts are off after it.
pub fn take_pending(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.sti()?;
    for _ in 0..64 {
        a.pause()?;
    }
    a.cli()
}

/// Emits a handler that counts into the u64 at `counter` and signals end of interrupt.
pub fn counting_handler(a: &mut CodeAssembler, counter: u64) -> Result<(), IcedError> {
    a.push(rax)?;
    a.mov(rax, counter)?;
    a.inc(qword_ptr(rax))?;
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rax)?;
    a.iretq()
}

/// Emits an ACPI power-off (S5 through PM1a control), repeated should the write return.
pub fn power_off(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut off = a.create_label();
    a.set_label(&mut off)?;
    a.mov(dx, PM1A_CNT)?;
    a.mov(al, SLP_S5)?;
    a.out(dx, al)?;
    a.hlt()?;
    a.jmp(off)
}

/// A test device whose register drives an input line of the split irqchip's IOAPIC from guest
/// writes (1: asserted, 0: not): the model's own delivery path, as an emulated device's line.
pub struct IoapicLineDriver {
    pub ioapic: SharedIoapic,
    pub pin: u8,
    /// Every value written, in order.
    pub writes: Arc<Mutex<Vec<u8>>>,
}

impl BusDevice for IoapicLineDriver {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let level = data.first().copied().unwrap_or(0);
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(level);
        ioapic::lock(&self.ioapic)
            .set_irq(self.pin, level != 0)
            .expect("a pin of the IOAPIC");
    }
}

/// A VM of `vcpus` vCPUs and 64 MiB running `code` at [`CODE`] in long mode with KVM's
/// `irqchip` (HLT waits for an interrupt: the guest ends the run with an ACPI power-off), the
/// virtual VT-d `viommu` if given, its serial output in `out`.
pub fn vm_with_irqchip(
    code: Vec<u8>,
    vcpus: u32,
    irqchip: Irqchip,
    viommu: Option<ViommuConfig>,
    out: &Capture,
) -> Vmm {
    Vmm::build(MachineConfig {
        vcpus,
        memory_size: 64 << 20,
        boot: BootSource::RawWithIrqchip {
            image: code,
            load_addr: CODE,
            mode: CpuMode::LongMode { rip: CODE },
        },
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        viommu,
        devices: Vec::new(),
        irqchip,
    })
    .expect("build the VM")
}

/// Ends `vmm`'s run with a failure if the guest has not powered off within `secs` seconds.
pub fn watchdog(vmm: &Vmm, secs: u64) {
    let exit = vmm.exit_handle();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        exit.request(VmExit::Failed(format!("no power-off within {secs} s")));
    });
}
