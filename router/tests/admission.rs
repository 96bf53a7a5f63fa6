//! Admission and overload answers: a request occupies prompts x n worker-request slots of the
//! in-flight limit, over-long prompt lists are refused while the body is read, a bounded queue
//! waits for slots (429 with Retry-After when full or when the wait runs out), and SIGTERM
//! drains: /health and new requests get 503 while requests in flight finish, and a request
//! still running at the drain timeout ends with a 503 (in-band once streaming). Against
//! `ScriptedWorker` doubles on loopback gRPC; the drain tests serve real HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_router::codec::{ByteCodec, ChatTurn, TextCodec};
use llmapi_router::policy::RoutingPolicy;
use llmapi_router::pool::{HealthPolicy, Pool};
use llmapi_router::server::{app, serve};
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

struct Harness {
    state: Arc<AppState>,
    workers: Vec<ScriptedHandle>,
}

/// A worker slow enough that a request of `max_tokens` 200 holds its slots for seconds.
fn slow() -> Script {
    Script {
        token_delay: Duration::from_millis(20),
        ..Script::default()
    }
}

async fn start(scripts: Vec<Script>, tweak: impl FnOnce(&mut RouterConfig)) -> Harness {
    start_with(Arc::new(ByteCodec), scripts, tweak).await
}

async fn start_with(
    codec: Arc<dyn TextCodec>,
    scripts: Vec<Script>,
    tweak: impl FnOnce(&mut RouterConfig),
) -> Harness {
    let mut config = RouterConfig {
        served_model_name: "demo".into(),
        model_path: "/models/demo-1b".into(),
        routing_policy: RoutingPolicy::RoundRobin,
        health: HealthPolicy {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            ..HealthPolicy::default()
        },
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
    let state = Arc::new(AppState::new(config, codec, pool));
    Harness { state, workers }
}

/// Status, Retry-After and JSON body of an answer.
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

impl Harness {
    async fn send(&self, body: &Value) -> axum::response::Response {
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

    async fn post(&self, body: &Value) -> Answer {
        answer(self.send(body).await).await
    }

    /// Starts a streaming request and waits for its first chunk: its slots are held until
    /// the returned body is dropped.
    async fn hold(&self, body: Value) -> axum::body::BodyDataStream {
        let resp = self.send(&body).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut stream = resp.into_body().into_data_stream();
        let first = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut stream),
        )
        .await
        .expect("first chunk within 10 s");
        assert!(first.is_some());
        stream
    }

    async fn wait_queued(&self, n: usize) {
        for _ in 0..500 {
            if self.state.admission().queued == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} requests never queued: {:?}", self.state.admission());
    }
}

