//! The axum application and its serving loop with graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use llmapi_common::traces::{self, TraceHeaders};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::spans::RequestSpan;
use crate::state::AppState;
use crate::tls::TlsListener;
use crate::{admin, auth, front, handlers, kv_routes, responses};

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

/// Continues the caller's W3C trace (`traceparent`, `tracestate`, read by the OpenTelemetry
/// propagator) or starts one: the request's `tracing` span is this hop's span, its log lines
/// carry the trace id, the handlers find the headers that name it to the worker in the
/// request's extensions (`TraceHeaders`), and the response says which span served it in a
/// `traceresponse` header. A `/v1/` request's span is a SERVER span exported with
/// `--otlp_traces_endpoint` (`spans`); other routes are logged, never exported.
async fn trace_request(mut req: Request, next: Next) -> Response {
    let parent = traces::extract_http(req.headers());
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let exported = route.starts_with("/v1/");
    let span = if exported {
        let name = format!("{method} {route}");
        tracing::info_span!(
            "request",
            otel.name = name.as_str(),
            otel.kind = "server",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            target: "llmapi_router::untraced",
            "request",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        )
    };
    let ids = traces::continue_span(&span, parent);
    span.record("trace_id", tracing::field::display(&ids.trace_id));
    span.record("span_id", tracing::field::display(&ids.span_id));
    let headers = TraceHeaders::of_span(&span);
    let traceresponse = HeaderValue::from_str(&headers.traceparent).ok();
    let otlp = exported
        .then(|| RequestSpan::open(&span, ids.sampled, &method, &route))
        .flatten();
    req.extensions_mut().insert(Arc::new(headers));
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

/// The router's HTTP application over `state`. Every route sits in one access group, whose
/// layer checks the caller before the handler runs (`auth`): `/health` is public; `/metrics`
/// takes the metrics key or the API key (and moves to its own listener with a metrics port);
/// `POST/DELETE /workers` take the admin token; every other route takes the API key.
/// Unmatched paths answer 404 without a key: they run nothing.
pub fn app(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/models", get(handlers::models))
        .route("/health_generate", get(handlers::health_generate))
        .route("/version", get(handlers::version))
        .route("/workers", get(admin::list_workers))
        .route("/workers/kv_index", get(kv_routes::kv_index))
        .route("/kv_cache_events", post(kv_routes::kv_cache_events))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let pool_admin = Router::new()
        .route(
            "/workers",
            post(admin::add_worker).delete(admin::remove_worker),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let mut app = Router::new()
        .route("/health", get(handlers::health))
        .merge(api)
        .merge(pool_admin);
    if state.config.metrics_port.is_none() {
        app = app.merge(metrics_routes(&state));
    }
    with_common_layers(app, state)
}

/// The application of the separate metrics listener (`--metrics_port`): /metrics only.
pub fn metrics_app(state: Arc<AppState>) -> Router {
    with_common_layers(metrics_routes(&state), state)
}

fn metrics_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_metrics_key,
        ))
}

fn with_common_layers(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn(trace_request))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// The router's listening sockets: the API and, with a metrics port, /metrics apart.
#[derive(Debug)]
pub struct Listeners {
    /// The API listener.
    pub api: TcpListener,
    /// The listener of /metrics alone, if `metrics_port` is set.
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(api: TcpListener) -> Self {
        Self { api, metrics: None }
    }
}

impl Listeners {
    /// Binds `host:port` and, with `metrics_port`, `host:metrics_port` (the same host: the
    /// metrics listener is no less reachable than the API).
    pub async fn bind(host: &str, port: u16, metrics_port: Option<u16>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let addr = format!("{host}:{port}");
        let api = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}; pick a free --port or another --host"))?;
        let metrics = match metrics_port {
            Some(p) => {
                let addr = format!("{host}:{p}");
                let l = TcpListener::bind(&addr).await.with_context(|| {
                    format!("binding {addr} for /metrics; pick a free --metrics_port")
                })?;
                tracing::info!(%addr, "serving /metrics apart");
                Some(l)
            }
            None => None,
        };
        Ok(Self { api, metrics })
    }
}

/// The application of the internal registration listener a job's leader opens for the other
/// leaders (`POST`/`DELETE /workers` only, behind the admin token), served over mutual TLS
/// with the job's certificates (`serve_internal`).
pub fn admin_app(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route(
            "/workers",
            post(admin::add_worker).delete(admin::remove_worker),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    with_common_layers(routes, state)
}

/// Serves `app` on `listener` over TLS with `tls` until the returned task is aborted.
pub fn serve_internal(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    app: Router,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TlsListener::new(listener, tls)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the internal TLS listener failed");
        }
    }))
}

/// How long the requests cut off at the drain timeout get to send their 503 (or in-band
/// error) before the process stops serving regardless.
const CUT_OFF_GRACE: Duration = Duration::from_secs(2);

/// Waits until no request is in flight, polling, for at most `limit`; whether none is.
async fn wait_idle(state: &AppState, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while state.inflight() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Serves `state` on `listeners` until `shutdown` resolves, then drains: the listener stays
/// open so that /health answers 503 (a load balancer takes the router out) and new requests
/// get 503 with Retry-After, while requests in flight finish within the configured drain
/// timeout; those still running then end with a 503 (an in-band error once streaming), and
/// serving stops. The metrics listener, if any, stops with the API. With `config.https` both
/// speak HTTPS only.
pub async fn serve(
    listeners: impl Into<Listeners>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Listeners {
        api: listener,
        metrics,
    } = listeners.into();
    if metrics.is_none() && state.config.metrics_port.is_some() {
        tracing::warn!(
            "a metrics port is configured but no metrics listener was bound (Listeners::bind): /metrics is served nowhere"
        );
    }
    let limits = state.config.front.clone();
    let https = state.config.https.clone();
    let metrics = metrics.map(|l| {
        let app = metrics_app(state.clone());
        let limits = limits.clone();
        let https = https.clone();
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = front::serve(l, app, limits, https, std::future::pending()).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        }))
    });
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_state = state.clone();
    let drain = async move {
        shutdown.await;
        tracing::info!(
            inflight = drain_state.inflight(),
            "draining: /health and new requests get 503"
        );
        drain_state.start_draining();
        let timeout = drain_state.config.drain_timeout;
        if !wait_idle(&drain_state, timeout).await {
            tracing::warn!(
                inflight = drain_state.inflight(),
                "drain timeout reached; ending the requests still running with 503"
            );
            drain_state.cut_off();
            wait_idle(&drain_state, CUT_OFF_GRACE).await;
        }
        let _ = drained_tx.send(());
    };
    // Connection limits and timeouts (`front`): slowloris clients and idle connections are
    // cut off, and past --max_connections new ones wait to be accepted. With `https` every
    // connection is TLS. The listener accepts until the drain above is over.
    let server = front::serve(listener, app(state.clone()), limits, https, drain);
    // Once drained, connections still open (a client not reading its answer) get a last grace.
    let last_call = async move {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(CUT_OFF_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = server => r,
        _ = last_call => {
            tracing::warn!(inflight = state.inflight(), "connections still open after the drain; exiting");
            Ok(())
        }
    };
    if let Some(m) = metrics {
        m.stop().await;
    }
    served
}

/// Stops a spawned task when dropped (if `serve` itself is dropped) or stopped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone (its listener closed).
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
