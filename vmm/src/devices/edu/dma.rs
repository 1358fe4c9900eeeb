//! edu's DMA engine: the source, destination and count registers, the 4 KiB device buffer at
//! device address 0x40000, and transfers between it and guest memory that go through the
//! virtual VT-d when the function sits behind it.
//!
//! A transfer runs to completion (or to its first refused page) when the guest starts it, so
//! the start bit never reads back set; QEMU's edu instead completes 100 ms of virtual time
//! later. Software that polls the command register, as drivers for edu do, sees no difference.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use viommu::{Access, SourceId, PAGE_SIZE};
use vm_device::{debug_limited, warn_limited};

use crate::devices::vtd::{self, SharedVtd};

/// The device buffer, in the device's own address space (edu.rst, "DMA controller").
pub const BUFFER_ADDR: u64 = 0x4_0000;
pub const BUFFER_SIZE: u64 = 4096;
/// The addresses edu can reach in guest memory: QEMU's default `dma_mask`, 28 bits (edu.rst,
/// "Command line switches"); higher address bits are dropped, as QEMU clamps them.
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

/// Which way a transfer goes (command bit 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From guest memory (the source register) to the buffer (the destination register).
    ToDevice,
    /// From the buffer (source) to guest memory (destination).
    ToRam,
}

/// The engine's registers, buffer and path to guest memory.
pub struct DmaEngine {
    mem: GuestMemoryMmap,
    /// The remapping unit the transfers go through, when the function is behind one.
    iommu: Option<SharedVtd>,
    mask: u64,
    pub src: u64,
    pub dst: u64,
    pub count: u64,
    buffer: Box<[u8; BUFFER_SIZE as usize]>,
}

impl DmaEngine {
    /// An engine reaching `mem` directly, or through `iommu`.
    pub fn new(mem: GuestMemoryMmap, iommu: Option<SharedVtd>) -> Self {
        Self {
            mem,
            iommu,
            mask: DEFAULT_DMA_MASK,
            src: 0,
            dst: 0,
            count: 0,
            buffer: Box::new([0; BUFFER_SIZE as usize]),
        }
    }

    /// The guest-physical address and contiguous length for an access to `addr`, or None when
    /// the remapping unit refuses it (it has then recorded and signalled the fault). While edu
    /// enables ATS ([`super::ats`]) the request goes through its device-TLB: a translated
    /// request on a hit, a translation request filling it on a miss.
    fn translate(&self, source: SourceId, addr: u64, access: Access) -> Option<(u64, u64)> {
        match &self.iommu {
            Some(unit) => vtd::lock(unit).translate(source, addr, access).ok(),
            None => Some((addr, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))),
        }
    }

    /// Runs the transfer the registers describe as requester `source`, stopping at the first
    /// page the remapping unit refuses or that is not guest RAM. A transfer that does not fit
    /// the buffer moves nothing (QEMU logs it and copies past its buffer).
    pub fn transfer(&mut self, source: SourceId, direction: Direction) {
        let (buf_addr, ram_addr) = match direction {
            Direction::ToRam => (self.src, self.dst),
            Direction::ToDevice => (self.dst, self.src),
        };
        let len = self.count;
        let Some(off) = buf_addr
            .checked_sub(BUFFER_ADDR)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= BUFFER_SIZE))
        else {
            warn_limited!(
                "edu: DMA of {len:#x} bytes at device address {buf_addr:#x} is outside the buffer"
            );
            return;
        };
        let ram_addr = ram_addr & self.mask;
        let access = match direction {
            Direction::ToRam => Access::Write,
            Direction::ToDevice => Access::Read,
        };
        let mut done = 0;
        while done < len {
            // The masked address plus a length within the buffer cannot overflow.
            let iova = ram_addr + done;
            let Some((gpa, room)) = self.translate(source, iova, access) else {
                debug_limited!("edu: DMA stopped at {iova:#x}: not translated");
                return;
            };
            let n = room.min(len - done);
            let at = (off + done) as usize..(off + done + n) as usize;
            let moved = match direction {
                Direction::ToRam => self.mem.write_slice(&self.buffer[at], GuestAddress(gpa)),
                Direction::ToDevice => self.mem.read_slice(&mut self.buffer[at], GuestAddress(gpa)),
            };
            if moved.is_err() {
                debug_limited!("edu: DMA stopped at guest-physical {gpa:#x}: not guest RAM");
                return;
            }
            done += n;
        }
    }
}
