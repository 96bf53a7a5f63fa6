//! Legacy spellings, and the checks that a merged configuration can be honoured by this build.

use serde_json::{Map, Value};

use super::sources::{ArgsError, Notice, display, lookup, set};
use crate::telemetry::LOG_LEVELS;

use super::{Backend, CapacitySchedulerPolicy, ContextChunkingPolicy, LlmArgs, ModelDtype};

/// `pytorch_backend_config.*` keys of older TensorRT-LLM releases and where they live now.
const PYTORCH_BACKEND_MAP: &[(&str, &str)] = &[
    (
        "cuda_graph_padding_enabled",
        "cuda_graph_config.enable_padding",
    ),
    ("cuda_graph_batch_sizes", "cuda_graph_config.batch_sizes"),
    (
        "cuda_graph_max_batch_size",
        "cuda_graph_config.max_batch_size",
    ),
    ("kv_cache_dtype", "kv_cache_config.dtype"),
    ("attn_backend", "attn_backend"),
    ("attention_backend", "attn_backend"),
    ("moe_backend", "moe_config.backend"),
    ("moe_max_num_tokens", "moe_config.max_num_tokens"),
    ("enable_iter_perf_stats", "enable_iter_perf_stats"),
    ("print_iter_log", "print_iter_log"),
];

/// `pytorch_backend_config.*` keys that tune TensorRT-LLM internals llmapi does not have.
const PYTORCH_BACKEND_IGNORED: &[&str] = &[
    "enable_overlap_scheduler",
    "torch_compile_enabled",
    "torch_compile_fullgraph",
    "torch_compile_inductor_enabled",
    "torch_compile_piecewise_cuda_graph",
    "enable_layerwise_nvtx_marker",
    "mixed_sampler",
    "load_format",
];

/// Rewrites legacy spellings in a source document into current keys, with a warning each.
pub(crate) fn normalize_legacy(
    doc: &mut Value,
    source: &str,
    notices: &mut Vec<Notice>,
) -> Result<(), ArgsError> {
    super::speculative::refuse_unsupported(doc, source)?;
    let Value::Object(map) = doc else {
        return Ok(());
    };
    let mut moves: Vec<(String, String, Value)> = Vec::new();
    if let Some(v) = map.remove("kv_cache_dtype") {
        moves.push(("kv_cache_dtype".into(), "kv_cache_config.dtype".into(), v));
    }
    if let Some(v) = map.remove("attention_backend") {
        moves.push(("attention_backend".into(), "attn_backend".into(), v));
    }
    if let Some(Value::Object(cg)) = map.get_mut("cuda_graph_config")
        && let Some(v) = cg.remove("padding_enabled")
    {
        moves.push((
            "cuda_graph_config.padding_enabled".into(),
            "cuda_graph_config.enable_padding".into(),
            v,
        ));
    }
    if let Some(pbc) = map.remove("pytorch_backend_config") {
        let Value::Object(pbc) = pbc else {
            return Err(ArgsError::Invalid(format!(
                "{source}: pytorch_backend_config must be a mapping"
            )));
        };
        for (k, v) in pbc {
            let old = format!("pytorch_backend_config.{k}");
            if k == "use_cuda_graph" {
                if v == Value::Bool(false) {
                    moves.push((old, "cuda_graph_config".into(), Value::Null));
                } else {
                    moves.push((old, "cuda_graph_config".into(), Value::Object(Map::new())));
                }
            } else if let Some((_, new)) = PYTORCH_BACKEND_MAP.iter().find(|(o, _)| *o == k) {
                moves.push((old, (*new).into(), v));
            } else if PYTORCH_BACKEND_IGNORED.contains(&k.as_str()) {
                notices.push(Notice::warn(format!(
                    "{source}: {old} is ignored: llmapi has no such setting"
                )));
            } else {
                let known: Vec<&str> = PYTORCH_BACKEND_MAP
                    .iter()
                    .map(|(o, _)| *o)
                    .chain(["use_cuda_graph"])
                    .collect();
                return Err(ArgsError::Invalid(format!(
                    "{source}: unknown key '{old}'; legacy keys understood here: {}",
                    known.join(", ")
                )));
            }
        }
    }
    for (old, new, v) in moves {
        if let Some(existing) = lookup(doc, &new)
            && *existing != v
            && !(existing.is_object() && v.is_object())
        {
            return Err(ArgsError::Invalid(format!(
                "{source}: {old} = {} contradicts {new} = {}; keep only {new}",
                display(&v),
                display(existing)
            )));
        }
        notices.push(Notice::warn(format!(
            "{source}: '{old}' is a legacy spelling; read as '{new}' (write that instead)"
        )));
        if v.is_object() && lookup(doc, &new).is_some_and(Value::is_object) {
            continue;
        }
        set(doc, &new, v);
    }
    Ok(())
}

