//! Routing policies: which worker group gets a request.
//!
//! `kv_cache_aware` scores workers as Dynamo's KV router does: the cost of sending a prompt to
//! a worker is `kv_overlap_score_weight * prefill_blocks + active_blocks`, where
//! prefill_blocks are the prompt's full blocks the worker does not hold (its exact index,
//! `kv_index`) and active_blocks the distinct prompt blocks the worker would have in flight
//! with this prompt added (a block shared by several requests counts once, as Dynamo assumes
//! KV reuse); the cheapest worker wins. Past both imbalance thresholds load alone decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use llmapi_common::block_hash::BlockHash;

use crate::pool::Worker;

/// The `--routing_policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Each routable worker in turn.
    RoundRobin,
    /// The worker with the fewest requests in flight and queued.
    LeastLoad,
    /// The less loaded of two workers drawn at random.
    PowerOfTwo,
    /// The worker where the prompt costs least: the blocks it would prefill (those its
    /// prefix cache lacks) weighted against the blocks it is busy with, unless load is
    /// imbalanced.
    KvCacheAware,
}

/// Dynamo's default `kv_overlap_score_weight`: a block to prefill costs as much as a block
/// in flight.
pub const DEFAULT_KV_OVERLAP_SCORE_WEIGHT: f64 = 1.0;

/// Thresholds of `kv_cache_aware`: past both, load balance wins over cache affinity.
#[derive(Debug, Clone, Copy)]
pub struct ImbalanceThresholds {
    /// Difference of load scores (in-flight + queued) between busiest and idlest worker.
    pub abs: usize,
    /// Ratio of busiest to idlest load score.
    pub rel: f64,
}

impl Default for ImbalanceThresholds {
    fn default() -> Self {
        Self { abs: 8, rel: 1.5 }
    }
}

/// A policy with its state.
#[derive(Debug)]
pub struct Router {
    policy: RoutingPolicy,
    thresholds: ImbalanceThresholds,
    overlap_weight: f64,
    next: AtomicUsize,
    rng: AtomicUsize,
}

impl Router {
    /// A router applying `policy`; `overlap_weight` is kv_cache_aware's
    /// `kv_overlap_score_weight`.
    pub fn new(
        policy: RoutingPolicy,
        thresholds: ImbalanceThresholds,
        overlap_weight: f64,
    ) -> Self {
        Self {
            policy,
            thresholds,
            overlap_weight,
            next: AtomicUsize::new(0),
            rng: AtomicUsize::new(0x9e37_79b9),
        }
    }

    /// The policy in use.
    pub fn policy(&self) -> RoutingPolicy {
        self.policy
    }

