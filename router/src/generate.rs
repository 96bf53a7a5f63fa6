//! Running one choice on a worker: pick a worker, retry failures before the first token,
//! detokenize incrementally, apply stop strings, and abort the worker request when the client
//! goes away or a deadline passes (`deadline`).
//!
//! What a timeout costs the worker: a worker that has not even answered the call's headers by
//! the deadline (a stopped process, a dead link) produced nothing, and the timeout counts
//! against its breaker like any worker fault. A worker that accepted the call (the headers
//! come back as soon as its engine queued the request) and is merely slow, queued or
//! generating a long answer is not blamed: its engine's own liveness check
//! (`--engine_stall_timeout`) ejects it if it is stuck.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmapi_proto::v1::{
    AbortRequest, FinishReason, GenerateRequest, GenerateResponse, TokenLogprob, Usage,
};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use llmapi_common::block_hash::BlockHash;
use llmapi_common::trace_context::TraceContext;
use tonic::metadata::MetadataValue;

use crate::deadline::{Expired, RequestDeadline, expiry};
use crate::detok::{Detokenizer, StopCheck, StopMatcher};
use crate::error::ApiError;
use crate::pool::{InflightGuard, LINK_KEEPALIVE_INTERVAL, Worker, WorkerRpc};
use crate::state::AppState;

/// One choice to generate.
#[derive(Debug, Clone)]
pub struct ChoiceJob {
    /// The choice index in the response.
    pub index: u32,
    /// Worker request (request_id unique per choice).
    pub request: GenerateRequest,
    /// Hashes of the prompt's full blocks, for kv_cache_aware routing.
    pub block_hashes: Arc<Vec<BlockHash>>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The router's span of this request: the worker's parent, sent as gRPC metadata.
    pub trace: Arc<TraceContext>,
    /// When the request must end (whole) and have its first token.
    pub deadline: RequestDeadline,
}

/// What a running choice reports.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// Logprobs of the prompt's tokens after the first (echo with logprobs); sent before the
    /// choice's first `Delta`.
    PromptLogprobs {
        /// Choice index.
        index: u32,
        /// One entry per prompt token from the second on.
        logprobs: Vec<TokenLogprob>,
    },
    /// New text and the tokens behind it.
    Delta {
        /// Choice index.
        index: u32,
        /// Text safe to show.
        text: String,
        /// Logprobs of the new tokens, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The choice ended.
    Finish {
        /// Choice index.
        index: u32,
        /// `stop` or `length`.
        reason: &'static str,
        /// Token counts from the worker (completion tokens as generated).
        usage: Usage,
    },
    /// The choice failed; no more events for it.
    Failed {
        /// Choice index.
        index: u32,
        /// What to tell the client.
        error: ApiError,
    },
}

/// How long an Abort may take: a stopped worker never answers it.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends an Abort for a worker request unless disarmed (the request finished by itself or
/// the worker ended it). Dropping the stream alone also ends it on the worker (the call is
/// reset); the Abort frees the request's KV blocks even if the reset is lost.
struct AbortOnDrop {
    client: WorkerRpc,
    request_id: String,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut client = self.client.clone();
        let request_id = std::mem::take(&mut self.request_id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let abort = client.abort(AbortRequest { request_id });
                let _ = tokio::time::timeout(ABORT_TIMEOUT, abort).await;
            });
        }
    }
}

/// A worker stream that has produced its first response.
struct Opened {
    worker: Arc<Worker>,
    _inflight: InflightGuard,
    abort: AbortOnDrop,
    stream: Streaming<GenerateResponse>,
    first: GenerateResponse,
}

/// How one attempt to open a worker stream ended.
enum Attempt {
    Opened(Box<(Streaming<GenerateResponse>, GenerateResponse)>),
    /// The worker answered with an error (or closed the stream): `request_fault` decides.
    Failed(Status),
    /// The deadline passed before the worker answered the call at all: a worker fault.
    Silent(Expired),
    /// The worker accepted the call, but no token came by the deadline: not its fault.
    NoFirstToken(Expired),
}

/// One attempt: the call's headers, then its first response, both by the first-token
/// deadline.
async fn attempt(worker: &Worker, job: &ChoiceJob) -> Attempt {
    let deadline = job.deadline.first_token();
    let call = async { worker.client().generate(traced(job)).await };
    let mut stream = tokio::select! {
        r = call => match r {
            Ok(r) => r.into_inner(),
            Err(status) => return Attempt::Failed(status),
        },
        which = expiry(deadline) => return Attempt::Silent(which),
    };
    tokio::select! {
        m = stream.message() => match m {
            Ok(Some(first)) => Attempt::Opened(Box::new((stream, first))),
            Ok(None) => Attempt::Failed(Status::unavailable(
                "worker closed the stream without a response",
            )),
            Err(status) => Attempt::Failed(status),
        },
        which = expiry(deadline) => Attempt::NoFirstToken(which),
    }
}

/// Seconds a client told 429 because a worker's queue is full should wait before retrying.
const WORKER_BUSY_RETRY_AFTER_S: u64 = 1;

