//! The worker pool's HTTP routes: GET /workers (the pool's state) and POST/DELETE /workers
//! (registration). Who may call them is the server's layers' business (`auth`); what a
//! registration may name is `registration`'s.
//!
//! POST answers 202 as soon as the URL passes the checks: it never waits for the worker, so
//! neither its status, its body nor its timing says whether anything answers at that address.
//! The first health check runs in the background and its outcome is logged here only.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::ApiError;
use crate::handlers::parse;
use crate::pool::PoolError;
use crate::registration::{Refused, WorkerUrl};
use crate::state::AppState;

type Shared = State<Arc<AppState>>;

#[derive(Deserialize)]
struct WorkerBody {
    url: String,
}

/// The answer to an accepted registration.
#[derive(Debug, Serialize)]
pub struct Registration {
    /// The worker's URL as the pool keeps it (normalized).
    pub url: String,
    /// Always `accepted`: the worker joins routing once its health checks pass.
    pub status: &'static str,
    /// Seconds the registration lasts unless renewed by another POST (absent: forever).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_s: Option<u64>,
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::BadUrl { .. } => ApiError::invalid("url", r.to_string()),
            Refused::HostNotAllowed { .. } => ApiError::forbidden(r.to_string()),
        }
    }
}

/// GET /workers: the pool and each worker's state.
pub async fn list_workers(State(state): Shared) -> Response {
    let workers: Vec<_> = state
        .pool
        .all()
        .iter()
        .map(|w| {
            let load = w.load();
            json!({
                "url": w.url,
                "healthy": w.is_healthy(),
                "breaker_open": w.breaker_open(),
                "inflight": w.inflight(),
                "requests": w.routed(),
                "running": load.running,
                "queued": load.queued,
                "kv_blocks_used": load.kv_blocks_used,
                "kv_blocks_free": load.kv_blocks_free,
                "prefix_cache_blocks": w.kv_lock().len(),
            })
        })
        .collect();
    Json(json!({"workers": workers})).into_response()
}

/// POST /workers {"url"}: registers a worker, or renews a registration (a heartbeat).
pub async fn add_worker(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    match register(&state, body).await {
        Ok(r) => (StatusCode::ACCEPTED, Json(r)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn register(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Registration, ApiError> {
    let body: WorkerBody = parse(state, body)?;
    let parsed = WorkerUrl::parse(&body.url)?;
    let url = parsed.to_string();
    let policy = &state.config.registration;
    if !state.pool.contains(&url) {
        let pool_hosts: Vec<String> = state
            .pool
            .all()
            .iter()
            .filter_map(|w| WorkerUrl::parse(&w.url).ok().map(|u| u.host))
            .collect();
        if let Err(refused) = policy.check_host(&parsed, &pool_hosts).await {
            tracing::warn!(worker = %url, "worker registration refused: host not allowed");
            return Err(refused.into());
        }
    }
    let (worker, added) = state
        .pool
        .add_capped(&url, policy.max_workers)
        .map_err(|e| match e {
            PoolError::Full { .. } => ApiError::conflict(e.to_string()),
            PoolError::BadUrl { .. } | PoolError::NoTls { .. } | PoolError::Tls { .. } => {
                ApiError::invalid("url", e.to_string())
            }
        })?;
    worker.renew_lease(policy.lease);
    if added {
        tracing::info!(worker = %url, lease_s = ?policy.lease.map(|l| l.as_secs()), "worker registered");
        let health = state.config.health.clone();
        tokio::spawn(async move {
            worker.check(&health).await;
            if !worker.is_healthy() {
                tracing::warn!(worker = %worker.url, "a registered worker failed its first health check; it joins routing once checks pass");
            }
        });
    }
    Ok(Registration {
        url,
        status: "accepted",
        lease_s: policy.lease.map(|l| l.as_secs()),
    })
}

/// DELETE /workers {"url"}: removes a worker.
pub async fn remove_worker(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let body: WorkerBody = parse(&state, body)?;
        // The pool keeps normalized URLs; a URL given as registered is found either way.
        let url = WorkerUrl::parse(&body.url).map_or(body.url, |u| u.to_string());
        if state.pool.remove(&url) {
            tracing::info!(worker = %url, "worker removed");
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::not_found(format!(
                "no worker {url:?} is registered"
            )))
        }
    })();
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}
