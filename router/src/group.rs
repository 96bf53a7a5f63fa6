//! Sequence groups: the choices of one prompt (`n > 1`, `best_of`) run on one worker, which
//! computes the prompt once for all of them.
//!
//! Each choice stays its own worker request (its own stream, retries and migration), so
//! per-choice streaming and failure handling are unchanged; they carry one group key (proto
//! `group_id`) and share a [`GroupPin`]: the first choice to start picks a worker by policy
//! and the others go to the same one while it takes them. A choice whose pinned worker failed
//! for it (or refuses it) picks another by policy, and the pin moves there so that the
//! choices starting after it stay together. Migrated choices (tokens carried over) pick
//! their workers as before. Not for: the KV sharing itself (the worker's scheduler).

use std::sync::{Arc, Mutex};

use crate::pool::{InflightGuard, Worker};

/// The worker a group of choices runs on, once the first one picked it.
#[derive(Debug, Default)]
pub struct GroupPin {
    worker: Mutex<Option<String>>,
}

impl GroupPin {
    /// Starts a choice on the pinned worker when it is among `candidates` and takes it, or
    /// else on the worker `pick` chooses (marking each worker it tries in `tried`), which the
    /// pin then names. The pin is held while picking so that choices starting at once agree.
    pub fn begin(
        &self,
        candidates: &[Arc<Worker>],
        tried: &mut Vec<String>,
        pick: impl FnOnce(&mut Vec<String>) -> Option<(Arc<Worker>, InflightGuard)>,
    ) -> Option<(Arc<Worker>, InflightGuard)> {
        let mut pinned = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let at_pin = pinned
            .as_ref()
            .and_then(|url| candidates.iter().find(|w| &w.url == url));
        if let Some(worker) = at_pin {
            tried.push(worker.url.clone());
            if let Some(inflight) = worker.try_begin() {
                return Some((worker.clone(), inflight));
            }
        }
        let (worker, inflight) = pick(tried)?;
        *pinned = Some(worker.url.clone());
        Some((worker, inflight))
    }
}
