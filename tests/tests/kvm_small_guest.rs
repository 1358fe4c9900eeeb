//! Small guests on this machine's KVM, assembled with iced-x86 at test time and run through
//! the vmm library: serial output, HLT, MMIO dispatch, PCI config through 0xCF8/0xCFC and ECAM.
//!
//! Without /dev/kvm these tests skip loudly, and fail when CI=true.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use iced_x86::code_asm::*;
use integration::small_guest::{asm64, kvm_available, print, read_u32, Capture, CODE, RESULTS};
use vm_device::pci::bar::{Bar, BarAllocator, BarKind, BarMove};
use vm_device::pci::configuration::{PciConfiguration, PciIds};
use vm_device::pci::device::{PciDevice, PciDeviceError};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::{BootSource, CpuMode, Irqchip, MachineConfig, SerialIn, VmExit, Vmm};

/// Where real-mode test code is loaded and entered.
const REAL_CODE: u64 = 0x8000;
/// A test device on the MMIO bus, in the platform MMIO area.
const MMIO_DEV: u64 = 0xf000_0000;

fn build(code: Vec<u8>, mode: CpuMode, out: &Capture) -> Vmm {
    build_at(code, CODE, mode, out, SerialIn::None)
}

/// Real mode reaches only the first MiB: such code is loaded and entered at REAL_CODE.
fn build_real_mode(code: Vec<u8>, out: &Capture) -> Vmm {
    build_at(
        code,
        REAL_CODE,
        CpuMode::RealMode {
            ip: REAL_CODE as u16,
        },
        out,
        SerialIn::None,
    )
}

fn build_at(
    code: Vec<u8>,
    load_addr: u64,
    mode: CpuMode,
    out: &Capture,
    serial_in: SerialIn,
) -> Vmm {
    Vmm::build(MachineConfig {
        vcpus: 1,
        memory_size: 64 << 20,
        boot: BootSource::Raw {
            image: code,
            load_addr,
            mode,
        },
        serial_out: Box::new(out.clone()),
        serial_in,
        extra_acpi_tables: Vec::new(),
        viommu: None,
        devices: Vec::new(),
        irqchip: Irqchip::Kernel,
    })
    .expect("build the VM")
}

fn long_mode() -> CpuMode {
    CpuMode::LongMode { rip: CODE }
}

