//! A small guest of ours (not Linux) driving QEMU's `edu` device passed through by the vmm
//! library: it finds the device on PCI bus 0, enables MSI towards its local APIC (or, in `intx`
//! mode, routes the device's INTx line through the IOAPIC), has edu copy a pattern from guest RAM
//! into the device buffer and back with DMA, and waits for each completion interrupt with HLT.
//! The host side then checks the data round-tripped exactly and two interrupts came in.
//! In `viommu` mode the device sits behind our virtual VT-d: the guest programs the unit (root
//! table, queued invalidation, translation on) and gives edu IOVAs its tables map; then it asks
//! edu to write to an IOVA its tables do not map, which is the guest-physical address of a
//! canary page (an identity mapping left over would let it through), and does one more mapped
//! round trip to show the device still works.
//! `msi-split` and `intx-split` do the same with KVM's split irqchip: the IOAPIC the guest
//! programs is then the vmm's, and the INTx line's resample eventfd is signalled by it at EOI.
//! Runs in the testbed's L1 (`tests/tests/passthrough_edu_guest.rs`):
//! `edu_guest /sys/bus/pci/devices/DDDD:BB:DD.F [msi|intx|viommu|msi-split|intx-split]` prints
//! `@@TB L1 edu-guest mode=msi exit=Ok(PowerOff) status=0x600d irqs=2 dma=ok ...`.

use std::path::PathBuf;
use std::time::Duration;

use iced_x86::code_asm::*;
use integration::small_guest::{
    asm64, idt_gate, load_idt_and_enable_apic, CODE, IOAPIC_SEL, IOAPIC_WIN, LAPIC_EOI, PM1A_CNT,
    RESULTS, SLP_S5,
};
use viommu::descriptor::encode;
use viommu::regs::{
    GCMD_QIE, GCMD_REG, GCMD_SRTP, GCMD_TE, IQA_REG, IQT_REG, IQ_INDEX_SHIFT, RTADDR_REG,
};
use viommu::testing::Tables;
use viommu::{Perm, SourceId};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::layout::VTD_REGS_START;
use vmm::config::{DeviceConfig, ViommuConfig};
use vmm::{BootSource, CpuMode, Irqchip, MachineConfig, SerialIn, VmExit, Vmm};

/// Guest RAM the DMA reads (the host fills it) and writes.
const SRC: u64 = 0x30_0000;
const DST: u64 = 0x30_1000;
/// viommu mode: a second destination, a canary page no IOVA maps, the guest's tables and
/// invalidation queue, the wait's status word, and the IOVAs the tables map.
const DST2: u64 = 0x30_2000;
const CANARY: u64 = 0x32_0000;
const TABLES: u64 = 0x40_0000;
const QUEUE: u64 = 0x34_0000;
const QSTATUS: u64 = 0x34_1000;
/// IOVAs: under edu's 28-bit DMA mask (QEMU clamps higher addresses) and above guest RAM, so
/// no IOVA could pass for a guest-physical address.
const IOVA_SRC: u64 = 0x0800_0000;
const IOVA_DST: u64 = 0x0800_1000;
const IOVA_DST2: u64 = 0x0800_2000;
/// Bytes copied: under the 4 KiB device buffer (QEMU 7.2's edu refuses a transfer ending at
/// the buffer's end with a hardware error that stops L0).
const LEN: u64 = 2048;
/// The guest's IDT and IDTR.
const IDT: u64 = 0x31_0000;
const IDTR: u64 = 0x31_1000;
/// The vector edu's MSI carries.
const VECTOR: u64 = 0x40;
/// edu (QEMU hw/misc/edu.c): DMA registers, interrupt acknowledge, the device buffer.
const EDU_DMA_SRC: i32 = 0x80;
const EDU_DMA_DST: i32 = 0x88;
const EDU_DMA_CNT: i32 = 0x90;
const EDU_DMA_CMD: i32 = 0x98;
const EDU_INTR_ACK: i32 = 0x64;
const EDU_BUF: u64 = 0x4_0000;
/// Results: +0 interrupts taken (u64), +8 status (0x600d, or 0x100 | the failed step), +16 ID,
/// +24 BAR0, +28 interrupt line.
const OK: u32 = 0x600d;

/// `eax` = config dword `reg_reg` (a register holding the offset) of 00:01.0 via 0xCF8/0xCFC.
fn cfg_addr(a: &mut CodeAssembler, reg: AsmRegister32) -> Result<(), IcedError> {
    a.mov(eax, reg)?;
    a.or(eax, 0x8000_0800u32)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)
}

