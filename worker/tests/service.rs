//! The worker gRPC service over a real engine (the golden `llama` fixture), called through the
//! generated client on loopback.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use llmapi_common::traces::{Service, Tracers};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

use llmapi_proto::v1::{
    AbortRequest, FinishReason, GenerateRequest, HealthRequest, InfoRequest, KvEventBatch,
    KvEventsRequest, LoadRequest, SamplingParams, StoppingParams, kv_event,
};
use llmapi_worker::engine::{Engine, EngineConfig};
use support::{Client, SECRET, client_for, golden_config, serve_worker};

async fn start() -> Client {
    start_with(|_| {}).await
}

async fn start_with(tweak: impl FnOnce(&mut EngineConfig)) -> Client {
    client_for(serve_engine(tweak).await, Some(SECRET)).await
}

/// The golden checkpoint every test here serves.
fn golden_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama")
}

/// Starts the golden engine behind the gRPC service (requiring SECRET); returns its address.
async fn serve_engine(tweak: impl FnOnce(&mut EngineConfig)) -> SocketAddr {
    let mut cfg = golden_config();
    tweak(&mut cfg);
    let engine = Engine::start(&golden_dir(), cfg).unwrap();
    serve_worker(engine).await
}

/// Generate, Health, Abort and KvEvents without the job secret, or with another one, never
/// reach the engine: UNAUTHENTICATED, and the engine stays idle. With the secret both work.
#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_job_secret_are_unauthenticated() {
    let addr = serve_engine(|_| {}).await;
    let wrong = "test-job-secret-0123456789abcdeX";
    for token in [None, Some(wrong), Some("llmapi-job-0123456789abcdef")] {
        let mut client = client_for(addr, token).await;
        let err = client
            .generate(request("stranger", vec![5, 6, 7], 4))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
        let err = client
            .health(HealthRequest { probe: true })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
        let err = client
            .abort(AbortRequest {
                request_id: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
        // The KV event stream (which block hashes are cached) is no one else's business.
        let err = client
            .kv_events(KvEventsRequest::default())
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
    }
    // The scheme is case-insensitive, the secret is not.
    let mut lower = client_for(addr, None).await;
    let mut req = tonic::Request::new(HealthRequest { probe: false });
    req.metadata_mut()
        .insert("authorization", format!("bearer {SECRET}").parse().unwrap());
    assert!(lower.health(req).await.unwrap().into_inner().healthy);
    let mut client = client_for(addr, Some(SECRET)).await;
    let load = client
        .load(LoadRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.running + load.queued, 0, "no refused call ran");
    let mut stream = client
        .generate(request("member", vec![5, 6, 7], 2))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        tokens += msg.token_ids.len();
    }
    assert_eq!(tokens, 2);
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_token_ids: prompt,
        sampling: Some(SamplingParams {
            top_p: 1.0,
            logprobs: Some(2),
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

#[tokio::test(flavor = "multi_thread")]
async fn generate_streams_every_token_and_ends_with_reason_and_usage() {
    let mut client = start().await;
    let mut stream = client
        .generate(request("a", vec![5, 6, 7, 8, 9], 6))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = Vec::new();
    let mut last = None;
    while let Some(msg) = stream.message().await.unwrap() {
        assert_eq!(msg.logprobs.len(), msg.token_ids.len());
        tokens.extend(msg.token_ids.iter().copied());
        last = Some(msg);
    }
    let last = last.unwrap();
    assert_eq!(tokens.len(), 6);
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    let usage = last.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 6));
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_can_never_fit_fail_their_precondition() {
    let mut client = start().await;
    let err = client
        .generate(request("long", vec![3; 300], 4))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_stream_frees_its_blocks_and_load_returns_to_idle() {
    let mut client = start().await;
    let capacity = client
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .kv_capacity_blocks;
    let mut stream = client
        .generate(request("dropped", vec![4; 20], 200))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    let mut idle = false;
    for _ in 0..100 {
        let load = client
            .load(LoadRequest::default())
            .await
            .unwrap()
            .into_inner();
        if load.running == 0 && load.queued == 0 && load.kv_blocks_free == capacity {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle, "every block is free again");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_probe_generates_a_token_and_info_describes_the_engine() {
    let mut client = start().await;
    let h = client
        .health(HealthRequest { probe: true })
        .await
        .unwrap()
        .into_inner();
    assert!(h.healthy, "{}", h.message);
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.max_seq_len, info.tokens_per_block), (256, 4));
    assert_eq!((info.tp_size, info.ep_size), (1, 1));
    assert!(info.kv_capacity_blocks > 0 && info.vocab_size > 0);
}

/// Log lines written by the service, captured once per test binary.
fn captured_logs() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        // The worker's spans get their ids from an OpenTelemetry tracer, as in the binaries
        // (no endpoint: nothing is exported).
        let tracers = Box::leak(Box::new(Tracers::local(&[Service::Worker])));
        let subscriber = tracing_subscriber::registry().with(tracers.layers()).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || LogSink(sink.clone()))
                .with_filter(tracing_subscriber::EnvFilter::new("llmapi_worker=debug")),
        );
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
}

struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_trace_context_is_logged_and_answered_with_the_workers_span() {
    let logs = captured_logs();
    let mut client = start().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(request("traced", vec![5, 6, 7], 2));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let resp = client.generate(req).await.unwrap();
    let answered = resp
        .metadata()
        .get("traceresponse")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut stream = resp.into_inner();
    while stream.message().await.unwrap().is_some() {}
    let parts: Vec<&str> = answered.split('-').collect();
    assert_eq!(parts[1], trace_id, "the worker stays in the caller's trace");
    assert_ne!(parts[2], caller_span, "with a span of its own");
    assert_eq!(parts[3], "01");
    let worker_span = parts[2].to_owned();

    // Both of the request's log lines name the trace, the worker's span and the caller's.
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("request_id=traced"))
        .collect();
    assert!(lines.iter().any(|l| l.contains(": generate ")), "{text}");
    assert!(lines.iter().any(|l| l.contains(": finished ")), "{text}");
    for l in &lines {
        assert!(l.contains(&format!("trace_id={trace_id}")), "{l}");
        assert!(l.contains(&format!("span_id={worker_span}")), "{l}");
        assert!(l.contains(&format!("parent_span_id={caller_span}")), "{l}");
    }

    // A request without trace context starts a trace of its own.
    let resp = client
        .generate(request("untraced", vec![5, 6], 1))
        .await
        .unwrap();
    let tr = resp
        .metadata()
        .get("traceresponse")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(tr.len(), 55);
    assert!(!tr.contains(trace_id));
}

async fn run_to_end(client: &mut Client, req: GenerateRequest) {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
}

/// Block hashes as KvEvents sends them (32 bytes each).
fn hashes(wire: &[Vec<u8>]) -> Vec<llmapi_common::block_hash::BlockHash> {
    wire.iter()
        .map(|b| llmapi_common::block_hash::BlockHash::from_slice(b).unwrap())
        .collect()
}

