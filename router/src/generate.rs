//! Running one choice on a worker: pick a worker, retry failures before the first token,
//! move the choice to another worker when its worker fails after it (`migrate`), detokenize
//! incrementally, apply stop strings, and abort the worker request when the client goes away
//! or a deadline passes (`deadline`).
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
use llmapi_common::traces::TraceHeaders;

use crate::deadline::{Expired, RequestDeadline, expiry};
use crate::detok::{Detokenizer, StopCheck, StopMatcher};
use crate::error::ApiError;
use crate::group::GroupPin;
use crate::migrate::{Cause, resume_request};
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
    pub trace: Arc<TraceHeaders>,
    /// When the request must end (whole) and have its first token.
    pub deadline: RequestDeadline,
    /// The worker this choice's sequence group runs on (`n > 1`: the choices of one prompt
    /// share its KV there); None for a lone choice.
    pub group: Option<Arc<GroupPin>>,
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
        /// Tokens generated since the previous delta (their text may be partly held back).
        tokens: u32,
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
    /// The first response, until relayed.
    first: Option<GenerateResponse>,
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
/// RESOURCE_EXHAUSTED (the worker's queue is full) 429 with Retry-After, once no other
/// worker has room. None is counted by the worker's breaker. `None` means the worker
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
/// skipped (added to `tried`) without using up a retry. A request that carries generated
/// tokens (a migration) goes only to workers that continue from them. A new choice of a
/// sequence group goes to its group's worker when that one takes it (`group`).
fn pick_and_begin(
    state: &AppState,
    job: &ChoiceJob,
    tried: &mut Vec<String>,
) -> Option<(Arc<Worker>, InflightGuard)> {
    let resuming = !job.request.generated_token_ids.is_empty();
    let (worker, mut inflight) = match job.group.as_deref() {
        Some(pin) if !resuming => pin.begin(&candidates(state, job, tried), tried, |tried| {
            pick_by_policy(state, job, tried)
        }),
        _ => pick_by_policy(state, job, tried),
    }?;
    inflight.hold_blocks(&job.block_hashes);
    Some((worker, inflight))
}

/// The routable workers not in `tried` that can take `job`.
fn candidates(state: &AppState, job: &ChoiceJob, tried: &[String]) -> Vec<Arc<Worker>> {
    let resuming = !job.request.generated_token_ids.is_empty();
    state
        .pool
        .routable()
        .into_iter()
        .filter(|w| !tried.contains(&w.url))
        .filter(|w| !resuming || w.info().is_some_and(|i| i.resumes_generation))
        .collect()
}

