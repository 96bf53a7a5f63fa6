//! Faults and their blame: request faults (a request that can never fit, over-long stop lists)
//! are answered to the client and never retried nor counted against a worker; a worker whose
//! queue is full passes the request to another, and 429 comes only when all are full; worker faults open its breaker, which lets exactly one probe through
//! after its cooldown. Deadlines: a request past `--first_token_timeout` or
//! `--request_timeout` gets 504 (in-band once streaming) and its worker request is aborted; a
//! slow worker is not blamed, one that never answers the call is. Against `ScriptedWorker`
//! doubles on loopback gRPC.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{COOLDOWN, Harness, deadlines, eventually, message, sse_payloads, start};
use llmapi_router::pool::BreakerState;
use llmapi_router::testing::Script;
use serde_json::{Value, json};

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
async fn a_full_worker_queue_sends_the_request_to_another_and_429_only_when_all_are_full() {
    let full = || Script {
        max_running: Some(0),
        ..Script::default()
    };
    // One full worker beside a free one: every request is served, by the free one.
    let h = start(vec![full(), Script::default()], |_| {}).await;
    for round in 0..6 {
        let (status, body) = h.post(normal()).await;
        assert_eq!(status, StatusCode::OK, "round {round}: {body}");
    }
    assert_eq!(h.requests(1), 6, "the free worker served every request");
    assert!(
        h.requests(0) >= 3,
        "round robin still asked the full worker first half the time"
    );
    assert_eq!(
        h.breaker(0),
        BreakerState::Closed,
        "a busy worker is not a broken one"
    );
    assert!(h.state.pool.all()[0].routable());

    // Every worker full: 429 with Retry-After and the OpenAI rate-limit error.
    let h = start(vec![full(), full()], |_| {}).await;
    for _ in 0..3 {
        let resp = h.send(normal()).await;
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
    }
    assert_eq!(
        h.requests(0) + h.requests(1),
        6,
        "each refused request asked both workers once"
    );
    for i in 0..2 {
        assert_eq!(h.breaker(i), BreakerState::Closed, "worker {i}");
    }
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

/// Generous bound on how late a timeout may answer: no hang, whatever the machine's load.
const ANSWER_WITHIN: Duration = Duration::from_secs(8);

fn assert_timeout_body(body: &Value, flag: &str) {
    assert_eq!(body["error"]["type"], "timeout_error", "{body}");
    assert_eq!(body["error"]["code"], 504, "{body}");
    assert!(message(body).contains(flag), "names {flag}: {body}");
}

#[tokio::test]
async fn a_request_with_no_first_token_in_time_gets_504_and_its_worker_request_is_aborted() {
    // The double's first token takes 30 s; the router waits 0.5 s for it.
    let slow = Script {
        token_delay: Duration::from_secs(30),
        ..Script::default()
    };
    let h = start(vec![slow], |c| c.deadlines = deadlines(0.5, 0.0)).await;
    for (round, stream) in [false, true, false].into_iter().enumerate() {
        let mut body = normal();
        body["stream"] = json!(stream);
        let t0 = Instant::now();
        let (status, v) = tokio::time::timeout(ANSWER_WITHIN, h.post(body))
            .await
            .expect("answered, not hung");
        // A stream that has sent nothing yet still gets its status: 504, not a 200.
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "stream {stream}: {v}");
        assert!(
            t0.elapsed() >= Duration::from_millis(450),
            "not before the deadline"
        );
        assert_timeout_body(&v, "--first_token_timeout");
        let w = &h.workers[0].worker;
        assert!(
            eventually(|| w.aborted().len() == round + 1 && w.running() == 0).await,
            "the worker request was aborted, freeing its blocks: {:?}",
            w.aborted()
        );
    }
    assert_eq!(
        h.breaker(0),
        BreakerState::Closed,
        "a worker that accepted the request and is slow is not blamed"
    );
    assert!(h.state.pool.all()[0].routable());
}

#[tokio::test]
async fn a_stream_whose_tokens_stop_ends_with_an_in_band_timeout_and_done() {
    // Two tokens, then silence, as from a stuck engine; the request may take 1.5 s in all.
    let stalls = Script {
        stall_after_tokens: Some(2),
        ..Script::default()
    };
    let h = start(vec![stalls], |c| c.deadlines = deadlines(0.0, 1.5)).await;
    let body = json!({"model": "demo", "prompt": "hello world", "max_tokens": 10, "stream": true});
    let t0 = Instant::now();
    let resp = h.send(body).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the first tokens came in time"
    );
    let bytes = tokio::time::timeout(
        ANSWER_WITHIN,
        axum::body::to_bytes(resp.into_body(), 1 << 20),
    )
    .await
    .expect("the stream ends, not hangs")
    .expect("body");
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "not before the deadline"
    );
    let events = sse_payloads(&String::from_utf8_lossy(&bytes));
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "he", "the tokens sent before the silence: {events:?}");
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_timeout_body(&events[n - 2], "--request_timeout");
    assert_eq!(events[n - 1], "[DONE]", "{events:?}");
    let w = &h.workers[0].worker;
    assert!(
        eventually(|| w.aborted().len() == 1 && w.running() == 0).await,
        "the worker request was aborted"
    );
    assert_eq!(h.breaker(0), BreakerState::Closed);
}

