//! Error classes on the wire: requests that can never be served answer FAILED_PRECONDITION,
//! malformed ones INVALID_ARGUMENT, a full waiting queue RESOURCE_EXHAUSTED; never INTERNAL,
//! which the router reads as a worker fault (retried elsewhere, counted by its breaker).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llmapi_proto::v1::{GenerateRequest, HealthRequest, SamplingParams, StoppingParams};
use llmapi_worker::engine::{EngineConfig, EngineError, EngineHandle, KvDtype};
use support::{Client, Gate, SECRET, client_for, gated_engine, serve_worker};
use tonic::Code;

fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 2,
        max_num_tokens: 256,
        max_seq_len: Some(256),
        tokens_per_block: 4,
        kv_dtype: KvDtype::Float32,
        kv_max_tokens: Some(64),
        threads: Some(2),
        ..Default::default()
    }
}

/// An engine over the gated backend, held until the test opens the gate.
fn gated(cfg: EngineConfig) -> (EngineHandle, Arc<Gate>) {
    gated_engine(cfg, true)
}

fn params(id: &str, prompt_len: usize, max_tokens: u32) -> llmapi_worker::engine::GenerateParams {
    llmapi_worker::engine::GenerateParams {
        request_id: id.into(),
        prompt: vec![5; prompt_len],
        stopping: llmapi_worker::engine::StoppingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn the_engine_classes_refusals_by_cause() {
    let (h, gate) = gated(config());
    let class = |r| match h.submit(r) {
        Err(EngineError::InvalidRequest(_)) => "invalid",
        Err(EngineError::DoesNotFit(_)) => "does not fit",
        Err(EngineError::QueueFull(_)) => "queue full",
        Err(e) => panic!("unexpected error class: {e}"),
        Ok(_) => "accepted",
    };
    assert_eq!(
        class(params("long", 300, 1)),
        "does not fit",
        "prompt > max_seq_len"
    );
    assert_eq!(
        class(params("kv", 10, 100)),
        "does not fit",
        "more KV than the pool"
    );
    assert_eq!(class(params("empty", 0, 1)), "invalid");
    let mut stops = params("stops", 3, 1);
    stops.stopping.stop_token_ids = vec![7; llmapi_proto::limits::MAX_STOP_TOKEN_IDS + 1];
    assert_eq!(class(stops), "invalid", "too many stop_token_ids");
    for (bias, why) in [
        (vec![(u32::MAX, 1.0)], "a biased id past the vocabulary"),
        (vec![(7, f32::NAN)], "a bias that is not a number"),
        (
            (0..=llmapi_proto::limits::MAX_LOGIT_BIAS as u32)
                .map(|t| (t, 1.0))
                .collect(),
            "too many logit_bias entries",
        ),
    ] {
        let mut p = params("bias", 3, 1);
        p.sampling.logit_bias = bias;
        assert_eq!(class(p), "invalid", "{why}");
    }
    gate.hold.store(false, Ordering::SeqCst);
}

#[test]
fn a_full_waiting_queue_refuses_new_requests_until_one_finishes() {
    // 2 running + 1 waiting.
    let (h, gate) = gated(EngineConfig {
        max_queued_requests: Some(1),
        ..config()
    });
    let held: Vec<_> = (0..3)
        .map(|i| h.submit(params(&format!("r{i}"), 3, 2)).unwrap())
        .collect();
    let err = h.submit(params("r3", 3, 2)).unwrap_err();
    assert!(matches!(err, EngineError::QueueFull(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("max_queued_requests") && msg.contains("3 requests"),
        "the message names the limit and the setting: {msg}"
    );
    gate.hold.store(false, Ordering::SeqCst);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.submit(params("after", 3, 1)) {
            Ok(_) => break,
            Err(EngineError::QueueFull(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("the queue never drained: {e}"),
        }
    }
}

async fn client_of(engine: EngineHandle) -> Client {
    client_for(serve_worker(engine).await, Some(SECRET)).await
}

fn request(id: &str, prompt_len: usize, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_token_ids: vec![5; prompt_len],
        sampling: Some(SamplingParams {
            top_p: 1.0,
            ..Default::default()
        }),
        stopping: Some(StoppingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        traceparent: String::new(),
        generated_token_ids: Vec::new(),
        group_id: String::new(),
    }
}

async fn code_of(client: &mut Client, req: GenerateRequest) -> Code {
    match client.generate(req).await {
        Ok(r) => match r.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_answers_request_faults_with_their_own_codes() {
    let (h, gate) = gated(EngineConfig {
        max_queued_requests: Some(0),
        ..config()
    });
    let mut client = client_of(h.clone()).await;
    assert_eq!(
        code_of(&mut client, request("kv", 10, 100)).await,
        Code::FailedPrecondition,
        "a request needing more KV cache than the whole pool can never fit"
    );
    assert_eq!(
        code_of(&mut client, request("long", 300, 1)).await,
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(&mut client, request("empty", 0, 1)).await,
        Code::InvalidArgument
    );
    let _held: Vec<_> = (0..2)
        .map(|i| h.submit(params(&format!("held{i}"), 3, 2)).unwrap())
        .collect();
    assert_eq!(
        code_of(&mut client, request("over", 3, 1)).await,
        Code::ResourceExhausted,
        "max_batch_size 2 running + 0 waiting: the third is refused"
    );
    // A busy worker is not an unhealthy one: probes pass the queue bound.
    let probe = tokio::spawn({
        let mut c = client.clone();
        async move { c.health(HealthRequest { probe: true }).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.hold.store(false, Ordering::SeqCst);
    let health = probe.await.unwrap().unwrap().into_inner();
    assert!(health.healthy, "{}", health.message);
}
