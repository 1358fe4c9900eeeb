//! edu's Address Translation Services, when the unit it sits behind offers device-TLBs
//! (`--viommu ...,device-iotlb=on`, ECAP.DT); QEMU's edu has none. edu then is a PCI Express
//! root-complex integrated endpoint (so an OS reaches its extended configuration space, through
//! ECAM) with the ATS extended capability (PCIe Base 4.0, 10.5.1), and has a device-TLB.
//!
//! While software sets ATS Enable, each DMA request of edu's engine first looks in the
//! device-TLB: a hit is a translated request, which the unit does not walk again; a miss is a
//! translation request, whose completion the device-TLB keeps (the unit answers it and fills
//! the device-TLB, [`viommu::Vtd::attach_device_tlb`]). Only device-TLB invalidations the guest
//! queues at the unit, and clearing ATS Enable, empty it.

use viommu::ats::SharedDeviceTlb;
use viommu::SourceId;
use vm_device::pci::configuration::PciConfiguration;
use vm_device::pci::pcie::AtsCapability;

use crate::devices::vtd::{self, SharedVtd};

/// Where the PCI Express capability goes: after MSI's at 0x40, the last of the list.
pub const PCIE_CAP_OFFSET: u8 = 0x80;
/// Where the ATS capability goes: the first (and only) extended capability.
pub const ATS_CAP_OFFSET: usize = 0x100;
/// Translations the device-TLB holds. A transfer spans at most the 4 KiB buffer, two pages;
/// more entries let a driver's repeated transfers hit, as on a device with a real ATC.
pub const DEVICE_TLB_ENTRIES: usize = 64;
/// Invalidate requests edu takes at once: it completes each as the unit forwards it, so the
/// most the field can say (32).
const INVALIDATE_QUEUE_DEPTH: u8 = 32;

/// edu's ATS capability and the device-TLB it governs.
pub struct EduAts {
    cap: AtsCapability,
    tlb: SharedDeviceTlb,
}

impl EduAts {
    /// When `unit` offers device-TLBs, gives the function of `config` its PCI Express and ATS
    /// capabilities and puts a device-TLB for requester `source` behind `unit`; None otherwise
    /// (edu stays a conventional function, as QEMU's).
    pub fn attach(
        config: &mut PciConfiguration,
        unit: &SharedVtd,
        source: SourceId,
    ) -> Option<Self> {
        let mut unit = vtd::lock(unit);
        if !unit.config().device_iotlb {
            return None;
        }
        config
            .add_pcie_capability(PCIE_CAP_OFFSET.into())
            .expect("the PCI Express capability fits at its fixed offset");
        let cap = AtsCapability::add(config, ATS_CAP_OFFSET, 0, INVALIDATE_QUEUE_DEPTH)
            .expect("the ATS capability fits at the start of extended space");
        let tlb = SharedDeviceTlb::new(DEVICE_TLB_ENTRIES);
        unit.attach_device_tlb(source, tlb.clone());
        Some(EduAts { cap, tlb })
    }

    /// Follows a config write to dword register `reg`: ATS Enable turns translation requests
    /// on; clearing it drops every cached translation (10.5.1.3: the function may not use
    /// them). The Smallest Translation Unit stays in the register: the unit's completions are
    /// of its page sizes, 4 KiB at least, and edu keeps them as they come.
    pub fn config_written(&self, config: &PciConfiguration, reg: usize) {
        if !self.cap.controls(reg) {
            return;
        }
        let control = self.cap.control(config);
        let mut tlb = self.tlb.lock();
        if tlb.enabled() != control.enabled {
            log::debug!(
                "edu: ATS {} (STU {})",
                if control.enabled { "on" } else { "off" },
                control.stu
            );
            tlb.set_enabled(control.enabled);
        }
    }

    /// The device-TLB.
    pub fn device_tlb(&self) -> &SharedDeviceTlb {
        &self.tlb
    }
}
