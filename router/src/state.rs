//! Router configuration and the state shared by every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use llmapi_common::generation_config::SamplingDefaults;
use tokio::sync::watch;

use crate::admission::{Gate, Permit, Refused};
use crate::auth::Secret;
use crate::codec::TextCodec;
use crate::deadline::Deadlines;
use crate::error::ApiError;
use crate::metrics::{AdmissionGauges, Metrics};
use crate::parse::BodyCaps;
use crate::policy::{DEFAULT_KV_OVERLAP_SCORE_WEIGHT, ImbalanceThresholds, Router, RoutingPolicy};
use crate::pool::{HealthPolicy, Pool};
use crate::registration::RegistrationPolicy;

/// Default `--max_queued_requests`: requests waiting for in-flight slots. A waiting request
/// holds its parsed body (up to the prompt caps), so the bound also bounds that memory.
pub const DEFAULT_MAX_QUEUED_REQUESTS: usize = 128;
/// Default `--queue_timeout_s`: long enough to ride out a burst, short enough that a client
/// with a 60 s timeout can still retry elsewhere.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--max_prompts_per_request`: with n up to 16 a request then starts at most 1024
/// worker requests, a few batches of one worker, while OpenAI-style batch clients (which send
/// tens of prompts at a time) are served.
pub const DEFAULT_MAX_PROMPTS_PER_REQUEST: usize = 64;
/// Default `--max_prompt_tokens_per_request`: 1 Mi tokens (64 prompts of 16 Ki tokens), 4 MiB
/// of token ids held per request.
pub const DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST: usize = 1 << 20;
/// Seconds a client refused for overload (queue full, waited too long) is told to wait.
pub const OVERLOAD_RETRY_AFTER_S: u64 = 1;
/// Seconds a client refused while the router drains or has no worker is told to wait.
pub const UNAVAILABLE_RETRY_AFTER_S: u64 = 5;

