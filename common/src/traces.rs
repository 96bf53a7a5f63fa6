//! Request traces on the OpenTelemetry crates: every `tracing` span of the router
//! (`llmapi_router::*`) and the worker (`llmapi_worker::*`) is an OpenTelemetry span
//! (`tracing-opentelemetry`), exported over OTLP/gRPC (`opentelemetry-otlp`) when
//! `--otlp_traces_endpoint` is set, and W3C Trace Context crosses the hops with the SDK's
//! `TraceContextPropagator` (HTTP headers in, gRPC metadata router -> worker).
//!
//! `Tracers` holds one tracer provider per service in the process (`llmapi-launch serve` runs
//! the router and a worker side by side, each with its own `service.name`); `init_logging`
//! installs their layers next to the log lines. Without an endpoint the tracers still give
//! each span its ids, so trace context is passed on and logged, but nothing is sent.
//! Not for: metrics or log export, TLS to the collector.

pub mod testing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::{Layer, Registry};

/// How long a binary waits at exit for the last spans to be sent.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Finished spans waiting to be sent past which new ones are dropped (and the first drop is
/// logged, the total at shutdown): a request never waits for the collector.
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans per Export call.
pub const MAX_BATCH: usize = 512;
/// How often a partial batch is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Limit of one Export call.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed exports are logged at most this often (one warning with the spans lost since).
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The target suffix of spans that are logged but never exported (`llmapi_router::untraced`
/// for `/health`, `/metrics` and other routes outside `/v1/`).
pub const UNTRACED: &str = "untraced";

/// Environment variables read, in order, when no `--otlp_traces_endpoint` is given (the
/// OpenTelemetry SDKs' own names).
pub const ENDPOINT_ENV: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// A service whose spans are traced, with its `service.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `llmapi-router`: spans of `llmapi_router`.
    Router,
    /// `llmapi-worker`: spans of `llmapi_worker`.
    Worker,
}

impl Service {
    /// The `service.name` resource attribute.
    pub fn name(self) -> &'static str {
        match self {
            Service::Router => "llmapi-router",
            Service::Worker => "llmapi-worker",
        }
    }

    /// The `tracing` target (crate) whose spans belong to this service.
    pub fn target(self) -> &'static str {
        match self {
            Service::Router => "llmapi_router",
            Service::Worker => "llmapi_worker",
        }
    }

    /// The service's spans at info level and above, less its `::untraced` target.
    fn filter(self) -> Targets {
        Targets::new()
            .with_target(self.target(), LevelFilter::INFO)
            .with_target(format!("{}::{UNTRACED}", self.target()), LevelFilter::OFF)
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
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
    /// The exporter or its runtime could not be built.
    #[error("starting the OTLP trace exporter for {endpoint}: {why}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        why: String,
    },
}

/// The endpoint to export to: the flag when given, else the first of `ENDPOINT_ENV` set and
/// not empty, else none.
pub fn endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned).or_else(|| {
        ENDPOINT_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok())
            .find(|v| !v.trim().is_empty())
    })
}

