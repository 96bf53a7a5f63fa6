//! KV block accounting: reference counts, prefix hashes chained over the prefix, LRU eviction.
//!
//! Block hashes come from `llmapi_common::block_hash` (SHA-256, shared with the router's
//! kv_cache_aware policy); a block is reused on a hash match alone, which is sound only because
//! the hash is collision-resistant. This module only hands out block ids; the KV memory itself
//! lives in the backend, which is indexed by these ids. How many blocks there are is `budget`'s
//! arithmetic over `host_memory`'s facts; `commit` backs a new pool with memory at start. Not
//! for: attention, scheduling policy.

use std::collections::{BTreeMap, HashMap};

pub mod budget;
pub mod commit;
mod events;
pub mod host_memory;

pub use events::{
    CachedBlock, DEFAULT_KV_EVENT_LOG_CAPACITY, KvEvent, KvEventData, KvEventLog, KvEventRead,
};
pub use llmapi_common::block_hash::{BlockHash, prefix_block_hashes};

/// Index of a block in the backend's KV pool.
pub type BlockId = u32;

/// Stands in a sequence's block table for a block it gave back after the block fell out of
/// every layer's sliding window (`Scheduler::free_out_of_window`). No id of the pool: a
/// backend never reads it (attention skips the blocks before a window), and `release_all`
/// skips it.
pub const FREED_BLOCK: BlockId = BlockId::MAX;

/// A change to the set of cached prefix blocks, for the KV event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChange {
    /// A block with this prefix hash became reusable.
    Cached {
        /// Its chained hash.
        hash: BlockHash,
        /// The hash of the block before it (None: the first block of a sequence).
        parent: Option<BlockHash>,
    },
    /// The block with this prefix hash was evicted.
    Evicted(BlockHash),
}

/// Hands out KV blocks, shares cached prefix blocks and evicts the least recently used ones.
#[derive(Debug)]
pub struct BlockManager {
    tokens_per_block: usize,
    enable_reuse: bool,
    ref_count: Vec<u32>,
    /// Hash a block is registered under in `cached`, if any.
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Free blocks that hold no reusable content.
    free_plain: Vec<BlockId>,
    /// Free blocks that hold a cached prefix, keyed by last-use tick (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    evict_tick: Vec<u64>,
    tick: u64,
    /// Changes not yet taken by `take_cache_changes`.
    changes: Vec<CacheChange>,
    /// Free blocks promised to running sequences (`promise`): `allocate` leaves them to
    /// `allocate_promised`. At most `num_free()`.
    promised: usize,
}

impl BlockManager {
    /// A manager for `num_blocks` blocks of `tokens_per_block` tokens.
    pub fn new(num_blocks: usize, tokens_per_block: usize, enable_reuse: bool) -> Self {
        Self {
            tokens_per_block,
            enable_reuse,
            ref_count: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            free_plain: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            evict_tick: vec![0; num_blocks],
            tick: 0,
            changes: Vec::new(),
            promised: 0,
        }
    }

    /// Tokens per block.
    pub fn tokens_per_block(&self) -> usize {
        self.tokens_per_block
    }

    /// Whether prefix reuse is on.
    pub fn reuse_enabled(&self) -> bool {
        self.enable_reuse
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that can be allocated now (never used or evictable).
    pub fn num_free(&self) -> usize {
        self.free_plain.len() + self.evictable.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.tokens_per_block)
    }

    /// Free blocks promised to running sequences and not yet taken.
    pub fn num_promised(&self) -> usize {
        self.promised
    }

    /// Free blocks promised to no one: what a new request could get.
    pub fn num_unpromised_free(&self) -> usize {
        self.num_free().saturating_sub(self.promised)
    }

    /// Takes a free block that is not promised, evicting the least recently used cached one
    /// when needed.
    pub fn allocate(&mut self) -> Option<BlockId> {
        if self.num_free() <= self.promised {
            return None;
        }
        self.take_free()
    }

    /// Takes one of the promised blocks (there is one while `num_promised() > 0`).
    pub fn allocate_promised(&mut self) -> Option<BlockId> {
        if self.promised == 0 {
            return None;
        }
        let block = self.take_free()?;
        self.promised -= 1;
        Some(block)
    }

    /// Promises `n` more free blocks to a sequence, if that many are free and not promised.
    pub fn promise(&mut self, n: usize) -> bool {
        if self.num_free() < self.promised + n {
            return false;
        }
        self.promised += n;
        true
    }

    /// Takes back promises a sequence no longer needs (it ended or was preempted).
    pub fn release_promise(&mut self, n: usize) {
        debug_assert!(n <= self.promised, "more promises released than made");
        self.promised = self.promised.saturating_sub(n);
    }