async fn answer(resp: axum::response::Response) -> Answer {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .expect("body");
    Answer {
        status,
        retry_after,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `prompts` prompts of one token each, `n` choices each, streaming, long enough to hold.
fn fanout(prompts: usize, n: u32, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "demo",
        "prompt": vec![vec![65u32]; prompts],
        "n": n,
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

#[tokio::test]
async fn fan_out_counts_prompts_times_n_against_the_inflight_limit() {
    let h = start(vec![slow()], |c| {
        c.max_inflight_requests = 8;
        c.max_queued_requests = 0;
    })
    .await;
    // 2 prompts x n=2: 4 of the 8 worker-request slots, held while it streams.
    let held = h.hold(fanout(2, 2, 200, true)).await;
    assert_eq!(h.state.admission().slots_used, 4);
    // 3 x 2 = 6 more would make 10: refused, although it is a single HTTP request.
    let a = h.post(&fanout(3, 2, 1, false)).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert!(
        message(&a.body).contains("--max_queued_requests"),
        "{}",
        a.body
    );
    // 2 x 2 = 4 fits exactly.
    let a = h.post(&fanout(2, 2, 1, false)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["choices"].as_array().map(Vec::len), Some(4));
    // 3 x 3 = 9 can never fit under 8: 400, naming the limit, not a 429 to retry forever.
    let a = h.post(&fanout(3, 3, 1, false)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let m = message(&a.body);
    assert!(
        m.contains("9 worker requests") && m.contains("at most 8"),
        "{m}"
    );
    assert_eq!(a.body["error"]["param"], "n");
    drop(held);
}

#[tokio::test]
async fn the_default_limit_is_the_workers_reported_capacity() {
    let small = Script {
        max_batch_size: 2,
        max_queued_requests: 1,
        ..slow()
    };
    let h = start(vec![small.clone(), small], |c| c.max_queued_requests = 0).await;
    assert_eq!(
        h.state.inflight_limit(),
        6,
        "2 workers x (2 running + 1 queued)"
    );
    let a = h.post(&fanout(7, 1, 1, false)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(message(&a.body).contains("at most 6"), "{}", a.body);
    let held = h.hold(fanout(3, 2, 200, true)).await;
    let a = h.post(&fanout(1, 1, 1, false)).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    drop(held);
    h.workers[1].worker.set_healthy(false);
    for _ in 0..200 {
        if h.state.inflight_limit() == 3 {
            break;
        }
        h.state.pool.check_all(&h.state.config.health).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.state.inflight_limit(),
        3,
        "an ejected worker's capacity no longer counts"
    );
}

#[tokio::test]
async fn an_over_long_prompt_list_is_refused_with_400_naming_the_cap() {
    let h = start(vec![Script::default()], |c| {
        c.max_body_bytes = 32 << 20;
        c.max_prompts_per_request = 64;
        c.max_prompt_tokens_per_request = 100;
    })
    .await;
    // 2 MiB of [[1],[1],...]: 500,000 prompts.
    let body = format!(
        r#"{{"model": "demo", "max_tokens": 1, "prompt": [{}[1]]}}"#,
        "[1],".repeat(499_999)
    );
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let a = tokio::time::timeout(
        Duration::from_secs(60),
        answer(app(h.state.clone()).oneshot(req).await.expect("infallible")),
    )
    .await
    .expect("answered");
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let m = message(&a.body);
    assert!(m.contains("500000 prompts"), "{m}");
    assert!(
        m.contains("at most 64") && m.contains("--max_prompts_per_request"),
        "{m}"
    );
    assert_eq!(a.body["error"]["param"], "prompt");
    assert!(
        h.workers[0].worker.requests().is_empty(),
        "nothing reached a worker"
    );

    // The token cap counts every prompt's tokens, times n.
    let ids: Vec<u32> = vec![65; 60];
    let a = h
        .post(&json!({"model": "demo", "prompt": ids, "max_tokens": 1, "n": 2}))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let m = message(&a.body);
    assert!(m.contains("120 prompt tokens") && m.contains("n=2"), "{m}");
    assert!(
        m.contains("at most 100") && m.contains("--max_prompt_tokens_per_request"),
        "{m}"
    );
    let a = h
        .post(&json!({"model": "demo", "prompt": ids, "max_tokens": 1}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // Text prompts are held to it once tokenized (one token per byte here).
    let a = h
        .post(
            &json!({"model": "demo", "prompt": ["x".repeat(60), "y".repeat(60)], "max_tokens": 1}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(message(&a.body).contains("120 prompt tokens"), "{}", a.body);
}

#[tokio::test]
async fn a_queued_request_is_admitted_when_a_slot_frees() {
    let h = start(vec![slow()], |c| {
        c.max_inflight_requests = 1;
        c.max_queued_requests = 4;
        c.queue_timeout = Duration::from_secs(30);
    })
    .await;
    let held = h.hold(fanout(1, 1, 200, true)).await;
    let state = h.state.clone();
    let waiting = tokio::spawn(async move {
        let resp = app(state)
            .oneshot(
                Request::builder()
                    .method("POST")
                    .uri("/v1/completions")
                    .header("content-type", "application/json")
                    .body(Body::from(fanout(1, 1, 2, false).to_string()))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        answer(resp).await
    });
    h.wait_queued(1).await;
    assert!(!waiting.is_finished(), "it waits while the slot is held");
    drop(held);
    let a = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("admitted once the slot freed")
        .expect("task");
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(h.state.admission().queued, 0);
}

#[tokio::test]
async fn a_full_queue_and_a_wait_past_the_queue_timeout_get_429_with_retry_after() {
    let h = start(vec![slow()], |c| {
        c.max_inflight_requests = 1;
        c.max_queued_requests = 1;
        c.queue_timeout = Duration::from_millis(1500);
    })
    .await;
    let held = h.hold(fanout(1, 1, 200, true)).await;
    let state = h.state.clone();
    let waiting = tokio::spawn(async move {
        let resp = app(state)
            .oneshot(
                Request::builder()
                    .method("POST")
                    .uri("/v1/completions")
                    .header("content-type", "application/json")
                    .body(Body::from(fanout(1, 1, 1, false).to_string()))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        answer(resp).await
    });
    h.wait_queued(1).await;
    // The queue holds one: the next request is refused at once.
    let a = h.post(&fanout(1, 1, 1, false)).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert!(
        message(&a.body).contains("--max_queued_requests"),
        "{}",
        a.body
    );
    assert_eq!(a.body["error"]["type"], "rate_limit_error");
    // The waiting one gives up after the queue timeout.
    let a = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the wait is bounded")
        .expect("task");
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert!(message(&a.body).contains("--queue_timeout_s"), "{}", a.body);
    drop(held);
    let metrics = h.state.metrics.render(&h.state.pool, h.state.admission());
    assert!(
        metrics.contains("llmapi_router_rejected_requests_total{reason=\"queue_full\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmapi_router_rejected_requests_total{reason=\"queue_timeout\"} 1"),
        "{metrics}"
    );
}

/// `ByteCodec` whose encode blocks until `open`: a tokenizer busy with a huge prompt.
struct StuckCodec {
    open: Arc<AtomicBool>,
    entered: Arc<AtomicUsize>,
}

impl TextCodec for StuckCodec {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        // Bounded, so that a failed test's runtime (which waits for blocking tasks) ends.
        for _ in 0..6000 {
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        ByteCodec.encode(text, add_special_tokens)
    }

    fn decode(&self, ids: &[u32]) -> String {
        ByteCodec.decode(ids)
    }

    fn render_chat(
        &self,
        turns: &[ChatTurn],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, String> {
        ByteCodec.render_chat(turns, tools)
    }
}

/// Opens a `StuckCodec` when the test ends, passed or failed.
struct OpenOnDrop(Arc<AtomicBool>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// One async thread: were tokenization on it, the stuck encode would stall every request.
#[tokio::test(flavor = "current_thread")]
async fn tokenization_runs_off_the_async_threads_on_a_bounded_pool() {
    let open = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicUsize::new(0));
    let _unstick = OpenOnDrop(open.clone());
    let codec = StuckCodec {
        open: open.clone(),
        entered: entered.clone(),
    };
    let h = start_with(Arc::new(codec), vec![Script::default()], |c| {
        c.tokenizer_pool_size = 1;
        c.max_queued_requests = 0;
    })
    .await;
    let text = json!({"model": "demo", "prompt": "hello", "max_tokens": 1});
    let state = h.state.clone();
    let body = text.to_string();
    let first = tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        answer(app(state).oneshot(req).await.expect("infallible")).await
    });
    for _ in 0..1000 {
        if entered.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "the first prompt is being tokenized"
    );
    // Token ids need no tokenizer: served while the only tokenizer thread is stuck.
    let ids = tokio::time::timeout(
        Duration::from_secs(20),
        h.post(&json!({"model": "demo", "prompt": [104, 105], "max_tokens": 1})),
    )
    .await
    .expect("the async thread is free");
    assert_eq!(ids.status, StatusCode::OK, "{}", ids.body);
    // A second text prompt finds the pool busy and no room to wait.
    let busy = h.post(&text).await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS, "{}", busy.body);
    assert_eq!(busy.retry_after.as_deref(), Some("1"));
    assert!(
        message(&busy.body).contains("--tokenizer_pool_size"),
        "{}",
        busy.body
    );
    open.store(true, Ordering::SeqCst);
    let first = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("finishes once unstuck")
        .expect("task");
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
}

/// A raw HTTP/1.1 exchange with a served router (`Connection: close`, read to the end).
struct Http {
    stream: TcpStream,
    seen: String,
}

impl Http {
    async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        Self {
            stream,
            seen: String::new(),
        }
    }

    /// Reads until `needle` has been received (or the connection ends).
    async fn read_until(&mut self, needle: &str) {
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut buf))
                .await
                .expect("data within 20 s")
                .expect("read");
            if n == 0 {
                return;
            }
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// The whole answer once the server closes the connection.
    async fn finish(mut self) -> String {
        self.read_until("\u{0}never").await;
        self.seen
    }
}

fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn sse_events(raw: &str) -> Vec<Value> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
        .collect()
}

/// Serves `h` on a loopback port until the returned sender fires (SIGTERM's stand-in).
async fn serve_on_loopback(
    h: &Harness,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = llmapi_common::net::free_port(host).expect("free port");
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, h.state.clone(), async move {
        let _ = rx.await;
    }));
    (addr, tx, served)
}

#[tokio::test]
async fn draining_answers_503_to_health_and_new_requests_while_running_ones_finish() {
    let h = start(vec![slow()], |c| c.drain_timeout = Duration::from_secs(30)).await;
    let (addr, sigterm, served) = serve_on_loopback(&h).await;
    let health = Http::send(addr, "GET", "/health", None)
        .await
        .finish()
        .await;
    assert_eq!(status_of(&health), 200, "{health}");
    let mut running = Http::send(
        addr,
        "POST",
        "/v1/completions",
        Some(&fanout(1, 1, 100, true)),
    )
    .await;
    running.read_until("data: ").await;
    sigterm.send(()).expect("serving");
    for _ in 0..200 {
        if h.state.is_draining() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = Http::send(addr, "GET", "/health", None)
        .await
        .finish()
        .await;
    assert_eq!(status_of(&health), 503, "{health}");
    assert!(
        health.to_ascii_lowercase().contains("retry-after: 5"),
        "{health}"
    );
    let refused = Http::send(
        addr,
        "POST",
        "/v1/completions",
        Some(&fanout(1, 1, 1, false)),
    )
    .await
    .finish()
    .await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 5"),
        "{refused}"
    );
    assert!(refused.contains("shutting down"), "{refused}");
    // The request in flight finishes whole.
    let raw = running.finish().await;
    let events = sse_events(&raw);
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "length"),
        "{raw}"
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")), "{raw}");
    let served = tokio::time::timeout(Duration::from_secs(20), served)
        .await
        .expect("serve returns once drained")
        .expect("task");
    assert!(served.is_ok());
}

#[tokio::test]
async fn a_request_still_running_at_the_drain_timeout_ends_with_a_503_not_a_silent_cut() {
    let h = start(vec![slow()], |c| {
        c.drain_timeout = Duration::from_millis(500)
    })
    .await;
    let (addr, sigterm, served) = serve_on_loopback(&h).await;
    // Each would take 200 x 20 ms = 4 s, far past the drain timeout.
    let mut streaming = Http::send(
        addr,
        "POST",
        "/v1/completions",
        Some(&fanout(1, 1, 200, true)),
    )
    .await;
    streaming.read_until("data: ").await;
    let whole = Http::send(
        addr,
        "POST",
        "/v1/completions",
        Some(&fanout(1, 1, 200, false)),
    )
    .await;
    for _ in 0..500 {
        if h.state.inflight() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.state.inflight(), 2);
    sigterm.send(()).expect("serving");

    let raw = streaming.finish().await;
    let events = sse_events(&raw);
    let error = events
        .iter()
        .find(|e| e.get("error").is_some())
        .unwrap_or_else(|| panic!("an in-band error event: {raw}"));
    assert_eq!(error["error"]["code"], 503, "{raw}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--drain_timeout_s"),
        "{raw}"
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")), "{raw}");

    let raw = whole.finish().await;
    assert_eq!(status_of(&raw), 503, "{raw}");
    assert!(raw.contains("--drain_timeout_s"), "{raw}");

    let served = tokio::time::timeout(Duration::from_secs(20), served)
        .await
        .expect("serve returns after the drain timeout")
        .expect("task");
    assert!(served.is_ok());
    for _ in 0..200 {
        if h.workers[0].worker.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        h.workers[0].worker.running(),
        0,
        "the worker requests were aborted"
    );
}
