//! Engine restarts on the real `llmapi-launch serve`: an engine thread that panics (the
//! debug-build fault hook `LLMAPI_FAULT_PANIC_AT_STEP`) ends its request with an error, is
//! started again in place, and the router serves through it again; a local tensor-parallel
//! group that loses a rank restarts as a whole; with `--max_restarts 0` the server exits
//! non-zero instead. The restarts show in the server's log.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use llmapi_tests::{Proc, demo_model, free_port, get, post, send, serve, wait_until};
use serde_json::{Value, json};

/// The fault-injection variable of the engine (debug builds only).
const PANIC_AT_STEP: &str = "LLMAPI_FAULT_PANIC_AT_STEP";

fn completion_body() -> Value {
    json!({"model": "demo", "prompt": "Hello, my name is", "max_tokens": 8,
           "temperature": 0, "ignore_eos": true})
}

fn log_of(p: &Proc) -> String {
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

/// A streamed completion read to its end (bounded by the client's 60 s read timeout).
fn streamed(port: u16, max_tokens: u32) -> String {
    let body = json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let stream = send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).unwrap();
    let mut text = String::new();
    let _ = BufReader::new(stream).read_to_string(&mut text);
    text
}

/// Polls until a completion succeeds again; panics with the log if none does in `within`.
fn served_again(port: u16, server: &Proc, within: Duration) {
    let ok = wait_until(within, || {
        llmapi_tests::request(
            port,
            "POST",
            "/v1/completions",
            Some(&completion_body()),
            &[],
        )
        .is_ok_and(|r| r.status == 200)
    });
    assert!(
        ok,
        "no completion succeeded within {within:?} of the failure; log:\n{}",
        log_of(server)
    );
}

#[test]
fn a_panicking_engine_is_restarted_and_the_router_serves_through_it_again() {
    let port = free_port();
    let mut server = serve(
        demo_model(),
        port,
        &["--max_restarts", "2"],
        &[(PANIC_AT_STEP, "3".to_owned())],
    );
    // Step 1 prefills and streams the first token; step 3 panics mid-stream.
    let started = Instant::now();
    let text = streamed(port, 16);
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the stream hung for {:?}",
        started.elapsed()
    );
    assert!(
        text.contains("\"error\"") && !text.contains("\"finish_reason\":\"length\""),
        "the request on the failed engine does not end with an error: {text}"
    );
    served_again(port, &server, Duration::from_secs(90));
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server exited"
    );
    let log = log_of(&server);
    for line in [
        "the engine thread panicked",
        "the engine failed; restarting it",
        "engine restarted",
    ] {
        assert!(log.contains(line), "the log lacks {line:?}:\n{log}");
    }
    // The pool holds one worker, the same URL, admitted again.
    let workers = get(port, "/workers").json();
    let workers = workers["workers"].as_array().cloned().unwrap_or_default();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["healthy"], true, "{workers:?}");
    // And it keeps serving: the fault fires once per process.
    for _ in 0..3 {
        let r = post(port, "/v1/completions", &completion_body());
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[test]
fn with_max_restarts_0_a_panicking_engine_stops_the_server_with_an_error() {
    let port = free_port();
    let mut server = serve(
        demo_model(),
        port,
        &["--max_restarts", "0"],
        &[(PANIC_AT_STEP, "2".to_owned())],
    );
    let text = streamed(port, 16);
    assert!(text.contains("\"error\""), "{text}");
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("the server exits once the failure is not restarted");
    assert!(!status.success(), "{status}");
    let log = log_of(&server);
    assert!(
        log.contains("not restarted (--max_restarts)"),
        "the log does not say why it stopped:\n{log}"
    );
}

/// Pids of the live children of `pid` (the local group's ranks), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1
            && fields[0] != "Z"
            && fields[1] == pid.to_string()
            && let Ok(p) = entry.file_name().to_string_lossy().parse()
        {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_local_group_that_loses_a_rank_restarts_as_a_whole_and_serves_again() {
    let port = free_port();
    let server = serve(
        demo_model(),
        port,
        &["--tp_size", "2", "--max_restarts", "2"],
        &[],
    );
    let ranks = children(server.pid());
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    // A long stream; once its first token is out, its group loses rank 1.
    let body = json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 1900,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let stream = send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream closed early"
        );
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &ranks[0].to_string()])
        .status();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(
        rest.contains("\"error\"") && !rest.contains("\"finish_reason\":\"length\""),
        "the stream on the broken group does not end with an error: {rest}"
    );
    served_again(port, &server, Duration::from_secs(120));
    let now = children(server.pid());
    assert!(
        now.len() == 1 && now[0] != ranks[0],
        "the group was not restarted with a new rank: before {ranks:?}, now {now:?}"
    );
    let log = log_of(&server);
    assert!(
        log.contains("restarting it") && log.contains("rank 1"),
        "the log does not show the group's restart and its cause:\n{log}"
    );
}
