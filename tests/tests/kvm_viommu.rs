//! The virtual VT-d in a real KVM VM on this machine: a small guest of our own reaches its
//! registers through MMIO exits and drives its invalidation queue in guest RAM.

use iced_x86::code_asm::*;
use integration::small_guest::{
    asm64, kvm_available, print, read_u32, read_u64, Capture, CODE, RESULTS,
};
use vmm::config::ViommuConfig;
use vmm::devices::vtd;
use vmm::{BootSource, CpuMode, MachineConfig, SerialIn, VmExit, Vmm};

const VTD: u64 = 0xfed9_0000;
const QUEUE: u64 = 0x30_0000;
const STATUS: u64 = 0x31_0000;
const TOKEN: u32 = 0xc0_ffee;

#[test]
fn guest_reads_vtd_registers_and_completes_a_wait_through_the_queue() {
    if !kvm_available() {
        return;
    }
    // A wait descriptor writing TOKEN to STATUS (6.5.2.8), then an invalid one (type 7).
    let wait_lo: u64 = 0x5 | 1 << 5 | u64::from(TOKEN) << 32;
    let code = asm64(|a| {
        a.mov(rbx, VTD)?;
        a.mov(eax, dword_ptr(rbx))?; // VER
        a.mov(dword_ptr(RESULTS), eax)?;
        a.mov(rax, qword_ptr(rbx + 0x08))?; // CAP
        a.mov(rcx, RESULTS + 8)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rcx, QUEUE)?;
        a.mov(rax, wait_lo)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.mov(rax, STATUS)?;
        a.mov(qword_ptr(rcx + 8), rax)?;
        a.mov(rax, 7u64)?;
        a.mov(qword_ptr(rcx + 16), rax)?;
        a.xor(eax, eax)?;
        a.mov(qword_ptr(rcx + 24), rax)?;
        a.mov(qword_ptr(rbx + 0x88), rax)?; // IQT = 0
        a.mov(rax, QUEUE)?;
        a.mov(qword_ptr(rbx + 0x90), rax)?; // IQA: 256 entries at QUEUE
        a.mov(eax, 1u32 << 26)?;
        a.mov(dword_ptr(rbx + 0x18), eax)?; // GCMD.QIE
        a.mov(rax, 1u64 << 4)?;
        a.mov(qword_ptr(rbx + 0x88), rax)?; // IQT: one descriptor
        a.mov(eax, dword_ptr(rbx + 0x1c))?; // GSTS
        a.mov(rcx, RESULTS + 16)?;
        a.mov(dword_ptr(rcx), eax)?;
        a.mov(rax, 2u64 << 4)?;
        a.mov(qword_ptr(rbx + 0x88), rax)?; // IQT: the invalid descriptor
        a.mov(eax, dword_ptr(rbx + 0x34))?; // FSTS
        a.mov(dword_ptr(rcx + 4), eax)?;
        a.mov(rax, qword_ptr(rbx + 0x80))?; // IQH
        a.mov(qword_ptr(rcx + 8), rax)?;
        print(a, "done\n")?;
        a.hlt()
    });
    let out = Capture::default();
    let vmm = Vmm::build(MachineConfig {
        vcpus: 1,
        memory_size: 64 << 20,
        boot: BootSource::Raw {
            image: code,
            load_addr: CODE,
            mode: CpuMode::LongMode { rip: CODE },
        },
        serial_out: Box::new(out.clone()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        viommu: Some(ViommuConfig::default()),
    })
    .expect("build the VM");
    let mem = vmm.guest_memory().clone();
    let unit = vmm.vtd().expect("a VT-d was asked for").clone();
    assert_eq!(vmm.run().expect("run"), VmExit::Halted);
    assert_eq!(out.text(), "done\n");

    assert_eq!(read_u32(&mem, RESULTS), 0x10, "VER");
    let cap = read_u64(&mem, RESULTS + 8);
    assert!(cap & 1 << 7 != 0, "caching mode is on");
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
    assert_eq!(read_u32(&mem, STATUS), TOKEN, "the wait wrote its status");
    assert!(read_u32(&mem, RESULTS + 16) & 1 << 26 != 0, "GSTS.QIES");
    assert!(read_u32(&mem, RESULTS + 20) & 1 << 4 != 0, "FSTS.IQE");
    assert_eq!(
        read_u64(&mem, RESULTS + 24),
        1 << 4,
        "IQH stays at the bad one"
    );
    let stats = vtd::lock(&unit).stats();
    assert_eq!(stats.descriptors, 2);
    assert_eq!(stats.waits, 1);
    assert_eq!(stats.descriptors_by_type.invalid, 1);
}
