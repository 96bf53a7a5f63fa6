//! The worker pool: one entry per worker group leader, with its gRPC client, health, circuit
//! breaker, in-flight count, last reported load and the exact index of its prefix cache
//! (`kv_index`, kept by a `kv_subscribe` task per worker while it is in the pool).
//! Every call to a worker carries the worker token (`llmapi_proto::auth`) the pool was built
//! with: workers refuse calls without the job's secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use llmapi_common::block_hash::BlockHash;

use crate::kv_index::KvIndex;
use llmapi_proto::auth::{AttachToken, TokenError};
use llmapi_proto::limits::MAX_MESSAGE_BYTES;
use llmapi_proto::tls::TransportTls;
use llmapi_proto::v1::worker_client::WorkerClient;
use llmapi_proto::v1::{HealthRequest, InfoRequest, InfoResponse, LoadRequest, LoadResponse};
use tokio::task::AbortHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// How long a worker connection may go without a frame before the router pings it.
pub const LINK_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the router waits for the ping's answer before closing the connection, ending
/// every call on it (a stopped process or a cut link answers none).
pub const LINK_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC client of one worker that sends the worker token on every call.
pub type WorkerRpc = WorkerClient<InterceptedService<Channel, AttachToken>>;

/// Health and breaker thresholds.
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Time between health checks of each worker.
    pub interval: Duration,
    /// Deadline of one health check.
    pub timeout: Duration,
    /// Consecutive failed checks before a worker is ejected.
    pub eject_after: u32,
    /// Consecutive good checks before an ejected worker is re-admitted.
    pub readmit_after: u32,
    /// Consecutive failed requests that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the worker out of routing.
    pub breaker_cooldown: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            eject_after: 3,
            readmit_after: 2,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(10),
        }
    }
}

/// A circuit breaker's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; consecutive worker faults are counted.
    Closed,
    /// The worker is skipped until the cooldown ends.
    Open,
    /// The cooldown ended: one probe request may go through; its outcome closes or reopens
    /// the breaker, and every other request keeps avoiding the worker meanwhile.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// One worker group as the router sees it.