#[test]
fn real_mode_guest_prints_and_halts() {
    if !kvm_available() {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    for b in b"real mode\n" {
        a.mov(al, u32::from(*b)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.hlt().unwrap();
    let code = a.assemble(REAL_CODE).unwrap();
    let out = Capture::default();
    let vmm = build_real_mode(code, &out);
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(out.text(), "real mode\n");
}

#[test]
fn long_mode_guest_prints_and_halts() {
    if !kvm_available() {
        return;
    }
    let code = asm64(|a| {
        print(a, "long mode\n")?;
        a.hlt()
    });
    let out = Capture::default();
    let vmm = build(code, long_mode(), &out);
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(out.text(), "long mode\n");
}

type MmioLog = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;
type BarLog = Arc<Mutex<Vec<(u64, u64, u32)>>>;

/// Logs writes and answers reads with a fixed pattern XOR the offset.
struct MmioProbe {
    writes: MmioLog,
}

impl BusDevice for MmioProbe {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = 0xcafe_0000u32 ^ offset as u32;
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((offset, data.to_vec()));
    }
}

#[test]
fn mmio_accesses_reach_the_device_with_their_values() {
    if !kvm_available() {
        return;
    }
    let code = asm64(|a| {
        a.mov(rbx, MMIO_DEV)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.mov(dword_ptr(rbx + 0x10), eax)?;
        a.mov(byte_ptr(rbx + 0x21), 0x5au32)?;
        a.mov(eax, dword_ptr(rbx + 0x40))?;
        a.mov(rcx, RESULTS)?;
        a.mov(dword_ptr(rcx), eax)?;
        a.hlt()
    });
    let out = Capture::default();
    let vmm = build(code, long_mode(), &out);
    let writes = Arc::new(Mutex::new(Vec::new()));
    vmm.mmio_bus()
        .insert(
            Arc::new(Mutex::new(MmioProbe {
                writes: writes.clone(),
            })),
            MMIO_DEV,
            0x1000,
        )
        .unwrap();
    let mem = vmm.guest_memory().clone();
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(
        *writes.lock().unwrap(),
        vec![
            (0x10, 0x1234_5678u32.to_le_bytes().to_vec()),
            (0x21, vec![0x5a])
        ]
    );
    assert_eq!(
        read_u32(&mem, RESULTS),
        0xcafe_0040,
        "the device's answer reached the guest"
    );
}

/// A PCI function with one 4 KiB MMIO BAR; records BAR writes with the address the BAR decodes
/// at.
struct ProbeFn {
    config: PciConfiguration,
    bar_writes: BarLog,
}

impl PciDevice for ProbeFn {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write_reg(reg, offset, data)
    }
    fn place_bars(&mut self, alloc: &mut dyn BarAllocator) -> Result<Vec<Bar>, PciDeviceError> {
        self.config
            .add_bar(0, BarKind::Mmio32, 0x1000, false)
            .expect("BAR0 is free");
        Ok(self.config.place_bars(alloc)?)
    }
    fn read_bar(&mut self, _index: usize, offset: u64, data: &mut [u8]) {
        let v = 0xba00_0000u32 | offset as u32;
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        let base = self.config.bar(index).map_or(u64::MAX, |b| b.addr);
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        self.bar_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((base, offset, u32::from_le_bytes(b)));
    }
    fn revert_bar(&mut self, index: usize, addr: u64) {
        self.config.revert_bar(index, addr);
    }
}

#[test]
fn pci_config_through_ports_and_ecam_reaches_the_right_function() {
    if !kvm_available() {
        return;
    }
    const ECAM: u64 = 0xe000_0000;
    const NEW_BAR: u32 = 0xc800_0000;
    let code = asm64(|a| {
        a.mov(rdi, RESULTS)?;
        // 0xCF8/0xCFC: host bridge 00:00.0 and our function 00:01.0 IDs.
        a.mov(dx, 0xcf8u32)?;
        a.mov(eax, 0x8000_0000u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        a.mov(dword_ptr(rdi), eax)?;
        a.mov(dx, 0xcf8u32)?;
        a.mov(eax, 0x8000_0800u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfeu32)?;
        a.in_(ax, dx)?; // device ID, word access at 0xCFE
        a.mov(word_ptr(rdi + 4), ax)?;
        // An empty slot reads all ones.
        a.mov(dx, 0xcf8u32)?;
        a.mov(eax, 0x8000_1000u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        a.mov(dword_ptr(rdi + 8), eax)?;
        // ECAM: 00:01.0's ID and BAR0.
        a.mov(rbx, ECAM + (1 << 15))?;
        a.mov(eax, dword_ptr(rbx))?;
        a.mov(dword_ptr(rdi + 12), eax)?;
        a.mov(eax, dword_ptr(rbx + 0x10))?;
        a.mov(dword_ptr(rdi + 16), eax)?;
        // Move BAR0 through ECAM with memory decoding enabled, then touch the BAR.
        a.mov(word_ptr(rbx + 4), 0x2u32)?;
        a.mov(dword_ptr(rbx + 0x10), NEW_BAR)?;
        a.mov(rsi, u64::from(NEW_BAR))?;
        a.mov(dword_ptr(rsi + 0x44), 0xfeed_beefu32)?;
        a.mov(eax, dword_ptr(rsi + 0x8))?;
        a.mov(dword_ptr(rdi + 20), eax)?;
        print(a, "pci done\n")?;
        a.hlt()
    });
    let out = Capture::default();
    let vmm = build(code, long_mode(), &out);
    let bar_writes = Arc::new(Mutex::new(Vec::new()));
    let probe = ProbeFn {
        config: PciConfiguration::new(PciIds {
            vendor: 0x1234,
            device: 0x11e8,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 0x10,
        }),
        bar_writes: bar_writes.clone(),
    };
    let slot = vmm
        .pci_bus()
        .lock()
        .unwrap()
        .add_device(Arc::new(Mutex::new(probe)))
        .unwrap();
    assert_eq!(slot, 1);
    let mem = vmm.guest_memory().clone();
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(out.text(), "pci done\n");
    let r = |off: u64| read_u32(&mem, RESULTS + off);
    assert_eq!(r(0), 0x0d57_8086, "host bridge ID via 0xCFC");
    assert_eq!(r(4) & 0xffff, 0x11e8, "device ID via a word read of 0xCFE");
    assert_eq!(r(8), 0xffff_ffff, "empty slot");
    assert_eq!(r(12), 0x11e8_1234, "ID via ECAM");
    assert_eq!(r(16), 0xc000_0000, "BAR0 as allocated");
    assert_eq!(
        r(20),
        0xba00_0008,
        "BAR read after the move reaches the function"
    );
    assert_eq!(
        *bar_writes.lock().unwrap(),
        vec![(u64::from(NEW_BAR), 0x44, 0xfeed_beef)]
    );
}

/// A PCI function that says when it is dropped.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl PciDevice for DropFlag {
    fn read_config_register(&mut self, _reg: usize) -> u32 {
        0x5678_1234
    }
    fn write_config_register(&mut self, _: usize, _: usize, _: &[u8]) -> Vec<BarMove> {
        Vec::new()
    }
}

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_vm_s_devices_are_torn_down_when_its_run_ends_after_on_stop_saw_them() {
    if !kvm_available() {
        return;
    }
    let code = asm64(|a| a.hlt());
    let vmm = build(code, long_mode(), &Capture::default());
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    vmm.pci_bus()
        .lock()
        .unwrap()
        .add_device(Arc::new(Mutex::new(DropFlag(dropped.clone()))))
        .unwrap();
    let mut seen = None;
    let exit = vmm
        .run_with(|_| seen = Some(dropped.load(std::sync::atomic::Ordering::SeqCst)))
        .unwrap();
    assert_eq!(exit, VmExit::Halted);
    assert_eq!(seen, Some(false), "on_stop runs before the teardown");
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the function went with the VM (nothing keeps the PCI bus alive)"
    );
}

#[test]
fn acpi_reset_register_ends_the_run_even_while_the_guest_keeps_going() {
    if !kvm_available() {
        return;
    }
    // Like Linux's reboot loop: ACPI reset, then i8042 pulses, forever.
    let code = asm64(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(dx, 0x3c0u32)?;
        a.mov(al, 1u32)?;
        a.out(dx, al)?;
        a.in_(al, 0x64u32)?;
        a.mov(al, 0xfeu32)?;
        a.out(0x64u32, al)?;
        a.jmp(top)
    });
    let out = Capture::default();
    let vmm = build(code, long_mode(), &out);
    assert_eq!(
        vmm.run().unwrap(),
        VmExit::Reboot {
            cause: "ACPI reset register"
        }
    );
}

