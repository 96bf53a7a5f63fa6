//! The in-process engine: load a model, submit requests, stream token events.
//!
//! `Engine::start` loads the checkpoint, sizes the KV pool and runs the step loop on its own OS
//! thread. `EngineHandle` (cheap to clone, Send + Sync) validates requests synchronously and
//! talks to that thread over a channel. Dropping a request's receiver aborts it.

mod fault;
mod liveness;
mod runner;
mod step_stats;
mod types;

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use llmapi_common::guided::GuidedCompiler;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda;
use crate::dist::plan::{self, LeaderBackend};
use crate::dist::{Communicator, SharedComm, SingleRank};
use crate::kv::budget::{self, BudgetInputs, KvPlan, MemoryPool};
use crate::kv::host_memory::HostMemory;
use crate::kv::{DEFAULT_KV_EVENT_LOG_CAPACITY, KvEventLog, KvEventRead};
use crate::model::{ModelWeights, Shard};
use crate::sampling::Guide;
pub use step_stats::*;
pub use types::*;

/// Requests to the engine thread.
pub(crate) enum Command {
    Submit(Box<runner::NewRequest>),
    Abort(String),
    Shutdown,
}

/// State the engine thread publishes for handles.
pub(crate) struct Status {
    pub(crate) load: Mutex<LoadStats>,
    /// Ids of requests submitted and not yet finished.
    pub(crate) live: Mutex<HashSet<String>>,
    /// Why the engine stopped for good (its worker group broke); None while it runs.
    pub(crate) failed: Mutex<Option<String>>,
    /// KV events (blocks stored, removed, cleared) for KvEvents' readers.
    pub(crate) kv_events: Mutex<KvEventLog>,
    /// The id of the last KV event, for readers waiting on the next one.
    pub(crate) kv_event_id: tokio::sync::watch::Sender<u64>,
    /// When the engine loop's current pass began (`EngineHandle::stalled`).
    pub(crate) heartbeat: liveness::Heartbeat,
}

struct Shared {
    info: EngineInfo,
    status: Arc<Status>,
    cmd: Mutex<mpsc::Sender<Command>>,
    max_num_tokens: usize,
    chunked_prefill: bool,
    stall_timeout: Option<std::time::Duration>,
    /// Most unfinished requests before submits are refused (`EngineConfig::max_live_requests`).
    max_live: usize,
    max_batch_size: usize,
    /// The sliding window of every layer, when the backend frees the blocks before it.
    freed_window: Option<usize>,
    policy: CapacityPolicy,
    /// Compiles requests' grammars; built from the model's tokenizer by the first request
    /// that has one (Err: why this model cannot take grammars).
    guided: OnceLock<Result<Arc<GuidedCompiler>, String>>,
}

