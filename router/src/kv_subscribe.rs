//! One task per worker in the pool that follows the worker's KvEvents stream into its
//! `kv_index::KvIndex`.
//!
//! The task resumes from the index's position after a dropped stream and asks for a snapshot
//! when the index cannot continue (a gap, a restarted worker). Opening the stream has a
//! deadline; failures back off exponentially up to `MAX_BACKOFF`. The stream is bounded by
//! HTTP/2 flow control and the worker's small per-call queue, so a slow router holds up only
//! its own stream. The task holds the worker weakly: it ends when the worker leaves the pool
//! (the pool also aborts it then).

use std::sync::Weak;
use std::time::Duration;

use llmapi_proto::v1::KvEventsRequest;

use crate::pool::Worker;

/// Deadline of opening the stream (the worker's first batch).
pub const OPEN_DEADLINE: Duration = Duration::from_secs(5);
/// First wait before reopening a failed stream.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before reopening a failed stream.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the worker's KV events until the worker is gone.
pub async fn follow(worker: Weak<Worker>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(w) = worker.upgrade() else { return };
        let (run_id, after) = w.kv_lock().cursor();
        let mut client = w.client();
        let url = w.url.clone();
        drop(w);
        let request = KvEventsRequest { after, run_id };
        match tokio::time::timeout(OPEN_DEADLINE, client.kv_events(request)).await {
            Ok(Ok(response)) => {
                let mut stream = response.into_inner();
                loop {
                    let batch = match stream.message().await {
                        Ok(Some(batch)) => batch,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(worker = %url, error = %status.message(), "KV event stream ended");
                            break;
                        }
                    };
                    let Some(w) = worker.upgrade() else { return };
                    let window = w.info().map_or(0, |i| i.max_seq_len);
                    let applied = w.kv_lock().apply(&batch, window);
                    match applied {
                        Ok(()) => backoff = MIN_BACKOFF,
                        Err(e) => {
                            tracing::warn!(worker = %url, error = %e, "KV index out of step; resyncing from a snapshot");
                            break;
                        }
                    }
                }
            }
            Ok(Err(status)) => {
                tracing::debug!(worker = %url, error = %status.message(), "KV event stream refused");
            }
            Err(_) => {
                tracing::debug!(worker = %url, deadline_s = OPEN_DEADLINE.as_secs(), "KV event stream did not open by the deadline");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
