//! A writer of scalable-mode tables (root, context, PASID directory and PASID table entries) and
//! of first-stage page tables, laying the bits out as Linux's intel-iommu driver does
//! (`pasid.c`, `iommu.c`) rather than through the model's own decoders.

use super::{Mem, Tables, TABLES_BASE};
use crate::first_stage::FirstStageTable;
use crate::walk::PageTable;
use crate::{SourceId, PAGE_SIZE};

/// Bytes of a scalable-mode context entry.
const CONTEXT_ENTRY: u64 = 32;
/// Bytes of a PASID table entry.
const PASID_ENTRY: u64 = 64;
/// PASID table entries per table: PASID bits 5:0 index it, bits 19:6 the directory.
const PASIDS_PER_TABLE: u32 = 64;

// PGTT values of a PASID entry (bits 8:6).
const PGTT_FIRST_STAGE: u64 = 0b001;
const PGTT_SECOND_STAGE: u64 = 0b010;
const PGTT_PASS_THROUGH: u64 = 0b100;

/// What a first-stage leaf grants, as Linux's first-level entries say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstStageFlags {
    /// R/W: writes allowed.
    pub write: bool,
    /// U/S: user requests allowed (Linux sets it on every first-level entry).
    pub user: bool,
}

impl FirstStageFlags {
    /// What Linux's DMA domains map: readable and writable by user requests.
    pub const USER_RW: FirstStageFlags = FirstStageFlags {
        write: true,
        user: true,
    };
    pub const USER_RO: FirstStageFlags = FirstStageFlags {
        write: false,
        user: true,
    };

    /// The entry bits: P, R/W, U/S, and XD as Linux 6.1 sets it on every first-level entry.
    fn bits(self) -> u64 {
        1 | u64::from(self.write) << 1 | u64::from(self.user) << 2 | 1 << 63
    }
}

/// Writes scalable-mode translation structures into guest memory, allocating pages upwards.
pub struct ScalableTables {
    /// Allocates pages and writes second-stage page tables.
    pages: Tables,
    /// Address of the scalable-mode root table.
    pub root: u64,
}

impl ScalableTables {
    /// Allocates an empty root table at [`TABLES_BASE`].
    pub fn new(mem: &Mem) -> Self {
        Self::at(mem, TABLES_BASE)
    }

    /// Allocates an empty root table at `base`, tables following it.
    pub fn at(mem: &Mem, base: u64) -> Self {
        let mut pages = Tables::resume(mem, 0, base);
        let root = pages.alloc();
        ScalableTables { pages, root }
    }

    /// The page allocator and second-stage page-table writer these tables share.
    pub fn pages(&mut self) -> &mut Tables {
        &mut self.pages
    }

    fn read(&self, addr: u64) -> u64 {
        self.pages.read_u64(addr)
    }

    fn write(&self, addr: u64, v: u64) {
        self.pages.write_u64(addr, v)
    }

    /// Address of the root entry half (lower for devfn 0-127, upper for 128-255) of `sid`.
    pub fn root_half_addr(&self, sid: SourceId) -> u64 {
        self.root + u64::from(sid.bus()) * 16 + if sid.devfn() >= 128 { 8 } else { 0 }
    }

    /// The table the entry at `entry` points to (present bit 0, address 63:12), allocating it
    /// and making the entry present first if it is not.
    fn table_of(&mut self, entry: u64) -> u64 {
        let v = self.read(entry);
        if v & 1 != 0 {
            return v & !0xfff;
        }
        let t = self.pages.alloc();
        self.write(entry, t | 1);
        t
    }

    /// Address of `sid`'s 256-bit context entry, allocating its context table.
    pub fn context_addr(&mut self, sid: SourceId) -> u64 {
        let half = self.root_half_addr(sid);
        self.table_of(half) + u64::from(sid.devfn() & 0x7f) * CONTEXT_ENTRY
    }

    pub fn read_context_raw(&mut self, sid: SourceId) -> [u64; 4] {
        let a = self.context_addr(sid);
        [0, 1, 2, 3].map(|i| self.read(a + i * 8))
    }

    pub fn write_context_raw(&mut self, sid: SourceId, words: [u64; 4]) {
        let a = self.context_addr(sid);
        for (i, w) in words.iter().enumerate() {
            self.write(a + i as u64 * 8, *w);
        }
    }

    /// Gives `sid` a present context entry with a PASID directory of 2^(`pdts` + 7) entries and
    /// `rid_pasid` for its requests without a PASID (Linux: PDTS 2, RID_PASID 0); `pasid_enable`
    /// sets PASIDE. Returns the directory's address.
    pub fn context(&mut self, sid: SourceId, pdts: u8, rid_pasid: u32, pasid_enable: bool) -> u64 {
        let dir_pages = ((1u64 << (pdts + 7)) * 8).div_ceil(PAGE_SIZE);
        let dir = self.pages.alloc();
        for _ in 1..dir_pages {
            self.pages.alloc();
        }
        let lo = dir | u64::from(pdts & 7) << 9 | u64::from(pasid_enable) << 3 | 1;
        self.write_context_raw(sid, [lo, u64::from(rid_pasid & 0xf_ffff), 0, 0]);
        dir
    }

    /// The PASID directory `sid`'s context entry points to.
    fn directory(&mut self, sid: SourceId) -> u64 {
        self.read_context_raw(sid)[0] & !0xfff
    }

    /// Address of the 512-bit PASID table entry of `pasid` behind `sid`, allocating its table.
    pub fn pasid_entry_addr(&mut self, sid: SourceId, pasid: u32) -> u64 {
        let dir_entry = self.pasid_dir_entry_addr(sid, pasid);
        self.table_of(dir_entry) + u64::from(pasid % PASIDS_PER_TABLE) * PASID_ENTRY
    }

