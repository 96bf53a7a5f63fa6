//! The router's OTLP spans (`span_exporter`): one SERVER span per OpenAI request with its
//! status, sampling fields and usage, and requests unaffected by an unreachable collector.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_otlp::testing::CollectorDouble;
use llmapi_otlp::{ExporterConfig, SpanExporter};
use llmapi_router::codec::ByteCodec;
use llmapi_router::pool::Pool;
use llmapi_router::server::app;
use llmapi_router::testing::{Script, ScriptedHandle, ScriptedWorker};
use llmapi_router::{AppState, RouterConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn router(exporter: SpanExporter) -> (Arc<AppState>, ScriptedHandle) {
    let config = RouterConfig {
        served_model_name: "demo".into(),
        span_exporter: Some(exporter),
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
    let mut config = ExporterConfig::new(collector.endpoint(), "llmapi-router");
    config.flush_interval = Duration::from_millis(50);
    let (exporter, task) = SpanExporter::start(config).unwrap();
    let (state, _worker) = router(exporter).await;

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

    let spans = collector
        .wait_until(Duration::from_secs(10), |s| s.len() >= 2)
        .await;
    task.shutdown(Duration::from_secs(5)).await;
    assert_eq!(collector.spans().len(), 2, "{spans:?}");
    let ok = spans
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
    let refused = spans
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
    let mut config = ExporterConfig::new(format!("127.0.0.1:{port}"), "llmapi-router");
    config.flush_interval = Duration::from_millis(10);
    config.queue_capacity = 4;
    let (exporter, task) = SpanExporter::start(config).unwrap();
    let (state, _worker) = router(exporter.clone()).await;
    let start = Instant::now();
    for i in 0..40 {
        let body =
            json!({"model": "demo", "prompt": "hello", "max_tokens": 2, "stream": i % 2 == 0});
        let (status, _) = post(&state, body, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "40 requests took {:?}",
        start.elapsed()
    );
    let start = Instant::now();
    task.shutdown(Duration::from_secs(1)).await;
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(exporter.exported(), 0);
    assert!(exporter.failed() + exporter.dropped() > 0);
}
