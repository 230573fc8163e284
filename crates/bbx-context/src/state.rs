//! What memory holds of one agent's context while the agent is in use: an
//! entry per item (its record, accesses, generation and, for HOT and WARM
//! items, the content), the bytes each tier holds, the co-access table and
//! the last assembly.

use crate::assemble::Assembly;
use crate::codec::{Codec, Tier};
use crate::importance::Sample;
use crate::item::{Access, ItemId, Record};
use crate::prefetch::CoAccess;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where memory keeps an item's content, if it does.
#[derive(Debug, Clone, Default)]
pub enum Resident {
    #[default]
    None,
    Hot(Arc<str>),
    /// An lz4 block.
    Warm(Arc<[u8]>),
}

/// One item as memory knows it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub record: Record,
    pub access: Access,
    /// The agent's step when it was added (0 for an item loaded from disk).
    pub created_step: u64,
    /// The step of the access before the last, for the gap between them.
    pub previous_step: Option<u64>,
    /// Items that refer to it.
    pub referenced_by: u32,
    /// The generation of its last access (MGLRU): the oldest go first.
    pub generation: u64,
    pub resident: Resident,
    /// The size of its block on disk.
    pub disk_bytes: u32,
    /// Made HOT by a prefetch and not accessed since.
    pub prefetched: bool,
}

impl Entry {
    pub fn tier(&self) -> Tier {
        match self.resident {
            Resident::Hot(_) => Tier::Hot,
            Resident::Warm(_) => Tier::Warm,
            Resident::None => self.record.codec.disk_tier(),
        }
    }

    /// The bytes it takes in its tier.
    pub fn tier_bytes(&self) -> u64 {
        match &self.resident {
            Resident::Hot(content) => content.len() as u64,
            Resident::Warm(block) => block.len() as u64,
            Resident::None => u64::from(self.disk_bytes),
        }
    }
}

/// Bytes in memory across all agents, by tier.
#[derive(Debug, Default)]
pub struct MemoryTotals {
    pub hot: AtomicU64,
    pub warm: AtomicU64,
}

/// Steps per generation: an access puts an item in the newest.
const GENERATION_STEPS: u64 = 16;

/// One agent's context in memory.
#[derive(Debug)]
pub struct AgentContext {
    pub items: BTreeMap<ItemId, Entry>,
    /// The agent's clock: one step per put and per get.
    pub step: u64,
    /// Bytes per tier, indexed by [`Tier`] as usize.
    pub bytes: [u64; 4],
    pub counts: [u64; 4],
    pub tokens: u64,
    pub last_assembly: Option<Assembly>,
    pub coaccess: CoAccess,
    pub last_accessed: Option<ItemId>,
    /// Items sampled at a step whose outcome ("accessed again within N
    /// steps") is not known yet.
    pub pending: VecDeque<Sample>,
    pub used: Instant,
    /// The agent's import count when it was loaded: a write made from this
    /// copy after an import would be stale.
    pub epoch: u64,
    /// Items prefetched into HOT, and of those, accessed there.
    pub prefetch: (u64, u64),
    /// Items whose accesses are not yet written.
    pub dirty: Vec<ItemId>,
    totals: Arc<MemoryTotals>,
}

impl AgentContext {
    pub fn new(totals: Arc<MemoryTotals>) -> Self {
        Self {
            items: BTreeMap::new(),
            step: 0,
            bytes: [0; 4],
            counts: [0; 4],
            tokens: 0,
            last_assembly: None,
            coaccess: CoAccess::default(),
            last_accessed: None,
            pending: VecDeque::new(),
            used: Instant::now(),
            prefetch: (0, 0),
            epoch: 0,
            dirty: Vec::new(),
            totals,
        }
    }

    pub fn generation(&self) -> u64 {
        self.step / GENERATION_STEPS
    }

    fn account(&mut self, entry: &Entry, sign: i64) {
        let tier = entry.tier() as usize;
        let bytes = entry.tier_bytes();
        let apply = |n: &mut u64, by: u64| {
            *n = if sign > 0 { *n + by } else { n.saturating_sub(by) };
        };
        apply(&mut self.bytes[tier], bytes);
        apply(&mut self.counts[tier], 1);
        apply(&mut self.tokens, u64::from(entry.record.tokens));
        let global = match entry.tier() {
            Tier::Hot => &self.totals.hot,
            Tier::Warm => &self.totals.warm,
            Tier::Cool | Tier::Cold => return,
        };
        if sign > 0 {
            global.fetch_add(bytes, Ordering::Relaxed);
        } else {
            global.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Adds an item, or replaces the one with its id.
    pub fn insert(&mut self, entry: Entry) {
        self.remove(entry.record.id);
        for id in &entry.record.refs {
            if let Some(target) = self.items.get_mut(id) {
                target.referenced_by += 1;
            }
        }
        self.account(&entry, 1);
        self.items.insert(entry.record.id, entry);
    }

    pub fn remove(&mut self, id: ItemId) -> Option<Entry> {
        let entry = self.items.remove(&id)?;
        self.account(&entry, -1);
        for target in &entry.record.refs {
            if let Some(target) = self.items.get_mut(target) {
                target.referenced_by = target.referenced_by.saturating_sub(1);
            }
        }
        Some(entry)
    }

    /// Changes where an item's content is kept (and, after a rewrite on disk,
    /// its codec), keeping the byte counts right.
    pub fn set_resident(&mut self, id: ItemId, resident: Resident, disk: Option<(Codec, u32)>) -> bool {
        let Some(mut entry) = self.items.remove(&id) else {
            return false;
        };
        self.account(&entry, -1);
        entry.resident = resident;
        if let Some((codec, bytes)) = disk {
            entry.record.codec = codec;
            entry.disk_bytes = bytes;
        }
        self.account(&entry, 1);
        self.items.insert(id, entry);
        true
    }

    /// Records an access of `id` at the next step; false if there is no such
    /// item.
    pub fn touch(&mut self, id: ItemId, at_ms: i64) -> bool {
        if !self.items.contains_key(&id) {
            return false;
        }
        self.step += 1;
        let generation = self.generation();
        let step = self.step;
        let Some(entry) = self.items.get_mut(&id) else {
            return false;
        };
        entry.previous_step = Some(entry.access.step).filter(|_| entry.access.count > 0);
        entry.access = Access {
            step,
            at_ms,
            count: entry.access.count.saturating_add(1),
        };
        entry.generation = generation;
        self.dirty.push(id);
        true
    }

    /// HOT bytes of items that are not pinned: what an idle agent must write
    /// out before it is let go (pinned items are on disk already, and come
    /// back HOT when the agent is loaded).
    pub fn unpinned_hot_bytes(&self) -> u64 {
        self.items
            .values()
            .filter(|e| !e.record.pinned && matches!(e.resident, Resident::Hot(_)))
            .map(Entry::tier_bytes)
            .sum()
    }

    /// Gives the memory tiers' bytes back to the global totals (the agent is
    /// let go).
    pub fn release(&mut self) {
        for id in self.items.keys().copied().collect::<Vec<_>>() {
            self.remove(id);
        }
    }
}

impl Drop for AgentContext {
    fn drop(&mut self) {
        self.release();
    }
}
