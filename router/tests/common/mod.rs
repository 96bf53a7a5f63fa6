//! The router with `ScriptedWorker` doubles on loopback gRPC, shared by the tests that fail
//! workers (`faults`, `migration`): a harness that sends requests through the real app.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_router::codec::ByteCodec;
use llmapi_router::deadline::Deadlines;
use llmapi_router::policy::RoutingPolicy;
use llmapi_router::pool::{BreakerState, HealthPolicy, Pool};
use llmapi_router::server::app;
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::Value;
use tower::ServiceExt;

/// The router's state over running doubles.
pub struct Harness {
    /// The router's state.
    pub state: Arc<AppState>,
    /// The doubles, in pool order.
    pub workers: Vec<ScriptedHandle>,
}

/// The breakers' cooldown.
pub const COOLDOWN: Duration = Duration::from_millis(300);

/// Quick health checks and breakers.
pub fn health() -> HealthPolicy {
    HealthPolicy {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        eject_after: 2,
        readmit_after: 2,
        breaker_failures: 2,
        breaker_cooldown: COOLDOWN,
    }
}

/// Starts one double per script and a round-robin router over them (`tweak` edits its
/// configuration); every double is checked healthy before it returns.
pub async fn start(scripts: Vec<Script>, tweak: impl FnOnce(&mut RouterConfig)) -> Harness {
    let mut config = RouterConfig {
        served_model_name: "demo".into(),
        model_path: "/models/demo-1b".into(),
        routing_policy: RoutingPolicy::RoundRobin,
        health: health(),
        ..RouterConfig::default()
    };
    tweak(&mut config);
    let pool = Arc::new(Pool::default());
    let mut workers = Vec::new();
    for s in scripts {
        let h = ScriptedWorker::new(s).spawn().await.expect("bind loopback");
        pool.add(&h.url()).expect("valid url");
        workers.push(h);
    }
    pool.check_all(&config.health).await;
    let state = Arc::new(AppState::new(config, Arc::new(ByteCodec), pool));
    Harness { state, workers }
}

impl Harness {
    /// POSTs `body` to /v1/completions.
    pub async fn send(&self, body: Value) -> axum::response::Response {
        self.send_to("/v1/completions", body).await
    }

    /// POSTs `body` to `path`.
    pub async fn send_to(&self, path: &str, body: Value) -> axum::response::Response {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        app(self.state.clone())
            .oneshot(req)
            .await
            .expect("infallible")
    }

    /// POSTs `body` to /v1/completions and reads the whole answer as JSON.
    pub async fn post(&self, body: Value) -> (StatusCode, Value) {
        self.post_to("/v1/completions", body).await
    }

    /// POSTs `body` to `path` and reads the whole answer as JSON.
    pub async fn post_to(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self.send_to(path, body).await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 28)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// GET /metrics: the Prometheus text.
    pub async fn metrics(&self) -> String {
        let req = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .expect("request");
        let resp = app(self.state.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Generate requests double `i` received.
    pub fn requests(&self, i: usize) -> usize {
        self.workers[i].worker.requests().len()
    }

    /// The breaker state of double `i`.
    pub fn breaker(&self, i: usize) -> BreakerState {
        let url = self.workers[i].url();
        let w = self.state.pool.all().into_iter().find(|w| w.url == url);
        w.expect("worker in the pool").breaker_state()
    }
}

/// Waits up to 5 s for `check`.
pub async fn eventually(check: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Every SSE `data:` payload of a stream ("[DONE]" as a JSON string).
pub fn sse_payloads(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
        .collect()
}

/// An error body's message.
pub fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

/// Deadlines of `first_token` and `request` seconds (0: none).
pub fn deadlines(first_token: f64, request: f64) -> Deadlines {
    let limit = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
    Deadlines {
        request: limit(request),
        first_token: limit(first_token),
    }
}
