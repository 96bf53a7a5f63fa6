//! The router's HTTP surface against `ScriptedWorker` doubles on loopback gRPC.

use llmapi_common::traces::{Service, Tracers, testing};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use llmapi_router::auth::Secret;
use llmapi_router::codec::ByteCodec;
use llmapi_router::policy::RoutingPolicy;
use llmapi_router::pool::{HealthPolicy, Pool};
use llmapi_router::server::app;
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    state: Arc<AppState>,
    workers: Vec<ScriptedHandle>,
}

fn fast_health() -> HealthPolicy {
    HealthPolicy {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        eject_after: 2,
        readmit_after: 2,
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(30),
    }
}

async fn start(
    policy: RoutingPolicy,
    scripts: Vec<Script>,
    tweak: impl FnOnce(&mut RouterConfig),
) -> Harness {
    let mut config = RouterConfig {
        served_model_name: "demo".into(),
        model_path: "/models/demo-1b".into(),
        routing_policy: policy,
        health: fast_health(),
        max_body_bytes: 64 * 1024,
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
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Body,
        auth: Option<&str>,
    ) -> axum::response::Response {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        let req = req.body(body).expect("request");
        app(self.state.clone())
            .oneshot(req)
            .await
            .expect("infallible")
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .send("POST", path, Body::from(body.to_string()), None)
            .await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .send("POST", path, Body::from(body.to_owned()), None)
            .await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Every SSE `data:` payload of a streamed request ("[DONE]" as a JSON string).
    async fn stream(&self, path: &str, body: Value) -> Vec<Value> {
        let resp = self
            .send("POST", path, Body::from(body.to_string()), None)
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = tokio::time::timeout(
            Duration::from_secs(10),
            axum::body::to_bytes(resp.into_body(), 1 << 24),
        )
        .await
        .expect("stream ends within 10 s")
        .expect("body");
        sse_payloads(&String::from_utf8_lossy(&bytes))
    }
}

fn sse_payloads(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned())))
        .collect()
}

fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn completion_answers_in_openai_shape_with_usage() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let (status, body) = h
        .post(
            "/v1/completions",
            json!({"model": "demo", "prompt": "hello", "max_tokens": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap_or_default().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], "hello");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn model_may_be_named_by_path_or_its_last_component() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    for name in ["demo", "/models/demo-1b", "demo-1b"] {
        let (status, _) = h
            .post(
                "/v1/completions",
                json!({"model": name, "prompt": "hi", "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "model {name}");
    }
    let (status, body) = h
        .post("/v1/completions", json!({"model": "gpt-4", "prompt": "hi"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_message(&body).contains("\"demo\""), "{body}");
}

#[tokio::test]
async fn chat_stream_sends_role_content_finish_usage_and_done() {
    let reply: Vec<u32> = "héllo 世界!".bytes().map(u32::from).collect();
    let script = Script {
        reply: reply.clone(),
        ..Script::default()
    };
    let h = start(RoutingPolicy::RoundRobin, vec![script], |_| {}).await;
    let events = h
        .stream(
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": reply.len(), "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "héllo 世界!", "multi-byte characters arrive whole");
    let finish = &events[events.len() - 3];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], reply.len());
}

#[tokio::test]
async fn stop_string_spanning_tokens_ends_the_choice_and_aborts_the_worker_request() {
    let reply: Vec<u32> = "abc STOP more text".bytes().map(u32::from).collect();
    let script = Script {
        reply,
        token_delay: Duration::from_millis(2),
        ..Script::default()
    };
    let h = start(RoutingPolicy::RoundRobin, vec![script], |_| {}).await;
    let (status, body) = h
        .post(
            "/v1/completions",
            json!({"model": "demo", "prompt": "x", "max_tokens": 18, "stop": ["STOP"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "abc ");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let worker = &h.workers[0].worker;
    for _ in 0..100 {
        if worker.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(worker.running(), 0);
    assert_eq!(worker.aborted().len(), 1, "the worker was told to stop");
}

#[tokio::test]
async fn n_choices_echo_and_logprobs_have_openai_shapes() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let (status, body) = h
        .post(
            "/v1/completions",
            json!({"model": "demo", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 2, "echo": true, "logprobs": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 4);
    assert_eq!(choices[0]["text"], "abab");
    assert_eq!(choices[3]["text"], "cdcd");
    // The echoed prompt's tokens come first; the first has no logprob (OpenAI's shape).
    let lp = &choices[0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b", "a", "b"]));
    assert_eq!(lp["token_logprobs"], json!([null, -0.25, -0.5, -0.5]));
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3]));
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    let tops: Vec<Option<usize>> = lp["top_logprobs"].as_array().unwrap()[1..]
        .iter()
        .map(|t| t.as_object().map(|o| o.len()))
        .collect();
    assert_eq!(tops, vec![Some(2); 3]);
    assert_eq!(
        choices[3]["logprobs"]["tokens"],
        json!(["c", "d", "c", "d"])
    );
    let asked: Vec<bool> = h.workers[0]
        .worker
        .requests()
        .iter()
        .map(|r| r.sampling.as_ref().is_some_and(|s| s.prompt_logprobs))
        .collect();
    assert_eq!(
        asked,
        vec![true; 4],
        "echo with logprobs asks the worker for them"
    );
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 8);

    let (status, body) = h
        .post(
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1,
                   "logprobs": true, "top_logprobs": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let entry = &body["choices"][0]["logprobs"]["content"][0];
    assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(3));
    assert!(entry["bytes"].is_array());
}

#[tokio::test]
async fn streamed_echo_with_logprobs_starts_with_the_prompt_tokens_logprobs() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let events = h
        .stream(
            "/v1/completions",
            json!({"model": "demo", "prompt": "xyz", "max_tokens": 2, "echo": true, "logprobs": 1, "stream": true}),
        )
        .await;
    let chunks: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .collect();
    assert_eq!(chunks.len(), 3, "{events:?}");
    let echo = &chunks[0]["choices"][0];
    assert_eq!(echo["text"], "xyz");
    assert_eq!(echo["logprobs"]["tokens"], json!(["x", "y", "z"]));
    assert_eq!(
        echo["logprobs"]["token_logprobs"],
        json!([null, -0.25, -0.5])
    );
    assert_eq!(echo["logprobs"]["text_offset"], json!([0, 1, 2]));
    assert_eq!(echo["logprobs"]["top_logprobs"][0], Value::Null);
    assert_eq!(echo["logprobs"]["top_logprobs"][2], json!({"z": -0.5}));
    // Generated tokens follow, their offsets counted after the echoed prompt.
    assert_eq!(chunks[1]["choices"][0]["text"], "x");
    assert_eq!(
        chunks[1]["choices"][0]["logprobs"]["text_offset"],
        json!([3])
    );
    assert_eq!(
        chunks[2]["choices"][0]["logprobs"]["text_offset"],
        json!([4])
    );
    assert_eq!(
        chunks[2]["choices"][0]["logprobs"]["token_logprobs"],
        json!([-0.5])
    );

    // Echo alone: the prompt is sent first without waiting, and no prompt logprobs are asked.
    let events = h
        .stream(
            "/v1/completions",
            json!({"model": "demo", "prompt": "xyz", "max_tokens": 1, "echo": true, "stream": true}),
        )
        .await;
    assert_eq!(events[0]["choices"][0]["text"], "xyz");
    assert_eq!(events[0]["choices"][0]["logprobs"], Value::Null);
    let last = h.workers[0].worker.requests().pop().unwrap();
    assert!(!last.sampling.unwrap_or_default().prompt_logprobs);
}

#[tokio::test]
async fn bad_requests_get_openai_error_bodies_with_the_right_status() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "malformed json",
            "{\"model\": ".into(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            "wrong type",
            json!({"model": "demo", "prompt": "x", "max_tokens": "many"}).to_string(),
            StatusCode::BAD_REQUEST,
            "wrong or missing field",
        ),
        (
            "empty prompt",
            json!({"model": "demo", "prompt": ""}).to_string(),
            StatusCode::BAD_REQUEST,
            "prompt is empty",
        ),
        (
            "empty list",
            json!({"model": "demo", "prompt": []}).to_string(),
            StatusCode::BAD_REQUEST,
            "empty list",
        ),
        (
            "oversized prompt",
            json!({"model": "demo", "prompt": "x".repeat(300)}).to_string(),
            StatusCode::BAD_REQUEST,
            "max_seq_len is 256, which leaves no room",
        ),
        (
            "temperature",
            json!({"model": "demo", "prompt": "x", "temperature": 5}).to_string(),
            StatusCode::BAD_REQUEST,
            "temperature is 5",
        ),
        (
            "token out of vocab",
            json!({"model": "demo", "prompt": [1, 99999]}).to_string(),
            StatusCode::BAD_REQUEST,
            "outside the vocabulary",
        ),
        (
            "unknown model",
            json!({"model": "nope", "prompt": "x"}).to_string(),
            StatusCode::NOT_FOUND,
            "not served",
        ),
        (
            "huge body",
            json!({"model": "demo", "prompt": "x".repeat(100_000)}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "--max_body_bytes",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (got, v) = h.post_raw("/v1/completions", &body).await;
        assert_eq!(got, status, "{what}: {v}");
        assert!(error_message(&v).contains(needle), "{what}: {v}");
        assert_eq!(v["error"]["code"], status.as_u16(), "{what}");
        assert!(v["error"]["type"].is_string(), "{what}");
    }
    let (got, v) = h
        .post(
            "/v1/chat/completions",
            json!({"model": "demo", "messages": []}),
        )
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{v}");
    let (got, v) = h.post("/v1/nothing", json!({})).await;
    assert_eq!(got, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"].is_string());
}

/// trtllm-serve's max_seq_len rule: max_tokens past the room a prompt leaves
/// (max_seq_len + 1 - prompt tokens) is lowered to it; only a prompt that leaves none is refused.
#[tokio::test]
async fn max_tokens_past_max_seq_len_is_lowered_to_the_room_the_prompt_leaves() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let ids = |n: u32| (0..n).map(|i| i % 200 + 1).collect::<Vec<u32>>();
    let cases = [
        (ids(3), Some(1000), 254),
        (ids(256), Some(1024), 1),
        (ids(200), None, 16),
        (ids(250), None, 7),
        (ids(10), Some(20), 20),
    ];
    for (prompt, max_tokens, expect) in cases {
        let n = prompt.len();
        let mut body = json!({"model": "demo", "prompt": prompt, "ignore_eos": true});
        if let Some(m) = max_tokens {
            body["max_tokens"] = json!(m);
        }
        let (status, v) = h.post("/v1/completions", body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "prompt {n}, max_tokens {max_tokens:?}: {v}"
        );
        assert_eq!(v["usage"]["completion_tokens"], expect, "prompt {n}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "prompt {n}");
        let seen = h.workers[0].worker.requests();
        let sent = seen
            .last()
            .and_then(|r| r.stopping.as_ref())
            .map(|s| s.max_tokens);
        assert_eq!(
            sent,
            Some(expect),
            "prompt {n}: max_tokens sent to the worker"
        );
    }
    let (status, v) = h
        .post(
            "/v1/completions",
            json!({"model": "demo", "prompt": ids(257), "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        error_message(&v).contains("prompt has 257 tokens but max_seq_len is 256"),
        "{v}"
    );
}

#[tokio::test]
async fn api_key_and_admin_token_are_enforced() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |c| {
        c.api_key = Some(Secret::new("API key", "sk-test").unwrap());
        c.admin_token = Some(Secret::new("admin token", "admin").unwrap());
    })
    .await;
    let body = json!({"model": "demo", "prompt": "hi", "max_tokens": 1}).to_string();
    let resp = h
        .send("POST", "/v1/completions", Body::from(body.clone()), None)
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = h
        .send("POST", "/v1/completions", Body::from(body), Some("sk-test"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let add = json!({"url": "http://127.0.0.1:9"}).to_string();
    let resp = h
        .send("POST", "/workers", Body::from(add.clone()), Some("sk-test"))
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = h
        .send("POST", "/workers", Body::from(add), Some("admin"))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(h.state.pool.all().len(), 2);
}

#[tokio::test]
async fn round_robin_and_least_load_share_requests_between_two_workers() {
    for policy in [
        RoutingPolicy::RoundRobin,
        RoutingPolicy::LeastLoad,
        RoutingPolicy::PowerOfTwo,
    ] {
        let h = start(policy, vec![Script::default(), Script::default()], |_| {}).await;
        for _ in 0..20 {
            let (status, _) = h
                .post(
                    "/v1/completions",
                    json!({"model": "demo", "prompt": "hi", "max_tokens": 1}),
                )
                .await;
            assert_eq!(status, StatusCode::OK);
        }
        let counts: Vec<usize> = h
            .workers
            .iter()
            .map(|w| w.worker.requests().len())
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 20, "{policy:?}");
        assert!(
            counts.iter().all(|&c| c >= 3),
            "{policy:?} spreads load: {counts:?}"
        );
    }
}

#[tokio::test]
async fn kv_cache_aware_sends_a_repeated_prefix_to_the_worker_that_cached_it() {
    let h = start(
        RoutingPolicy::KvCacheAware,
        vec![Script::default(), Script::default()],
        |_| {},
    )
    .await;
    let prefix = "a long shared system prompt, ".repeat(3);
    let mut cached = Vec::new();
    for i in 0..6 {
        kv_settled(&h).await;
        let (status, body) = h
            .post(
                "/v1/completions",
                json!({"model": "demo", "prompt": format!("{prefix}{i}"), "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        cached.push(
            body["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
        );
    }
    let counts: Vec<usize> = h
        .workers
        .iter()
        .map(|w| w.worker.requests().len())
        .collect();
    assert!(counts.contains(&6), "all on one worker: {counts:?}");
    assert_eq!(cached[0], 0);
    assert!(
        cached[1..].iter().all(|&c| c >= 80),
        "prefix reused: {cached:?}"
    );
}

#[tokio::test]
async fn a_failing_worker_is_retried_elsewhere_and_its_breaker_opens() {
    let h = start(
        RoutingPolicy::RoundRobin,
        vec![Script::default(), Script::default()],
        |_| {},
    )
    .await;
    h.workers[0].worker.set_failing(true);
    for _ in 0..6 {
        let (status, body) = h
            .post(
                "/v1/completions",
                json!({"model": "demo", "prompt": "hi", "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        h.workers[0].worker.requests().len(),
        2,
        "breaker opened after 2 failures"
    );
    assert!(!h.state.pool.all()[0].routable());
}

#[tokio::test]
async fn unhealthy_workers_are_ejected_and_readmitted() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let policy = fast_health();
    let worker = h.state.pool.all()[0].clone();
    assert!(worker.routable());
    h.workers[0].worker.set_healthy(false);
    worker.check(&policy).await;
    assert!(worker.routable(), "one failed check is not enough");
    worker.check(&policy).await;
    assert!(!worker.routable());
    let (status, _) = h
        .post("/v1/completions", json!({"model": "demo", "prompt": "hi"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    h.workers[0].worker.set_healthy(true);
    worker.check(&policy).await;
    assert!(!worker.routable(), "one good check is not enough");
    worker.check(&policy).await;
    assert!(worker.routable());
}

#[tokio::test]
async fn client_disconnect_aborts_the_worker_request_and_frees_its_blocks() {
    let script = Script {
        token_delay: Duration::from_millis(20),
        ..Script::default()
    };
    let h = start(RoutingPolicy::RoundRobin, vec![script], |_| {}).await;
    let body = json!({"model": "demo", "prompt": "hello", "max_tokens": 200, "stream": true});
    let resp = h
        .send(
            "POST",
            "/v1/completions",
            Body::from(body.to_string()),
            None,
        )
        .await;
    let mut stream = resp.into_body().into_data_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first chunk");
    assert!(first.is_some());
    assert_eq!(h.workers[0].worker.running(), 1);
    drop(stream);
    let worker = &h.workers[0].worker;
    for _ in 0..200 {
        if worker.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(worker.running(), 0, "blocks freed");
    assert_eq!(worker.aborted().len(), 1);
}

#[tokio::test]
async fn a_worker_dying_mid_stream_ends_it_with_an_error_event() {
    let script = Script {
        token_delay: Duration::from_millis(20),
        ..Script::default()
    };
    let h = start(RoutingPolicy::RoundRobin, vec![script], |_| {}).await;
    let body = json!({"model": "demo", "prompt": "hello", "max_tokens": 200, "stream": true});
    let resp = h
        .send(
            "POST",
            "/v1/completions",
            Body::from(body.to_string()),
            None,
        )
        .await;
    let mut stream = resp.into_body().into_data_stream();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first chunk");
    h.workers[0].kill();
    let mut rest = String::new();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = stream.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(drained.is_ok(), "stream ends promptly");
    let events = sse_payloads(&rest);
    assert!(events.iter().any(|e| e["error"]["code"] == 503), "{rest}");
    assert_eq!(events.last(), Some(&json!("[DONE]")));
}

#[tokio::test]
async fn admission_control_refuses_past_the_inflight_limit() {
    let script = Script {
        token_delay: Duration::from_millis(50),
        ..Script::default()
    };
    let h = start(RoutingPolicy::RoundRobin, vec![script], |c| {
        c.max_inflight_requests = 1
    })
    .await;
    let body = json!({"model": "demo", "prompt": "hello", "max_tokens": 50, "stream": true});
    let held = h
        .send(
            "POST",
            "/v1/completions",
            Body::from(body.to_string()),
            None,
        )
        .await;
    assert_eq!(held.status(), StatusCode::OK);
    let (status, v) = h
        .post(
            "/v1/completions",
            json!({"model": "demo", "prompt": "hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    drop(held);
}

#[tokio::test]
async fn info_endpoints_answer() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let resp = h.send("GET", "/v1/models", Body::empty(), None).await;
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(v["data"][0]["id"], "demo");
    for path in ["/health", "/health_generate", "/version", "/metrics"] {
        let resp = h.send("GET", path, Body::empty(), None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let resp = h.send("GET", "/metrics", Body::empty(), None).await;
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    assert!(String::from_utf8_lossy(&bytes).contains("llmapi_worker_healthy"));
}

/// POSTs `body` with extra headers; returns the response headers and JSON body.
async fn post_with_headers(
    h: &Harness,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (axum::http::HeaderMap, Value) {
    let mut req = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app(h.state.clone())
        .oneshot(req.body(Body::from(body.to_string())).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .expect("body");
    (headers, serde_json::from_slice(&bytes).expect("json body"))
}

/// Splits a traceparent into (trace id, span id, flags).
fn trace_fields(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn w3c_trace_context_is_continued_to_the_worker_in_grpc_metadata() {
    // Span ids come from the router's OpenTelemetry tracer, as in the binaries (no endpoint:
    // nothing is exported, a trace the router starts is not sampled).
    let tracers = Tracers::local(&[Service::Router]);
    let _guard = tracing::subscriber::set_default(testing::subscriber(&tracers));
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    let body = json!({"model": "demo", "prompt": "hi", "max_tokens": 1, "n": 2});
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (headers, _) = post_with_headers(
        &h,
        "/v1/completions",
        body.clone(),
        &[
            ("traceparent", incoming),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ],
    )
    .await;
    let seen = h.workers[0].worker.trace_metadata();
    assert_eq!(seen.len(), 2, "one worker call per choice");
    let router_span = {
        let tr = headers["traceresponse"].to_str().unwrap();
        let (trace, span, flags) = trace_fields(tr);
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(flags, "01");
        span
    };
    assert_ne!(
        router_span, "b7ad6b7169203331",
        "the router's hop is a new child span"
    );
    for (tp, ts) in &seen {
        let (trace, parent, flags) = trace_fields(tp.as_deref().expect("traceparent metadata"));
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            parent, router_span,
            "the worker's parent is the router's span"
        );
        assert_eq!(flags, "01");
        assert_eq!(
            ts.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
    }
    // The proto field carries the same value for workers that read it there.
    let req = h.workers[0].worker.requests().pop().unwrap();
    assert_eq!(Some(req.traceparent), seen[1].0.clone());

    // Without a traceparent (or with a broken one) each request starts its own trace.
    let mut traces = Vec::new();
    for headers in [vec![], vec![("traceparent", "00-xyz-b7ad6b7169203331-01")]] {
        let (resp_headers, _) =
            post_with_headers(&h, "/v1/completions", body.clone(), &headers).await;
        let (trace, span, flags) = trace_fields(resp_headers["traceresponse"].to_str().unwrap());
        assert_eq!(trace.len(), 32);
        assert_ne!(trace, "0".repeat(32));
        assert_eq!(flags, "00");
        let (tp, ts) = h.workers[0].worker.trace_metadata().pop().unwrap();
        let (wtrace, wparent, _) = trace_fields(&tp.unwrap());
        assert_eq!((wtrace, wparent), (trace.clone(), span));
        assert_eq!(ts, None);
        traces.push(trace);
    }
    assert_ne!(traces[0], traces[1]);
}

#[tokio::test]
async fn chat_accepts_a_pretokenized_prompt_as_trtllm_serve_does() {
    let h = start(RoutingPolicy::RoundRobin, vec![Script::default()], |_| {}).await;
    // benchmark_serving.py --tokenize-on-client: empty messages and the ids.
    let (status, body) = h
        .post(
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [], "prompt_token_ids": [72, 105, 33],
                   "max_completion_tokens": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["choices"][0]["message"]["content"], "Hi!");
    let sent = h.workers[0].worker.requests().pop().unwrap();
    assert_eq!(
        sent.prompt_token_ids,
        vec![72, 105, 33],
        "the ids are the whole prompt: no chat template around them"
    );

    let events = h
        .stream(
            "/v1/chat/completions",
            json!({"model": "demo", "prompt_token_ids": [72, 105], "max_completion_tokens": 2,
                   "stream": true}),
        )
        .await;
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events.last(), Some(&json!("[DONE]")));

    for (body, why) in [
        (
            json!({"model": "demo", "messages": [{"role": "user", "content": "x"}], "prompt_token_ids": [1]}),
            "both",
        ),
        (
            json!({"model": "demo", "messages": [], "prompt_token_ids": []}),
            "empty",
        ),
    ] {
        let (status, err) = h.post("/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {err}");
        assert_eq!(err["error"]["param"], "prompt_token_ids", "{why}");
    }
}

/// Waits (5 s at most) until the router's index of every worker holds as many blocks as the
/// worker's pretend cache: its KV events arrive asynchronously.
async fn kv_settled(h: &Harness) {
    for _ in 0..500 {
        let pool = h.state.pool.all();
        let settled = h.workers.iter().all(|w| {
            pool.iter().any(|p| {
                p.url == w.url()
                    && p.kv_lock().synced()
                    && p.kv_lock().len() == w.worker.cached_blocks()
            })
        });
        if settled {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the router's KV index did not catch up with the workers' caches in 5 s");
}

#[tokio::test]
async fn kv_cache_aware_stops_preferring_a_worker_once_it_reports_the_prefix_evicted() {
    let h = start(
        RoutingPolicy::KvCacheAware,
        vec![Script::default(), Script::default()],
        |_| {},
    )
    .await;
    let prompt = "a long shared system prompt, ".repeat(3);
    let body = json!({"model": "demo", "prompt": prompt, "max_tokens": 1});
    let send = || async {
        let (status, body) = h.post("/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        kv_settled(&h).await;
        let per_worker: Vec<usize> = h
            .workers
            .iter()
            .map(|w| w.worker.requests().len())
            .collect();
        (
            per_worker,
            body["usage"]["prompt_tokens_details"]["cached_tokens"].clone(),
        )
    };
    kv_settled(&h).await;
    let (counts, _) = send().await;
    let holder = counts.iter().position(|&c| c == 1).unwrap();
    let other = 1 - holder;
    let holder_url = h.workers[holder].url();
    let pool_worker = h
        .state
        .pool
        .all()
        .into_iter()
        .find(|w| w.url == holder_url)
        .unwrap();
    // The holder is a little busier: its cached prefix still wins.
    let _busy = pool_worker.begin();
    let (counts, cached) = send().await;
    assert_eq!(counts[holder], 2, "the cached prefix attracts the request");
    assert!(cached.as_u64().unwrap() >= 80, "{cached}");

    // The holder evicts the prefix; its KV events tell the router.
    h.workers[holder].worker.evict_all();
    kv_settled(&h).await;
    assert_eq!(
        pool_worker.kv_lock().len(),
        0,
        "the router forgot the evicted blocks"
    );
    let (counts, cached) = send().await;
    assert_eq!(
        (counts[holder], counts[other]),
        (2, 1),
        "no cache match anywhere: the less loaded worker takes it"
    );
    assert_eq!(cached, 0);
}

#[tokio::test]
async fn a_restarted_worker_is_resynced_from_its_snapshot() {
    let h = start(RoutingPolicy::KvCacheAware, vec![Script::default()], |_| {}).await;
    let worker = h.state.pool.all().pop().unwrap();
    let body = json!({"model": "demo", "prompt": "a prompt of several blocks", "max_tokens": 1});
    let (status, _) = h.post("/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    kv_settled(&h).await;
    assert!(!worker.kv_lock().is_empty());
    let run = worker.kv_lock().run_id().to_owned();
    // The worker restarts with an empty cache under a new run id.
    h.workers[0].worker.restart_cache();
    kv_settled(&h).await;
    assert!(worker.kv_lock().is_empty(), "the old run's blocks are gone");
    assert_ne!(worker.kv_lock().run_id(), run, "the new run is followed");
    // Leaving the pool drops the index.
    let (status, _) = h.post("/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    kv_settled(&h).await;
    assert!(!worker.kv_lock().is_empty());
    assert!(h.state.pool.remove(&worker.url));
    assert!(worker.kv_lock().is_empty() && !worker.kv_lock().synced());
}

#[tokio::test]
async fn kv_cache_events_list_each_workers_events_once_behind_the_api_key() {
    let h = start(RoutingPolicy::KvCacheAware, vec![Script::default()], |c| {
        c.api_key = Some(Secret::new("API key", "sk-test").unwrap());
    })
    .await;
    let take = |key: Option<&'static str>| {
        let h = &h;
        async move {
            let resp = h.send("POST", "/kv_cache_events", Body::empty(), key).await;
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
                .await
                .expect("body");
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(take(None).await.0, StatusCode::UNAUTHORIZED);
    let body = json!({"model": "demo", "prompt": "a prompt of several blocks", "max_tokens": 1});
    let resp = h
        .send(
            "POST",
            "/v1/completions",
            Body::from(body.to_string()),
            Some("sk-test"),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    kv_settled(&h).await;
    let (status, events) = take(Some("sk-test")).await;
    assert_eq!(status, StatusCode::OK);
    let events = events.as_array().expect("a JSON list").clone();
    let stored: Vec<&Value> = events
        .iter()
        .filter(|e| e["data"]["type"] == "stored")
        .collect();
    assert!(!stored.is_empty(), "{events:?}");
    let url = h.workers[0].url();
    assert!(
        events.iter().all(|e| e["worker"] == url.as_str()),
        "{events:?}"
    );
    assert!(
        stored
            .iter()
            .all(|e| e["event_id"].is_u64() && e["window_size"].is_u64())
    );
    let last = stored.last().unwrap();
    let listed = last["data"]["blocks"].as_array().unwrap().len();
    assert_eq!(listed, h.workers[0].worker.cached_blocks());
    let (_, again) = take(Some("sk-test")).await;
    assert_eq!(again, json!([]), "events are taken once");
    // The debug view lists the same blocks.
    let resp = h
        .send("GET", "/workers/kv_index", Body::empty(), Some("sk-test"))
        .await;
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    let view: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(view["workers"][0]["synced"], true);
    assert_eq!(
        view["workers"][0]["blocks"].as_array().unwrap().len(),
        listed
    );
}
