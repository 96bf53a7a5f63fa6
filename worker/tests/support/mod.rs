//! Helpers shared by the worker's integration tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llmapi_common::model_config::ModelConfig;
use llmapi_proto::auth::{AttachToken, RequireToken};
use llmapi_proto::v1::worker_client::WorkerClient;
use llmapi_worker::backend::{Backend, BackendError, LogitsWanted, SeqChunk};
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::engine::{
    Engine, EngineConfig, EngineHandle, FinishReason, GenerateParams, KvDtype, LoadStats,
    SamplingParams, StoppingParams, TokenEvent, Usage,
};
use llmapi_worker::kv::host_memory::MemorySource;
use llmapi_worker::service::{WorkerService, serve};
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A loopback port that is free now, outside the range outgoing connections take.
pub fn free_port() -> u16 {
    llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

/// tests/golden of this checkout, or $LLMAPI_GOLDEN_DIR (a prebuilt test binary run from
/// another copy of the repository, as scripts/gpu_check.sh does).
pub fn golden_root() -> PathBuf {
    match std::env::var_os("LLMAPI_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"),
    }
}

/// One golden fixture's directory.
pub fn case(name: &str) -> PathBuf {
    golden_root().join(name)
}

/// Prefills `prompt` as a fresh sequence from position 0 whose block table has room for
/// `room` more tokens (blocks numbered from 0), returning the logits `wanted`.
pub fn prefill(
    be: &mut dyn Backend,
    prompt: &[u32],
    tokens_per_block: usize,
    room: usize,
    wanted: LogitsWanted,
) -> Result<Vec<f32>, BackendError> {
    let blocks = (prompt.len() + room).div_ceil(tokens_per_block) as u32;
    let table: Vec<u32> = (0..blocks).collect();
    let mut out = be.forward(&[SeqChunk {
        tokens: prompt,
        start_pos: 0,
        block_table: &table,
        logits: wanted,
    }])?;
    Ok(out.remove(0))
}

/// Runs `world` ranks as scoped threads that meet over a TCP ring on loopback (collectives
/// time out after `timeout`), each calling `rank_fn(rank, ring)`; every rank's result in rank
/// order.
pub fn ring_ranks<T: Send>(
    world: usize,
    token: &str,
    timeout: std::time::Duration,
    rank_fn: impl Fn(usize, TcpRing) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    let rank_fn = &rank_fn;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let ring = TcpRing::join(&RingConfig {
                        rank,
                        world_size: world,
                        group: 0,
                        rendezvous: format!("127.0.0.1:{port}"),
                        bind: std::net::Ipv4Addr::LOCALHOST.into(),
                        token: token.into(),
                        join_timeout: timeout,
                        op_timeout: timeout,
                    })
                    .unwrap();
                    rank_fn(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The job secret test workers require.
pub const SECRET: &str = "test-job-secret-0123456789abcdef";

/// A worker client that sends `authorization: Bearer <token>` (nothing for None).
pub type Client = WorkerClient<InterceptedService<Channel, AttachToken>>;

/// Serves `engine` over gRPC on a free loopback port, requiring [`SECRET`]; its address.
pub async fn serve_worker(engine: EngineHandle) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        WorkerService::new(engine, 1, 1),
        listener,
        RequireToken::new(SECRET).unwrap(),
        None,
        std::future::pending(),
    ));
    addr
}

/// A client of the worker at `addr` that presents `token`.
pub async fn client_for(addr: SocketAddr, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerClient::with_interceptor(channel, AttachToken::new(token).unwrap())
}

/// Switches of a [`GatedBackend`].
#[derive(Debug, Default)]
pub struct Gate {
    /// Every step waits (at most 30 s) while set: requests stay unfinished as long as a test
    /// needs, like a step stuck on a hung device or collective.
    pub hold: AtomicBool,
    /// The next step panics.
    pub panic: AtomicBool,
    /// Every step takes at least this many milliseconds: a request of many tokens runs for
    /// as long as a test needs, stepping all the while.
    pub step_ms: AtomicU64,
}

/// Test double: a backend of the golden llama's vocabulary whose logits are all zero (greedy
/// picks token 0) and whose steps obey a [`Gate`].
pub struct GatedBackend {
    gate: Arc<Gate>,
}

const GATED_VOCAB: usize = 256;

