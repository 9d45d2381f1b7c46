//! A table indexed by a small id (QID, NSID): a vector of slots, no hashing on the hot
//! path. Ids outside it are simply absent.

pub struct IdTable<T> {
    slots: Vec<Option<T>>,
}

impl<T> IdTable<T> {
    pub fn new(ids: usize) -> IdTable<T> {
        IdTable {
            slots: (0..ids).map(|_| None).collect(),
        }
    }

    #[inline]
    pub fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize)?.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    /// Put `value` at `id`; false if `id` is outside the table. Returns what was there.
    pub fn insert(&mut self, id: u32, value: T) -> Option<T> {
        self.slots
            .get_mut(id as usize)
            .and_then(|slot| slot.replace(value))
    }

    pub fn remove(&mut self, id: u32) -> Option<T> {
        self.slots.get_mut(id as usize)?.take()
    }

    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| i as u32)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(Option::as_ref)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().filter_map(Option::as_mut)
    }
}
