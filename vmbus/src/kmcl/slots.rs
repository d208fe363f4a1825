//! A generation-checked slot table: the storage behind every KMCL handle of [`super::bus::Bus`] (channels, packets,
//! packet completions).
//!
//! Implements the handle rule of issue 6 §7 for the client objects: a handle names a slot and the slot's generation;
//! removing an object bumps the generation before the slot is reused, so a stale or forged handle finds nothing
//! instead of aliasing the slot's next object. A slot whose generation would wrap is retired for good.

use alloc::vec::Vec;

/// One slot: its current generation and, while it is in use, its value.
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Objects addressed by `(index, generation)` pairs; generations start at 1, so an all-zero handle is never valid.
pub(crate) struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slots<T> {
    /// An empty table.
    pub(crate) const fn new() -> Slots<T> {
        Slots { slots: Vec::new(), free: Vec::new(), len: 0 }
    }

    /// Stores `value` and returns its `(index, generation)`, or `None` when the index space is exhausted.
    pub(crate) fn insert(&mut self, value: T) -> Option<(u32, u32)> {
        if let Some(index) = self.free.pop() {
            let slot = self.slots.get_mut(index as usize)?;
            slot.value = Some(value);
            self.len += 1;
            return Some((index, slot.generation));
        }
        let index = u32::try_from(self.slots.len()).ok()?;
        self.slots.push(Slot { generation: 1, value: Some(value) });
        self.len += 1;
        Some((index, 1))
    }

    /// The value at `(index, generation)`, if that pair names a live object.
    pub(crate) fn get(&self, index: u32, generation: u32) -> Option<&T> {
        self.slots.get(index as usize).filter(|slot| slot.generation == generation)?.value.as_ref()
    }

    /// The value at `(index, generation)`, mutably.
    pub(crate) fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        self.slots.get_mut(index as usize).filter(|slot| slot.generation == generation)?.value.as_mut()
    }

    /// Removes the object at `(index, generation)`; the slot's generation moves on, so the pair is stale from now on.
    pub(crate) fn remove(&mut self, index: u32, generation: u32) -> Option<T> {
        let slot = self.slots.get_mut(index as usize).filter(|slot| slot.generation == generation)?;
        let value = slot.value.take()?;
        self.len -= 1;
        match slot.generation.checked_add(1) {
            Some(next) => {
                slot.generation = next;
                self.free.push(index);
            }
            // Retired: a wrapped generation could make an ancient handle valid again.
            None => slot.generation = 0,
        }
        Some(value)
    }

    /// Number of live objects.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The `(index, generation)` of every live object, in index order.
    pub(crate) fn keys(&self) -> Vec<(u32, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(index, slot)| (index as u32, slot.generation))
            .collect()
    }

    /// Removes every object (each slot's generation moves on) and returns them.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let keys = self.keys();
        keys.into_iter().filter_map(|(index, generation)| self.remove(index, generation)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_slot_is_reused_with_a_new_generation_and_the_old_pair_is_stale() {
        let mut slots = Slots::new();
        let (a, ga) = slots.insert("a").unwrap();
        assert_eq!((a, ga), (0, 1));
        assert_eq!(slots.remove(a, ga), Some("a"));
        assert_eq!(slots.remove(a, ga), None);
        let (b, gb) = slots.insert("b").unwrap();
        assert_eq!((b, gb), (0, 2));
        assert_eq!(slots.get(a, ga), None, "the stale pair does not reach the new object");
        assert_eq!(slots.get(b, gb), Some(&"b"));
        assert_eq!(slots.get(7, 1), None);
        assert_eq!(slots.get(0, 0), None);
        assert_eq!(slots.len(), 1);
        assert_eq!(slots.drain(), ["b"]);
        assert_eq!(slots.len(), 0);
    }

    #[test]
    fn a_slot_whose_generation_would_wrap_is_retired() {
        let mut slots = Slots::new();
        let (index, _) = slots.insert(1).unwrap();
        slots.slots[0].generation = u32::MAX;
        assert_eq!(slots.remove(index, u32::MAX), Some(1));
        assert_eq!(slots.get(index, 0), None);
        let (next, generation) = slots.insert(2).unwrap();
        assert_eq!((next, generation), (1, 1), "slot 0 is never handed out again");
    }
}
