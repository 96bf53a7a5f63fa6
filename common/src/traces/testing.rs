//! `CollectorDouble`: a test double of an OpenTelemetry collector. It serves the OTLP
//! `TraceService/Export` that `opentelemetry-proto` generates on a loopback port and keeps
//! every span it receives, tagged with the sender's `service.name`. Also `subscriber`, a
//! `tracing` subscriber with the tracers' layers for in-process tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt;

use super::Tracers;

/// A `tracing` subscriber with `tracers`' layers and no log output, for a test to install
/// with `tracing::subscriber::set_default` (its thread) or `set_global_default`.
pub fn subscriber(tracers: &Tracers) -> impl tracing::Subscriber + Send + Sync + 'static {
    tracing_subscriber::registry().with(tracers.layers())
}

/// A span as the double received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `service.name` of the span's resource.
    pub service_name: String,
    /// The span.
    pub span: Span,
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

impl ReceivedSpan {
    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id as 16 hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id as 16 hex digits, or empty for a root span.
    pub fn parent_id_hex(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// Whether the span's status is ERROR, and its message.
    pub fn error(&self) -> Option<&str> {
        self.span
            .status
            .as_ref()
            .filter(|s| s.code == StatusCode::Error as i32)
            .map(|s| s.message.as_str())
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        match find(&self.span.attributes, key)? {
            Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    /// A float attribute.
    pub fn double(&self, key: &str) -> Option<f64> {
        match find(&self.span.attributes, key)? {
            Value::DoubleValue(v) => Some(*v),
            _ => None,
        }
    }

    /// A string attribute.
    pub fn string(&self, key: &str) -> Option<&str> {
        match find(&self.span.attributes, key)? {
            Value::StringValue(v) => Some(v),
            _ => None,
        }
    }

    /// A boolean attribute.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match find(&self.span.attributes, key)? {
            Value::BoolValue(v) => Some(*v),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

/// A fake collector on `127.0.0.1`; stops when dropped.
pub struct CollectorDouble {
    addr: SocketAddr,
    received: Received,
    stop: Option<oneshot::Sender<()>>,
}

impl CollectorDouble {
    /// Serves on a free loopback port (on the current Tokio runtime).
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Received::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(Keep(received.clone()));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            addr,
            received,
            stop: Some(stop),
        })
    }

    /// `http://127.0.0.1:PORT`, as `--otlp_traces_endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Polls every 50 ms until `done` holds for the spans received, at most `timeout`; returns
    /// the spans either way.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) || start.elapsed() >= timeout {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CollectorDouble {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The double's `TraceService`: keeps what it is sent.
struct Keep(Received);

#[tonic::async_trait]
impl TraceService for Keep {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service_name = rs
                .resource
                .as_ref()
                .and_then(|r| find(&r.attributes, "service.name"))
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|span| ReceivedSpan {
                    service_name: service_name.clone(),
                    span,
                }));
            }
        }
        if let Ok(mut r) = self.0.lock() {
            r.extend(spans);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::{Service, TraceHeaders, continue_span, extract_http};
    use tonic::codegen::http::HeaderMap;
    use tracing_subscriber::Layer as _;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn parent() -> opentelemetry::Context {
        let mut h = HeaderMap::new();
        h.insert("traceparent", PARENT.parse().unwrap());
        extract_http(&h)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tracing_span_reaches_the_collector_with_its_service_name_and_parent() {
        let collector = CollectorDouble::start().await.unwrap();
        let tracers = Tracers::otlp(&collector.endpoint(), &[Service::Router]).unwrap();
        let guard = tracing::subscriber::set_default(subscriber(&tracers));
        let span = tracing::info_span!(
            target: "llmapi_router::test",
            "request",
            otel.name = "POST /v1/completions",
            otel.kind = "server",
        );
        let ids = continue_span(&span, parent());
        assert_eq!(ids.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(ids.parent_span_id, "b7ad6b7169203331");
        assert!(ids.sampled);
        let next = TraceHeaders::of_span(&span);
        assert_eq!(
            next.traceparent,
            format!("00-{}-{}-01", ids.trace_id, ids.span_id)
        );
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.set_attribute("gen_ai.usage.output_tokens", 7i64);
            span.set_attribute("gen_ai.request.temperature", 0.5f64);
        }
        // A span of another crate is not the router's, and an untraced one is not exported.
        tracing::info_span!(target: "hyper::client", "connect").in_scope(|| {});
        tracing::info_span!(target: "llmapi_router::untraced", "request").in_scope(|| {});
        drop(span);
        drop(guard);
        tokio::task::spawn_blocking(move || tracers.shutdown())
            .await
            .unwrap();
        let spans = collector.spans();
        assert_eq!(spans.len(), 1, "{spans:?}");
        let s = &spans[0];
        assert_eq!(s.service_name, "llmapi-router");
        assert_eq!(s.span.name, "POST /v1/completions");
        assert_eq!(s.kind(), SpanKind::Server);
        assert_eq!(s.trace_id_hex(), ids.trace_id);
        assert_eq!(s.span_id_hex(), ids.span_id);
        assert_eq!(s.parent_id_hex(), "b7ad6b7169203331");
        assert_eq!(s.int("gen_ai.usage.output_tokens"), Some(7));
        assert_eq!(s.double("gen_ai.request.temperature"), Some(0.5));
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_collector_never_blocks_spans_or_shutdown() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tracers = Tracers::otlp(&format!("127.0.0.1:{port}"), &[Service::Worker]).unwrap();
        // The SDK's own warnings, as the binaries' log lines show them.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let warnings = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || LogBuf(sink.clone()))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("opentelemetry_sdk", tracing::Level::WARN),
            );
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::registry()
                .with(tracers.layers())
                .with(warnings),
        );
        // Twice the queue while the first export waits on the dead address: the rest drop.
        for _ in 0..(2 * super::super::QUEUE_CAPACITY) {
            tracing::info_span!(target: "llmapi_worker::test", "generate").in_scope(|| {});
        }
        drop(guard);
        // The batch sent meanwhile failed, and its spans are counted as lost.
        let start = Instant::now();
        while tracers.spans_lost() == 0 && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(tracers.spans_lost() > 0);
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("WARN") && text.contains("dropped a Span due to queue full"),
            "no log line says spans were dropped: {text:?}"
        );
        // Shutdown gives up after its timeout, whatever the collector does.
        let done = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || tracers.shutdown()),
        )
        .await;
        assert!(done.is_ok(), "shutdown hung on an unreachable collector");
    }

    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn local_tracers_give_ids_and_keep_the_callers_flags() {
        let tracers = Tracers::local(&[Service::Worker]);
        let _guard = tracing::subscriber::set_default(subscriber(&tracers));
        let span = tracing::info_span!(target: "llmapi_worker::test", "generate");
        let ids = continue_span(&span, parent());
        assert_eq!(ids.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert!(ids.sampled, "the caller's sampled flag is kept");
        let root = tracing::info_span!(target: "llmapi_worker::test", "generate");
        let ids = continue_span(&root, opentelemetry::Context::new());
        assert_ne!(ids.trace_id, "0".repeat(32));
        assert!(ids.parent_span_id.is_empty());
        assert!(
            !ids.sampled,
            "a trace started without an endpoint is not sampled"
        );
    }
}
