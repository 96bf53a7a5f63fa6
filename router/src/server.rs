//! The axum application and its serving loop with graceful drain.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use llmapi_common::trace_context::TraceContext;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::handlers;
use crate::spans::RequestSpan;
use crate::state::AppState;

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    state
        .metrics
        .record_request(&route, response.status().as_u16());
    response
}

/// Continues the caller's W3C trace (`traceparent`, `tracestate`) or starts one: the handlers
/// find this hop's `TraceContext` in the request's extensions, its log lines carry the trace
/// id, and the response says which span served it in a `traceresponse` header. With a span
/// exporter, a `/v1/` request's OTLP span is open while the handler runs (`spans`).
async fn trace_request(State(app): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let parent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Several tracestate headers form one list, in order.
    let state: Vec<&str> = headers
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let state = (!state.is_empty()).then(|| state.join(","));
    let mut trace = TraceContext::continue_from(parent.as_deref(), state.as_deref());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let otlp = RequestSpan::open(
        app.config.span_exporter.as_ref(),
        req.method().as_str(),
        route.unwrap_or_default(),
        &mut trace,
    );
    let span = tracing::info_span!(
        "request",
        trace_id = %trace.trace_id_hex(),
        span_id = %trace.span_id_hex(),
    );
    let traceresponse = HeaderValue::from_str(&trace.traceparent()).ok();
    req.extensions_mut().insert(Arc::new(trace));
    let mut response = RequestSpan::scope(otlp.clone(), next.run(req))
        .instrument(span)
        .await;
    if let Some(s) = otlp {
        s.status(response.status());
    }
    if let Some(v) = traceresponse {
        response.headers_mut().insert("traceresponse", v);
    }
    response
}

/// The router's HTTP application over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/health", get(handlers::health))
        .route("/health_generate", get(handlers::health_generate))
        .route("/version", get(handlers::version))
        .route("/metrics", get(handlers::metrics))
        .route(
            "/workers",
            get(handlers::list_workers)
                .post(handlers::add_worker)
                .delete(handlers::remove_worker),
        )
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: new requests get 503,
/// in-flight ones may finish within the configured drain timeout.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_state = state.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(inflight = drain_state.inflight(), "draining");
        drain_state.start_draining();
        let _ = drain_tx.send(());
    };
    let timeout = state.config.drain_timeout;
    // SSE chunks are small: send each at once rather than wait for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app(state.clone())).with_graceful_shutdown(signal);
    let deadline = async move {
        if drain_rx.await.is_ok() {
            tokio::time::sleep(timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r,
        _ = deadline => {
            tracing::warn!(inflight = state.inflight(), "drain timeout reached; exiting with requests in flight");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
