//! Prometheus text for /metrics: request counts by route and status, tokens, retries,
//! migrations and per-worker state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::admission::Refused;
use crate::pool::Pool;

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

/// Router counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    retries: AtomicU64,
    worker_failures: AtomicU64,
    rejected_too_large: AtomicU64,
    rejected_queue_full: AtomicU64,
    rejected_queue_timeout: AtomicU64,
    rejected_draining: AtomicU64,
    timeouts: AtomicU64,
    /// Choices moved off a worker that failed mid-stream, by (that worker, cause).
    migrations: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// Counts one answered HTTP request.
    pub fn record_request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_owned(), status)).or_default() += 1;
    }

    /// Counts prompt tokens sent to workers.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts tokens received from workers.
    pub fn add_generation_tokens(&self, n: usize) {
        self.generation_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a retry on another worker.
    pub fn inc_retries(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a worker failure seen by a request.
    pub fn inc_worker_failures(&self) {
        self.worker_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused by admission control (or by the tokenizer pool), by reason.
    pub fn inc_rejected(&self, why: &Refused) {
        let counter = match why {
            Refused::TooLarge { .. } => &self.rejected_too_large,
            Refused::QueueFull { .. } => &self.rejected_queue_full,
            Refused::TimedOut { .. } => &self.rejected_queue_timeout,
            Refused::Closed => &self.rejected_draining,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a choice that ran past its deadline (`--request_timeout`,
    /// `--first_token_timeout`).
    pub fn inc_timeouts(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a choice moved off `worker`, which failed mid-stream with `cause` (a
    /// `migrate::Cause` label), to another worker that took it.
    pub fn inc_migrations(&self, worker: &str, cause: &'static str) {
        let mut m = self.migrations.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((worker.to_owned(), cause)).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, pool: &Pool, admission: AdmissionGauges) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE llmapi_router_requests_total counter");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "llmapi_router_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            ("llmapi_router_prompt_tokens_total", &self.prompt_tokens),
            (
                "llmapi_router_generation_tokens_total",
                &self.generation_tokens,
            ),
            ("llmapi_router_retries_total", &self.retries),
            ("llmapi_router_worker_failures_total", &self.worker_failures),
            ("llmapi_router_timeouts_total", &self.timeouts),
        ];
        for (name, v) in counters {
            let _ = writeln!(
                s,
                "# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(s, "# TYPE llmapi_router_migrations_total counter");
        for ((worker, cause), n) in self
            .migrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "llmapi_router_migrations_total{{worker=\"{worker}\",cause=\"{cause}\"}} {n}"
            );
        }
        let _ = writeln!(s, "# TYPE llmapi_router_rejected_requests_total counter");
        for (reason, v) in [
            ("too_large", &self.rejected_too_large),
            ("queue_full", &self.rejected_queue_full),
            ("queue_timeout", &self.rejected_queue_timeout),
            ("draining", &self.rejected_draining),
        ] {
            let _ = writeln!(
                s,
                "llmapi_router_rejected_requests_total{{reason=\"{reason}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            ("llmapi_router_inflight_requests", admission.inflight),
            (
                "llmapi_router_inflight_worker_requests",
                admission.slots_used,
            ),
            (
                "llmapi_router_inflight_worker_requests_limit",
                admission.limit,
            ),
            ("llmapi_router_queued_requests", admission.queued),
        ];
        for (name, v) in gauges {
            let _ = writeln!(s, "# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(s, "# TYPE llmapi_worker_healthy gauge");
        let workers = pool.all();
        for w in &workers {
            let _ = writeln!(
                s,
                "llmapi_worker_healthy{{worker=\"{}\"}} {}",
                w.url,
                u8::from(w.routable())
            );
        }
        let _ = writeln!(s, "# TYPE llmapi_worker_inflight_requests gauge");
        for w in &workers {
            let _ = writeln!(
                s,
                "llmapi_worker_inflight_requests{{worker=\"{}\"}} {}",
                w.url,
                w.inflight()
            );
        }
        let _ = writeln!(s, "# TYPE llmapi_worker_requests_total counter");
        for w in &workers {
            let _ = writeln!(
                s,
                "llmapi_worker_requests_total{{worker=\"{}\"}} {}",
                w.url,
                w.routed()
            );
        }
        let _ = writeln!(s, "# TYPE llmapi_worker_kv_blocks_used gauge");
        for w in &workers {
            let _ = writeln!(
                s,
                "llmapi_worker_kv_blocks_used{{worker=\"{}\"}} {}",
                w.url,
                w.load().kv_blocks_used
            );
        }
        s
    }
}
