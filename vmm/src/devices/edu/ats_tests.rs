//! edu with ATS: its capabilities only behind a unit with device-TLBs, ATS Enable governing
//! its device-TLB, its DMA served from the device-TLB until a device-TLB invalidation.

use viommu::descriptor::encode;
use viommu::testing::{Driver, Tables};
use viommu::{Perm, Vtd, VtdConfig};
use vm_device::pci::spec::{
    PCI_ATS_CAP_PAGE_ALIGNED, PCI_ATS_CTRL_ENABLE, PCI_CAP_ID_EXP, PCI_EXT_CAP_ID_ATS,
};

use super::*;
use crate::devices::edu::ats::{ATS_CAP_OFFSET, PCIE_CAP_OFFSET};
use crate::devices::vtd::{self, VtdUnit};

const DOMAIN: u16 = 1;
const IOVA: u64 = 0x10_0000;
/// The two pages IOVA maps in turn, below the test tables.
const PAGE_A: u64 = 0x20_0000;
const PAGE_B: u64 = 0x20_1000;
/// Where edu writes back what it read (identity-mapped).
const OUT: u64 = 0x30_0000;
/// Context entry translation type 01b: untranslated requests, and translation requests
/// (VT-d 9.3).
const TT_DEVICE_TLB: u64 = 0b01 << 2;
const ATS_CONTROL: usize = ATS_CAP_OFFSET + 6;

/// A unit with (or without) device-TLBs that translates edu's requests through the guest's
/// tables (IOVA mapped to PAGE_A, OUT to itself, ATS allowed by the context entry when the unit
/// has device-TLBs), and the driver that programs it.
struct Rig {
    mem: GuestMemoryMmap,
    unit: SharedVtd,
    drv: Driver,
    /// IOVA's leaf page-table entry.
    pte: u64,
}

