//! A group leader's registration with the routers that send it requests: rank 0's router
//! (over the job's mutual TLS) or the external routers of `--router_url URL[,URL...]`.
//!
//! The leader registers with every router, goes on once one of them accepted it, and renews
//! each registration at a third of the lease that router grants (`--worker_lease_s`), so a
//! router that restarts, or starts after the worker, has it back within one renewal period
//! and one that never hears from it again drops it when the lease lapses. At shutdown (SIGTERM,
//! `scancel`) or when the worker's group fails, it withdraws from every router first.
//! Not for: what a router accepts (`llmapi_router::registration`).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use llmapi_proto::tls::{TlsFiles, TransportTls};
use tokio_rustls::rustls::pki_types::ServerName;

/// How often a registration is renewed when the router names no lease (and at most).
pub const MAX_RENEWAL: Duration = Duration::from_secs(10);
/// The shortest renewal period, whatever lease a router grants.
const MIN_RENEWAL: Duration = Duration::from_millis(500);
/// How long a task waits for the first router to accept it.
const REGISTER_DEADLINE: Duration = Duration::from_secs(300);

/// Where a leader registers its worker, and how it reaches it.
pub struct RegistrationTarget {
    /// The router's base URL.
    pub router: String,
    /// TLS to it: the client configuration and the name its certificate must carry.
    pub tls: Option<(std::sync::Arc<tokio_rustls::rustls::ClientConfig>, String)>,
}

/// The routers of `--router_url`, comma separated (empty entries refused).
pub fn router_urls(list: &str) -> anyhow::Result<Vec<String>> {
    let urls: Vec<String> = list.split(',').map(|u| u.trim().to_owned()).collect();
    if urls.iter().any(String::is_empty) {
        bail!("--router_url {list:?} has an empty entry; give URL[,URL...]");
    }
    Ok(urls)
}

/// Registration with an external router (`--router_url`): HTTPS verified against
/// `--tls_ca_file` for an `https://` URL; a plain `http://` one off this machine sends the job
/// secret in clear, which is warned about.
pub fn external_router(
    url: &str,
    files: &TlsFiles,
    tls: &TransportTls,
) -> anyhow::Result<RegistrationTarget> {
    let router = url.trim_end_matches('/').to_owned();
    let uri: Uri = format!("{router}/workers")
        .parse()
        .with_context(|| format!("--router_url {url}"))?;
    let host = uri.host().unwrap_or_default().to_owned();
    if uri.scheme_str() != Some("https") {
        let local = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]");
        if !local {
            tracing::warn!(
                router = %router,
                "registering over plain HTTP sends the job secret in clear text; serve the router with --ssl_certfile/--ssl_keyfile and pass --router_url https://... with --tls_ca_file"
            );
        }
        return Ok(RegistrationTarget { router, tls: None });
    }
    if files.ca.is_none() {
        bail!(
            "--router_url {url} is HTTPS: give every task --tls_ca_file (the CA that signed the router's --ssl_certfile) with --tls_cert_file and --tls_key_file"
        );
    }
    Ok(RegistrationTarget {
        router,
        tls: Some((tls.rustls_client()?, host)),
    })
}

/// One router's registration as the leader keeps it.
struct Link<'a> {
    target: &'a RegistrationTarget,
    /// How often to renew: a third of the router's lease; `None` until it accepted us.
    renew_every: Option<Duration>,
    /// When the next renewal is due.
    due: tokio::time::Instant,
    /// Whether the last renewal failed (logged once per outage, not every period).
    failing: bool,
}

/// The renewal period for a lease of `lease_s` seconds (`None`: the router names none).
fn renewal_period(lease_s: Option<u64>) -> Duration {
    match lease_s {
        Some(s) => (Duration::from_secs(s) / 3).clamp(MIN_RENEWAL, MAX_RENEWAL),
        None => MAX_RENEWAL,
    }
}

/// What one POST /workers came to.
enum Outcome {
    /// Accepted, with the router's lease in seconds (if it named one).
    Accepted(Option<u64>),
    /// Not now (not listening yet, restarting, draining): try again later.
    NotYet(String),
}

