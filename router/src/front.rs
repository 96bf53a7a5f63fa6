//! The HTTP front's connections: how many are open at once, how long a client may take to send
//! a request's headers, and how long a kept-alive connection may sit idle.
//!
//! Each accepted connection takes a slot of `max_connections` before it is accepted; past the
//! limit new connections wait in the kernel's listen backlog (and are refused by it once that
//! fills), so neither tasks nor memory grow with them. hyper's HTTP/1.1 header-read timeout
//! closes a connection whose request headers are not complete in time (a slowloris client
//! dripping a byte every few seconds), counted from the moment the server waits for them: the
//! accept, or the end of the previous response. A connection with no request open and no byte
//! read or written for the keep-alive timeout is closed.
//!
//! Not this module's job: what a request may contain (the handlers' limits) or how many
//! requests run at once (admission in `state`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// How often a front whose connection slots are all taken says so.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How long a connection that has not begun a request yet may take to deliver its first one
/// once the front stops (it was accepted as the drain ended; its request is on the way).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How often a stopping connection looks whether its first request has begun.
const FIRST_REQUEST_POLL: Duration = Duration::from_millis(10);

/// Limits on the front's connections (`--max_connections`, `--header_read_timeout_s`,
/// `--timeout_keep_alive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's complete headers.
    pub header_read_timeout: Duration,
    /// Time a connection without an open request may pass without a byte in either direction
    /// before it is closed.
    pub keep_alive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
        }
    }
}

/// The command-line flags of `ConnectionLimits`, shared by `llmapi-router` and
/// `llmapi-launch serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Connections the HTTP front serves at once; further ones wait in the listen backlog
    /// until one closes.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (from the accept, or from the end
    /// of the previous response on a kept-alive connection); slower ones are disconnected.
    #[arg(long, default_value_t = ConnectionLimits::default().header_read_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_s: u64,
    /// Seconds a connection without a request in progress may stay silent (no byte either
    /// way) before it is closed (uvicorn's and vLLM's keep-alive timeout).
    #[arg(long, default_value_t = ConnectionLimits::default().keep_alive_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_keep_alive: u64,
}

impl ConnectionArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_s),
            keep_alive_timeout: Duration::from_secs(self.timeout_keep_alive),
        }
    }
}

/// Serves `app` over HTTP/1.1 on `listener` within `limits` until `shutdown` resolves, then
/// closes idle connections, lets the others finish their current response, and returns once
/// every connection is closed. With `tls` every connection is HTTPS: its handshake runs on the
/// connection's own task (holding its slot) and must finish within the header-read timeout.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections watch `stop` to begin their graceful close; each holds a `closed` receiver,
    // so `closed_tx.closed()` resolves when the last one is gone.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (closed_tx, closed_rx) = watch::channel(());
    let connection = Connection {
        app,
        limits,
        stop: stop_rx,
        closed: closed_rx,
    };
    tokio::pin!(shutdown);
    let mut warned_full: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0
            && warned_full.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY)
        {
            warned_full = Some(Instant::now());
            tracing::warn!(
                max_connections = connection.limits.max_connections,
                "every connection slot is in use; new connections wait to be accepted (raise --max_connections if clients are legitimate)"
            );
        }
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(s) => s,
                // The semaphore is never closed; should it be, stop accepting.
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        spawn_connection(tcp, peer, slot, &connection, tls.as_ref());
    }
    // Connections the kernel completed before the listener closes would be reset by the close
    // with their request unread: accept those waiting now (while slots last), asking the socket
    // itself rather than the reactor (whose readiness may lag), then close, so that a client
    // sees either an answer or a refused connection.
    let listener = listener.into_std()?;
    while let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
        let Ok((tcp, peer)) = listener.accept() else {
            break;
        };
        let tcp = tcp
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(tcp));
        if let Ok(tcp) = tcp {
            spawn_connection(tcp, peer, slot, &connection, tls.as_ref());
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(connection);
    closed_tx.closed().await;
    Ok(())
}

/// Serves one accepted connection on its own task, which holds `slot` until it closes.
fn spawn_connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    template: &Connection,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) {
    // SSE chunks are small: send each at once rather than wait for Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let connection = template.clone();
    let tls = tls.cloned();
    tokio::spawn(async move {
        match tls {
            None => connection.run(tcp).await,
            Some(tls) => {
                let timeout = connection.limits.header_read_timeout;
                match tokio::time::timeout(timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => connection.run(stream).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
        tracing::trace!(%peer, "connection closed");
        drop(slot);
    });
}

/// An accept that failed: a connection error (the peer left before the accept) is nothing to
/// wait for; others (out of file descriptors) pause the loop so it does not spin.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[derive(Clone)]
struct Connection {
    app: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    closed: watch::Receiver<()>,
}

impl Connection {
    async fn run<S>(mut self, tcp: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: tcp,
            activity: Arc::clone(&activity),
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true);
        let service = tracked_service(self.app, Arc::clone(&activity));
        let conn = http.serve_connection(io, TowerToHyperService::new(service));
        tokio::pin!(conn);
        let idle = self.limits.keep_alive_timeout;
        let mut closing = false;
        // Set when the front stops before this connection began a request: when to give up.
        let mut first_request_by: Option<Instant> = None;
        let mut check_at = activity.last() + idle;
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = self.stop.wait_for(|stop| *stop), if !closing && first_request_by.is_none() => {
                    if activity.begun.load(Ordering::Relaxed) > 0 {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        // Closed now, its request would go unanswered: let it arrive (and be
                        // answered, 503 while draining) unless it takes too long.
                        first_request_by = Some(Instant::now() + FIRST_REQUEST_GRACE);
                    }
                }
                () = tokio::time::sleep(FIRST_REQUEST_POLL), if !closing && first_request_by.is_some() => {
                    if activity.begun.load(Ordering::Relaxed) > 0
                        || first_request_by.is_some_and(|by| Instant::now() >= by)
                    {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = tokio::time::sleep_until(check_at), if !closing => {
                    let now = Instant::now();
                    let quiet_until = activity.last() + idle;
                    if quiet_until > now {
                        check_at = quiet_until;
                    } else if activity.requests.load(Ordering::Relaxed) > 0 {
                        // A silent request (a long prefill, a non-streamed answer) keeps it.
                        check_at = now + idle;
                    } else {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        drop(self.closed);
    }
}

/// `app` counting its requests in `activity` from the call until the response body is sent
/// or dropped.
fn tracked_service(
    app: Router,
    activity: Arc<Activity>,
) -> impl tower::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone
+ Send {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    tower::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
        let open = OpenRequest::new(Arc::clone(&activity));
        let response = app.clone().oneshot(req);
        async move {
            let response = response.await?;
            Ok(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    // The body owns the request's count until it is sent or dropped.
                    let _open = &open;
                    frame
                }))
            }))
        }
    })
}

/// One request of a connection, from the call until its response body is done.
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.begun.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// When a connection last moved a byte, and how many of its requests are open.
struct Activity {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last byte read or written, or the last response done.
    last_ms: AtomicU64,
    /// Requests called and whose response body is not done yet.
    requests: AtomicUsize,
    /// Requests called since the connection opened.
    begun: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            begun: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that stamps `activity` whenever bytes move.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
