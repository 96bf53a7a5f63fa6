//! Plain data crossing the engine's door: configuration, requests, events and statistics.
//!
//! Field meanings mirror `proto/proto/worker.proto`.

use std::path::PathBuf;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The engine's choice: bf16 on CPU.
    #[default]
    Auto,
    /// 32-bit floats.
    Float32,
    /// bfloat16.
    Bf16,
    /// fp8 e4m3 with one f32 scale per token and KV head.
    Fp8,
}

impl KvDtype {
    /// Parses the `kv_cache_config.dtype` spellings: auto, float32/fp32, bf16/bfloat16, fp8.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "float32" | "fp32" | "f32" => Self::Float32,
            "bf16" | "bfloat16" => Self::Bf16,
            "fp8" | "fp8_e4m3" | "e4m3" => Self::Fp8,
            _ => return None,
        })
    }
}

/// How the scheduler admits requests when KV blocks are scarce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CapacityPolicy {
    /// Reserve blocks for the whole request (prompt + max_tokens) at admission; never preempt.
    #[default]
    GuaranteedNoEvict,
    /// Admit greedily; when blocks run out preempt the newest request and recompute it later.
    MaxUtilization,
}

/// The CPU backend's default prefill budget per step (`prefill_token_budget` unset).
///
/// On the bench model over two cores, 512 prompt tokens take about a third of a second, so
/// sixteen 128-token prompts that arrive together start decoding four at a time instead of
/// all after one 1.3 s step; the total work, and so the throughput, stays the same (see
/// docs/bench/serving.md).
pub const CPU_PREFILL_TOKEN_BUDGET: usize = 512;

/// Waiting requests allowed per batch slot when `max_queued_requests` is unset: enough to
/// refill the batch a few times over while bounding what a burst can pile up.
pub const DEFAULT_QUEUED_PER_BATCH_SLOT: usize = 4;

/// Engine settings; plain data so configuration code can fill it from `LlmArgs`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Most sequences in one iteration.
    pub max_batch_size: usize,
    /// Most tokens (prefill + decode) in one iteration.
    pub max_num_tokens: usize,
    /// Longest prompt + completion; None means the model's max_position_embeddings.
    pub max_seq_len: Option<usize>,
    /// Tokens per KV block.
    pub tokens_per_block: usize,
    /// KV cache element type.
    pub kv_dtype: KvDtype,
    /// Arithmetic of the matrix products (LlmArgs `dtype`).
    pub dtype: llmapi_common::args::ModelDtype,
    /// KV capacity in tokens (`kv_cache_config.max_tokens`); the smaller of it and the memory
    /// budget wins. None: the memory budget, capped at what `max_batch_size` sequences of
    /// `max_seq_len` tokens can use.
    pub kv_max_tokens: Option<usize>,
    /// `kv_cache_config.free_gpu_memory_fraction`: the share of the memory left after the
    /// weights and workspaces that the KV cache takes (`kv::budget`).
    pub kv_memory_fraction: f64,
    /// Reuse cached prefix blocks across requests.
    pub enable_block_reuse: bool,
    /// Split long prompts over iterations under max_num_tokens.
    pub enable_chunked_prefill: bool,
    /// Most prompt tokens per iteration; None: `CPU_PREFILL_TOKEN_BUDGET` on the CPU
    /// backend, `max_num_tokens` on others.
    pub prefill_token_budget: Option<usize>,
    /// Admission policy.
    pub capacity_policy: CapacityPolicy,
    /// Most requests waiting beyond the running batch; past `max_batch_size +
    /// max_queued_requests` unfinished requests a submit is refused with `QueueFull`. None:
    /// `DEFAULT_QUEUED_PER_BATCH_SLOT` x `max_batch_size`.
    pub max_queued_requests: Option<usize>,
    /// Print one line per iteration.
    pub print_iter_log: bool,
    /// Compute threads; None means all available cores.
    pub threads: Option<usize>,
    /// Model name reported by `info()`; None means the directory name.
    pub model_name: Option<String>,
    /// Compute backend (`--backend`); `Engine::start` resolves auto to cuda or cpu.
    pub backend: llmapi_common::args::Backend,
    /// `cuda_graph_config` (CUDA backend only); None: no CUDA graphs.
    pub cuda_graph_config: Option<llmapi_common::args::CudaGraphConfig>,
    /// This engine's place among the ranks and replicas on its node (its local rank): the
    /// CUDA backend runs on GPU `gpu_slot % devices`, so tasks sharing a node spread over
    /// its GPUs instead of all landing on GPU 0.
    pub gpu_slot: usize,
    /// How long one pass of the engine loop (a step) may take while requests are in flight
    /// before `EngineHandle::stalled` reports the engine stuck; None: never.
    pub stall_timeout: Option<std::time::Duration>,
    /// Replicas (or tensor-parallel ranks) on this node that split its host memory evenly,
    /// as the launcher splits its cores between them (`kv::budget`).
    pub replicas_on_node: usize,
    /// Where host memory and cgroup limits are read (a fake tree in tests).
    pub memory_source: crate::kv::host_memory::MemorySource,
    /// `speculative_config`: NGram drafts verified each step; None: off.
    pub speculative: Option<llmapi_common::args::SpeculativeConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 64,
            max_num_tokens: 2048,
            max_seq_len: None,
            tokens_per_block: 32,
            kv_dtype: KvDtype::Auto,
            dtype: llmapi_common::args::ModelDtype::Auto,
            kv_max_tokens: None,
            kv_memory_fraction: 0.2,
            enable_block_reuse: true,
            enable_chunked_prefill: false,
            prefill_token_budget: None,
            capacity_policy: CapacityPolicy::GuaranteedNoEvict,
            max_queued_requests: None,
            print_iter_log: false,
            threads: None,
            model_name: None,
            backend: llmapi_common::args::Backend::Cpu,
            cuda_graph_config: None,
            gpu_slot: 0,
            stall_timeout: None,
            replicas_on_node: 1,
            memory_source: crate::kv::host_memory::MemorySource::default(),
            speculative: None,
        }
    }
}