/// CUDA graph batch sizes generated from a maximum, as TensorRT-LLM generates them: with
/// padding 1, 2, 4 and multiples of 8 up to 128; without, 1..=31, 32, 64, 128; then powers of
/// two from 256 below the maximum; capped at the maximum, which is always included.
pub fn cuda_graph_batch_sizes(max_batch_size: u32, enable_padding: bool) -> Vec<u32> {
    let mut sizes: Vec<u32> = if enable_padding {
        [1, 2, 4]
            .into_iter()
            .chain((1..=16).map(|i| i * 8))
            .collect()
    } else {
        (1..32).chain([32, 64, 128]).collect()
    };
    let mut p = 256u32;
    while p < max_batch_size {
        sizes.push(p);
        p = p.saturating_mul(2);
    }
    sizes.retain(|&s| s <= max_batch_size);
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.last() != Some(&max_batch_size) {
        sizes.push(max_batch_size);
    }
    sizes
}

const MOE_BACKENDS: &[&str] = &[
    "auto", "CUTLASS", "TRTLLM", "DEEPGEMM", "CUTEDSL", "WIDEEP", "TRITON", "VANILLA",
];
const ATTN_BACKENDS: &[&str] = &[
    "auto",
    "TRTLLM",
    "FLASHINFER",
    "FLASHINFER_STAR_ATTENTION",
    "VANILLA",
];

