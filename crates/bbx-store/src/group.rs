//! One group's transaction: what a [`crate::Staged`] write sees and stages.

use crate::{KeyspaceDef, Keyspaces, storage_error};
use bbx_core::Result;
use fjall::Keyspace;
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};

/// Per keyspace id: key -> `Some(value)` to insert, `None` to remove.
type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What a put or remove replaced: keyspace index, key, and its entry before
/// (none where the group had staged nothing for the key).
type Replaced = (usize, Vec<u8>, Option<Option<Vec<u8>>>);

/// One group's writes: an overlay of staged values over the database, so that a
/// write sees the effects of the writes before it in the same group.
pub struct GroupTx<'a> {
    keyspaces: &'a Keyspaces,
    staged: Vec<Overlay>,
    /// While [`GroupTx::all_or_nothing`] runs: the entry each put or remove
    /// replaced (none where there was none), to put back if it fails.
    undo: Option<Vec<Replaced>>,
    /// The largest value that fits in a journal record with room to spare.
    max_value: usize,
    caches: &'a mut Caches,
}

impl<'a> GroupTx<'a> {
    pub(crate) fn new(keyspaces: &'a Keyspaces, max_value: usize, caches: &'a mut Caches) -> Self {
        Self {
            keyspaces,
            staged: vec![Overlay::new(); keyspaces.len()],
            undo: None,
            max_value,
            caches,
        }
    }

    /// The keyspace itself, for scans; combine with [`GroupTx::staged`] to see the
    /// group's own writes.
    pub fn keyspace(&self, ks: KeyspaceDef) -> Result<&Keyspace> {
        self.keyspaces.get(ks.id)
    }

    /// A key's value as this group leaves it so far.
    pub fn read(&self, ks: KeyspaceDef, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(staged) = self.staged(ks).get(key) {
            return Ok(staged.clone());
        }
        let value = self.keyspace(ks)?.get(key).map_err(|e| storage_error("read", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// The keys under `prefix` as this group leaves them so far: stored ones
    /// it has not removed, and those it put.
    pub fn keys_with_prefix(&self, ks: KeyspaceDef, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut keys = std::collections::BTreeSet::new();
        for item in self.keyspace(ks)?.prefix(prefix) {
            keys.insert(item.key().map_err(|e| storage_error("scan", e))?.to_vec());
        }
        let staged = self.staged(ks).range(prefix.to_vec()..);
        for (key, value) in staged.take_while(|(key, _)| key.starts_with(prefix)) {
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
        Ok(keys.into_iter().collect())
    }

    /// What the group has staged in a keyspace so far.
    pub fn staged(&self, ks: KeyspaceDef) -> &BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        static EMPTY: Overlay = BTreeMap::new();
        self.staged.get(usize::from(ks.id)).unwrap_or(&EMPTY)
    }

    /// Runs `stage`, and if it fails, leaves the group as it was before: for a
    /// write made of parts that each read, then write (an import spanning several
    /// components), where a later part's failure must undo the earlier ones.
    /// Costs a copy of the keys it stages (not of what the group staged before).
    pub fn all_or_nothing<T>(&mut self, stage: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let outer = self.undo.replace(Vec::new());
        let staged = stage(self);
        let undo = std::mem::replace(&mut self.undo, outer).unwrap_or_default();
        if staged.is_err() {
            for (keyspace, key, before) in undo.into_iter().rev() {
                let overlay = &mut self.staged[keyspace];
                match before {
                    Some(before) => overlay.insert(key, before),
                    None => overlay.remove(&key),
                };
            }
        } else if let Some(outer) = &mut self.undo {
            // Nested: the enclosing one may still have to undo these.
            outer.extend(undo);
        }
        staged
    }

    pub fn put(&mut self, ks: KeyspaceDef, key: Vec<u8>, value: Vec<u8>) {
        self.stage(usize::from(ks.id), key, Some(value));
    }

    pub fn remove(&mut self, ks: KeyspaceDef, key: Vec<u8>) {
        self.stage(usize::from(ks.id), key, None);
    }

    fn stage(&mut self, keyspace: usize, key: Vec<u8>, value: Option<Vec<u8>>) {
        let overlay = &mut self.staged[keyspace];
        match &mut self.undo {
            Some(undo) => {
                let before = overlay.insert(key.clone(), value);
                undo.push((keyspace, key, before));
            }
            None => {
                overlay.insert(key, value);
            }
        }
    }

    /// The largest value a write should stage: one that fits in a journal record
    /// with room to spare. A larger one fails the whole group.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// The component's cache of type `T`, made on first use.
    pub fn cache<T: CommitterCache + Default>(&mut self) -> &mut T {
        self.caches.get::<T>()
    }

    /// Whether the group has staged nothing so far.
    pub fn is_empty(&self) -> bool {
        self.staged.iter().all(BTreeMap::is_empty)
    }

    /// The staged writes, by keyspace id and then key: what the group would write.
    pub fn writes(&self) -> impl Iterator<Item = (u8, &[u8], Option<&[u8]>)> + Clone {
        self.staged.iter().enumerate().flat_map(|(index, writes)| {
            writes
                .iter()
                .map(move |(key, value)| (index as u8, key.as_slice(), value.as_deref()))
        })
    }

    pub(crate) fn into_staged(self) -> StagedWrites {
        StagedWrites(self.staged)
    }
}

/// What a group that reached the journal wrote.
pub struct StagedWrites(Vec<Overlay>);

impl StagedWrites {
    /// The keys the group set (`Some`) or removed (`None`) in a keyspace.
    pub fn keyspace(&self, ks: KeyspaceDef) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.0
            .get(usize::from(ks.id))
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.as_slice(), value.as_deref()))
    }
}

/// State a component keeps on the committer thread across groups, such as the
/// last value it wrote to a key, so that a write need not look it up. The store
/// tells it what each durable group wrote, and when a group failed (what reached
/// the database is then unknown, so it must forget).
pub trait CommitterCache: Send + 'static {
    fn committed(&mut self, writes: &StagedWrites);
    fn invalidate(&mut self);
}

trait AnyCache: Send {
    fn cache(&mut self) -> &mut dyn CommitterCache;
    fn any(&mut self) -> &mut dyn Any;
}

impl<T: CommitterCache> AnyCache for T {
    fn cache(&mut self) -> &mut dyn CommitterCache {
        self
    }

    fn any(&mut self) -> &mut dyn Any {
        self
    }
}

/// Every component's [`CommitterCache`], by type.
#[derive(Default)]
pub(crate) struct Caches(HashMap<TypeId, Box<dyn AnyCache>>);

impl Caches {
    fn get<T: CommitterCache + Default>(&mut self) -> &mut T {
        self.0
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .any()
            .downcast_mut::<T>()
            .expect("a cache is stored under its own type")
    }

    pub fn committed(&mut self, writes: &StagedWrites) {
        for cache in self.0.values_mut() {
            cache.cache().committed(writes);
        }
    }

    pub fn invalidate(&mut self) {
        for cache in self.0.values_mut() {
            cache.cache().invalidate();
        }
    }
}
