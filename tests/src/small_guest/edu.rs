//! Guest code driving the emulated edu (`Vmm::add_edu`, at 00:01.0): its registers (QEMU
//! docs/specs/edu.rst), its configuration space through ports 0xcf8/0xcfc, and an interrupt
//! handler that acknowledges it.

use iced_x86::code_asm::{
    ax, dword_ptr, dx, eax, qword_ptr, rax, rbx, rcx, AsmRegister32, AsmRegister64, CodeAssembler,
    IcedError,
};

use super::LAPIC_EOI;

/// edu's registers in BAR0.
pub const EDU_LIVENESS: i32 = 0x04;
pub const EDU_FACTORIAL: i32 = 0x08;
pub const EDU_STATUS: i32 = 0x20;
pub const EDU_IRQ_STATUS: i32 = 0x24;
pub const EDU_IRQ_RAISE: i32 = 0x60;
pub const EDU_IRQ_ACK: i32 = 0x64;
pub const EDU_DMA_SRC: i32 = 0x80;
pub const EDU_DMA_DST: i32 = 0x88;
pub const EDU_DMA_COUNT: i32 = 0x90;
pub const EDU_DMA_CMD: i32 = 0x98;
/// Configuration-space offsets: BAR0, the command register, the interrupt line and pin, and
/// the MSI capability (control, 64-bit address, data).
pub const CFG_COMMAND: u32 = 0x04;
pub const CFG_BAR0: u32 = 0x10;
pub const CFG_INTERRUPT_LINE: u32 = 0x3c;
pub const CFG_MSI_CONTROL: u32 = 0x40;
pub const CFG_MSI_ADDRESS_LO: u32 = 0x44;
pub const CFG_MSI_ADDRESS_HI: u32 = 0x48;
pub const CFG_MSI_DATA: u32 = 0x4c;
/// Command register: bus mastering (PCI 3.0, 6.2.2); MSI control: MSI enable, as bit 16 of
/// the capability's first dword.
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
pub const MSI_ENABLE: u32 = 1 << 16;

/// Configuration address (port 0xcf8) of edu's register `reg`: bus 0, device 1.
pub const fn edu_config(reg: u32) -> u32 {
    0x8000_0000 | 1 << 11 | reg
}

/// Emits `out 0xcf8, edu_config(reg)`, leaving dx at 0xcfc. Clobbers eax.
pub fn select(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, edu_config(reg))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)
}

/// Emits the load of BAR0's address into `to`, leaving it in eax too. Clobbers dx.
pub fn load_bar0(a: &mut CodeAssembler, to: AsmRegister32) -> Result<(), IcedError> {
    select(a, CFG_BAR0)?;
    a.in_(eax, dx)?;
    a.and(eax, 0xffff_fff0u32)?;
    a.mov(to, eax)
}

/// Emits a write of `value` to edu's configuration dword `reg`. Clobbers eax, dx.
pub fn config_write(a: &mut CodeAssembler, reg: u32, value: u32) -> Result<(), IcedError> {
    select(a, reg)?;
    a.mov(eax, value)?;
    a.out(dx, eax)
}

/// Emits edu's bus mastering (an MSI is a memory write) and its MSI capability set to
/// `address` (low dword; the high one zero) and `data`, then enabled. Clobbers eax, dx.
pub fn enable_msi(a: &mut CodeAssembler, address: u32, data: u32) -> Result<(), IcedError> {
    select(a, CFG_COMMAND)?;
    a.in_(eax, dx)?;
    a.or(eax, COMMAND_BUS_MASTER)?;
    a.out(dx, ax)?;
    config_write(a, CFG_MSI_ADDRESS_LO, address)?;
    config_write(a, CFG_MSI_ADDRESS_HI, 0)?;
    config_write(a, CFG_MSI_DATA, data)?;
    select(a, CFG_MSI_CONTROL)?;
    a.in_(eax, dx)?;
    a.or(eax, MSI_ENABLE)?;
    a.out(dx, eax)
}

/// Emits a handler for edu's level-triggered INTx: as [`handler`] (not indexed), except that an
/// interrupt finding edu's status already 0 is counted at `spurious` instead, and neither
/// stored nor acknowledged. This machine's paravirtual KVM acknowledges a level-triggered
/// interrupt when the guest takes it and reports the EOI at the vCPU's next exit; when a host
/// interrupt brings that exit before the handler's acknowledge, the IOAPIC sees the EOI with the
/// line still asserted and delivers once more, the line then already low (on a KVM with a
/// faithful local APIC the EOI comes from the handler's own write, after the acknowledge).
pub fn level_handler(
    a: &mut CodeAssembler,
    bar: AsmRegister64,
    counter: u64,
    spurious: u64,
    status: u64,
) -> Result<(), IcedError> {
    let mut real = a.create_label();
    let mut eoi = a.create_label();
    a.push(rax)?;
    a.push(rbx)?;
    a.mov(eax, dword_ptr(bar + EDU_IRQ_STATUS))?;
    a.test(eax, eax)?;
    a.jnz(real)?;
    a.mov(rbx, spurious)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(eoi)?;
    a.set_label(&mut real)?;
    a.mov(rbx, counter)?;
    a.inc(qword_ptr(rbx))?;
    a.mov(rbx, status)?;
    a.mov(dword_ptr(rbx), eax)?;
    a.mov(dword_ptr(bar + EDU_IRQ_ACK), eax)?;
    a.set_label(&mut eoi)?;
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()
}

/// Emits a handler that counts at `counter`, stores edu's interrupt status (BAR0 in `bar`) at
/// `status` (plus 4 bytes for each earlier interrupt when `indexed`), acknowledges it, then
/// EOIs.
pub fn handler(
    a: &mut CodeAssembler,
    bar: AsmRegister64,
    counter: u64,
    status: u64,
    indexed: bool,
) -> Result<(), IcedError> {
    a.push(rax)?;
    a.push(rbx)?;
    a.push(rcx)?;
    a.mov(rbx, counter)?;
    a.mov(rcx, qword_ptr(rbx))?;
    a.inc(qword_ptr(rbx))?;
    a.mov(eax, dword_ptr(bar + EDU_IRQ_STATUS))?;
    a.mov(rbx, status)?;
    if indexed {
        a.mov(dword_ptr(rbx + rcx * 4), eax)?;
    } else {
        a.mov(dword_ptr(rbx), eax)?;
    }
    a.mov(dword_ptr(bar + EDU_IRQ_ACK), eax)?;
    a.mov(rax, LAPIC_EOI)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rcx)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()
}
