//! The bounded log of KV events a worker publishes (the `KvEvents` RPC): which prefix blocks
//! entered the cache, which left it, and when it was cleared.
//!
//! Every event has an id, one more than the event before it, within one run of the worker;
//! the run has an id of its own so a reader can tell a restarted worker from a quiet one. The
//! log keeps the last `capacity` events and the set of blocks cached now. A reader passes the
//! run id and the last event id it applied: it gets the events after that, or, when it is from
//! another run or some of those events were dropped for capacity, a snapshot of every cached
//! block as of the last event id, from which it continues.

use std::collections::{HashMap, VecDeque};

use super::{BlockHash, CacheChange};

/// What one event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEventData {
    /// A run of blocks entered the cache, each the child of the one before it; the first is
    /// the child of `parent` (None: the first block of a sequence).
    Stored {
        /// The block before the run's first block.
        parent: Option<BlockHash>,
        /// The run's blocks, first first.
        blocks: Vec<BlockHash>,
    },
    /// These blocks left the cache.
    Removed(Vec<BlockHash>),
    /// Every block left the cache.
    AllCleared,
}

/// One event with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    /// One more than the id of the event before it in this run; the first is 1.
    pub id: u64,
    /// What happened.
    pub data: KvEventData,
}

/// A cached block as a snapshot lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedBlock {
    /// Its chained hash.
    pub hash: BlockHash,
    /// The block before it (None: the first block of a sequence).
    pub parent: Option<BlockHash>,
}

/// What a reader gets from `KvEventLog::read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEventRead {
    /// The events after the reader's id, oldest first (at most the number asked for).
    Events(Vec<KvEvent>),
    /// The reader's position is unknown here: every block cached as of event `last_event_id`,
    /// after which the reader continues.
    Snapshot {
        /// The id of the last event the snapshot includes (0: none yet).
        last_event_id: u64,
        /// Every cached block, in no particular order.
        blocks: Vec<CachedBlock>,
    },
}

/// Events kept by default: enough for a reader to ride out a reconnect under heavy churn.
pub const DEFAULT_KV_EVENT_LOG_CAPACITY: usize = 1 << 14;

/// The event log of one worker run.
#[derive(Debug)]
pub struct KvEventLog {
    run_id: String,
    /// Id of the last event appended (0: none yet).
    last_id: u64,
    /// The last events, oldest first; ids are consecutive.
    events: VecDeque<KvEvent>,
    /// Every block cached now, with its parent.
    cached: HashMap<BlockHash, Option<BlockHash>>,
    capacity: usize,
}