pub struct Worker {
    /// The gRPC address, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    client: WorkerRpc,
    healthy: AtomicBool,
    ever_admitted: AtomicBool,
    failed_checks: AtomicU32,
    good_checks: AtomicU32,
    failed_requests: AtomicU32,
    breaker: Mutex<Breaker>,
    inflight: AtomicUsize,
    routed: std::sync::atomic::AtomicU64,
    load: Mutex<LoadResponse>,
    info: Mutex<Option<InfoResponse>>,
    /// The blocks this worker has cached, from its KV events (`kv_lock`).
    kv: Mutex<KvIndex>,
    /// Prompt blocks of the requests in flight here, each with the number of requests holding
    /// it (kv_cache_aware's active blocks: a block shared by several counts once).
    active: Mutex<HashMap<BlockHash, u32>>,
    /// The task keeping `kv`, while the worker is in the pool.
    kv_task: Mutex<Option<AbortHandle>>,
    /// When its registration lapses unless renewed; `None`: never (a `--worker_urls`
    /// worker, or a registration under `--worker_lease_s 0`).
    lease_until: Mutex<Option<Instant>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The task holds only a weak reference; it may be waiting on the stream.
        if let Some(task) = lock(&self.kv_task).take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("url", &self.url)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

/// Errors adding a worker.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The URL is not a valid gRPC endpoint.
    #[error("worker url {url:?} is not valid ({reason}); use http://HOST:PORT")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// An `https://` worker, but the router has no TLS settings to reach it with.
    #[error(
        "worker url {url:?} asks for TLS but the router has no CA to verify it with; give llmapi-router --tls_ca_file (and --tls_cert_file/--tls_key_file when the worker requires client certificates), or --worker_token_file for a job's generated CA"
    )]
    NoTls {
        /// The URL as given.
        url: String,
    },
    /// The TLS settings cannot make a client configuration.
    #[error("worker url {url:?}: {reason}")]
    Tls {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The pool holds as many workers as it may.
    #[error(
        "the pool already holds {max} workers, the most it takes (--max_workers); remove one with DELETE /workers or raise --max_workers"
    )]
    Full {
        /// The cap.
        max: usize,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another request panicked mid-update of plain counters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    fn connect(
        url: &str,
        token: &AttachToken,
        tls: Option<&TransportTls>,
    ) -> Result<Self, PoolError> {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let mut endpoint = Endpoint::from_shared(url.clone()).map_err(|e| PoolError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if url.starts_with("https://") {
            let tls = tls.ok_or_else(|| PoolError::NoTls { url: url.clone() })?;
            let tls_error = |reason: String| PoolError::Tls {
                url: url.clone(),
                reason,
            };
            let config = tls.grpc_client().map_err(|e| tls_error(e.to_string()))?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| tls_error(e.to_string()))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(LINK_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(LINK_KEEPALIVE_TIMEOUT);
        Ok(Self {
            url,
            client: WorkerClient::with_interceptor(endpoint.connect_lazy(), token.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            healthy: AtomicBool::new(false),
            ever_admitted: AtomicBool::new(false),
            failed_checks: AtomicU32::new(0),
            good_checks: AtomicU32::new(0),
            failed_requests: AtomicU32::new(0),
            breaker: Mutex::new(Breaker::Closed),
            inflight: AtomicUsize::new(0),
            routed: std::sync::atomic::AtomicU64::new(0),
            load: Mutex::new(LoadResponse::default()),
            info: Mutex::new(None),
            kv: Mutex::new(KvIndex::default()),
            active: Mutex::default(),
            kv_task: Mutex::new(None),
            lease_until: Mutex::new(None),
        })
    }

    /// Its KV index, locked.
    pub fn kv_lock(&self) -> std::sync::MutexGuard<'_, KvIndex> {
        lock(&self.kv)
    }

    /// Number of leading `hashes` this worker holds in its prefix cache.
    pub fn matched_blocks(&self, hashes: &[BlockHash]) -> usize {
        lock(&self.kv).matched_blocks(hashes)
    }

    /// Distinct prompt blocks of the requests the router has in flight on this worker.
    pub fn active_blocks(&self) -> usize {
        lock(&self.active).len()
    }

    /// Distinct prompt blocks in flight on this worker were a prompt of `hashes` added: the
    /// active ones plus those of `hashes` not among them (Dynamo's potential decode blocks,
    /// assuming KV reuse).
    pub fn potential_active_blocks(&self, hashes: &[BlockHash]) -> usize {
        let active = lock(&self.active);
        let mut new: Vec<&BlockHash> = hashes.iter().filter(|h| !active.contains_key(h)).collect();
        new.sort_unstable();
        new.dedup();
        active.len() + new.len()
    }

    /// Starts following its KV events (once; needs a tokio runtime, else does nothing).
    fn follow_kv_events(self: &Arc<Self>) {
        let mut task = lock(&self.kv_task);
        if task.is_none()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            *task = Some(
                rt.spawn(crate::kv_subscribe::follow(Arc::downgrade(self)))
                    .abort_handle(),
            );
        }
    }

    /// Stops following its KV events and forgets its index (it left the pool).
    fn leave(&self) {
        if let Some(task) = lock(&self.kv_task).take() {
            task.abort();
        }
        lock(&self.kv).reset();
    }

    /// Renews its registration for `lease` from now (`None`: it never lapses).
    pub fn renew_lease(&self, lease: Option<Duration>) {
        *self.lease_until.lock().unwrap_or_else(|e| e.into_inner()) =
            lease.map(|l| Instant::now() + l);
    }

    /// Whether its registration lapsed before `now` (never for a worker without a lease).
    pub fn lease_lapsed(&self, now: Instant) -> bool {
        self.lease_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| until < now)
    }

    /// A clone of the gRPC client (cheap: channels are shared).
    pub fn client(&self) -> WorkerRpc {
        self.client.clone()
    }

    /// Whether health checks currently admit this worker.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The circuit breaker's state now; an open breaker whose cooldown has passed turns
    /// half-open here.
    pub fn breaker_state(&self) -> BreakerState {
        let mut b = lock(&self.breaker);
        if let Breaker::Open { until } = *b
            && Instant::now() >= until
        {
            *b = Breaker::HalfOpen { probing: false };
        }
        match *b {
            Breaker::Closed => BreakerState::Closed,
            Breaker::Open { .. } => BreakerState::Open,
            Breaker::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether the circuit breaker is open or half-open (not yet trusted again).
    pub fn breaker_open(&self) -> bool {
        self.breaker_state() != BreakerState::Closed
    }

    /// Whether the breaker lets a request through now: closed, or half-open with no probe
    /// request out.
    fn breaker_admits(&self) -> bool {
        self.breaker_state();
        matches!(
            *lock(&self.breaker),
            Breaker::Closed | Breaker::HalfOpen { probing: false }
        )
    }

    /// Healthy, and the breaker lets a request through (closed, or half-open awaiting its
    /// probe).
    pub fn routable(&self) -> bool {
        self.is_healthy() && self.breaker_admits()
    }

    /// Marks one request started when the breaker lets it through: always when closed; when
    /// half-open only the first caller, whose request is the probe (its success closes the
    /// breaker, its failure reopens it). None when the breaker keeps the request out.
    pub fn try_begin(self: &Arc<Self>) -> Option<InflightGuard> {
        self.breaker_state();
        let probe = {
            let mut b = lock(&self.breaker);
            match *b {
                Breaker::Closed => false,
                Breaker::Open { .. } | Breaker::HalfOpen { probing: true } => return None,
                Breaker::HalfOpen { probing: false } => {
                    *b = Breaker::HalfOpen { probing: true };
                    true
                }
            }
        };
        if probe {
            tracing::info!(worker = %self.url, "circuit breaker half-open: one probe request let through");
        }
        self.inflight.fetch_add(1, Ordering::Relaxed);
        Some(InflightGuard {
            worker: self.clone(),
            probe,
            blocks: None,
        })
    }

    /// Requests the router has in flight on this worker.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Marks one request started whatever the breaker says; the guard marks it ended.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            worker: self.clone(),
            probe: false,
            blocks: None,
        }
    }

    /// The last load the worker reported.
    pub fn load(&self) -> LoadResponse {
        lock(&self.load).clone()
    }

    /// The worker's static facts, once known.
    pub fn info(&self) -> Option<InfoResponse> {
        lock(&self.info).clone()
    }

    /// A load score for policies: the router's own in-flight count plus the worker's queue.
    pub fn score(&self) -> usize {
        self.inflight() + lock(&self.load).queued as usize
    }

    /// A request to this worker failed before its first token through the worker's fault
    /// (transport, UNAVAILABLE, INTERNAL); request faults never count.
    pub fn record_request_failure(&self, policy: &HealthPolicy) {
        let n = self.failed_requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut b = lock(&self.breaker);
        let reopen = match *b {
            Breaker::HalfOpen { .. } => {
                tracing::warn!(worker = %self.url, "circuit breaker probe failed; reopened");
                true
            }
            Breaker::Closed if n >= policy.breaker_failures => {
                tracing::warn!(worker = %self.url, failures = n, "circuit breaker opened");
                true
            }
            _ => false,
        };
        if reopen {
            *b = Breaker::Open {
                until: Instant::now() + policy.breaker_cooldown,
            };
        }
    }

    /// A request to this worker produced a response; a half-open breaker closes.
    pub fn record_request_success(&self) {
        self.failed_requests.store(0, Ordering::Relaxed);
        self.routed.fetch_add(1, Ordering::Relaxed);
        let mut b = lock(&self.breaker);
        if matches!(*b, Breaker::HalfOpen { .. }) {
            tracing::info!(worker = %self.url, "circuit breaker probe succeeded; closed");
            *b = Breaker::Closed;
        }
    }

    /// Requests this worker has accepted (answered with at least one response).
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Runs one health check (liveness + load, and Info until known) and updates the state.
    pub async fn check(&self, policy: &HealthPolicy) {
        let result = match tokio::time::timeout(policy.timeout, self.probe()).await {
            Ok(r) => r,
            Err(_) => Err("health check timed out".to_owned()),
        };
        match result {
            Ok(()) => {
                self.failed_checks.store(0, Ordering::Relaxed);
                let good = self.good_checks.fetch_add(1, Ordering::Relaxed) + 1;
                // A worker seen for the first time is admitted at once; a returning one
                // must prove itself over several checks.
                let first_time = !self.ever_admitted.load(Ordering::Relaxed);
                if !self.is_healthy() && (first_time || good >= policy.readmit_after) {
                    tracing::info!(worker = %self.url, "worker admitted");
                    self.ever_admitted.store(true, Ordering::Relaxed);
                    self.failed_requests.store(0, Ordering::Relaxed);
                    self.healthy.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.good_checks.store(0, Ordering::Relaxed);
                let bad = self.failed_checks.fetch_add(1, Ordering::Relaxed) + 1;
                if self.is_healthy() && bad >= policy.eject_after {
                    tracing::warn!(worker = %self.url, error = %e, failed_checks = bad, "worker ejected");
                    self.healthy.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let mut client = self.client();
        let health = client
            .health(HealthRequest { probe: false })
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        if !health.healthy {
            return Err(health.message);
        }
        let load = client
            .load(LoadRequest {})
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        *lock(&self.load) = load;
        if lock(&self.info).is_none() {
            let info = client
                .info(InfoRequest {})
                .await
                .map_err(|e| e.message().to_owned())?
                .into_inner();
            *lock(&self.info) = Some(info);
        }
        Ok(())
    }
}

/// Decrements a worker's in-flight count when dropped. A half-open breaker's probe that
/// ends without a verdict (a request fault, a client that left) frees the probe slot for
/// the next request.
#[derive(Debug)]
pub struct InflightGuard {
    worker: Arc<Worker>,
    probe: bool,
    /// This request's prompt blocks, counted in the worker's active blocks.
    blocks: Option<Arc<Vec<BlockHash>>>,
}

impl InflightGuard {
    /// Counts the prompt blocks `hashes` among the worker's active blocks until the request
    /// ends (once per guard).
    pub fn hold_blocks(&mut self, hashes: &Arc<Vec<BlockHash>>) {
        if self.blocks.is_some() {
            return;
        }
        let mut active = lock(&self.worker.active);
        for h in hashes.iter() {
            *active.entry(*h).or_insert(0) += 1;
        }
        self.blocks = Some(hashes.clone());
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.worker.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(hashes) = self.blocks.take() {
            let mut active = lock(&self.worker.active);
            for h in hashes.iter() {
                if let Some(n) = active.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        active.remove(h);
                    }
                }
            }
        }
        if self.probe {
            let mut b = lock(&self.worker.breaker);
            if matches!(*b, Breaker::HalfOpen { probing: true }) {
                *b = Breaker::HalfOpen { probing: false };
            }
        }
    }
}

/// All workers known to the router.
#[derive(Debug, Default)]
pub struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    token: AttachToken,
    tls: Option<TransportTls>,
}

impl Pool {
    /// A pool whose calls carry `worker_token` (the job secret the workers require); `None`
    /// sends none, which only workers that check nothing (test doubles) accept.
    pub fn new(worker_token: Option<&str>) -> Result<Self, TokenError> {
        Ok(Self {
            workers: RwLock::default(),
            token: AttachToken::new(worker_token)?,
            tls: None,
        })
    }

    /// Reaches `https://` workers with `tls` (without it they are refused when added).
    pub fn with_tls(mut self, tls: Option<TransportTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Adds a worker (lazily connected); an already known URL is returned as is.
    pub fn add(&self, url: &str) -> Result<Arc<Worker>, PoolError> {
        let worker = Arc::new(Worker::connect(url, &self.token, self.tls.as_ref())?);
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = workers.iter().find(|w| w.url == worker.url) {
            return Ok(w.clone());
        }
        workers.push(worker.clone());
        worker.follow_kv_events();
        Ok(worker)
    }

    /// Adds a worker unless the pool already holds `max` of them; an already known URL is
    /// returned as is (never refused). The bool says whether it is new.
    pub fn add_capped(&self, url: &str, max: usize) -> Result<(Arc<Worker>, bool), PoolError> {
        let worker = Worker::connect(url, &self.token, self.tls.as_ref())?;
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = workers.iter().find(|w| w.url == worker.url) {
            return Ok((w.clone(), false));
        }
        if workers.len() >= max {
            return Err(PoolError::Full { max });
        }
        let worker = Arc::new(worker);
        workers.push(worker.clone());
        worker.follow_kv_events();
        Ok((worker, true))
    }

    /// Whether a worker with this URL is in the pool.
    pub fn contains(&self, url: &str) -> bool {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|w| w.url == url)
    }

    /// Removes a worker by URL; returns whether it was known.
    pub fn remove(&self, url: &str) -> bool {
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        let before = workers.len();
        workers.retain(|w| {
            let stays = w.url != url && w.url != format!("http://{url}");
            if !stays {
                w.leave();
            }
            stays
        });
        workers.len() != before
    }

    /// A snapshot of every worker.
    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Workers that routing may pick now.
    pub fn routable(&self) -> Vec<Arc<Worker>> {
        self.all().into_iter().filter(|w| w.routable()).collect()
    }

    /// Facts about the served model, from the first worker that reported them.
    pub fn model_info(&self) -> Option<InfoResponse> {
        self.all().iter().find_map(|w| w.info())
    }

    /// Checks every worker once, concurrently.
    pub async fn check_all(&self, policy: &HealthPolicy) {
        let workers = self.all();
        futures::future::join_all(workers.iter().map(|w| w.check(policy))).await;
    }

    /// Removes the workers whose registration lapsed (they stopped renewing it: killed, cut
    /// off, or their job ended without deregistering); returns their URLs.
    pub fn drop_lapsed(&self, now: Instant) -> Vec<String> {
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        let lapsed: Vec<String> = workers
            .iter()
            .filter(|w| w.lease_lapsed(now))
            .map(|w| w.url.clone())
            .collect();
        workers.retain(|w| {
            let stays = !lapsed.contains(&w.url);
            if !stays {
                w.leave();
            }
            stays
        });
        lapsed
    }

    /// Checks every worker forever at `policy.interval`, first dropping those whose
    /// registration lapsed.
    pub async fn health_loop(self: Arc<Self>, policy: HealthPolicy) {
        let mut tick = tokio::time::interval(policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for url in self.drop_lapsed(Instant::now()) {
                tracing::warn!(worker = %url, "worker removed: its registration lapsed (no renewal within --worker_lease_s)");
            }
            self.check_all(&policy).await;
        }
    }
}