fn cfg_read(a: &mut CodeAssembler, reg: AsmRegister32) -> Result<(), IcedError> {
    cfg_addr(a, reg)?;
    a.in_(eax, dx)
}

/// Writes `ebx` to config dword at offset `reg`.
fn cfg_write(a: &mut CodeAssembler, reg: AsmRegister32) -> Result<(), IcedError> {
    cfg_addr(a, reg)?;
    a.mov(eax, ebx)?;
    a.out(dx, eax)
}

fn guest(intx: bool, viommu: Option<u64>) -> Vec<u8> {
    asm64(|a| {
        let mut handler = a.create_label();
        let mut fail = a.create_label();
        let mut off = a.create_label();
        a.mov(rdi, RESULTS)?;
        // IDT entry VECTOR: a 64-bit interrupt gate to `handler`; then the local APIC on.
        idt_gate(a, IDT, VECTOR, handler)?;
        load_idt_and_enable_apic(a, IDT, IDTR)?;
        // Step 1: 00:01.0 is edu.
        a.mov(dword_ptr(rdi + 8), 1u32)?;
        a.xor(esi, esi)?;
        cfg_read(a, esi)?;
        a.mov(dword_ptr(rdi + 16), eax)?;
        a.cmp(eax, 0x11e8_1234u32)?;
        a.jne(fail)?;
        // BAR0 (32-bit memory), then memory decode and bus mastering.
        a.mov(esi, 0x10u32)?;
        cfg_read(a, esi)?;
        a.and(eax, 0xffff_fff0u32)?;
        a.mov(r12d, eax)?;
        a.mov(dword_ptr(rdi + 24), eax)?;
        a.mov(esi, 4u32)?;
        a.mov(ebx, 6u32)?;
        cfg_write(a, esi)?;
        if intx {
            // Step 2: INTx on the line the config space names, through the IOAPIC.
            a.mov(dword_ptr(rdi + 8), 2u32)?;
            a.mov(esi, 0x3cu32)?;
            cfg_read(a, esi)?;
            a.movzx(esi, al)?;
            a.mov(dword_ptr(rdi + 28), esi)?;
            a.cmp(esi, 16u32)?;
            a.jb(fail)?;
            a.cmp(esi, 24u32)?;
            a.jae(fail)?;
            a.mov(rbx, IOAPIC_SEL)?;
            a.mov(rcx, IOAPIC_WIN)?;
            a.lea(eax, dword_ptr(rsi * 2 + 0x10))?;
            a.mov(dword_ptr(rbx), eax)?;
            a.mov(dword_ptr(rcx), (VECTOR as u32) | (1 << 13) | (1 << 15))?;
            a.inc(eax)?;
            a.mov(dword_ptr(rbx), eax)?;
            a.mov(dword_ptr(rcx), 0u32)?;
        } else {
            // Step 2: the first capability is MSI, 64-bit.
            a.mov(dword_ptr(rdi + 8), 2u32)?;
            a.mov(esi, 0x34u32)?;
            cfg_read(a, esi)?;
            a.and(eax, 0xfcu32)?;
            a.mov(r13d, eax)?;
            cfg_read(a, r13d)?;
            a.mov(r14d, eax)?;
            a.cmp(al, 5u32)?;
            a.jne(fail)?;
            a.bt(r14d, 23u32)?;
            a.jnc(fail)?;
            // Address 0xFEE00000 (APIC 0), upper 0, data VECTOR, then enable.
            a.lea(esi, dword_ptr(r13 + 4))?;
            a.mov(ebx, 0xfee0_0000u32)?;
            cfg_write(a, esi)?;
            a.lea(esi, dword_ptr(r13 + 8))?;
            a.xor(ebx, ebx)?;
            cfg_write(a, esi)?;
            a.lea(esi, dword_ptr(r13 + 12))?;
            a.mov(ebx, VECTOR as u32)?;
            cfg_write(a, esi)?;
            a.mov(ebx, r14d)?;
            a.or(ebx, 0x1_0000u32)?;
            cfg_write(a, r13d)?;
        }
        let dmas: &[(u64, u64, u64)] = match viommu {
            None => &[(SRC, EDU_BUF, 0), (EDU_BUF, DST, 2)],
            Some(root) => {
                // Step 2b: the VT-d, as a driver brings it up: root table, queued invalidation
                // (the host wrote global context and IOTLB invalidations and a wait at QUEUE),
                // then translation on.
                a.mov(dword_ptr(rdi + 8), 0x2bu32)?;
                a.mov(rbx, VTD_REGS_START)?;
                a.mov(rax, root)?;
                a.mov(qword_ptr(rbx + RTADDR_REG), rax)?;
                a.mov(dword_ptr(rbx + GCMD_REG), GCMD_SRTP)?;
                a.xor(eax, eax)?;
                a.mov(qword_ptr(rbx + IQT_REG), rax)?;
                a.mov(rax, QUEUE)?;
                a.mov(qword_ptr(rbx + IQA_REG), rax)?;
                a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE)?;
                a.mov(rax, 3u64 << IQ_INDEX_SHIFT)?;
                a.mov(qword_ptr(rbx + IQT_REG), rax)?;
                a.mov(rax, QSTATUS)?;
                a.cmp(dword_ptr(rax), 1)?;
                a.jne(fail)?;
                a.mov(dword_ptr(rbx + GCMD_REG), GCMD_QIE | GCMD_TE)?;
                // Through IOVAs; the third write targets an IOVA no table maps (the canary's
                // guest-physical address); the last round trip shows the device still works.
                &[
                    (IOVA_SRC, EDU_BUF, 0),
                    (EDU_BUF, IOVA_DST, 2),
                    (EDU_BUF, CANARY, 2),
                    (IOVA_SRC, EDU_BUF, 0),
                    (EDU_BUF, IOVA_DST2, 2),
                ]
            }
        };
        // Step 3: RAM -> device buffer, then device buffer -> RAM, each raising an MSI.
        a.mov(dword_ptr(rdi + 8), 3u32)?;
        for (n, &(src, dst, dir)) in dmas.iter().enumerate() {
            a.mov(rax, src)?;
            a.mov(qword_ptr(r12 + EDU_DMA_SRC), rax)?;
            a.mov(rax, dst)?;
            a.mov(qword_ptr(r12 + EDU_DMA_DST), rax)?;
            a.mov(rax, LEN)?;
            a.mov(qword_ptr(r12 + EDU_DMA_CNT), rax)?;
            a.mov(rax, 1 | 4 | dir)?;
            a.mov(qword_ptr(r12 + EDU_DMA_CMD), rax)?;
            // Wait for MSI n+1 without losing a wake-up: check with interrupts off, then
            // STI;HLT (the STI shadow covers the HLT).
            let mut wait = a.create_label();
            let mut done = a.create_label();
            a.set_label(&mut wait)?;
            a.cli()?;
            a.cmp(qword_ptr(rdi), (n + 1) as i32)?;
            a.jae(done)?;
            a.sti()?;
            a.hlt()?;
            a.jmp(wait)?;
            a.set_label(&mut done)?;
        }
        a.mov(dword_ptr(rdi + 8), OK)?;
        a.jmp(off)?;
        a.set_label(&mut fail)?;
        a.or(dword_ptr(rdi + 8), 0x100u32)?;
        a.set_label(&mut off)?;
        a.mov(dx, PM1A_CNT)?;
        a.mov(al, SLP_S5)?;
        a.out(dx, al)?;
        a.hlt()?;
        a.jmp(off)?;
        // The handler: count, acknowledge edu (which lowers INTx), EOI (which, for a level
        // interrupt, makes KVM signal the resample fd and VFIO unmask the line).
        a.set_label(&mut handler)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.mov(rbx, RESULTS)?;
        a.inc(qword_ptr(rbx))?;
        a.mov(dword_ptr(r12 + EDU_INTR_ACK), 0x100u32)?;
        a.mov(rax, LAPIC_EOI)?;
        a.mov(dword_ptr(rax), 0u32)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.iretq()
    })
}

