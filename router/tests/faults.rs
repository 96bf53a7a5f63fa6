//! Faults and their blame: request faults (a request that can never fit, a worker whose queue
//! is full, over-long stop lists) are answered to the client and never retried nor counted
//! against a worker; worker faults open its breaker, which lets exactly one probe through
//! after its cooldown. Against `ScriptedWorker` doubles on loopback gRPC.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_router::codec::ByteCodec;
use llmapi_router::policy::RoutingPolicy;
use llmapi_router::pool::{BreakerState, HealthPolicy, Pool};
use llmapi_router::server::app;
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    state: Arc<AppState>,
    workers: Vec<ScriptedHandle>,
}

const COOLDOWN: Duration = Duration::from_millis(300);

fn health() -> HealthPolicy {
    HealthPolicy {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        eject_after: 2,
        readmit_after: 2,
        breaker_failures: 2,
        breaker_cooldown: COOLDOWN,
    }
}

async fn start(scripts: Vec<Script>, tweak: impl FnOnce(&mut RouterConfig)) -> Harness {
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
    async fn send(&self, body: Value) -> axum::response::Response {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        app(self.state.clone())
            .oneshot(req)
            .await
            .expect("infallible")
    }

    async fn post(&self, body: Value) -> (StatusCode, Value) {
        let resp = self.send(body).await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 28)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn requests(&self, i: usize) -> usize {
        self.workers[i].worker.requests().len()
    }

    fn breaker(&self, i: usize) -> BreakerState {
        let url = self.workers[i].url();
        let w = self.state.pool.all().into_iter().find(|w| w.url == url);
        w.expect("worker in the pool").breaker_state()
    }
}

fn normal() -> Value {
    json!({"model": "demo", "prompt": "hello", "max_tokens": 2})
}

/// Needs 2 + 200 - 1 tokens of KV cache, more than the 16 blocks of 4 the doubles have.
fn poison() -> Value {
    json!({"model": "demo", "prompt": "hi", "max_tokens": 200})
}

fn small_cache() -> Script {
    Script {
        kv_capacity_blocks: 16,
        ..Script::default()
    }
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn never_fitting_requests_get_400_once_and_open_no_breaker() {
    let h = start(vec![small_cache(), small_cache()], |_| {}).await;
    for round in 0..20 {
        let (status, body) = h.post(poison()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "round {round}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(message(&body).contains("does not fit"), "{body}");
        let (status, body) = h.post(normal()).await;
        assert_eq!(status, StatusCode::OK, "round {round}: {body}");
    }
    assert_eq!(
        h.requests(0) + h.requests(1),
        40,
        "each request reached exactly one worker: poison ones were not retried"
    );
    for i in 0..2 {
        assert_eq!(h.breaker(i), BreakerState::Closed, "worker {i}");
        assert!(h.state.pool.all()[i].routable());
    }
}

#[tokio::test]
async fn a_full_worker_queue_gives_429_with_retry_after_and_is_not_retried() {
    let full = Script {
        max_running: Some(0),
        ..Script::default()
    };
    let h = start(vec![full, Script::default()], |_| {}).await;
    let mut refused = 0;
    for _ in 0..6 {
        let resp = h.send(normal()).await;
        if resp.status() == StatusCode::OK {
            continue;
        }
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            retry_after.is_some_and(|s| s >= 1),
            "Retry-After in seconds"
        );
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("OpenAI error body");
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        refused += 1;
    }
    assert_eq!(
        refused, 3,
        "round robin: every other request met the full worker"
    );
    assert_eq!(
        h.requests(1),
        3,
        "the refused ones were not retried elsewhere"
    );
    assert_eq!(
        h.breaker(0),
        BreakerState::Closed,
        "a busy worker is not a broken one"
    );
}

/// Sends `normal()` one at a time until worker `i` has received `n` more Generate calls.
async fn drive_until(h: &Harness, i: usize, n: usize) {
    let target = h.requests(i) + n;
    for _ in 0..20 {
        if h.requests(i) >= target {
            return;
        }
        let (status, body) = h.post(normal()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "retried on the other worker: {body}"
        );
    }
    panic!("worker {i} never received {n} more requests");
}

#[tokio::test]
async fn a_half_open_breaker_admits_exactly_one_probe() {
    // The probe's first token takes 150 ms: long enough for the other requests to arrive
    // while it is out.
    let slow = Script {
        token_delay: Duration::from_millis(150),
        ..Script::default()
    };
    let h = start(vec![slow, Script::default()], |_| {}).await;
    h.workers[0].worker.set_failing(true);
    drive_until(&h, 0, 2).await;
    assert_eq!(h.breaker(0), BreakerState::Open);

    // The worker recovers; after the cooldown one probe goes through while concurrent
    // requests keep avoiding it, and the probe's success closes the breaker.
    h.workers[0].worker.set_failing(false);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(h.breaker(0), BreakerState::HalfOpen);
    let before = h.requests(0);
    let results = futures::future::join_all((0..6).map(|_| h.post(normal()))).await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    assert_eq!(h.requests(0) - before, 1, "exactly one probe request");
    assert_eq!(h.breaker(0), BreakerState::Closed, "the probe succeeded");

    // A failing probe reopens the breaker for another cooldown: only one request tries.
    h.workers[0].worker.set_failing(true);
    drive_until(&h, 0, 2).await;
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let before = h.requests(0);
    for _ in 0..4 {
        let (status, body) = h.post(normal()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        h.requests(0) - before,
        1,
        "one probe, then the breaker reopened"
    );
    assert_eq!(h.breaker(0), BreakerState::Open);
}

#[tokio::test]
async fn echo_with_logprobs_larger_than_4_mib_goes_through() {
    // 30,000 prompt tokens with 20 alternatives each: the first response carries about
    // 6 MiB of prompt logprobs, past tonic's default 4 MiB decode limit.
    let big = Script {
        max_seq_len: 40_000,
        kv_capacity_blocks: 20_000,
        ..Script::default()
    };
    let h = start(vec![big], |c| c.max_body_bytes = 1 << 20).await;
    let prompt = "a".repeat(30_000);
    let (status, body) = h
        .post(json!({"model": "demo", "prompt": prompt, "max_tokens": 1, "echo": true, "logprobs": 20}))
        .await;
    assert_eq!(status, StatusCode::OK, "{}", message(&body));
    let tokens = body["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(tokens, 30_001, "every prompt token and the generated one");
}

#[tokio::test]
async fn stop_lists_past_their_caps_are_refused_naming_the_limit() {
    use llmapi_proto::limits::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS};
    let h = start(vec![Script::default()], |_| {}).await;
    let cases = [
        (
            json!({"stop": vec!["x"; MAX_STOP_STRINGS + 1]}),
            "stop",
            format!("at most {MAX_STOP_STRINGS}"),
        ),
        (
            json!({"stop": ["y".repeat(MAX_STOP_STRING_BYTES + 1)]}),
            "stop",
            format!("at most {MAX_STOP_STRING_BYTES}"),
        ),
        (
            json!({"stop_token_ids": vec![7; MAX_STOP_TOKEN_IDS + 1]}),
            "stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS}"),
        ),
    ];
    for (extra, param, limit) in cases {
        let mut body = normal();
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (status, v) = h.post(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], param);
        assert!(message(&v).contains(&limit), "{v}");
    }
    assert!(
        h.workers[0].worker.requests().is_empty(),
        "refused before any worker"
    );
    let mut at_cap = normal();
    at_cap["stop"] = json!(vec!["z".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS]);
    let (status, v) = h.post(at_cap).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}
