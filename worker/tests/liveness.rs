//! Liveness that means progress: an engine stuck in a step reports itself stalled while
//! requests wait, and a panic in the engine thread marks the worker failed and ends its
//! requests instead of leaving them hanging.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llmapi_proto::v1::HealthRequest;
use llmapi_worker::engine::*;
use support::{Gate, SECRET, client_for, gated_engine, serve_worker};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

fn start(stall: Option<Duration>) -> (EngineHandle, std::sync::Arc<Gate>) {
    let cfg = EngineConfig {
        max_seq_len: Some(128),
        tokens_per_block: 4,
        kv_max_tokens: Some(1024),
        stall_timeout: stall,
        ..Default::default()
    };
    gated_engine(cfg, false)
}

fn request(id: &str) -> GenerateParams {
    GenerateParams {
        request_id: id.into(),
        prompt: vec![5, 6, 7, 8],
        generated: Vec::new(),
        group: String::new(),
        sampling: SamplingParams::default(),
        stopping: StoppingParams {
            max_tokens: 4,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

/// Polls `f` every 10 ms for up to `limit`; the first Some.
fn wait_for<T>(limit: Duration, f: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Drains events until the request ends; whether it finished normally.
fn finished(rx: &Mutex<UnboundedReceiver<TokenEvent>>) -> Option<bool> {
    let mut rx = rx.lock().unwrap();
    loop {
        match rx.try_recv() {
            Ok(TokenEvent::Finished { .. }) => return Some(true),
            Ok(TokenEvent::Error(_) | TokenEvent::Refused(_)) => return Some(false),
            Ok(_) => continue,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => return Some(false),
        }
    }
}

#[test]
fn an_engine_stuck_in_a_step_with_requests_waiting_reports_itself_stalled() {
    let (h, gate) = start(Some(Duration::from_millis(300)));
    assert_eq!(h.stalled(), None, "idle is not stalled");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        h.stalled(),
        None,
        "idle for longer than the timeout is still not stalled"
    );

    gate.hold.store(true, Ordering::SeqCst);
    let rx = Mutex::new(h.submit(request("held")).unwrap());
    let why = wait_for(Duration::from_secs(10), || h.stalled()).expect("stall reported");
    assert!(
        why.contains("1 requests in flight") && why.contains("engine_stall_timeout"),
        "{why}"
    );
    assert_eq!(
        h.failure(),
        None,
        "a stall is not a failure: it may recover"
    );

    gate.hold.store(false, Ordering::SeqCst);
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&rx)),
        Some(true),
        "the held request completes once the step returns"
    );
    assert_eq!(
        wait_for(Duration::from_secs(5), || h
            .stalled()
            .is_none()
            .then_some(())),
        Some(()),
        "progress clears the stall"
    );
}

#[test]
fn without_a_stall_timeout_a_long_step_is_not_a_stall() {
    let (h, gate) = start(None);
    gate.hold.store(true, Ordering::SeqCst);
    let rx = Mutex::new(h.submit(request("slow")).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.stalled(), None);
    gate.hold.store(false, Ordering::SeqCst);
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&rx)),
        Some(true)
    );
}

#[test]
fn a_panic_in_the_engine_thread_fails_the_worker_and_ends_its_requests() {
    let (h, gate) = start(Some(Duration::from_secs(60)));
    let ok = Mutex::new(h.submit(request("before")).unwrap());
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&ok)),
        Some(true)
    );

    gate.panic.store(true, Ordering::SeqCst);
    let doomed = Mutex::new(h.submit(request("doomed")).unwrap());
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&doomed)),
        Some(false),
        "the request in the panicking step ends with an error, not a hang"
    );
    let why = wait_for(Duration::from_secs(5), || h.failure()).expect("failure reported");
    assert!(
        why.contains("the engine thread panicked: injected fault in forward"),
        "{why}"
    );
    let err = h.submit(request("after")).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("serves no more requests")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_unhealthy_with_the_reason_while_the_engine_is_stalled() {
    let (h, gate) = start(Some(Duration::from_millis(200)));
    let mut client = client_for(serve_worker(h.clone()).await, Some(SECRET)).await;
    let health = |probe| HealthRequest { probe };
    let ok = client.health(health(false)).await.unwrap().into_inner();
    assert!(ok.healthy, "{}", ok.message);

    gate.hold.store(true, Ordering::SeqCst);
    let _rx = h.submit(request("held")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = client.health(health(false)).await.unwrap().into_inner();
    assert!(!stalled.healthy);
    assert!(
        stalled.message.contains("engine_stall_timeout"),
        "{}",
        stalled.message
    );

    gate.hold.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.health(health(false)).await.unwrap().into_inner();
        if r.healthy {
            break;
        }
        assert!(Instant::now() < deadline, "still unhealthy: {}", r.message);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
