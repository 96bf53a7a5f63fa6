//! The load-balancer configs of deploy/ under the real nginx and HAProxy (Debian's packages,
//! installed by .ci/run): two routers behind each, streams passed on chunk by chunk, and a
//! router drained with SIGTERM mid-run costs no request.
//!
//! The configs are used as shipped; only their addresses are rewritten to free loopback ports.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llmapi_tests::balancer::{self, Balancer, Running, installed};
use llmapi_tests::{HttpResponse, Proc, demo_model, free_port, request, send, serve};
use serde_json::{Value, json};

/// Two `llmapi-launch serve` instances (each a router with its own worker) behind a balancer.
struct Fleet {
    routers: Vec<Option<Proc>>,
    balancer: Running,
    port: u16,
}

fn start(b: Balancer) -> Fleet {
    let ports = [free_port(), free_port()];
    let routers: Vec<Option<Proc>> = ports
        .iter()
        .map(|&p| Some(serve(demo_model(), p, &[], &[])))
        .collect();
    let balancer = balancer::start(b, ports);
    Fleet {
        routers,
        port: balancer.port,
        balancer,
    }
}

impl Fleet {
    fn balancer_log(&self) -> String {
        self.balancer.log()
    }
}

fn completion(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": demo_model().file_name().expect("model dir").to_string_lossy(),
        "prompt": "The load balancer",
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": stream,
    })
}

/// Streams one completion and counts the reads the response took: a buffering proxy hands
/// the stream over in a few large pieces, a streaming one in about one piece per token.
fn stream_reads(port: u16, tokens: u32) -> (usize, String) {
    let body = serde_json::to_vec(&completion(tokens, true)).expect("json");
    let mut s = send(port, "POST", "/v1/completions", Some(&body), &[]).expect("send");
    let mut text = Vec::new();
    let mut reads = 0;
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reads += 1;
                text.extend_from_slice(&buf[..n]);
            }
            Err(e) => panic!("reading the stream: {e}"),
        }
    }
    (reads, String::from_utf8_lossy(&text).into_owned())
}

fn streams_arrive_token_by_token(b: Balancer) {
    if !installed(b) {
        return;
    }
    let fleet = start(b);
    let tokens = 256;
    let (reads, text) = stream_reads(fleet.port, tokens);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let events = text.matches("data: {").count();
    // A token that ends inside a UTF-8 character waits for the next one.
    assert!(
        events >= tokens as usize / 2,
        "{events} events: {text}\n{}",
        fleet.balancer_log()
    );
    assert!(text.contains("data: [DONE]"), "{text}");
    // Buffered, 256 events of about 250 bytes arrive in a handful of 4 to 8 KiB pieces.
    assert!(
        reads >= 48,
        "{b:?} passed {events} events on in {reads} reads: it buffers the stream"
    );
    eprintln!("{b:?}: {events} events in {reads} reads");
}

fn a_draining_router_costs_no_request(b: Balancer) {
    if !installed(b) {
        return;
    }
    let mut fleet = start(b);
    let port = fleet.port;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut answers: Vec<HttpResponse> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let body = completion(8, false);
                    match request(port, "POST", "/v1/completions", Some(&body), &[]) {
                        Ok(r) => answers.push(r),
                        Err(e) => panic!("request through the balancer failed: {e}"),
                    }
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    // SIGTERM: the router drains (503 on /health and to new requests), then exits.
    let mut first = fleet.routers[0].take().expect("router");
    assert!(
        first.terminate(Duration::from_secs(30)),
        "router did not stop"
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<HttpResponse> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    let failed: Vec<_> = answers.iter().filter(|r| r.status != 200).collect();
    assert!(answers.len() >= 10, "only {} requests ran", answers.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed through {b:?}, e.g. {} {}\n{}",
        failed.len(),
        answers.len(),
        failed[0].status,
        failed[0].body,
        fleet.balancer_log()
    );
    for r in &answers {
        assert_eq!(r.json()["usage"]["completion_tokens"], 8, "{}", r.body);
    }
}

#[test]
fn nginx_passes_streams_on_token_by_token() {
    streams_arrive_token_by_token(Balancer::Nginx);
}

#[test]
fn haproxy_passes_streams_on_token_by_token() {
    streams_arrive_token_by_token(Balancer::Haproxy);
}

#[test]
fn nginx_loses_no_request_while_a_router_drains() {
    a_draining_router_costs_no_request(Balancer::Nginx);
}

#[test]
fn haproxy_loses_no_request_while_a_router_drains() {
    a_draining_router_costs_no_request(Balancer::Haproxy);
}