#[test]
fn a_jump_to_the_reset_vector_resets_the_vm() {
    if !kvm_available() {
        return;
    }
    // What Linux's BOOT_BIOS reboot ends with: a far jump to F000:FFF0 in real mode.
    let mut a = CodeAssembler::new(16).unwrap();
    a.db(&[0xea, 0xf0, 0xff, 0x00, 0xf0]).unwrap(); // jmp far 0xf000:0xfff0
    let code = a.assemble(REAL_CODE).unwrap();
    let out = Capture::default();
    let vmm = build_real_mode(code, &out);
    assert_eq!(
        vmm.run().unwrap(),
        VmExit::Reboot {
            cause: "i8042 reset"
        }
    );
}

#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    // Echo what arrives on COM1 (polling LSR.DR) until a 'q'.
    let code = asm64(|a| {
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.mov(dx, 0x3fdu32)?;
        a.in_(al, dx)?;
        a.test(al, 1u32)?;
        a.jz(wait)?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.out(dx, al)?;
        a.cmp(al, u32::from(b'q'))?;
        a.jne(wait)?;
        a.hlt()
    });
    // Several times the 64-byte receive FIFO: input pauses while the FIFO is full and resumes
    // when the guest drains it, losing nothing.
    let text: String = (0..600u32)
        .map(|i| char::from(b'a' + (i % 16) as u8))
        .chain(std::iter::once('q'))
        .collect();
    let (reader, mut writer) = std::io::pipe().unwrap();
    writer.write_all(text.as_bytes()).unwrap();
    let out = Capture::default();
    let vmm = build_at(
        code,
        CODE,
        long_mode(),
        &out,
        SerialIn::Stream(Box::new(reader)),
    );
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(out.text(), text);
}