impl Backend for GatedBackend {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn vocab_size(&self) -> usize {
        GATED_VOCAB
    }
    fn kv_bytes_per_token(&self) -> usize {
        1
    }
    fn init_kv(&mut self, _: usize, _: usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.gate.hold.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let step_ms = self.gate.step_ms.load(Ordering::SeqCst);
        if step_ms > 0 {
            std::thread::sleep(Duration::from_millis(step_ms));
        }
        if self.gate.panic.swap(false, Ordering::SeqCst) {
            panic!("injected fault in forward");
        }
        Ok(batch
            .iter()
            .map(|c| match c.logits {
                LogitsWanted::None => Vec::new(),
                LogitsWanted::Last => vec![0.0; GATED_VOCAB],
                LogitsWanted::All => vec![0.0; GATED_VOCAB * c.tokens.len()],
            })
            .collect())
    }
}

/// An engine over a [`GatedBackend`] (held from the start when `held`), and its gate.
pub fn gated_engine(cfg: EngineConfig, held: bool) -> (EngineHandle, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    gate.hold.store(held, Ordering::SeqCst);
    let dir = case("llama");
    let model = ModelConfig::from_model_dir(&dir).unwrap();
    let backend = Box::new(GatedBackend {
        gate: Arc::clone(&gate),
    });
    let engine = Engine::start_with_backend(backend, &model, &dir, "gated".into(), cfg).unwrap();
    (engine, gate)
}

/// The small engine the golden-checkpoint tests run: 8 sequences, 256-token steps and
/// sequences, 4-token blocks, 4096 f32 KV tokens, 2 threads.
pub fn golden_config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_num_tokens: 256,
        max_seq_len: Some(256),
        tokens_per_block: 4,
        kv_dtype: KvDtype::Float32,
        kv_max_tokens: Some(4096),
        threads: Some(2),
        ..Default::default()
    }
}

/// A greedy request for `max_tokens` tokens (0: up to max_seq_len) that ignores EOS.
pub fn greedy(id: &str, prompt: Vec<u32>, max_tokens: u32) -> GenerateParams {
    GenerateParams {
        request_id: id.to_string(),
        prompt,
        generated: Vec::new(),
        group: String::new(),
        sampling: SamplingParams::default(),
        stopping: StoppingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

/// What a request's event stream said.
pub struct Outcome {
    /// Generated token ids.
    pub ids: Vec<u32>,
    /// Why it ended.
    pub reason: FinishReason,
    /// The stop token it ended on, if any.
    pub stop: Option<u32>,
    /// Token counts.
    pub usage: Usage,
}

/// Reads events until Finished, at most 30 s.
pub fn collect(mut rx: UnboundedReceiver<TokenEvent>) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ids = Vec::new();
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(TokenEvent::Tokens { ids: new, .. }) => ids.extend(new),
            Ok(TokenEvent::Finished {
                reason,
                stop_token_id,
                usage,
                ..
            }) => {
                return Outcome {
                    ids,
                    reason,
                    stop: stop_token_id,
                    usage,
                };
            }
            Ok(TokenEvent::Error(e) | TokenEvent::Refused(e)) => panic!("engine error: {e}"),
            Ok(TokenEvent::PromptLogprobs(_)) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("stream ended without Finished: {e}"),
        }
    }
    panic!("no Finished event within 30 s");
}

/// The engine's load once nothing runs or waits (or after 10 s).
pub fn wait_idle(h: &EngineHandle) -> LoadStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = h.load();
        if (l.running == 0 && l.queued == 0) || Instant::now() > deadline {
            return l;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One GiB.
pub const GIB: u64 = 1 << 30;

/// A fake /proc (MemAvailable 32 GiB) and a cgroup v2 tree that puts this process in
/// `/job` with `memory.max` = `max` ("max": none) and nothing charged yet.
pub fn fake_machine(dir: &Path, max: &str) -> MemorySource {
    let (proc_root, cgroup_root) = (dir.join("proc"), dir.join("cgroup"));
    std::fs::create_dir_all(proc_root.join("self")).unwrap();
    std::fs::write(
        proc_root.join("meminfo"),
        format!(
            "MemTotal: {} kB\nMemAvailable: {} kB\n",
            64 * GIB / 1024,
            32 * GIB / 1024
        ),
    )
    .unwrap();
    std::fs::write(proc_root.join("self/cgroup"), "0::/job\n").unwrap();
    std::fs::create_dir_all(cgroup_root.join("job")).unwrap();
    std::fs::write(cgroup_root.join("cgroup.controllers"), "memory\n").unwrap();
    std::fs::write(cgroup_root.join("job/memory.max"), format!("{max}\n")).unwrap();
    std::fs::write(cgroup_root.join("job/memory.current"), "0\n").unwrap();
    MemorySource {
        proc_root,
        cgroup_root,
    }
}
