//! The router's OTLP span per OpenAI request (`--otlp_traces_endpoint`).
//!
//! The trace layer opens a `RequestSpan` for each sampled `/v1/...` request and makes it the
//! request's current span; the handler adds what it parsed (model, sampling, prompt tokens) and
//! passes the choices' events through `observe`, which notes the first token, usage and
//! failures on their way to the client. The span is sent when its last holder lets go: the
//! trace layer for a plain response, the event stream for SSE. Without an exporter none of
//! this runs.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use llmapi_common::trace_context::TraceContext;
use llmapi_otlp::{SpanBuilder, SpanExporter, SpanKind};
use tokio::sync::mpsc;

use crate::generate::ChoiceEvent;
use crate::openai::GenSettings;

tokio::task_local! {
    static CURRENT: Arc<RequestSpan>;
}

/// One request's span while it is served.
pub struct RequestSpan {
    exporter: SpanExporter,
    started: Instant,
    start_time: SystemTime,
    state: Mutex<Recorded>,
}

struct Recorded {
    builder: Option<SpanBuilder>,
    choices_per_prompt: u32,
    first_token: Option<Duration>,
    completion_tokens: u64,
    cached_tokens: u64,
}

impl RequestSpan {
    /// A span for a sampled request to a `/v1/` route, when spans are exported; it marks a
    /// trace this router starts as sampled so that the worker exports its span too.
    pub fn open(
        exporter: Option<&SpanExporter>,
        method: &str,
        route: &str,
        trace: &mut TraceContext,
    ) -> Option<Arc<Self>> {
        let exporter = exporter?;
        if !route.starts_with("/v1/") || !llmapi_otlp::is_sampled(trace) {
            return None;
        }
        trace.flags |= 1;
        let start_time = SystemTime::now();
        let mut b = SpanBuilder::new(
            format!("{method} {route}"),
            SpanKind::Server,
            trace,
            start_time,
        );
        b.attr("http.request.method", method)
            .attr("http.route", route);
        Some(Arc::new(Self {
            exporter: exporter.clone(),
            started: Instant::now(),
            start_time,
            state: Mutex::new(Recorded {
                builder: Some(b),
                choices_per_prompt: 1,
                first_token: None,
                completion_tokens: 0,
                cached_tokens: 0,
            }),
        }))
    }

    /// Runs `fut` (the handler) with `span` as the current request span.
    pub async fn scope<F: Future>(span: Option<Arc<Self>>, fut: F) -> F::Output {
        match span {
            Some(s) => CURRENT.scope(s, fut).await,
            None => fut.await,
        }
    }

    /// The span of the request being handled, if it is exported.
    pub fn current() -> Option<Arc<Self>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    fn with(&self, f: impl FnOnce(&mut Recorded)) {
        if let Ok(mut r) = self.state.lock() {
            f(&mut r);
        }
    }

    /// Notes what the handler parsed.
    pub fn request(
        &self,
        operation: &str,
        model: &str,
        max_tokens: &[u32],
        settings: &GenSettings,
        prompt_tokens: usize,
    ) {
        self.with(|r| {
            r.choices_per_prompt = settings.n.max(1);
            if let Some(b) = r.builder.as_mut() {
                b.attr("gen_ai.operation.name", operation)
                    .attr("gen_ai.request.model", model)
                    .attr("gen_ai.request.temperature", settings.sampling.temperature)
                    .attr("gen_ai.request.top_p", settings.sampling.top_p)
                    .attr("gen_ai.request.choice.count", settings.n)
                    .attr("gen_ai.usage.input_tokens", prompt_tokens)
                    .attr("llmapi.stream", settings.stream);
                if let Some(m) = max_tokens.iter().max() {
                    b.attr("gen_ai.request.max_tokens", *m);
                }
            }
        });
    }

    /// Notes the response id.
    pub fn response_id(&self, id: &str) {
        self.with(|r| {
            if let Some(b) = r.builder.as_mut() {
                b.attr("gen_ai.response.id", id);
            }
        });
    }

    /// Notes the HTTP status; 5xx marks the span failed.
    pub fn status(&self, status: StatusCode) {
        self.with(|r| {
            if let Some(b) = r.builder.as_mut() {
                b.attr("http.response.status_code", u32::from(status.as_u16()));
                if status.as_u16() >= 400 {
                    b.attr("error.type", status.as_str());
                }
                if status.is_server_error() && !b.is_error() {
                    b.error(status.canonical_reason().unwrap_or("server error"));
                }
            }
        });
    }

    fn event(&self, ev: &ChoiceEvent) {
        let elapsed = self.started.elapsed();
        self.with(|r| match ev {
            ChoiceEvent::Delta { .. } => {
                r.first_token.get_or_insert(elapsed);
            }
            ChoiceEvent::Finish { index, usage, .. } => {
                r.first_token.get_or_insert(elapsed);
                r.completion_tokens += u64::from(usage.completion_tokens);
                // Cached tokens count once per prompt, as the response's usage counts them.
                if index % r.choices_per_prompt == 0 {
                    r.cached_tokens += u64::from(usage.cached_tokens);
                }
            }
            ChoiceEvent::Failed { error, .. } => {
                if let Some(b) = r.builder.as_mut() {
                    b.error(error.message.clone());
                }
            }
            ChoiceEvent::PromptLogprobs { .. } => {}
        });
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        let e2e = self.started.elapsed();
        let Ok(r) = self.state.get_mut() else { return };
        let Some(mut b) = r.builder.take() else {
            return;
        };
        b.attr("gen_ai.usage.output_tokens", r.completion_tokens)
            .attr("llmapi.usage.cached_tokens", r.cached_tokens)
            .attr("gen_ai.latency.e2e", e2e.as_secs_f64());
        if let Some(t) = r.first_token {
            b.attr("gen_ai.latency.time_to_first_token", t.as_secs_f64());
        }
        self.exporter.export(b.end(self.start_time + e2e));
    }
}

/// Passes `rx` through when `span` is `None`; otherwise relays its events while the span
/// notes them. The relay stops when the client's side closes, which drops `rx` and so aborts
/// the choices exactly as without it.
pub fn observe(
    span: Option<Arc<RequestSpan>>,
    mut rx: mpsc::Receiver<ChoiceEvent>,
) -> mpsc::Receiver<ChoiceEvent> {
    let Some(span) = span else { return rx };
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tx.closed() => break,
            };
            let Some(ev) = ev else { break };
            span.event(&ev);
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    });
    out
}