/// Registers `worker` with every router of `targets`, renews the registrations until shutdown
/// (or until the worker's group fails: Err with the reason), then withdraws from all.
pub async fn registered(
    targets: &[RegistrationTarget],
    worker: &str,
    token: &str,
    failed: impl Future<Output = String>,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "url": worker }).to_string();
    let now = tokio::time::Instant::now();
    let mut links: Vec<Link> = targets
        .iter()
        .map(|target| Link {
            target,
            renew_every: None,
            due: now,
            failing: false,
        })
        .collect();
    let started = now;
    // The first registration: every router until one accepts; a refusal is fatal (it is a
    // configuration error that retrying cannot mend).
    loop {
        let pending: Vec<usize> = (0..links.len())
            .filter(|&i| links[i].renew_every.is_none())
            .collect();
        let outcomes = futures::future::join_all(
            pending
                .iter()
                .map(|&i| register_once(links[i].target, worker, token, &body)),
        )
        .await;
        for (&i, outcome) in pending.iter().zip(outcomes) {
            match outcome? {
                Outcome::Accepted(lease_s) => {
                    let period = renewal_period(lease_s);
                    links[i].renew_every = Some(period);
                    links[i].due = tokio::time::Instant::now() + period;
                    tracing::info!(router = %links[i].target.router, worker, ?lease_s, "registered with the router");
                }
                Outcome::NotYet(why) => {
                    tracing::debug!(router = %links[i].target.router, reason = %why, "registration not accepted yet");
                }
            }
        }
        if links.iter().any(|l| l.renew_every.is_some()) {
            break;
        }
        if started.elapsed() > REGISTER_DEADLINE {
            let names: Vec<&str> = links.iter().map(|l| l.target.router.as_str()).collect();
            bail!(
                "no router of {} accepted this worker within {REGISTER_DEADLINE:?}; check that they run and that --router_url names them",
                names.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for l in links.iter_mut().filter(|l| l.renew_every.is_none()) {
        tracing::warn!(router = %l.target.router, "this router has not accepted the worker yet; it is asked again every {MAX_RENEWAL:?}");
        l.due = tokio::time::Instant::now() + MAX_RENEWAL;
        l.failing = true;
    }
    let shutdown = llmapi_router::server::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::pin!(failed);
    let mut failure = None;
    loop {
        let next = links.iter().map(|l| l.due).min().unwrap_or(started);
        tokio::select! {
            () = &mut shutdown => break,
            why = &mut failed => {
                tracing::error!(reason = %why, "the worker group failed; withdrawing from the routers");
                failure = Some(why);
                break;
            }
            () = tokio::time::sleep_until(next) => {
                let now = tokio::time::Instant::now();
                let due: Vec<usize> = (0..links.len()).filter(|&i| links[i].due <= now).collect();
                let outcomes = futures::future::join_all(
                    due.iter().map(|&i| register_once(links[i].target, worker, token, &body)),
                )
                .await;
                for (&i, outcome) in due.iter().zip(outcomes) {
                    renewed(&mut links[i], outcome);
                }
            }
        }
    }
    let withdrawn = futures::future::join_all(
        links
            .iter()
            .map(|l| send(Method::DELETE, l.target, token, &body)),
    )
    .await;
    for (l, r) in links.iter().zip(withdrawn) {
        match r {
            Ok((s, _)) => {
                tracing::info!(router = %l.target.router, status = %s, "withdrew from the router")
            }
            Err(e) => {
                tracing::info!(router = %l.target.router, error = %e, "could not deregister (the router may have stopped first)")
            }
        }
    }
    match failure {
        Some(why) => bail!("the worker group failed: {why}"),
        None => Ok(()),
    }
}

/// Books one renewal's outcome and schedules the next.
fn renewed(link: &mut Link, outcome: anyhow::Result<Outcome>) {
    let router = link.target.router.as_str();
    match outcome {
        Ok(Outcome::Accepted(lease_s)) => {
            if link.failing || link.renew_every.is_none() {
                tracing::info!(router, ?lease_s, "registered with the router again");
            }
            link.failing = false;
            link.renew_every = Some(renewal_period(lease_s));
        }
        Ok(Outcome::NotYet(why)) if !link.failing => {
            tracing::warn!(router, reason = %why, "renewing the registration failed; retrying");
            link.failing = true;
        }
        Err(e) if !link.failing => {
            tracing::warn!(router, error = %e, "the router refused the renewal; retrying");
            link.failing = true;
        }
        _ => {}
    }
    link.due = tokio::time::Instant::now() + link.renew_every.unwrap_or(MAX_RENEWAL);
}

/// One POST /workers: accepted (with the lease), not yet, or a refusal that says what to fix.
async fn register_once(
    target: &RegistrationTarget,
    worker: &str,
    token: &str,
    body: &str,
) -> anyhow::Result<Outcome> {
    let router = target.router.as_str();
    match send(Method::POST, target, token, body).await {
        Ok((s, answer)) if s.is_success() => {
            let lease_s = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["lease_s"].as_u64());
            Ok(Outcome::Accepted(lease_s))
        }
        Ok((s, _)) if s == StatusCode::UNAUTHORIZED => bail!(
            "router {router} refused the job secret (401); give every task the same LLMAPI_JOB_TOKEN_FILE \
             (or LLMAPI_JOB_TOKEN), and an external router --admin_token equal to it"
        ),
        Ok((s @ (StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::CONFLICT), _)) => {
            bail!(
                "router {router} refused the worker {worker} ({s}; its log says why): an embedded \
                 router accepts the job's node names and loopback addresses, so set \
                 LLMAPI_ADVERTISE_HOST to a node name or give the router --worker_url_allowlist; \
                 409 means its pool is full (--max_workers)"
            )
        }
        Ok((s, _)) => Ok(Outcome::NotYet(format!("answered {s}"))),
        Err(e) if e.downcast_ref::<TlsRefused>().is_some() => bail!(
            "the router at {router} and this task do not trust each other's TLS certificates ({e}); \
             give every task the same LLMAPI_JOB_TOKEN_FILE (or LLMAPI_JOB_TOKEN), or, with your own \
             certificates, the same --tls_ca_file and certificates it signed"
        ),
        Err(e) => Ok(Outcome::NotYet(format!("{e:#}"))),
    }
}

/// The router's TLS handshake failed on a certificate: retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TlsRefused(String);

/// One HTTP/1.1 request (over TLS when the target has it) with a JSON body and a bearer
/// token; returns the status and the body.
async fn send(
    method: Method,
    target: &RegistrationTarget,
    token: &str,
    body: &str,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let uri: Uri = format!("{}/workers", target.router)
        .parse()
        .context("router URL")?;
    let host = uri.host().context("router URL has no host")?.to_owned();
    let default_port = if target.tls.is_some() { 443 } else { 80 };
    let port = uri.port_u16().unwrap_or(default_port);
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .context("connecting timed out")??;
    match &target.tls {
        Some((config, name)) => {
            let name = ServerName::try_from(name.clone())
                .with_context(|| format!("{name:?} is not a host name TLS can verify"))?;
            let tls = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream),
            )
            .await
            .context("the TLS handshake with the router timed out")?
            .map_err(|e| {
                // A certificate the other side refuses will not change by retrying.
                match e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<tokio_rustls::rustls::Error>())
                {
                    Some(tls) => anyhow::Error::new(TlsRefused(tls.to_string())),
                    None => {
                        anyhow::Error::new(e).context("the TLS handshake with the router failed")
                    }
                }
            })?;
            request(method, &uri, &host, port, token, body, TokioIo::new(tls)).await
        }
        None => request(method, &uri, &host, port, token, body, TokioIo::new(stream)).await,
    }
}

async fn request<I>(
    method: Method,
    uri: &Uri,
    host: &str,
    port: u16,
    token: &str,
    body: &str,
    io: I,
) -> anyhow::Result<(StatusCode, Bytes)>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .context("the router did not answer in time")??;
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .context("the router's answer did not end in time")??
        .to_bytes();
    Ok((status, body))
}
