//! `--otlp_traces_endpoint`: `llmapi-launch serve` sends a router span per OpenAI request and a
//! worker span per Generate to a collector (the test double from `llmapi_otlp::testing`), in
//! the caller's trace, with the worker span the child of the router span.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use llmapi_otlp::testing::{CollectorDouble, ReceivedSpan};
use llmapi_tests::{demo_model, free_port, request, serve};
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The router's and the worker's spans in `trace_id`, once both have arrived.
fn pair(spans: &[ReceivedSpan], trace_id: &str) -> Option<(ReceivedSpan, ReceivedSpan)> {
    let of = |service: &str| {
        spans
            .iter()
            .find(|s| s.service_name == service && s.trace_id_hex() == trace_id)
            .cloned()
    };
    Some((of("llmapi-router")?, of("llmapi-worker")?))
}

#[test]
fn request_spans_reach_the_collector_in_the_callers_trace() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let collector = rt.block_on(CollectorDouble::start()).unwrap();
    let port = free_port();
    let endpoint = collector.endpoint();
    let _server = serve(
        demo_model(),
        port,
        &["--otlp_traces_endpoint", &endpoint],
        &[],
    );

    let cases = [
        (
            TRACE_ID,
            "/v1/completions",
            json!({"model": "demo", "prompt": "Hello, my name is", "max_tokens": 7,
                   "temperature": 0.5, "top_p": 0.9}),
        ),
        (
            "0af7651916cd43dd8448eb211c80319c",
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ];
    for (trace_id, path, body) in cases {
        let traceparent = format!("00-{trace_id}-{CALLER_SPAN}-01");
        let r = request(
            port,
            "POST",
            path,
            Some(&body),
            &[("traceparent", &traceparent)],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let usage = if body["stream"] == true {
            r.sse()
                .into_iter()
                .find(|v| v["usage"].is_object())
                .unwrap()["usage"]
                .clone()
        } else {
            r.json()["usage"].clone()
        };

        let spans = rt.block_on(
            collector.wait_until(Duration::from_secs(30), |s| pair(s, trace_id).is_some()),
        );
        let (router, worker) = pair(&spans, trace_id)
            .unwrap_or_else(|| panic!("no router and worker span for {trace_id}: {spans:?}"));
        assert_eq!(router.span.name, format!("POST {path}"));
        assert_eq!(router.parent_id_hex(), CALLER_SPAN);
        assert_eq!(worker.parent_id_hex(), router.span_id_hex());
        assert_eq!(router.int("http.response.status_code"), Some(200));
        assert_eq!(router.string("gen_ai.request.model"), Some("demo"));
        assert_eq!(
            router.int("gen_ai.request.max_tokens"),
            body["max_tokens"].as_i64()
        );
        for s in [&router, &worker] {
            assert_eq!(
                s.int("gen_ai.usage.input_tokens"),
                usage["prompt_tokens"].as_i64(),
                "{}",
                s.service_name
            );
            assert_eq!(
                s.int("gen_ai.usage.output_tokens"),
                usage["completion_tokens"].as_i64(),
                "{}",
                s.service_name
            );
            assert!(s.double("gen_ai.latency.time_to_first_token").unwrap() > 0.0);
            assert!(s.double("gen_ai.latency.e2e").unwrap() > 0.0);
            assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
        }
        assert!(worker.double("gen_ai.latency.time_in_queue").is_some());
        assert!(worker.int("llmapi.prefill_tokens").is_some());
    }
    let router = pair(&collector.spans(), TRACE_ID).unwrap().0;
    assert_eq!(router.double("gen_ai.request.temperature"), Some(0.5));
    assert!((router.double("gen_ai.request.top_p").unwrap() - 0.9).abs() < 1e-6);
}