/// The compiler of requests' grammars over the model's tokenizer, built once (Err: why this
/// model cannot take grammars, e.g. a directory without a tokenizer).
fn guided_compiler(shared: &Shared) -> &Result<Arc<GuidedCompiler>, String> {
    let info = &shared.info;
    shared.guided.get_or_init(|| {
        let tok = llmapi_common::tokenizer::Tokenizer::from_dir(&info.model_dir)
            .map_err(|e| e.to_string())?;
        GuidedCompiler::new(&tok, info.vocab_size as usize, &info.eos_token_ids)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
}

/// Starts engines.
pub struct Engine;

/// A handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl Engine {
    /// Loads `model_dir` (config.json + safetensors) on the backend `cfg.backend` names (auto:
    /// CUDA when a GPU and its libraries are usable, else CPU) and starts the loop.
    pub fn start(model_dir: &Path, cfg: EngineConfig) -> Result<EngineHandle, EngineError> {
        let mut choice = cuda::select::resolve(cfg.backend)
            .map_err(|e| EngineError::InvalidConfig(format!("--backend cuda: {e}")))?;
        let before_load = probe_host(&cfg)?;
        let weights = ModelWeights::load(model_dir)?;
        if choice == cuda::select::Choice::Cuda
            && cfg.backend != llmapi_common::args::Backend::Cuda
            && let Err(e) = cuda::select::supports(&weights, &cfg)
        {
            tracing::info!(reason = %e, "backend auto: the CUDA backend cannot run this model, using cpu");
            choice = cuda::select::Choice::Cpu;
        }
        let model_cfg = weights.config.clone();
        let name = model_name(model_dir, &cfg);
        let on = |weights: ModelWeights| -> Result<Box<dyn Backend>, EngineError> {
            Ok(match choice {
                cuda::select::Choice::Cpu => {
                    Box::new(cpu_backend_of(weights, &cfg, Box::new(SingleRank))?)
                }
                cuda::select::Choice::Cuda => Box::new(cuda::select::cuda_backend(weights, &cfg)?),
            })
        };
        let backend = on(weights)?;
        let draft = load_draft(&cfg, on)?;
        Self::start_sized(
            backend,
            draft,
            &model_cfg,
            model_dir,
            name,
            cfg,
            Some(before_load),
        )
    }

    /// Starts rank 0 (`shard.tp_rank`) of a tensor-parallel group: it loads its shard, then
    /// joins the group through `connect`, runs the scheduler, and sends each step's plan to
    /// the followers (`run_follower` on every other rank). Loading before joining lets the
    /// group's join timeout, not its collective timeout, absorb ranks that load at different
    /// speeds. If any rank fails, every request ends with an error naming it and
    /// `EngineHandle::failure` says why.
    pub fn start_leader(
        model_dir: &Path,
        cfg: EngineConfig,
        shard: Shard,
        connect: impl FnOnce() -> Result<Box<dyn Communicator>, EngineError>,
    ) -> Result<EngineHandle, EngineError> {
        if shard.tp_rank != 0 {
            return Err(EngineError::InvalidConfig(format!(
                "rank {} cannot lead its group; rank 0 leads, the others run run_follower",
                shard.tp_rank
            )));
        }
        let before_load = probe_host(&cfg)?;
        // DraftTarget: the draft runs whole on this rank alone, on its device; its drafts
        // reach the followers inside each step's plan (the verification chunks), so they
        // never load it. Loaded before joining, like the shard.
        let draft = load_draft(&cfg, |weights| whole_on_rank(weights, &cfg))?;
        let (backend, model_cfg, shared) = backend_in_group(model_dir, &cfg, shard, connect)?;
        let name = model_name(model_dir, &cfg);
        let leader = LeaderBackend::new(backend, Box::new(shared));
        Self::start_sized(
            Box::new(leader),
            draft,
            &model_cfg,
            model_dir,
            name,
            cfg,
            Some(before_load),
        )
    }

    /// Starts the loop over any backend (the CPU one, a CUDA one, or a test double). The
    /// backend's weights are already resident: the KV budget counts them as taken from the
    /// memory free now.
    pub fn start_with_backend(
        backend: Box<dyn Backend>,
        model: &llmapi_common::model_config::ModelConfig,
        model_dir: &Path,
        model_name: String,
        cfg: EngineConfig,
    ) -> Result<EngineHandle, EngineError> {
        Self::start_sized(backend, None, model, model_dir, model_name, cfg, None)
    }

    /// `start_with_backend` with the host memory read before the weights loaded, if it was,
    /// and DraftTarget's draft model (its KV pool is sized like the target's).
    fn start_sized(
        mut backend: Box<dyn Backend>,
        mut draft: Option<Box<dyn Backend>>,
        model: &llmapi_common::model_config::ModelConfig,
        model_dir: &Path,
        model_name: String,
        cfg: EngineConfig,
        before_load: Option<HostMemory>,
    ) -> Result<EngineHandle, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidConfig(m));
        if cfg.max_batch_size == 0 || cfg.max_num_tokens == 0 || cfg.tokens_per_block == 0 {
            return bad(
                "max_batch_size, max_num_tokens and tokens_per_block must be at least 1".into(),
            );
        }
        let max_seq_len = cfg.max_seq_len.unwrap_or(model.max_position_embeddings);
        if max_seq_len < 2 {
            return bad(format!(
                "max_seq_len is {max_seq_len}; it must be at least 2"
            ));
        }
        if !backend.windowed_attention() {
            model
                .check_full_attention_covers(backend.name(), max_seq_len)
                .map_err(EngineError::InvalidConfig)?;
        }
        let freed_window = model
            .window_of_every_layer()
            .filter(|_| backend.windowed_attention());
        check_draft(&cfg, backend.as_ref(), draft.as_deref(), freed_window)?;
        let kv_plan = size_kv(
            &cfg,
            backend.as_ref(),
            draft.as_deref(),
            max_seq_len,
            before_load,
        )?;
        kv_plan.log();
        let num_blocks = kv_plan.blocks;
        backend
            .init_kv(num_blocks, cfg.tokens_per_block)
            .map_err(|e| EngineError::Backend(e.to_string()))?;
        if let Some(d) = draft.as_mut() {
            // Same blocks, same size: sequences' block tables serve the draft as they are.
            d.init_kv(num_blocks, cfg.tokens_per_block)
                .map_err(|e| EngineError::Backend(format!("draft model: {e}")))?;
        }
        tracing::info!(
            num_blocks,
            tokens_per_block = cfg.tokens_per_block,
            kv_bytes = kv_plan.bytes,
            "KV cache allocated"
        );
        // Instruct checkpoints often name their end-of-turn token only in
        // generation_config.json; stopping on config.json's ids alone would never end a turn.
        let generation = llmapi_common::generation_config::GenerationConfig::read(model_dir)
            .map_err(|e| EngineError::InvalidConfig(e.to_string()))?;
        let eos_token_ids = llmapi_common::generation_config::merged_eos_token_ids(
            &generation.eos_token_ids,
            &model.eos_token_ids,
        );
        tracing::info!(?eos_token_ids, "generation ends on these token ids");
        let info = EngineInfo {
            model: model_name,
            model_dir: model_dir.to_path_buf(),
            max_seq_len: max_seq_len as u32,
            tokens_per_block: cfg.tokens_per_block as u32,
            vocab_size: backend.vocab_size() as u32,
            eos_token_ids,
            kv_capacity_blocks: num_blocks as u64,
            max_batch_size: cfg.max_batch_size as u32,
            max_num_tokens: cfg.max_num_tokens as u32,
            max_queued_requests: u32::try_from(
                cfg.max_live_requests().saturating_sub(cfg.max_batch_size),
            )
            .unwrap_or(u32::MAX),
            enable_block_reuse: cfg.enable_block_reuse,
            backend: backend.name().to_string(),
        };
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            info: info.clone(),
            status: Arc::new(Status {
                load: Mutex::new(LoadStats {
                    kv_blocks_free: num_blocks as u64,
                    ..Default::default()
                }),
                live: Mutex::default(),
                failed: Mutex::default(),
                kv_events: Mutex::new(KvEventLog::new(
                    format!("{:x}-{}", run_nanos(), std::process::id()),
                    DEFAULT_KV_EVENT_LOG_CAPACITY,
                )),
                kv_event_id: tokio::sync::watch::channel(0).0,
                heartbeat: liveness::Heartbeat::new(),
            }),
            cmd: Mutex::new(tx),
            max_num_tokens: cfg.max_num_tokens,
            chunked_prefill: cfg.enable_chunked_prefill,
            stall_timeout: cfg.stall_timeout,
            max_live: cfg.max_live_requests(),
            max_batch_size: cfg.max_batch_size,
            freed_window,
            policy: cfg.capacity_policy,
            guided: OnceLock::new(),
        });
        let status = Arc::clone(&shared.status);
        // The token trie takes a moment on large vocabularies: built now, off the engine
        // thread, rather than on the first structured-output request.
        let warm = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("llmapi-guided-init".into())
            .spawn(move || {
                guided_compiler(&warm);
            });
        let runner = runner::Runner::new(
            backend,
            draft,
            cfg,
            info,
            num_blocks,
            Arc::clone(&status),
            freed_window,
        );
        std::thread::Builder::new()
            .name("llmapi-engine".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(rx)));
                // The runner (and with it every request's event sender) is gone: its requests
                // end with an error, and the handle reports the worker failed.
                if let Err(panic) = ran {
                    let what = liveness::panic_message(panic.as_ref());
                    tracing::error!(panic = %what, "the engine thread panicked; this worker serves no more requests");
                    if let Ok(mut f) = status.failed.lock() {
                        *f = Some(format!("the engine thread panicked: {what}"));
                    }
                }
            })
            .map_err(|e| EngineError::Backend(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle { shared })
    }
}

