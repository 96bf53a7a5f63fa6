//! Command-line flags of the standalone `llmapi-router` (router-only settings; model and
//! engine settings live in `LlmArgs`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use llmapi_common::generation_config::GenerationConfigMode;
use llmapi_common::telemetry::LogArgs;

use crate::access::AccessArgs;
use crate::deadline::DeadlineArgs;
use crate::migrate::MigrationArgs;
use crate::policy::{DEFAULT_KV_OVERLAP_SCORE_WEIGHT, ImbalanceThresholds, RoutingPolicy};
use crate::pool::HealthPolicy;
use crate::state::RouterConfig;
use crate::tls::TlsArgs;

/// `llmapi-router MODEL --worker_urls URL,...`: an OpenAI router in front of worker groups.
#[derive(Debug, Clone, Parser)]
#[command(name = "llmapi-router", version, about, rename_all = "snake_case")]
pub struct RouterArgs {
    /// Model directory (for tokenizer.json and the chat template); also an accepted `model` name.
    pub model: PathBuf,
    /// Tokenizer directory or tokenizer.json (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Name served at /v1/models (default: the directory's last component).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Host to listen on.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Worker group leaders' gRPC URLs, comma separated (more can register via POST /workers).
    #[arg(long, value_delimiter = ',')]
    pub worker_urls: Vec<String>,
    /// Follow a DNS name's address records as the worker list: `dns:NAME:PORT` (or
    /// `dns:https://NAME:PORT`), e.g. a Kubernetes headless service. Addresses that appear
    /// join the pool, addresses that leave it are removed; a failed lookup changes nothing.
    #[arg(long, value_name = "dns:NAME:PORT")]
    pub worker_discovery: Option<crate::discovery::DnsSource>,
    /// DNS server (`HOST:PORT`, e.g. Consul's 127.0.0.1:8600) for --worker_discovery
    /// (default: the system's, from /etc/resolv.conf).
    #[arg(long, value_name = "ADDR:PORT", requires = "worker_discovery")]
    pub worker_discovery_nameserver: Option<std::net::SocketAddr>,
    /// Seconds between --worker_discovery lookups.
    #[arg(long, default_value_t = crate::discovery::DEFAULT_DISCOVERY_INTERVAL_S, value_name = "SECONDS")]
    pub worker_discovery_interval_s: u64,
    /// How a worker is chosen per request.
    #[arg(long, value_enum, default_value = "round_robin")]
    pub routing_policy: RoutingPolicy,
    /// kv_cache_aware: route by load once busiest minus idlest load exceeds this...
    #[arg(long, default_value_t = 8)]
    pub balance_abs_threshold: usize,
    /// ...and busiest load exceeds this many times the idlest.
    #[arg(long, default_value_t = 1.5)]
    pub balance_rel_threshold: f64,
    /// kv_cache_aware: cost of a prompt block a worker must prefill, against 1 for each
    /// block of the requests in flight there (Dynamo's --kv-overlap-score-weight). Higher
    /// favours cache hits (TTFT), lower favours spreading load.
    #[arg(long, default_value_t = DEFAULT_KV_OVERLAP_SCORE_WEIGHT, value_parser = non_negative_weight)]
    pub kv_overlap_score_weight: f64,
    /// Keys, tokens, the metrics listener and registration limits.
    #[command(flatten)]
    pub access: AccessArgs,
    /// `--log_level` and `--log_format`.
    #[command(flatten)]
    pub log: LogArgs,
    /// HTTPS on the front, TLS to the workers.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// File holding the worker token: the job secret every call to a worker must carry
    /// (`LLMAPI_JOB_TOKEN` of the workers). Must not be readable by group or others. Without
    /// --tls_* files it also derives the job's CA, which reaches a job's https:// workers.
    #[arg(long, value_name = "FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// The worker token itself, from the environment only (a command line is visible in `ps`).
    #[arg(skip = std::env::var("LLMAPI_WORKER_TOKEN").ok().filter(|t| !t.is_empty()))]
    pub worker_token: Option<String>,
    /// Jinja chat template (file or inline) overriding the model's own (chat_template.jinja,
    /// else tokenizer_config.json's, else chat_template.json).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// auto: sampling fields a request leaves unset (temperature, top_p, top_k, min_p,
    /// repetition_penalty, max_tokens) come from MODEL/generation_config.json; vllm: the
    /// server's neutral defaults (vLLM's --generation-config).
    #[arg(long, value_enum, default_value = "auto")]
    pub generation_config: GenerationConfigMode,
    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Worker requests in flight (a request counts prompts x n) past which new requests wait
    /// in the queue (0: the routable workers' capacity, max_batch_size + max_queued_requests
    /// summed).
    #[arg(long, visible_alias = "max_concurrent_requests", default_value_t = 0)]
    pub max_inflight_requests: usize,
    /// Requests that may wait for in-flight room; past it new ones get 429 with Retry-After.
    #[arg(long, visible_alias = "queue_size", default_value_t = crate::state::DEFAULT_MAX_QUEUED_REQUESTS)]
    pub max_queued_requests: usize,
    /// Seconds a request waits in the queue before it gets 429 with Retry-After.
    #[arg(long, visible_alias = "queue_timeout_secs", default_value_t = crate::state::DEFAULT_QUEUE_TIMEOUT.as_secs())]
    pub queue_timeout_s: u64,
    /// Most prompts in one completions request (larger lists get 400).
    #[arg(long, default_value_t = crate::state::DEFAULT_MAX_PROMPTS_PER_REQUEST)]
    pub max_prompts_per_request: usize,
    /// Most prompt tokens one request sends to workers, all prompts times n (more gets 400).
    #[arg(long, default_value_t = crate::state::DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST)]
    pub max_prompt_tokens_per_request: usize,
    /// Threads tokenizing prompts and rendering chat templates at once (default: the cores).
    #[arg(long)]
    pub tokenizer_pool_size: Option<usize>,
    /// Other workers tried when one fails before the first token.
    #[arg(long, default_value_t = 2)]
    pub max_retries: usize,
    /// `--max_migrations`: moving a choice whose worker fails after the first token.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Milliseconds between health checks.
    #[arg(long, default_value_t = 2000)]
    pub health_check_interval_ms: u64,
    /// Consecutive failed checks before a worker is ejected.
    #[arg(long, default_value_t = 3)]
    pub eject_after_failures: u32,
    /// Consecutive good checks before an ejected worker returns.
    #[arg(long, default_value_t = 2)]
    pub readmit_after_successes: u32,
    /// Consecutive failed requests that open a worker's circuit breaker.
    #[arg(long, default_value_t = 3)]
    pub breaker_failures: u32,
    /// Seconds an open circuit breaker keeps a worker out.
    #[arg(long, default_value_t = 10)]
    pub breaker_cooldown_s: u64,
    /// Seconds SIGTERM waits for in-flight requests.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// OTLP/gRPC collector (`http://host:4317` or `host:4317`) that receives the spans of each
    /// request (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT)
    #[arg(long)]
    pub otlp_traces_endpoint: Option<String>,
    /// Seconds of silence after which a stream gets an SSE comment line, for proxies that cut
    /// idle connections (0: none, as trtllm-serve; benchmark_serving.py fails on comments).
    #[arg(long, default_value_t = 0)]
    pub sse_keepalive_s: u64,
    /// `--reasoning_parser`.
    #[command(flatten)]
    pub reasoning: crate::reasoning::ReasoningArgs,
    /// `--tool_parser`.
    #[command(flatten)]
    pub tools: crate::tools::ToolArgs,
    /// `--responses_store_max` and `--responses_store_max_bytes`.
    #[command(flatten)]
    pub responses: crate::responses::ResponsesArgs,
    /// Connection count and timeouts of the HTTP front.
    #[command(flatten)]
    pub connections: crate::front::ConnectionArgs,
    /// `--request_timeout` and `--first_token_timeout`.
    #[command(flatten)]
    pub deadline: DeadlineArgs,
}