/// `pick_and_begin` by the routing policy alone.
fn pick_by_policy(
    state: &AppState,
    job: &ChoiceJob,
    tried: &mut Vec<String>,
) -> Option<(Arc<Worker>, InflightGuard)> {
    loop {
        let candidates = candidates(state, job, tried);
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
    job.trace.insert_into(request.metadata_mut());
    request
}

/// Opens the choice's stream on a worker not in `exclude`, retrying others (`--max_retries`)
/// while they fail before the first response.
async fn open(state: &AppState, job: &ChoiceJob, exclude: &[String]) -> Result<Opened, ApiError> {
    let mut tried: Vec<String> = exclude.to_vec();
    let mut last_error = String::from("no worker is healthy");
    // A worker whose queue is full answers RESOURCE_EXHAUSTED: the next one is asked without
    // using up a retry, and the client gets 429 only when every worker it could go to is full.
    let mut busy: Option<ApiError> = None;
    let mut attempt_no = 0;
    while attempt_no <= state.config.max_retries {
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
                return Ok(Opened {
                    worker,
                    _inflight: inflight,
                    abort,
                    stream,
                    first: Some(first),
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
        if status.code() == Code::ResourceExhausted {
            tracing::debug!(worker = %worker.url, "worker queue full; asking another");
            busy = request_fault(&status);
            continue;
        }
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
        attempt_no += 1;
    }
    if let Some(busy) = busy {
        return Err(busy);
    }
    Err(ApiError::unavailable(format!(
        "no worker could take the request ({last_error}); try again shortly"
    )))
}

/// The cause and the error of a worker that failed mid-stream. 504 when the call died after
/// the worker had been silent for a whole keep-alive interval: it stopped answering (a
/// stopped process, a cut link) and the connection's keep-alive check ended the call, a
/// timeout in all but name (gRPC reports it as UNAVAILABLE). 503 otherwise: the worker failed
/// or died.
fn mid_stream_failure(worker: &Worker, status: &Status, silent: Duration) -> (Cause, ApiError) {
    if silent >= LINK_KEEPALIVE_INTERVAL {
        let error = ApiError::timeout(format!(
            "worker {} stopped answering during the request: nothing for {:.0} s, then its \
             connection's keep-alive check failed ({}); retry the request",
            worker.url,
            silent.as_secs_f64(),
            status.message()
        ));
        return (Cause::Unresponsive, error);
    }
    let error = ApiError::unavailable(format!(
        "worker {} failed during the request: {}",
        worker.url,
        status.message()
    ));
    (Cause::StreamError, error)
}

/// What a choice has produced so far; it stays with the choice when it moves to another
/// worker, so the text, stop strings and counts go on across the seam.
struct Progress {
    detok: Detokenizer,
    stops: StopMatcher,
    usage: Usage,
    /// Token ids streamed so far, from every worker: what a migration carries over.
    generated: Vec<u32>,
    /// Workers that failed this choice mid-stream: it never moves back to them.
    failed: Vec<String>,
    /// Migrations so far.
    migrations: u32,
    /// Logprobs of tokens whose text is still held back (an unfinished UTF-8 character, a
    /// possible stop string): they go out with the chunk that releases the text, so that every
    /// streamed chunk's text and logprobs describe the same tokens.
    held_logprobs: Vec<TokenLogprob>,
    /// Tokens generated since the last delta sent (reasoning token counts).
    held_tokens: u32,
}

/// How relaying one worker's stream ended.
enum Relayed {
    /// The choice is over: finished, failed for good (its error sent), or its client left.
    Over,
    /// The worker failed mid-stream through its own fault; nothing was sent yet. The choice
    /// may move to another worker, or end with `error`.
    WorkerFault {
        /// What happened, for the metric and the log.
        cause: Cause,
        /// What the client hears if the choice cannot move.
        error: ApiError,
    },
}

/// Sends a choice's final error; a timeout is counted.
async fn fail(state: &AppState, tx: &mpsc::Sender<ChoiceEvent>, index: u32, error: ApiError) {
    if error.status == axum::http::StatusCode::GATEWAY_TIMEOUT {
        state.metrics.inc_timeouts();
    }
    let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
}

/// Runs one choice to the end, sending its events to `tx`. Returns early (aborting the worker
/// request) when the receiver is dropped. A worker that fails after the first token hands the
/// choice to another (`migrate`), at most `--max_migrations` times.
pub async fn run_choice(state: Arc<AppState>, job: ChoiceJob, tx: mpsc::Sender<ChoiceEvent>) {
    let index = job.index;
    let opened = tokio::select! {
        r = open(&state, &job, &[]) => r,
        _ = tx.closed() => return,
    };
    let mut opened = match opened {
        Ok(o) => o,
        Err(error) => {
            let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
            return;
        }
    };
    tracing::debug!(worker = %opened.worker.url, "first response");
    let mut progress = Progress {
        detok: Detokenizer::new(&job.request.prompt_token_ids),
        stops: StopMatcher::new(job.stop.clone()),
        usage: Usage {
            prompt_tokens: u32::try_from(job.request.prompt_token_ids.len()).unwrap_or(u32::MAX),
            ..Usage::default()
        },
        generated: Vec::new(),
        failed: Vec::new(),
        migrations: 0,
        held_logprobs: Vec::new(),
        held_tokens: 0,
    };
    loop {
        let (cause, error) = match relay(&state, &job, &mut opened, &mut progress, &tx).await {
            Relayed::Over => return,
            Relayed::WorkerFault { cause, error } => (cause, error),
        };
        let from = opened.worker.url.clone();
        // The failed worker's guards go now: its in-flight count, and an Abort if armed.
        drop(opened);
        progress.failed.push(from.clone());
        let max_tokens = job.request.stopping.as_ref().map_or(0, |s| s.max_tokens);
        if max_tokens > 0 && progress.generated.len() >= max_tokens as usize {
            // Every token came; only the worker's finish was lost: the choice ends here,
            // as the worker would have ended it.
            let last = GenerateResponse {
                finish_reason: FinishReason::Length as i32,
                ..GenerateResponse::default()
            };
            let _ = deliver(&state, index, &mut progress, last, &tx).await;
            return;
        }
        if progress.migrations >= state.config.max_migrations {
            if state.config.max_migrations > 0 {
                tracing::warn!(request_id = %job.request.request_id, worker = %from, migrations = progress.migrations, "worker failed mid-stream and the request has moved --max_migrations times already; it ends with an error");
            }
            fail(&state, &tx, index, error).await;
            return;
        }
        let next = resumed_job(&job, &progress.generated);
        let reopened = tokio::select! {
            r = open(&state, &next, &progress.failed) => r,
            _ = tx.closed() => return,
        };
        match reopened {
            Ok(o) => {
                progress.migrations += 1;
                state.metrics.inc_migrations(&from, cause.label());
                tracing::warn!(
                    request_id = %job.request.request_id,
                    tokens_carried = progress.generated.len(),
                    from_worker = %from,
                    to_worker = %o.worker.url,
                    cause = cause.label(),
                    migration = progress.migrations,
                    "request migrated: its worker failed mid-stream; another continues it"
                );
                opened = o;
            }
            Err(why) => {
                tracing::warn!(request_id = %job.request.request_id, worker = %from, error = %why.message, "worker failed mid-stream and no other worker could take the request over");
                let error = ApiError {
                    message: format!(
                        "{}; moving the request to another worker failed: {}",
                        error.message, why.message
                    ),
                    ..error
                };
                fail(&state, &tx, index, error).await;
                return;
            }
        }
    }
}

/// The job that continues `job` on another worker after `generated` tokens: the request with
/// the tokens carried over, and no first-token deadline left (the client has its first
/// token; the whole request's deadline still holds).
fn resumed_job(job: &ChoiceJob, generated: &[u32]) -> ChoiceJob {
    ChoiceJob {
        request: resume_request(&job.request, generated),
        deadline: job.deadline.after_first_token(),
        ..job.clone()
    }
}

/// Relays one worker's stream of `job` into `tx` (text, logprobs, the finish) until the
/// choice is over or the worker fails through its own fault.
async fn relay(
    state: &AppState,
    job: &ChoiceJob,
    opened: &mut Opened,
    progress: &mut Progress,
    tx: &mpsc::Sender<ChoiceEvent>,
) -> Relayed {
    let index = job.index;
    let worker = opened.worker.clone();
    let mut next = opened.first.take();
    let mut last_heard = Instant::now();
    // One timer for the whole stream, not one per token.
    let expired = expiry(job.deadline.whole());
    tokio::pin!(expired);
    loop {
        let resp = match next.take() {
            Some(r) => r,
            None => {
                let msg = tokio::select! {
                    m = opened.stream.message() => m,
                    _ = tx.closed() => return Relayed::Over,
                    which = &mut expired => {
                        // The guard aborts the worker request; the client hears why.
                        tracing::info!(worker = %worker.url, "request ran past its deadline; worker request aborted");
                        fail(state, tx, index, job.deadline.error(which)).await;
                        return Relayed::Over;
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
                        return Relayed::WorkerFault {
                            cause: Cause::StreamEnded,
                            error,
                        };
                    }
                    Err(status) if status.code() == Code::DeadlineExceeded => {
                        opened.abort.armed = false;
                        fail(state, tx, index, job.deadline.error(Expired::Request)).await;
                        return Relayed::Over;
                    }
                    Err(status) => {
                        opened.abort.armed = false;
                        if let Some(error) = request_fault(&status) {
                            let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                            return Relayed::Over;
                        }
                        state.metrics.inc_worker_failures();
                        let (cause, error) =
                            mid_stream_failure(&worker, &status, last_heard.elapsed());
                        return Relayed::WorkerFault { cause, error };
                    }
                }
            }
        };
        match deliver(state, index, progress, resp, tx).await {
            Delivered::More => {}
            // The guard aborts the worker request.
            Delivered::ClientGone => return Relayed::Over,
            Delivered::Finished { stopped } => {
                // A stop string ends the request here: the worker is told to abort (guard).
                opened.abort.armed = stopped;
                return Relayed::Over;
            }
        }
    }
}

/// What delivering one worker response left of the choice.
enum Delivered {
    /// More responses are due.
    More,
    /// The choice finished; by a stop string when `stopped` (its worker request is then
    /// still running).
    Finished {
        /// A stop string ended it.
        stopped: bool,
    },
    /// The client left.
    ClientGone,
}

/// Turns one worker response into the choice's events: prompt logprobs, the text it
/// completes (detokenized, stop strings applied), logprobs, and the finish when it carries
/// one.
async fn deliver(
    state: &AppState,
    index: u32,
    progress: &mut Progress,
    mut resp: GenerateResponse,
    tx: &mpsc::Sender<ChoiceEvent>,
) -> Delivered {
    let codec = state.codec.as_ref();
    if !resp.prompt_logprobs.is_empty()
        && tx
            .send(ChoiceEvent::PromptLogprobs {
                index,
                logprobs: std::mem::take(&mut resp.prompt_logprobs),
            })
            .await
            .is_err()
    {
        return Delivered::ClientGone;
    }
    state.metrics.add_generation_tokens(resp.token_ids.len());
    progress.generated.extend_from_slice(&resp.token_ids);
    let usage = &mut progress.usage;
    usage.completion_tokens = usage
        .completion_tokens
        .saturating_add(u32::try_from(resp.token_ids.len()).unwrap_or(u32::MAX));
    if let Some(u) = resp.usage {
        // The worker's counts are authoritative when present (a migrated request's include
        // the tokens carried over); cached_tokens only it knows.
        *usage = Usage {
            completion_tokens: u.completion_tokens.max(usage.completion_tokens),
            ..u
        };
    }
    let mut text = String::new();
    for &id in &resp.token_ids {
        text.push_str(&progress.detok.push(codec, id));
    }
    let finish = FinishReason::try_from(resp.finish_reason).unwrap_or(FinishReason::Unspecified);
    if finish != FinishReason::Unspecified {
        text.push_str(&progress.detok.flush(codec));
    }
    let (mut emit, stopped) = match progress.stops.push(&text) {
        StopCheck::Emit(t) => (t, false),
        StopCheck::Stopped(t) => (t, true),
    };
    if finish != FinishReason::Unspecified && !stopped {
        emit.push_str(&progress.stops.flush());
    }
    let ends = stopped || finish != FinishReason::Unspecified;
    progress.held_logprobs.append(&mut resp.logprobs);
    progress.held_tokens = progress
        .held_tokens
        .saturating_add(u32::try_from(resp.token_ids.len()).unwrap_or(u32::MAX));
    if (!emit.is_empty() || (ends && !progress.held_logprobs.is_empty()))
        && tx
            .send(ChoiceEvent::Delta {
                index,
                text: emit,
                logprobs: std::mem::take(&mut progress.held_logprobs),
                tokens: std::mem::take(&mut progress.held_tokens),
            })
            .await
            .is_err()
    {
        return Delivered::ClientGone;
    }
    if !ends {
        return Delivered::More;
    }
    let reason = if stopped || finish == FinishReason::Stop {
        "stop"
    } else {
        "length"
    };
    let _ = tx
        .send(ChoiceEvent::Finish {
            index,
            reason,
            usage: progress.usage,
        })
        .await;
    Delivered::Finished { stopped }
}
