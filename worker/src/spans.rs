//! The worker's OTLP span per Generate call (`--otlp_traces_endpoint`): a child of the
//! router's span, with the engine's queue time, prefill and cached tokens, TTFT and output
//! tokens. It is sent when the request finishes, fails or is dropped by the caller.

use std::time::{Instant, SystemTime};

use llmapi_common::trace_context::TraceContext;
use llmapi_otlp::{SpanBuilder, SpanExporter, SpanKind};

use crate::engine::{FinishReason, Timings, Usage};

/// One Generate call's span; sent on drop.
pub struct GenerateSpan {
    exporter: SpanExporter,
    started: Instant,
    start_time: SystemTime,
    /// Always `Some` until dropped.
    builder: Option<SpanBuilder>,
}

impl GenerateSpan {
    /// A span for the request `request_id` with `prompt_tokens`, when spans are exported and
    /// the caller's trace is sampled.
    pub fn open(
        exporter: Option<&SpanExporter>,
        trace: &TraceContext,
        request_id: &str,
        prompt_tokens: usize,
    ) -> Option<Self> {
        let exporter = exporter?;
        if !llmapi_otlp::is_sampled(trace) {
            return None;
        }
        let start_time = SystemTime::now();
        let mut builder = SpanBuilder::new(
            "llmapi.worker.v1.Worker/Generate",
            SpanKind::Server,
            trace,
            start_time,
        );
        builder
            .attr("rpc.system", "grpc")
            .attr("rpc.service", "llmapi.worker.v1.Worker")
            .attr("rpc.method", "Generate")
            .attr("llmapi.request_id", request_id)
            .attr("gen_ai.usage.input_tokens", prompt_tokens);
        Some(Self {
            exporter: exporter.clone(),
            started: Instant::now(),
            start_time,
            builder: Some(builder),
        })
    }

    /// Notes how the request finished.
    pub fn finished(&mut self, reason: FinishReason, usage: &Usage, timings: &Timings) {
        let reason = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        };
        let prefill = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
        let Some(b) = self.builder.as_mut() else {
            return;
        };
        b.attr("llmapi.finish_reason", reason)
            .attr("gen_ai.usage.input_tokens", usage.prompt_tokens)
            .attr("gen_ai.usage.output_tokens", usage.completion_tokens)
            .attr("llmapi.usage.cached_tokens", usage.cached_tokens)
            .attr("llmapi.prefill_tokens", prefill)
            .attr("gen_ai.latency.time_in_queue", timings.queue_s)
            .attr("gen_ai.latency.time_to_first_token", timings.ttft_s)
            .attr("gen_ai.latency.e2e", timings.e2e_s);
    }

    /// Marks the request failed.
    pub fn failed(&mut self, message: &str) {
        if let Some(b) = self.builder.as_mut() {
            b.error(message);
        }
    }
}

impl Drop for GenerateSpan {
    fn drop(&mut self) {
        if let Some(b) = self.builder.take() {
            self.exporter
                .export(b.end(self.start_time + self.started.elapsed()));
        }
    }
}