    /// Address of the PASID directory entry of `pasid` behind `sid`.
    pub fn pasid_dir_entry_addr(&mut self, sid: SourceId, pasid: u32) -> u64 {
        self.directory(sid) + u64::from(pasid / PASIDS_PER_TABLE) * 8
    }

    pub fn read_pasid_raw(&mut self, sid: SourceId, pasid: u32) -> [u64; 8] {
        let a = self.pasid_entry_addr(sid, pasid);
        [0, 1, 2, 3, 4, 5, 6, 7].map(|i| self.read(a + i * 8))
    }

    pub fn write_pasid_raw(&mut self, sid: SourceId, pasid: u32, words: [u64; 8]) {
        let a = self.pasid_entry_addr(sid, pasid);
        for (i, w) in words.iter().enumerate() {
            self.write(a + i as u64 * 8, *w);
        }
    }

    /// Points `pasid` of `sid` at the second-stage table `pt` in `domain`
    /// (`intel_pasid_setup_second_level`: AW, PGTT 010b, DID, PWSNP as ECAP.SMPWC allows).
    pub fn second_stage(&mut self, sid: SourceId, pasid: u32, domain: u16, pt: PageTable) {
        let aw = u64::from(pt.levels - 2);
        let lo = pt.root | PGTT_SECOND_STAGE << 6 | aw << 2 | 1;
        let hi = u64::from(domain) | 1 << 23;
        self.write_pasid_raw(sid, pasid, [lo, hi, 0, 0, 0, 0, 0, 0]);
    }

    /// Makes `pasid` of `sid` pass-through (`intel_pasid_setup_pass_through`).
    pub fn pass_through(&mut self, sid: SourceId, pasid: u32, domain: u16) {
        let lo = PGTT_PASS_THROUGH << 6 | 2 << 2 | 1;
        self.write_pasid_raw(
            sid,
            pasid,
            [lo, u64::from(domain) | 1 << 23, 0, 0, 0, 0, 0, 0],
        );
    }

    /// Points `pasid` of `sid` at the first-stage table `fs` in `domain`
    /// (`intel_pasid_setup_first_level`: FLPTR, FLPM 4-level, SRE and WPE for supervisor
    /// PASIDs, PGTT 001b).
    pub fn first_stage(&mut self, sid: SourceId, pasid: u32, domain: u16, fs: FirstStageTable) {
        let lo = PGTT_FIRST_STAGE << 6 | 2 << 2 | 1;
        let fs_word = fs.root | u64::from(fs.supervisor) | u64::from(fs.write_protect) << 4;
        self.write_pasid_raw(
            sid,
            pasid,
            [lo, u64::from(domain) | 1 << 23, fs_word, 0, 0, 0, 0, 0],
        );
    }

    /// Gives `sid` a context entry (PDTS 2, RID_PASID 0, as Linux does) whose RID_PASID entry
    /// points at a new second-stage table of `levels` levels in `domain`.
    pub fn attach_second_stage(&mut self, sid: SourceId, domain: u16, levels: u8) -> PageTable {
        self.context(sid, 2, 0, false);
        let pt = self.pages.page_table(levels);
        self.second_stage(sid, 0, domain, pt);
        pt
    }

    /// Allocates an empty 4-level first-stage table for user requests only.
    pub fn first_stage_table(&mut self) -> FirstStageTable {
        FirstStageTable {
            root: self.pages.alloc(),
            supervisor: false,
            write_protect: false,
        }
    }

    /// Address of the first-stage entry at `level` for `iova`, allocating tables above it with
    /// P, R/W, U/S and A set (Linux's `pfn_to_dma_pte` for first-level domains).
    pub fn first_stage_entry_addr(&mut self, fs: FirstStageTable, iova: u64, level: u8) -> u64 {
        let mut table = fs.root;
        for l in (level + 1..=4u8).rev() {
            let shift = 12 + 9 * (u32::from(l) - 1);
            let e = table + ((iova >> shift) & 511) * 8;
            let v = self.read(e);
            table = if v & 1 != 0 && v & (1 << 7) == 0 {
                v & 0x000f_ffff_ffff_f000
            } else {
                let t = self.pages.alloc();
                self.write(e, t | 0b111 | 1 << 5 | 1 << 63);
                t
            };
        }
        let shift = 12 + 9 * (u32::from(level) - 1);
        table + ((iova >> shift) & 511) * 8
    }

    /// Maps `len` bytes at `iova` to `gpa` with 4 KiB first-stage pages.
    pub fn map_first_stage(
        &mut self,
        fs: FirstStageTable,
        iova: u64,
        gpa: u64,
        len: u64,
        flags: FirstStageFlags,
    ) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.first_stage_entry_addr(fs, iova + off, 1);
            self.write(e, (gpa + off) | flags.bits());
        }
    }

    /// Maps one first-stage large page at `level` (2: 2 MiB, 3: 1 GiB).
    pub fn map_first_stage_large(
        &mut self,
        fs: FirstStageTable,
        iova: u64,
        gpa: u64,
        level: u8,
        flags: FirstStageFlags,
    ) {
        let e = self.first_stage_entry_addr(fs, iova, level);
        self.write(e, gpa | flags.bits() | 1 << 7);
    }

    /// Clears the 4 KiB first-stage entries over `len` bytes at `iova`.
    pub fn unmap_first_stage(&mut self, fs: FirstStageTable, iova: u64, len: u64) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.first_stage_entry_addr(fs, iova + off, 1);
            self.write(e, 0);
        }
    }

    /// Reads a guest word (a table entry, to check accessed and dirty flags).
    pub fn read_u64(&self, addr: u64) -> u64 {
        self.read(addr)
    }

    /// Writes a guest word (to corrupt an entry).
    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, v)
    }
}
