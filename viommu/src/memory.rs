//! Guest memory as the remapping unit touches it: every read of a table, descriptor or IRTE and
//! every write it makes (wait status, first-stage accessed and dirty flags) goes through
//! [`TableMemory`], so one adapter ([`crate::record::Tap`]) can see all of them. Plain guest
//! memory implements it directly, at no cost.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

/// What the unit does with guest memory. Addresses are guest-physical; a failed access (any
/// byte outside guest RAM) is reported, never partial.
pub trait TableMemory {
    /// Reads `buf.len()` bytes at `addr`. False when any of them is outside guest memory (then
    /// `buf` holds nothing meaningful).
    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// Writes `data` at `addr`. False when any byte is outside guest memory.
    fn write_bytes(&self, addr: u64, data: &[u8]) -> bool;

    /// Atomically replaces the little-endian u64 at `addr` (8-byte aligned) with `new` if it
    /// holds `current`: Some(true) when it did, Some(false) when it held something else, None
    /// when the address is outside guest memory or unaligned.
    fn compare_exchange_u64(&self, addr: u64, current: u64, new: u64) -> Option<bool>;

    /// Reads the little-endian u64 at `addr`.
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read_bytes(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl<M: GuestMemoryBackend> TableMemory for M {
    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    fn write_bytes(&self, addr: u64, data: &[u8]) -> bool {
        self.write_slice(data, GuestAddress(addr)).is_ok()
    }

    fn compare_exchange_u64(&self, addr: u64, current: u64, new: u64) -> Option<bool> {
        let slice = self.get_slice(GuestAddress(addr), 8).ok()?;
        let cell = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
        Some(
            cell.compare_exchange(
                current.to_le(),
                new.to_le(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mem, TEST_MEM_SIZE};

    #[test]
    fn guest_memory_reads_writes_and_swaps_in_place_and_refuses_outside_it() {
        let m = mem();
        assert!(m.write_bytes(0x1000, &0x1122_3344_5566_7788u64.to_le_bytes()));
        assert_eq!(m.read_u64(0x1000), Some(0x1122_3344_5566_7788));
        assert_eq!(m.compare_exchange_u64(0x1000, 1, 2), Some(false));
        assert_eq!(
            m.compare_exchange_u64(0x1000, 0x1122_3344_5566_7788, 7),
            Some(true)
        );
        assert_eq!(m.read_u64(0x1000), Some(7));
        assert_eq!(m.read_u64(TEST_MEM_SIZE - 4), None, "straddles the end");
        assert!(!m.write_bytes(TEST_MEM_SIZE, &[1]));
        assert_eq!(m.compare_exchange_u64(TEST_MEM_SIZE, 0, 1), None);
    }
}
