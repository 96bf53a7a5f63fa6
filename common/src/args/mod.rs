//! `LlmArgs`: the one typed configuration of a serving process.
//!
//! Field names are the YAML keys of `--extra_llm_api_options` (TensorRT-LLM's TorchLlmArgs
//! names) and the defaults here are the only copy of each default. Sources in order of
//! precedence, lowest first: defaults < CLI flags (`flags`) < YAML < `--set` (`sources`).

mod flags;
mod sources;
mod speculative;
mod validate;

pub use flags::{CLI_FLAGS, CliFlag, FlagKind, serve_command};
pub use sources::{ArgsError, Notice, NoticeLevel, Resolved, resolve};
pub use speculative::{SUPPORTED_DECODING_TYPES, SpeculativeConfig};
pub use validate::cuda_graph_batch_sizes;

use serde::{Deserialize, Serialize};

pub use crate::generation_config::GenerationConfigMode;
pub use crate::telemetry::LogFormat;

/// Which compute backend runs the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// CUDA when a GPU is visible, else CPU. trtllm-serve's `pytorch` means this.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
    /// trtllm-serve's name for its default backend; resolved to `auto` with a note.
    Pytorch,
}

/// Arithmetic of the model's matrix products (`dtype`, as TensorRT-LLM's LlmArgs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    /// The backend's default: f32 arithmetic on CPU.
    Auto,
    /// f32 products (CPU: the same as auto).
    #[serde(alias = "fp32", alias = "f32", alias = "float")]
    Float32,
    /// bf16 inputs, f32 accumulation.
    #[serde(alias = "bf16")]
    Bfloat16,
    /// f16; refused by the CPU backend.
    #[serde(alias = "fp16", alias = "f16", alias = "half")]
    Float16,
}

/// KV cache element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// The model's own dtype (bf16 for bf16 checkpoints; f32 on CPU for f32 ones).
    Auto,
    /// bfloat16.
    Bf16,
    /// float8 e4m3 with a per-block scale.
    Fp8,
    /// float32.
    Float32,
}

/// How the scheduler reserves KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CapacitySchedulerPolicy {
    /// Reserve every block a request may need at admission; never preempt.
    GuaranteedNoEvict,
    /// Admit greedily; preempt the newest request (recompute) when blocks run out.
    MaxUtilization,
}

/// Order in which prefill chunks of several requests are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ContextChunkingPolicy {
    /// Finish the oldest request's prefill first.
    FirstComeFirstServed,
    /// Advance every prefilling request by a chunk per step.
    EqualProgress,
}

/// `kv_cache_config`: the paged KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvCacheConfig {
    /// Element type of cached keys and values.
    pub dtype: KvCacheDtype,
    /// Fraction of the memory free after the model loads (weights and workspaces) given to the
    /// KV cache: free GPU memory, or on the CPU this replica's share of host memory.
    pub free_gpu_memory_fraction: f64,
    /// Upper bound on cached tokens; the smaller of this and the memory fraction wins.
    pub max_tokens: Option<u64>,
    /// Reuse cached blocks of a shared prompt prefix across requests.
    pub enable_block_reuse: bool,
    /// Tokens per KV block.
    pub tokens_per_block: u32,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            dtype: KvCacheDtype::Auto,
            free_gpu_memory_fraction: 0.9,
            max_tokens: None,
            enable_block_reuse: true,
            tokens_per_block: 32,
        }
    }
}

/// `cuda_graph_config`: decode CUDA graphs; `null` disables them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CudaGraphConfig {
    /// Pad a batch up to the next captured batch size.
    pub enable_padding: bool,
    /// Largest captured batch size (0: from batch_sizes, else 128).
    pub max_batch_size: u32,
    /// Batch sizes to capture; generated from max_batch_size when unset.
    pub batch_sizes: Option<Vec<u32>>,
}

/// `moe_config`: mixture-of-experts execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MoeConfig {
    /// MoE kernel family; llmapi has one per device and maps TensorRT-LLM's names onto it.
    pub backend: String,
    /// Token chunk size for MoE layers (unset: max_num_tokens).
    pub max_num_tokens: Option<u32>,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            max_num_tokens: None,
        }
    }
}

