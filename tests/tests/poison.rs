//! Poison requests (ones that can never fit the worker's KV cache) next to normal traffic on
//! the real `llmapi-launch serve`: each poison request gets 400 naming the cache, every
//! normal one succeeds, and the worker's breaker never opens nor is anything retried.

use std::time::Duration;

use llmapi_tests::{demo_model, free_port, get, post, serve};
use serde_json::{Value, json};

/// A counter's value in the router's Prometheus text.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn poison_requests_get_400_and_open_no_breaker_while_normal_ones_succeed() {
    let port = free_port();
    // 256 tokens of KV cache: a request asking for 1,000 new tokens can never fit.
    let _server = serve(
        demo_model(),
        port,
        &["--set", "kv_cache_config.max_tokens=256"],
        &[],
    );
    let poison = json!({"model": "demo", "prompt": "Hello", "max_tokens": 1000});
    let normal = json!({"model": "demo", "prompt": "Hello", "max_tokens": 4});
    let rounds = 20;
    let (poisoned, served) = std::thread::scope(|s| {
        let p = s.spawn(|| {
            (0..rounds)
                .map(|_| post(port, "/v1/completions", &poison))
                .collect::<Vec<_>>()
        });
        let n = s.spawn(|| {
            (0..rounds)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(5));
                    post(port, "/v1/completions", &normal)
                })
                .collect::<Vec<_>>()
        });
        (
            p.join().expect("poison sender"),
            n.join().expect("normal sender"),
        )
    });
    for r in &poisoned {
        assert_eq!(r.status, 400, "{}", r.body);
        let v: Value = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("KV cache"),
            "the message names the cause: {msg}"
        );
    }
    for r in &served {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let workers = get(port, "/workers").json();
    let workers = workers["workers"].as_array().cloned().unwrap_or_default();
    assert!(!workers.is_empty(), "the pool lists its worker");
    for w in &workers {
        assert_eq!(w["breaker_open"], false, "{w}");
        assert_eq!(w["healthy"], true, "{w}");
    }
    let metrics = get(port, "/metrics").body;
    assert_eq!(
        counter(&metrics, "llmapi_router_worker_failures_total"),
        Some(0),
        "poison requests are not the worker's fault"
    );
    assert_eq!(counter(&metrics, "llmapi_router_retries_total"), Some(0));
    // The worker still serves after the poison.
    assert_eq!(post(port, "/v1/completions", &normal).status, 200);
}
