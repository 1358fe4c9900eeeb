//! What the fuzz targets share: a small guest with one device behind the unit, and the
//! invariants every target checks.

use viommu::regs::*;
use viommu::tables::TableMode;
use viommu::testing::{Driver, ManualClock, RecordingMsi, SharedHost, SimHost};
use viommu::{Access, Perm, SourceId, Vtd, VtdConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// Guest RAM: two regions with a hole between them, as a VMM lays RAM around its MMIO hole.
pub const LOW_RAM: (u64, u64) = (0, 3 << 20);
pub const HIGH_RAM: (u64, u64) = (4 << 20, 5 << 20);
/// Where the harness keeps its own invalidation queue and status word for the final check; the
/// fuzzer may write there too, before the check rewrites it.
pub const CLEAN_QUEUE: u64 = 4 << 20;
pub const CLEAN_STATUS: u64 = CLEAN_QUEUE + 0x10000;
pub const DEV: SourceId = SourceId(0x0018);

pub fn ram_contains(gpa: u64, len: u64) -> bool {
    let end = gpa.saturating_add(len);
    [LOW_RAM, HIGH_RAM]
        .iter()
        .any(|&(s, e)| s <= gpa && end <= e)
}

/// Maps an arbitrary address into guest RAM, so most fuzzed pointers land somewhere real.
pub fn in_ram(addr: u64) -> u64 {
    let low = LOW_RAM.1 - LOW_RAM.0;
    let high = HIGH_RAM.1 - HIGH_RAM.0;
    let a = addr % (low + high);
    if a < low {
        LOW_RAM.0 + a
    } else {
        HIGH_RAM.0 + (a - low)
    }
}

pub struct Guest {
    pub mem: Mem,
    pub vtd: Vtd<Mem>,
    pub host: SharedHost,
}

impl Guest {
    pub fn new(config: VtdConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(LOW_RAM.0), (LOW_RAM.1 - LOW_RAM.0) as usize),
            (GuestAddress(HIGH_RAM.0), (HIGH_RAM.1 - HIGH_RAM.0) as usize),
        ])
        .expect("guest memory");
        let mut vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(RecordingMsi::default()),
            Box::new(ManualClock::default()),
        )
        .expect("config");
        let host = SharedHost::new(SimHost::with_limit(4096));
        vtd.attach(DEV, Box::new(host.clone())).expect("attach");
        Guest { mem, vtd, host }
    }

    pub fn write_mem(&self, addr: u64, value: u64) {
        let _ = self.mem.write_obj(value, GuestAddress(in_ram(addr) & !7));
    }

    /// Invariants that hold after every guest action, whatever the guest did.
    pub fn check_always(&mut self) {
        let host = self.host.get().extents();
        // The host never maps memory outside guest RAM.
        for &(iova, len, gpa, _) in &host {
            assert!(
                ram_contains(gpa, len),
                "iova {iova:#x} maps non-RAM {gpa:#x}+{len:#x}"
            );
        }
        // The unit's shadow says exactly what the host has, mapping for mapping.
        let host: Vec<(u64, u64, u64)> = host.iter().map(|&(i, l, g, _)| (i, l, g)).collect();
        assert_eq!(
            self.vtd.host_mappings(DEV),
            host,
            "shadow and host disagree"
        );
        // Registers stay within their fields.
        let iqh = Driver::read64(&self.vtd, IQH_REG) >> 4;
        let qs = Driver::read64(&self.vtd, IQA_REG) & IQA_QS_MASK;
        let fsts = Driver::read32(&self.vtd, FSTS_REG);
        assert!(
            iqh < 256 << qs || fsts & FSTS_IQE != 0,
            "IQH {iqh} outside the queue"
        );
        assert!(((fsts >> 8) & 0xff) < 8, "FRI beyond the fault records");
    }

    /// Brings the host up to date the way a guest driver would (a clean queue, SRTP with the
    /// current root, global PASID-cache, context and IOTLB invalidation), then checks the host
    /// translates exactly what the guest's tables say, page by page.
    pub fn check_quiesced(&mut self) {
        let gsts = Driver::read32(&self.vtd, GSTS_REG);
        let te = gsts & GSTS_TES;
        // A unit with ECAP.SMTS takes 256-bit descriptors in both modes, and needs them in
        // scalable mode (which the SRTP below latches again from RTADDR).
        let wide = Driver::read64(&self.vtd, ECAP_REG) & ECAP_SMTS != 0;
        let (dw, size) = if wide { (IQA_DW, 32) } else { (0, 16) };
        // Stop the queue, clear errors, point it at the clean area and restart it.
        Driver::write32(&mut self.vtd, GCMD_REG, te);
        Driver::write32(&mut self.vtd, FSTS_REG, FSTS_RW1C);
        Driver::write64(&mut self.vtd, IQT_REG, 0);
        Driver::write64(&mut self.vtd, IQA_REG, CLEAN_QUEUE | dw);
        Driver::write32(&mut self.vtd, GCMD_REG, te | GCMD_QIE);
        Driver::write32(&mut self.vtd, GCMD_REG, te | GCMD_QIE | GCMD_SRTP);
        let scalable = self.vtd.root_table_mode() == TableMode::Scalable;
        let mut descs = vec![
            viommu::descriptor::encode::context_global(),
            viommu::descriptor::encode::iotlb_global(),
            viommu::descriptor::encode::wait(Some((CLEAN_STATUS, 0x5a5a)), false, false),
        ];
        if scalable {
            descs.insert(0, viommu::descriptor::encode::pasid_cache_global());
        }
        for (i, d) in descs.iter().enumerate() {
            for (k, w) in [d[0], d[1], 0, 0].iter().take(size / 8).enumerate() {
                let addr = CLEAN_QUEUE + (i * size + k * 8) as u64;
                self.mem
                    .write_obj(*w, GuestAddress(addr))
                    .expect("clean queue");
            }
        }
        Driver::write64(&mut self.vtd, IQT_REG, (descs.len() * size) as u64);
        // Deferred mode may keep dropped pages mapped until its next flush: flush now.
        self.vtd.flush_deferred();
        let status: u32 = self
            .mem
            .read_obj(GuestAddress(CLEAN_STATUS))
            .expect("status");
        self.check_always();
        if self.vtd.stats().walk_budget_exceeded > 0 || self.vtd.stats().host_errors > 0 {
            // Tables too large to mirror, or the host refused: the host keeps what it had.
            return;
        }
        assert_eq!(status, 0x5a5a, "the clean wait completed");
        // Every host mapping is what the unit translates for a DMA of the same kind, probed at
        // its first, middle and last page.
        let host = self.host.get().extents();
        let probes = host.iter().take(1024).flat_map(|&(iova, len, gpa, perm)| {
            let pages = len / 0x1000;
            [0, pages / 2, pages - 1].map(|p| (iova + p * 0x1000, gpa + p * 0x1000, perm))
        });
        for (iova, gpa, perm) in probes {
            let r = self
                .vtd
                .translate(DEV, iova, Access::Read)
                .ok()
                .map(|t| t.0);
            let w = self
                .vtd
                .translate(DEV, iova, Access::Write)
                .ok()
                .map(|t| t.0);
            let want = Perm {
                read: r.is_some(),
                write: w.is_some(),
            };
            assert_eq!(perm, want, "iova {iova:#x} permissions");
            assert_eq!(r.or(w), Some(gpa), "iova {iova:#x} translation");
        }
    }
}
