//! [`Seen`]: guest memory as the unit last saw it, page by page, so the recorder can tell which
//! bytes of a read changed since.

use std::collections::HashMap;

use crate::PAGE_SIZE;

/// One page of guest memory as the unit last saw it. Bytes it never saw count as zero: a replay
/// starts from zeroed memory.
pub(super) type Page = [u8; PAGE_SIZE as usize];

/// Slots of the direct-mapped cache in front of the index. A submission reads a queue page and
/// one table page a level, and a workload keeps coming back to the same few, so nearly every
/// lookup hits and costs no hashing.
const RECENT: usize = 64;

/// The pages the unit has seen, with a small cache of the recent ones.
pub(super) struct Seen {
    pages: Vec<Box<Page>>,
    /// Page number to its index in `pages`. SipHash (the default) because a guest chooses the
    /// page numbers; the cache keeps it off the common path.
    index: HashMap<u64, usize>,
    /// By page number modulo [`RECENT`]: (page number + 1, index in `pages`); 0 when empty.
    recent: [(u64, usize); RECENT],
}

impl Seen {
    pub(super) fn new() -> Self {
        Seen {
            pages: Vec::new(),
            index: HashMap::new(),
            recent: [(0, 0); RECENT],
        }
    }

    /// Page `number`, when the unit has seen it.
    #[inline]
    pub(super) fn get_mut(&mut self, number: u64) -> Option<&mut Page> {
        let slot = (number % RECENT as u64) as usize;
        let (tag, at) = self.recent[slot];
        if tag == number.wrapping_add(1) {
            return self.pages.get_mut(at).map(|p| &mut **p);
        }
        let at = *self.index.get(&number)?;
        self.recent[slot] = (number.wrapping_add(1), at);
        self.pages.get_mut(at).map(|p| &mut **p)
    }

    /// Page `number`, zeroed if the unit has not seen it yet.
    pub(super) fn get_or_insert(&mut self, number: u64) -> &mut Page {
        let at = match self.index.get(&number) {
            Some(&at) => at,
            None => {
                self.pages.push(Box::new([0; PAGE_SIZE as usize]));
                let at = self.pages.len() - 1;
                self.index.insert(number, at);
                at
            }
        };
        self.recent[(number % RECENT as u64) as usize] = (number.wrapping_add(1), at);
        &mut self.pages[at]
    }

    /// Forgets every page (the recording stopped).
    pub(super) fn clear(&mut self) {
        *self = Seen::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_found_again_through_the_cache_and_past_it() {
        let mut s = Seen::new();
        assert!(s.get_mut(5).is_none());
        s.get_or_insert(5)[7] = 1;
        // Same cache slot as page 5: evicts it from the cache, not from the index.
        s.get_or_insert(5 + RECENT as u64)[7] = 2;
        assert_eq!(s.get_mut(5).map(|p| p[7]), Some(1));
        assert_eq!(s.get_mut(5 + RECENT as u64).map(|p| p[7]), Some(2));
        assert_eq!(
            s.get_or_insert(5)[7],
            1,
            "an existing page is not zeroed again"
        );
        assert!(s.get_mut(5 + 2 * RECENT as u64).is_none());
        assert!(s.get_mut(0).is_none(), "an empty cache slot is not page 0");
        s.clear();
        assert!(s.get_mut(5).is_none());
    }
}
