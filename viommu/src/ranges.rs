//! Sets of address ranges as sorted vectors of disjoint, non-adjacent `[start, end)` pairs.

/// A half-open address range `[start, end)`.
pub type Range = (u64, u64);

/// Sorts and merges overlapping or adjacent ranges, dropping empty ones.
pub fn normalize(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    ranges.dedup_by(|next, last| {
        let joins = next.0 <= last.1;
        if joins {
            last.1 = last.1.max(next.1);
        }
        joins
    });
    ranges
}

/// The parts of `a` not in `b` (both normalized).
pub fn subtract(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > s {
                out.push((s, b[k].0));
            }
            s = s.max(b[k].1);
            k += 1;
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// The parts of `a` also in `b` (both normalized).
pub fn intersect(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Total length of normalized ranges.
pub fn total(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| r.1 - r.0).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_overlapping_and_adjacent() {
        assert_eq!(
            normalize(vec![(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]),
            vec![(0, 3), (5, 9)]
        );
    }

    #[test]
    fn subtract_and_intersect_split_ranges() {
        let a = [(0, 10), (20, 30)];
        let b = [(2, 4), (8, 22), (29, 40)];
        assert_eq!(subtract(&a, &b), vec![(0, 2), (4, 8), (22, 29)]);
        assert_eq!(intersect(&a, &b), vec![(2, 4), (8, 10), (20, 22), (29, 30)]);
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(total(&a), 20);
    }
}
