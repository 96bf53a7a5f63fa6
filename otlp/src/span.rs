//! Building one finished span from a hop's `TraceContext`, its timestamps and attributes.

use std::time::{SystemTime, UNIX_EPOCH};

use llmapi_common::trace_context::TraceContext;

use crate::proto::{self, KeyValue, SpanKind, StatusCode, Value};

/// Whether this hop's span is exported: when the caller marked its trace sampled (W3C flag
/// bit 0), or when this hop started the trace. A caller that sends flag `00` opts out.
pub fn is_sampled(trace: &TraceContext) -> bool {
    trace.parent_id.is_none() || trace.flags & 1 == 1
}

/// Nanoseconds since the Unix epoch (0 for times before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A span being filled in; `end` turns it into the OTLP message.
#[derive(Debug, Clone)]
pub struct SpanBuilder {
    span: proto::Span,
}

impl SpanBuilder {
    /// A span for this hop (`trace.span_id`, child of `trace.parent_id`) that began at `start`.
    pub fn new(
        name: impl Into<String>,
        kind: SpanKind,
        trace: &TraceContext,
        start: SystemTime,
    ) -> Self {
        Self {
            span: proto::Span {
                trace_id: trace.trace_id.to_be_bytes().to_vec(),
                span_id: trace.span_id.to_be_bytes().to_vec(),
                trace_state: trace.tracestate.clone().unwrap_or_default(),
                parent_span_id: trace
                    .parent_id
                    .map(|p| p.to_be_bytes().to_vec())
                    .unwrap_or_default(),
                name: name.into(),
                kind: kind as i32,
                start_time_unix_nano: unix_nanos(start),
                flags: u32::from(trace.flags),
                ..proto::Span::default()
            },
        }
    }

    /// Sets attribute `key` (a later value for the same key replaces the earlier one).
    pub fn attr(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        let value = Some(proto::AnyValue {
            value: Some(value.into()),
        });
        match self.span.attributes.iter_mut().find(|kv| kv.key == key) {
            Some(kv) => kv.value = value,
            None => self.span.attributes.push(KeyValue {
                key: key.to_owned(),
                value,
            }),
        }
        self
    }

    /// Marks the span failed with `message`.
    pub fn error(&mut self, message: impl Into<String>) -> &mut Self {
        self.span.status = Some(proto::Status {
            message: message.into(),
            code: StatusCode::Error as i32,
        });
        self
    }

    /// Whether `error` was called.
    pub fn is_error(&self) -> bool {
        self.span
            .status
            .as_ref()
            .is_some_and(|s| s.code == StatusCode::Error as i32)
    }

    /// The finished span, ending at `end`.
    pub fn end(mut self, end: SystemTime) -> proto::Span {
        self.span.end_time_unix_nano = unix_nanos(end).max(self.span.start_time_unix_nano);
        self.span
    }
}
