//! The KV routes: trtllm-serve's `POST /kv_cache_events` for the pool's workers and
//! `GET /workers/kv_index`, the router's index of each worker's cached blocks (to compare
//! with the worker's own list). Both sit behind the API key like every inference route.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::AppState;

/// POST /kv_cache_events: the KV events the router received from its workers since the last
/// call, as trtllm-serve lists them (`event_id`, `data` with `type` stored/removed/
/// removed_all, `window_size`), each tagged with its `worker`. Events are taken once; each
/// worker's buffer is bounded (`kv_index::PUBLISHED_EVENTS_CAPACITY`), and a worker whose
/// buffer overflowed since the last call has an event `{"type": "dropped", "count": N}`
/// first.
pub async fn kv_cache_events(State(state): State<Arc<AppState>>) -> Response {
    let mut out: Vec<Value> = Vec::new();
    for w in state.pool.all() {
        let (events, dropped) = w.kv_lock().take_published();
        if dropped > 0 {
            out.push(json!({
                "event_id": null,
                "data": {"type": "dropped", "count": dropped},
                "worker": w.url,
            }));
        }
        out.extend(events.into_iter().map(|mut e| {
            e["worker"] = json!(w.url);
            e
        }));
    }
    Json(out).into_response()
}

/// GET /workers/kv_index: per worker, the run and last event followed, whether the index is
/// in step, and the hashes (hex, sorted) of every block it holds.
pub async fn kv_index(State(state): State<Arc<AppState>>) -> Response {
    let workers: Vec<Value> = state
        .pool
        .all()
        .iter()
        .map(|w| {
            let ix = w.kv_lock();
            json!({
                "url": w.url,
                "run_id": ix.run_id(),
                "last_event_id": ix.last_event_id(),
                "synced": ix.synced(),
                "blocks": ix.sorted_hex(),
            })
        })
        .collect();
    Json(json!({"workers": workers})).into_response()
}