/// Sampling settings of one request (proto `SamplingParams`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means disabled.
    pub top_k: u32,
    /// 1.0 means disabled.
    pub top_p: f32,
    /// 0 means disabled.
    pub min_p: f32,
    /// Seed for reproducible sampling; None draws one.
    pub seed: Option<u64>,
    /// 1.0 means disabled.
    pub repetition_penalty: f32,
    /// 0 means disabled.
    pub presence_penalty: f32,
    /// 0 means disabled.
    pub frequency_penalty: f32,
    /// Number of top alternatives returned with each token; None means no logprobs.
    pub logprobs: Option<u32>,
    /// Also return logprobs of the prompt tokens.
    pub prompt_logprobs: bool,
    /// `(token id, bias)` added to the logits before every sampling mode, in id order; empty
    /// means none. Logprobs stay those of the raw logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow (structured outputs); None means free text.
    pub guided: Option<llmapi_common::guided::Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            prompt_logprobs: false,
            logit_bias: Vec::new(),
            guided: None,
        }
    }
}

/// When a request stops (proto `StoppingParams`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoppingParams {
    /// Most tokens to generate; 0 means up to max_seq_len.
    pub max_tokens: u32,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: u32,
    /// Never stop on the model's EOS ids.
    pub ignore_eos: bool,
    /// Extra token ids that end the request.
    pub stop_token_ids: Vec<u32>,
}

/// One request for the engine.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateParams {
    /// Caller-chosen id, unique among live requests.
    pub request_id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens this request already generated on another worker (request migration): computed
    /// after the prompt and counted as generated (max_tokens, min_tokens, penalties, usage);
    /// a seeded sampler resumes after their draws. Empty for a new request.
    pub generated: Vec<u32>,
    /// Sequence group key (proto `group_id`): the choices of one prompt share its computed
    /// full KV blocks (`Scheduler`'s admission). Empty: no group.
    pub group: String,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Stopping settings.
    pub stopping: StoppingParams,
}

/// A sampled token with its log probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token_id: u32,
    /// Its log probability under the model's distribution (before sampling filters).
    pub logprob: f32,
    /// The most likely tokens and their log probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token.
    Stop,
    /// max_tokens or max_seq_len.
    Length,
    /// Aborted by the caller.
    Abort,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// Server-side timings in seconds since arrival.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Arrival to first scheduled.
    pub queue_s: f64,
    /// Arrival to first token.
    pub ttft_s: f64,
    /// Arrival to last token.
    pub e2e_s: f64,
}

/// What the engine streams back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// New tokens; `logprobs` is empty unless asked for.
    Tokens {
        /// The new token ids.
        ids: Vec<u32>,
        /// One entry per id when logprobs were asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// Logprobs of the prompt tokens (first token has none); sent before the first Tokens.
    PromptLogprobs(Vec<TokenLogprob>),
    /// The last event of a request.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// The stop or EOS token that ended it, if one did.
        stop_token_id: Option<u32>,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
        /// Tokens emitted per engine step that emitted any for this request (TensorRT-LLM's
        /// `avg_decoded_tokens_per_iter`: above 1 when drafts were accepted); None when
        /// speculative decoding is off.
        avg_decoded_tokens_per_iter: Option<f64>,
    },
    /// The request failed through the engine's fault; no further events follow.
    Error(String),
    /// The request can never be served by this engine (it does not fit its KV cache); no
    /// further events follow. The service answers it as FAILED_PRECONDITION.
    Refused(String),
}

/// Current load, as the router's policies read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadStats {
    /// Requests in the running batch.
    pub running: u32,
    /// Requests waiting for admission.
    pub queued: u32,
    /// KV blocks held by requests or the prefix cache, or promised to a running request.
    pub kv_blocks_used: u64,
    /// KV blocks free (including evictable cached blocks) and promised to no one.
    pub kv_blocks_free: u64,
    /// Sequences preempted (their KV dropped, to be recomputed) since the engine started;
    /// only MAX_UTILIZATION preempts.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission since the engine started.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached (not computed again).
    pub prefix_cache_hits: u64,
    /// Iterations (steps) run since the engine started.
    pub iterations: u64,
    /// Tokens those iterations computed (prefill and decode).
    pub iteration_tokens: u64,
    /// Distributions of those iterations' time, batch size and tokens.
    pub steps: super::StepStats,
    /// Draft tokens verified since the engine started (speculative decoding).
    pub spec_draft_tokens: u64,
    /// Of those, accepted.
    pub spec_accepted_tokens: u64,
}