/// Default `--tokenizer_pool_size`: one thread per core the process may use.
pub fn default_tokenizer_pool_size() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything the router is configured with (built from CLI flags or by the launcher).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The name `/v1/models` lists and requests may use.
    pub served_model_name: String,
    /// The model path as given on the command line (also accepted as `model`).
    pub model_path: String,
    /// Routing policy.
    pub routing_policy: RoutingPolicy,
    /// Load imbalance past which kv_cache_aware routes by load.
    pub imbalance: ImbalanceThresholds,
    /// kv_cache_aware: what a block to prefill costs against a block in flight.
    pub kv_overlap_score_weight: f64,
    /// Bearer key every route but /health requires, if set.
    pub api_key: Option<Secret>,
    /// Bearer key /metrics accepts besides the API key, if set.
    pub metrics_api_key: Option<Secret>,
    /// Bearer token for POST/DELETE /workers; registration is off without it and without
    /// `job_token`.
    pub admin_token: Option<Secret>,
    /// The job secret of a Slurm job's embedded router: its tasks register with it, so POST/
    /// DELETE /workers accept it besides an operator's `admin_token`.
    pub job_token: Option<Secret>,
    /// The secret every call to a worker carries (`authorization: Bearer`): the job secret
    /// the workers were started with. Build the pool with `Pool::new(worker_token)`.
    pub worker_token: Option<String>,
    /// The HTTP front's TLS (`--ssl_certfile` / `--ssl_keyfile`); `None` serves plain HTTP.
    pub https: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Port of a separate /metrics listener on the API's host; `None`: /metrics is served on
    /// the API port.
    pub metrics_port: Option<u16>,
    /// What POST /workers accepts.
    pub registration: RegistrationPolicy,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Worker requests (prompts x n of each admitted request) in flight past which new
    /// requests wait in the queue (0: the routable workers' capacity, the sum of their
    /// max_batch_size + max_queued_requests).
    pub max_inflight_requests: usize,
    /// Requests that may wait for in-flight slots; past it new ones get 429 at once.
    pub max_queued_requests: usize,
    /// How long a request waits in the queue before it gets 429.
    pub queue_timeout: Duration,
    /// Most prompts in one completions request.
    pub max_prompts_per_request: usize,
    /// Most prompt tokens one request sends to workers (all prompts, times n).
    pub max_prompt_tokens_per_request: usize,
    /// Threads tokenizing and rendering chat templates at once (off the async threads).
    pub tokenizer_pool_size: usize,
    /// Extra workers tried when one fails before the first token.
    pub max_retries: usize,
    /// Times one choice may move to another worker when its worker fails after the first
    /// token (`--max_migrations`, `migrate`); 0: never.
    pub max_migrations: u32,
    /// Health checks and circuit breaking.
    pub health: HealthPolicy,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Interval of SSE comment lines (`:`) on a quiet stream, for proxies that cut idle
    /// connections; `None` sends none, as trtllm-serve and vLLM do (benchmark_serving.py
    /// parses every non-empty line as JSON and fails on a comment).
    pub sse_keepalive: Option<Duration>,
    /// `--reasoning_parser`: how chat output splits into `reasoning_content` and `content`
    /// (None: it does not).
    pub reasoning_parser: Option<crate::reasoning::ReasoningParser>,
    /// `--tool_parser`: the format tool calls are read in under `tool_choice: "auto"` (None:
    /// such requests are refused).
    pub tool_parser: Option<crate::tools::ToolParser>,
    /// Limits on the HTTP front's connections (count, header-read and keep-alive timeouts).
    pub front: crate::front::ConnectionLimits,
    /// `--request_timeout` and `--first_token_timeout`.
    pub deadlines: Deadlines,
    /// Sampling defaults for the fields a request leaves unset (the model's
    /// generation_config.json under `--generation_config auto`; empty: neutral defaults).
    pub sampling_defaults: SamplingDefaults,
    /// How many stored responses `/v1/responses` keeps (`--responses_store_max`).
    pub responses_store: crate::responses::store::StoreLimits,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            served_model_name: "model".into(),
            model_path: "model".into(),
            routing_policy: RoutingPolicy::RoundRobin,
            imbalance: ImbalanceThresholds::default(),
            kv_overlap_score_weight: DEFAULT_KV_OVERLAP_SCORE_WEIGHT,
            api_key: None,
            metrics_api_key: None,
            admin_token: None,
            job_token: None,
            worker_token: None,
            https: None,
            metrics_port: None,
            registration: RegistrationPolicy::default(),
            max_body_bytes: 32 << 20,
            max_inflight_requests: 0,
            max_queued_requests: DEFAULT_MAX_QUEUED_REQUESTS,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_prompts_per_request: DEFAULT_MAX_PROMPTS_PER_REQUEST,
            max_prompt_tokens_per_request: DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST,
            tokenizer_pool_size: default_tokenizer_pool_size(),
            max_retries: 2,
            max_migrations: crate::migrate::DEFAULT_MAX_MIGRATIONS,
            health: HealthPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            sse_keepalive: None,
            reasoning_parser: None,
            tool_parser: None,
            front: crate::front::ConnectionLimits::default(),
            deadlines: Deadlines::default(),
            sampling_defaults: SamplingDefaults::default(),
            responses_store: Default::default(),
        }
    }
}

/// Shared by all handlers.
pub struct AppState {
    /// Configuration.
    pub config: RouterConfig,
    /// Tokenizer and chat template.
    pub codec: Arc<dyn TextCodec>,
    /// Worker groups.
    pub pool: Arc<Pool>,
    /// Routing policy state.
    pub router: Router,
    /// Counters and histograms for /metrics.
    pub metrics: Arc<Metrics>,
    /// Stored `/v1/responses` responses (this router's only).
    pub responses: crate::responses::store::ResponseStore,
    /// Compiles structured-output constraints to validate them.
    pub guided: crate::guided::Validator,
    /// Worker-request slots and the queue in front of them.
    slots: Arc<Gate>,
    /// Threads of the blocking pool that tokenization may use at once.
    tokenizer: Arc<Gate>,
    inflight: AtomicUsize,
    draining: AtomicBool,
    /// Set when the drain timeout has passed: requests still running end with a 503.
    cut_off: watch::Sender<bool>,
}

