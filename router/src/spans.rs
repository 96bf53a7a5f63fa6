//! The attributes of the router's span per OpenAI request (`--otlp_traces_endpoint`).
//!
//! The trace layer (`server`) opens the request's `tracing` span, an OpenTelemetry SERVER span
//! through `tracing-opentelemetry`, and for a sampled `/v1/...` request a `RequestSpan` over
//! it that is the request's current one; the handler adds what it parsed (model, sampling,
//! prompt tokens) and passes the choices' events through `observe`, which notes the first
//! token, usage and failures on their way to the client. The span ends when its last holder
//! lets go: the trace layer for a plain response, the event stream for SSE.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use opentelemetry::trace::Status;
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::generate::ChoiceEvent;
use crate::openai::GenSettings;

tokio::task_local! {
    static CURRENT: Arc<RequestSpan>;
}

/// One sampled `/v1/` request's span while it is served: the `request` tracing span of the
/// trace layer, whose OpenTelemetry side gets the attributes below.
pub struct RequestSpan {
    span: tracing::Span,
    started: Instant,
    state: Mutex<Recorded>,
}

struct Recorded {
    choices_per_prompt: u32,
    first_token: Option<Duration>,
    completion_tokens: u64,
    cached_tokens: u64,
    failed: bool,
}

/// An integer attribute value (OpenTelemetry integers are `i64`).
fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl RequestSpan {
    /// The attributes of `span` (the request's, started), when it is `sampled`.
    pub fn open(
        span: &tracing::Span,
        sampled: bool,
        method: &str,
        route: &str,
    ) -> Option<Arc<Self>> {
        if !sampled {
            return None;
        }
        span.set_attribute("http.request.method", method.to_owned());
        span.set_attribute("http.route", route.to_owned());
        Some(Arc::new(Self {
            span: span.clone(),
            started: Instant::now(),
            state: Mutex::new(Recorded {
                choices_per_prompt: 1,
                first_token: None,
                completion_tokens: 0,
                cached_tokens: 0,
                failed: false,
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
        self.with(|r| r.choices_per_prompt = settings.n.max(1));
        let s = &self.span;
        s.set_attribute("gen_ai.operation.name", operation.to_owned());
        s.set_attribute("gen_ai.request.model", model.to_owned());
        s.set_attribute(
            "gen_ai.request.temperature",
            f64::from(settings.sampling.temperature),
        );
        s.set_attribute("gen_ai.request.top_p", f64::from(settings.sampling.top_p));
        s.set_attribute("gen_ai.request.choice.count", int(settings.n));
        s.set_attribute("gen_ai.usage.input_tokens", int(prompt_tokens));
        s.set_attribute("llmapi.stream", settings.stream);
        if let Some(m) = max_tokens.iter().max() {
            s.set_attribute("gen_ai.request.max_tokens", int(*m));
        }
    }

    /// Notes the response id.
    pub fn response_id(&self, id: &str) {
        self.span.set_attribute("gen_ai.response.id", id.to_owned());
    }

    /// Notes the HTTP status; 5xx marks the span failed (unless a choice already did, with
    /// its own message).
    pub fn status(&self, status: StatusCode) {
        self.span
            .set_attribute("http.response.status_code", int(status.as_u16()));
        if status.as_u16() >= 400 {
            self.span
                .set_attribute("error.type", status.as_str().to_owned());
        }
        if status.is_server_error() {
            let mut first = false;
            self.with(|r| first = !std::mem::replace(&mut r.failed, true));
            if first {
                self.span.set_status(Status::error(
                    status.canonical_reason().unwrap_or("server error"),
                ));
            }
        }
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
                r.failed = true;
                self.span.set_status(Status::error(error.message.clone()));
            }
            ChoiceEvent::PromptLogprobs { .. } => {}
        });
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        let e2e = self.started.elapsed();
        let Ok(r) = self.state.get_mut() else { return };
        let s = &self.span;
        s.set_attribute("gen_ai.usage.output_tokens", int(r.completion_tokens));
        s.set_attribute("llmapi.usage.cached_tokens", int(r.cached_tokens));
        s.set_attribute("gen_ai.latency.e2e", e2e.as_secs_f64());
        if let Some(t) = r.first_token {
            s.set_attribute("gen_ai.latency.time_to_first_token", t.as_secs_f64());
        }
        // A span ends at its last exit: this one, for a stream that outlived the handler.
        s.in_scope(|| {});
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
