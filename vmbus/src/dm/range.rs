//! Page ranges and the record of the frames the guest has given to the host.
//!
//! Reference: `dynamic-memory.md` "Wire format" (page ranges of 4 KiB PFNs) and "Guest sequence" steps 5–6: the
//! driver remembers every frame it gave in a BALLOON_RESPONSE, so that an UNBALLOON_REQUEST can only give back
//! frames that really were given, and no frame is given twice.

use alloc::collections::BTreeMap;
use core::fmt;

/// A run of `count` 4 KiB guest frames starting at PFN `start`.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    /// The first page frame number.
    pub start: u64,
    /// The number of frames.
    pub count: u64,
}

impl PageRange {
    /// A range of `count` frames from `start`.
    pub const fn new(start: u64, count: u64) -> PageRange {
        PageRange { start, count }
    }

    /// One past the last frame, or `None` if that overflows `u64`.
    pub const fn end(self) -> Option<u64> {
        self.start.checked_add(self.count)
    }

    /// Whether the range holds no frames.
    pub const fn is_empty(self) -> bool {
        self.count == 0
    }
}

impl fmt::Debug for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{}", self.start, self.count)
    }
}

/// A set of frames kept as disjoint, non-adjacent ranges (adjacent inserts are merged).
///
/// The driver's record of frames in the host's hands. Every operation is O(log n + k) in the number of stored
/// ranges n and touched ranges k, and none can panic: ranges whose end overflows `u64` are refused.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageRangeSet {
    /// start → end (exclusive), disjoint and non-adjacent.
    ranges: BTreeMap<u64, u64>,
    /// Total frames in the set.
    pages: u64,
}

impl PageRangeSet {
    /// An empty set.
    pub const fn new() -> PageRangeSet {
        PageRangeSet { ranges: BTreeMap::new(), pages: 0 }
    }

    /// Number of frames in the set.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Number of stored (maximal) ranges.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The stored ranges in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.ranges.iter().map(|(&start, &end)| PageRange { start, count: end - start })
    }

    /// Whether any frame of `range` is in the set (false for an empty or overflowing range).
    pub fn overlaps(&self, range: PageRange) -> bool {
        let Some(end) = range.end() else { return false };
        if range.is_empty() {
            return false;
        }
        // The last stored range starting before `end` is the only candidate.
        self.ranges.range(..end).next_back().is_some_and(|(_, &stored_end)| stored_end > range.start)
    }

    /// Adds `range`; returns false and changes nothing if it is empty, overflows, or overlaps the set.
    pub fn insert(&mut self, range: PageRange) -> bool {
        let Some(mut end) = range.end() else { return false };
        if range.is_empty() || self.overlaps(range) {
            return false;
        }
        let mut start = range.start;
        // Merge with a left neighbour ending exactly at `start`.
        if let Some((&left_start, &left_end)) = self.ranges.range(..start).next_back()
            && left_end == start
        {
            self.ranges.remove(&left_start);
            start = left_start;
        }
        // Merge with a right neighbour starting exactly at `end`.
        if let Some(right_end) = self.ranges.remove(&end) {
            end = right_end;
        }
        self.ranges.insert(start, end);
        self.pages += range.count;
        true
    }

    /// Removes every frame of `range` that is in the set and calls `removed` with each removed piece, in
    /// ascending order. Returns the number of frames removed.
    pub fn remove(&mut self, range: PageRange, mut removed: impl FnMut(PageRange)) -> u64 {
        let Some(end) = range.end() else { return 0 };
        if range.is_empty() {
            return 0;
        }
        let mut total = 0;
        // The candidates: the stored range starting at or before `range.start`, and all starting inside.
        let first = self.ranges.range(..=range.start).next_back().map(|(&start, _)| start).unwrap_or(range.start);
        let touched: alloc::vec::Vec<(u64, u64)> =
            self.ranges.range(first..end).map(|(&start, &stored_end)| (start, stored_end)).collect();
        for (stored_start, stored_end) in touched {
            let cut_start = stored_start.max(range.start);
            let cut_end = stored_end.min(end);
            if cut_start >= cut_end {
                continue;
            }
            self.ranges.remove(&stored_start);
            if stored_start < cut_start {
                self.ranges.insert(stored_start, cut_start);
            }
            if cut_end < stored_end {
                self.ranges.insert(cut_end, stored_end);
            }
            let piece = PageRange { start: cut_start, count: cut_end - cut_start };
            total += piece.count;
            removed(piece);
        }
        self.pages -= total;
        total
    }

    /// Removes and returns every range.
    pub fn take_all(&mut self) -> alloc::vec::Vec<PageRange> {
        let all = self.iter().collect();
        self.ranges.clear();
        self.pages = 0;
        all
    }
}