/// The next batch of a KvEvents stream (5 s at most).
async fn next_batch(stream: &mut tonic::Streaming<KvEventBatch>) -> KvEventBatch {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a batch within 5 s")
        .unwrap()
        .expect("the stream stays open")
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_events_stream_a_snapshot_then_stores_and_evictions_in_order() {
    // 8 blocks of 4 tokens: a second long request must evict the first one's cached prefix.
    let mut client = start_with(|c| c.kv_max_tokens = Some(32)).await;
    let a: Vec<u32> = (10..23).collect();
    run_to_end(&mut client, request("a", a.clone(), 2)).await;
    let a_blocks = llmapi_common::block_hash::prefix_block_hashes(&a, 4);
    assert_eq!(a_blocks.len(), 3);

    let mut stream = client
        .kv_events(KvEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = next_batch(&mut stream).await;
    let snap = first
        .snapshot
        .clone()
        .expect("an unknown caller gets a snapshot");
    assert!(snap.last_part);
    let mut cached = hashes(&snap.block_hashes);
    for h in &a_blocks {
        assert!(cached.contains(h), "the first prompt's blocks are cached");
    }
    let run = first.run_id.clone();
    assert!(!run.is_empty());
    let mut last = snap.event_id;

    run_to_end(&mut client, request("b", (40..64).collect(), 6)).await;
    let b_blocks =
        llmapi_common::block_hash::prefix_block_hashes(&(40..64).collect::<Vec<u32>>(), 4);
    // Apply events until every block of b is cached; their ids follow each other.
    let mut removed = Vec::new();
    for _ in 0..50 {
        if b_blocks.iter().all(|h| cached.contains(h)) {
            break;
        }
        let batch = next_batch(&mut stream).await;
        assert_eq!(batch.run_id, run);
        assert!(
            batch.snapshot.is_none(),
            "a caller in step gets events only"
        );
        for e in batch.events {
            assert_eq!(e.event_id, last + 1, "no gap");
            last = e.event_id;
            match e.data.unwrap() {
                kv_event::Data::Stored(s) => {
                    assert_eq!(s.tokens_per_block, 4);
                    let stored = hashes(&s.block_hashes);
                    if s.parent_hash.is_empty() {
                        assert_eq!(stored[0], b_blocks[0], "only b starts a sequence");
                    }
                    cached.extend(stored);
                }
                kv_event::Data::Removed(r) => {
                    let gone = hashes(&r.block_hashes);
                    cached.retain(|h| !gone.contains(h));
                    removed.extend(gone);
                }
                kv_event::Data::AllCleared(_) => cached.clear(),
            }
        }
    }
    assert!(
        b_blocks.iter().all(|h| cached.contains(h)),
        "b's blocks were stored"
    );
    assert!(
        a_blocks.iter().any(|h| removed.contains(h)),
        "a's prefix was evicted to make room: {removed:?}"
    );
    drop(stream);
    // b is finished: let its last step publish its events.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A caller resuming in step gets no snapshot; one from another run gets one that matches
    // the events applied so far.
    let mut resumed = client
        .kv_events(KvEventsRequest {
            after: last,
            run_id: run.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let b = next_batch(&mut resumed).await;
    assert!(
        b.snapshot.is_none(),
        "a caller in step gets no snapshot: {b:?}"
    );
    // The events of b's last step may land after the loop above stopped reading.
    for e in b.events {
        assert_eq!(
            e.event_id,
            last + 1,
            "the resumed stream continues after `after`"
        );
        last = e.event_id;
        if let Some(kv_event::Data::Stored(s)) = e.data {
            cached.extend(hashes(&s.block_hashes));
        }
    }
    let mut foreign = client
        .kv_events(KvEventsRequest {
            after: last,
            run_id: "an earlier run".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next_batch(&mut foreign).await.snapshot.expect("a snapshot");
    assert_eq!(snap.event_id, last);
    let mut listed = hashes(&snap.block_hashes);
    listed.sort();
    cached.sort();
    assert_eq!(listed, cached, "the snapshot equals the events applied");
}

/// A KvEvents stream never ends on its own; a server shutting down ends it rather than
/// waiting on its caller, so the graceful shutdown completes while a router is subscribed.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_shutting_down_ends_its_kv_event_streams() {
    let engine = Engine::start(&golden_dir(), golden_config()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(llmapi_worker::service::serve(
        llmapi_worker::service::WorkerService::new(engine, 1, 1),
        listener,
        llmapi_proto::auth::RequireToken::new(SECRET).unwrap(),
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = client_for(addr, Some(SECRET)).await;
    let mut stream = client
        .kv_events(KvEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(next_batch(&mut stream).await.snapshot.is_some());
    stop.send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stopped within 10 s with a stream open");
    assert!(served.unwrap().is_ok());
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ended");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}