/// The URI an endpoint names: `host:port` gains `http://`; `https://` and other schemes are
/// refused (this build sends plain-text gRPC only).
pub fn endpoint_uri(endpoint: &str) -> Result<String, TraceError> {
    let bad = |why: &str| TraceError::BadEndpoint {
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
    tonic::transport::Endpoint::from_shared(uri.clone()).map_err(|err| bad(&err.to_string()))?;
    Ok(uri)
}

/// The tracer providers of the services in this process, and the small runtime that drives
/// their gRPC channel (so spans are sent whatever runtime, if any, the caller runs).
pub struct Tracers {
    providers: Vec<(Service, SdkTracerProvider)>,
    endpoint: Option<String>,
    runtime: Option<ExportRuntime>,
    lost: Arc<AtomicU64>,
}

impl std::fmt::Debug for Tracers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracers")
            .field(
                "services",
                &self
                    .providers
                    .iter()
                    .map(|(s, _)| s.name())
                    .collect::<Vec<_>>(),
            )
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// A current-thread Tokio runtime on its own thread, running until stopped.
struct ExportRuntime {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Tracers {
    /// Tracers that give spans ids and pass trace context on but export nothing. A trace this
    /// process starts is not sampled (flags `00`); a caller's sampled flag is kept.
    pub fn local(services: &[Service]) -> Self {
        let providers = services
            .iter()
            .map(|&s| {
                let provider = SdkTracerProvider::builder()
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
                    .with_resource(resource(s))
                    .build();
                (s, provider)
            })
            .collect();
        Self {
            providers,
            endpoint: None,
            runtime: None,
            lost: Arc::default(),
        }
    }

    /// Tracers that export to `endpoint` over OTLP/gRPC: batches of `MAX_BATCH` every
    /// `FLUSH_INTERVAL` from a queue of `QUEUE_CAPACITY` (full: dropped, never waited for).
    /// A span is sampled when its caller's is, or when it starts a trace (parent-based,
    /// always on); a caller that sends flags `00` gets none.
    pub fn otlp(endpoint: &str, services: &[Service]) -> Result<Self, TraceError> {
        let uri = endpoint_uri(endpoint)?;
        let failed = |why: String| TraceError::Exporter {
            endpoint: uri.clone(),
            why,
        };
        let lost = Arc::new(AtomicU64::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let mut providers = Vec::new();
        {
            // The gRPC channel's task is spawned on this runtime.
            let _enter = rt.enter();
            for &s in services {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(EXPORT_TIMEOUT)
                    .with_channel(
                        tonic::transport::Endpoint::from_shared(uri.clone())
                            .map_err(|e| failed(e.to_string()))?
                            .connect_timeout(EXPORT_TIMEOUT)
                            .timeout(EXPORT_TIMEOUT)
                            .connect_lazy(),
                    )
                    .build()
                    .map_err(|e| failed(e.to_string()))?;
                let batch = BatchConfigBuilder::default()
                    .with_max_queue_size(QUEUE_CAPACITY)
                    .with_max_export_batch_size(MAX_BATCH)
                    .with_scheduled_delay(FLUSH_INTERVAL)
                    .build();
                let exporter = Quiet {
                    inner: exporter,
                    endpoint: uri.clone(),
                    lost: lost.clone(),
                    log: Mutex::default(),
                };
                let processor = BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build();
                let provider = SdkTracerProvider::builder()
                    .with_span_processor(processor)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                    .with_resource(resource(s))
                    .build();
                providers.push((s, provider));
            }
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            providers,
            endpoint: Some(uri),
            runtime: Some(ExportRuntime { stop, thread }),
            lost,
        })
    }

    /// `otlp` when `endpoint` is given, else `local`.
    pub fn new(endpoint: Option<&str>, services: &[Service]) -> Result<Self, TraceError> {
        match endpoint {
            Some(e) => Self::otlp(e, services),
            None => Ok(Self::local(services)),
        }
    }

    /// No services: `init_logging` with these installs log lines only.
    pub fn none() -> Self {
        Self::local(&[])
    }

    /// Where spans are sent (`http://…`), if anywhere.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Spans lost to failed Export calls so far (spans dropped because the queue was full
    /// are logged by the SDK instead: the first drop, and the total at shutdown).
    pub fn spans_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// One `tracing-opentelemetry` layer per service, each seeing only its service's spans;
    /// their tracers become the services' `tracer`.
    pub fn layers(&self) -> Vec<Box<dyn Layer<Registry> + Send + Sync>> {
        self.providers
            .iter()
            .map(|(s, provider)| {
                let tracer = provider.tracer(s.target());
                if let Ok(mut t) = INSTALLED.lock() {
                    t.retain(|(installed, _)| installed != s);
                    t.push((*s, tracer.clone()));
                }
                // Code location, target and busy/idle time stay; a task's thread does not
                // (async tasks move between threads).
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_threads(false)
                    .with_filter(s.filter())
                    .boxed()
            })
            .collect()
    }

    /// Sends the spans still queued, waiting at most `SHUTDOWN_TIMEOUT` per service, then stops
    /// the export runtime. Blocking: from async code run it with `spawn_blocking`.
    pub fn shutdown(self) {
        for (s, provider) in &self.providers {
            if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
                && self.endpoint.is_some()
            {
                tracing::warn!(service = s.name(), error = %e, "trace export did not finish at shutdown; the rest of the spans are lost");
            }
        }
        if let Some(rt) = self.runtime {
            let _ = rt.stop.send(());
            let _ = rt.thread.join();
        }
    }
}

/// The OTLP exporter with its failures counted and logged as one warning per
/// `ERROR_LOG_INTERVAL` (the SDK alone logs an error per failed batch, every second while a
/// collector is down).
#[derive(Debug)]
struct Quiet<E> {
    inner: E,
    endpoint: String,
    lost: Arc<AtomicU64>,
    log: Mutex<FailureLog>,
}

/// When a failure was last logged, and the failures since.
#[derive(Debug, Default)]
struct FailureLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl<E: SpanExporter> SpanExporter for Quiet<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let Err(e) = self.inner.export(batch).await else {
            return Ok(());
        };
        let lost = self.lost.fetch_add(n, Ordering::Relaxed) + n;
        let Ok(mut log) = self.log.lock() else {
            return Ok(());
        };
        log.unlogged += 1;
        if log.last.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL) {
            tracing::warn!(
                endpoint = %self.endpoint,
                error = %e,
                failed_exports = log.unlogged,
                spans_lost = lost,
                "trace export failed; requests are unaffected (logged at most every {}s)",
                ERROR_LOG_INTERVAL.as_secs()
            );
            log.last = Some(Instant::now());
            log.unlogged = 0;
        }
        // Logged here: the SDK need not log it again.
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The tracers of the layers installed last, by service.
static INSTALLED: Mutex<Vec<(Service, SdkTracer)>> = Mutex::new(Vec::new());

/// The tracer behind `service`'s layer, for spans whose times are known only afterwards
/// (`SpanBuilder::with_start_time`); `None` before any `Tracers::layers` call for it.
pub fn tracer(service: Service) -> Option<SdkTracer> {
    INSTALLED
        .lock()
        .ok()?
        .iter()
        .find(|(s, _)| *s == service)
        .map(|(_, t)| t.clone())
}

/// `service.name` (over `OTEL_SERVICE_NAME`), `service.version`, `process.pid`, and whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(s: Service) -> Resource {
    Resource::builder()
        .with_service_name(s.name())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("process.pid", i64::from(std::process::id())),
        ])
        .build()
}

