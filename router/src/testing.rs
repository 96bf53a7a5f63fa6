//! `ScriptedWorker`: a test double speaking the worker proto, so the router can be tested and
//! benchmarked without an engine. It "generates" by replaying the prompt's tokens (or a fixed
//! script; a migrated request continues after the tokens it carries), keeps a pretend KV
//! cache keyed by the shared block hash (streamed on KvEvents as a fresh snapshot after every
//! change), and can be made to fail.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use llmapi_common::block_hash::{BlockHash, prefix_block_hashes};
use llmapi_proto::auth::RequireToken;
use llmapi_proto::v1::worker_server::{Worker, WorkerServer};
use llmapi_proto::v1::{
    AbortRequest, AbortResponse, FinishReason, GenerateRequest, GenerateResponse, HealthRequest,
    HealthResponse, InfoRequest, InfoResponse, KvEventBatch, KvEventsRequest, KvSnapshot,
    LoadRequest, LoadResponse, TokenLogprob, TopLogprob, Usage,
};
use tokio::sync::mpsc;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// How a `ScriptedWorker` behaves.
#[derive(Debug, Clone)]
pub struct Script {
    /// Reported max_seq_len.
    pub max_seq_len: u32,
    /// Reported (and used) tokens_per_block.
    pub tokens_per_block: u32,
    /// Reported vocab size.
    pub vocab_size: u32,
    /// Pretend KV capacity in blocks.
    pub kv_capacity_blocks: u64,
    /// Tokens to emit, cycled; empty means replay the prompt.
    pub reply: Vec<u32>,
    /// EOS id: emitting it finishes with `stop` unless ignore_eos.
    pub eos: Option<u32>,
    /// Pause before each token.
    pub token_delay: Duration,
    /// Tokens per response message.
    pub tokens_per_message: usize,
    /// When set, calls without `authorization: Bearer <this>` are UNAUTHENTICATED, as a real
    /// worker answers them.
    pub required_token: Option<String>,
    /// Most requests running at once; past it Generate answers RESOURCE_EXHAUSTED, as a
    /// worker with a full waiting queue does. None: unbounded.
    pub max_running: Option<usize>,
    /// Reported max_batch_size (the router derives its default in-flight limit from it).
    pub max_batch_size: u32,
    /// Reported max_queued_requests (likewise).
    pub max_queued_requests: u32,
    /// After this many tokens a request goes silent (it stays running, holding its pretend
    /// KV blocks, and sends nothing more), as a request on a stuck engine does.
    pub stall_after_tokens: Option<u32>,
    /// After this many tokens of a stream (tokens carried over by a migration not counted),
    /// the stream ends with this status: UNAVAILABLE as from a worker that dies mid-request,
    /// or a request fault (INVALID_ARGUMENT, ...).
    pub fails_after_tokens: Option<(u32, tonic::Code)>,
    /// Load's engine counters, reported as given: preemptions, prefix-cache queries and
    /// hits (tokens), iterations and the tokens they computed.
    pub load_counters: LoadCounters,
}

/// The engine counters a scripted worker's Load reports (all 0 by default).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadCounters {
    /// Sequences preempted.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// Iterations run.
    pub iterations: u64,
    /// Tokens those iterations computed.
    pub iteration_tokens: u64,
}

/// A step histogram with all of `c.iterations` in one bucket up to `bound`, each of `value`.
fn one_bucket(c: &LoadCounters, bound: f64, value: f64) -> llmapi_proto::v1::StepHistogram {
    llmapi_proto::v1::StepHistogram {
        upper_bounds: vec![bound],
        counts: vec![c.iterations, 0],
        sum: value * c.iterations as f64,
    }
}

impl Default for Script {
    fn default() -> Self {
        Self {
            max_seq_len: 256,
            tokens_per_block: 4,
            vocab_size: 256,
            kv_capacity_blocks: 1024,
            reply: Vec::new(),
            eos: None,
            token_delay: Duration::ZERO,
            tokens_per_message: 1,
            required_token: None,
            max_running: None,
            max_batch_size: 64,
            max_queued_requests: 256,
            stall_after_tokens: None,
            fails_after_tokens: None,
            load_counters: LoadCounters::default(),
        }
    }
}

#[derive(Default)]
struct Shared {
    running: HashMap<String, u64>,
    cached: HashSet<BlockHash>,
    aborted: Vec<String>,
    requests: Vec<GenerateRequest>,
    trace_metadata: Vec<(Option<String>, Option<String>)>,
    grpc_timeouts: Vec<Option<String>>,
    /// Restarts of the pretend cache (its KvEvents run id).
    run: u64,
}

