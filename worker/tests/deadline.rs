//! The gRPC deadline (`grpc-timeout`, the router's `--request_timeout`) bounds a Generate
//! stream: past it the worker aborts the request and frees its KV blocks on its own, while the
//! caller is still connected and not reading, and ends the call with DEADLINE_EXCEEDED. A
//! request that finishes in time is unaffected. Over the real service on loopback, with the
//! gated test backend.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llmapi_proto::v1::{
    FinishReason, GenerateRequest, LoadRequest, LoadResponse, SamplingParams, StoppingParams,
};
use llmapi_worker::engine::EngineConfig;
use support::{Client, SECRET, client_for, gated_engine, serve_worker};

/// A gated engine whose steps take `step_ms` each, behind the service; a client of it.
async fn start(step_ms: u64) -> Client {
    let cfg = EngineConfig {
        max_seq_len: Some(1024),
        tokens_per_block: 4,
        kv_max_tokens: Some(4096),
        ..Default::default()
    };
    let (engine, gate) = gated_engine(cfg, false);
    gate.step_ms.store(step_ms, Ordering::SeqCst);
    // The gate lives as long as the engine's backend holds it.
    client_for(serve_worker(engine).await, Some(SECRET)).await
}

fn generate(id: &str, max_tokens: u32, timeout: Duration) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(GenerateRequest {
        request_id: id.into(),
        prompt_token_ids: vec![5, 6, 7, 8, 9],
        sampling: Some(SamplingParams::default()),
        stopping: Some(StoppingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        traceparent: String::new(),
        generated_token_ids: Vec::new(),
        group_id: String::new(),
    });
    r.set_timeout(timeout);
    r
}

async fn load(client: &mut Client) -> LoadResponse {
    client
        .load(LoadRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_grpc_deadline_is_aborted_and_frees_its_kv_while_the_caller_stays() {
    // 900 tokens at 20 ms a step: about 18 s of work, far past the 1 s deadline.
    let mut client = start(20).await;
    let started = Instant::now();
    let mut stream = client
        .generate(generate("late", 900, Duration::from_secs(1)))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.token_ids.is_empty(), "the request runs");
    // Load is published after each step, so the blocks show a moment after the token.
    let mut holds = false;
    for _ in 0..100 {
        holds = load(&mut client).await.kv_blocks_used > 0;
        if holds {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(holds, "it holds blocks");

    // The caller keeps the stream open and reads nothing: the worker must act on its own.
    let freed = loop {
        let l = load(&mut client).await;
        if l.kv_blocks_used == 0 && l.running == 0 && l.queued == 0 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(8) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        freed,
        "the request's KV blocks were freed soon after its deadline: {:?}",
        load(&mut client).await
    );

    // What the caller reads: the tokens made before the deadline, then DEADLINE_EXCEEDED.
    let status = loop {
        match stream.message().await {
            Ok(Some(r)) => assert_eq!(r.finish_reason, FinishReason::Unspecified as i32),
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(status.message().contains("deadline"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_finishes_before_its_deadline_is_unaffected() {
    let mut client = start(0).await;
    let mut stream = client
        .generate(generate("prompt", 8, Duration::from_secs(30)))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    let finish = loop {
        let r = stream
            .message()
            .await
            .unwrap()
            .expect("a finishing response");
        tokens += r.token_ids.len();
        if r.finish_reason != FinishReason::Unspecified as i32 {
            break r.finish_reason;
        }
    };
    assert_eq!(finish, FinishReason::Length as i32);
    assert_eq!(tokens, 8);
    assert!(stream.message().await.unwrap().is_none(), "the stream ends");
}
