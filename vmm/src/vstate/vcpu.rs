//! vCPUs: initial state (CPUID, MSRs, FPU, LAPIC, registers) and the KVM_RUN loop that
//! dispatches exits to the port I/O and MMIO buses (and, with the split irqchip, EOIs to the
//! IOAPIC).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_regs, Msrs, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::origin::Origin;
use vm_device::{debug_limited, trace_limited, warn_limited};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::ioapic::{self, SharedIoapic};
use crate::exit::{ExitHandle, VmExit};
use crate::sleep::{Resume, SleepHandle};
use crate::vstate::kick::KickTarget;
use crate::vstate::vm::Vm;

/// CPUID leaf 1 ECX bit 24: TSC-deadline timer (Intel SDM Vol. 2A, Table 3-10).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Ioctl {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we set.
    #[error("vCPU {id}: KVM_SET_MSRS set {set} of {want} MSRs")]
    Msrs { id: u32, set: usize, want: usize },
}

/// How a vCPU starts.
#[derive(Clone, Copy, Debug)]
pub enum CpuMode {
    /// 64-bit long mode with the boot GDT and identity page tables.
    LongMode {
        /// Entry point.
        rip: u64,
    },
    /// Real mode, segment 0.
    RealMode {
        /// Entry point (below 64 KiB).
        ip: u16,
    },
    /// Flat 32-bit protected mode, paging off, interrupts off: the multiboot entry state
    /// (EAX the boot loader magic, EBX the boot information).
    ProtectedMode32 {
        /// Entry point.
        eip: u32,
        /// EAX.
        eax: u32,
        /// EBX.
        ebx: u32,
    },
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    /// Also its APIC ID.
    id: u32,
    /// What a platform reset (the wake from S3) brings back, taken when configured.
    reset: Option<ResetState>,
}

/// A vCPU's interrupt controller state as configured: a reset returns to it.
struct ResetState {
    /// The local APIC registers (with the in-kernel irqchip).
    lapic: Option<kvm_lapic_state>,
    /// IA32_APIC_BASE: xAPIC mode (x2APIC with more than 255 vCPUs), and the BSP flag on
    /// vCPU 0.
    apic_base: u64,
}

