//! The bounded log of prefix blocks the cache evicted, read by callers of the Load RPC.
//!
//! Every eviction gets a sequence number (a cursor). A caller passes the cursor of its last
//! read and gets the hashes evicted since, minus those cached again in between, so a router's
//! view of which prefixes this worker holds can drop what is gone. The log keeps at most
//! `capacity` entries; a reader whose cursor predates the oldest dropped entry is told that
//! evictions were lost and should forget everything it believed cached.

use std::collections::{BTreeMap, HashMap};

use super::BlockHash;

/// What a reader learns from `EvictionLog::since`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Hashes evicted after the reader's cursor and not cached again since, oldest first.
    pub hashes: Vec<BlockHash>,
    /// The cursor to pass next time.
    pub cursor: u64,
    /// Some evictions after the reader's cursor are no longer known.
    pub lost: bool,
}

/// Evicted prefix-block hashes by sequence number.
#[derive(Debug)]
pub struct EvictionLog {
    /// Sequence number of the next eviction.
    next: u64,
    /// Cursors below this may have missed entries dropped for capacity.
    floor: u64,
    by_seq: BTreeMap<u64, BlockHash>,
    seq_of: HashMap<BlockHash, u64>,
    capacity: usize,
}

/// Entries kept by default: 64 Ki hashes, 5 MiB or so, many Load intervals of churn.
pub const DEFAULT_EVICTION_LOG_CAPACITY: usize = 1 << 16;

impl Default for EvictionLog {
    fn default() -> Self {
        Self::new(1, DEFAULT_EVICTION_LOG_CAPACITY)
    }
}

impl EvictionLog {
    /// An empty log whose first cursor is `base`. Give each run of a worker a different,
    /// larger base (e.g. its start time in nanoseconds) so cursors from an earlier run read
    /// as lost.
    pub fn new(base: u64, capacity: usize) -> Self {
        let base = base.max(1);
        Self {
            next: base,
            floor: base,
            by_seq: BTreeMap::new(),
            seq_of: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records that the block with prefix hash `hash` left the cache.
    pub fn evicted(&mut self, hash: BlockHash) {
        if let Some(old) = self.seq_of.insert(hash, self.next) {
            self.by_seq.remove(&old);
        }
        self.by_seq.insert(self.next, hash);
        self.next += 1;
        while self.by_seq.len() > self.capacity {
            let Some((seq, h)) = self.by_seq.pop_first() else {
                break;
            };
            self.seq_of.remove(&h);
            self.floor = seq + 1;
        }
    }

    /// Records that `hash` is cached again: it is no longer reported as evicted.
    pub fn cached(&mut self, hash: BlockHash) {
        if let Some(seq) = self.seq_of.remove(&hash) {
            self.by_seq.remove(&seq);
        }
    }

    /// Evictions after `cursor` (the `cursor` of an earlier report; 0 for a first read, which
    /// lists nothing: a new reader believes nothing cached yet).
    pub fn since(&self, cursor: u64) -> EvictionReport {
        if cursor == 0 {
            return EvictionReport {
                hashes: Vec::new(),
                cursor: self.next,
                lost: false,
            };
        }
        let lost = cursor < self.floor || cursor > self.next;
        let from = cursor.clamp(self.floor, self.next);
        EvictionReport {
            hashes: self.by_seq.range(from..).map(|(_, &h)| h).collect(),
            cursor: self.next,
            lost,
        }
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
    fn readers_see_evictions_after_their_cursor_minus_recached_ones() {
        let mut log = EvictionLog::new(100, 16);
        let first = log.since(0);
        assert_eq!(
            (first.hashes.len(), first.cursor, first.lost),
            (0, 100, false)
        );
        log.evicted(h(7));
        log.evicted(h(8));
        log.evicted(h(9));
        log.cached(h(8));
        let r = log.since(first.cursor);
        assert_eq!(r.hashes, vec![h(7), h(9)]);
        assert!(!r.lost);
        log.evicted(h(7));
        let r2 = log.since(r.cursor);
        assert_eq!(r2.hashes, vec![h(7)], "only what happened after the cursor");
    }

    #[test]
    fn overflow_and_foreign_cursors_are_reported_lost() {
        let mut log = EvictionLog::new(10, 2);
        let c = log.since(0).cursor;
        for i in 1..=3 {
            log.evicted(h(i));
        }
        let r = log.since(c);
        assert!(r.lost, "the first eviction was dropped for capacity");
        assert_eq!(r.hashes, vec![h(2), h(3)]);
        assert!(!log.since(r.cursor).lost);
        assert!(log.since(5).lost, "a cursor from an earlier run");
        assert!(log.since(10_000).lost, "a cursor from the future");
    }
}
