//! One benchmark request over HTTP/1.1: send the JSON body, read the SSE stream, time the chunks.
//!
//! Timing follows backend_request_func.py: the clock starts before the request is sent; TTFT is
//! taken at the first `data:` line whose `choices` is non-empty; every later such line adds an
//! ITL; the end-to-end latency ends at the last such line (for chat, at the last line of any
//! kind, usage included, as the original does). Each request uses its own connection, as the
//! original's `force_close` connector does. Failures keep an error class modelled on the
//! original's aiohttp exception names so that the "Error type" lines read the same.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::args::Backend;
use crate::metrics::RequestOutput;
use crate::sse::LineSplitter;

/// A resolved HTTP endpoint: where to connect and what to put in the request line.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Socket address of the server.
    pub addr: SocketAddr,
    /// Value of the Host header.
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// An endpoint URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL of the form http://host:port/path.
    #[error("'{url}' is not a usable URL ({why}); give e.g. --base-url http://127.0.0.1:8000")]
    Invalid {
        /// The URL given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The host name does not resolve.
    #[error("cannot resolve host of '{url}': {why}")]
    Resolve {
        /// The URL given.
        url: String,
        /// Resolver message.
        why: String,
    },
}

impl Endpoint {
    /// Parses and resolves `url` (http only; put a TLS proxy in front for https).
    pub async fn resolve(url: &str) -> Result<Self, EndpointError> {
        let invalid = |why: &str| EndpointError::Invalid {
            url: url.into(),
            why: why.into(),
        };
        let uri: hyper::Uri = url.parse().map_err(|_| invalid("unparsable"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(invalid("https is not supported by this client")),
            _ => return Err(invalid("the scheme must be http://")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .map_err(|e| EndpointError::Resolve {
                url: url.into(),
                why: e.to_string(),
            })?
            .next()
            .ok_or_else(|| EndpointError::Resolve {
                url: url.into(),
                why: "no address".into(),
            })?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Endpoint {
            addr,
            host: authority.as_str().to_string(),
            path,
        })
    }
}

/// How to read one response.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Completions or chat.
    pub backend: Backend,
    /// SSE stream or one JSON body.
    pub streaming: bool,
    /// Give up after this long in total.
    pub request_timeout: Duration,
    /// Give up when the stream is silent this long.
    pub chunk_timeout: Option<Duration>,
    /// `--ignore-eos` was sent: a response with fewer output tokens than asked (as the
    /// server's usage counts them) was cut short.
    pub ignore_eos: bool,
}

/// A failure and its error class.
struct Failure {
    kind: String,
    message: String,
}

impl Failure {
    fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// Sends `body` to `endpoint` and measures the response. Never panics; failures are recorded in
/// the output with an error class.
pub async fn send_request(
    endpoint: &Endpoint,
    body: Bytes,
    prompt_len: u64,
    expected_output_len: u64,
    opts: ReadOptions,
) -> RequestOutput {
    let mut out = RequestOutput {
        prompt_len,
        ..Default::default()
    };
    let start = Instant::now();
    let run = exchange(endpoint, body, opts, start, &mut out);
    let result = match tokio::time::timeout(opts.request_timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(
            "TimeoutError",
            format!(
                "request took longer than --request-timeout {:.1} s",
                opts.request_timeout.as_secs_f64()
            ),
        )),
    };
    let result = result.and_then(|()| check_length(&out, expected_output_len, opts));
    if let Err(f) = result {
        out.success = false;
        out.error = f.message;
        out.exception_type = Some(f.kind);
    }
    out
}

/// With `--ignore-eos` a response must carry every token asked for, unless it ended at a
/// length limit (finish_reason "length": the server lowered max_tokens to the room its
/// max_seq_len leaves, as trtllm-serve does): fewer (by the server's usage; without usage
/// nothing is checked) with any other ending means the server cut it short.
fn check_length(out: &RequestOutput, expected: u64, opts: ReadOptions) -> Result<(), Failure> {
    let at_limit = out.finish_reason.as_deref() == Some("length");
    if opts.ignore_eos && !at_limit && out.output_tokens > 0 && out.output_tokens < expected {
        return Err(Failure::new(
            TRUNCATED,
            format!(
                "the response has {} output tokens of the {expected} asked for with --ignore-eos",
                out.output_tokens
            ),
        ));
    }
    Ok(())
}

/// The error class of a response cut short: a stream that ended without a finish_reason, or
/// fewer tokens than asked for with `--ignore-eos`. benchmark_serving.py counts these as
/// successful.
pub const TRUNCATED: &str = "TruncatedStream";

/// The error class of a stream that carried an error event (`{"error": ...}` in a `data:`
/// line). benchmark_serving.py counts these as successful.
pub const IN_BAND: &str = "InBandError";

async fn exchange(
    endpoint: &Endpoint,
    body: Bytes,
    opts: ReadOptions,
    start: Instant,
    out: &mut RequestOutput,
) -> Result<(), Failure> {
    let stream = TcpStream::connect(endpoint.addr).await.map_err(|e| {
        Failure::new(
            "ClientConnectorError",
            format!("cannot connect to {}: {e}", endpoint.addr),
        )
    })?;
    // Latency matters more than packet count for small SSE frames.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::new("ClientConnectorError", e.to_string()))?;
    tokio::spawn(conn);
    let mut req = Request::post(endpoint.path.as_str())
        .header(HOST, endpoint.host.as_str())
        .header(CONTENT_TYPE, "application/json");
    if let Ok(key) = std::env::var("OPENAI_API_KEY") {
        req = req.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| Failure::new("InvalidURL", e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Failure::new("ServerDisconnectedError", e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let detail = read_error_body(resp.into_body()).await;
        let reason = status.canonical_reason().unwrap_or("");
        // "HTTP 404" and so on: stable strings for the error-type counts.
        return Err(Failure::new(
            format!("HTTP {}", status.as_u16()),
            format!("HTTP {} {reason}: {detail}", status.as_u16()),
        ));
    }
    let mut body = resp.into_body();
    if opts.streaming {
        read_stream(&mut body, opts, start, out).await
    } else {
        read_whole(&mut body, opts.backend, start, out).await
    }
}

/// The server's error message (OpenAI `{"error": {"message": ..}}` or the raw body), shortened.
async fn read_error_body(body: Incoming) -> String {
    // Bounded in size and time: an error body is only read for its message.
    let limited = http_body_util::Limited::new(body, 64 * 1024);
    let bytes = match tokio::time::timeout(Duration::from_secs(5), limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        _ => return "(no readable body)".into(),
    };
    let text = String::from_utf8_lossy(&bytes);
    let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
                .and_then(|m| m.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| text.trim().to_string());
    msg.chars().take(500).collect()
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Usage>,
    /// An error reported inside a stream (the OpenAI error object).
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    message: Option<Delta<'a>>,
    #[serde(default)]
    avg_decoded_tokens_per_iter: Option<f64>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

async fn next_frame(body: &mut Incoming, opts: &ReadOptions) -> Result<Option<Bytes>, Failure> {
    loop {
        let frame = match opts.chunk_timeout {
            Some(t) => tokio::time::timeout(t, body.frame()).await.map_err(|_| {
                Failure::new(
                    "TimeoutError",
                    format!(
                        "the stream sent nothing for --chunk-timeout {:.1} s",
                        t.as_secs_f64()
                    ),
                )
            })?,
            None => body.frame().await,
        };
        match frame {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(Failure::new(
                    "ClientPayloadError",
                    format!("response stream broke: {e}"),
                ));
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

async fn read_stream(
    body: &mut Incoming,
    opts: ReadOptions,
    start: Instant,
    out: &mut RequestOutput,
) -> Result<(), Failure> {
    let chat = opts.backend == Backend::OpenaiChat;
    let mut lines = LineSplitter::default();
    let mut first_chunk: Option<Instant> = None;
    let mut most_recent = start;
    while let Some(data) = next_frame(body, &opts).await? {
        lines.push(&data);
        while let Some(line) = lines.next_line() {
            let line = line.trim_ascii();
            // SSE comments (keep-alives) carry no data; the original fails on them.
            if line.is_empty() || line.starts_with(b":") {
                continue;
            }
            let payload = line.strip_prefix(b"data: ").unwrap_or(line);
            if payload == b"[DONE]" {
                continue;
            }
            let now = Instant::now();
            let chunk: Chunk = serde_json::from_slice(payload).map_err(|e| {
                let shown: String = String::from_utf8_lossy(payload).chars().take(200).collect();
                Failure::new(
                    "JSONDecodeError",
                    format!("bad stream chunk {shown:?}: {e}"),
                )
            })?;
            if let Some(e) = &chunk.error {
                let message = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map_or_else(|| e.to_string(), str::to_owned);
                return Err(Failure::new(
                    IN_BAND,
                    format!("the stream carried an error event: {message}"),
                ));
            }
            match chunk.choices.as_deref() {
                Some([choice, ..]) => {
                    if let Some(reason) = &choice.finish_reason {
                        out.finish_reason = Some(reason.to_string());
                    }
                    match first_chunk {
                        None => {
                            first_chunk = Some(now);
                            out.ttft = (now - start).as_secs_f64();
                        }
                        Some(_) => out.itl.push((now - most_recent).as_secs_f64()),
                    }
                    most_recent = now;
                    let text = if chat {
                        choice.delta.as_ref().and_then(|d| d.content.as_deref())
                    } else {
                        choice.text.as_deref()
                    };
                    out.generated_text.push_str(text.unwrap_or(""));
                    if let Some(v) = choice.avg_decoded_tokens_per_iter {
                        out.avg_decoded_tokens_per_iter = v;
                    }
                }
                _ => {
                    if let Some(n) = chunk.usage.and_then(|u| u.completion_tokens) {
                        out.output_tokens = n;
                    }
                    if chat {
                        most_recent = now;
                    }
                }
            }
        }
    }
    out.latency = (most_recent - start).as_secs_f64();
    // Chat success does not require a token in the original; completions does.
    if first_chunk.is_none() && !chat {
        return Err(Failure::new(
            "NoTokenChunk",
            "Never received a valid chunk to calculate TTFT. This response will be marked as \
             failed!",
        ));
    }
    if out.finish_reason.is_none() {
        return Err(Failure::new(
            TRUNCATED,
            "the stream ended without a finish_reason (cut short by the server or the network)",
        ));
    }
    out.success = true;
    Ok(())
}

async fn read_whole(
    body: &mut Incoming,
    backend: Backend,
    start: Instant,
    out: &mut RequestOutput,
) -> Result<(), Failure> {
    let bytes = body
        .collect()
        .await
        .map_err(|e| Failure::new("ClientPayloadError", format!("response broke: {e}")))?
        .to_bytes();
    let chunk: Chunk = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::new("JSONDecodeError", format!("bad response body: {e}")))?;
    let choice = chunk
        .choices
        .as_deref()
        .and_then(|c| c.first())
        .ok_or_else(|| Failure::new("KeyError", "response has no choices"))?;
    let text = match backend {
        Backend::OpenaiChat => choice.message.as_ref().and_then(|m| m.content.as_deref()),
        Backend::Openai => choice.text.as_deref(),
    };
    out.generated_text = text.unwrap_or("").to_string();
    out.finish_reason = choice.finish_reason.as_deref().map(str::to_owned);
    if let Some(v) = choice.avg_decoded_tokens_per_iter {
        out.avg_decoded_tokens_per_iter = v;
    }
    out.output_tokens = chunk
        .usage
        .and_then(|u| u.completion_tokens)
        .ok_or_else(|| Failure::new("KeyError", "response has no usage.completion_tokens"))?;
    out.latency = start.elapsed().as_secs_f64();
    out.ttft = -1.0;
    out.success = true;
    Ok(())
}
