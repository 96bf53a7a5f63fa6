//! The span queue and the task that sends it to the collector in batches.
//!
//! `SpanExporter::export` never waits: it puts a finished span on a bounded queue, or drops
//! and counts it when the queue is full. A background task sends a batch every
//! `flush_interval` or when `max_batch` spans are waiting; `ExportTask::shutdown` sends what is
//! left within a timeout. A failed export loses its batch and is logged at most once per
//! `ERROR_LOG_INTERVAL`; it never stops the task.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use crate::proto::{
    AnyValue, ExportTraceServiceRequest, ExportTraceServiceResponse, InstrumentationScope,
    KeyValue, Resource, ResourceSpans, ScopeSpans, Span, Value,
};

/// The gRPC method of OTLP trace export.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// How long a binary waits at exit for the last spans to be sent.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Export failures are logged at most this often.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where and how spans are sent.
#[derive(Debug, Clone)]
pub struct ExporterConfig {
    /// `http://host:port` or `host:port` (OTLP/gRPC, usually port 4317).
    pub endpoint: String,
    /// The `service.name` resource attribute (`llmapi-router`, `llmapi-worker`).
    pub service_name: String,
    /// Spans waiting to be sent past which new ones are dropped.
    pub queue_capacity: usize,
    /// Spans per Export call; a full batch is sent without waiting for the interval.
    pub max_batch: usize,
    /// How often a partial batch is sent.
    pub flush_interval: Duration,
    /// Limit of one Export call, connecting included.
    pub export_timeout: Duration,
}

impl ExporterConfig {
    /// Defaults for `endpoint` and `service_name`: 4096 queued spans, batches of 512, a flush
    /// every second, 5 s per export.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            queue_capacity: 4096,
            max_batch: 512,
            flush_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// Why an exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The endpoint is not a plain-text gRPC address.
    #[error(
        "otlp_traces_endpoint {endpoint:?} is not usable ({why}); give http://host:4317 or host:4317"
    )]
    BadEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The URI an endpoint flag names: `host:port` gains `http://`; `https://` is refused (this
/// build sends plain-text gRPC only).
pub fn endpoint_uri(endpoint: &str) -> Result<String, ExporterError> {
    let bad = |why: &str| ExporterError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        why: why.to_owned(),
    };
    let e = endpoint.trim();
    if e.is_empty() {
        return Err(bad("it is empty"));
    }
    if e.starts_with("https://") {
        return Err(bad(
            "TLS is not supported; use a collector reachable over http://",
        ));
    }
    let uri = if e.starts_with("http://") {
        e.to_owned()
    } else if e.contains("://") {
        return Err(bad("only the http:// scheme is supported"));
    } else {
        format!("http://{e}")
    };
    Endpoint::from_shared(uri.clone()).map_err(|err| bad(&err.to_string()))?;
    Ok(uri)
}

/// Counts of what happened to spans, for logs and tests.
#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

/// Hands finished spans to the export task; cheap to clone, never blocks.
#[derive(Clone)]
pub struct SpanExporter {
    tx: mpsc::Sender<Span>,
    counters: Arc<Counters>,
}

impl fmt::Debug for SpanExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanExporter")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl SpanExporter {
    /// Starts the export task on the current Tokio runtime.
    pub fn start(config: ExporterConfig) -> Result<(Self, ExportTask), ExporterError> {
        let uri = endpoint_uri(&config.endpoint)?;
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| ExporterError::BadEndpoint {
                endpoint: config.endpoint.clone(),
                why: e.to_string(),
            })?
            .connect_timeout(config.export_timeout)
            .timeout(config.export_timeout)
            .connect_lazy();
        let (exporter, rx) = Self::queue(config.queue_capacity);
        let (stop, stopped) = oneshot::channel();
        let counters = exporter.counters.clone();
        let join = tokio::spawn(run(rx, stopped, Grpc::new(channel), config, uri, counters));
        Ok((exporter, ExportTask { stop, join }))
    }

    /// An exporter over a queue of `capacity` spans, and the queue's receiving end.
    fn queue(capacity: usize) -> (Self, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let exporter = Self {
            tx,
            counters: Arc::default(),
        };
        (exporter, rx)
    }

    /// Queues `span` for export, or drops and counts it when the queue is full or the export
    /// task has stopped.
    pub fn export(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped because the queue was full (or the task had stopped).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.counters.exported.load(Ordering::Relaxed)
    }

    /// Spans lost to failed Export calls.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }
}