/// Runs a follower rank (`shard.tp_rank` > 0) of a tensor-parallel group: loads its shard,
/// joins through `connect`, and runs every step its leader plans until the leader stops
/// (Ok) or the group breaks (Err naming the rank that failed). Blocks the thread.
pub fn run_follower(
    model_dir: &Path,
    cfg: &EngineConfig,
    shard: Shard,
    connect: impl FnOnce() -> Result<Box<dyn Communicator>, EngineError>,
) -> Result<(), EngineError> {
    let (mut backend, _, mut plan_comm) = backend_in_group(model_dir, cfg, shard, connect)?;
    plan::follow(backend.as_mut(), &mut plan_comm).map_err(|e| EngineError::Backend(e.to_string()))
}

/// Loads `shard`, then joins its group; the backend's collectives and the plan channel
/// share the one connection. `--backend cuda` puts the shard on this rank's GPU
/// (`cuda::select::slot_gpu` of `gpu_slot`); otherwise (auto included) groups run on the CPU.
fn backend_in_group(
    model_dir: &Path,
    cfg: &EngineConfig,
    shard: Shard,
    connect: impl FnOnce() -> Result<Box<dyn Communicator>, EngineError>,
) -> Result<
    (
        Box<dyn Backend>,
        llmapi_common::model_config::ModelConfig,
        SharedComm,
    ),
    EngineError,