/// The double's state, inspectable by tests.
#[derive(Clone)]
pub struct ScriptedWorker {
    script: Script,
    shared: Arc<Mutex<Shared>>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    generated: Arc<AtomicU64>,
    /// Bumped on every change of the pretend cache, for KvEvents readers.
    cache_changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A running `ScriptedWorker` server.
pub struct ScriptedHandle {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its state.
    pub worker: ScriptedWorker,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedHandle {
    /// `http://ADDR`, as the router takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving at once: running streams end with an error, new calls fail to connect.
    pub fn kill(&self) {
        self.worker.dead.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptedWorker {
    /// A double following `script`.
    pub fn new(script: Script) -> Self {
        Self {
            script,
            shared: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            failing: Arc::new(AtomicBool::new(false)),
            dead: Arc::new(AtomicBool::new(false)),
            frozen: Arc::new(AtomicBool::new(false)),
            generated: Arc::default(),
            cache_changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Serves on a free loopback port.
    pub async fn spawn(self) -> std::io::Result<ScriptedHandle> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(self.serve(listener))
    }

    /// Serves on `listener`.
    pub fn serve(self, listener: tokio::net::TcpListener) -> ScriptedHandle {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        // Small gRPC frames must not wait for Nagle's algorithm.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let check = self
            .script
            .required_token
            .as_deref()
            .map(RequireToken::new)
            .transpose();
        let server = WorkerServer::new(self.clone())
            .max_decoding_message_size(llmapi_proto::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(llmapi_proto::limits::MAX_MESSAGE_BYTES);
        let svc = InterceptedService::new(server, move |req: Request<()>| match &check {
            Ok(None) => Ok(req),
            Ok(Some(check)) => check.clone().call(req),
            Err(e) => Err(Status::internal(format!("Script.required_token: {e}"))),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        ScriptedHandle {
            addr,
            worker: self,
            task,
        }
    }

    /// Answer health checks with `healthy`.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Fail every Generate before its first token with UNAVAILABLE.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Accept calls and never answer them (Generate, Health, everything), as a stopped
    /// process (SIGSTOP) whose kernel still accepts connections does; false answers again.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Waits while frozen.
    async fn thaw(&self) {
        while self.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The `grpc-timeout` metadata (the caller's deadline) of each Generate call, in order.
    pub fn grpc_timeouts(&self) -> Vec<Option<String>> {
        lock(&self.shared).grpc_timeouts.clone()
    }

    /// Generate requests received (including failed ones).
    pub fn requests(&self) -> Vec<GenerateRequest> {
        lock(&self.shared).requests.clone()
    }

    /// The `traceparent` and `tracestate` gRPC metadata of each Generate call, in order.
    pub fn trace_metadata(&self) -> Vec<(Option<String>, Option<String>)> {
        lock(&self.shared).trace_metadata.clone()
    }

    /// Blocks in the pretend cache.
    pub fn cached_blocks(&self) -> usize {
        lock(&self.shared).cached.len()
    }

    /// Evicts every pretend-cached block, as a worker short of KV blocks would; KvEvents
    /// readers get the empty cache.
    pub fn evict_all(&self) {
        lock(&self.shared).cached.clear();
        self.cache_changed();
    }

    /// Forgets the pretend cache under a new KvEvents run id, as a restarted worker would.
    pub fn restart_cache(&self) {
        {
            let mut s = lock(&self.shared);
            s.cached.clear();
            s.run += 1;
        }
        self.cache_changed();
    }

    fn cache_changed(&self) {
        self.cache_changes.send_modify(|v| *v += 1);
    }

    /// Request ids aborted (by Abort or by a dropped stream).
    pub fn aborted(&self) -> Vec<String> {
        lock(&self.shared).aborted.clone()
    }

    /// Requests holding pretend KV blocks now.
    pub fn running(&self) -> usize {
        lock(&self.shared).running.len()
    }

    /// Tokens emitted so far.
    pub fn generated(&self) -> u64 {
        self.generated.load(Ordering::Relaxed)
    }

    fn finish_request(&self, id: &str, aborted: bool) {
        let mut s = lock(&self.shared);
        if s.running.remove(id).is_some() && aborted {
            s.aborted.push(id.to_owned());
        }
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Worker for ScriptedWorker {
    type GenerateStream = GenStream;
    type KvEventsStream = Pin<Box<dyn Stream<Item = Result<KvEventBatch, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let md = |k: &str| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let trace = (md("traceparent"), md("tracestate"));
        let grpc_timeout = md("grpc-timeout");
        let req = request.into_inner();
        {
            let mut s = lock(&self.shared);
            s.requests.push(req.clone());
            s.trace_metadata.push(trace);
            s.grpc_timeouts.push(grpc_timeout);
        }
        self.thaw().await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable("scripted failure"));
        }
        let stopping = req.stopping.clone().unwrap_or_default();
        let sampling = req.sampling.unwrap_or_default();
        let prompt_len = req.prompt_token_ids.len();
        // As the real engine: a sequence may reach max_seq_len + 1 tokens.
        if prompt_len + stopping.max_tokens as usize > self.script.max_seq_len as usize + 1 {
            return Err(Status::failed_precondition(format!(
                "prompt of {prompt_len} tokens plus max_tokens {} exceeds max_seq_len {} + 1",
                stopping.max_tokens, self.script.max_seq_len
            )));
        }
        let tpb = self.script.tokens_per_block as usize;
        // As the real engine: the last sampled token takes no KV slot.
        let kv_blocks = (prompt_len + stopping.max_tokens as usize)
            .saturating_sub(1)
            .div_ceil(tpb.max(1)) as u64;
        if kv_blocks > self.script.kv_capacity_blocks {
            return Err(Status::failed_precondition(format!(
                "request needs {kv_blocks} blocks but the whole cache holds {}; the request does not fit in the KV cache",
                self.script.kv_capacity_blocks
            )));
        }
        if let Some(max) = self.script.max_running
            && lock(&self.shared).running.len() >= max
        {
            return Err(Status::resource_exhausted(format!(
                "the worker holds {max} requests, its limit; retry later"
            )));
        }
        let hashes = prefix_block_hashes(&req.prompt_token_ids, tpb);
        let cached_tokens = {
            let mut s = lock(&self.shared);
            let hit = hashes.iter().take_while(|h| s.cached.contains(h)).count();
            let before = s.cached.len();
            s.cached.extend(hashes.iter().copied());
            let grew = s.cached.len() != before;
            let blocks = (prompt_len + stopping.max_tokens as usize).div_ceil(tpb.max(1)) as u64;
            s.running.insert(req.request_id.clone(), blocks);
            if grew {
                self.cache_changes.send_modify(|v| *v += 1);
            }
            (hit * tpb) as u32
        };
        let reply = if self.script.reply.is_empty() {
            req.prompt_token_ids.clone()
        } else {
            self.script.reply.clone()
        };
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        let script = self.script.clone();
        let id = req.request_id.clone();
        // Pretend prompt logprobs: token i (from the second on) gets -i/4, with k alternatives.
        let mut prompt_lps: Vec<TokenLogprob> = if sampling.prompt_logprobs {
            req.prompt_token_ids
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, &t)| TokenLogprob {
                    token_id: t,
                    logprob: -(i as f32) / 4.0,
                    top: (0..sampling.logprobs.unwrap_or(0))
                        .map(|j| TopLogprob {
                            token_id: t.wrapping_add(j),
                            logprob: -(i as f32) / 4.0 - j as f32,
                        })
                        .collect(),
                })
                .collect()
        } else {
            Vec::new()
        };
        // A migrated request goes on from the tokens it carries, as the real engine does: the
        // reply continues where they end, and they count as generated.
        let carried = u32::try_from(req.generated_token_ids.len()).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            let mut sent = carried;
            let mut batch = Vec::new();
            let mut lps = Vec::new();
            loop {
                if me.dead.load(Ordering::SeqCst) {
                    let _ = tx
                        .send(Err(Status::unavailable("scripted worker died")))
                        .await;
                    me.finish_request(&id, false);
                    return;
                }
                if !lock(&me.shared).running.contains_key(&id) {
                    return;
                }
                if let Some((n, code)) = script.fails_after_tokens
                    && sent - carried >= n
                {
                    let _ = tx
                        .send(Err(Status::new(code, "scripted mid-stream failure")))
                        .await;
                    me.finish_request(&id, false);
                    return;
                }
                if sent >= stopping.max_tokens {
                    break;
                }
                if !script.token_delay.is_zero() {
                    tokio::time::sleep(script.token_delay).await;
                }
                if script.stall_after_tokens.is_some_and(|n| sent >= n) {
                    // Silent until the caller gives up (the send below then fails).
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if tx.is_closed() {
                        me.finish_request(&id, true);
                        return;
                    }
                    continue;
                }
                let token = reply[sent as usize % reply.len().max(1)];
                sent += 1;
                batch.push(token);
                if let Some(k) = sampling.logprobs {
                    lps.push(TokenLogprob {
                        token_id: token,
                        logprob: -0.5,
                        top: (0..k)
                            .map(|i| TopLogprob {
                                token_id: token.wrapping_add(i),
                                logprob: -0.5 - i as f32,
                            })
                            .collect(),
                    });
                }
                let eos_hit = script.eos == Some(token) && !stopping.ignore_eos;
                let stop_hit = stopping.stop_token_ids.contains(&token);
                let stopped = (eos_hit || stop_hit) && sent >= stopping.min_tokens;
                // A stream that fails after this token sends it without a finish, as a worker
                // that dies between its last token and its finish.
                let fails_next = script
                    .fails_after_tokens
                    .is_some_and(|(n, _)| sent - carried >= n);
                let last = !fails_next && (stopped || sent >= stopping.max_tokens);
                if batch.len() < script.tokens_per_message.max(1) && !last && !fails_next {
                    continue;
                }
                me.generated
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let msg = GenerateResponse {
                    token_ids: std::mem::take(&mut batch),
                    logprobs: std::mem::take(&mut lps),
                    prompt_logprobs: std::mem::take(&mut prompt_lps),
                    finish_reason: match (last, stopped) {
                        (false, _) => FinishReason::Unspecified,
                        (true, true) => FinishReason::Stop,
                        (true, false) => FinishReason::Length,
                    } as i32,
                    stop_token_id: (stopped).then_some(token),
                    usage: Some(Usage {
                        prompt_tokens: prompt_len as u32,
                        completion_tokens: sent,
                        cached_tokens,
                        avg_decoded_tokens_per_iter: None,
                    }),
                    timings: None,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    // The caller dropped the stream: abort and free the blocks.
                    me.finish_request(&id, true);
                    return;
                }
                if last {
                    break;
                }
            }
            me.finish_request(&id, false);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        self.thaw().await;
        let id = request.into_inner().request_id;
        let found = lock(&self.shared).running.contains_key(&id);
        self.finish_request(&id, true);
        Ok(Response::new(AbortResponse { found }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        self.thaw().await;
        let healthy = self.healthy.load(Ordering::SeqCst);
        Ok(Response::new(HealthResponse {
            healthy,
            message: if healthy {
                String::new()
            } else {
                "scripted unhealthy".into()
            },
        }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let s = &self.script;
        Ok(Response::new(InfoResponse {
            model: "scripted".into(),
            max_seq_len: s.max_seq_len,
            tokens_per_block: s.tokens_per_block,
            tp_size: 1,
            ep_size: 1,
            kv_capacity_blocks: s.kv_capacity_blocks,
            vocab_size: s.vocab_size,
            eos_token_ids: s.eos.into_iter().collect(),
            backend: "scripted".into(),
            max_batch_size: s.max_batch_size,
            max_num_tokens: 8192,
            max_queued_requests: s.max_queued_requests,
            enable_block_reuse: true,
            resumes_generation: true,
        }))
    }

    async fn kv_events(
        &self,
        _: Request<KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        self.thaw().await;
        let mut changes = self.cache_changes.subscribe();
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let version = *changes.borrow_and_update();
                let batch = {
                    let s = lock(&shared);
                    KvEventBatch {
                        run_id: format!("scripted-{}", s.run),
                        snapshot: Some(KvSnapshot {
                            event_id: version,
                            block_hashes: s.cached.iter().map(|h| h.as_bytes().to_vec()).collect(),
                            last_part: true,
                        }),
                        events: Vec::new(),
                    }
                };
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        self.thaw().await;
        let s = lock(&self.shared);
        let used: u64 = s.running.values().sum();
        Ok(Response::new(LoadResponse {
            running: s.running.len() as u32,
            queued: 0,
            kv_blocks_used: used,
            kv_blocks_free: self.script.kv_capacity_blocks.saturating_sub(used),
            preemptions: self.script.load_counters.preemptions,
            prefix_cache_queries: self.script.load_counters.prefix_cache_queries,
            prefix_cache_hits: self.script.load_counters.prefix_cache_hits,
            iterations: self.script.load_counters.iterations,
            iteration_tokens: self.script.load_counters.iteration_tokens,
            // Every iteration in the lowest bucket, each with the average token count.
            step_seconds: Some(one_bucket(&self.script.load_counters, 0.001, 0.0005)),
            step_batch_size: Some(one_bucket(&self.script.load_counters, 1.0, 1.0)),
            step_tokens: Some(one_bucket(
                &self.script.load_counters,
                8.0,
                self.script.load_counters.iteration_tokens as f64
                    / self.script.load_counters.iterations.max(1) as f64,
            )),
            spec_draft_tokens: 0,
            spec_accepted_tokens: 0,
        }))
    }
}
