//! The attributes of the worker's span per Generate call (`--otlp_traces_endpoint`): the
//! `generate` tracing span, an OpenTelemetry SERVER span through `tracing-opentelemetry`, a
//! child of the router's span, with the engine's queue time, prefill and cached tokens, TTFT
//! and output tokens, and its `queue`, `prefill` and `decode` phases as child spans timed by
//! the engine. It ends when the request finishes, fails or is dropped by the caller.

use std::time::{Duration, SystemTime};

use llmapi_common::traces::Service;
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::{FinishReason, Timings, Usage};

/// An integer attribute value (OpenTelemetry integers are `i64`).
fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// One sampled Generate call's span; its last exit is its end.
pub struct GenerateSpan {
    span: tracing::Span,
    start: SystemTime,
}

impl GenerateSpan {
    /// The attributes of `span` (the call's, started) for the request `request_id` with
    /// `prompt_tokens`, when it is `sampled`.
    pub fn open(
        span: &tracing::Span,
        sampled: bool,
        request_id: &str,
        prompt_tokens: usize,
    ) -> Option<Self> {
        if !sampled {
            return None;
        }
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", "llmapi.worker.v1.Worker");
        span.set_attribute("rpc.method", "Generate");
        span.set_attribute("llmapi.request_id", request_id.to_owned());
        span.set_attribute("gen_ai.usage.input_tokens", int(prompt_tokens));
        Some(Self {
            span: span.clone(),
            start: SystemTime::now(),
        })
    }

    /// Notes how the request finished, and adds its phases as child spans.
    pub fn finished(&mut self, reason: FinishReason, usage: &Usage, timings: &Timings) {
        let reason = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        };
        let prefill = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
        let s = &self.span;
        s.set_attribute("llmapi.finish_reason", reason);
        s.set_attribute("gen_ai.usage.input_tokens", int(usage.prompt_tokens));
        s.set_attribute("gen_ai.usage.output_tokens", int(usage.completion_tokens));
        s.set_attribute("llmapi.usage.cached_tokens", int(usage.cached_tokens));
        s.set_attribute("llmapi.prefill_tokens", int(prefill));
        s.set_attribute("gen_ai.latency.time_in_queue", timings.queue_s);
        s.set_attribute("gen_ai.latency.time_to_first_token", timings.ttft_s);
        s.set_attribute("gen_ai.latency.e2e", timings.e2e_s);
        self.phases(timings, prefill, usage.completion_tokens);
    }

    /// `queue`, `prefill` and `decode` child spans at the engine's times (from submission:
    /// admitted after `queue_s`, first token at `ttft_s`, done at `e2e_s`).
    fn phases(&self, timings: &Timings, prefill_tokens: u32, output_tokens: u32) {
        let Some(tracer) = llmapi_common::traces::tracer(Service::Worker) else {
            return;
        };
        let cx = self.span.context();
        if !cx.span().span_context().is_sampled() {
            return;
        }
        let at = |s: f64| self.start + Duration::from_secs_f64(s.max(0.0));
        let queue = timings.queue_s.max(0.0);
        let ttft = timings.ttft_s.max(queue);
        let e2e = timings.e2e_s.max(ttft);
        let phases = [
            ("queue", 0.0, queue, None),
            (
                "prefill",
                queue,
                ttft,
                Some(("llmapi.prefill_tokens", prefill_tokens)),
            ),
            (
                "decode",
                ttft,
                e2e,
                Some(("gen_ai.usage.output_tokens", output_tokens)),
            ),
        ];
        for (name, from, to, attr) in phases {
            let mut span = tracer
                .span_builder(name)
                .with_start_time(at(from))
                .start_with_context(&tracer, &cx);
            if let Some((k, v)) = attr {
                span.set_attribute(opentelemetry::KeyValue::new(k, int(v)));
            }
            span.end_with_timestamp(at(to));
        }
    }

    /// Marks the request failed.
    pub fn failed(&mut self, message: &str) {
        self.span.set_status(Status::error(message.to_owned()));
    }
}

impl Drop for GenerateSpan {
    fn drop(&mut self) {
        // A span ends at its last exit: now.
        self.span.in_scope(|| {});
    }
}
