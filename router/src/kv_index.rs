//! The router's exact index of one worker's cached prefix blocks, kept from the worker's
//! KvEvents stream (`kv_subscribe` feeds it), and the worker's events as trtllm-serve's
//! `/kv_cache_events` shows them.
//!
//! The index follows one run of the worker from a snapshot on: every event must carry the id
//! after the last one applied and the same run id. Anything else (a gap, a restarted worker,
//! an unreadable hash) is an error, after which the subscriber asks for a fresh snapshot.
//! Until the first snapshot completes nothing is believed cached.

use std::collections::{HashSet, VecDeque};

use llmapi_common::block_hash::BlockHash;
use llmapi_proto::v1::{KvEventBatch, kv_event};
use serde_json::{Value, json};

/// Events kept for `/kv_cache_events` per worker before the oldest are dropped.
pub const PUBLISHED_EVENTS_CAPACITY: usize = 4096;

/// Why a batch could not be applied: the subscriber resyncs from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// An event id is not the one after the last applied.
    #[error("event {got} follows event {last}: events were lost")]
    Gap {
        /// The last event id applied.
        last: u64,
        /// The id received.
        got: u64,
    },
    /// The batch belongs to another run of the worker (it restarted).
    #[error("run {got:?} is not the run {have:?} the index follows: the worker restarted")]
    NewRun {
        /// The run followed so far.
        have: String,
        /// The run of the batch.
        got: String,
    },
    /// Events before any snapshot, or an event without data.
    #[error("{0}")]
    OutOfOrder(&'static str),
    /// A block hash is not 32 bytes (a worker of another version).
    #[error(
        "a block hash is not {} bytes; run router and workers of one version",
        BlockHash::LEN
    )]
    BadHash,
}

/// A snapshot being received in parts.
#[derive(Debug)]
struct PendingSnapshot {
    run_id: String,
    event_id: u64,
    blocks: HashSet<BlockHash>,
}

/// The blocks one worker has cached, exactly as its events say.
#[derive(Debug, Default)]
pub struct KvIndex {
    /// The worker run followed (empty before the first snapshot).
    run_id: String,
    last_event_id: u64,
    synced: bool,
    blocks: HashSet<BlockHash>,
    pending: Option<PendingSnapshot>,
    /// Events for `/kv_cache_events`, oldest first, at most `PUBLISHED_EVENTS_CAPACITY`.
    published: VecDeque<Value>,
    /// Published events dropped unread because the buffer was full.
    dropped: u64,
    /// Snapshots applied (the first, then one per resync).
    snapshots: u64,
}

fn hash(bytes: &[u8]) -> Result<BlockHash, IndexError> {
    BlockHash::from_slice(bytes).ok_or(IndexError::BadHash)
}

fn hashes(wire: &[Vec<u8>]) -> Result<Vec<BlockHash>, IndexError> {
    wire.iter().map(|b| hash(b)).collect()
}