impl Vcpu {
    /// Creates vCPU `id` (its APIC ID is `id` too).
    pub fn new(vm: &Vm, id: u32) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                id,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self {
            fd,
            id,
            reset: None,
        })
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// Sets CPUID, MSRs, FPU, LAPIC LINT pins; for the boot vCPU (id 0) also the registers
    /// for `mode`. Application processors wait for INIT/SIPI from the guest.
    pub fn configure(&mut self, vm: &Vm, count: u32, mode: CpuMode) -> Result<(), VcpuError> {
        let mut cpuid = vm.supported_cpuid().clone();
        cpuid::patch_cpuid(cpuid.as_mut_slice(), self.id, count, vm.has_irqchip());
        if vm.has_tsc_deadline() {
            for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
                e.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;

        self.set_boot_msrs_and_fpu()?;

        let lapic = if vm.has_irqchip() {
            // APIC IDs above 254: every processor starts in x2APIC mode (an INIT keeps it).
            if count > interrupts::MAX_XAPIC_ID + 1 {
                let mut sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
                sregs.apic_base = interrupts::x2apic_mode(sregs.apic_base);
                self.fd
                    .set_sregs(&sregs)
                    .map_err(self.ioctl("KVM_SET_SREGS"))?;
            }
            let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
            interrupts::set_lint(&mut lapic);
            self.fd
                .set_lapic(&lapic)
                .map_err(self.ioctl("KVM_SET_LAPIC"))?;
            Some(lapic)
        } else {
            None
        };
        let apic_base = self
            .fd
            .get_sregs()
            .map_err(self.ioctl("KVM_GET_SREGS"))?
            .apic_base;
        self.reset = Some(ResetState { lapic, apic_base });

        if self.id == 0 || !vm.has_irqchip() {
            let base = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
            let (sregs, gprs) = match mode {
                CpuMode::LongMode { rip } => (regs::long_mode_sregs(&base), regs::linux_regs(rip)),
                CpuMode::RealMode { ip } => (
                    regs::real_mode_sregs(&base),
                    regs::linux_regs(u64::from(ip)),
                ),
                CpuMode::ProtectedMode32 { eip, eax, ebx } => (
                    regs::protected_mode_sregs(&base),
                    regs::protected_mode_regs(eip, eax, ebx),
                ),
            };
            self.fd
                .set_sregs(&sregs)
                .map_err(self.ioctl("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&gprs)
                .map_err(self.ioctl("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    fn set_boot_msrs_and_fpu(&self) -> Result<(), VcpuError> {
        let entries = msr::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            id: self.id,
            set: 0,
            want: entries.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                want: entries.len(),
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.ioctl("KVM_SET_FPU"))
    }

    /// Resets the vCPU for the wake from S3: the boot vCPU to real mode at the waking vector,
    /// the others to wait for INIT/SIPI; MSRs, FPU and local APIC as configured.
    fn reset_for_wake(&self, resume: Resume) -> Result<(), VcpuError> {
        let Some(reset) = &self.reset else {
            return Ok(());
        };
        let base = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        // An AP's CS comes from its SIPI; until then it holds the reset value F000.
        let cs = if self.id == 0 { resume.cs() } else { 0xf000 };
        let mut sregs = regs::reset_real_mode_sregs(&base, cs);
        sregs.apic_base = reset.apic_base;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        let ip = if self.id == 0 { resume.ip() } else { 0xfff0 };
        self.fd
            .set_regs(&kvm_regs {
                rflags: 0x2, // bit 1 reads as 1 (SDM Vol. 1, 3.4.3)
                rip: u64::from(ip),
                ..Default::default()
            })
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        self.set_boot_msrs_and_fpu()?;
        if let Some(lapic) = &reset.lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(self.ioctl("KVM_SET_LAPIC"))?;
            let mp_state = if self.id == 0 {
                KVM_MP_STATE_RUNNABLE
            } else {
                KVM_MP_STATE_UNINITIALIZED
            };
            self.fd
                .set_mp_state(kvm_mp_state { mp_state })
                .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Runs until `stop` is set or an exit ends the VM; reports through `exit`. To stop it, set
    /// `stop`, then send this thread one [`crate::vstate::kick::kick_signal`]. While `sleep`
    /// says the machine is in S3 it stays out of the guest (a kick gets it out of KVM_RUN) and
    /// comes back reset.
    pub fn run(
        mut self,
        buses: VcpuBuses,
        exit: ExitHandle,
        stop: Arc<AtomicBool>,
        sleep: SleepHandle,
    ) {
        let id = self.id;
        let mut counts = ExitCounts::default();
        let mut unhandled = UnhandledPorts::default();
        // A kick from here on makes KVM_RUN return, even one that lands just before it.
        let _kick = KickTarget::arm(self.fd.get_kvm_run());
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if sleep.is_asleep() {
                if let Some(resume) = sleep.park(&stop) {
                    if let Err(e) = self.reset_for_wake(resume) {
                        exit.request(VmExit::Failed(format!("S3 resume: {e}")));
                        break;
                    }
                }
                continue;
            }
            match self.fd.run() {
                Ok(e) => {
                    counts.count(&e);
                    let reason = match e {
                        VcpuExit::MmioWrite(addr, data) if buses.origins => {
                            // The exit borrows the vCPU: keep its data, then read the RIP.
                            let mut buf = [0u8; 8];
                            let n = data.len().min(buf.len());
                            buf[..n].copy_from_slice(&data[..n]);
                            let origin = self.fd.get_regs().ok().map(|r| Origin {
                                vcpu: id,
                                rip: r.rip,
                            });
                            vm_device::origin::scope(origin, || {
                                let e = VcpuExit::MmioWrite(addr, &buf[..n]);
                                handle_exit(id, e, &buses, &mut unhandled)
                            })
                        }
                        e => handle_exit(id, e, &buses, &mut unhandled),
                    };
                    if let Some(reason) = reason {
                        exit.request(reason);
                        break;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: see whether to stop or sleep, else run on.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    exit.request(VmExit::Failed(format!("vCPU {id}: KVM_RUN failed: {e}")));
                    break;
                }
            }
        }
        log::debug!("vCPU {id} exits to the VMM: {counts:?}");
        unhandled.log(id);
    }
}

/// Port I/O no device took, by direction and port, with the number of accesses: logged whole
/// at debug level when the vCPU stops, since the line each access logs is rate-limited (what a
/// guest probes, e.g. whether it touched the PIC, must still be answerable).
#[derive(Debug, Default)]
struct UnhandledPorts(BTreeMap<(&'static str, u16), u64>);

impl UnhandledPorts {
    fn note(&mut self, direction: &'static str, port: u16) {
        *self.0.entry((direction, port)).or_default() += 1;
    }

    fn log(&self, id: u32) {
        for ((direction, port), n) in &self.0 {
            log::debug!("vCPU {id}: unhandled port {direction} {port:#x}: {n} accesses");
        }
    }
}

/// Exits a vCPU took to userspace, by kind (logged at debug level when it stops).
#[derive(Debug, Default)]
struct ExitCounts {
    pio_in: u64,
    pio_out: u64,
    mmio_read: u64,
    mmio_write: u64,
    ioapic_eoi: u64,
    other: u64,
}

impl ExitCounts {
    fn count(&mut self, e: &VcpuExit) {
        let c = match e {
            VcpuExit::IoIn(..) => &mut self.pio_in,
            VcpuExit::IoOut(..) => &mut self.pio_out,
            VcpuExit::MmioRead(..) => &mut self.mmio_read,
            VcpuExit::MmioWrite(..) => &mut self.mmio_write,
            VcpuExit::IoapicEoi(..) => &mut self.ioapic_eoi,
            _ => &mut self.other,
        };
        *c += 1;
    }
}

/// The buses a vCPU dispatches to.
#[derive(Clone)]
pub struct VcpuBuses {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
    /// The user-space IOAPIC (split irqchip), which level-triggered EOIs exit to.
    pub ioapic: Option<SharedIoapic>,
    /// Whether device models want the instruction behind each MMIO write (the VT-d's protocol
    /// checker names it): the vCPU then reads its RIP at every MMIO write exit (one ioctl) and
    /// scopes it around the dispatch ([`vm_device::origin`]). Off, MMIO writes cost nothing more.
    pub origins: bool,
}

fn handle_exit(
    id: u32,
    exit: VcpuExit,
    buses: &VcpuBuses,
    unhandled: &mut UnhandledPorts,
) -> Option<VmExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                trace_limited!("vCPU {id}: unhandled in {port:#x} ({} bytes)", data.len());
                unhandled.note("in", port);
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                trace_limited!("vCPU {id}: unhandled out {port:#x} <- {data:x?}");
                unhandled.note("out", port);
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                debug_limited!(
                    "vCPU {id}: unhandled MMIO read {addr:#x} ({} bytes)",
                    data.len()
                );
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                debug_limited!("vCPU {id}: unhandled MMIO write {addr:#x} <- {data:x?}");
            }
            None
        }
        VcpuExit::IoapicEoi(vector) => {
            match &buses.ioapic {
                Some(io) => ioapic::lock(io).end_of_interrupt(vector),
                None => {
                    warn_limited!("vCPU {id}: IOAPIC EOI exit for {vector:#x} without an IOAPIC")
                }
            }
            None
        }
        VcpuExit::Hlt => Some(VmExit::Halted),
        VcpuExit::Shutdown => Some(VmExit::Reboot {
            cause: "triple fault",
        }),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            KVM_SYSTEM_EVENT_RESET => VmExit::Reboot {
                cause: "KVM reset event",
            },
            KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
            other => VmExit::Failed(format!("vCPU {id}: unexpected system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(VmExit::Failed(format!(
            "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on host CPU {cpu}"
        ))),
        VcpuExit::InternalError => Some(VmExit::Failed(format!(
            "vCPU {id}: KVM internal error (emulation failure)"
        ))),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => None,
        other => Some(VmExit::Failed(format!(
            "vCPU {id}: unexpected KVM exit {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_device::ratelimit::{capture::lines_logged_by, BURST};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::kick::{install_kick_handler, kick_signal};
    use crate::vstate::memory::create_guest_memory;
    use crate::vstate::vm::Irqchip;

    #[test]
    fn a_kick_landing_just_before_kvm_run_makes_it_return_instead_of_running_the_guest() {
        if !std::path::Path::new("/dev/kvm").exists() {
            let msg = "/dev/kvm is missing: the vCPU kick test cannot run";
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return;
        }
        install_kick_handler().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // On a thread of its own: without immediate_exit, KVM_RUN would wait in the guest's
        // HLT for an interrupt that never comes.
        std::thread::spawn(move || {
            let mut vm = Vm::new().unwrap();
            let mem = create_guest_memory(16 << 20).unwrap();
            vm.register_memory(&mem).unwrap();
            vm.setup_irqchip(Irqchip::Kernel).unwrap();
            // hlt; jmp back to it
            mem.write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(0x8000))
                .unwrap();
            let mut vcpu = Vcpu::new(&vm, 0).unwrap();
            vcpu.configure(&vm, 1, CpuMode::RealMode { ip: 0x8000 })
                .unwrap();
            let _kick = KickTarget::arm(vcpu.fd.get_kvm_run());
            // SAFETY: raising a signal whose handler is installed.
            unsafe { libc::raise(kick_signal()) };
            let r = vcpu.fd.run().map(|_| ()).map_err(|e| e.errno());
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("KVM_RUN returns after a kick that came first");
        assert_eq!(r, Err(libc::EINTR));
    }

    #[test]
    fn unhandled_accesses_a_guest_repeats_cannot_flood_the_log() {
        let buses = VcpuBuses {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            ioapic: None,
            origins: false,
        };
        let mut unhandled = UnhandledPorts::default();
        let lines = lines_logged_by(|| {
            for _ in 0..10_000 {
                let mut d = [0u8; 4];
                let u = &mut unhandled;
                assert!(
                    handle_exit(0, VcpuExit::MmioRead(0xdead_0000, &mut d), &buses, u).is_none()
                );
                assert_eq!(d, [0xff; 4], "unhandled reads return all ones");
                handle_exit(0, VcpuExit::MmioWrite(0xdead_0000, &d), &buses, u);
                handle_exit(0, VcpuExit::IoIn(0x80, &mut d), &buses, u);
                handle_exit(0, VcpuExit::IoOut(0x80, &d), &buses, u);
                handle_exit(0, VcpuExit::IoapicEoi(0x31), &buses, u);
            }
            handle_exit(0, VcpuExit::IoOut(0x21, &[0xff]), &buses, &mut unhandled);
        });
        assert!(
            lines.len() <= 5 * BURST as usize,
            "{} lines for 50000 unhandled accesses and EOIs",
            lines.len()
        );
        // Every unhandled port still shows when the vCPU stops, with its count.
        let summary = lines_logged_by(|| unhandled.log(0));
        assert_eq!(
            summary,
            [
                "DEBUG vCPU 0: unhandled port in 0x80: 10000 accesses",
                "DEBUG vCPU 0: unhandled port out 0x21: 1 accesses",
                "DEBUG vCPU 0: unhandled port out 0x80: 10000 accesses",
            ]
        );
    }
}
