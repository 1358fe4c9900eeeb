//! Address-range buses for port I/O and MMIO exits: a sorted map from ranges to devices.
//!
//! Ranges can be added, removed and moved while vCPUs run (a guest relocating a PCI BAR), so
//! the map sits behind a RwLock; devices sit behind their own Mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `base` is the start of the range it was registered at (one device may be
/// registered at several, e.g. one per PCI BAR), `offset` the access's offset into it.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors changing a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// No device registered at that base.
    #[error("no device registered at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: I/O port space or guest physical MMIO space.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `base..base+len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The only candidates for overlap: the last range starting below our end.
        if let Some((&other, e)) = ranges.range(..base + len).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other,
                    other_len: e.len,
                });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unregisters the range starting at `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the range at `old` to `new` (same length); when the new range is invalid or
    /// overlaps another device, nothing changes.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let entry = ranges.remove(&old).ok_or(BusError::NotFound(old))?;
        let len = entry.len;
        let Some(end) = new.checked_add(len) else {
            ranges.insert(old, entry);
            return Err(BusError::InvalidRange { base: new, len });
        };
        // With the moved range out of the map, the only candidate is another device's.
        let clash = ranges
            .range(..end)
            .next_back()
            .filter(|(&b, e)| b + e.len > new)
            .map(|(&b, e)| (b, e.len));
        if let Some((other, other_len)) = clash {
            ranges.insert(old, entry);
            return Err(BusError::Overlap {
                base: new,
                len,
                other,
                other_len,
            });
        }
        ranges.insert(new, entry);
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        // The whole access must fall inside the range.
        if addr - base + size as u64 <= e.len {
            Some((base, e.device.clone()))
        } else {
            None
        }
    }

    /// Dispatches a read; false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x100f, &mut b), "access straddling the end");
        assert!(!bus.read(0xfff, &mut [0u8; 1]));
        assert!(bus.write(0x100e, &[7, 8]));
        assert_eq!(dev.lock().unwrap().last, Some((0x1000, 0xe, vec![7, 8])));
    }

    #[test]
    fn a_refused_relocation_names_the_device_in_the_way_and_changes_nothing() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        bus.insert(dev.clone(), 0x1010, 0x20).unwrap();
        assert_eq!(
            bus.relocate(0x1000, 0x1008),
            Err(BusError::Overlap {
                base: 0x1008,
                len: 0x10,
                other: 0x1010,
                other_len: 0x20
            })
        );
        assert_eq!(
            bus.relocate(0x1000, u64::MAX - 4),
            Err(BusError::InvalidRange {
                base: u64::MAX - 4,
                len: 0x10
            })
        );
        assert!(bus.read(0x1000, &mut [0u8; 4]), "still at its old place");
        bus.relocate(0x1000, 0xff8)
            .expect("over its own old range is fine");
        assert!(bus.read(0xff8, &mut [0u8; 4]));
    }

    #[test]
    fn overlap_remove_relocate() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x100f, 1),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xff0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev.clone(), 0x1010, 0x10).unwrap();
        assert!(bus.relocate(0x1000, 0x1008).is_err());
        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(bus.read(0x2000, &mut [0u8; 4]));
        assert!(!bus.read(0x1000, &mut [0u8; 4]));
        bus.remove(0x2000).unwrap();
        assert_eq!(bus.remove(0x2000).err(), Some(BusError::NotFound(0x2000)));
        assert_eq!(
            bus.insert(dev, 5, 0).unwrap_err(),
            BusError::InvalidRange { base: 5, len: 0 }
        );
    }
}