/// Checks a merged configuration; fills derived values; records fallbacks as warnings.
pub(crate) fn check(a: &mut LlmArgs, notices: &mut Vec<Notice>) -> Result<(), ArgsError> {
    let invalid = |m: String| Err(ArgsError::Invalid(m));
    if a.backend == Backend::Pytorch {
        notices.push(Notice::info(
            "--backend pytorch is trtllm-serve's default backend; llmapi reads it as auto",
        ));
        a.backend = Backend::Auto;
    }
    if !LOG_LEVELS.contains(&a.log_level.as_str()) {
        return invalid(format!(
            "--log_level {}: expected one of {}",
            a.log_level,
            LOG_LEVELS.join(", ")
        ));
    }
    if a.dtype == ModelDtype::Float16 && a.backend == Backend::Cpu {
        return invalid(
            "--dtype float16: the CPU backend multiplies in float32 or bfloat16; use --dtype auto (f32) or --dtype bfloat16".into(),
        );
    }
    if a.max_beam_width != 1 {
        return invalid(format!(
            "--max_beam_width {}: beam search is not implemented; use --max_beam_width 1",
            a.max_beam_width
        ));
    }
    if a.pipeline_parallel_size != 1 {
        return invalid(format!(
            "--pp_size {}: pipeline parallelism is not supported; use --tp_size (tensor parallelism, across nodes too) and replicas instead",
            a.pipeline_parallel_size
        ));
    }
    for (name, v) in [
        ("--max_batch_size", a.max_batch_size),
        ("--max_num_tokens", a.max_num_tokens),
        ("--tp_size", a.tensor_parallel_size),
        ("stream_interval", a.stream_interval),
        (
            "kv_cache_config.tokens_per_block",
            a.kv_cache_config.tokens_per_block,
        ),
    ] {
        if v == 0 {
            return invalid(format!("{name} must be greater than 0"));
        }
    }
    if a.max_seq_len == Some(0) {
        return invalid("--max_seq_len must be greater than 0".into());
    }
    if a.scheduler_config.prefill_token_budget == Some(0) {
        return invalid(
            "scheduler_config.prefill_token_budget must be greater than 0 (or null for the backend's default)".into(),
        );
    }
    let tpb = a.kv_cache_config.tokens_per_block;
    if !tpb.is_power_of_two() || tpb > 1024 {
        return invalid(format!(
            "kv_cache_config.tokens_per_block {tpb}: expected a power of two up to 1024 (e.g. 32)"
        ));
    }
    let f = a.kv_cache_config.free_gpu_memory_fraction;
    if !(f > 0.0 && f <= 1.0) {
        return invalid(format!(
            "kv_cache_free_gpu_memory_fraction {f}: expected a fraction in (0, 1], e.g. 0.9"
        ));
    }
    if let Some(ep) = a.moe_expert_parallel_size {
        let tp = a.tensor_parallel_size;
        if ep == 0 || !tp.is_multiple_of(ep) {
            return invalid(format!(
                "--ep_size {ep} must divide --tp_size {tp} (each expert's FFN is split over tp_size / ep_size ranks)"
            ));
        }
    }
    if a.port == 0 {
        notices.push(Notice::info("--port 0: the OS picks a free port"));
    }
    if !MOE_BACKENDS.contains(&a.moe_config.backend.as_str()) {
        return invalid(format!(
            "moe_config.backend {}: expected one of {}",
            a.moe_config.backend,
            MOE_BACKENDS.join(", ")
        ));
    }
    if a.moe_config.backend != "auto" {
        notices.push(Notice::warn(format!(
            "moe_config.backend {}: llmapi has one MoE implementation per device and uses it",
            a.moe_config.backend
        )));
    }
    if !ATTN_BACKENDS.contains(&a.attn_backend.as_str()) {
        return invalid(format!(
            "attn_backend {}: expected one of {}",
            a.attn_backend,
            ATTN_BACKENDS.join(", ")
        ));
    }
    if a.attn_backend != "auto" {
        notices.push(Notice::warn(format!(
            "attn_backend {}: llmapi uses its own paged attention kernels for every name",
            a.attn_backend
        )));
    }
    match a.guided_decoding_backend.as_deref() {
        None | Some("llguidance") => {}
        Some("xgrammar") => notices.push(Notice::info(
            "guided_decoding_backend xgrammar: llmapi enforces structured outputs with llguidance, which reads the same request fields",
        )),
        Some(other) => {
            return invalid(format!(
                "guided_decoding_backend {other}: expected llguidance or xgrammar (both served by llguidance)"
            ));
        }
    }
    if let Some(spec) = &a.speculative_config {
        super::speculative::check(spec)?;
    }
    if a.enable_attention_dp {
        notices.push(Notice::warn(
            "enable_attention_dp: data-parallel attention is not implemented; attention runs tensor-parallel (same results, different speed)",
        ));
    }
    if a.num_postprocess_workers > 0 {
        notices.push(Notice::warn(format!(
            "num_postprocess_workers {}: the router detokenizes on its own async threads; no worker processes are started",
            a.num_postprocess_workers
        )));
    }
    if a.scheduler_config.context_chunking_policy == ContextChunkingPolicy::EqualProgress {
        notices.push(Notice::warn(
            "scheduler_config.context_chunking_policy EQUAL_PROGRESS: chunks are scheduled first come, first served",
        ));
    }
    if a.scheduler_config.capacity_scheduler_policy == CapacitySchedulerPolicy::MaxUtilization
        && a.enable_chunked_prefill
    {
        notices.push(Notice::info(
            "MAX_UTILIZATION with chunked prefill: preempted requests are recomputed",
        ));
    }
    if let Some(cg) = a.cuda_graph_config.as_mut() {
        match cg.batch_sizes.as_mut() {
            Some(sizes) if !sizes.is_empty() => {
                sizes.sort_unstable();
                sizes.dedup();
                let max = *sizes.last().unwrap_or(&0);
                if cg.max_batch_size == 0 {
                    cg.max_batch_size = max;
                } else if cg.max_batch_size != max {
                    return invalid(format!(
                        "cuda_graph_config.max_batch_size {} must equal max(cuda_graph_config.batch_sizes) = {max} when both are set",
                        cg.max_batch_size
                    ));
                }
            }
            _ => {
                if cg.max_batch_size == 0 {
                    cg.max_batch_size = 128;
                }
                cg.batch_sizes = Some(cuda_graph_batch_sizes(cg.max_batch_size, cg.enable_padding));
            }
        }
        if a.backend == Backend::Cpu {
            notices.push(Notice::info(
                "cuda_graph_config applies to the CUDA backend only; the CPU backend ignores it",
            ));
        }
    }
    Ok(())
}