/// HTTP headers as the propagator reads them; several `tracestate` headers form one list,
/// in order.
struct HttpHeaders<'a> {
    headers: &'a HeaderMap,
    tracestate: Option<String>,
}

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("tracestate") {
            return self.tracestate.as_deref();
        }
        self.headers.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.headers.keys().map(|k| k.as_str()).collect()
    }
}

/// gRPC metadata, with the request's `traceparent` field when the metadata has none.
struct GrpcMetadata<'a> {
    metadata: &'a MetadataMap,
    traceparent_field: &'a str,
}

impl Extractor for GrpcMetadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let v = self.metadata.get(key).and_then(|v| v.to_str().ok());
        if v.is_none() && key == "traceparent" && !self.traceparent_field.is_empty() {
            return Some(self.traceparent_field);
        }
        v
    }

    fn keys(&self) -> Vec<&str> {
        self.metadata
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from HTTP headers (`traceparent`, `tracestate`); empty when it
/// sent none or an invalid one, which makes this hop start a trace.
pub fn extract_http(headers: &HeaderMap) -> Context {
    let states: Vec<&str> = headers
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let carrier = HttpHeaders {
        headers,
        tracestate: (!states.is_empty()).then(|| states.join(",")),
    };
    TraceContextPropagator::new().extract(&carrier)
}

/// The caller's trace context from gRPC metadata, else from the request's `traceparent` field.
pub fn extract_grpc(metadata: &MetadataMap, traceparent_field: &str) -> Context {
    TraceContextPropagator::new().extract(&GrpcMetadata {
        metadata,
        traceparent_field,
    })
}

/// This hop's place in its trace, as log lines name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HopIds {
    /// 32 hex digits (all zero when no tracer saw the span).
    pub trace_id: String,
    /// This hop's span, 16 hex digits.
    pub span_id: String,
    /// The caller's span, 16 hex digits, or empty when this hop started the trace.
    pub parent_span_id: String,
    /// Whether the span is sampled (exported when an endpoint is set).
    pub sampled: bool,
}

/// Makes `span` a child of the caller's `parent` context (an empty one: a new trace), starts
/// it under its own service's tracer, and returns its ids.
pub fn continue_span(span: &tracing::Span, parent: Context) -> HopIds {
    let caller = parent.span().span_context().clone();
    // Without a tracing-opentelemetry layer (a bare test subscriber) the span has no
    // OpenTelemetry side: its ids read as zero and nothing is exported.
    let _ = span.set_parent(parent);
    // Entering starts the span with the layer that sees it (the service's own tracer).
    span.in_scope(|| {});
    let own = span_context(span);
    HopIds {
        trace_id: own.trace_id().to_string(),
        span_id: own.span_id().to_string(),
        parent_span_id: if caller.is_valid() {
            caller.span_id().to_string()
        } else {
            String::new()
        },
        sampled: own.is_sampled(),
    }
}

/// The OpenTelemetry span context of a started `span`.
pub fn span_context(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// The W3C headers that carry a span to the next hop, as the SDK's propagator writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    /// `00-TRACE-SPAN-FLAGS`; empty when the span has no valid context.
    pub traceparent: String,
    /// The caller's `tracestate`, passed on; empty when it sent none.
    pub tracestate: String,
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" => self.tracestate = value,
            _ => {}
        }
    }
}

impl TraceHeaders {
    /// The headers naming `span` (started) as the next hop's parent.
    pub fn of_span(span: &tracing::Span) -> Self {
        let mut headers = Self::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
        headers
    }

    /// Adds `traceparent` and (when not empty) `tracestate` to gRPC metadata.
    pub fn insert_into(&self, metadata: &mut MetadataMap) {
        for (key, value) in [
            ("traceparent", &self.traceparent),
            ("tracestate", &self.tracestate),
        ] {
            if value.is_empty() {
                continue;
            }
            if let Ok(v) = MetadataValue::try_from(value.as_str()) {
                metadata.insert(key, v);
            }
        }
    }
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
    fn several_tracestate_headers_are_one_list_and_bad_parents_start_a_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        h.append("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        h.append("tracestate", "rojo=00f067aa0ba902b7".parse().unwrap());
        let cx = extract_http(&h);
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(
            sc.trace_state().header(),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        for bad in [
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-xyz-b7ad6b7169203331-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            assert!(!extract_http(&h).span().span_context().is_valid(), "{bad}");
        }
    }

    #[test]
    fn grpc_metadata_wins_over_the_request_field() {
        let field = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let empty = MetadataMap::new();
        let from_field = extract_grpc(&empty, field);
        assert_eq!(
            from_field.span().span_context().span_id().to_string(),
            "b7ad6b7169203331"
        );
        let mut md = MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        let sc = extract_grpc(&md, field).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(!sc.is_sampled());
    }
}
