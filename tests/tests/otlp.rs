//! `--otlp_traces_endpoint`: `llmapi-launch serve` sends a router SERVER span per OpenAI request
//! and a worker SERVER span per Generate to a collector (the test double from
//! `llmapi_common::traces::testing`), in the caller's trace, with the worker span the child of
//! the router span and the engine's queue, prefill and decode phases the worker span's children.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use llmapi_common::traces::testing::{CollectorDouble, ReceivedSpan, SpanKind};
use llmapi_tests::{demo_model, free_port, request, serve};
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The router's and the worker's SERVER spans in `trace_id`, once both have arrived.
fn pair(spans: &[ReceivedSpan], trace_id: &str) -> Option<(ReceivedSpan, ReceivedSpan)> {
    let of = |service: &str| {
        spans
            .iter()
            .find(|s| {
                s.service_name == service
                    && s.trace_id_hex() == trace_id
                    && s.kind() == SpanKind::Server
            })
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
        assert_eq!(worker.span.name, "llmapi.worker.v1.Worker/Generate");
        assert_eq!(worker.string("rpc.method"), Some("Generate"));

        // The engine's phases are the worker span's children, one after the other.
        let spans = rt.block_on(collector.wait_until(Duration::from_secs(30), |s| {
            let phases = s
                .iter()
                .filter(|c| c.parent_id_hex() == worker.span_id_hex())
                .count();
            let choice = s
                .iter()
                .any(|c| c.span.name == "choice" && c.parent_id_hex() == router.span_id_hex());
            phases >= 3 && choice
        }));
        let phase = |name: &str| {
            spans
                .iter()
                .find(|p| p.span.name == name && p.parent_id_hex() == worker.span_id_hex())
                .unwrap_or_else(|| panic!("no {name} span under the worker's: {spans:?}"))
                .clone()
        };
        let (queue, prefill, decode) = (phase("queue"), phase("prefill"), phase("decode"));
        assert_eq!(queue.service_name, "llmapi-worker");
        assert_eq!(
            queue.span.end_time_unix_nano,
            prefill.span.start_time_unix_nano
        );
        assert_eq!(
            prefill.span.end_time_unix_nano,
            decode.span.start_time_unix_nano
        );
        assert_eq!(
            prefill.int("llmapi.prefill_tokens"),
            worker.int("llmapi.prefill_tokens")
        );
        assert_eq!(
            decode.int("gen_ai.usage.output_tokens"),
            usage["completion_tokens"].as_i64()
        );
        // The router's choice ran in a child span of its request span.
        assert!(
            spans.iter().any(|c| c.span.name == "choice"
                && c.service_name == "llmapi-router"
                && c.parent_id_hex() == router.span_id_hex()),
            "{spans:?}"
        );
    }
    let router = pair(&collector.spans(), TRACE_ID).unwrap().0;
    assert_eq!(router.double("gen_ai.request.temperature"), Some(0.5));
    assert!((router.double("gen_ai.request.top_p").unwrap() - 0.9).abs() < 1e-6);
}