#[tokio::test]
async fn a_request_that_finishes_in_time_is_unaffected_and_carries_its_deadline_to_the_worker() {
    let h = start(vec![Script::default()], |c| {
        c.deadlines = deadlines(10.0, 30.0)
    })
    .await;
    for stream in [false, true] {
        let mut body = normal();
        body["stream"] = json!(stream);
        let (status, v) = h.post(body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let (status, v) = h.post(normal()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], "he");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let sent = h.workers[0].worker.grpc_timeouts();
    assert_eq!(sent.len(), 3);
    for t in sent {
        // tonic writes the deadline in the finest unit that fits 8 digits: here microseconds.
        let t = t.expect("every Generate carries a grpc-timeout");
        let micros: u64 = t.trim_end_matches('u').parse().expect("microseconds");
        assert!(
            (20_000_000..=30_000_000).contains(&micros),
            "the request's remaining time, at most --request_timeout: {t}"
        );
    }
    assert!(h.workers[0].worker.aborted().is_empty());

    // Without a request timeout, the worker gets no deadline.
    let h = start(vec![Script::default()], |c| {
        c.deadlines = deadlines(0.0, 0.0)
    })
    .await;
    assert_eq!(h.post(normal()).await.0, StatusCode::OK);
    assert_eq!(h.workers[0].worker.grpc_timeouts(), vec![None]);
}

#[tokio::test]
async fn a_worker_that_accepts_and_never_answers_gets_504s_then_its_breaker_opens() {
    // Worker 0 freezes, as a SIGSTOPped process: connections stay up, nothing is answered.
    let h = start(vec![Script::default(), Script::default()], |c| {
        c.deadlines = deadlines(0.5, 0.0);
    })
    .await;
    h.workers[0].worker.set_frozen(true);
    let mut timeouts = 0;
    let mut served = 0;
    for _ in 0..8 {
        let (status, v) = tokio::time::timeout(ANSWER_WITHIN, h.post(normal()))
            .await
            .expect("answered, not hung");
        match status {
            StatusCode::OK => served += 1,
            StatusCode::GATEWAY_TIMEOUT => {
                assert_timeout_body(&v, "--first_token_timeout");
                timeouts += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    // Round robin: requests 1 and 3 met the frozen worker (2 failures open its breaker),
    // every later one went to worker 1.
    assert_eq!(timeouts, 2, "then the breaker kept requests away");
    assert_eq!(served, 6);
    assert_eq!(
        h.breaker(0),
        BreakerState::Open,
        "a worker that produced nothing is blamed"
    );
    assert_eq!(h.breaker(1), BreakerState::Closed);
    h.workers[0].worker.set_frozen(false);
}

#[tokio::test]
async fn a_stream_cut_after_its_worker_went_silent_ends_with_an_in_band_504_not_503() {
    use llmapi_router::pool::LINK_KEEPALIVE_INTERVAL;
    // The worker sends two tokens, goes silent past a keep-alive interval (as a stopped
    // process does), then its link dies (as the keep-alive check ends it): a timeout.
    let stalls = Script {
        stall_after_tokens: Some(2),
        ..Script::default()
    };
    let h = start(vec![stalls], |c| c.deadlines = deadlines(0.0, 0.0)).await;
    let body = json!({"model": "demo", "prompt": "hello world", "max_tokens": 10, "stream": true});
    let resp = h.send(body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(LINK_KEEPALIVE_INTERVAL + Duration::from_millis(300)).await;
    h.workers[0].kill();
    let bytes = tokio::time::timeout(
        ANSWER_WITHIN,
        axum::body::to_bytes(resp.into_body(), 1 << 20),
    )
    .await
    .expect("the stream ends, not hangs")
    .expect("body");
    let events = sse_payloads(&String::from_utf8_lossy(&bytes));
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(events[n - 2]["error"]["code"], 504, "{events:?}");
    assert!(
        message(&events[n - 2]).contains("stopped answering"),
        "{events:?}"
    );
    assert_eq!(events[n - 1], "[DONE]");
}