impl Rig {
    fn new(device_iotlb: bool) -> Self {
        let mem = viommu::testing::mem();
        for (page, byte) in [(PAGE_A, 0xaa), (PAGE_B, 0xbb)] {
            mem.write_slice(&[byte; 8], GuestAddress(page)).unwrap();
        }
        let config = VtdConfig {
            caching_mode: false,
            device_iotlb,
            ..VtdConfig::default()
        };
        let vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(viommu::testing::RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        let unit = VtdUnit::new(vtd, None, None);
        let mut t = Tables::new(&mem);
        let pt = t.context(source(), DOMAIN, 4);
        if device_iotlb {
            // Without ECAP.DT translation type 01b is reserved (a context entry fault).
            let [lo, hi] = t.read_context_raw(source());
            t.write_context_raw(source(), lo | TT_DEVICE_TLB, hi);
        }
        t.map(pt, IOVA, PAGE_A, 0x1000, Perm::RW);
        t.map(pt, OUT, OUT, 0x1000, Perm::RW);
        let pte = t.leaf_pte_addr(pt, IOVA);
        let mut drv = Driver::new();
        {
            let mut u = vtd::lock(&unit);
            drv.enable_qi(&mut u);
            drv.set_root(&mut u, t.root);
            let setup = [encode::context_global(), encode::iotlb_global()];
            assert!(drv.submit_sync(&mut u, &mem, &setup, 1));
            drv.set_translation(&mut u, true);
        }
        Rig {
            mem,
            unit,
            drv,
            pte,
        }
    }

    fn edu(&self) -> Edu {
        let interrupts = EduInterrupts {
            msi: Arc::new(Msis::default()),
            intx: None,
        };
        let mut e = Edu::new(
            self.mem.clone(),
            source(),
            Some(self.unit.clone()),
            interrupts,
        );
        command(&mut e, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
        e
    }

    /// Queues `descs` and a wait, as a driver's synchronous invalidation.
    fn invalidate(&mut self, descs: &[[u64; 2]]) {
        let mut u = vtd::lock(&self.unit);
        assert!(self.drv.submit_sync(&mut u, &self.mem, descs, 2));
    }

    /// What edu reads at IOVA: a DMA into its buffer, then out to OUT.
    fn read_iova(&self, e: &mut Edu) -> u8 {
        self.mem.write_obj(0u8, GuestAddress(OUT)).unwrap();
        dma(e, IOVA, BUFFER_ADDR, 8, 0);
        dma(e, BUFFER_ADDR, OUT, 8, DMA_CMD_TO_RAM);
        self.mem.read_obj(GuestAddress(OUT)).unwrap()
    }

    fn device_tlb_stats(&self) -> (u64, u64, u64) {
        let c = vtd::lock(&self.unit).stats().caches.device_tlb;
        (c.hits, c.misses, c.invalidated)
    }
}

fn set_ats(e: &mut Edu, enable: bool) {
    let control = if enable { PCI_ATS_CTRL_ENABLE } else { 0 };
    config_write(e, ATS_CONTROL, &control.to_le_bytes());
}

fn device_tlb_len(e: &Edu) -> usize {
    e.ats.as_ref().expect("ATS").device_tlb().lock().len()
}

#[test]
fn without_device_tlbs_at_the_unit_edu_stays_a_conventional_function() {
    let rig = Rig::new(false);
    let mut e = rig.edu();
    assert!(e.ats.is_none());
    assert_eq!(config_read(&mut e, 0x40) & 0xffff, 0x0005, "MSI, the last");
    assert_eq!(config_read(&mut e, usize::from(PCIE_CAP_OFFSET)), 0);
    assert_eq!(config_read(&mut e, ATS_CAP_OFFSET), 0);
    assert_eq!(rig.read_iova(&mut e), 0xaa, "DMA as before");
}

#[test]
fn with_device_tlbs_edu_is_an_rc_integrated_endpoint_with_ats_after_msi() {
    let rig = Rig::new(true);
    let mut e = rig.edu();
    let msi = config_read(&mut e, 0x40);
    assert_eq!(msi & 0xff, 0x05);
    assert_eq!(
        (msi >> 8) & 0xff,
        u32::from(PCIE_CAP_OFFSET),
        "MSI, then PCIe"
    );
    let pcie = config_read(&mut e, PCIE_CAP_OFFSET.into());
    assert_eq!(pcie & 0xff, u32::from(PCI_CAP_ID_EXP));
    assert_eq!((pcie >> 8) & 0xff, 0, "the last capability");
    assert_eq!(
        (pcie >> 16) & 0xff,
        0x92,
        "version 2, root-complex integrated endpoint"
    );
    let header = config_read(&mut e, ATS_CAP_OFFSET);
    assert_eq!(
        header,
        u32::from(PCI_EXT_CAP_ID_ATS) | 1 << 16,
        "ATS v1, the last"
    );
    let regs = config_read(&mut e, ATS_CAP_OFFSET + 4);
    assert_eq!(
        regs,
        u32::from(PCI_ATS_CAP_PAGE_ALIGNED),
        "queue depth 32, page-aligned requests; ATS disabled, STU 4 KiB"
    );
    set_ats(&mut e, true);
    assert_eq!(config_read(&mut e, ATS_CAP_OFFSET + 4) >> 16, 0x8000);
    assert!(e.ats.as_ref().unwrap().device_tlb().lock().enabled());
    // MSI still works around it.
    enable_msi(&mut e);
    assert_eq!(config_read(&mut e, 0x40) >> 16 & 1, 1);
    assert_eq!((config_read(&mut e, 0x40) >> 8) & 0xff, 0x80);
}

#[test]
fn with_ats_enabled_dma_is_served_from_the_device_tlb_until_a_device_tlb_invalidation() {
    let mut rig = Rig::new(true);
    let mut e = rig.edu();
    set_ats(&mut e, true);
    assert_eq!(rig.read_iova(&mut e), 0xaa);
    assert_eq!(
        device_tlb_len(&e),
        2,
        "IOVA's and OUT's translation completions"
    );
    assert_eq!(rig.device_tlb_stats(), (0, 2, 0));
    // The driver remaps IOVA and invalidates the IOTLB only: the unit no longer caches the old
    // translation, the device does, and its translated request is not walked again.
    rig.mem
        .write_obj(PAGE_B | 3, GuestAddress(rig.pte))
        .unwrap();
    rig.invalidate(&[encode::iotlb_page(DOMAIN, IOVA, 0, false)]);
    assert_eq!(
        rig.read_iova(&mut e),
        0xaa,
        "the stale device-TLB entry, as on hardware"
    );
    assert_eq!(rig.device_tlb_stats(), (2, 2, 0));
    rig.invalidate(&[encode::device_iotlb(source(), IOVA, false)]);
    assert_eq!(device_tlb_len(&e), 1, "OUT's translation stays");
    assert_eq!(rig.read_iova(&mut e), 0xbb, "a new translation request");
    assert_eq!(rig.device_tlb_stats(), (3, 3, 1));
}

#[test]
fn clearing_ats_enable_drops_the_device_tlb_and_dma_goes_untranslated() {
    let rig = Rig::new(true);
    let mut e = rig.edu();
    assert_eq!(
        rig.read_iova(&mut e),
        0xaa,
        "ATS off at reset: untranslated requests"
    );
    assert_eq!(device_tlb_len(&e), 0);
    set_ats(&mut e, true);
    assert_eq!(rig.read_iova(&mut e), 0xaa);
    assert_eq!(device_tlb_len(&e), 2);
    // STU written with Enable kept: the cache stays.
    config_write(
        &mut e,
        ATS_CONTROL,
        &(PCI_ATS_CTRL_ENABLE | 1).to_le_bytes(),
    );
    assert_eq!(device_tlb_len(&e), 2);
    set_ats(&mut e, false);
    assert_eq!(device_tlb_len(&e), 0);
    assert_eq!(rig.read_iova(&mut e), 0xaa);
    assert_eq!(device_tlb_len(&e), 0, "nothing cached while ATS is off");
}
