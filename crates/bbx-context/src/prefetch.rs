//! Prefetch by co-access: after an agent accesses A, what it accessed next
//! is counted, and once one item usually follows A it is brought into memory
//! as soon as A is accessed again.

use crate::item::ItemId;
use rustc_hash::FxHashMap;

/// Followers remembered per item.
const FOLLOWERS: usize = 4;
/// Items whose followers are remembered, per agent; past it the table starts over.
const TRACKED: usize = 8192;

/// What followed what, per agent.
#[derive(Debug, Default)]
pub struct CoAccess {
    followers: FxHashMap<ItemId, Vec<(ItemId, u32)>>,
}

impl CoAccess {
    /// `next` was accessed right after `previous`.
    pub fn record(&mut self, previous: ItemId, next: ItemId) {
        if previous == next {
            return;
        }
        if self.followers.len() >= TRACKED && !self.followers.contains_key(&previous) {
            self.followers.clear();
        }
        let list = self.followers.entry(previous).or_default();
        match list.iter().position(|(id, _)| *id == next) {
            Some(known) => list[known].1 += 1,
            None if list.len() < FOLLOWERS => list.push((next, 1)),
            None => {
                // The rarest follower makes room, so a new habit can form.
                if let Some(rarest) = list.iter_mut().min_by_key(|(_, count)| *count) {
                    *rarest = (next, 1);
                }
            }
        }
    }

    /// The item that usually follows `id`: seen at least twice, and at least
    /// half the times anything followed it.
    pub fn predict(&self, id: ItemId) -> Option<ItemId> {
        let list = self.followers.get(&id)?;
        let total: u32 = list.iter().map(|(_, count)| count).sum();
        let (best, count) = list.iter().max_by_key(|(_, count)| *count)?;
        (*count >= 2 && *count * 2 >= total).then_some(*best)
    }

    pub fn forget(&mut self, id: ItemId) {
        self.followers.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_habit_is_predicted_once_it_repeats() {
        let mut co = CoAccess::default();
        co.record(1, 2);
        assert_eq!(co.predict(1), None);
        co.record(1, 2);
        assert_eq!(co.predict(1), Some(2));
        co.record(1, 3);
        co.record(1, 4);
        co.record(1, 5);
        assert_eq!(co.predict(1), None, "2 of 5 is no habit");
        co.forget(1);
        assert_eq!(co.predict(1), None);
    }
}