/// What a request asks of the workers: `prompts` x `n` worker requests.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// Prompts in the request.
    pub prompts: usize,
    /// Choices per prompt.
    pub n: u32,
}

impl Fanout {
    /// Worker requests the request starts.
    pub fn slots(&self) -> usize {
        self.prompts.saturating_mul(self.n as usize)
    }
}

impl AppState {
    /// State over `pool` with `codec`.
    pub fn new(config: RouterConfig, codec: Arc<dyn TextCodec>, pool: Arc<Pool>) -> Self {
        Self {
            router: Router::new(
                config.routing_policy,
                config.imbalance,
                config.kv_overlap_score_weight,
            ),
            codec,
            pool,
            metrics: Arc::new(Metrics::default()),
            responses: crate::responses::store::ResponseStore::new(config.responses_store),
            guided: Default::default(),
            slots: Gate::new(0),
            tokenizer: Gate::new(config.tokenizer_pool_size.max(1)),
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            cut_off: watch::channel(false).0,
            config,
        }
    }

    /// Checks the request's `model` field against the names this router serves.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        let path = self.config.model_path.trim_end_matches('/');
        let last = std::path::Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if model == self.config.served_model_name || model == path || model == last {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "model {model:?} is not served here; use {:?}",
                self.config.served_model_name
            )))
        }
    }

    /// Worker requests admitted at once: `--max_inflight_requests`, or the capacity the
    /// routable workers report (each one's max_batch_size + max_queued_requests; unlimited
    /// while none has reported).
    pub fn inflight_limit(&self) -> usize {
        if self.config.max_inflight_requests > 0 {
            return self.config.max_inflight_requests;
        }
        let capacity: usize = self
            .pool
            .routable()
            .iter()
            .filter_map(|w| w.info())
            .map(|i| i.max_batch_size as usize + i.max_queued_requests as usize)
            .sum();
        // No routable worker has reported its size yet: admit as before there was a limit
        // (the worker's own queue still answers RESOURCE_EXHAUSTED, 429).
        if capacity == 0 { usize::MAX } else { capacity }
    }

    fn draining_error() -> ApiError {
        ApiError::unavailable("the router is shutting down; send the request to another replica")
            .with_retry_after(UNAVAILABLE_RETRY_AFTER_S)
    }

    /// Admits a generation request of `fanout` worker requests, waiting in the queue for
    /// slots if need be, or says why not: 503 draining / no worker, 429 queue full or waited
    /// `--queue_timeout_s` in vain (both with Retry-After), 400 more than the limit itself.
    pub async fn admit(self: &Arc<Self>, fanout: Fanout) -> Result<AdmitGuard, ApiError> {
        if self.is_draining() {
            return Err(Self::draining_error());
        }
        if self.pool.routable().is_empty() {
            return Err(
                ApiError::unavailable("no healthy worker is available; try again shortly")
                    .with_retry_after(UNAVAILABLE_RETRY_AFTER_S),
            );
        }
        self.slots.set_limit(self.inflight_limit());
        let need = fanout.slots();
        let arrived = Instant::now();
        let refused = match self
            .slots
            .acquire(
                need,
                self.config.max_queued_requests,
                self.config.queue_timeout,
            )
            .await
        {
            Ok(permit) => {
                self.inflight.fetch_add(1, Ordering::Relaxed);
                self.metrics.observe_queue_time(arrived.elapsed());
                return Ok(AdmitGuard {
                    state: self.clone(),
                    _permit: permit,
                    arrived,
                });
            }
            Err(refused) => refused,
        };
        self.metrics.inc_rejected(&refused);
        Err(match refused {
            Refused::TooLarge { need, limit } => ApiError::invalid(
                if fanout.n > 1 { "n" } else { "prompt" },
                format!(
                    "the request needs {need} worker requests ({} prompts x n={}) but at most {limit} run at once \
                     (--max_inflight_requests, or the workers' capacity when it is 0); send fewer prompts or a smaller n",
                    fanout.prompts, fanout.n
                ),
            ),
            Refused::QueueFull { queued } => ApiError::too_many(format!(
                "the router is at its limit of {} worker requests in flight (--max_inflight_requests) and {queued} \
                 requests already wait (--max_queued_requests, or --queue_size); retry later",
                self.slots.limit()
            ))
            .with_retry_after(OVERLOAD_RETRY_AFTER_S),
            Refused::TimedOut { waited } => ApiError::too_many(format!(
                "no room for {need} worker requests freed up within {} s of waiting (--queue_timeout_s, or \
                 --queue_timeout_secs); retry later",
                waited.as_secs_f64()
            ))
            .with_retry_after(OVERLOAD_RETRY_AFTER_S),
            Refused::Closed => Self::draining_error(),
        })
    }

    /// Runs `work` (tokenization, chat template rendering) on the blocking pool, at most
    /// `--tokenizer_pool_size` at once; a request that finds them all busy waits in line
    /// like admission's queue (same bound and wait), then gets 429.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = match self
            .tokenizer
            .acquire(
                1,
                self.config.max_queued_requests,
                self.config.queue_timeout,
            )
            .await
        {
            Ok(p) => p,
            Err(refused) => {
                self.metrics.inc_rejected(&refused);
                let why = match refused {
                    Refused::QueueFull { queued } => {
                        format!("{queued} requests already wait for one")
                    }
                    Refused::TimedOut { waited } => {
                        format!(
                            "none freed up within {} s (--queue_timeout_s)",
                            waited.as_secs_f64()
                        )
                    }
                    Refused::TooLarge { .. } | Refused::Closed => "none can be had".to_owned(),
                };
                return Err(ApiError::too_many(format!(
                    "all {} tokenizer threads are busy and {why}; retry later or raise --tokenizer_pool_size",
                    self.config.tokenizer_pool_size
                ))
                .with_retry_after(OVERLOAD_RETRY_AFTER_S));
            }
        };
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await;
        joined.map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))?
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The admission figures of /metrics.
    pub fn admission(&self) -> AdmissionGauges {
        AdmissionGauges {
            inflight: self.inflight(),
            slots_used: self.slots.used(),
            queued: self.slots.queued(),
            limit: self.slots.limit(),
        }
    }

    /// The caps a request body is read under.
    pub fn body_caps(&self) -> BodyCaps {
        BodyCaps {
            max_prompts: self.config.max_prompts_per_request,
            max_prompt_tokens: self.config.max_prompt_tokens_per_request,
        }
    }

    /// Whether SIGTERM has started the drain.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts refusing new requests (503 with Retry-After), and those waiting in the queue.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.slots.close();
    }

    /// The drain timeout has passed: requests still running end now with a 503 (in-band
    /// once streaming).
    pub fn cut_off(&self) {
        self.cut_off.send_replace(true);
    }
}

/// Holds an admitted request's slots.
pub struct AdmitGuard {
    state: Arc<AppState>,
    _permit: Permit,
    /// When the request asked for admission: the start of its TTFT and end-to-end latency.
    arrived: Instant,
}

impl AdmitGuard {
    /// When the request asked for admission (before any wait in the queue).
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Resolves with the error to end the request with once the drain timeout has passed
    /// (never before).
    pub async fn cut_off(&self) -> ApiError {
        let mut rx = self.state.cut_off.subscribe();
        // An Err means the state is gone, which the guard's Arc prevents: wait forever then.
        if rx.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
        ApiError::unavailable(
            "the router shut down before the request finished (--drain_timeout_s passed); send it again, to another replica",
        )
        .with_retry_after(UNAVAILABLE_RETRY_AFTER_S)
    }
}

impl Drop for AdmitGuard {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
