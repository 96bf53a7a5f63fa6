//! Request migration on the real binaries (issue 22): two workers of the demo checkpoint
//! (`llmapi-launch serve` with a gRPC address) behind `llmapi-router`, fixed-length streams
//! (`ignore_eos`), and one worker killed with SIGKILL while every stream is running. Every
//! request still succeeds with all its tokens, greedy and seeded outputs equal those of a run
//! without the kill token for token, and the router counts a migration for each stream the
//! killed worker was running. (`tests/tests/cluster.rs` keeps the old ending, an in-band 503,
//! under `--max_migrations 0`.)

use std::io::BufReader;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llmapi_tests::cluster::{
    SECRET, Worker, metrics, migrations_off, router, wait_workers, worker, worker_field,
};
use llmapi_tests::sse::{End, read_sse_counting};
use llmapi_tests::{demo_model, free_port, send, wait_until};
use serde_json::{Value, json};

/// Streams in flight at once, greedy and seeded.
const STREAMS: usize = 6;
/// Tokens each stream generates.
const OUTPUT: u64 = 1000;
/// Payloads every stream has received when the worker is killed: the new worker recomputes
/// the prompt and this many tokens or more.
const KILL_AFTER: usize = 50;
/// How long any one stream may take.
const STREAM_LIMIT: Duration = Duration::from_secs(120);

fn bodies() -> Vec<Value> {
    (0..STREAMS)
        .map(|i| {
            let mut b = json!({"model": "demo", "prompt": format!("Story {i}: once upon a time"),
                               "max_tokens": OUTPUT, "ignore_eos": true, "temperature": 0.0,
                               "stream": true, "stream_options": {"include_usage": true}});
            if i < 2 {
                // Seeded sampling must continue its random stream on the new worker: one
                // seeded stream on each worker.
                b["temperature"] = json!(1.0);
                b["seed"] = json!(100 + i);
            }
            b
        })
        .collect()
}

/// One stream's ending as its client saw it.
#[derive(Debug)]
struct Ending {
    text: String,
    completion_tokens: u64,
    finish_reason: Value,
    error: Option<Value>,
    end: End,
}

fn ending(events: Vec<Value>, end: End) -> Ending {
    let text = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    let usage = events.iter().find(|e| !e["usage"].is_null());
    Ending {
        text,
        completion_tokens: usage
            .map_or(0, |u| u["usage"]["completion_tokens"].as_u64().unwrap_or(0)),
        finish_reason: events
            .iter()
            .map(|e| e["choices"][0]["finish_reason"].clone())
            .find(|f| !f.is_null())
            .unwrap_or(Value::Null),
        error: events.iter().find(|e| !e["error"].is_null()).cloned(),
        end,
    }
}

/// Runs every body as a stream, all at once; once each has streamed `KILL_AFTER` payloads,
/// `fault` runs (on this thread). The streams are opened one after another, each once the
/// one before has begun, so that round robin alternates the workers: A, B, A, ...
fn run_all(port: u16, fault: impl FnOnce()) -> Vec<Ending> {
    let payloads: Vec<AtomicUsize> = (0..STREAMS).map(|_| AtomicUsize::new(0)).collect();
    std::thread::scope(|s| {
        let mut readers = Vec::new();
        for (body, seen) in bodies().into_iter().zip(&payloads) {
            readers.push(s.spawn(move || {
                let bytes = body.to_string();
                let stream = send(port, "POST", "/v1/completions", Some(bytes.as_bytes()), &[])
                    .expect("connect to the router");
                let (events, end) = read_sse_counting(BufReader::new(stream), STREAM_LIMIT, seen);
                ending(events, end)
            }));
            assert!(
                wait_until(Duration::from_secs(60), || seen.load(Ordering::SeqCst) > 0),
                "a stream began"
            );
        }
        assert!(
            wait_until(Duration::from_secs(60), || payloads
                .iter()
                .all(|p| p.load(Ordering::SeqCst) >= KILL_AFTER)),
            "every stream got {KILL_AFTER} payloads"
        );
        fault();
        readers
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect()
    })
}

#[test]
fn killing_a_worker_mid_run_loses_no_stream_and_changes_no_token() {
    let model = demo_model();
    let (mut a, b): (Worker, Worker) = (
        worker(model, free_port(), &[]),
        worker(model, free_port(), &[]),
    );
    let (_router, port) = router(
        model,
        &[a.grpc, b.grpc],
        "round_robin",
        &["--eject_after_failures", "2"],
        Some(SECRET),
    );
    assert!(
        wait_workers(port, 2, Duration::from_secs(60)),
        "the router never saw both workers healthy"
    );

    let reference = run_all(port, || {});
    for (i, r) in reference.iter().enumerate() {
        assert!(
            r.error.is_none() && r.end == End::Done,
            "reference {i}: {r:?}"
        );
        assert_eq!(r.completion_tokens, OUTPUT, "reference {i}");
    }

    let mut on_a = 0;
    let faulted = run_all(port, || {
        on_a = worker_field(port, a.grpc, "inflight");
        a.proc.kill();
    });
    assert!(on_a >= 1, "worker A was running streams when it was killed");
    for (i, (got, want)) in faulted.iter().zip(&reference).enumerate() {
        assert!(
            got.error.is_none(),
            "stream {i} ended with an error: {got:?}"
        );
        assert_eq!(got.end, End::Done, "stream {i}");
        assert_eq!(got.finish_reason, "length", "stream {i}");
        assert_eq!(got.completion_tokens, OUTPUT, "stream {i}: all its tokens");
        assert_eq!(
            got.text, want.text,
            "stream {i}: the output of a run without the kill"
        );
    }
    let total: u64 = faulted.iter().map(|e| e.completion_tokens).sum();
    assert_eq!(total, STREAMS as u64 * OUTPUT);
    let text = metrics(port);
    let moved = migrations_off(&text, Some(a.grpc));
    eprintln!("worker A was running {on_a} streams; {moved} migrated off it");
    assert!(
        moved >= on_a,
        "{moved} migrations counted off worker A, which was running {on_a} streams:\n{text}"
    );
    drop(b);
}