> {
    let on_gpu = cfg.backend == llmapi_common::args::Backend::Cuda;
    if on_gpu {
        cuda::select::resolve(cfg.backend)
            .map_err(|e| EngineError::InvalidConfig(format!("--backend cuda: {e}")))?;
    }
    let weights = ModelWeights::load_shard(model_dir, shard)?;
    if on_gpu {
        cuda::select::supports(&weights, cfg)?;
    }
    let model_cfg = weights.config.clone();
    let shared = SharedComm::new(connect()?);
    let backend: Box<dyn Backend> = if on_gpu {
        Box::new(cuda::select::cuda_backend_in_group(
            weights,
            cfg,
            Box::new(shared.clone()),
        )?)
    } else {
        Box::new(cpu_backend_of(weights, cfg, Box::new(shared.clone()))?)
    };
    Ok((backend, model_cfg, shared))
}

/// DraftTarget's draft model loaded by `on` through the target's loader (a directory or a
/// GGUF file), or None without DraftTarget; a load error names the key.
fn load_draft(
    cfg: &EngineConfig,
    on: impl FnOnce(ModelWeights) -> Result<Box<dyn Backend>, EngineError>,
) -> Result<Option<Box<dyn Backend>>, EngineError> {
    let Some(s) = cfg.speculative.as_ref().filter(|s| s.is_draft_target()) else {
        return Ok(None);
    };
    let dir = s.speculative_model_dir.as_deref().unwrap_or_default();
    let weights = ModelWeights::load(Path::new(dir)).map_err(|e| {
        EngineError::InvalidConfig(format!(
            "speculative_config.speculative_model_dir {dir}: {e}"
        ))
    })?;
    tracing::info!(
        dir,
        layers = weights.config.num_hidden_layers,
        "draft model loaded"
    );
    on(weights).map(Some)
}

/// A whole (unsharded) model on a group rank's own device: its GPU with `--backend cuda`
/// (the one `gpu_slot` picks, as for its shard), else the CPU with the rank's threads.
fn whole_on_rank(
    weights: ModelWeights,
    cfg: &EngineConfig,
) -> Result<Box<dyn Backend>, EngineError> {
    Ok(if cfg.backend == llmapi_common::args::Backend::Cuda {
        Box::new(cuda::select::cuda_backend(weights, cfg)?)
    } else {
        Box::new(cpu_backend_of(weights, cfg, Box::new(SingleRank))?)
    })
}

/// A CPU backend over loaded weights (a whole model with `SingleRank`, or a shard).
fn cpu_backend_of(
    weights: ModelWeights,
    cfg: &EngineConfig,
    comm: Box<dyn Communicator>,
) -> Result<CpuBackend, EngineError> {
    let kv_dtype = match cfg.kv_dtype {
        KvDtype::Auto => KvDtype::Bf16,
        d => d,
    };
    CpuBackend::new_sharded(weights, comm, kv_dtype, cfg.threads)
        .and_then(|b| b.with_dtype(cfg.dtype))
        .map(|b| b.with_memory_source(cfg.memory_source.clone()))
        .map_err(|e| EngineError::Backend(e.to_string()))
}

fn model_name(model_dir: &Path, cfg: &EngineConfig) -> String {
    cfg.model_name
        .clone()
        .unwrap_or_else(|| llmapi_common::model_dir::default_model_name(model_dir))
}

/// Host memory now, for the KV budget; an error names the file that could not be read.
fn probe_host(cfg: &EngineConfig) -> Result<HostMemory, EngineError> {
    cfg.memory_source.probe().map_err(|e| {
        EngineError::InvalidConfig(format!(
            "{e}; the KV cache is sized from host memory (Linux /proc/meminfo)"
        ))
    })
}

