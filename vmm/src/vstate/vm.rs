//! The KVM VM: /dev/kvm, memory slots, the irqchip (in-kernel with the PIT, or split) and its
//! GSI routing table.
//!
//! The Vm owns the routing table because KVM has one per VM and KVM_SET_GSI_ROUTING replaces
//! all of it: whoever wires an interrupt (the device manager for COM1 and the assigned
//! devices, the split irqchip's IOAPIC for its pins) must go through the same table, and its
//! fixed part depends on how [`Vm::setup_irqchip`] created the irqchip.

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK, KVM_X2APIC_API_USE_32BIT_IDS,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VmFd};
use passthrough::kvm::{KvmRouting, IOAPIC_PINS};
use vm_device::interrupt::MsiMessage;
use vm_device::{debug_limited, warn_limited};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

pub use passthrough::kvm::Irqchip;

/// Errors of VM-level KVM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    OpenKvm(kvm_ioctls::Error),
    /// Wrong KVM API version.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability we need is missing.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// Any VM ioctl failure.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// More vCPUs, or a higher vCPU (APIC) ID, than KVM allows.
    #[error("{vcpus} vCPUs asked, KVM allows at most {max} ({cap})")]
    TooManyVcpus {
        vcpus: u32,
        max: u32,
        cap: &'static str,
    },
    /// Memory slot registration failed.
    #[error(
        "KVM_SET_USER_MEMORY_REGION slot {slot} at {addr:#x} ({size:#x} bytes) failed: {source}"
    )]
    MemorySlot {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Sends `message` into the VM (KVM_SIGNAL_MSI) on behalf of `what`; a failure, or a message
/// no local APIC takes (e.g. one the guest disabled), is logged, rate-limited.
pub fn signal_msi(vm: &VmFd, message: MsiMessage, what: &str) {
    let msi = kvm_msi {
        address_lo: message.address as u32,
        address_hi: (message.address >> 32) as u32,
        data: message.data,
        ..Default::default()
    };
    match vm.signal_msi(msi) {
        Ok(0) => debug_limited!("{what}: {message:x?} reached no local APIC"),
        Ok(_) => {}
        Err(e) => warn_limited!("{what}: KVM_SIGNAL_MSI {message:x?} failed: {e}"),
    }
}

/// Hands out KVM memory slot numbers: guest RAM first, then whatever devices map later
/// (VFIO BARs). Shared, so devices can take slots while the VM runs.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    next: AtomicU32,
}

