//! Two worker processes behind one `llmapi-router` process: load sharing by each policy,
//! kv_cache_aware prefix affinity (its index through evictions and restarts: `kv_events.rs`),
//! a worker killed mid-run (without migration) and its return,
//! admission errors,
//! and a router without the workers' secret getting no service from them.

use std::path::Path;
use std::time::{Duration, Instant};

use llmapi_tests::cluster::{self, SECRET, Worker, healthy_count, routed, worker_field};
use llmapi_tests::sse::{first_event, read_sse};
use llmapi_tests::{
    Proc, bench_model, demo_model, free_port, get, post, request, send, wait_healthy, wait_until,
};
use serde_json::json;

fn worker(model: &Path, grpc: u16) -> Worker {
    cluster::worker(model, grpc, &[])
}

fn router(model: &Path, grpcs: &[u16], policy: &str, extra: &[&str]) -> (Proc, u16) {
    cluster::router(model, grpcs, policy, extra, Some(SECRET))
}

/// Reads an open SSE response to its first event (30 s at most).
fn first(stream: std::net::TcpStream) -> std::io::BufReader<std::net::TcpStream> {
    first_event(stream, Duration::from_secs(30)).expect("an SSE event within 30 s")
}

#[test]
fn two_workers_share_load_by_each_policy() {
    let (a, b) = (
        worker(demo_model(), free_port()),
        worker(demo_model(), free_port()),
    );
    for policy in [
        "round_robin",
        "least_load",
        "power_of_two",
        "kv_cache_aware",
    ] {
        let (_router, port) = router(demo_model(), &[a.grpc, b.grpc], policy, &[]);
        wait_healthy(port, Duration::from_secs(30));
        assert!(
            wait_until(Duration::from_secs(10), || healthy_count(port) == 2),
            "{policy}: both workers admitted"
        );
        for i in 0..16 {
            let r = post(
                port,
                "/v1/completions",
                &json!({"model": "demo", "prompt": format!("request {i}"), "max_tokens": 2}),
            );
            assert_eq!(r.status, 200, "{policy}: {}", r.body);
        }
        let (na, nb) = (routed(port, a.grpc), routed(port, b.grpc));
        assert_eq!(na + nb, 16, "{policy}");
        assert!(na >= 3 && nb >= 3, "{policy} shares load: {na} / {nb}");
    }
    // The workers' own embedded routers stayed idle.
    assert_eq!(get(a.http, "/health").status, 200);
}

#[test]
fn kv_cache_aware_sends_a_repeated_prefix_to_the_worker_that_cached_it() {
    let (a, b) = (
        worker(demo_model(), free_port()),
        worker(demo_model(), free_port()),
    );
    let (_router, port) = router(demo_model(), &[a.grpc, b.grpc], "kv_cache_aware", &[]);
    wait_healthy(port, Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || healthy_count(port) == 2));
    let prefix =
        "You are a helpful assistant who answers questions about the solar system. ".repeat(6);
    let mut cached = Vec::new();
    for i in 0..6 {
        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "demo", "prompt": format!("{prefix} Question {i}:"), "max_tokens": 2}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        cached.push(
            r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
        );
        // The worker's KV events reach the router asynchronously: wait for the prefix.
        assert!(wait_until(Duration::from_secs(10), || {
            worker_field(port, a.grpc, "prefix_cache_blocks")
                + worker_field(port, b.grpc, "prefix_cache_blocks")
                > 0
        }));
    }
    let (na, nb) = (routed(port, a.grpc), routed(port, b.grpc));
    assert!(
        na == 6 || nb == 6,
        "one worker took every request: {na} / {nb}"
    );
    assert_eq!(cached[0], 0);
    assert!(
        cached[1..].iter().all(|&c| c >= 64),
        "the shared prefix was served from cache: {cached:?}"
    );
}

