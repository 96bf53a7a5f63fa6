//! /metrics on the `prometheus-client` crate, in the OpenMetrics text format: request counts
//! by route and status, tokens, retries, migrations, admission, the per-request latency and
//! size histograms vLLM users chart (time to first token, inter-token latency, end-to-end
//! latency, queue time, prompt and generation tokens), and per-worker state from the Load
//! answers the pool polls (KV cache usage, prefix-cache hits, preemptions, iterations).
//!
//! Counters and histograms live in one registry for the router's life; the figures that are
//! read off the pool and admission at scrape time go into a registry built per scrape, so a
//! worker that leaves the pool leaves /metrics too. docs/serving.md lists every metric.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::admission::Refused;
use crate::generate::ChoiceEvent;
use crate::pool::Pool;

mod step_histogram;
use step_histogram::WorkerHistogram;

/// The content type of the exposition: OpenMetrics text 1.0.0, which Prometheus asks for
/// first and parses natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds of `llmapi_router_time_to_first_token_seconds`: vLLM's.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Bucket bounds of `llmapi_router_inter_token_latency_seconds`: vLLM's.
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Bucket bounds of the request latency histograms (end to end, queue time): vLLM's.
const LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Bucket bounds of the token-count histograms: vLLM's 1-2-5 series, here up to 500,000
/// tokens (vLLM stops at the model's length, which the router learns only later).
const TOKEN_BUCKETS: [f64; 17] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
    20_000.0, 50_000.0, 100_000.0, 500_000.0,
];

/// A fractional gauge (ratios).
type Ratio = Gauge<f64, AtomicU64>;

/// What `Metrics::observe` has seen of one request.
struct RequestTiming {
    arrived: Instant,
    first_token: bool,
    /// Each choice's last token delivery.
    last_token: Vec<Option<Instant>>,
    generated: u64,
    /// Choices finished or failed.
    ended: usize,
}

/// The admission figures /metrics shows besides the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmissionGauges {
    /// HTTP requests admitted and not yet answered.
    pub inflight: usize,
    /// Worker-request slots they hold (prompts x n each).
    pub slots_used: usize,
    /// Requests waiting for slots.
    pub queued: usize,
    /// The in-flight limit in worker requests.
    pub limit: usize,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerCause {
    worker: String,
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// Router counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    retries: Counter,
    worker_failures: Counter,
    timeouts: Counter,
    rejected: Family<Reason, Counter>,
    /// Choices moved off a worker that failed mid-stream, by (that worker, cause).
    migrations: Family<WorkerCause, Counter>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
}

/// The label of each `Refused` in `llmapi_router_rejected_requests_total`.
fn reason_of(why: &Refused) -> &'static str {
    match why {
        Refused::TooLarge { .. } => "too_large",
        Refused::QueueFull { .. } => "queue_full",
        Refused::TimedOut { .. } => "queue_timeout",
        Refused::Closed => "draining",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "llmapi_router_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let prompt_tokens = counter(
            &mut registry,
            "llmapi_router_prompt_tokens",
            "Prompt tokens sent to workers",
        );
        let generation_tokens = counter(
            &mut registry,
            "llmapi_router_generation_tokens",
            "Tokens received from workers",
        );
        let retries = counter(
            &mut registry,
            "llmapi_router_retries",
            "Worker requests retried on another worker before their first token",
        );
        let worker_failures = counter(
            &mut registry,
            "llmapi_router_worker_failures",
            "Worker requests that failed through the worker's fault",
        );
        let timeouts = counter(
            &mut registry,
            "llmapi_router_timeouts",
            "Choices that ran past --request_timeout or --first_token_timeout",
        );
        let rejected = Family::<Reason, Counter>::default();
        // Every reason shows from the start, at 0.
        for reason in ["too_large", "queue_full", "queue_timeout", "draining"] {
            let _ = rejected.get_or_create(&Reason { reason });
        }
        registry.register(
            "llmapi_router_rejected_requests",
            "Requests refused by admission control or the tokenizer pool, by reason",
            rejected.clone(),
        );
        let migrations = Family::<WorkerCause, Counter>::default();
        registry.register(
            "llmapi_router_migrations",
            "Choices moved off a worker that failed mid-stream, by that worker and cause",
            migrations.clone(),
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            registry.register(name, help, h.clone());
            h
        };
        let ttft = histogram(
            &mut registry,
            "llmapi_router_time_to_first_token_seconds",
            "Seconds from a request asking for admission to its first generated token",
            &TTFT_BUCKETS,
        );
        let itl = histogram(
            &mut registry,
            "llmapi_router_inter_token_latency_seconds",
            "Seconds between successive token deliveries of one choice",
            &ITL_BUCKETS,
        );
        let e2e = histogram(
            &mut registry,
            "llmapi_router_e2e_request_latency_seconds",
            "Seconds from a request asking for admission to its last choice ending",
            &LATENCY_BUCKETS,
        );
        let queue_time = histogram(
            &mut registry,
            "llmapi_router_request_queue_time_seconds",
            "Seconds an admitted request waited in the router's admission queue",
            &LATENCY_BUCKETS,
        );
        let request_prompt_tokens = histogram(
            &mut registry,
            "llmapi_router_request_prompt_tokens",
            "Prompt tokens per request (all its prompts)",
            &TOKEN_BUCKETS,
        );
        let request_generation_tokens = histogram(
            &mut registry,
            "llmapi_router_request_generation_tokens",
            "Tokens generated per request (all its choices)",
            &TOKEN_BUCKETS,
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generation_tokens,
            retries,
            worker_failures,
            timeouts,
            rejected,
            migrations,
            ttft,
            itl,
            e2e,
            queue_time,
            request_prompt_tokens,
            request_generation_tokens,
        }
    }
}