    fn take_free(&mut self) -> Option<BlockId> {
        let block = match self.free_plain.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                    self.changes.push(CacheChange::Evicted(h));
                }
                b
            }
        };
        self.ref_count[block as usize] = 1;
        Some(block)
    }

    /// Drops one reference; a block whose count reaches zero becomes free (evictable if
    /// cached), and then this returns true.
    pub fn release(&mut self, block: BlockId) -> bool {
        let i = block as usize;
        debug_assert!(self.ref_count[i] > 0, "double free of block {block}");
        self.ref_count[i] = self.ref_count[i].saturating_sub(1);
        if self.ref_count[i] != 0 {
            return false;
        }
        if self.hash_of[i].is_some() {
            self.tick += 1;
            self.evict_tick[i] = self.tick;
            self.evictable.insert(self.tick, block);
        } else {
            self.free_plain.push(block);
        }
        true
    }

    /// Releases every block of a sequence, last block first so shared prefixes stay longest;
    /// [`FREED_BLOCK`] entries were released already.
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            if b != FREED_BLOCK {
                self.release(b);
            }
        }
    }

    /// Number of leading `hashes` that are cached, without taking references.
    pub fn count_cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        if !self.enable_reuse {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Takes a reference on the longest cached prefix of `hashes` and returns its blocks.
    pub fn acquire_cached_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let n = self.count_cached_prefix(hashes);
        let mut blocks = Vec::with_capacity(n);
        for h in &hashes[..n] {
            let Some(&b) = self.cached.get(h) else { break };
            let i = b as usize;
            if self.ref_count[i] == 0 {
                self.evictable.remove(&self.evict_tick[i]);
            }
            self.ref_count[i] += 1;
            blocks.push(b);
        }
        blocks
    }

    /// Blocks `allocate` could still hand out after `acquire_cached_prefix(prefix)`: the free
    /// ones minus the cached blocks of `prefix` that sit unreferenced (and so count as free)
    /// until the prefix takes them, and minus the promised ones.
    pub fn num_free_beside(&self, prefix: &[BlockHash]) -> usize {
        let taken_from_free = prefix
            .iter()
            .filter_map(|h| self.cached.get(h))
            .filter(|&&b| self.ref_count[b as usize] == 0)
            .count();
        (self.num_free() - taken_from_free).saturating_sub(self.promised)
    }

    /// Takes a reference on the cached blocks of `prefix` (a prefix `count_cached_prefix`
    /// matched in full), allocates `new_blocks` more and promises `promise` besides, all or
    /// nothing: when the pool cannot supply them, returns None having evicted nothing, so a
    /// request that does not fit yet leaves other requests' cached prefixes in place while it
    /// waits.
    pub fn admit(
        &mut self,
        prefix: &[BlockHash],
        new_blocks: usize,
        promise: usize,
    ) -> Option<Vec<BlockId>> {
        if self.num_free_beside(prefix) < new_blocks + promise {
            return None;
        }
        let blocks = self.acquire_cached_prefix(prefix);
        self.grow_and_promise(blocks, new_blocks, promise)
    }

    /// Appends `new_blocks` fresh blocks to `blocks` (already referenced) and promises
    /// `promise` more. The caller has checked that the pool holds them; were it not so, every
    /// reference in `blocks` is released (nothing leaks) and None is returned.
    fn grow_and_promise(
        &mut self,
        mut blocks: Vec<BlockId>,
        new_blocks: usize,
        promise: usize,
    ) -> Option<Vec<BlockId>> {
        for _ in 0..new_blocks {
            match self.allocate() {
                Some(b) => blocks.push(b),
                None => {
                    self.release_all(&blocks);
                    return None;
                }
            }
        }
        self.promised += promise;
        Some(blocks)
    }

    /// `admit` over blocks a running sequence holds (a sequence group's computed prompt)
    /// instead of cached ones: takes a reference on each of `shared`, allocates `new_blocks`
    /// more and promises `promise` besides, all or nothing. Shared blocks are referenced
    /// already, so they take nothing from the free ones.
    pub fn admit_shared(
        &mut self,
        shared: &[BlockId],
        new_blocks: usize,
        promise: usize,
    ) -> Option<Vec<BlockId>> {
        debug_assert!(
            shared.iter().all(|&b| self.ref_count[b as usize] > 0),
            "only blocks a running sequence holds are shared"
        );
        if self.num_unpromised_free() < new_blocks + promise {
            return None;
        }
        for &b in shared {
            self.ref_count[b as usize] += 1;
        }
        self.grow_and_promise(shared.to_vec(), new_blocks, promise)
    }

    /// Records that `block` now holds the full block whose chained hash is `hash`, the child
    /// of the block hashed `parent` (None: the first block of a sequence).
    ///
    /// When another block already holds the same content, this one stays unregistered.
    pub fn register(&mut self, block: BlockId, hash: BlockHash, parent: Option<BlockHash>) {
        if !self.enable_reuse || self.hash_of[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash_of[block as usize] = Some(hash);
            self.changes.push(CacheChange::Cached { hash, parent });
        }
    }

    /// Takes the prefix-cache changes since the last call, in order.
    pub fn take_cache_changes(&mut self) -> Vec<CacheChange> {
        std::mem::take(&mut self.changes)
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_in_use(&self) -> usize {
        self.ref_count.iter().filter(|&&c| c > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmapi_common::block_hash::{ROOT_BLOCK_HASH, block_hash};

    /// A distinct hash per `n`.
    fn h(n: u32) -> BlockHash {
        block_hash(&ROOT_BLOCK_HASH, &[n])
    }

    #[test]
    fn released_cached_blocks_are_reused_then_evicted_lru() {
        let mut m = BlockManager::new(2, 4, true);
        let b0 = m.allocate().unwrap();
        let b1 = m.allocate().unwrap();
        assert!(m.allocate().is_none());
        m.register(b0, h(10), None);
        m.register(b1, h(20), None);
        m.release(b0);
        m.release(b1);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.acquire_cached_prefix(&[h(20)]), vec![b1]);
        assert_eq!(m.num_free(), 1);
        // b0 is the only evictable block: allocating evicts it and forgets its hash.
        assert_eq!(m.allocate(), Some(b0));
        assert_eq!(m.count_cached_prefix(&[h(10)]), 0);
        assert_eq!(
            m.take_cache_changes(),
            vec![
                CacheChange::Cached {
                    hash: h(10),
                    parent: None
                },
                CacheChange::Cached {
                    hash: h(20),
                    parent: None
                },
                CacheChange::Evicted(h(10))
            ]
        );
        assert!(m.take_cache_changes().is_empty());
        m.release_all(&[b0, b1]);
        assert_eq!(m.num_in_use(), 0);
    }

    #[test]
    fn promised_blocks_are_left_to_their_holder() {
        let mut m = BlockManager::new(4, 4, false);
        let held = m.admit(&[], 1, 2).unwrap();
        assert_eq!((m.num_free(), m.num_promised()), (3, 2));
        // One block is free and unpromised; a second admission asking for two more fails.
        assert!(m.admit(&[], 1, 1).is_none());
        let other = m.allocate().unwrap();
        assert!(m.allocate().is_none(), "the other two are promised");
        assert!(!m.promise(1));
        let a = m.allocate_promised().unwrap();
        let b = m.allocate_promised().unwrap();
        assert_eq!((m.num_free(), m.num_promised()), (0, 0));
        assert!(m.allocate_promised().is_none());
        // A released block can be promised back to the sequence that freed it.
        assert!(m.release(a));
        assert!(m.promise(1));
        assert!(m.allocate().is_none());
        m.release_promise(1);
        m.release_all(&[held[0], other, b]);
        assert_eq!((m.num_free(), m.num_promised(), m.num_in_use()), (4, 0, 0));
    }

    #[test]
    fn reuse_disabled_never_matches() {
        let mut m = BlockManager::new(2, 4, false);
        let b = m.allocate().unwrap();
        m.register(b, h(1), None);
        m.release(b);
        assert_eq!(m.count_cached_prefix(&[h(1)]), 0);
    }

    #[test]
    fn an_admission_that_cannot_be_met_evicts_nothing() {
        // Pool of 6: a running request holds 2, prefix `mine` (2 blocks) and prefix `theirs`
        // (2 blocks) are cached and unreferenced. All 4 count as free.
        let mut m = BlockManager::new(6, 4, true);
        let held = [m.allocate().unwrap(), m.allocate().unwrap()];
        let mine = [h(1), h(2)];
        let theirs = [h(3), h(4)];
        for hash in mine.iter().chain(&theirs) {
            let b = m.allocate().unwrap();
            m.register(b, *hash, None);
            m.release(b);
        }
        m.take_cache_changes();
        assert_eq!(m.num_free(), 4);
        // Taking `mine` leaves 2 allocatable, however `num_free() + cached` adds up.
        assert_eq!(m.num_free_beside(&mine), 2);
        assert!(m.admit(&mine, 3, 0).is_none());
        assert_eq!(
            m.count_cached_prefix(&theirs),
            2,
            "their prefix stays cached"
        );
        assert_eq!(m.count_cached_prefix(&mine), 2);
        assert!(m.take_cache_changes().is_empty(), "nothing was evicted");
        assert_eq!(m.num_free(), 4);
        // What fits is granted: the two cached blocks plus two new ones (evicting `theirs`).
        let blocks = m.admit(&mine, 2, 0).unwrap();
        assert_eq!(blocks.len(), 4);
        assert_eq!(m.num_free(), 0);
        m.release_all(&blocks);
        m.release_all(&held);
        assert_eq!(m.num_in_use(), 0);
    }
}