/// A hash as `/kv_cache_events` and the debug view show it: lowercase hex.
pub fn hex(h: &BlockHash) -> String {
    h.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

impl KvIndex {
    /// Where a resumed stream should start: the run and last event id followed, or ("", 0)
    /// when no snapshot has been applied (the worker then starts with one).
    pub fn cursor(&self) -> (String, u64) {
        if self.synced {
            (self.run_id.clone(), self.last_event_id)
        } else {
            (String::new(), 0)
        }
    }

    /// Whether a snapshot has been applied and every event since.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The worker run followed (empty before the first snapshot).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Snapshots applied so far: the first one, then one per resync.
    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }

    /// The id of the last event applied.
    pub fn last_event_id(&self) -> u64 {
        self.last_event_id
    }

    /// Number of leading `hashes` the worker holds.
    pub fn matched_blocks(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.blocks.contains(h))
            .count()
    }

    /// Blocks the worker holds.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the worker holds no block (or none is known yet).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The held blocks' hashes in hex, sorted (for the debug view).
    pub fn sorted_hex(&self) -> Vec<String> {
        let mut v: Vec<String> = self.blocks.iter().map(hex).collect();
        v.sort();
        v
    }

    /// Forgets the worker's blocks and position: the next stream starts with a snapshot.
    pub fn reset(&mut self) {
        self.synced = false;
        self.pending = None;
        self.blocks.clear();
    }

    /// Takes the events buffered for `/kv_cache_events` and how many were dropped unread
    /// since the last take.
    pub fn take_published(&mut self) -> (Vec<Value>, u64) {
        let dropped = std::mem::take(&mut self.dropped);
        (self.published.drain(..).collect(), dropped)
    }

    fn publish(&mut self, event_id: u64, data: Value, window_size: u32) {
        if self.published.len() >= PUBLISHED_EVENTS_CAPACITY {
            self.published.pop_front();
            self.dropped += 1;
        }
        self.published.push_back(json!({
            "event_id": event_id,
            "data": data,
            "window_size": window_size,
        }));
    }

    /// Applies one batch of the worker's stream; `window_size` is the worker's attention
    /// window (its max_seq_len) for the published events. On error the index is no longer
    /// synced: its blocks (with the batch's events before the bad one applied) serve routing
    /// until the snapshot the subscriber asks for replaces them.
    pub fn apply(&mut self, batch: &KvEventBatch, window_size: u32) -> Result<(), IndexError> {
        let result = self.try_apply(batch, window_size);
        if result.is_err() {
            self.synced = false;
            self.pending = None;
        }
        result
    }

    fn try_apply(&mut self, batch: &KvEventBatch, window_size: u32) -> Result<(), IndexError> {
        if let Some(part) = &batch.snapshot {
            let pending = match self.pending.take() {
                Some(p) if p.run_id == batch.run_id && p.event_id == part.event_id => p,
                _ => PendingSnapshot {
                    run_id: batch.run_id.clone(),
                    event_id: part.event_id,
                    blocks: HashSet::new(),
                },
            };
            let mut pending = pending;
            pending.blocks.extend(hashes(&part.block_hashes)?);
            if !part.last_part {
                self.pending = Some(pending);
                return Ok(());
            }
            self.run_id = pending.run_id;
            self.last_event_id = pending.event_id;
            self.blocks = pending.blocks;
            self.synced = true;
            self.snapshots += 1;
            // A consumer of /kv_cache_events starts over too: everything it knew is gone,
            // and what is cached now is one stored run without parents.
            self.publish(
                self.last_event_id,
                json!({"type": "removed_all"}),
                window_size,
            );
            let blocks: Vec<Value> = self.sorted_hex().into_iter().map(stored_block).collect();
            if !blocks.is_empty() {
                self.publish(
                    self.last_event_id,
                    json!({"type": "stored", "parent_hash": null, "blocks": blocks}),
                    window_size,
                );
            }
            return Ok(());
        }
        if batch.events.is_empty() {
            return Ok(());
        }
        if !self.synced || self.pending.is_some() {
            return Err(IndexError::OutOfOrder("events arrived before a snapshot"));
        }
        if batch.run_id != self.run_id {
            return Err(IndexError::NewRun {
                have: self.run_id.clone(),
                got: batch.run_id.clone(),
            });
        }
        for event in &batch.events {
            if event.event_id != self.last_event_id + 1 {
                return Err(IndexError::Gap {
                    last: self.last_event_id,
                    got: event.event_id,
                });
            }
            let data = event
                .data
                .as_ref()
                .ok_or(IndexError::OutOfOrder("an event carries no data"))?;
            let shown = match data {
                kv_event::Data::Stored(s) => {
                    let stored = hashes(&s.block_hashes)?;
                    let parent = if s.parent_hash.is_empty() {
                        None
                    } else {
                        Some(hash(&s.parent_hash)?)
                    };
                    self.blocks.extend(stored.iter().copied());
                    json!({
                        "type": "stored",
                        "parent_hash": parent.as_ref().map(hex),
                        "blocks": stored.iter().map(|h| {
                            let mut b = stored_block(hex(h));
                            b["num_tokens"] = json!(s.tokens_per_block);
                            b
                        }).collect::<Vec<_>>(),
                    })
                }
                kv_event::Data::Removed(r) => {
                    let removed = hashes(&r.block_hashes)?;
                    for h in &removed {
                        self.blocks.remove(h);
                    }
                    json!({"type": "removed", "block_hashes": removed.iter().map(hex).collect::<Vec<_>>()})
                }
                kv_event::Data::AllCleared(_) => {
                    self.blocks.clear();
                    json!({"type": "removed_all"})
                }
            };
            self.last_event_id = event.event_id;
            self.publish(event.event_id, shown, window_size);
        }
        Ok(())
    }
}