/// Static facts about the served model and engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    /// Model name.
    pub model: String,
    /// Model directory.
    pub model_dir: PathBuf,
    /// Longest prompt + completion.
    pub max_seq_len: u32,
    /// Tokens per KV block.
    pub tokens_per_block: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Token ids that end generation: generation_config.json's `eos_token_id` then
    /// config.json's (`generation_config::merged_eos_token_ids`).
    pub eos_token_ids: Vec<u32>,
    /// KV blocks in the pool.
    pub kv_capacity_blocks: u64,
    /// Most sequences per iteration.
    pub max_batch_size: u32,
    /// Most tokens per iteration.
    pub max_num_tokens: u32,
    /// Most requests waiting beyond the running batch before submits get `QueueFull`.
    pub max_queued_requests: u32,
    /// Prefix reuse on.
    pub enable_block_reuse: bool,
    /// Compute backend name, e.g. "cpu".
    pub backend: String,
}

/// Errors of the engine API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// config.json problems.
    #[error(transparent)]
    Config(#[from] llmapi_common::model_config::ModelConfigError),
    /// Weight loading problems.
    #[error("{0}")]
    Weights(String),
    /// Engine settings that cannot work.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// A request with a malformed or out-of-range parameter (gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidRequest(String),
    /// A well-formed request this engine can never serve: longer than max_seq_len or
    /// max_num_tokens, or needing more KV cache than the whole pool (gRPC
    /// FAILED_PRECONDITION). Sending it again, here or to a like worker, fails the same way.
    #[error("{0}")]
    DoesNotFit(String),
    /// The engine's waiting queue is full (gRPC RESOURCE_EXHAUSTED); the same request may
    /// succeed later.
    #[error("{0}")]
    QueueFull(String),
    /// The engine thread has stopped.
    #[error("the engine has shut down")]
    Shutdown,
    /// The compute backend failed.
    #[error("backend error: {0}")]
    Backend(String),
}

impl EngineConfig {
    /// Most unfinished requests (running + waiting) the engine holds before refusing new
    /// ones with `EngineError::QueueFull`.
    pub fn max_live_requests(&self) -> usize {
        let queued = self.max_queued_requests.unwrap_or(
            self.max_batch_size
                .saturating_mul(DEFAULT_QUEUED_PER_BATCH_SLOT),
        );
        self.max_batch_size.saturating_add(queued)
    }

    /// Engine settings from the serving configuration (trtllm-serve flag / YAML names).
    pub fn from_llm_args(args: &llmapi_common::args::LlmArgs) -> Self {
        use llmapi_common::args::{CapacitySchedulerPolicy, KvCacheDtype};
        let kv = &args.kv_cache_config;
        Self {
            max_batch_size: args.max_batch_size as usize,
            max_num_tokens: args.max_num_tokens as usize,
            max_seq_len: args.max_seq_len.map(|n| n as usize),
            tokens_per_block: kv.tokens_per_block as usize,
            kv_dtype: match kv.dtype {
                KvCacheDtype::Auto => KvDtype::Auto,
                KvCacheDtype::Bf16 => KvDtype::Bf16,
                KvCacheDtype::Fp8 => KvDtype::Fp8,
                KvCacheDtype::Float32 => KvDtype::Float32,
            },
            dtype: args.dtype,
            kv_max_tokens: kv.max_tokens.map(|n| n as usize),
            kv_memory_fraction: kv.free_gpu_memory_fraction,
            enable_block_reuse: kv.enable_block_reuse,
            enable_chunked_prefill: args.enable_chunked_prefill,
            prefill_token_budget: args
                .scheduler_config
                .prefill_token_budget
                .map(|n| n as usize),
            capacity_policy: match args.scheduler_config.capacity_scheduler_policy {
                CapacitySchedulerPolicy::GuaranteedNoEvict => CapacityPolicy::GuaranteedNoEvict,
                CapacitySchedulerPolicy::MaxUtilization => CapacityPolicy::MaxUtilization,
            },
            max_queued_requests: args
                .scheduler_config
                .max_queued_requests
                .map(|n| n as usize),
            print_iter_log: args.print_iter_log,
            threads: None,
            model_name: args.served_model_name.clone(),
            backend: args.backend,
            cuda_graph_config: args.cuda_graph_config.clone(),
            gpu_slot: 0,
            stall_timeout: (args.engine_stall_timeout > 0)
                .then(|| std::time::Duration::from_secs(u64::from(args.engine_stall_timeout))),
            replicas_on_node: 1,
            memory_source: crate::kv::host_memory::MemorySource::default(),
            speculative: args.speculative_config.clone(),
        }
    }
}
