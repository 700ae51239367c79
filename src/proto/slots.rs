//! Values in numbered slots that keep their numbers while others come and go: a removed
//! value frees its slot for the next one added. Ids handed out stay valid (or vacant)
//! without renumbering anything else.

use std::ops::{Index, IndexMut};

pub(super) struct Slots<T> {
    slots: Vec<Option<T>>,
    /// Vacant slots, reused last-freed first.
    free: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    /// Puts `value` in a vacant slot (or a new one) and returns the slot's number.
    pub(super) fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(value);
                slot
            }
            None => {
                self.slots.push(Some(value));
                self.slots.len() - 1
            }
        }
    }

    /// Takes the value out of `slot`, which becomes vacant.
    pub(super) fn remove(&mut self, slot: usize) -> Option<T> {
        let value = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some(value)
    }

    pub(super) fn get(&self, slot: usize) -> Option<&T> {
        self.slots.get(slot)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// How many slots there are, vacant ones included.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The values, without their slot numbers.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.slots.iter().flatten()
    }

    /// Every slot in order, `None` where vacant.
    pub(super) fn slots(&self) -> impl Iterator<Item = Option<&T>> + '_ {
        self.slots.iter().map(Option::as_ref)
    }
}

impl<T> Index<usize> for Slots<T> {
    type Output = T;

    fn index(&self, slot: usize) -> &T {
        self.get(slot).expect("a slot that holds a value")
    }
}

impl<T> IndexMut<usize> for Slots<T> {
    fn index_mut(&mut self, slot: usize) -> &mut T {
        self.get_mut(slot).expect("a slot that holds a value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_slots_are_reused_and_others_keep_their_numbers() {
        let mut slots = Slots::default();
        let (a, b, c) = (slots.insert('a'), slots.insert('b'), slots.insert('c'));
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(slots.remove(b), Some('b'));
        assert_eq!(slots.remove(b), None, "already vacant");
        assert_eq!(slots.get(b), None);
        assert_eq!((slots[a], slots[c]), ('a', 'c'));
        assert_eq!(slots.insert('d'), b, "the vacant slot is reused");
        assert_eq!(slots.insert('e'), 3);
        assert_eq!(slots.iter().copied().collect::<String>(), "adce");
        assert_eq!(slots.len(), 4);
    }
}
