//! Router configuration and the state shared by every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::auth::Secret;
use crate::codec::TextCodec;
use crate::deadline::Deadlines;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::{ImbalanceThresholds, Router, RoutingPolicy};
use crate::pool::{HealthPolicy, Pool};
use crate::registration::RegistrationPolicy;

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
    /// Requests in flight past which new ones get 429 (0: unlimited).
    pub max_inflight_requests: usize,
    /// Extra workers tried when one fails before the first token.
    pub max_retries: usize,
    /// Health checks and circuit breaking.
    pub health: HealthPolicy,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Where request spans go (`--otlp_traces_endpoint`); `None` exports nothing.
    pub span_exporter: Option<llmapi_otlp::SpanExporter>,
    /// Interval of SSE comment lines (`:`) on a quiet stream, for proxies that cut idle
    /// connections; `None` sends none, as trtllm-serve and vLLM do (benchmark_serving.py
    /// parses every non-empty line as JSON and fails on a comment).
    pub sse_keepalive: Option<Duration>,
    /// Limits on the HTTP front's connections (count, header-read and keep-alive timeouts).
    pub front: crate::front::ConnectionLimits,
    /// `--request_timeout` and `--first_token_timeout`.
    pub deadlines: Deadlines,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            served_model_name: "model".into(),
            model_path: "model".into(),
            routing_policy: RoutingPolicy::RoundRobin,
            imbalance: ImbalanceThresholds::default(),
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
            max_retries: 2,
            health: HealthPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            span_exporter: None,
            sse_keepalive: None,
            front: crate::front::ConnectionLimits::default(),
            deadlines: Deadlines::default(),
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
    /// Counters for /metrics.
    pub metrics: Metrics,
    inflight: AtomicUsize,
    draining: AtomicBool,
}

impl AppState {
    /// State over `pool` with `codec`.
    pub fn new(config: RouterConfig, codec: Arc<dyn TextCodec>, pool: Arc<Pool>) -> Self {
        Self {
            router: Router::new(config.routing_policy, config.imbalance),
            config,
            codec,
            pool,
            metrics: Metrics::default(),
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
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

    /// Admits a new generation request or says why not (503 draining / no worker, 429 full).
    pub fn admit(self: &Arc<Self>) -> Result<AdmitGuard, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable(
                "the router is shutting down; send the request to another replica",
            ));
        }
        if self.pool.routable().is_empty() {
            return Err(ApiError::unavailable(
                "no healthy worker is available; try again shortly",
            ));
        }
        let n = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = AdmitGuard(self.clone());
        let max = self.config.max_inflight_requests;
        if max > 0 && n > max {
            self.metrics.inc_rejected();
            return Err(ApiError::too_many(format!(
                "{max} requests are in flight, the most this router admits (--max_inflight_requests); retry later"
            )));
        }
        Ok(guard)
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Starts refusing new requests.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// Holds one admission slot.
pub struct AdmitGuard(Arc<AppState>);

impl Drop for AdmitGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