impl SlotAllocator {
    /// The next unused slot number.
    pub fn allocate(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// A VM file descriptor with what we learned from KVM.
pub struct Vm {
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
    irqchip: Option<Irqchip>,
    /// The GSI routing table, once the irqchip exists.
    routing: Option<Arc<KvmRouting>>,
    tsc_deadline: bool,
    readonly_mem: bool,
    /// KVM_CAP_MAX_VCPUS and KVM_CAP_MAX_VCPU_ID.
    max_vcpus: u32,
    max_vcpu_id: u32,
    slots: Arc<SlotAllocator>,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let readonly_mem = kvm.check_extension(Cap::ReadonlyMem);
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let max_vcpu_id = u32::try_from(kvm.get_max_vcpu_id()).unwrap_or(u32::MAX);
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        Ok(Self {
            fd: Arc::new(fd),
            supported_cpuid,
            irqchip: None,
            routing: None,
            tsc_deadline,
            readonly_mem,
            max_vcpus,
            max_vcpu_id,
            slots: Arc::new(SlotAllocator::default()),
        })
    }

    /// Checks that KVM takes `vcpus` vCPUs with IDs (= APIC IDs) 0..vcpus.
    pub fn check_vcpus(&self, vcpus: u32) -> Result<(), VmError> {
        let too_many = |max, cap| VmError::TooManyVcpus { vcpus, max, cap };
        if vcpus > self.max_vcpus {
            return Err(too_many(self.max_vcpus, "KVM_CAP_MAX_VCPUS"));
        }
        // IDs are below KVM_CAP_MAX_VCPU_ID.
        if vcpus > self.max_vcpu_id {
            return Err(too_many(self.max_vcpu_id, "KVM_CAP_MAX_VCPU_ID"));
        }
        Ok(())
    }

    /// Has KVM's routes and KVM_SIGNAL_MSI take 32-bit x2APIC destinations, destination ID
    /// bits 31:8 in address bits 63:40 (KVM_CAP_X2APIC_API with KVM_X2APIC_API_USE_32BIT_IDS),
    /// and no longer treat destination 0xff as a broadcast in x2APIC mode (the broadcast
    /// quirk), so that remapped interrupts can reach APIC IDs above 254. Before the vCPUs.
    pub fn enable_x2apic_api(&self) -> Result<(), VmError> {
        if !self.fd.check_extension(Cap::X2ApicApi) {
            return Err(VmError::MissingCap("KVM_CAP_X2APIC_API"));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X2APIC_API,
            ..Default::default()
        };
        cap.args[0] =
            u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
        self.fd
            .enable_cap(&cap)
            .map_err(ioctl("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for region in mem.iter() {
            // Regions come from GuestMemoryMmap::from_ranges: their start is mapped.
            let host = region.as_ptr() as u64;
            let slot = self.slots.allocate();
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the mapping belongs to `mem`, which outlives the VM (the Vmm owns both
            // and drops the VM first).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| VmError::MemorySlot {
                slot,
                addr: r.guest_phys_addr,
                size: r.memory_size,
                source,
            })?;
        }
        Ok(())
    }

    /// Whether KVM can map read-only memory (guest writes to it exit as MMIO).
    pub fn has_readonly_mem(&self) -> bool {
        self.readonly_mem
    }

    /// Maps `size` bytes at `host` into the guest at `gpa`, read-only: reads are memory loads,
    /// writes exit as MMIO. Returns the slot.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped for as long as the slot exists: until the VM is
    /// gone, or the slot is deleted (a zero-sized KVM_SET_USER_MEMORY_REGION on it).
    pub unsafe fn map_readonly(&self, gpa: u64, size: u64, host: u64) -> Result<u32, VmError> {
        let slot = self.slots.allocate();
        let r = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller keeps the mapping alive while the VM can run.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| VmError::MemorySlot {
            slot,
            addr: gpa,
            size,
            source,
        })?;
        Ok(slot)
    }

    /// Creates the irqchip and the routing table. Must precede vCPU creation. In-kernel: the
    /// PIC/IOAPIC pair and the PIT. Split: local APICs only, GSIs 0..24 reserved for the VMM's
    /// IOAPIC; no PIC and no PIT.
    pub fn setup_irqchip(&mut self, irqchip: Irqchip) -> Result<(), VmError> {
        match irqchip {
            Irqchip::Kernel => {
                self.fd
                    .create_irq_chip()
                    .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
            }
            Irqchip::Split => {
                if !self.fd.check_extension(Cap::SplitIrqchip) {
                    return Err(VmError::MissingCap("KVM_CAP_SPLIT_IRQCHIP"));
                }
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                cap.args[0] = u64::from(IOAPIC_PINS);
                self.fd
                    .enable_cap(&cap)
                    .map_err(ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
            }
        }
        self.routing = Some(KvmRouting::new(self.fd.clone(), irqchip));
        self.irqchip = Some(irqchip);
        Ok(())
    }

    /// Whether KVM has the local APICs (either irqchip).
    pub fn has_irqchip(&self) -> bool {
        self.irqchip.is_some()
    }

    /// The irqchip, once set up.
    pub fn irqchip(&self) -> Option<Irqchip> {
        self.irqchip
    }

    /// The VM's GSI routing table, once the irqchip exists: every MSI route, irqfd and (split
    /// irqchip) IOAPIC pin goes through it.
    pub fn routing(&self) -> Option<&Arc<KvmRouting>> {
        self.routing.as_ref()
    }

    /// Whether KVM emulates the TSC deadline timer (its CPUID bit is ours to set).
    pub fn has_tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// KVM_GET_SUPPORTED_CPUID's answer.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The raw VM fd, for devices that need more ioctls (VFIO's KVM device, GSI routes).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd, shared: for components that outlive a borrow (a passthrough device mapping
    /// its BARs, the VT-d's and the IOAPIC's KVM_SIGNAL_MSI).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The memory slot allocator, shared with devices that add slots.
    pub fn slots(&self) -> Arc<SlotAllocator> {
        self.slots.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique() {
        let s = SlotAllocator::default();
        assert_eq!((s.allocate(), s.allocate(), s.allocate()), (0, 1, 2));
    }
}
