//! The IOTLB (VT-d spec 6.2.4): leaf translations of emulated devices' requests, one entry per
//! page of the size the tables map (4 KiB, 2 MiB or 1 GiB), tagged as the invalidations that
//! remove them select: by domain, by PASID in scalable mode, and by the stage that translated
//! (IOTLB invalidations, 6.5.2.3, remove second-stage translations; PASID-based-IOTLB
//! invalidations, 6.5.2.4, first-stage ones). Paging-structure caches are not modelled: only
//! leaves are cached, which the spec allows (an implementation may cache less).

use super::lru::Lru;
use crate::first_stage::FirstStageTable;
use crate::ranges::Range;
use crate::walk::PageTable;
use crate::Perm;

/// Which table translated an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Second-level (legacy) or second-stage (scalable mode) tables.
    Second,
    /// First-stage tables (scalable mode).
    First,
}

/// What an entry is tagged with, besides its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    pub domain: u16,
    /// The PASID whose entry named the table (scalable mode); None in legacy mode.
    pub pasid: Option<u32>,
    pub stage: Stage,
    /// A supervisor request's translation (first-stage privilege checks differ).
    pub privileged: bool,
}

/// One cached page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub tag: Tag,
    /// The page's input address, aligned to its size.
    pub base: u64,
    /// log2 of the page size: 12, 21 or 30.
    pub shift: u8,
}

impl Key {
    pub fn size(&self) -> u64 {
        1 << self.shift
    }

    /// The input addresses the entry covers.
    pub fn range(&self) -> Range {
        (self.base, self.base.saturating_add(self.size()))
    }
}

/// What an entry says about its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// A translation: the page's output address and the permissions the walk found. `dirty`
    /// says whether a first-stage walk already set the leaf's dirty flag (a write through an
    /// entry without it walks again, as hardware must to set the flag).
    Leaf { gpa: u64, perm: Perm, dirty: bool },
    /// A not-present page, cached only in caching mode (6.1: a unit reporting CM may cache
    /// not-present and erroneous entries; one that does not report it must not).
    NotPresent,
}

/// The table a cached page was walked from. Hardware does not keep it; the model does, so that
/// the protocol checker can walk the same table again to tell whether the entry went stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Second(PageTable),
    First(FirstStageTable),
}

/// One cached page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub page: Page,
    pub table: Table,
}

/// Which entries an invalidation removes; None matches any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub domain: Option<u16>,
    pub pasid: Option<u32>,
    pub stage: Option<Stage>,
    /// Entries overlapping this range of input addresses.
    pub range: Option<Range>,
}

impl Selector {
    pub const ALL: Selector = Selector {
        domain: None,
        pasid: None,
        stage: None,
        range: None,
    };

    pub fn matches(&self, key: &Key) -> bool {
        let overlaps = |(start, end): Range| {
            let (b, e) = key.range();
            b < end && start < e
        };
        self.domain.is_none_or(|d| d == key.tag.domain)
            && self.pasid.is_none_or(|p| Some(p) == key.tag.pasid)
            && self.stage.is_none_or(|s| s == key.tag.stage)
            && self.range.is_none_or(overlaps)
    }
}

/// Page sizes a lookup tries, smallest first.
const SHIFTS: [u8; 3] = [12, 21, 30];

/// The IOTLB.
#[derive(Debug)]
pub struct Iotlb {
    entries: Lru<Key, Entry>,
}

impl Iotlb {
    pub fn new(capacity: usize) -> Self {
        Iotlb {
            entries: Lru::new(capacity),
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry translating `iova` under `tag`, whatever page size holds it.
    pub fn lookup(&mut self, tag: Tag, iova: u64) -> Option<(Key, Entry)> {
        SHIFTS.iter().find_map(|&shift| {
            let key = Key {
                tag,
                base: iova & !((1u64 << shift) - 1),
                shift,
            };
            self.entries.get(&key).map(|e| (key, *e))
        })
    }

    /// Caches `entry` for the page `key`; returns the entry evicted to make room.
    pub fn insert(&mut self, key: Key, entry: Entry) -> Option<(Key, Entry)> {
        self.entries.insert(key, entry)
    }

    /// Removes the entries `sel` matches and returns them.
    pub fn invalidate(&mut self, sel: &Selector) -> Vec<(Key, Entry)> {
        if *sel == Selector::ALL {
            let all: Vec<(Key, Entry)> = self.entries.iter().map(|(k, e)| (*k, *e)).collect();
            self.entries.clear();
            return all;
        }
        self.entries.remove_where(|k, _| sel.matches(k))
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.entries.iter()
    }

    /// The entry of `key`, its use not counted.
    pub fn peek(&self, key: &Key) -> Option<Entry> {
        self.entries.peek(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(domain: u16) -> Tag {
        Tag {
            domain,
            pasid: None,
            stage: Stage::Second,
            privileged: false,
        }
    }

    fn leaf(gpa: u64) -> Entry {
        Entry {
            page: Page::Leaf {
                gpa,
                perm: Perm::RW,
                dirty: false,
            },
            table: Table::Second(PageTable {
                root: 0x1000,
                levels: 4,
            }),
        }
    }

    #[test]
    fn a_lookup_finds_the_page_of_whatever_size_covers_the_address() {
        let mut t = Iotlb::new(8);
        let big = Key {
            tag: tag(1),
            base: 0x4000_0000,
            shift: 21,
        };
        t.insert(big, leaf(0x80_0000));
        let (k, e) = t
            .lookup(tag(1), 0x401f_f123)
            .expect("inside the 2 MiB page");
        assert_eq!((k, e), (big, leaf(0x80_0000)));
        assert_eq!(t.lookup(tag(1), 0x4020_0000), None, "past its end");
        assert_eq!(t.lookup(tag(2), 0x4000_0000), None, "another domain");
    }

    #[test]
    fn a_range_invalidation_removes_every_page_it_overlaps_in_its_domain() {
        let mut t = Iotlb::new(8);
        let k4 = |base| Key {
            tag: tag(1),
            base,
            shift: 12,
        };
        let big = Key {
            tag: tag(1),
            base: 0x20_0000,
            shift: 21,
        };
        for k in [k4(0x1000), k4(0x2000), big] {
            t.insert(k, leaf(0));
        }
        t.insert(
            Key {
                tag: tag(2),
                ..k4(0x1000)
            },
            leaf(0),
        );
        // One page inside the large one removes it whole; a page of another domain stays.
        let gone = t.invalidate(&Selector {
            domain: Some(1),
            range: Some((0x2000, 0x3000)),
            ..Selector::ALL
        });
        assert_eq!(gone, vec![(k4(0x2000), leaf(0))]);
        let gone = t.invalidate(&Selector {
            domain: Some(1),
            range: Some((0x30_0000, 0x30_1000)),
            ..Selector::ALL
        });
        assert_eq!(gone, vec![(big, leaf(0))]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.invalidate(&Selector::ALL).len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn stage_and_pasid_selectors_keep_the_other_translations() {
        let mut t = Iotlb::new(8);
        let first = Tag {
            pasid: Some(5),
            stage: Stage::First,
            ..tag(1)
        };
        let second = Tag {
            pasid: Some(0),
            ..tag(1)
        };
        for tag in [first, second] {
            t.insert(
                Key {
                    tag,
                    base: 0,
                    shift: 12,
                },
                leaf(0),
            );
        }
        let gone = t.invalidate(&Selector {
            domain: Some(1),
            stage: Some(Stage::Second),
            ..Selector::ALL
        });
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0.tag, second);
        assert!(t.lookup(first, 0).is_some());
    }
}
