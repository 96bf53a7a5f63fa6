//! Restarting a failed engine (`--max_restarts`): when a worker's engine fails (its thread
//! panicked, or a rank of its local group died), the launcher stops the worker's gRPC service,
//! waits a backoff, loads the engine again in this process and serves it on the same address,
//! so the router's health checks re-admit the same URL (and a registered worker's heartbeat
//! renews the same registration). Requests in flight on the failed engine have already ended
//! with an error; the router retries those that had no token yet on another worker.
//!
//! The policy is bounded like systemd's and Kubernetes' restart policies: at most
//! `max_restarts` restarts in a row, waiting 1 s, 2 s, 4 s ... up to 30 s before each; an
//! engine that then serves for 10 minutes clears the count. When restarts are used up the
//! failure is returned and the launcher exits non-zero, for the process's own supervisor.
//!
//! Not this module's job: detecting the failure (the engine's liveness) or routing around it
//! (the router's pool).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::group::{self, LocalRanks};
use crate::serve::LocalWorker;

/// The wait before the first restart; each further one in a row doubles it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An engine that serves this long before failing clears the restart count.
const STABLE_AFTER: Duration = Duration::from_secs(600);
/// How long stopping a failed worker's gRPC service may take.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How many times in a row a failed engine is restarted (`--max_restarts`; 0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts in a row before the failure stops the launcher.
    pub max_restarts: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { max_restarts: 5 }
    }
}

impl RestartPolicy {
    /// The wait before the next restart of an engine that failed after serving `ran_for`,
    /// counting it in `done` (restarts in a row so far); None when they are used up.
    pub fn next_backoff(&self, done: &mut u32, ran_for: Duration) -> Option<Duration> {
        if ran_for >= STABLE_AFTER {
            *done = 0;
        }
        if *done >= self.max_restarts {
            return None;
        }
        let wait = FIRST_BACKOFF
            .saturating_mul(1u32 << (*done).min(16))
            .min(MAX_BACKOFF);
        *done += 1;
        Some(wait)
    }
}

/// The worker the launcher serves now; the supervisor swaps in a restarted one, and whoever
/// stops the launcher takes it out to stop it.
pub type WorkerSlot = Arc<tokio::sync::Mutex<Option<LocalWorker>>>;

/// A worker starting.
pub type Starting = Pin<Box<dyn Future<Output = anyhow::Result<LocalWorker>> + Send>>;

/// Starts a worker again on the given address (where the failed one listened).
pub type Starter = Box<dyn FnMut(SocketAddr) -> Starting + Send>;

/// Watches the worker in `slot` (and the local group `ranks`, if any) and restarts it with
/// `start` when it fails, as `policy` allows. Resolves only when a failure is not restarted:
/// with the reason, for the launcher to stop on.
pub async fn supervise(
    slot: WorkerSlot,
    ranks: Option<Arc<Mutex<LocalRanks>>>,
    policy: RestartPolicy,
    mut start: Starter,
) -> String {
    let mut done = 0;
    loop {
        let Some((engine, addr)) = slot
            .lock()
            .await
            .as_ref()
            .map(|w| (w.engine.clone(), w.addr))
        else {
            return "the worker was stopped".to_owned();
        };
        let started = Instant::now();
        let mut why = group::group_failure(engine, ranks.clone()).await;
        let mut ran_for = started.elapsed();
        let failed = slot.lock().await.take();
        if let Some(failed) = failed
            && tokio::time::timeout(STOP_GRACE, failed.stop())
                .await
                .is_err()
        {
            tracing::warn!(
                grace_s = STOP_GRACE.as_secs(),
                "the failed worker's gRPC service did not stop in time; restarting anyway"
            );
        }
        loop {
            let Some(wait) = policy.next_backoff(&mut done, ran_for) else {
                tracing::error!(
                    reason = %why,
                    restarts = done,
                    max_restarts = policy.max_restarts,
                    "the engine failed and is not restarted (--max_restarts); stopping"
                );
                return why;
            };
            tracing::error!(
                reason = %why,
                restart = done,
                max_restarts = policy.max_restarts,
                backoff_s = wait.as_secs_f64(),
                "the engine failed; restarting it"
            );
            tokio::time::sleep(wait).await;
            match start(addr).await {
                Ok(worker) => {
                    tracing::info!(
                        worker = %worker.addr,
                        restart = done,
                        "engine restarted; the router re-admits the worker once its health checks pass"
                    );
                    *slot.lock().await = Some(worker);
                    break;
                }
                Err(e) => {
                    why = format!("restart {done} failed: {e:#}");
                    ran_for = Duration::ZERO;
                }
            }
        }
    }
}

/// Stops the worker in `slot`, if one is running.
pub async fn stop(slot: &WorkerSlot) {
    let worker = slot.lock().await.take();
    if let Some(worker) = worker {
        worker.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_stop_at_the_limit() {
        let policy = RestartPolicy { max_restarts: 3 };
        let mut done = 0;
        let waits: Vec<_> = (0..4)
            .map(|_| policy.next_backoff(&mut done, Duration::from_secs(1)))
            .collect();
        assert_eq!(
            waits,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                None
            ]
        );
        let never = RestartPolicy { max_restarts: 0 };
        assert_eq!(never.next_backoff(&mut 0, STABLE_AFTER), None);
    }

    #[test]
    fn an_engine_that_served_long_enough_clears_the_count_and_waits_are_capped() {
        let policy = RestartPolicy { max_restarts: 40 };
        let mut done = 0;
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = policy
                .next_backoff(&mut done, Duration::ZERO)
                .expect("under the limit");
        }
        assert_eq!(last, MAX_BACKOFF);
        assert_eq!(
            policy.next_backoff(&mut done, STABLE_AFTER),
            Some(FIRST_BACKOFF),
            "a stable run starts the count again"
        );
        assert_eq!(done, 1);
    }
}
