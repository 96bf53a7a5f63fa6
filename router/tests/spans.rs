//! The router's OpenTelemetry spans over OTLP (`llmapi_common::traces`): one SERVER span per
//! OpenAI request with its status, sampling fields and usage, its choices as child spans, and
//! requests unaffected by an unreachable collector.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_common::traces::testing::{CollectorDouble, SpanKind, subscriber};
use llmapi_common::traces::{Service, Tracers};
use llmapi_router::codec::ByteCodec;
use llmapi_router::pool::Pool;
use llmapi_router::server::app;
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn router() -> (Arc<AppState>, ScriptedHandle) {
    let config = RouterConfig {
        served_model_name: "demo".into(),
        ..RouterConfig::default()
    };
    let worker = ScriptedWorker::new(Script::default())
        .spawn()
        .await
        .unwrap();
    let pool = Arc::new(Pool::default());
    pool.add(&worker.url()).unwrap();
    pool.check_all(&config.health).await;
    (
        Arc::new(AppState::new(config, Arc::new(ByteCodec), pool)),
        worker,
    )
}

async fn post(
    state: &Arc<AppState>,
    body: Value,
    traceparent: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json");
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let resp = app(state.clone())
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_completion_and_a_refused_request_each_send_one_server_span() {
    let collector = CollectorDouble::start().await.unwrap();
    let tracers = Tracers::otlp(&collector.endpoint(), &[Service::Router]).unwrap();
    let guard = tracing::subscriber::set_default(subscriber(&tracers));
    let (state, _worker) = router().await;

    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({"model": "demo", "prompt": "hello", "max_tokens": 3, "temperature": 0.25});
    let (status, v) = post(&state, body, Some(parent)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = post(&state, json!({"model": "nope", "prompt": "x"}), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A caller that says "not sampled" gets no span.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    post(
        &state,
        json!({"model": "demo", "prompt": "hi", "max_tokens": 1}),
        Some(unsampled),
    )
    .await;

    // Routes outside /v1/ are logged, not exported.
    let health = app(state.clone())
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    drop(guard);
    // Shutdown sends what is queued.
    tokio::task::spawn_blocking(move || tracers.shutdown())
        .await
        .unwrap();
    let spans = collector.spans();
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.kind() == SpanKind::Server)
        .collect();
    assert_eq!(servers.len(), 2, "{spans:?}");
    assert!(spans.iter().all(|s| s.service_name == "llmapi-router"));
    // The /health request's span (named "request": only /v1/ spans get a route name) is
    // not among them.
    assert!(spans.iter().all(|s| s.span.name != "request"), "{spans:?}");
    let ok = servers
        .iter()
        .find(|s| s.int("http.response.status_code") == Some(200))
        .unwrap();
    assert_eq!(ok.span.name, "POST /v1/completions");
    assert_eq!(ok.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok.parent_id_hex(), "00f067aa0ba902b7");
    assert_eq!(
        ok.int("gen_ai.usage.input_tokens"),
        v["usage"]["prompt_tokens"].as_i64()
    );
    assert_eq!(
        ok.int("gen_ai.usage.output_tokens"),
        v["usage"]["completion_tokens"].as_i64()
    );
    assert_eq!(ok.int("gen_ai.request.max_tokens"), Some(3));
    assert_eq!(ok.double("gen_ai.request.temperature"), Some(0.25));
    assert_eq!(ok.string("gen_ai.response.id"), v["id"].as_str());
    assert!(ok.double("gen_ai.latency.time_to_first_token").is_some());
    assert_eq!(ok.string("http.route"), Some("/v1/completions"));
    assert_eq!(ok.string("gen_ai.request.model"), Some("demo"));
    assert!(ok.error().is_none());
    // The choice ran in a child span of the request's.
    let choice = spans
        .iter()
        .find(|s| s.span.name == "choice")
        .unwrap_or_else(|| panic!("no choice span: {spans:?}"));
    assert_eq!(choice.trace_id_hex(), ok.trace_id_hex());
    assert_eq!(choice.parent_id_hex(), ok.span_id_hex());
    let refused = servers
        .iter()
        .find(|s| s.int("http.response.status_code") == Some(404))
        .unwrap();
    assert_eq!(refused.string("error.type"), Some("404"));
    assert!(
        refused.parent_id_hex().is_empty(),
        "a new trace starts at the router"
    );
}

#[tokio::test]
async fn an_unreachable_collector_neither_delays_nor_fails_requests() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tracers = Tracers::otlp(&format!("127.0.0.1:{port}"), &[Service::Router]).unwrap();
    let guard = tracing::subscriber::set_default(subscriber(&tracers));
    let (state, _worker) = router().await;
    for i in 0..40 {
        let body =
            json!({"model": "demo", "prompt": "hello", "max_tokens": 2, "stream": i % 2 == 0});
        let (status, _) = post(&state, body, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    drop(guard);
    // Shutdown gives up after its timeout instead of waiting for the collector.
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || tracers.shutdown()),
    )
    .await;
    assert!(done.is_ok(), "shutdown hung on an unreachable collector");
}
