//! Running one choice on a worker: pick a worker, retry failures before the first token,
//! detokenize incrementally, apply stop strings, and abort the worker request when the client
//! goes away.

use std::sync::Arc;

use llmapi_proto::v1::{
    AbortRequest, FinishReason, GenerateRequest, GenerateResponse, TokenLogprob, Usage,
};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use llmapi_common::trace_context::TraceContext;
use tonic::metadata::MetadataValue;

use crate::detok::{Detokenizer, StopCheck, StopMatcher};
use crate::error::ApiError;
use crate::pool::{InflightGuard, Worker, WorkerRpc};
use crate::state::AppState;

/// One choice to generate.
#[derive(Debug, Clone)]
pub struct ChoiceJob {
    /// The choice index in the response.
    pub index: u32,
    /// Worker request (request_id unique per choice).
    pub request: GenerateRequest,
    /// Hashes of the prompt's full blocks, for kv_cache_aware routing.
    pub block_hashes: Arc<Vec<u64>>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// The router's span of this request: the worker's parent, sent as gRPC metadata.
    pub trace: Arc<TraceContext>,
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

/// Sends an Abort for a worker request unless disarmed (the request finished by itself).
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
                let _ = client.abort(AbortRequest { request_id }).await;
            });
        }
    }
}

/// A worker stream that has produced its first response.
struct Opened {
    worker: Arc<Worker>,
    _inflight: InflightGuard,
    stream: Streaming<GenerateResponse>,
    first: GenerateResponse,
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

/// The worker request with the W3C trace context in its metadata, where gRPC carries it.
fn traced(job: &ChoiceJob) -> tonic::Request<GenerateRequest> {
    let mut request = tonic::Request::new(job.request.clone());
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
    for attempt in 0..=state.config.max_retries {
        let Some((worker, inflight)) = pick_and_begin(state, job, &mut tried) else {
            break;
        };
        if attempt > 0 {
            state.metrics.inc_retries();
        }
        let result = async {
            let mut stream = worker.client().generate(traced(job)).await?.into_inner();
            match stream.message().await? {
                Some(first) => Ok((stream, first)),
                None => Err(Status::unavailable(
                    "worker closed the stream without a response",
                )),
            }
        }
        .await;
        match result {
            Ok((stream, first)) => {
                worker.record_request_success();
                if let Ok(mut cache) = worker.cache.lock() {
                    cache.insert(&job.block_hashes);
                }
                return Ok(Opened {
                    worker,
                    _inflight: inflight,
                    stream,
                    first,
                });
            }
            Err(status) => {
                if let Some(e) = request_fault(&status) {
                    return Err(e);
                }
                tracing::warn!(worker = %worker.url, error = %status.message(), attempt, "worker failed before the first token");
                state.metrics.inc_worker_failures();
                worker.record_request_failure(&state.config.health);
                last_error = format!("worker {} failed: {}", worker.url, status.message());
            }
        }
    }
    Err(ApiError::unavailable(format!(
        "no worker could take the request ({last_error}); try again shortly"
    )))
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
    let mut abort = AbortOnDrop {
        client: worker.client(),
        request_id: job.request.request_id.clone(),
        armed: true,
    };
    let codec = state.codec.clone();
    let mut detok = Detokenizer::new(&job.request.prompt_token_ids);
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut next = Some(first);
    let mut usage = Usage {
        prompt_tokens: u32::try_from(job.request.prompt_token_ids.len()).unwrap_or(u32::MAX),
        ..Usage::default()
    };
    loop {
        let mut resp = match next.take() {
            Some(r) => r,
            None => {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let error = ApiError::unavailable(format!(
                            "worker {} ended the stream before finishing the request",
                            worker.url
                        ));
                        let _ = tx.send(ChoiceEvent::Failed { index, error }).await;
                        return;
                    }
                    Err(status) => {
                        abort.armed = false;
                        let error = request_fault(&status).unwrap_or_else(|| {
                            state.metrics.inc_worker_failures();
                            ApiError::unavailable(format!(
                                "worker {} failed during the request: {}",
                                worker.url,
                                status.message()
                            ))
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