impl fmt::Debug for PageRangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn inserts_merge_adjacent_and_refuse_overlaps() {
        let mut set = PageRangeSet::new();
        assert!(set.insert(PageRange::new(10, 5)));
        assert!(set.insert(PageRange::new(20, 5)));
        assert!(set.insert(PageRange::new(15, 5)));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![PageRange::new(10, 15)]);
        assert!(!set.insert(PageRange::new(24, 2)));
        assert!(!set.insert(PageRange::new(0, 11)));
        assert!(!set.insert(PageRange::new(30, 0)));
        assert!(!set.insert(PageRange::new(u64::MAX, 2)));
        assert_eq!(set.pages(), 15);
        assert!(set.overlaps(PageRange::new(24, 1)));
        assert!(!set.overlaps(PageRange::new(25, 100)));
        assert!(!set.overlaps(PageRange::new(0, 10)));
    }

    #[test]
    fn remove_splits_and_reports_pieces() {
        let mut set = PageRangeSet::new();
        set.insert(PageRange::new(0, 10));
        set.insert(PageRange::new(20, 10));
        let mut pieces = Vec::new();
        let removed = set.remove(PageRange::new(5, 20), |piece| pieces.push(piece));
        assert_eq!(removed, 10);
        assert_eq!(pieces, vec![PageRange::new(5, 5), PageRange::new(20, 5)]);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![PageRange::new(0, 5), PageRange::new(25, 5)]);
        assert_eq!(set.remove(PageRange::new(100, 5), |_| panic!("nothing to remove")), 0);
        assert_eq!(set.remove(PageRange::new(u64::MAX - 1, 5), |_| panic!("overflow")), 0);
        assert_eq!(set.take_all(), vec![PageRange::new(0, 5), PageRange::new(25, 5)]);
        assert!(set.is_empty());
        assert_eq!(set.pages(), 0);
    }

    proptest! {
        /// The set agrees with a plain bitmap model under random inserts and removes.
        #[test]
        fn agrees_with_a_bitmap(operations in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 1..60)) {
            let mut set = PageRangeSet::new();
            let mut model = [false; 240];
            for (insert, start, count) in operations {
                let range = PageRange::new(start, count);
                let span = start as usize..(start + count) as usize;
                if insert {
                    let free = model[span.clone()].iter().all(|&taken| !taken);
                    prop_assert_eq!(set.insert(range), free && count > 0);
                    if free {
                        model[span].iter_mut().for_each(|taken| *taken = true);
                    }
                } else {
                    let expected = model[span.clone()].iter().filter(|&&taken| taken).count() as u64;
                    let mut seen = 0;
                    prop_assert_eq!(set.remove(range, |piece| seen += piece.count), expected);
                    prop_assert_eq!(seen, expected);
                    model[span].iter_mut().for_each(|taken| *taken = false);
                }
                prop_assert_eq!(set.pages(), model.iter().filter(|&&taken| taken).count() as u64);
                let mut rebuilt = [false; 240];
                let mut previous_end = None;
                for range in set.iter() {
                    prop_assert!(range.count > 0);
                    if let Some(end) = previous_end {
                        prop_assert!(range.start > end, "stored ranges must be disjoint and non-adjacent");
                    }
                    previous_end = range.end();
                    rebuilt[range.start as usize..(range.start + range.count) as usize]
                        .iter_mut()
                        .for_each(|taken| *taken = true);
                }
                prop_assert_eq!(rebuilt, model);
            }
        }
    }
}
