//! llmapi-otlp: request spans sent to an OpenTelemetry collector over OTLP/gRPC.
//!
//! The router and the worker describe each request they served as a `SpanBuilder` and hand
//! the finished span to a `SpanExporter`, which batches spans to the collector given by
//! `--otlp_traces_endpoint` (`TraceService/Export`). The OTLP messages are hand-written
//! `prost` structs (`proto`), so neither `protoc` nor the OpenTelemetry SDK is needed.
//! Not for: propagating trace context (`llmapi_common::trace_context` does that), metrics or
//! log export, TLS.

pub mod exporter;
pub mod proto;
pub mod span;
pub mod testing;

pub use exporter::{ExportTask, ExporterConfig, ExporterError, SpanExporter};
pub use proto::SpanKind;
pub use span::{SpanBuilder, is_sampled};