/// `scheduler_config`: admission and chunking policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How KV capacity is reserved.
    pub capacity_scheduler_policy: CapacitySchedulerPolicy,
    /// How prefill chunks are ordered.
    pub context_chunking_policy: ContextChunkingPolicy,
    /// Most prompt tokens one engine step prefills (unset: the backend's default, 512 on
    /// the CPU backend, `max_num_tokens` elsewhere); decode tokens do not count.
    pub prefill_token_budget: Option<u32>,
    /// Most requests a worker keeps waiting beyond its running batch (`max_batch_size`);
    /// past it new requests are refused with RESOURCE_EXHAUSTED, which the router answers
    /// with 429 and Retry-After (unset: 4 x max_batch_size).
    pub max_queued_requests: Option<u32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            capacity_scheduler_policy: CapacitySchedulerPolicy::GuaranteedNoEvict,
            context_chunking_policy: ContextChunkingPolicy::FirstComeFirstServed,
            prefill_token_budget: None,
            max_queued_requests: None,
        }
    }
}

/// The whole configuration of `llmapi-launch serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmArgs {
    /// Model directory (Hugging Face layout); unset serves the built-in demo model.
    pub model: Option<String>,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    pub tokenizer: Option<String>,
    /// Address the HTTP server binds.
    pub host: String,
    /// Port of the HTTP server.
    pub port: u16,
    /// Compute backend: auto, cpu or cuda (`pytorch` is read as auto).
    pub backend: Backend,
    /// Arithmetic of the matrix products: auto, float32, bfloat16 or float16.
    pub dtype: ModelDtype,
    /// Log level: trace, debug, verbose, info, warning, error, internal_error.
    pub log_level: String,
    /// Log line format: text or json (null: LLMAPI_LOG_FORMAT, else text).
    pub log_format: Option<LogFormat>,
    /// Beam width; only 1 (no beam search) is supported.
    pub max_beam_width: u32,
    /// Most sequences in one engine step.
    pub max_batch_size: u32,
    /// Most tokens (prefill + decode) in one engine step.
    pub max_num_tokens: u32,
    /// Longest prompt + output; unset: max_position_embeddings from config.json.
    pub max_seq_len: Option<u32>,
    /// Tensor-parallel ranks per model replica.
    pub tensor_parallel_size: u32,
    /// Pipeline-parallel stages; only 1 is supported.
    pub pipeline_parallel_size: u32,
    /// Expert-parallel ranks for MoE layers (unset: tensor_parallel_size).
    pub moe_expert_parallel_size: Option<u32>,
    /// GPUs per node (unset: all visible).
    pub gpus_per_node: Option<u32>,
    /// Detokenization workers; llmapi detokenizes on the router's threads.
    pub num_postprocess_workers: u32,
    /// Accepted for compatibility; llmapi never executes model code.
    pub trust_remote_code: bool,
    /// Name served in /v1/models (default: the model directory's name).
    pub served_model_name: Option<String>,
    /// Split long prefills into chunks of max_num_tokens.
    pub enable_chunked_prefill: bool,
    /// Jinja chat template file overriding the model's own (chat_template.jinja, else
    /// tokenizer_config.json's, else chat_template.json).
    pub chat_template: Option<String>,
    /// Where requests' unset sampling fields come from: `auto`, the model's
    /// generation_config.json (vLLM's `--generation-config`), or `vllm`, the server's own.
    pub generation_config: GenerationConfigMode,
    /// OTLP gRPC endpoint for traces.
    pub otlp_traces_endpoint: Option<String>,
    /// Worker requests (prompts x n per request) the embedded router has in flight at once;
    /// past it new requests wait in its queue (0: the worker's max_batch_size +
    /// max_queued_requests).
    pub max_inflight_requests: u32,
    /// Requests the embedded router lets wait for in-flight room; past it 429 at once
    /// (the sglang router's name; null: the router's default, 128).
    pub queue_size: Option<u32>,
    /// Seconds a request waits in the embedded router's queue before 429 (null: 30).
    pub queue_timeout_secs: Option<u64>,
    /// KV cache settings.
    pub kv_cache_config: KvCacheConfig,
    /// CUDA graph settings; null disables graphs.
    pub cuda_graph_config: Option<CudaGraphConfig>,
    /// MoE settings.
    pub moe_config: MoeConfig,
    /// Attention kernel family; llmapi maps TensorRT-LLM's names onto its own kernels.
    pub attn_backend: String,
    /// Structured-output engine (trtllm-serve's YAML key): `llguidance`, or `xgrammar`,
    /// which llmapi serves with llguidance too (same request fields); null: llguidance.
    pub guided_decoding_backend: Option<String>,
    /// Data-parallel attention across TP ranks.
    pub enable_attention_dp: bool,
    /// Print one line per engine iteration.
    pub print_iter_log: bool,
    /// Keep per-iteration statistics for /metrics and iteration stats.
    pub enable_iter_perf_stats: bool,
    /// Scheduler policies.
    pub scheduler_config: SchedulerConfig,
    /// Tokens per streamed response chunk (> 0).
    pub stream_interval: u32,
    /// Keep per-request timing breakdowns for /perf_metrics.
    pub return_perf_metrics: bool,
    /// How many requests /perf_metrics keeps (0: none).
    pub perf_metrics_max_requests: u32,
    /// Seconds the engine may spend in one step while requests are in flight before the
    /// worker reports itself unhealthy (0: never).
    pub engine_stall_timeout: u32,
    /// Speculative decoding (`decoding_type: NGram`); null: off.
    pub speculative_config: Option<SpeculativeConfig>,
}

