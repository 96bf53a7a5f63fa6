//! `n > 1` and `best_of` as one sequence group on the real binaries (demo model): the worker
//! computes a long prompt once for all the choices, read from its iteration and prefix-cache
//! counters on the router's /metrics, with prefix reuse on and off; seeded choices are the
//! tokens independent requests with the same seeds give; and when the worker holding a group
//! is killed mid-stream, every choice moves to the other worker and completes unchanged.

use std::io::BufReader;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llmapi_tests::cluster::{SECRET, metrics, router, wait_workers, worker, worker_field};
use llmapi_tests::sse::{End, read_sse_counting};
use llmapi_tests::{demo_model, free_port, get, post, send, serve, wait_until};
use serde_json::{Value, json};

/// Prompt tokens: nine full blocks of 32 and a tail of 12.
const PROMPT_LEN: u64 = 300;
/// The model's default tokens_per_block.
const BLOCK: u64 = 32;
/// Tokens each choice generates (ignore_eos): long enough that the first choice still runs
/// when the others reach the worker.
const OUTPUT: u64 = 48;

fn prompt_ids(salt: u32) -> Vec<u32> {
    (0..PROMPT_LEN as u32)
        .map(|i| (i * 37 + salt * 101) % 1900 + 20)
        .collect()
}

/// A seeded sampled completion of `ids` with `extra` fields.
fn body(ids: &[u32], extra: Value) -> Value {
    let mut b = json!({"model": "demo", "prompt": ids, "max_tokens": OUTPUT,
                       "ignore_eos": true, "temperature": 1.0, "seed": 7});
    b.as_object_mut()
        .expect("an object")
        .extend(extra.as_object().expect("an object").clone());
    b
}

/// A worker counter summed over the `{worker=...}` series of the router's /metrics.
fn worker_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{worker=")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Iteration tokens and prefix-cache hit tokens the worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    computed: u64,
    hits: u64,
}

fn counters(port: u16) -> Counters {
    let text = get(port, "/metrics").body;
    Counters {
        computed: worker_counter(&text, "llmapi_worker_iteration_tokens_total"),
        hits: worker_counter(&text, "llmapi_worker_prefix_cache_hits_total"),
    }
}

/// Waits until the worker's counters (polled with the router's health checks) reach at least
/// `want` computed tokens past `before`, then returns them.
fn counters_after(port: u16, before: Counters, want: u64) -> Counters {
    let mut now = before;
    let reached = wait_until(Duration::from_secs(30), || {
        now = counters(port);
        now.computed >= before.computed + want
    });
    assert!(reached, "counters stayed at {now:?} (from {before:?})");
    now
}

/// What a group of `choices` on one prompt computes, and takes from shared or cached blocks:
/// the prompt once (or, when `cached`, only its tail too), each other choice its tail after
/// the shared full blocks (the last prompt token at least), and one token per decode step of
/// every choice.
fn grouped_cost(choices: u64, cached: bool) -> (u64, u64) {
    let shared = (PROMPT_LEN - 1) / BLOCK * BLOCK;
    let tail = PROMPT_LEN - shared;
    let (first, first_hits) = if cached {
        (tail, shared)
    } else {
        (PROMPT_LEN, 0)
    };
    let computed = first + (choices - 1) * tail + choices * (OUTPUT - 1);
    (computed, first_hits + (choices - 1) * shared)
}

fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| c["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// One server; the checks of both tests below.
fn computes_the_prompt_once(extra: &[&str], reuse: bool, salt: u32) {
    let port = free_port();
    // A prefill budget that takes all four prompts in one step, as on a GPU (the CPU default
    // of 512 would hold the second back a step, and with reuse on it would then find the
    // first one's blocks cached even without a group).
    let mut flags = vec!["--set", "scheduler_config.prefill_token_budget=4096"];
    flags.extend_from_slice(extra);
    let _server = serve(demo_model(), port, &flags, &[]);
    let ids = prompt_ids(salt);
    let polled = wait_until(Duration::from_secs(30), || {
        get(port, "/metrics")
            .body
            .contains("llmapi_worker_iteration_tokens_total{worker=")
    });
    assert!(polled, "the worker's counters reach /metrics");
    let before = counters(port);

    let r = post(port, "/v1/completions", &body(&ids, json!({"n": 4})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let grouped = texts(&v);
    assert_eq!(grouped.len(), 4);
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_LEN, "counted once: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 4 * OUTPUT, "{v}");
    let (cost, shared) = grouped_cost(4, false);
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"],
        shared / 3,
        "the shared full blocks: {v}"
    );
    let after = counters_after(port, before, cost);
    assert_eq!(
        (after.computed - before.computed, after.hits - before.hits),
        (cost, shared),
        "n=4 computes the prompt once, not {} prompt tokens",
        4 * PROMPT_LEN
    );

    // best_of=4, n=2: the same group of four, the best two returned; with prefix reuse its
    // first choice finds the prompt's full blocks cached by the request before.
    let (cost, shared) = grouped_cost(4, reuse);
    let before = after;
    let r = post(
        port,
        "/v1/completions",
        &body(&ids, json!({"n": 2, "best_of": 4, "logprobs": 0})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let best = texts(&r.json());
    assert_eq!(best.len(), 2);
    assert!(
        best.iter().all(|t| grouped.contains(t)),
        "{best:?} of {grouped:?}"
    );
    let after = counters_after(port, before, cost);
    assert_eq!(
        (after.computed - before.computed, after.hits - before.hits),
        (cost, shared),
        "best_of=4 computes the prompt once"
    );

    // Each choice is what an independent request with its seed (seed + index) gives.
    for (k, want) in grouped.iter().enumerate() {
        let r = post(port, "/v1/completions", &body(&ids, json!({"seed": 7 + k})));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(&texts(&r.json())[0], want, "choice {k}");
    }
}

#[test]
fn n_choices_compute_a_long_prompt_once_with_prefix_reuse_off() {
    computes_the_prompt_once(
        &["--set", "kv_cache_config.enable_block_reuse=false"],
        false,
        1,
    );
}

#[test]
fn n_choices_compute_a_long_prompt_once_with_prefix_reuse_on() {
    computes_the_prompt_once(&[], true, 2);
}

/// Streams per choice index of an SSE response: text, finish reason, errors.
fn per_choice(events: &[Value], n: usize) -> Vec<(String, Option<String>)> {
    let mut out = vec![(String::new(), None); n];
    for e in events {
        assert!(e["error"].is_null(), "in-band error: {e}");
        for c in e["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap_or(0) as usize;
            out[i].0.push_str(c["text"].as_str().unwrap_or_default());
            if let Some(f) = c["finish_reason"].as_str() {
                out[i].1 = Some(f.to_owned());
            }
        }
    }
    out
}

#[test]
fn killing_the_worker_that_holds_a_group_moves_every_choice_and_changes_no_token() {
    const N: usize = 3;
    const LONG: u64 = 1000;
    let model = demo_model();
    let (a, b) = (
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
        "both workers healthy"
    );
    let request = json!({"model": "demo", "prompt": "Once upon a time", "n": N,
                         "max_tokens": LONG, "ignore_eos": true, "temperature": 1.0,
                         "seed": 31, "stream": true});
    let mut workers = [Some(a), Some(b)];
    let mut run = |kill: bool| {
        let seen = AtomicUsize::new(0);
        let bytes = request.to_string();
        let stream = send(port, "POST", "/v1/completions", Some(bytes.as_bytes()), &[])
            .expect("connect to the router");
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                read_sse_counting(BufReader::new(stream), Duration::from_secs(120), &seen)
            });
            if kill {
                assert!(
                    wait_until(Duration::from_secs(60), || seen.load(Ordering::SeqCst)
                        >= 60),
                    "the stream began"
                );
                // The group runs on one worker: the one with all its choices in flight.
                let holder = workers
                    .iter()
                    .position(|w| {
                        w.as_ref()
                            .is_some_and(|w| worker_field(port, w.grpc, "inflight") == N as u64)
                    })
                    .expect("one worker runs every choice of the group");
                if let Some(mut w) = workers[holder].take() {
                    w.proc.kill();
                }
            }
            let (events, end) = reader.join().expect("reader thread");
            assert_eq!(end, End::Done, "{events:?}");
            per_choice(&events, N)
        })
    };
    let reference = run(false);
    let faulted = run(true);
    for (i, (got, want)) in faulted.iter().zip(&reference).enumerate() {
        assert_eq!(got.1.as_deref(), Some("length"), "choice {i}");
        assert_eq!(
            got, want,
            "choice {i}: the output of a run without the kill"
        );
    }
    let moved = llmapi_tests::cluster::migrations_off(&metrics(port), None);
    assert_eq!(moved, N as u64, "every choice of the group migrated");
}
