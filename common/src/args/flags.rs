//! The `serve` command line: one table of flags, each mapped to an `LlmArgs` key path.
//! clap's command is built from this table; defaults shown in `--help` come from
//! `LlmArgs::default()`, so no default is written twice.

use clap::{Arg, ArgAction, Command};
use serde_json::Value;

use super::LlmArgs;
use super::sources::lookup;

/// How a flag's value is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// Free text.
    Text,
    /// A non-negative integer.
    Int,
    /// A decimal number.
    Float,
    /// A switch without a value: present means true.
    Switch,
}

/// One `serve` flag.
#[derive(Debug, Clone, Copy)]
pub struct CliFlag {
    /// The flag's name without dashes (trtllm-serve's spelling).
    pub name: &'static str,
    /// Other accepted spellings.
    pub aliases: &'static [&'static str],
    /// The `LlmArgs` key path it sets.
    pub key: &'static str,
    /// How its value is parsed.
    pub kind: FlagKind,
    /// `--help` text.
    pub help: &'static str,
}

const fn flag(
    name: &'static str,
    aliases: &'static [&'static str],
    key: &'static str,
    kind: FlagKind,
    help: &'static str,
) -> CliFlag {
    CliFlag {
        name,
        aliases,
        key,
        kind,
        help,
    }
}

use FlagKind::{Float, Int, Switch, Text};

/// Every `serve` flag that sets a configuration key, in `--help` order.
#[rustfmt::skip]
pub const CLI_FLAGS: &[CliFlag] = &[
    flag("tokenizer", &[], "tokenizer", Text, "Tokenizer directory or tokenizer.json (default: the model directory)"),
    flag("host", &[], "host", Text, "Address the HTTP server binds"),
    flag("port", &[], "port", Int, "Port of the HTTP server"),
    flag("backend", &[], "backend", Text, "auto | cpu | cuda (auto picks cuda when a GPU is visible; trtllm-serve's `pytorch` is read as auto)"),
    flag("dtype", &[], "dtype", Text, "auto | float32 | bfloat16 | float16: arithmetic of the matrix products (CPU: auto is f32; bfloat16 rounds activations to bf16 and accumulates in f32; float16 is refused)"),
    flag("log_level", &[], "log_level", Text, "trace | debug | verbose | info | warning | error | internal_error"),
    flag("log_format", &[], "log_format", Text, "text | json: json writes one JSON object per line with request_id and trace_id, for log shippers (default: LLMAPI_LOG_FORMAT, else text; text has colours only on a terminal)"),
    flag("max_beam_width", &[], "max_beam_width", Int, "Beam width; only 1 is supported (no beam search)"),
    flag("max_batch_size", &[], "max_batch_size", Int, "Most sequences in one engine step"),
    flag("max_num_tokens", &[], "max_num_tokens", Int, "Most tokens (prefill + decode) in one engine step"),
    flag("max_seq_len", &[], "max_seq_len", Int, "Longest prompt + output (default: max_position_embeddings of config.json)"),
    flag("tp_size", &["tensor_parallel_size"], "tensor_parallel_size", Int, "Tensor-parallel ranks per model replica"),
    flag("pp_size", &["pipeline_parallel_size"], "pipeline_parallel_size", Int, "Pipeline-parallel stages; only 1 is supported"),
    flag("ep_size", &["moe_expert_parallel_size"], "moe_expert_parallel_size", Int, "Expert-parallel ranks for MoE layers (default: tp_size)"),
    flag("gpus_per_node", &[], "gpus_per_node", Int, "GPUs per node (default: all visible)"),
    flag("kv_cache_free_gpu_memory_fraction", &["free_gpu_memory_fraction"], "kv_cache_config.free_gpu_memory_fraction", Float, "Fraction of the memory free after the model loads for the KV cache (CPU: this replica's share of host memory within its cgroup limit)"),
    flag("num_postprocess_workers", &[], "num_postprocess_workers", Int, "Accepted for compatibility; the router detokenizes on its own threads"),
    flag("trust_remote_code", &[], "trust_remote_code", Switch, "Accepted for compatibility; llmapi never executes code shipped with a model"),
    flag("served_model_name", &[], "served_model_name", Text, "Model name in /v1/models and requests (default: the model directory's name)"),
    flag("enable_chunked_prefill", &[], "enable_chunked_prefill", Switch, "Split long prefills into chunks of max_num_tokens"),
    flag("chat_template", &[], "chat_template", Text, "Jinja chat template file overriding the model's (chat_template.jinja, else tokenizer_config.json's, else chat_template.json)"),
    flag("generation_config", &[], "generation_config", Text, "auto | vllm: auto fills the sampling fields a request leaves unset (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens) from the model's generation_config.json; vllm uses the server's neutral defaults"),
    flag("otlp_traces_endpoint", &[], "otlp_traces_endpoint", Text, "OTLP gRPC endpoint to export traces to (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT)"),
    flag("max_inflight_requests", &["max_concurrent_requests"], "max_inflight_requests", Int, "Worker requests (prompts x n each) the router has in flight; past it new requests wait in its queue, then get 429 (0: the workers' capacity)"),
    flag("queue_size", &[], "queue_size", Int, "Requests the router lets wait for in-flight room; past it new ones get 429 at once (default 128)"),
    flag("queue_timeout_secs", &[], "queue_timeout_secs", Int, "Seconds a request waits in the router's queue before it gets 429 (default 30)"),
    flag("engine_stall_timeout", &[], "engine_stall_timeout", Int, "Seconds one engine step may take while requests are in flight before the worker reports itself unhealthy (0: never)"),
];

/// The `serve` subcommand: MODEL, every flag of `CLI_FLAGS`, and the source options
/// `--extra_llm_api_options/--config`, `--set` and `--print_config`.
pub fn serve_command() -> Command {
    let defaults = serde_json::to_value(LlmArgs::default()).unwrap_or(Value::Null);
    let mut cmd = Command::new("serve")
        .about("Serve a model over the OpenAI API (a worker and an embedded router)")
        .arg(
            Arg::new("model")
                .value_name("MODEL")
                .help("Local Hugging Face model directory; omitted: the built-in demo model"),
        );
    for f in CLI_FLAGS {
        let mut arg = Arg::new(f.name)
            .long(f.name)
            .help(f.help)
            .visible_aliases(f.aliases.iter().copied());
        arg = match f.kind {
            Switch => arg.action(ArgAction::SetTrue),
            _ => {
                let shown = match lookup(&defaults, f.key) {
                    Some(Value::Null) | None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(v) => Some(v.to_string()),
                };
                let value_name = match f.kind {
                    Int => "N",
                    Float => "FRACTION",
                    _ => "VALUE",
                };
                let arg = arg.value_name(value_name).action(ArgAction::Set);
                match shown {
                    Some(d) => arg.help(format!("{} [default: {d}]", f.help)),
                    None => arg,
                }
            }
        };
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new("extra_llm_api_options")
            .long("extra_llm_api_options")
            .visible_alias("config")
            .value_name("YAML")
            .help("YAML file of LlmArgs keys; overrides the flags above, merging nested sections key by key"),
    )
    .arg(
        Arg::new("set")
            .long("set")
            .value_name("KEY.PATH=VALUE")
            .action(ArgAction::Append)
            .help("Set one key, e.g. --set kv_cache_config.dtype=fp8 (repeatable; overrides the YAML)"),
    )
    .arg(
        Arg::new("print_config")
            .long("print_config")
            .action(ArgAction::SetTrue)
            .help("Print the effective configuration as YAML and exit"),
    )
}