/// Without migration (`--max_migrations 0`; `killed_worker.rs` has it on) the stream on a
/// killed worker ends with an in-band error, as it did before migration existed.
#[test]
fn without_migration_a_killed_worker_ends_its_streams_with_an_error_and_the_router_recovers() {
    let model = bench_model();
    let (grpc_a, grpc_b) = (free_port(), free_port());
    let mut a = worker(model, grpc_a);
    let b = worker(model, grpc_b);
    let (_router, port) = router(
        model,
        &[grpc_a, grpc_b],
        "round_robin",
        &["--eject_after_failures", "2", "--max_migrations", "0"],
    );
    wait_healthy(port, Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || healthy_count(port) == 2));

    // Two long streams: round robin puts one on each worker.
    let body = json!({"model": "bench", "prompt": "tell me a long story", "max_tokens": 1500, "ignore_eos": true, "stream": true}).to_string();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let s = send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect");
        streams.push(first(s));
    }
    a.proc.kill();
    let killed_at = Instant::now();
    let mut ended_with_error = 0;
    for s in streams {
        let (events, _) = read_sse(s, Duration::from_secs(5));
        if events.iter().any(|e| e["error"]["code"] == 503) {
            assert_eq!(events.last(), Some(&json!("[DONE]")));
            ended_with_error += 1;
        }
    }
    assert_eq!(
        ended_with_error, 1,
        "the stream on the killed worker ended with an error event"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(10), "promptly");

    // New requests go to the live worker (retried there if the dead one is tried first).
    for _ in 0..4 {
        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "bench", "prompt": "hi", "max_tokens": 2}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        wait_until(Duration::from_secs(10), || healthy_count(port) == 1),
        "dead worker ejected"
    );

    // The worker returns on the same address and is admitted again.
    a = worker(model, grpc_a);
    assert!(
        wait_until(Duration::from_secs(20), || healthy_count(port) == 2),
        "worker re-admitted"
    );
    let before = routed(port, grpc_a);
    for _ in 0..4 {
        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "bench", "prompt": "hi", "max_tokens": 2}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        routed(port, grpc_a) > before,
        "the returned worker takes requests again"
    );
    drop((a, b));
}

#[test]
fn router_reports_admission_and_availability_errors() {
    // No worker at all: 503 on generation and health.
    let dead = free_port();
    let (_router, port) = router(demo_model(), &[dead], "round_robin", &[]);
    assert!(wait_until(Duration::from_secs(10), || {
        request(port, "GET", "/version", None, &[]).is_ok_and(|r| r.status == 200)
    }));
    assert_eq!(get(port, "/health").status, 503);
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x"}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], 503);

    // A live worker, at most one request in flight and no queue: the second gets 429.
    let w = worker(bench_model(), free_port());
    let (_router2, port2) = router(
        bench_model(),
        &[w.grpc],
        "round_robin",
        &["--max_inflight_requests", "1", "--max_queued_requests", "0"],
    );
    wait_healthy(port2, Duration::from_secs(30));
    let body = json!({"model": "bench", "prompt": "long", "max_tokens": 500, "ignore_eos": true, "stream": true}).to_string();
    let held = send(port2, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect");
    let _held = first(held);
    let r = post(
        port2,
        "/v1/completions",
        &json!({"model": "bench", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
}

/// Workers require the job secret on every gRPC call: a router that does not send it (or
/// sends another) never admits them and answers 503, while one with it serves.
#[test]
fn a_router_without_the_workers_secret_gets_no_service() {
    let w = worker(demo_model(), free_port());
    for token in [None, Some("cluster-test-secret-6f1d2b9a0c3X")] {
        let (_router, port) = cluster::router(demo_model(), &[w.grpc], "round_robin", &[], token);
        assert!(wait_until(Duration::from_secs(10), || {
            request(port, "GET", "/version", None, &[]).is_ok_and(|r| r.status == 200)
        }));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            healthy_count(port),
            0,
            "{token:?}: the worker refused the router"
        );
        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "demo", "prompt": "x", "max_tokens": 1}),
        );
        assert_eq!(r.status, 503, "{token:?}: {}", r.body);
    }
    let (_router, port) = router(demo_model(), &[w.grpc], "round_robin", &[]);
    wait_healthy(port, Duration::from_secs(30));
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}