fn stored_block(block_hash: String) -> Value {
    json!({"type": "stored_block", "block_hash": block_hash})
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmapi_common::block_hash::{ROOT_BLOCK_HASH, block_hash};
    use llmapi_proto::v1::{KvAllCleared, KvBlocksRemoved, KvBlocksStored, KvEvent, KvSnapshot};

    fn h(n: u32) -> BlockHash {
        block_hash(&ROOT_BLOCK_HASH, &[n])
    }

    fn wire(ns: &[u32]) -> Vec<Vec<u8>> {
        ns.iter().map(|&n| h(n).as_bytes().to_vec()).collect()
    }

    fn snapshot(run: &str, event_id: u64, ns: &[u32], last_part: bool) -> KvEventBatch {
        KvEventBatch {
            run_id: run.into(),
            snapshot: Some(KvSnapshot {
                event_id,
                block_hashes: wire(ns),
                last_part,
            }),
            events: vec![],
        }
    }

    fn events(run: &str, evs: Vec<(u64, kv_event::Data)>) -> KvEventBatch {
        KvEventBatch {
            run_id: run.into(),
            snapshot: None,
            events: evs
                .into_iter()
                .map(|(event_id, d)| KvEvent {
                    event_id,
                    data: Some(d),
                })
                .collect(),
        }
    }

    fn stored(parent: Option<u32>, ns: &[u32]) -> kv_event::Data {
        kv_event::Data::Stored(KvBlocksStored {
            parent_hash: parent.map(|p| h(p).as_bytes().to_vec()).unwrap_or_default(),
            block_hashes: wire(ns),
            tokens_per_block: 4,
        })
    }

    fn removed(ns: &[u32]) -> kv_event::Data {
        kv_event::Data::Removed(KvBlocksRemoved {
            block_hashes: wire(ns),
        })
    }

    fn prompt(ns: &[u32]) -> Vec<BlockHash> {
        ns.iter().map(|&n| h(n)).collect()
    }

    #[test]
    fn a_snapshot_in_parts_then_events_give_the_exact_block_set() {
        let mut ix = KvIndex::default();
        assert_eq!(ix.cursor(), (String::new(), 0));
        ix.apply(&snapshot("r1", 7, &[1, 2], false), 0).unwrap();
        assert!(!ix.synced(), "a partial snapshot is not applied");
        assert_eq!(ix.matched_blocks(&prompt(&[1])), 0);
        ix.apply(&snapshot("r1", 7, &[3], true), 0).unwrap();
        assert_eq!(ix.cursor(), ("r1".into(), 7));
        assert_eq!(ix.matched_blocks(&prompt(&[1, 2, 3, 4])), 3);
        ix.apply(
            &events(
                "r1",
                vec![(8, stored(Some(3), &[4, 5])), (9, removed(&[2]))],
            ),
            0,
        )
        .unwrap();
        assert_eq!(ix.len(), 4);
        assert_eq!(ix.matched_blocks(&prompt(&[1, 2, 3])), 1, "2 was removed");
        assert_eq!(ix.matched_blocks(&prompt(&[1, 3, 4, 5])), 4);
        ix.apply(
            &events(
                "r1",
                vec![(10, kv_event::Data::AllCleared(KvAllCleared {}))],
            ),
            0,
        )
        .unwrap();
        assert!(ix.is_empty());
        assert_eq!(ix.cursor(), ("r1".into(), 10));
        assert_eq!(ix.snapshots(), 1);
    }

    #[test]
    fn a_gap_or_a_new_run_unsyncs_the_index_until_a_snapshot() {
        let mut ix = KvIndex::default();
        assert!(matches!(
            ix.apply(&events("r1", vec![(1, stored(None, &[1]))]), 0),
            Err(IndexError::OutOfOrder(_))
        ));
        ix.apply(&snapshot("r1", 2, &[1], true), 0).unwrap();
        assert_eq!(
            ix.apply(&events("r1", vec![(4, stored(Some(1), &[2]))]), 0),
            Err(IndexError::Gap { last: 2, got: 4 })
        );
        assert_eq!(ix.cursor(), (String::new(), 0), "resync from a snapshot");
        ix.apply(&snapshot("r1", 4, &[1, 2], true), 0).unwrap();
        assert!(matches!(
            ix.apply(&events("r2", vec![(1, stored(None, &[9]))]), 0),
            Err(IndexError::NewRun { .. })
        ));
        assert!(!ix.synced());
        ix.apply(&snapshot("r2", 1, &[9], true), 0).unwrap();
        assert_eq!(
            ix.matched_blocks(&prompt(&[1])),
            0,
            "the old run's blocks are gone"
        );
        assert_eq!(ix.matched_blocks(&prompt(&[9])), 1);
        assert_eq!(
            ix.apply(
                &KvEventBatch {
                    run_id: "r2".into(),
                    snapshot: None,
                    events: vec![KvEvent {
                        event_id: 2,
                        data: Some(kv_event::Data::Removed(KvBlocksRemoved {
                            block_hashes: vec![vec![1, 2, 3]],
                        })),
                    }],
                },
                0
            ),
            Err(IndexError::BadHash)
        );
    }

    #[test]
    fn published_events_are_bounded_and_taken_once() {
        let mut ix = KvIndex::default();
        ix.apply(&snapshot("r1", 0, &[], true), 128).unwrap();
        let (first, dropped) = ix.take_published();
        assert_eq!(dropped, 0);
        assert_eq!(first.len(), 1, "an empty snapshot publishes only the reset");
        assert_eq!(first[0]["data"]["type"], "removed_all");
        let n = PUBLISHED_EVENTS_CAPACITY as u64 + 3;
        for id in 1..=n {
            ix.apply(&events("r1", vec![(id, stored(None, &[id as u32]))]), 128)
                .unwrap();
        }
        let (evs, dropped) = ix.take_published();
        assert_eq!((evs.len(), dropped), (PUBLISHED_EVENTS_CAPACITY, 3));
        assert_eq!(evs[0]["event_id"], 4);
        assert_eq!(evs[0]["window_size"], 128);
        assert_eq!(evs[0]["data"]["type"], "stored");
        assert_eq!(evs[0]["data"]["blocks"][0]["block_hash"], hex(&h(4)));
        assert_eq!(evs[0]["data"]["blocks"][0]["num_tokens"], 4);
        assert!(ix.take_published().0.is_empty());
    }
}