impl Metrics {
    /// Counts one answered HTTP request.
    pub fn record_request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .inc();
    }

    /// Counts prompt tokens sent to workers.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.inc_by(n as u64);
    }

    /// Counts tokens received from workers.
    pub fn add_generation_tokens(&self, n: usize) {
        self.generation_tokens.inc_by(n as u64);
    }

    /// Counts a retry on another worker.
    pub fn inc_retries(&self) {
        self.retries.inc();
    }

    /// Counts a worker failure seen by a request.
    pub fn inc_worker_failures(&self) {
        self.worker_failures.inc();
    }

    /// Counts a request refused by admission control (or by the tokenizer pool), by reason.
    pub fn inc_rejected(&self, why: &Refused) {
        self.rejected
            .get_or_create(&Reason {
                reason: reason_of(why),
            })
            .inc();
    }

    /// Counts a choice that ran past its deadline (`--request_timeout`,
    /// `--first_token_timeout`).
    pub fn inc_timeouts(&self) {
        self.timeouts.inc();
    }

    /// Counts a choice moved off `worker`, which failed mid-stream with `cause` (a
    /// `migrate::Cause` label), to another worker that took it.
    pub fn inc_migrations(&self, worker: &str, cause: &'static str) {
        self.migrations
            .get_or_create(&WorkerCause {
                worker: worker.to_owned(),
                cause,
            })
            .inc();
    }

    /// Notes how long an admitted request waited in the admission queue.
    pub fn observe_queue_time(&self, waited: std::time::Duration) {
        self.queue_time.observe(waited.as_secs_f64());
    }

    /// Relays a request's choice events while timing them: its first token (TTFT), the gaps
    /// between later deliveries of each choice (inter-token latency), its end (end-to-end
    /// latency, from `arrived`) and the tokens its `choices` generated; `prompt_tokens` is its
    /// prompts' total. The request ends when every choice has finished or failed (or all
    /// senders are gone); it is observed then, before its last event is passed on. A
    /// request whose client goes away first is not observed; one that fails is observed as
    /// far as it got (no TTFT without a token).
    pub fn observe(
        self: &Arc<Self>,
        arrived: Instant,
        prompt_tokens: usize,
        choices: usize,
        mut rx: mpsc::Receiver<ChoiceEvent>,
    ) -> mpsc::Receiver<ChoiceEvent> {
        let (tx, out) = mpsc::channel(64);
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut timing = RequestTiming {
                arrived,
                first_token: false,
                last_token: vec![None; choices],
                generated: 0,
                ended: 0,
            };
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    () = tx.closed() => return,
                };
                let Some(ev) = ev else { break };
                if metrics.note(&mut timing, &ev) && timing.ended >= choices {
                    metrics.finish_request(&timing, prompt_tokens);
                    let _ = tx.send(ev).await;
                    // Later events (none are expected) pass through unobserved.
                    while let Some(ev) = rx.recv().await {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            // Every sender is gone before every choice ended.
            metrics.finish_request(&timing, prompt_tokens);
        });
        out
    }

    /// Times one event; true when it ends a choice.
    fn note(&self, t: &mut RequestTiming, ev: &ChoiceEvent) -> bool {
        match ev {
            ChoiceEvent::Delta { index, .. } => {
                self.token(t, *index);
                false
            }
            ChoiceEvent::Finish { index, usage, .. } => {
                // Tokens whose text came only with the end (held back for a stop string)
                // still count as this choice's first token.
                let silent = t
                    .last_token
                    .get(*index as usize)
                    .is_some_and(Option::is_none);
                if usage.completion_tokens > 0 && silent {
                    self.token(t, *index);
                }
                t.generated += u64::from(usage.completion_tokens);
                t.ended += 1;
                true
            }
            ChoiceEvent::Failed { .. } => {
                t.ended += 1;
                true
            }
            ChoiceEvent::PromptLogprobs { .. } => false,
        }
    }

    /// A token delivery of choice `index`: the request's first (TTFT) or the gap since the
    /// choice's previous one (inter-token latency).
    fn token(&self, t: &mut RequestTiming, index: u32) {
        let now = Instant::now();
        if !t.first_token {
            t.first_token = true;
            self.ttft.observe((now - t.arrived).as_secs_f64());
        }
        if let Some(last) = t.last_token.get_mut(index as usize) {
            if let Some(prev) = *last {
                self.itl.observe((now - prev).as_secs_f64());
            }
            *last = Some(now);
        }
    }

    /// Observes a request that ended.
    fn finish_request(&self, t: &RequestTiming, prompt_tokens: usize) {
        self.e2e.observe(t.arrived.elapsed().as_secs_f64());
        self.request_prompt_tokens.observe(prompt_tokens as f64);
        self.request_generation_tokens.observe(t.generated as f64);
    }

    /// The exposition: the router's counters and histograms, then the admission figures and
    /// each worker's state as they are now, then `# EOF`.
    pub fn render(&self, pool: &Pool, admission: AdmissionGauges) -> String {
        let mut s = String::new();
        let now = scrape_registry(pool, admission);
        // Writing into a String cannot fail, and every name and label is valid.
        let _ = encode_registry(&mut s, &self.registry)
            .and_then(|()| encode_registry(&mut s, &now))
            .and_then(|()| encode_eof(&mut s));
        s
    }
}

