//! The interrupt-entry cache (VT-d spec 6.2.x, "Interrupt Entry Cache"): the remapping-table
//! entries the unit read for emulated devices' interrupt requests, by interrupt index. Emptied
//! by interrupt-entry-cache invalidations (6.5.2.7) and by an interrupt remapping table pointer
//! set (6.7, ESIRTPS). Only present, valid entries are cached.

use super::lru::Lru;
use crate::intremap::{IecScope, Irte};

#[derive(Debug)]
pub struct InterruptEntryCache {
    entries: Lru<u32, Irte>,
}

impl InterruptEntryCache {
    pub fn new(capacity: usize) -> Self {
        InterruptEntryCache {
            entries: Lru::new(capacity),
        }
    }

    pub fn get(&mut self, index: u32) -> Option<Irte> {
        self.entries.get(&index).copied()
    }

    pub fn insert(&mut self, index: u32, irte: Irte) -> bool {
        self.entries.insert(index, irte).is_some()
    }

    /// Removes the entries `scope` covers and returns them.
    pub fn invalidate(&mut self, scope: IecScope) -> Vec<(u32, Irte)> {
        self.entries.remove_where(|&i, _| scope.covers_index(i))
    }

    pub fn clear(&mut self) -> usize {
        self.entries.clear()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &Irte)> {
        self.entries.iter()
    }

    pub fn contains(&self, index: u32, irte: &Irte) -> bool {
        self.entries.peek(&index) == Some(irte)
    }
}