#[test]
fn each_vcpu_has_its_apic_id_and_a_spinning_vcpu_is_stopped() {
    if !kvm_available() {
        return;
    }
    // Each vCPU stores CPUID.1:EBX[31:24] (its APIC ID) in its own slot; vCPU 1 then halts,
    // which ends the run while vCPU 0 spins forever and must be kicked out of KVM_RUN.
    let code = asm64(|a| {
        let mut spin = a.create_label();
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24u32)?;
        a.mov(rdi, RESULTS)?;
        a.mov(dword_ptr(rdi + rbx * 4), ebx)?;
        a.mov(dword_ptr(rdi + rbx * 4 + 0x10), 0x600d_u32)?;
        a.cmp(ebx, 1u32)?;
        a.jne(spin)?;
        // Wait until vCPU 0 has stored its slot, then end the run.
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.pause()?;
        a.cmp(dword_ptr(rdi + 0x10), 0x600d_u32)?;
        a.jne(wait)?;
        a.hlt()?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)
    });
    let out = Capture::default();
    let vmm = Vmm::build(MachineConfig {
        vcpus: 2,
        memory_size: 64 << 20,
        boot: BootSource::Raw {
            image: code,
            load_addr: CODE,
            mode: long_mode(),
        },
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        viommu: None,
        devices: Vec::new(),
        irqchip: Irqchip::Kernel,
    })
    .unwrap();
    let mem = vmm.guest_memory().clone();
    assert_eq!(vmm.run().unwrap(), VmExit::Halted);
    assert_eq!(read_u32(&mem, RESULTS + 4), 1, "vCPU 1's APIC ID");
    assert_eq!(read_u32(&mem, RESULTS + 0x14), 0x600d);
    assert_eq!(read_u32(&mem, RESULTS + 0x10), 0x600d, "vCPU 0 ran too");
}

#[test]
fn firmware_tables_and_reset_stub_are_in_guest_memory() {
    if !kvm_available() {
        return;
    }
    // A stand-in DMAR: a bare header with a valid checksum.
    let mut dmar = vec![0u8; 48];
    dmar[..4].copy_from_slice(b"DMAR");
    dmar[4..8].copy_from_slice(&48u32.to_le_bytes());
    let sum = dmar.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    dmar[9] = 0u8.wrapping_sub(sum);
    let out = Capture::default();
    let vmm = Vmm::build(MachineConfig {
        vcpus: 2,
        memory_size: 64 << 20,
        boot: BootSource::Raw {
            image: vec![0xf4],
            load_addr: CODE,
            mode: long_mode(),
        },
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: vec![dmar.clone()],
        viommu: None,
        devices: Vec::new(),
        irqchip: Irqchip::Kernel,
    })
    .unwrap();
    let mem = vmm.guest_memory();
    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(0xe0000)).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let xsdt_len = read_u32(mem, xsdt_addr + 4) as u64;
    let entries: Vec<u64> = (36..xsdt_len)
        .step_by(8)
        .map(|o| mem.read_obj(GuestAddress(xsdt_addr + o)).unwrap())
        .collect();
    let sigs: Vec<[u8; 4]> = entries
        .iter()
        .map(|a| mem.read_obj(GuestAddress(*a)).unwrap())
        .collect();
    assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG", *b"DMAR"]);
    let mut stub = [0u8; 4];
    mem.read_slice(&mut stub, GuestAddress(0xffff0)).unwrap();
    assert_eq!(stub, [0xb0, 0xfe, 0xe6, 0x64], "mov al, 0xfe; out 0x64, al");
}
