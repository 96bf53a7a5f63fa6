//! Routing policies: which worker group gets a request.

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
    /// The worker holding the longest cached prefix of the prompt, unless load is imbalanced.
    KvCacheAware,
}

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
    next: AtomicUsize,
    rng: AtomicUsize,
}

impl Router {
    /// A router applying `policy`.
    pub fn new(policy: RoutingPolicy, thresholds: ImbalanceThresholds) -> Self {
        Self {
            policy,
            thresholds,
            next: AtomicUsize::new(0),
            rng: AtomicUsize::new(0x9e37_79b9),
        }
    }

    /// The policy in use.
    pub fn policy(&self) -> RoutingPolicy {
        self.policy
    }

    /// Picks one of `candidates` (all routable, none already tried) for a prompt whose full
    /// blocks hash to `block_hashes`. Returns the worker and how many blocks it is believed to
    /// hold.
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
        let matched = chosen
            .cache
            .lock()
            .map(|c| c.matched_blocks(block_hashes))
            .unwrap_or(0);
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
        let matched: Vec<usize> = candidates
            .iter()
            .map(|w| {
                w.cache
                    .lock()
                    .map(|c| c.matched_blocks(block_hashes))
                    .unwrap_or(0)
            })
            .collect();
        let best = matched.iter().copied().max().unwrap_or(0);
        if best == 0 {
            return self.least_loaded(candidates);
        }
        // Among the longest matches, the least loaded.
        candidates
            .iter()
            .zip(&matched)
            .filter(|(_, m)| **m == best)
            .min_by_key(|(w, _)| w.score())
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