/// Sizes the KV pool (`kv::budget`): from the device memory the backend reports free, else
/// from this replica's share of host memory less its weights and workspaces.
/// DraftTarget's draft model: there exactly when DraftTarget is configured (an engine
/// started on a given backend has none), with the target's vocabulary,
/// on a model whose blocks are never freed by a sliding window (the draft catches up from
/// any position).
fn check_draft(
    cfg: &EngineConfig,
    target: &dyn Backend,
    draft: Option<&dyn Backend>,
    freed_window: Option<usize>,
) -> Result<(), EngineError> {
    let wanted = cfg
        .speculative
        .as_ref()
        .is_some_and(|s| s.is_draft_target());
    let bad = |m: String| Err(EngineError::InvalidConfig(m));
    match draft {
        None if wanted => bad(
            "speculative_config DraftTarget needs its draft checkpoint loaded by the worker \
             (Engine::start or start_leader); use decoding_type: NGram here"
                .into(),
        ),
        Some(_) if !wanted => bad("a draft model was given without DraftTarget".into()),
        Some(d) if d.vocab_size() != target.vocab_size() => bad(format!(
            "speculative_config.speculative_model_dir: the draft model's vocabulary has {} \
             tokens but the target's has {}; a draft must share the target's tokenizer",
            d.vocab_size(),
            target.vocab_size()
        )),
        Some(_) if freed_window.is_some() => bad(
            "speculative_config DraftTarget: the target frees KV blocks out of its sliding \
             window; use decoding_type: NGram with this model"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn size_kv(
    cfg: &EngineConfig,
    backend: &dyn Backend,
    draft: Option<&dyn Backend>,
    max_seq_len: usize,
    before_load: Option<HostMemory>,
) -> Result<KvPlan, EngineError> {
    let memory = match backend.kv_memory_available() {
        Some(free) => MemoryPool::Device { free: free as u64 },
        None => {
            let now = probe_host(cfg)?;
            let mut fp = backend.host_footprint(cfg.max_num_tokens, cfg.max_batch_size);
            if let Some(d) = draft {
                let dfp = d.host_footprint(cfg.max_num_tokens, cfg.max_batch_size);
                fp.weights += dfp.weights;
                fp.workspace += dfp.workspace;
            }
            // Without a reading from before the load, the resident weights came out of what
            // is free now.
            let before_load = before_load.unwrap_or_else(|| {
                let mut m = now.clone();
                m.mem_available = m.mem_available.saturating_add(fp.weights);
                if let Some(c) = m.cgroup.as_mut() {
                    c.in_use = c.in_use.saturating_sub(fp.weights);
                }
                m
            });
            MemoryPool::Host {
                before_load,
                now,
                replicas: cfg.replicas_on_node,
                weights: fp.weights,
                workspace: fp.workspace,
            }
        }
    };
    budget::plan(&BudgetInputs {
        memory,
        fraction: cfg.kv_memory_fraction,
        max_tokens: cfg.kv_max_tokens,
        // The draft's pool has as many blocks as the target's.
        bytes_per_token: backend.kv_bytes_per_token() + draft.map_or(0, |d| d.kv_bytes_per_token()),
        tokens_per_block: cfg.tokens_per_block,
        max_batch_size: cfg.max_batch_size,
        max_seq_len,
    })
    .map_err(|e| EngineError::InvalidConfig(e.0))
}

/// Nanoseconds since the Unix epoch: with the process id, this run's KV event run id.
fn run_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

impl EngineHandle {
    /// Validates and queues a request; events arrive on the returned receiver. Refused with
    /// `QueueFull` while the engine holds `EngineConfig::max_live_requests` unfinished ones.
    pub fn submit(
        &self,
        req: GenerateParams,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        self.submit_bounded(req, true)
    }

    /// Queues a request even when the waiting queue is full: for health probes, which must
    /// not fail because the worker is busy.
    pub fn submit_probe(
        &self,
        req: GenerateParams,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        self.submit_bounded(req, false)
    }

    fn submit_bounded(
        &self,
        req: GenerateParams,
        bounded: bool,
    ) -> Result<UnboundedReceiver<TokenEvent>, EngineError> {
        if let Some(why) = self.failure() {
            return Err(EngineError::Backend(format!(
                "the worker group failed and serves no more requests: {why}"
            )));
        }
        let info = &self.shared.info;
        runner::validate(
            &req,
            info,
            self.shared.max_num_tokens,
            self.shared.chunked_prefill,
            self.shared.freed_window,
            self.shared.policy,
        )?;
        {
            let mut live = self
                .shared
                .status
                .live
                .lock()
                .map_err(|_| EngineError::Shutdown)?;
            let max_live = self.shared.max_live;
            if bounded && live.len() >= max_live {
                let batch = self.shared.max_batch_size;
                return Err(EngineError::QueueFull(format!(
                    "the worker holds {} requests, its limit (max_batch_size {batch} running + {} waiting); \
                     retry later, add workers or raise scheduler_config.max_queued_requests",
                    live.len(),
                    max_live.saturating_sub(batch)
                )));
            }
            if !live.insert(req.request_id.clone()) {
                return Err(EngineError::InvalidRequest(format!(
                    "request id `{}` is already in use; use a unique id per request",
                    req.request_id
                )));
            }
        }
        let guide = match self.guide(&req) {
            Ok(g) => g,
            Err(e) => {
                if let Ok(mut live) = self.shared.status.live.lock() {
                    live.remove(&req.request_id);
                }
                return Err(e);
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.send(Command::Submit(Box::new(runner::NewRequest {
            params: req,
            guide,
            tx,
            arrival: std::time::Instant::now(),
        })))?;
        Ok(rx)
    }

    /// The request's grammar compiled into a guide (past its already generated tokens), or
    /// None when it has none. Compiling takes from microseconds (a cached schema) to tens of
    /// milliseconds: async callers run `submit` on a blocking thread for such requests.
    fn guide(&self, req: &GenerateParams) -> Result<Option<Guide>, EngineError> {
        let Some(constraint) = &req.sampling.guided else {
            return Ok(None);
        };
        let compiler = guided_compiler(&self.shared).as_ref().map_err(|e| {
            EngineError::InvalidRequest(format!(
                "this worker cannot follow grammars (structured outputs): {e}"
            ))
        })?;
        let matcher = compiler
            .matcher(constraint)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        Guide::new(matcher, &req.generated)
            .map(Some)
            .map_err(EngineError::InvalidRequest)
    }

    /// Aborts a queued or running request and frees its KV blocks; false when unknown.
    pub fn abort(&self, request_id: &str) -> bool {
        let known = self
            .shared
            .status
            .live
            .lock()
            .map(|l| l.contains(request_id))
            .unwrap_or(false);
        known && self.send(Command::Abort(request_id.to_string())).is_ok()
    }

    /// The KV events a reader of run `run_id` that applied events up to `after` reads next
    /// (at most `max`, or a snapshot: see `KvEventLog::read`), with this run's id.
    pub fn kv_events(&self, run_id: &str, after: u64, max: usize) -> (String, KvEventRead) {
        match self.shared.status.kv_events.lock() {
            Ok(log) => (log.run_id().to_owned(), log.read(run_id, after, max)),
            // The engine thread panicked mid-update: no consistent position to give.
            Err(_) => (
                String::new(),
                KvEventRead::Snapshot {
                    last_event_id: 0,
                    blocks: Vec::new(),
                },
            ),
        }
    }

    /// Changes whenever a KV event is appended (its value: the last event id).
    pub fn kv_event_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.status.kv_event_id.subscribe()
    }

    /// Current load.
    pub fn load(&self) -> LoadStats {
        self.shared
            .status
            .load
            .lock()
            .map(|l| *l)
            .unwrap_or_default()
    }

    /// Why the engine stopped for good (a rank of its worker group failed); None while it
    /// serves.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .status
            .failed
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|_| Some("the engine thread panicked".into()))
    }

    /// Why the engine looks stuck: a pass of its loop (a step) has run longer than
    /// `stall_timeout` while requests are in flight; None while it makes progress, is idle,
    /// or has no timeout.
    pub fn stalled(&self) -> Option<String> {
        let timeout = self.shared.stall_timeout?;
        let age = self.shared.status.heartbeat.pass_age()?;
        let live = self.shared.status.live.lock().map_or(0, |l| l.len());
        (age > timeout && live > 0).then(|| {
            format!(
                "the engine has been in one step for {:.0} s with {live} requests in flight \
                 (engine_stall_timeout is {} s)",
                age.as_secs_f64(),
                timeout.as_secs()
            )
        })
    }

    /// Static facts.
    pub fn info(&self) -> EngineInfo {
        self.shared.info.clone()
    }

    /// Stops the engine loop; pending requests end with an error event.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }

    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        let tx = self.shared.cmd.lock().map_err(|_| EngineError::Shutdown)?;
        tx.send(cmd).map_err(|_| EngineError::Shutdown)
    }
}