/// Registers a gauge of `v`.
fn gauge(registry: &mut Registry, name: &str, help: &str, v: usize) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// `part / whole`, 0 when `whole` is 0.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The figures read at scrape time: admission and every worker in the pool.
fn scrape_registry(pool: &Pool, admission: AdmissionGauges) -> Registry {
    let mut r = Registry::default();
    gauge(
        &mut r,
        "llmapi_router_inflight_requests",
        "HTTP generation requests admitted and not yet answered",
        admission.inflight,
    );
    gauge(
        &mut r,
        "llmapi_router_inflight_worker_requests",
        "Worker-request slots the admitted requests hold (prompts x n each)",
        admission.slots_used,
    );
    gauge(
        &mut r,
        "llmapi_router_inflight_worker_requests_limit",
        "The in-flight limit in worker requests (--max_inflight_requests or the workers' capacity)",
        admission.limit,
    );
    gauge(
        &mut r,
        "llmapi_router_queued_requests",
        "Requests waiting in the admission queue",
        admission.queued,
    );
    gauge(
        &mut r,
        "llmapi_router_num_requests_running",
        "Requests running: admitted and not yet answered (as llmapi_router_inflight_requests)",
        admission.inflight,
    );
    gauge(
        &mut r,
        "llmapi_router_num_requests_waiting",
        "Requests waiting for admission (as llmapi_router_queued_requests)",
        admission.queued,
    );

    let healthy = Family::<WorkerLabel, Gauge>::default();
    let inflight = Family::<WorkerLabel, Gauge>::default();
    let routed = Family::<WorkerLabel, Counter>::default();
    let kv_used = Family::<WorkerLabel, Gauge>::default();
    let kv_usage = Family::<WorkerLabel, Ratio>::default();
    let running = Family::<WorkerLabel, Gauge>::default();
    let waiting = Family::<WorkerLabel, Gauge>::default();
    let prefix_queries = Family::<WorkerLabel, Counter>::default();
    let prefix_hits = Family::<WorkerLabel, Counter>::default();
    let prefix_ratio = Family::<WorkerLabel, Ratio>::default();
    let preemptions = Family::<WorkerLabel, Counter>::default();
    let iterations = Family::<WorkerLabel, Counter>::default();
    let iteration_tokens = Family::<WorkerLabel, Counter>::default();
    let spec_drafted = Family::<WorkerLabel, Counter>::default();
    let spec_accepted = Family::<WorkerLabel, Counter>::default();
    let step_seconds = Family::<WorkerLabel, WorkerHistogram>::default();
    let step_batch = Family::<WorkerLabel, WorkerHistogram>::default();
    let step_tokens = Family::<WorkerLabel, WorkerHistogram>::default();
    let index_blocks = Family::<WorkerLabel, Gauge>::default();
    let index_snapshots = Family::<WorkerLabel, Counter>::default();
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for w in pool.all() {
        let l = WorkerLabel {
            worker: w.url.clone(),
        };
        let load = w.load();
        healthy.get_or_create(&l).set(i64::from(w.routable()));
        inflight
            .get_or_create(&l)
            .set(i64::try_from(w.inflight()).unwrap_or(i64::MAX));
        routed.get_or_create(&l).inc_by(w.routed());
        kv_used.get_or_create(&l).set(as_i64(load.kv_blocks_used));
        kv_usage.get_or_create(&l).set(ratio(
            load.kv_blocks_used,
            load.kv_blocks_used + load.kv_blocks_free,
        ));
        running.get_or_create(&l).set(i64::from(load.running));
        waiting.get_or_create(&l).set(i64::from(load.queued));
        prefix_queries
            .get_or_create(&l)
            .inc_by(load.prefix_cache_queries);
        prefix_hits.get_or_create(&l).inc_by(load.prefix_cache_hits);
        prefix_ratio
            .get_or_create(&l)
            .set(ratio(load.prefix_cache_hits, load.prefix_cache_queries));
        preemptions.get_or_create(&l).inc_by(load.preemptions);
        iterations.get_or_create(&l).inc_by(load.iterations);
        iteration_tokens
            .get_or_create(&l)
            .inc_by(load.iteration_tokens);
        spec_drafted
            .get_or_create(&l)
            .inc_by(load.spec_draft_tokens);
        spec_accepted
            .get_or_create(&l)
            .inc_by(load.spec_accepted_tokens);
        for (family, h) in [
            (&step_seconds, &load.step_seconds),
            (&step_batch, &load.step_batch_size),
            (&step_tokens, &load.step_tokens),
        ] {
            if let Some(h) = h {
                family.get_or_create(&l).set(h);
            }
        }
        let (blocks, snapshots) = {
            let ix = w.kv_lock();
            (ix.len(), ix.snapshots())
        };
        index_blocks
            .get_or_create(&l)
            .set(i64::try_from(blocks).unwrap_or(i64::MAX));
        index_snapshots.get_or_create(&l).inc_by(snapshots);
    }
    r.register(
        "llmapi_worker_healthy",
        "1 while the worker takes new requests (healthy, breaker not open, not draining)",
        healthy,
    );
    r.register(
        "llmapi_worker_inflight_requests",
        "Worker requests this router has in flight on the worker",
        inflight,
    );
    r.register(
        "llmapi_worker_requests",
        "Worker requests that produced a response, by worker",
        routed,
    );
    r.register(
        "llmapi_worker_kv_blocks_used",
        "KV blocks the worker holds for requests or its prefix cache, or has promised",
        kv_used,
    );
    r.register(
        "llmapi_worker_kv_cache_usage_ratio",
        "Fraction of the worker's KV blocks in use (0 to 1)",
        kv_usage,
    );
    r.register(
        "llmapi_worker_num_requests_running",
        "Requests in the worker's running batch",
        running,
    );
    r.register(
        "llmapi_worker_num_requests_waiting",
        "Requests waiting in the worker's scheduler queue",
        waiting,
    );
    r.register(
        "llmapi_worker_prefix_cache_queries",
        "Prompt tokens the worker looked up in its prefix cache since it started",
        prefix_queries,
    );
    r.register(
        "llmapi_worker_prefix_cache_hits",
        "Of those, tokens found cached",
        prefix_hits,
    );
    r.register(
        "llmapi_worker_prefix_cache_hit_ratio",
        "Prefix-cache hits over queries since the worker started (0 to 1; 0 before any query)",
        prefix_ratio,
    );
    r.register(
        "llmapi_worker_num_preemptions",
        "Sequences the worker preempted (KV dropped, recomputed later) since it started",
        preemptions,
    );
    r.register(
        "llmapi_worker_iterations",
        "Engine iterations (steps) the worker ran since it started",
        iterations,
    );
    r.register(
        "llmapi_worker_iteration_tokens",
        "Tokens those iterations computed (prefill and decode); per step: rate over iterations",
        iteration_tokens,
    );
    r.register(
        "llmapi_worker_spec_decode_num_draft_tokens",
        "Speculative decoding: draft tokens the worker verified since it started",
        spec_drafted,
    );
    r.register(
        "llmapi_worker_spec_decode_num_accepted_tokens",
        "Of those, drafts the model agreed with (emitted without a step of their own)",
        spec_accepted,
    );
    r.register(
        "llmapi_worker_step_duration_seconds",
        "Wall time of each engine step (scheduling and forward pass) since the worker started",
        step_seconds,
    );
    r.register(
        "llmapi_worker_step_batch_size",
        "Sequences in each engine step since the worker started",
        step_batch,
    );
    r.register(
        "llmapi_worker_step_tokens",
        "Tokens each engine step computed (prefill and decode) since the worker started",
        step_tokens,
    );
    r.register(
        "llmapi_worker_kv_index_blocks",
        "Prefix-cache blocks the router's KV index says the worker holds (from its KV events)",
        index_blocks,
    );
    r.register(
        "llmapi_worker_kv_index_snapshots",
        "KV snapshots the router applied for the worker: the first, then one per resync (a gap or a restart)",
        index_snapshots,
    );
    r
}
