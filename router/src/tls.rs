//! TLS flags shared by `llmapi-router` and `llmapi-launch serve` (one definition, flattened
//! into both command lines), and the listener that serves the HTTP application over rustls.
//!
//! Two sets of files, for two different links:
//!
//! - `--ssl_certfile` / `--ssl_keyfile` (vLLM's spelling): the HTTP front's certificate, what
//!   OpenAI clients see. Without them the front speaks plain HTTP.
//! - `--tls_cert_file` / `--tls_key_file` / `--tls_ca_file`: TLS between the job's own
//!   processes (router to worker gRPC, registration). A CA file turns on mutual TLS.
//!
//! The material itself is loaded and checked in `llmapi_proto::tls`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llmapi_proto::tls::{HANDSHAKE_TIMEOUT, TlsError, TlsFiles, https_front};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// Most TLS handshakes in progress at once; connections past it are closed at once, so slow
/// or idle clients cannot hold up the others.
const MAX_HANDSHAKES: usize = 256;

/// TLS flags of the HTTP front and of the links between a job's processes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) the HTTP front serves HTTPS with; needs --ssl_keyfile.
    /// Without it the front speaks plain HTTP.
    #[arg(
        long = "ssl_certfile",
        env = "LLMAPI_SSL_CERTFILE",
        value_name = "PATH"
    )]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of --ssl_certfile.
    #[arg(long = "ssl_keyfile", env = "LLMAPI_SSL_KEYFILE", value_name = "PATH")]
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM certificate (chain) this process presents on links between the job's processes
    /// (a worker's gRPC server, the router as a client under mutual TLS). Default in a
    /// multi-node job: a leaf of the job's generated CA.
    #[arg(
        long = "tls_cert_file",
        env = "LLMAPI_TLS_CERT_FILE",
        value_name = "PATH"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls_cert_file.
    #[arg(
        long = "tls_key_file",
        env = "LLMAPI_TLS_KEY_FILE",
        value_name = "PATH"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s): servers require client certificates signed by it (mutual TLS)
    /// and clients verify servers against it.
    #[arg(long = "tls_ca_file", env = "LLMAPI_TLS_CA_FILE", value_name = "PATH")]
    pub tls_ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The `--tls_*` files.
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert_file.clone(),
            key: self.tls_key_file.clone(),
            ca: self.tls_ca_file.clone(),
        }
    }

    /// The HTTP front's rustls configuration when `--ssl_certfile` and `--ssl_keyfile` are
    /// given (one without the other is refused); files are read and checked now.
    pub fn https_front(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        match (&self.ssl_certfile, &self.ssl_keyfile) {
            (Some(cert), Some(key)) => https_front(cert, key).map(Some),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Incomplete(
                "--ssl_certfile is given without --ssl_keyfile; give both to serve HTTPS".into(),
            )),
            (None, Some(_)) => Err(TlsError::Incomplete(
                "--ssl_keyfile is given without --ssl_certfile; give both to serve HTTPS".into(),
            )),
        }
    }
}

/// A listener that hands axum only connections whose TLS handshake completed. Handshakes run
/// on their own tasks (at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]), so a client that never finishes one delays nobody.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish()
    }
}

impl TlsListener {
    /// Serves TLS with `config` on `listener` (must be called inside a tokio runtime).
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let tls = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::debug!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                // Small SSE frames go out at once rather than wait for Nagle's algorithm.
                let _ = tcp.set_nodelay(true);
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when aborted, i.e. when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
