//! A bounded map that evicts its least recently used entry: the replacement policy of every
//! translation cache of the unit (the guest controls what fills them, so each has a fixed size).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Up to `capacity` entries; a lookup makes an entry the most recently used, an insert into a
/// full map evicts the least recently used one. A capacity of zero holds nothing.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, u64)>,
    /// Entries by last use.
    order: BTreeMap<u64, K>,
    clock: u64,
}

impl<K: Copy + Eq + Hash, V> Lru<K, V> {
    pub fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The entry for `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let stamp = self.clock + 1;
        let (_, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = stamp;
        self.order.insert(stamp, *key);
        self.clock = stamp;
        self.entries.get(key).map(|(v, _)| v)
    }

    /// The entry for `key`, its use not counted.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Stores `value` for `key` as the most recently used entry; returns the entry evicted to
    /// make room, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if self.capacity == 0 {
            return None;
        }
        let stamp = self.tick();
        if let Some((_, used)) = self.entries.insert(key, (value, stamp)) {
            self.order.remove(&used);
            self.order.insert(stamp, key);
            return None;
        }
        self.order.insert(stamp, key);
        if self.entries.len() <= self.capacity {
            return None;
        }
        let (_, oldest) = self.order.pop_first()?;
        self.entries.remove(&oldest).map(|(v, _)| (oldest, v))
    }

    /// Removes the entries `drop` selects and returns them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&K, &V) -> bool) -> Vec<(K, V)> {
        let keys: Vec<K> = self
            .entries
            .iter()
            .filter(|(k, (v, _))| drop(k, v))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let (v, used) = self.entries.remove(&k)?;
                self.order.remove(&used);
                Some((k, v))
            })
            .collect()
    }

    /// Removes every entry; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        self.order.clear();
        n
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (v, _))| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_entry() {
        let mut c = Lru::new(2);
        assert_eq!(c.insert(1, "a"), None);
        assert_eq!(c.insert(2, "b"), None);
        assert_eq!(c.get(&1), Some(&"a"), "1 is now the most recent");
        assert_eq!(c.insert(3, "c"), Some((2, "b")));
        assert_eq!(c.peek(&2), None);
        assert_eq!(c.len(), 2);
        // Peeking does not refresh: 1 was used before 3 was inserted.
        assert_eq!(c.peek(&1), Some(&"a"));
        assert_eq!(c.insert(4, "d"), Some((1, "a")));
    }

    #[test]
    fn replacing_an_entry_evicts_nothing_and_refreshes_it() {
        let mut c = Lru::new(2);
        c.insert(1, 10);
        c.insert(2, 20);
        assert_eq!(c.insert(1, 11), None);
        assert_eq!(c.insert(3, 30), Some((2, 20)));
        assert_eq!(c.peek(&1), Some(&11));
    }

    #[test]
    fn a_zero_sized_cache_holds_nothing() {
        let mut c = Lru::new(0);
        assert_eq!(c.insert(1, 1), None);
        assert!(c.is_empty());
        assert_eq!(c.get(&1), None);
    }

    #[test]
    fn selected_entries_are_removed_and_returned() {
        let mut c = Lru::new(8);
        for k in 0..6 {
            c.insert(k, k * 10);
        }
        let mut gone = c.remove_where(|k, _| k % 2 == 0);
        gone.sort_unstable();
        assert_eq!(gone, vec![(0, 0), (2, 20), (4, 40)]);
        assert_eq!(c.len(), 3);
        // The order book stayed consistent: filling up evicts the oldest survivor first.
        for k in 10..15 {
            c.insert(k, 0);
        }
        assert_eq!(c.insert(15, 0), Some((1, 10)));
        assert_eq!(c.clear(), 8);
        assert!(c.is_empty());
    }
}