impl RouterArgs {
    /// The worker token: `--worker_token_file`, else `LLMAPI_WORKER_TOKEN`, else none.
    pub fn worker_token(&self) -> anyhow::Result<Option<String>> {
        match &self.worker_token_file {
            Some(path) => llmapi_common::secret_file::read_secret_file(path)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--worker_token_file: {e}")),
            None => Ok(self.worker_token.clone()),
        }
    }

    /// How the router reaches `https://` workers: the `--tls_*` files when given, else (with a
    /// worker token) a client certificate of the job CA that token derives, which is what
    /// the workers of a multi-node `llmapi-launch` job use; else none.
    pub fn worker_tls(
        &self,
        worker_token: Option<&str>,
    ) -> anyhow::Result<Option<llmapi_proto::tls::TransportTls>> {
        let files = self.tls.files();
        if !files.is_empty() {
            return Ok(Some(files.load()?));
        }
        match worker_token {
            Some(token) => Ok(Some(
                llmapi_proto::tls::JobCa::derive(token.as_bytes())?.transport(&[])?,
            )),
            None => Ok(None),
        }
    }

    /// The router configuration these flags describe, without the access settings (secrets
    /// need the command line's matches: `AccessArgs::apply`).
    pub fn config(&self) -> RouterConfig {
        let path = self.model.to_string_lossy().into_owned();
        let last = llmapi_common::model_dir::default_model_name(&self.model);
        RouterConfig {
            served_model_name: self.served_model_name.clone().unwrap_or(last),
            model_path: path,
            routing_policy: self.routing_policy,
            imbalance: ImbalanceThresholds {
                abs: self.balance_abs_threshold,
                rel: self.balance_rel_threshold,
            },
            kv_overlap_score_weight: self.kv_overlap_score_weight,
            worker_token: self.worker_token.clone(),
            max_body_bytes: self.max_body_bytes,
            max_inflight_requests: self.max_inflight_requests,
            max_queued_requests: self.max_queued_requests,
            queue_timeout: Duration::from_secs(self.queue_timeout_s),
            max_prompts_per_request: self.max_prompts_per_request.max(1),
            max_prompt_tokens_per_request: self.max_prompt_tokens_per_request.max(1),
            tokenizer_pool_size: self
                .tokenizer_pool_size
                .unwrap_or_else(crate::state::default_tokenizer_pool_size)
                .max(1),
            max_retries: self.max_retries,
            max_migrations: self.migration.max_migrations,
            health: HealthPolicy {
                interval: Duration::from_millis(self.health_check_interval_ms.max(10)),
                eject_after: self.eject_after_failures.max(1),
                readmit_after: self.readmit_after_successes.max(1),
                breaker_failures: self.breaker_failures.max(1),
                breaker_cooldown: Duration::from_secs(self.breaker_cooldown_s),
                ..HealthPolicy::default()
            },
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            sse_keepalive: (self.sse_keepalive_s > 0)
                .then(|| Duration::from_secs(self.sse_keepalive_s)),
            reasoning_parser: self.reasoning.reasoning_parser,
            tool_parser: self.tools.tool_parser,
            responses_store: self.responses.limits(),
            front: self.connections.limits(),
            deadlines: self.deadline.deadlines(),
            ..RouterConfig::default()
        }
    }
}

/// Parses `--kv_overlap_score_weight`: a finite number of at least 0.
fn non_negative_weight(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(w),
        _ => Err(format!(
            "{v:?} is not a weight; give a number of at least 0 (1.0 weighs a block to prefill like a block in flight)"
        )),
    }
}