/// Maps a worker status that is the request's own fault to a client error: INVALID_ARGUMENT,
/// OUT_OF_RANGE and FAILED_PRECONDITION (a request that can never fit) give 400,
/// RESOURCE_EXHAUSTED (the worker's queue is full) 429 with Retry-After. Such answers are
/// neither retried on another worker nor counted by its breaker. `None` means the worker
/// failed (transport, UNAVAILABLE, INTERNAL, ...) and another may be tried.
fn request_fault(status: &Status) -> Option<ApiError> {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            Some(ApiError::bad_request(status.message()))
        }
        Code::ResourceExhausted => {
            Some(ApiError::too_many(status.message()).with_retry_after(WORKER_BUSY_RETRY_AFTER_S))
        }
        _ => None,
    }
}

/// Picks a worker not in `tried` whose breaker lets the request through, and marks the
/// request started on it. A half-open worker whose probe slot another request took is
/// skipped (added to `tried`) without using up a retry.
fn pick_and_begin(
    state: &AppState,
    job: &ChoiceJob,
    tried: &mut Vec<String>,
) -> Option<(Arc<Worker>, InflightGuard)> {
    loop {
        let candidates: Vec<_> = state
            .pool
            .routable()
            .into_iter()
            .filter(|w| !tried.contains(&w.url))
            .collect();
        let (worker, _matched) = state.router.pick(&candidates, &job.block_hashes)?;
        tried.push(worker.url.clone());
        if let Some(inflight) = worker.try_begin() {
            return Some((worker, inflight));
        }
    }
}

/// The worker request with the W3C trace context in its metadata, where gRPC carries it, and
/// the whole request's deadline as its gRPC deadline (`grpc-timeout`).
fn traced(job: &ChoiceJob) -> tonic::Request<GenerateRequest> {
    let mut request = tonic::Request::new(job.request.clone());
    if let Some(left) = job.deadline.remaining() {
        request.set_timeout(left);
    }
    let md = request.metadata_mut();
    if let Ok(v) = MetadataValue::try_from(job.trace.traceparent()) {
        md.insert("traceparent", v);
    }
    if let Some(Ok(v)) = job.trace.tracestate.as_deref().map(MetadataValue::try_from) {
        md.insert("tracestate", v);
    }
    request
}

async fn open(state: &AppState, job: &ChoiceJob) -> Result<Opened, ApiError> {
    let mut tried: Vec<String> = Vec::new();
    let mut last_error = String::from("no worker is healthy");
    for attempt_no in 0..=state.config.max_retries {
        if let Some((at, which)) = job.deadline.first_token()
            && std::time::Instant::now() >= at
        {
            state.metrics.inc_timeouts();
            return Err(job.deadline.error(which));
        }
        let Some((worker, inflight)) = pick_and_begin(state, job, &mut tried) else {
            break;
        };
        if attempt_no > 0 {
            state.metrics.inc_retries();
        }
        let mut abort = AbortOnDrop {
            client: worker.client(),
            request_id: job.request.request_id.clone(),
            armed: true,
        };
        let status = match attempt(&worker, job).await {
            Attempt::Opened(opened) => {
                let (stream, first) = *opened;
                worker.record_request_success();
                if let Ok(mut cache) = worker.cache.lock() {
                    cache.insert(&job.block_hashes);
                }
                return Ok(Opened {
                    worker,
                    _inflight: inflight,
                    abort,
                    stream,
                    first,
                });
            }
            Attempt::Failed(status) => status,
            Attempt::Silent(which) => {
                tracing::warn!(worker = %worker.url, "worker did not answer the call by the deadline; counted as its fault");
                state.metrics.inc_timeouts();
                state.metrics.inc_worker_failures();
                worker.record_request_failure(&state.config.health);
                return Err(job.deadline.error(which));
            }
            Attempt::NoFirstToken(which) => {
                tracing::info!(worker = %worker.url, "no first token by the deadline; worker request aborted");
                state.metrics.inc_timeouts();
                return Err(job.deadline.error(which));
            }
        };
        // The worker ended the request itself: nothing to abort.
        abort.armed = false;
        if let Some(e) = request_fault(&status) {
            return Err(e);
        }
        if status.code() == Code::DeadlineExceeded {
            // The worker's own clock saw the whole request's deadline pass.
            state.metrics.inc_timeouts();
            return Err(job.deadline.error(Expired::Request));
        }
        tracing::warn!(worker = %worker.url, error = %status.message(), attempt = attempt_no, "worker failed before the first token");
        state.metrics.inc_worker_failures();
        worker.record_request_failure(&state.config.health);
        last_error = format!("worker {} failed: {}", worker.url, status.message());
    }
    Err(ApiError::unavailable(format!(
        "no worker could take the request ({last_error}); try again shortly"
    )))
}