    /// Picks one of `candidates` (all routable, none already tried) for a prompt whose full
    /// blocks hash to `block_hashes`. Returns the worker and how many of them it holds.
    pub fn pick(
        &self,
        candidates: &[Arc<Worker>],
        block_hashes: &[BlockHash],
    ) -> Option<(Arc<Worker>, usize)> {
        if candidates.is_empty() {
            return None;
        }
        let chosen = match self.policy {
            RoutingPolicy::RoundRobin => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
                candidates[i].clone()
            }
            RoutingPolicy::LeastLoad => self.least_loaded(candidates),
            RoutingPolicy::PowerOfTwo => {
                let a = &candidates[self.random() % candidates.len()];
                let b = &candidates[self.random() % candidates.len()];
                if b.score() < a.score() { b } else { a }.clone()
            }
            RoutingPolicy::KvCacheAware => self.cache_aware(candidates, block_hashes),
        };
        let matched = chosen.matched_blocks(block_hashes);
        Some((chosen, matched))
    }

    fn cache_aware(&self, candidates: &[Arc<Worker>], block_hashes: &[BlockHash]) -> Arc<Worker> {
        let scores: Vec<usize> = candidates.iter().map(|w| w.score()).collect();
        let max = scores.iter().copied().max().unwrap_or(0);
        let min = scores.iter().copied().min().unwrap_or(0);
        let imbalanced =
            max - min > self.thresholds.abs && max as f64 > self.thresholds.rel * min as f64;
        if imbalanced {
            return self.least_loaded(candidates);
        }
        // Cost in blocks (Dynamo's logit); the lowest wins, ties go to the least loaded.
        let blocks = block_hashes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..candidates.len())
            .map(|i| &candidates[(start + i) % candidates.len()])
            .map(|w| {
                let prefill = blocks - w.matched_blocks(block_hashes).min(blocks);
                let active = w.potential_active_blocks(block_hashes);
                let cost = self.overlap_weight * prefill as f64 + active as f64;
                (w, cost)
            })
            .min_by(|(a, ca), (b, cb)| ca.total_cmp(cb).then(a.score().cmp(&b.score())))
            .map(|(w, _)| w.clone())
            .unwrap_or_else(|| candidates[0].clone())
    }

    fn least_loaded(&self, candidates: &[Arc<Worker>]) -> Arc<Worker> {
        // Rotate the starting point so that ties spread over the workers.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..candidates.len())
            .map(|i| &candidates[(start + i) % candidates.len()])
            .min_by_key(|w| w.score())
            .unwrap_or(&candidates[0])
            .clone()
    }

    fn random(&self) -> usize {
        // xorshift over a shared word: fair enough for picking two workers.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use llmapi_common::block_hash::{ROOT_BLOCK_HASH, block_hash};
    use llmapi_proto::v1::{KvEventBatch, KvSnapshot};

    fn hashes(from: u32, n: u32) -> Arc<Vec<BlockHash>> {
        Arc::new(
            (from..from + n)
                .map(|i| block_hash(&ROOT_BLOCK_HASH, &[i]))
                .collect(),
        )
    }

    /// Makes `w`'s KV index hold exactly `blocks`.
    fn caches(w: &Worker, blocks: &[BlockHash]) {
        let batch = KvEventBatch {
            run_id: "r".into(),
            snapshot: Some(KvSnapshot {
                event_id: 1,
                block_hashes: blocks.iter().map(|h| h.as_bytes().to_vec()).collect(),
                last_part: true,
            }),
            events: vec![],
        };
        w.kv_lock().apply(&batch, 0).unwrap();
    }

    #[tokio::test]
    async fn cache_hits_are_weighed_against_the_blocks_in_flight() {
        let pool = Pool::default();
        let a = pool.add("http://127.0.0.1:1").unwrap();
        let b = pool.add("http://127.0.0.1:2").unwrap();
        let workers = [a.clone(), b.clone()];
        let prompt = hashes(0, 4);
        caches(&a, &prompt);
        let pick = |weight: f64| {
            let r = Router::new(
                RoutingPolicy::KvCacheAware,
                ImbalanceThresholds::default(),
                weight,
            );
            let (w, matched) = r.pick(&workers, &prompt).unwrap();
            (w.url.clone(), matched)
        };
        assert_eq!(pick(1.0), (a.url.clone(), 4), "idle: the cache holder");
        // A is busy with another prompt of 8 blocks: at weight 1 its 4 cached blocks do not
        // outweigh 8 blocks in flight (a: 0 + 12, b: 4 + 4); at weight 4 they do (a: 12,
        // b: 16 + 4).
        let mut busy = a.begin();
        busy.hold_blocks(&hashes(100, 8));
        assert_eq!(a.active_blocks(), 8);
        assert_eq!(pick(1.0), (b.url.clone(), 0));
        assert_eq!(pick(4.0).0, a.url);
        drop(busy);
        assert_eq!(a.active_blocks(), 0, "the guard gives its blocks back");
        // Requests in flight with the same prefix share its blocks: a costs 4, b 8.
        let mut same = [a.begin(), a.begin()];
        for g in &mut same {
            g.hold_blocks(&prompt);
        }
        assert_eq!(a.active_blocks(), 4);
        assert_eq!(pick(1.0).0, a.url);
    }
}
