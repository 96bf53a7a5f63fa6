//! `CollectorDouble`: a test double of an OTLP trace collector. It answers
//! `TraceService/Export` on a loopback port with the same message structs the exporter sends
//! and keeps every span it receives, tagged with the sender's `service.name`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic_prost::ProstCodec;

use crate::exporter::EXPORT_PATH;
use crate::proto::{ExportTraceServiceRequest, ExportTraceServiceResponse, KeyValue, Span, Value};

/// A span as the double received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `service.name` of the span's resource.
    pub service_name: String,
    /// The span.
    pub span: Span,
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

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        match KeyValue::find(&self.span.attributes, key)? {
            Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    /// A float attribute.
    pub fn double(&self, key: &str) -> Option<f64> {
        match KeyValue::find(&self.span.attributes, key)? {
            Value::DoubleValue(v) => Some(*v),
            _ => None,
        }
    }

    /// A string attribute.
    pub fn string(&self, key: &str) -> Option<&str> {
        match KeyValue::find(&self.span.attributes, key)? {
            Value::StringValue(v) => Some(v),
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
        let service = TraceServiceDouble(received.clone());
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

/// The Export method of the double.
#[derive(Clone)]
struct TraceServiceDouble(Received);

impl NamedService for TraceServiceDouble {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl UnaryService<ExportTraceServiceRequest> for TraceServiceDouble {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<ExportTraceServiceRequest>) -> Self::Future {
        let mut spans = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service_name = rs
                .resource
                .as_ref()
                .and_then(|r| KeyValue::find(&r.attributes, "service.name"))
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
        Box::pin(async { Ok(tonic::Response::new(ExportTraceServiceResponse::default())) })
    }
}

impl<B> Service<http::Request<B>> for TraceServiceDouble
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = self.clone();
        Box::pin(async move {
            if req.uri().path() != EXPORT_PATH {
                return Ok(tonic::Status::unimplemented(req.uri().path().to_owned()).into_http());
            }
            let mut grpc = Grpc::new(ProstCodec::<
                ExportTraceServiceResponse,
                ExportTraceServiceRequest,
            >::default());
            Ok(grpc.unary(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporter::{ExporterConfig, SpanExporter};
    use crate::proto::SpanKind;
    use crate::span::SpanBuilder;
    use llmapi_common::trace_context::TraceContext;
    use prost::Message;
    use std::time::SystemTime;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn sample_span() -> (TraceContext, Span) {
        let trace = TraceContext::continue_from(Some(PARENT), None);
        let mut b = SpanBuilder::new(
            "POST /v1/completions",
            SpanKind::Server,
            &trace,
            SystemTime::now(),
        );
        b.attr("gen_ai.usage.output_tokens", 7u32)
            .attr("gen_ai.request.temperature", 0.5f32)
            .attr("gen_ai.request.model", "demo");
        (trace, b.end(SystemTime::now()))
    }

    #[test]
    fn a_span_decodes_to_what_was_encoded() {
        let (trace, span) = sample_span();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![crate::proto::ResourceSpans {
                scope_spans: vec![crate::proto::ScopeSpans {
                    spans: vec![span.clone()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let bytes = request.encode_to_vec();
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, request);
        let got = &back.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(got.trace_id.len(), 16);
        assert_eq!(got.span_id.len(), 8);
        assert_eq!(got.trace_id, trace.trace_id.to_be_bytes());
        assert_eq!(got.parent_span_id, 0xb7ad6b7169203331u64.to_be_bytes());
        assert_eq!(got.kind, SpanKind::Server as i32);
        assert!(got.end_time_unix_nano >= got.start_time_unix_nano);
        // Field 7 (start time) is fixed64: tag byte (7 << 3) | 1.
        let span_bytes = span.encode_to_vec();
        let start = span.start_time_unix_nano.to_le_bytes();
        assert!(
            span_bytes
                .windows(9)
                .any(|w| w[0] == 0x39 && w[1..] == start)
        );
    }

    #[tokio::test]
    async fn spans_reach_the_collector_with_the_service_name() {
        let collector = CollectorDouble::start().await.unwrap();
        let mut config = ExporterConfig::new(collector.endpoint(), "llmapi-test");
        config.flush_interval = Duration::from_millis(100);
        let (exporter, task) = SpanExporter::start(config).unwrap();
        let (trace, span) = sample_span();
        exporter.export(span);
        let spans = collector
            .wait_until(Duration::from_secs(10), |s| !s.is_empty())
            .await;
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.service_name, "llmapi-test");
        assert_eq!(s.trace_id_hex(), trace.trace_id_hex());
        assert_eq!(s.parent_id_hex(), "b7ad6b7169203331");
        assert_eq!(s.int("gen_ai.usage.output_tokens"), Some(7));
        assert_eq!(s.double("gen_ai.request.temperature"), Some(0.5));
        assert_eq!(s.string("gen_ai.request.model"), Some("demo"));
        task.shutdown(Duration::from_secs(5)).await;
        assert_eq!(exporter.exported(), 1);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_still_queued() {
        let collector = CollectorDouble::start().await.unwrap();
        let mut config = ExporterConfig::new(collector.endpoint(), "llmapi-test");
        config.flush_interval = Duration::from_secs(3600);
        let (exporter, task) = SpanExporter::start(config).unwrap();
        for _ in 0..5 {
            exporter.export(sample_span().1);
        }
        task.shutdown(Duration::from_secs(10)).await;
        assert_eq!(collector.spans().len(), 5);
    }

    #[tokio::test]
    async fn an_unreachable_collector_never_blocks_export_or_shutdown() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = ExporterConfig::new(format!("127.0.0.1:{port}"), "llmapi-test");
        config.flush_interval = Duration::from_millis(20);
        config.export_timeout = Duration::from_millis(500);
        config.queue_capacity = 100;
        let (exporter, task) = SpanExporter::start(config).unwrap();
        let start = Instant::now();
        for _ in 0..10_000 {
            exporter.export(sample_span().1);
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "export must not wait on the collector: {:?}",
            start.elapsed()
        );
        assert!(exporter.dropped() > 0, "a full queue drops spans");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        task.shutdown(Duration::from_secs(1)).await;
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(exporter.exported(), 0);
    }
}