/// The error of a worker that failed mid-stream. 504 when the call died after the worker had
/// been silent for a whole keep-alive interval: it stopped answering (a stopped process, a
/// cut link) and the connection's keep-alive check ended the call, a timeout in all but name
/// (gRPC reports it as UNAVAILABLE). 503 otherwise: the worker failed or died.
fn mid_stream_failure(
    state: &AppState,
    worker: &Worker,
    status: &Status,
    silent: Duration,
) -> ApiError {
    if silent >= LINK_KEEPALIVE_INTERVAL {
        state.metrics.inc_timeouts();
        return ApiError::timeout(format!(
            "worker {} stopped answering during the request: nothing for {:.0} s, then its \
             connection's keep-alive check failed ({}); retry the request",
            worker.url,
            silent.as_secs_f64(),
            status.message()
        ));
    }
    ApiError::unavailable(format!(
        "worker {} failed during the request: {}",
        worker.url,
        status.message()
    ))
}

/// Runs one choice to the end, sending its events to `tx`. Returns early (aborting the worker
/// request) when the receiver is dropped.
pub async fn run_choice(state: Arc<AppState>, job: ChoiceJob, tx: mpsc::Sender<ChoiceEvent>) {
    let index = job.index;
    let opened = tokio::select! {
        r = open(&state, &job) => r,
        _ = tx.closed() => return,
    };
    let Opened {
        worker,
        _inflight,
        mut abort,
        mut stream,
        first,
    } = match opened {
        Ok(o) => o,
        Err(error) => {
            let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
            return;
        }
    };
    tracing::debug!(worker = %worker.url, "first response");
    let codec = state.codec.clone();
    let mut detok = Detokenizer::new(&job.request.prompt_token_ids);
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut next = Some(first);
    let mut last_heard = Instant::now();
    let mut usage = Usage {
        prompt_tokens: u32::try_from(job.request.prompt_token_ids.len()).unwrap_or(u32::MAX),
        ..Usage::default()
    };
    // One timer for the whole stream, not one per token.
    let expired = expiry(job.deadline.whole());
    tokio::pin!(expired);
    loop {
        let mut resp = match next.take() {
            Some(r) => r,
            None => {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                    which = &mut expired => {
                        // The guard aborts the worker request; the client hears why.
                        state.metrics.inc_timeouts();
                        tracing::info!(worker = %worker.url, "request ran past its deadline; worker request aborted");
                        let error = job.deadline.error(which);
                        let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                        return;
                    }
                };
                match msg {
                    Ok(Some(r)) => {
                        last_heard = Instant::now();
                        r
                    }
                    Ok(None) => {
                        let error = ApiError::unavailable(format!(
                            "worker {} ended the stream before finishing the request",
                            worker.url
                        ));
                        let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                        return;
                    }
                    Err(status) if status.code() == Code::DeadlineExceeded => {
                        abort.armed = false;
                        state.metrics.inc_timeouts();
                        let error = job.deadline.error(Expired::Request);
                        let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                        return;
                    }
                    Err(status) => {
                        abort.armed = false;
                        let error = request_fault(&status).unwrap_or_else(|| {
                            state.metrics.inc_worker_failures();
                            mid_stream_failure(&state, &worker, &status, last_heard.elapsed())
                        });
                        let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                        return;
                    }
                }
            }
        };
        if !resp.prompt_logprobs.is_empty()
            && tx
                .send(ChoiceEvent::PromptLogprobs {
                    index,
                    logprobs: std::mem::take(&mut resp.prompt_logprobs),
                })
                .await
                .is_err()
        {
            return;
        }
        state.metrics.add_generation_tokens(resp.token_ids.len());
        usage.completion_tokens = usage
            .completion_tokens
            .saturating_add(u32::try_from(resp.token_ids.len()).unwrap_or(u32::MAX));
        if let Some(u) = resp.usage {
            // The worker's counts are authoritative when present; cached_tokens only it knows.
            usage = Usage {
                completion_tokens: u.completion_tokens.max(usage.completion_tokens),
                ..u
            };
        }
        let mut text = String::new();
        for &id in &resp.token_ids {
            text.push_str(&detok.push(codec.as_ref(), id));
        }
        let finish =
            FinishReason::try_from(resp.finish_reason).unwrap_or(FinishReason::Unspecified);
        if finish != FinishReason::Unspecified {
            text.push_str(&detok.flush(codec.as_ref()));
        }
        let (emit, stopped) = match stops.push(&text) {
            StopCheck::Emit(t) => (t, false),
            StopCheck::Stopped(t) => (t, true),
        };
        let mut emit = emit;
        if finish != FinishReason::Unspecified && !stopped {
            emit.push_str(&stops.flush());
        }
        if (!emit.is_empty() || !resp.logprobs.is_empty())
            && tx
                .send(ChoiceEvent::Delta {
                    index,
                    text: emit,
                    logprobs: std::mem::take(&mut resp.logprobs),
                })
                .await
                .is_err()
        {
            return;
        }
        if stopped || finish != FinishReason::Unspecified {
            // A stop string ends the request here: the worker is told to abort (guard).
            abort.armed = stopped;
            let reason = if stopped || finish == FinishReason::Stop {
                "stop"
            } else {
                "length"
            };
            let _ = tx
                .send(ChoiceEvent::Finish {
                    index,
                    reason,
                    usage,
                })
                .await;
            return;
        }
    }
}