impl Default for LlmArgs {
    fn default() -> Self {
        Self {
            model: None,
            tokenizer: None,
            host: "localhost".into(),
            port: 8000,
            backend: Backend::Auto,
            dtype: ModelDtype::Auto,
            log_level: "info".into(),
            log_format: None,
            max_beam_width: 1,
            max_batch_size: 2048,
            max_num_tokens: 8192,
            max_seq_len: None,
            tensor_parallel_size: 1,
            pipeline_parallel_size: 1,
            moe_expert_parallel_size: None,
            gpus_per_node: None,
            num_postprocess_workers: 0,
            trust_remote_code: false,
            served_model_name: None,
            enable_chunked_prefill: false,
            chat_template: None,
            generation_config: GenerationConfigMode::Auto,
            otlp_traces_endpoint: None,
            max_inflight_requests: 0,
            queue_size: None,
            queue_timeout_secs: None,
            kv_cache_config: KvCacheConfig::default(),
            cuda_graph_config: Some(CudaGraphConfig::default()),
            moe_config: MoeConfig::default(),
            attn_backend: "auto".into(),
            guided_decoding_backend: None,
            enable_attention_dp: false,
            print_iter_log: false,
            enable_iter_perf_stats: false,
            scheduler_config: SchedulerConfig::default(),
            stream_interval: 1,
            return_perf_metrics: false,
            perf_metrics_max_requests: 0,
            engine_stall_timeout: 300,
            speculative_config: None,
        }
    }
}

impl LlmArgs {
    /// The effective configuration as YAML, as `--print_config` shows it.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Sets max_seq_len from the model when unset, or checks it against the model's limit.
    pub fn resolve_max_seq_len(
        &mut self,
        max_position_embeddings: Option<usize>,
    ) -> Result<(), ArgsError> {
        match (self.max_seq_len, max_position_embeddings) {
            (None, Some(m)) => self.max_seq_len = Some(m as u32),
            (None, None) => {
                return Err(ArgsError::Invalid(
                    "config.json has no max_position_embeddings; pass --max_seq_len".into(),
                ));
            }
            (Some(s), Some(m)) if s as usize > m => {
                return Err(ArgsError::Invalid(format!(
                    "--max_seq_len {s} exceeds the model's max_position_embeddings {m}; lower --max_seq_len"
                )));
            }
            _ => {}
        }
        Ok(())
    }
}
