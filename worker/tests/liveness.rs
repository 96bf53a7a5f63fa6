//! Liveness that means progress: an engine stuck in a step reports itself stalled while
//! requests wait, and a panic in the engine thread marks the worker failed and ends its
//! requests instead of leaving them hanging.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::{Backend, BackendError, SeqChunk};
use llmapi_worker::engine::*;
use llmapi_worker::model::ModelWeights;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama")
}

/// What the wrapped backend does in `forward`.
#[derive(Default)]
struct Faults {
    /// Block every step while set.
    hold: AtomicBool,
    /// Panic in the next step.
    panic: AtomicBool,
}

/// Test double around the real CPU backend: steps can be held (a hung device or collective)
/// or made to panic.
struct Faulty {
    inner: CpuBackend,
    faults: Arc<Faults>,
}

impl Backend for Faulty {
    fn name(&self) -> &'static str {
        "faulty-cpu"
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn init_kv(&mut self, blocks: usize, tpb: usize) -> Result<(), BackendError> {
        self.inner.init_kv(blocks, tpb)
    }
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let until = Instant::now() + Duration::from_secs(20);
        while self.faults.hold.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.faults.panic.swap(false, Ordering::SeqCst) {
            panic!("injected fault in forward");
        }
        self.inner.forward(batch)
    }
}

fn start(faults: &Arc<Faults>, stall: Option<Duration>) -> EngineHandle {
    let w = ModelWeights::load(&model_dir()).unwrap();
    let model = w.config.clone();
    let inner = CpuBackend::new(w, KvDtype::Float32, Some(1)).unwrap();
    let backend = Faulty {
        inner,
        faults: Arc::clone(faults),
    };
    let cfg = EngineConfig {
        max_seq_len: Some(128),
        tokens_per_block: 4,
        kv_max_tokens: Some(1024),
        stall_timeout: stall,
        ..Default::default()
    };
    Engine::start_with_backend(Box::new(backend), &model, &model_dir(), "llama".into(), cfg)
        .unwrap()
}

fn request(id: &str) -> GenerateParams {
    GenerateParams {
        request_id: id.into(),
        prompt: vec![5, 6, 7, 8],
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
fn finished(rx: &Mutex<tokio::sync::mpsc::UnboundedReceiver<TokenEvent>>) -> Option<bool> {
    let mut rx = rx.lock().unwrap();
    loop {
        match rx.try_recv() {
            Ok(TokenEvent::Finished { .. }) => return Some(true),
            Ok(TokenEvent::Error(_)) => return Some(false),
            Ok(_) => continue,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return None,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return Some(false),
        }
    }
}

#[test]
fn an_engine_stuck_in_a_step_with_requests_waiting_reports_itself_stalled() {
    let faults = Arc::new(Faults::default());
    let h = start(&faults, Some(Duration::from_millis(300)));
    assert_eq!(h.stalled(), None, "idle is not stalled");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        h.stalled(),
        None,
        "idle for longer than the timeout is still not stalled"
    );

    faults.hold.store(true, Ordering::SeqCst);
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

    faults.hold.store(false, Ordering::SeqCst);
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
    let faults = Arc::new(Faults::default());
    let h = start(&faults, None);
    faults.hold.store(true, Ordering::SeqCst);
    let rx = Mutex::new(h.submit(request("slow")).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.stalled(), None);
    faults.hold.store(false, Ordering::SeqCst);
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&rx)),
        Some(true)
    );
}

#[test]
fn a_panic_in_the_engine_thread_fails_the_worker_and_ends_its_requests() {
    let faults = Arc::new(Faults::default());
    let h = start(&faults, Some(Duration::from_secs(60)));
    let ok = Mutex::new(h.submit(request("before")).unwrap());
    assert_eq!(
        wait_for(Duration::from_secs(10), || finished(&ok)),
        Some(true)
    );

    faults.panic.store(true, Ordering::SeqCst);
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
    use llmapi_proto::auth::{AttachToken, RequireToken};
    use llmapi_proto::v1::HealthRequest;
    use llmapi_proto::v1::worker_client::WorkerClient;
    use llmapi_worker::service::{WorkerService, serve};
    use tonic::transport::Channel;

    const SECRET: &str = "liveness-test-secret-0123456789ab";

    let faults = Arc::new(Faults::default());
    let h = start(&faults, Some(Duration::from_millis(200)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        WorkerService::new(h.clone(), 1, 1),
        listener,
        RequireToken::new(SECRET).unwrap(),
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        WorkerClient::with_interceptor(channel, AttachToken::new(Some(SECRET)).unwrap());
    let health = |probe| HealthRequest { probe };
    let ok = client.health(health(false)).await.unwrap().into_inner();
    assert!(ok.healthy, "{}", ok.message);

    faults.hold.store(true, Ordering::SeqCst);
    let _rx = h.submit(request("held")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = client.health(health(false)).await.unwrap().into_inner();
    assert!(!stalled.healthy);
    assert!(
        stalled.message.contains("engine_stall_timeout"),
        "{}",
        stalled.message
    );

    faults.hold.store(false, Ordering::SeqCst);
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