/// The guest's VT-d tables for viommu mode: edu (00:01.0) in domain 1 with a 3-level table
/// mapping IOVA_SRC, IOVA_DST and IOVA_DST2 to SRC, DST and DST2, and nothing else; and the
/// descriptors the guest submits: global context and IOTLB invalidations and a wait.
fn write_vtd_tables(mem: &vm_memory::GuestMemoryMmap) {
    let mut t = Tables::at(mem, TABLES);
    let pt = t.context(SourceId::new(0, 1, 0), 1, 3);
    for (iova, gpa) in [(IOVA_SRC, SRC), (IOVA_DST, DST), (IOVA_DST2, DST2)] {
        t.map(pt, iova, gpa, 0x1000, Perm::RW);
    }
    let descs = [
        encode::context_global(),
        encode::iotlb_global(),
        encode::wait(Some((QSTATUS, 1)), false, false),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(QUEUE + i as u64 * 16))
            .expect("queue in guest RAM");
    }
}

fn main() {
    let device = DeviceConfig {
        path: PathBuf::from(std::env::args().nth(1).unwrap_or_default()),
        iommu: std::env::args().nth(2).as_deref() == Some("viommu"),
        // iommufd where the L1 kernel has it, else the container.
        backend: None,
        // Function 0 of the first free slot.
        addr: None,
    };
    let mode = std::env::args().nth(2).unwrap_or_else(|| "msi".into());
    let behind_vtd = mode == "viommu";
    let irqchip = if mode.ends_with("-split") {
        Irqchip::Split
    } else {
        Irqchip::Kernel
    };
    let image = guest(mode.starts_with("intx"), behind_vtd.then_some(TABLES));
    if let Err(e) = vmm::device_manager::vfio::check_devices(std::slice::from_ref(&device)) {
        println!("@@TB L1 edu-guest error: {e}");
        std::process::exit(1);
    }
    let built = Vmm::build(MachineConfig {
        vcpus: 1,
        memory_size: 64 << 20,
        boot: BootSource::RawWithIrqchip {
            image,
            load_addr: CODE,
            mode: CpuMode::LongMode { rip: CODE },
        },
        serial_out: Box::new(std::io::stdout()),
        serial_in: SerialIn::None,
        extra_acpi_tables: Vec::new(),
        // DMA remapping only: the guest's MSIs are in compatibility format, on either irqchip.
        viommu: device.iommu.then_some(ViommuConfig {
            intremap: false,
            eim: false,
            ..ViommuConfig::default()
        }),
        devices: vec![device.clone()],
        irqchip,
    });
    let mut vm = match built {
        Ok(v) => v,
        Err(e) => {
            println!("@@TB L1 edu-guest error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = vm.assign_devices() {
        println!("@@TB L1 edu-guest error: {e}");
        std::process::exit(1);
    }
    let mem = vm.guest_memory().clone();
    let pattern: Vec<u8> = (0..LEN as u32).map(|i| (i * 13 + 7) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(SRC))
        .expect("pattern into guest RAM");
    let canary = vec![0xa5u8; LEN as usize];
    let vtd = vm.vtd().cloned();
    if behind_vtd {
        write_vtd_tables(&mem);
        mem.write_slice(&canary, GuestAddress(CANARY))
            .expect("canary into guest RAM");
    }
    let exit = vm.exit_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        exit.request(VmExit::Failed("edu guest: no power-off within 60 s".into()));
    });
    let outcome = vm.run();
    let irqs: u64 = mem.read_obj(GuestAddress(RESULTS)).unwrap_or(0);
    let status: u32 = mem.read_obj(GuestAddress(RESULTS + 8)).unwrap_or(0);
    let id: u32 = mem.read_obj(GuestAddress(RESULTS + 16)).unwrap_or(0);
    let bar0: u32 = mem.read_obj(GuestAddress(RESULTS + 24)).unwrap_or(0);
    let line: u32 = mem.read_obj(GuestAddress(RESULTS + 28)).unwrap_or(0);
    let mut back = vec![0u8; LEN as usize];
    let _ = mem.read_slice(&mut back, GuestAddress(DST));
    let dma = if back == pattern { "ok" } else { "bad" };
    let ok = |addr: u64, want: &[u8]| {
        let mut got = vec![0u8; want.len()];
        let _ = mem.read_slice(&mut got, GuestAddress(addr));
        if got == want {
            "ok"
        } else {
            "bad"
        }
    };
    let (dma2, canary_state, maps) = match &vtd {
        Some(v) => (
            ok(DST2, &pattern),
            ok(CANARY, &canary),
            vmm::devices::vtd::lock(v).stats().host_map_calls,
        ),
        None => ("-", "-", 0),
    };
    println!(
        "@@TB L1 edu-guest mode={mode} exit={:?} status={status:#x} irqs={irqs} dma={dma} \
         dma2={dma2} canary={canary_state} host_maps={maps} id={id:#x} bar0={bar0:#x} line={line}",
        outcome.map_err(|e| e.to_string())
    );
    let good = status == OK
        && if behind_vtd {
            irqs == 5 && dma == "ok" && dma2 == "ok" && canary_state == "ok"
        } else {
            irqs == 2 && dma == "ok"
        };
    std::process::exit(if good { 0 } else { 1 });
}
