//! What small guests that drive our VT-d share: a VM with the unit behind which the guest finds
//! edu, a watchdog, and code that drives edu's DMA engine (QEMU docs/specs/edu.rst).

use iced_x86::code_asm::*;
use vmm::config::ViommuConfig;
use vmm::{BootSource, CpuMode, Irqchip, MachineConfig, SerialIn, Vmm};

use crate::small_guest::edu::{self, EDU_DMA_CMD, EDU_DMA_COUNT, EDU_DMA_DST, EDU_DMA_SRC};
use crate::small_guest::{self, Capture, CODE};

/// A VM with our VT-d configured as `vtd`, running `code` at CODE in long mode, its serial
/// output in `out`; with `irqchip` the guest has the in-kernel LAPIC/IOAPIC (and powers off
/// rather than halts), and the unit no interrupt remapping, which KVM's IOAPIC cannot have
/// (kvm_intremap tests remapping).
pub fn vm_with_vtd(code: Vec<u8>, irqchip: bool, out: &Capture, mut vtd: ViommuConfig) -> Vmm {
    if irqchip {
        vtd.intremap = false;
        vtd.eim = false;
    }
    let mode = CpuMode::LongMode { rip: CODE };
    let boot = if irqchip {
        BootSource::RawWithIrqchip {
            image: code,
            load_addr: CODE,
            mode,
        }
    } else {
        BootSource::Raw {
            image: code,
            load_addr: CODE,
            mode,
        }
    };
    Vmm::build(MachineConfig {
        vcpus: 1,
        memory_size: 64 << 20,
        boot,
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        viommu: Some(vtd),
        devices: Vec::new(),
        irqchip: Irqchip::Kernel,
    })
    .expect("build the VM")
}

/// Ends the run with a failure if the guest has not stopped within 20 s.
pub fn watchdog(vmm: &Vmm) {
    small_guest::watchdog(vmm, 20);
}

/// The device buffer, in edu's own address space.
pub const EDU_BUF: u64 = 0x4_0000;
/// PCI command register: memory space enable.
const COMMAND_MEMORY: u32 = 1 << 1;

/// Emits code that finds edu at 00:01.0 (the first slot after the host bridge), loads its
/// BAR0 into r12 and turns on memory decode and bus mastering. Clobbers rax, edx.
pub fn enable_edu(a: &mut CodeAssembler) -> Result<(), IcedError> {
    edu::load_bar0(a, r12d)?;
    edu::config_write(
        a,
        edu::CFG_COMMAND,
        COMMAND_MEMORY | edu::COMMAND_BUS_MASTER,
    )
}

/// Emits one edu DMA of `len` bytes through BAR0 in r12: `to_ram`, from its buffer to the
/// device address `ram`; otherwise from `ram` to its buffer. Clobbers rax.
pub fn edu_dma(a: &mut CodeAssembler, ram: u64, len: u64, to_ram: bool) -> Result<(), IcedError> {
    let (src, dst) = if to_ram {
        (EDU_BUF, ram)
    } else {
        (ram, EDU_BUF)
    };
    a.mov(rax, src)?;
    a.mov(qword_ptr(r12 + EDU_DMA_SRC), rax)?;
    a.mov(rax, dst)?;
    a.mov(qword_ptr(r12 + EDU_DMA_DST), rax)?;
    a.mov(rax, len)?;
    a.mov(qword_ptr(r12 + EDU_DMA_COUNT), rax)?;
    a.mov(rax, if to_ram { 3u64 } else { 1 })?;
    a.mov(qword_ptr(r12 + EDU_DMA_CMD), rax)
}
