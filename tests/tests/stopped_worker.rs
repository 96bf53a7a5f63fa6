//! Deadlines on the real binaries. A worker process stopped with SIGSTOP behind
//! `llmapi-router`: its requests end with 504 by `--first_token_timeout` instead of hanging,
//! it is ejected, and after SIGCONT it serves again. And `llmapi-launch serve`'s embedded
//! router applies its own `--request_timeout`. On the demo model.

use std::process::Command;
use std::time::{Duration, Instant};

use llmapi_tests::cluster::{SECRET, healthy_count, router, worker};
use llmapi_tests::{Proc, demo_model, free_port, post, serve, wait_healthy, wait_until};
use serde_json::{Value, json};

fn signal(proc: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &proc.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {}", proc.pid());
}

#[test]
fn a_stopped_worker_gets_504_by_the_first_token_timeout_then_is_ejected_and_returns() {
    // The worker's own embedded router takes the deadline flags too.
    let w = worker(
        demo_model(),
        free_port(),
        &["--request_timeout", "60", "--first_token_timeout", "30"],
    );
    let (_router, port) = router(
        demo_model(),
        &[w.grpc],
        "round_robin",
        &["--first_token_timeout", "2", "--request_timeout", "30"],
        Some(SECRET),
    );
    wait_healthy(port, Duration::from_secs(30));
    let normal = json!({"model": "demo", "prompt": "Hello", "max_tokens": 4});
    assert_eq!(post(port, "/v1/completions", &normal).status, 200);

    signal(&w.proc, "-STOP");
    for stream in [false, true] {
        let mut body = normal.clone();
        body["stream"] = json!(stream);
        let t0 = Instant::now();
        let r = post(port, "/v1/completions", &body);
        let took = t0.elapsed();
        if stream && r.status == 503 {
            // Health checks (three missed, 2 s each) ejected the worker before this second
            // request: refused at once, which is also no hang.
            continue;
        }
        assert_eq!(r.status, 504, "stream {stream}: {}", r.body);
        let v: Value = r.json();
        assert_eq!(v["error"]["type"], "timeout_error", "{v}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(20),
            "answered by the 2 s first-token timeout, not hung: {took:?}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || healthy_count(port) == 0),
        "the stopped worker is ejected"
    );
    assert_eq!(
        post(port, "/v1/completions", &normal).status,
        503,
        "no worker left: refused at once"
    );

    signal(&w.proc, "-CONT");
    assert!(
        wait_until(Duration::from_secs(30), || healthy_count(port) == 1),
        "the worker returns after SIGCONT"
    );
    assert!(
        wait_until(Duration::from_secs(30), || post(
            port,
            "/v1/completions",
            &normal
        )
        .status
            == 200),
        "and serves again"
    );
}

#[test]
fn serves_embedded_router_answers_504_past_its_request_timeout() {
    let port = free_port();
    let _server = serve(demo_model(), port, &["--request_timeout", "0.001"], &[]);
    // 200 tokens cannot cross the gRPC stream within 1 ms, whether or not the first came.
    let long = json!({"model": "demo", "prompt": "Hello", "max_tokens": 200, "ignore_eos": true});
    let r = post(port, "/v1/completions", &long);
    assert_eq!(r.status, 504, "{}", r.body);
    let v: Value = r.json();
    assert_eq!(v["error"]["type"], "timeout_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--request_timeout")),
        "{v}"
    );
}