impl KvEventLog {
    /// An empty log for the run `run_id` that keeps at most `capacity` events.
    pub fn new(run_id: String, capacity: usize) -> Self {
        Self {
            run_id,
            last_id: 0,
            events: VecDeque::new(),
            cached: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The id of this run of the worker.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The id of the last event (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Blocks cached now.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Appends the block manager's changes as events: consecutive stored blocks that chain
    /// (each the child of the one before) make one `Stored` event, consecutive removals one
    /// `Removed` event. Returns whether anything was appended.
    pub fn record(&mut self, changes: &[CacheChange]) -> bool {
        let before = self.last_id;
        let mut pending: Option<KvEventData> = None;
        for change in changes {
            pending = match (pending.take(), *change) {
                (
                    Some(KvEventData::Stored { parent, mut blocks }),
                    CacheChange::Cached { hash, parent: p },
                ) if blocks.last() == p.as_ref() => {
                    blocks.push(hash);
                    Some(KvEventData::Stored { parent, blocks })
                }
                (Some(KvEventData::Removed(mut hashes)), CacheChange::Evicted(hash)) => {
                    hashes.push(hash);
                    Some(KvEventData::Removed(hashes))
                }
                (done, change) => {
                    if let Some(done) = done {
                        self.push(done);
                    }
                    Some(match change {
                        CacheChange::Cached { hash, parent } => KvEventData::Stored {
                            parent,
                            blocks: vec![hash],
                        },
                        CacheChange::Evicted(hash) => KvEventData::Removed(vec![hash]),
                    })
                }
            };
        }
        if let Some(done) = pending {
            self.push(done);
        }
        self.last_id != before
    }

    /// Appends `AllCleared`: every block left the cache.
    pub fn clear(&mut self) {
        self.push(KvEventData::AllCleared);
    }

    fn push(&mut self, data: KvEventData) {
        match &data {
            KvEventData::Stored { parent, blocks } => {
                let mut parent = *parent;
                for &b in blocks {
                    self.cached.insert(b, parent);
                    parent = Some(b);
                }
            }
            KvEventData::Removed(hashes) => {
                for h in hashes {
                    self.cached.remove(h);
                }
            }
            KvEventData::AllCleared => self.cached.clear(),
        }
        self.last_id += 1;
        self.events.push_back(KvEvent {
            id: self.last_id,
            data,
        });
        while self.events.len() > self.capacity {
            self.events.pop_front();
        }
    }

    /// A snapshot of every cached block as of the last event.
    pub fn snapshot(&self) -> KvEventRead {
        KvEventRead::Snapshot {
            last_event_id: self.last_id,
            blocks: self
                .cached
                .iter()
                .map(|(&hash, &parent)| CachedBlock { hash, parent })
                .collect(),
        }
    }

    /// What a reader of run `run_id` that applied every event up to `after` reads next: at
    /// most `max` events, or a snapshot when its run is another one, its id is ahead of this
    /// log, or the events after it were dropped for capacity.
    pub fn read(&self, run_id: &str, after: u64, max: usize) -> KvEventRead {
        let oldest_kept = self.events.front().map_or(self.last_id + 1, |e| e.id);
        let known = run_id == self.run_id && after <= self.last_id && after + 1 >= oldest_kept;
        if !known {
            return self.snapshot();
        }
        let skip = (after + 1 - oldest_kept) as usize;
        KvEventRead::Events(
            self.events
                .iter()
                .skip(skip)
                .take(max.max(1))
                .cloned()
                .collect(),
        )
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

    fn cached(hash: BlockHash, parent: Option<BlockHash>) -> CacheChange {
        CacheChange::Cached { hash, parent }
    }

    fn snapshot_hashes(read: KvEventRead) -> (u64, Vec<BlockHash>) {
        match read {
            KvEventRead::Snapshot {
                last_event_id,
                blocks,
            } => {
                let mut hashes: Vec<BlockHash> = blocks.iter().map(|b| b.hash).collect();
                hashes.sort();
                (last_event_id, hashes)
            }
            KvEventRead::Events(e) => panic!("expected a snapshot, got events {e:?}"),
        }
    }

    #[test]
    fn chained_stores_make_one_event_and_removals_another() {
        let mut log = KvEventLog::new("run-a".into(), 16);
        assert!(log.record(&[
            cached(h(1), None),
            cached(h(2), Some(h(1))),
            cached(h(3), Some(h(2))),
            // Not a child of h(3): a new run of blocks.
            cached(h(9), Some(h(1))),
            CacheChange::Evicted(h(3)),
            CacheChange::Evicted(h(2)),
        ]));
        let KvEventRead::Events(events) = log.read("run-a", 0, 100) else {
            panic!("a reader of this run at 0 gets events");
        };
        assert_eq!(
            events,
            vec![
                KvEvent {
                    id: 1,
                    data: KvEventData::Stored {
                        parent: None,
                        blocks: vec![h(1), h(2), h(3)]
                    }
                },
                KvEvent {
                    id: 2,
                    data: KvEventData::Stored {
                        parent: Some(h(1)),
                        blocks: vec![h(9)]
                    }
                },
                KvEvent {
                    id: 3,
                    data: KvEventData::Removed(vec![h(3), h(2)])
                },
            ]
        );
        assert_eq!(log.num_cached(), 2);
        assert_eq!(log.read("run-a", 3, 100), KvEventRead::Events(vec![]));
        let KvEventRead::Events(tail) = log.read("run-a", 1, 1) else {
            panic!("events");
        };
        assert_eq!(tail.len(), 1, "at most `max` events");
        assert_eq!(tail[0].id, 2);
        assert!(!log.record(&[]), "no change, no event");
    }

    #[test]
    fn a_reader_whose_events_were_dropped_gets_a_snapshot() {
        let mut log = KvEventLog::new("run-a".into(), 2);
        for i in 1..=4 {
            log.record(&[cached(h(i), None)]);
        }
        log.record(&[CacheChange::Evicted(h(1))]);
        // Events 4 and 5 are kept: a reader at 3 continues, one at 2 lost event 3.
        assert!(matches!(log.read("run-a", 3, 10), KvEventRead::Events(e) if e.len() == 2));
        let (id, hashes) = snapshot_hashes(log.read("run-a", 2, 10));
        let mut want = vec![h(2), h(3), h(4)];
        want.sort();
        assert_eq!((id, hashes), (5, want));
    }

    #[test]
    fn a_reader_of_another_run_or_from_the_future_gets_a_snapshot() {
        let mut log = KvEventLog::new("run-b".into(), 16);
        log.record(&[cached(h(1), None)]);
        assert_eq!(snapshot_hashes(log.read("run-a", 1, 10)), (1, vec![h(1)]));
        assert_eq!(snapshot_hashes(log.read("run-b", 7, 10)), (1, vec![h(1)]));
        log.clear();
        assert_eq!(snapshot_hashes(log.read("", 0, 10)), (2, vec![]));
        assert_eq!(
            log.read("run-b", 1, 10),
            KvEventRead::Events(vec![KvEvent {
                id: 2,
                data: KvEventData::AllCleared
            }])
        );
    }
}
