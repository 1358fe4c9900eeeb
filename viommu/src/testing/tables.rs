//! A writer of legacy-mode root and context tables and of second-level page tables.

use vm_memory::{Bytes, GuestAddress};

use super::{Mem, TABLES_BASE};
use crate::walk::{perm_bits, PageTable};
use crate::{Perm, SourceId, PAGE_SIZE};

const ENTRY: u64 = 16;

/// Writes guest root, context and second-level tables into guest memory, as a guest driver
/// would, allocating table pages upwards from [`TABLES_BASE`](super::TABLES_BASE).
pub struct Tables {
    mem: Mem,
    /// Address of the root table.
    pub root: u64,
    next: u64,
}

impl Tables {
    /// Allocates an empty root table.
    pub fn new(mem: &Mem) -> Self {
        Self::at(mem, TABLES_BASE)
    }

    /// Allocates an empty root table at `base`, tables following it.
    pub fn at(mem: &Mem, base: u64) -> Self {
        let mut t = Tables {
            mem: mem.clone(),
            root: 0,
            next: base,
        };
        t.root = t.alloc();
        t
    }

    /// Continues with the root table at `root`, allocating new tables upwards from `next`.
    pub fn resume(mem: &Mem, root: u64, next: u64) -> Self {
        Tables {
            mem: mem.clone(),
            root,
            next,
        }
    }

    /// Allocates a zeroed table page.
    pub fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += PAGE_SIZE;
        self.mem
            .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(a))
            .expect("table page within test memory");
        a
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).expect("readable")
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).expect("writable");
    }

    pub fn read_root_raw(&self, bus: u8) -> u64 {
        self.read_u64(self.root + u64::from(bus) * ENTRY)
    }

    pub fn write_root_raw(&self, bus: u8, lo: u64) {
        self.write_u64(self.root + u64::from(bus) * ENTRY, lo);
    }

    fn context_table(&mut self, bus: u8) -> u64 {
        let lo = self.read_root_raw(bus);
        if lo & 1 != 0 {
            return lo & !0xfff;
        }
        let t = self.alloc();
        self.write_root_raw(bus, t | 1);
        t
    }

    fn context_addr(&mut self, sid: SourceId) -> u64 {
        self.context_table(sid.bus()) + u64::from(sid.devfn()) * ENTRY
    }

    pub fn read_context_raw(&mut self, sid: SourceId) -> [u64; 2] {
        let a = self.context_addr(sid);
        [self.read_u64(a), self.read_u64(a + 8)]
    }

    pub fn write_context_raw(&mut self, sid: SourceId, lo: u64, hi: u64) {
        let a = self.context_addr(sid);
        self.write_u64(a, lo);
        self.write_u64(a + 8, hi);
    }

    /// Allocates an empty second-level table of `levels` levels.
    pub fn page_table(&mut self, levels: u8) -> PageTable {
        PageTable {
            root: self.alloc(),
            levels,
        }
    }

    /// Points `sid`'s context entry at `pt` in `domain` (translation type multi-level).
    pub fn attach(&mut self, sid: SourceId, domain: u16, pt: PageTable) {
        let aw = u64::from(pt.levels - 2);
        self.write_context_raw(sid, pt.root | 1, aw | u64::from(domain) << 8);
    }

    /// Makes `sid`'s context entry a pass-through entry in `domain`.
    pub fn attach_pass_through(&mut self, sid: SourceId, domain: u16) {
        self.write_context_raw(sid, 0b10 << 2 | 1, 2 | u64::from(domain) << 8);
    }

    /// Gives `sid` a new, empty page table of `levels` levels in `domain`.
    pub fn context(&mut self, sid: SourceId, domain: u16, levels: u8) -> PageTable {
        let pt = self.page_table(levels);
        self.attach(sid, domain, pt);
        pt
    }

    /// Address of the entry at `level` for `iova`, allocating tables above it.
    fn entry_addr(&mut self, pt: PageTable, iova: u64, level: u8) -> u64 {
        let mut table = pt.root;
        for l in (level + 1..=pt.levels).rev() {
            let shift = 12 + 9 * (u32::from(l) - 1);
            let e = table + ((iova >> shift) & 511) * 8;
            let v = self.read_u64(e);
            table = if v & 3 != 0 && v & (1 << 7) == 0 {
                v & 0x000f_ffff_ffff_f000
            } else {
                let t = self.alloc();
                self.write_u64(e, t | 3);
                t
            };
        }
        let shift = 12 + 9 * (u32::from(level) - 1);
        table + ((iova >> shift) & 511) * 8
    }

    /// Address of the level-1 entry for `iova`, allocating tables above it.
    pub fn leaf_pte_addr(&mut self, pt: PageTable, iova: u64) -> u64 {
        self.entry_addr(pt, iova, 1)
    }

    /// Maps `len` bytes at `iova` to `gpa` with 4 KiB pages.
    pub fn map(&mut self, pt: PageTable, iova: u64, gpa: u64, len: u64, perm: Perm) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.entry_addr(pt, iova + off, 1);
            self.write_u64(e, (gpa + off) | perm_bits(perm));
        }
    }

    /// Maps one large page at `level` (2: 2 MiB, 3: 1 GiB).
    pub fn map_large(&mut self, pt: PageTable, iova: u64, gpa: u64, level: u8, perm: Perm) {
        let e = self.entry_addr(pt, iova, level);
        self.write_u64(e, gpa | perm_bits(perm) | 1 << 7);
    }

    /// Clears the 4 KiB entries over `len` bytes at `iova`.
    pub fn unmap(&mut self, pt: PageTable, iova: u64, len: u64) {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let e = self.entry_addr(pt, iova + off, 1);
            self.write_u64(e, 0);
        }
    }
}
