//! The allocator's volatile state, rebuilt from the persistent chunk heads and run bitmaps when
//! the heap opens: which chunks are free, which runs have free blocks, what is reserved.

use std::collections::{BTreeMap, HashSet};

use super::layout::chunk::Head;
use super::layout::RunGeometry;

/// Chunk-level state. `mirror` is the persistent partition exactly as the heads on media say
/// (changed only after a commit made it so); `free` is what may be handed out now: the free
/// elements, coalesced, minus reservations.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    pub count: u32,
    pub mirror: BTreeMap<u32, Head>,
    pub free: BTreeMap<u32, u32>,
    /// Large blocks (by first chunk) with a free pending in some transaction.
    pub freeing: HashSet<u32>,
}

impl Chunks {
    /// Takes `k` chunks from the first free extent that holds them.
    pub fn take(&mut self, k: u32) -> Option<u32> {
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= k)?;
        self.free.remove(&start);
        if len > k {
            self.free.insert(start + k, len - k);
        }
        Some(start)
    }

    /// Makes `start..start + len` available again, merging with its neighbours.
    pub fn give_back(&mut self, mut start: u32, mut len: u32) {
        if let Some((&prev, &plen)) = self.free.range(..start).next_back() {
            if prev + plen == start {
                self.free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }

    /// Adds never-used chunks after growth.
    pub fn extend(&mut self, new_count: u32) {
        let old = self.count;
        for c in old..new_count {
            self.mirror.insert(c, Head::Free(1));
        }
        self.count = new_count;
        if new_count > old {
            self.give_back(old, new_count - old);
        }
    }

    /// The head writes that turn the persistently free chunks `start..start + k` into one
    /// element with `head`: shorten the free element before it, write the new head, and head the
    /// free remainder after it.
    pub fn carve(&self, start: u32, k: u32, head: Head) -> Result<Vec<(u32, Head)>, String> {
        let covering = |c: u32| {
            self.mirror
                .range(..=c)
                .next_back()
                .map(|(&s, &h)| (s, h))
                .filter(|&(s, h)| s + h.len() > c)
                .ok_or_else(|| format!("chunk {c} is in no element"))
        };
        let mut writes = Vec::with_capacity(3);
        let (first, first_head) = covering(start)?;
        if !matches!(first_head, Head::Free(_)) {
            return Err(format!("chunk {start} is not free ({first_head:?} at {first})"));
        }
        if first < start {
            writes.push((first, Head::Free(start - first)));
        }
        writes.push((start, head));
        for (&s, &h) in self.mirror.range(start..start + k) {
            if !matches!(h, Head::Free(_)) {
                return Err(format!("chunk {s} inside the new element is not free ({h:?})"));
            }
        }
        let (last, last_head) = covering(start + k - 1)?;
        let end = last + last_head.len();
        if end > start + k {
            writes.push((start + k, Head::Free(end - start - k)));
        }
        Ok(writes)
    }

    /// Records in the mirror that `writes` (from [`carve`](Chunks::carve) for
    /// `start..start + k`) are now persistent.
    pub fn install(&mut self, start: u32, k: u32, writes: &[(u32, Head)]) {
        let covered: Vec<u32> = self.mirror.range(start..start + k).map(|(&s, _)| s).collect();
        for s in covered {
            self.mirror.remove(&s);
        }
        for &(c, head) in writes {
            self.mirror.insert(c, head);
        }
    }
}

/// A run's volatile state.
#[derive(Debug)]
pub(crate) struct Run {
    pub class: usize,
    pub geo: RunGeometry,
    /// Allocated or reserved blocks.
    pub taken: Vec<u64>,
    /// Blocks with a free pending in some transaction.
    pub freeing: Vec<u64>,
    /// Blocks neither taken nor reserved.
    pub available: u64,
    /// Some lane uses it as its current run for the class.
    pub owned: bool,
    /// It is on its class's list of runs with free blocks.
    pub listed: bool,
}

impl Run {
    pub fn new(class: usize, bitmap: Vec<u64>) -> Run {
        let geo = RunGeometry::of(class);
        let used: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        Run {
            class,
            geo,
            freeing: vec![0; bitmap.len()],
            taken: bitmap,
            available: geo.blocks - used,
            owned: false,
            listed: false,
        }
    }

    /// Reserves a free block, returning its index.
    pub fn reserve(&mut self) -> Option<u64> {
        if self.available == 0 {
            return None;
        }
        for (w, word) in self.taken.iter_mut().enumerate() {
            let free = !*word;
            if free != 0 {
                let bit = u64::from(free.trailing_zeros());
                let index = w as u64 * 64 + bit;
                if index >= self.geo.blocks {
                    break;
                }
                *word |= 1 << bit;
                self.available -= 1;
                return Some(index);
            }
        }
        None
    }

    /// Makes block `index` available again.
    pub fn release(&mut self, index: u64) {
        self.taken[(index / 64) as usize] &= !(1 << (index % 64));
        self.available += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: u32) -> Chunks {
        let mut c = Chunks::default();
        c.extend(n);
        c
    }

    #[test]
    fn extents_are_taken_first_fit_and_coalesce_when_given_back() {
        let mut c = chunks(10);
        assert_eq!(c.take(3), Some(0));
        assert_eq!(c.take(3), Some(3));
        assert_eq!(c.take(5), None);
        c.give_back(0, 3);
        c.give_back(3, 3);
        assert_eq!(c.free.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(), vec![(0, 10)]);
    }

    #[test]
    fn carving_splits_free_elements_around_the_new_one() {
        let mut c = chunks(0);
        c.mirror.insert(0, Head::Free(10));
        c.count = 10;
        let writes = c.carve(2, 3, Head::Large(3)).unwrap();
        assert_eq!(writes, vec![(0, Head::Free(2)), (2, Head::Large(3)), (5, Head::Free(5))]);
        c.install(2, 3, &writes);
        assert_eq!(c.mirror.len(), 3);
        assert!(c.carve(3, 1, Head::Run(0)).is_err(), "inside an allocated element");
        let writes = c.carve(5, 5, Head::Large(5)).unwrap();
        assert_eq!(writes, vec![(5, Head::Large(5))]);
    }
}