/// The running export task.
#[derive(Debug)]
pub struct ExportTask {
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<()>,
}

impl ExportTask {
    /// Sends the spans still queued, waiting at most `timeout`; what is not sent by then is lost.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(());
        let mut join = self.join;
        if tokio::time::timeout(timeout, &mut join).await.is_err() {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                "trace export did not finish within the shutdown timeout; the rest of the spans are lost"
            );
            join.abort();
        }
    }
}

/// The export loop: batch, send on size or interval, drain on stop.
async fn run(
    mut rx: mpsc::Receiver<Span>,
    mut stopped: oneshot::Receiver<()>,
    grpc: Grpc<Channel>,
    config: ExporterConfig,
    uri: String,
    counters: Arc<Counters>,
) {
    let resource = Resource {
        attributes: vec![
            key_value("service.name", config.service_name.clone().into()),
            key_value("service.version", env!("CARGO_PKG_VERSION").into()),
            key_value("process.pid", std::process::id().into()),
        ],
        dropped_attributes_count: 0,
    };
    let mut sender = Sender {
        grpc,
        resource,
        uri,
        timeout: config.export_timeout,
        counters,
        last_log: None,
        unlogged_failures: 0,
    };
    let max_batch = config.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            span = rx.recv() => match span {
                Some(s) => {
                    batch.push(s);
                    if batch.len() >= max_batch {
                        sender.send(std::mem::take(&mut batch)).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    sender.send(std::mem::take(&mut batch)).await;
                }
            }
        }
    }
    while let Ok(s) = rx.try_recv() {
        batch.push(s);
        if batch.len() >= max_batch {
            sender.send(std::mem::take(&mut batch)).await;
        }
    }
    if !batch.is_empty() {
        sender.send(batch).await;
    }
}

fn key_value(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

/// One Export call at a time, with rate-limited failure logs.
struct Sender {
    grpc: Grpc<Channel>,
    resource: Resource,
    uri: String,
    timeout: Duration,
    counters: Arc<Counters>,
    last_log: Option<Instant>,
    unlogged_failures: u64,
}

impl Sender {
    async fn send(&mut self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: env!("CARGO_PKG_NAME").to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let outcome = tokio::time::timeout(self.timeout, export(&mut self.grpc, request)).await;
        let error = match outcome {
            Ok(Ok(response)) => {
                let rejected = response
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                self.counters
                    .exported
                    .fetch_add(n.saturating_sub(rejected), Ordering::Relaxed);
                if rejected == 0 {
                    return;
                }
                self.counters.failed.fetch_add(rejected, Ordering::Relaxed);
                format!("the collector rejected {rejected} of {n} spans")
            }
            Ok(Err(status)) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                format!("{}: {}", status.code(), status.message())
            }
            Err(_) => {
                self.counters.failed.fetch_add(n, Ordering::Relaxed);
                format!("no answer within {:.1}s", self.timeout.as_secs_f64())
            }
        };
        self.unlogged_failures += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL)
        {
            tracing::warn!(
                endpoint = %self.uri,
                error = %error,
                failed_exports = self.unlogged_failures,
                spans_lost = self.counters.failed.load(Ordering::Relaxed),
                spans_dropped_queue_full = self.counters.dropped.load(Ordering::Relaxed),
                "trace export failed; requests are unaffected (logged at most every {}s)",
                ERROR_LOG_INTERVAL.as_secs()
            );
            self.last_log = Some(Instant::now());
            self.unlogged_failures = 0;
        }
    }
}

async fn export(
    grpc: &mut Grpc<Channel>,
    request: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("collector not reachable: {e}")))?;
    let codec: ProstCodec<ExportTraceServiceRequest, ExportTraceServiceResponse> =
        ProstCodec::default();
    grpc.unary(
        tonic::Request::new(request),
        PathAndQuery::from_static(EXPORT_PATH),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_and_without_a_scheme_are_accepted() {
        assert_eq!(
            endpoint_uri("localhost:4317").unwrap(),
            "http://localhost:4317"
        );
        assert_eq!(
            endpoint_uri("http://10.0.0.1:4317").unwrap(),
            "http://10.0.0.1:4317"
        );
        for bad in ["", "https://c:4317", "grpc://c:4317"] {
            let e = endpoint_uri(bad).unwrap_err().to_string();
            assert!(e.contains("host:4317"), "{e}");
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (exporter, mut rx) = SpanExporter::queue(3);
        for _ in 0..10 {
            exporter.export(Span::default());
        }
        assert_eq!(exporter.dropped(), 7);
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 3);
    }
}
