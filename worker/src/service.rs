//! The worker gRPC service: the `llmapi.worker.v1.Worker` contract over an `EngineHandle`.
//!
//! Generate streams the engine's token events as proto responses; when the caller drops the
//! stream the engine receiver is dropped with it, which aborts the request and frees its KV
//! blocks. A call's gRPC deadline (`grpc-timeout`, the router's `--request_timeout`) bounds
//! the whole stream: past it the request is aborted, its KV blocks are freed and the call ends
//! with DEADLINE_EXCEEDED, even while the caller is still connected (tonic's own deadline
//! covers only the call's headers, not its stream). Health, Info and Load read the engine; a Health probe runs a real one-token request.
//! KvEvents streams the engine's prefix-cache changes (`kv_feed`).
//! Every call is authenticated by the job secret (`llmapi_proto::auth`): `serve` takes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use llmapi_common::guided::Constraint;
use llmapi_common::traces::{self, TraceHeaders};
use llmapi_proto::auth::RequireToken;
use llmapi_proto::limits::MAX_MESSAGE_BYTES;
use llmapi_proto::v1 as pb;
use llmapi_proto::v1::worker_server::{Worker, WorkerServer};
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::engine::{
    EngineError, EngineHandle, FinishReason, GenerateParams, STEP_BATCH_BOUNDS, STEP_BUCKETS,
    STEP_TIME_BOUNDS_US, STEP_TOKEN_BOUNDS, SamplingParams, StepHistogram, StoppingParams,
    TokenEvent, TokenLogprob,
};
use crate::spans::GenerateSpan;

/// How long a Health probe's one-token generation may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The gRPC service of one worker group leader.
#[derive(Clone)]
pub struct WorkerService {
    engine: EngineHandle,
    tp_size: u32,
    ep_size: u32,
    probes: std::sync::Arc<AtomicU64>,
    /// Turns true when the server begins to shut down: KvEvents streams, which never end on
    /// their own, end then so the graceful shutdown need not wait for their callers.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

impl WorkerService {
    /// A service over `engine`; `tp_size` / `ep_size` are reported by Info.
    pub fn new(engine: EngineHandle, tp_size: u32, ep_size: u32) -> Self {
        Self {
            engine,
            tp_size,
            ep_size,
            probes: std::sync::Arc::default(),
            closing: None,
        }
    }
}

/// Serves `service` on `listener` until `shutdown` resolves. Every call must carry
/// `authorization: Bearer <secret>` with the secret `auth` holds (the job secret); others are
/// answered UNAUTHENTICATED before they reach the engine. With `tls` the listener speaks only
/// TLS (`llmapi_proto::tls::TransportTls::grpc_server`; with a client CA, only to clients
/// holding a certificate it signed): a plaintext or wrongly certified client never gets as
/// far as the token check.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    auth: RequireToken,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Token frames are small: without TCP_NODELAY each waits for Nagle's algorithm (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let service = WorkerService {
        closing: Some(closing_rx),
        ..service
    };
    let shutdown = async move {
        shutdown.await;
        let _ = closing.send(true);
    };
    server
        .add_service(InterceptedService::new(
            WorkerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The gRPC class of an engine error: the request's own fault (INVALID_ARGUMENT,
/// FAILED_PRECONDITION, RESOURCE_EXHAUSTED), which the router answers to its client and never
/// retries elsewhere nor counts against this worker, or the worker's (UNAVAILABLE, INTERNAL).
fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m),
        EngineError::DoesNotFit(m) => Status::failed_precondition(m),
        EngineError::QueueFull(m) => Status::resource_exhausted(m),
        EngineError::Shutdown => Status::unavailable("the engine has shut down"),
        other => Status::internal(other.to_string()),
    }
}

fn params(req: pb::GenerateRequest) -> GenerateParams {
    let s = req.sampling.unwrap_or_default();
    let t = req.stopping.unwrap_or_default();
    // proto3 zero values mean "unset" for the multiplicative knobs.
    let or_one = |v: f32| if v > 0.0 { v } else { 1.0 };
    GenerateParams {
        request_id: req.request_id,
        prompt: req.prompt_token_ids,
        generated: req.generated_token_ids,
        group: req.group_id,
        sampling: SamplingParams {
            temperature: s.temperature.max(0.0),
            top_k: s.top_k,
            top_p: or_one(s.top_p),
            min_p: s.min_p,
            seed: s.seed,
            repetition_penalty: or_one(s.repetition_penalty),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logprobs: s.logprobs,
            prompt_logprobs: s.prompt_logprobs,
            logit_bias: sorted_bias(s.logit_bias),
            guided: s.guided.and_then(constraint),
        },
        stopping: StoppingParams {
            max_tokens: t.max_tokens,
            min_tokens: t.min_tokens,
            ignore_eos: t.ignore_eos,
            stop_token_ids: t.stop_token_ids,
        },
    }
}

/// The proto's grammar as the engine's; an empty `GuidedDecoding` (or json_object false)
/// means none.
fn constraint(g: pb::GuidedDecoding) -> Option<Constraint> {
    use pb::guided_decoding::Constraint as C;
    Some(match g.constraint? {
        C::JsonSchema(s) => Constraint::JsonSchema(s),
        C::JsonObject(true) => Constraint::JsonObject,
        C::JsonObject(false) => return None,
        C::Regex(r) => Constraint::Regex(r),
        C::Choice(c) => Constraint::Choice(c.choices),
        C::LarkGrammar(l) => Constraint::Lark(l),
        C::StructuralTag(t) => Constraint::StructuralTag(t),
    })
}

/// The proto's map in id order, so that a request samples the same way on every worker.
fn sorted_bias(bias: std::collections::HashMap<u32, f32>) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = bias.into_iter().collect();
    v.sort_unstable_by_key(|e| e.0);
    v
}

fn logprob(l: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token_id,
        logprob: l.logprob,
        top: l
            .top
            .into_iter()
            .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// The call's gRPC deadline (`grpc-timeout`: at most 8 digits and a unit, H M S m u n), or
/// None when it has none or it cannot be read.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let unit = v.chars().last()?;
    let digits = v.get(..v.len() - unit.len_utf8())?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What ends a request whose gRPC deadline passes: its id and the engine that runs it.
struct Deadline {
    /// Fires at the deadline; one timer for the whole stream, not one per token.
    timer: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    request_id: String,
    engine: EngineHandle,
}

/// Turns engine events into proto responses; ends after Finished or Error, or with
/// DEADLINE_EXCEEDED (aborting the request) once `deadline` passes. Its log lines go to the
/// request's `span`.
fn responses(
    rx: UnboundedReceiver<TokenEvent>,
    span: tracing::Span,
    otlp: Option<GenerateSpan>,
    deadline: Option<Deadline>,
) -> impl Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static {
    struct St {
        rx: UnboundedReceiver<TokenEvent>,
        prompt_logprobs: Vec<pb::TokenLogprob>,
        done: bool,
        span: tracing::Span,
        otlp: Option<GenerateSpan>,
        deadline: Option<Deadline>,
    }
    let st = St {
        rx,
        prompt_logprobs: Vec::new(),
        done: false,
        span,
        otlp,
        deadline,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let St { rx, deadline, .. } = &mut st;
            let expired = async {
                match deadline {
                    Some(d) => d.timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = expired => {
                    st.done = true;
                    let message = match st.deadline.take() {
                        Some(d) => {
                            // The abort frees the KV blocks now, not when the caller leaves.
                            d.engine.abort(&d.request_id);
                            format!(
                                "the request ran past its deadline ({:.3} s, the caller's grpc-timeout); aborted",
                                d.limit.as_secs_f64()
                            )
                        }
                        None => "the request ran past its deadline; aborted".to_owned(),
                    };
                    if let Some(mut s) = st.otlp.take() {
                        s.failed(&message);
                    }
                    st.span.in_scope(|| tracing::info!("request ran past its deadline; aborted"));
                    return Some((Err(Status::deadline_exceeded(message)), st));
                }
            };
            let Some(ev) = ev else {
                st.done = true;
                if let Some(mut s) = st.otlp.take() {
                    s.failed("the engine dropped the request");
                }
                st.span
                    .in_scope(|| tracing::warn!("the engine dropped the request"));
                return Some((Err(Status::internal("the engine dropped the request")), st));
            };
            let resp = match ev {
                TokenEvent::PromptLogprobs(lps) => {
                    st.prompt_logprobs = lps.into_iter().map(logprob).collect();
                    continue;
                }
                TokenEvent::Tokens { ids, logprobs } => pb::GenerateResponse {
                    token_ids: ids,
                    logprobs: logprobs.into_iter().map(logprob).collect(),
                    prompt_logprobs: std::mem::take(&mut st.prompt_logprobs),
                    ..Default::default()
                },
                TokenEvent::Finished {
                    reason,
                    stop_token_id,
                    usage,
                    timings,
                    avg_decoded_tokens_per_iter,
                } => {
                    st.done = true;
                    if let Some(s) = st.otlp.as_mut() {
                        s.finished(reason, &usage, &timings);
                    }
                    st.otlp = None;
                    st.span.in_scope(|| {
                        tracing::debug!(
                            finish_reason = ?reason,
                            prompt_tokens = usage.prompt_tokens,
                            completion_tokens = usage.completion_tokens,
                            cached_tokens = usage.cached_tokens,
                            ttft_s = timings.ttft_s,
                            e2e_s = timings.e2e_s,
                            "finished"
                        )
                    });
                    let finish = match reason {
                        FinishReason::Stop => pb::FinishReason::Stop,
                        FinishReason::Length => pb::FinishReason::Length,
                        FinishReason::Abort => pb::FinishReason::Abort,
                    };
                    pb::GenerateResponse {
                        finish_reason: finish as i32,
                        stop_token_id,
                        prompt_logprobs: std::mem::take(&mut st.prompt_logprobs),
                        usage: Some(pb::Usage {
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                            cached_tokens: usage.cached_tokens,
                            avg_decoded_tokens_per_iter,
                        }),
                        timings: Some(pb::Timings {
                            queue_s: timings.queue_s,
                            ttft_s: timings.ttft_s,
                            e2e_s: timings.e2e_s,
                        }),
                        ..Default::default()
                    }
                }
                TokenEvent::Error(message) => {
                    st.done = true;
                    if let Some(s) = st.otlp.as_mut() {
                        s.failed(&message);
                    }
                    st.otlp = None;
                    st.span
                        .in_scope(|| tracing::warn!(error = %message, "request failed"));
                    return Some((Err(Status::internal(message)), st));
                }
                TokenEvent::Refused(message) => {
                    st.done = true;
                    if let Some(s) = st.otlp.as_mut() {
                        s.failed(&message);
                    }
                    st.otlp = None;
                    st.span
                        .in_scope(|| tracing::debug!(error = %message, "request refused"));
                    return Some((Err(Status::failed_precondition(message)), st));
                }
            };
            return Some((Ok(resp), st));
        }
    })
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = GenerateStream;
    type KvEventsStream = crate::kv_feed::KvEventStream;

    async fn kv_events(
        &self,
        request: Request<pb::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        let r = request.into_inner();
        Ok(Response::new(crate::kv_feed::kv_event_stream(
            self.engine.clone(),
            r.run_id,
            r.after,
            self.closing.clone(),
        )))
    }

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The caller's trace context: gRPC metadata, else the request's traceparent field.
        let parent = traces::extract_grpc(request.metadata(), &request.get_ref().traceparent);
        let timeout = grpc_timeout(request.metadata());
        let req = request.into_inner();
        if req.request_id.is_empty() {
            return Err(Status::invalid_argument("request_id is empty"));
        }
        let span = tracing::info_span!(
            "generate",
            otel.name = "llmapi.worker.v1.Worker/Generate",
            otel.kind = "server",
            request_id = %req.request_id,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let ids = traces::continue_span(&span, parent);
        span.record("trace_id", tracing::field::display(&ids.trace_id));
        span.record("span_id", tracing::field::display(&ids.span_id));
        span.record(
            "parent_span_id",
            tracing::field::display(&ids.parent_span_id),
        );
        let prompt_tokens = req.prompt_token_ids.len();
        let deadline = timeout.map(|limit| Deadline {
            timer: Box::pin(tokio::time::sleep(limit)),
            limit,
            request_id: req.request_id.clone(),
            engine: self.engine.clone(),
        });
        let otlp = GenerateSpan::open(&span, ids.sampled, &req.request_id, prompt_tokens);
        let params = params(req);
        // Compiling a grammar can take milliseconds: off the async threads.
        let submitted = if params.sampling.guided.is_some() {
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || engine.submit(params))
                .await
                .map_err(|e| Status::internal(format!("compiling the grammar failed: {e}")))?
        } else {
            self.engine.submit(params)
        };
        let rx = match submitted {
            Ok(rx) => rx,
            Err(e) => {
                if let Some(mut s) = otlp {
                    s.failed(&e.to_string());
                }
                span.in_scope(|| tracing::debug!(error = %e, "refused"));
                return Err(to_status(e));
            }
        };
        span.in_scope(|| tracing::debug!(prompt_tokens, "generate"));
        // The caller learns which span served it (W3C trace context level 2's traceresponse).
        let traceresponse = TraceHeaders::of_span(&span).traceparent.parse();
        let mut response =
            Response::new(Box::pin(responses(rx, span, otlp, deadline)) as Self::GenerateStream);
        if let Ok(v) = traceresponse {
            response.metadata_mut().insert("traceresponse", v);
        }
        Ok(response)
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let found = self.engine.abort(&request.into_inner().request_id);
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        if let Some(why) = self.engine.failure() {
            return Ok(Response::new(pb::HealthResponse {
                healthy: false,
                message: format!("the worker group failed: {why}"),
            }));
        }
        if let Some(why) = self.engine.stalled() {
            return Ok(Response::new(pb::HealthResponse {
                healthy: false,
                message: why,
            }));
        }
        if !request.into_inner().probe {
            return Ok(Response::new(pb::HealthResponse {
                healthy: true,
                message: String::new(),
            }));
        }
        let n = self.probes.fetch_add(1, Ordering::Relaxed);
        let probe = GenerateParams {
            request_id: format!("health-probe-{n}"),
            prompt: vec![1],
            generated: Vec::new(),
            group: String::new(),
            sampling: SamplingParams::default(),
            stopping: StoppingParams {
                max_tokens: 1,
                ignore_eos: true,
                ..StoppingParams::default()
            },
        };
        let outcome = match self.engine.submit_probe(probe) {
            Err(e) => Err(e.to_string()),
            Ok(rx) => match tokio::time::timeout(PROBE_TIMEOUT, finish_of(rx)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "one-token probe took longer than {}s",
                    PROBE_TIMEOUT.as_secs()
                )),
            },
        };
        let (healthy, message) = match outcome {
            Ok(()) => (true, String::new()),
            Err(m) => (false, m),
        };
        Ok(Response::new(pb::HealthResponse { healthy, message }))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let i = self.engine.info();
        Ok(Response::new(pb::InfoResponse {
            model: i.model,
            max_seq_len: i.max_seq_len,
            tokens_per_block: i.tokens_per_block,
            tp_size: self.tp_size,
            ep_size: self.ep_size,
            kv_capacity_blocks: i.kv_capacity_blocks,
            vocab_size: i.vocab_size,
            eos_token_ids: i.eos_token_ids,
            backend: i.backend,
            max_batch_size: i.max_batch_size,
            max_num_tokens: i.max_num_tokens,
            max_queued_requests: i.max_queued_requests,
            enable_block_reuse: i.enable_block_reuse,
            resumes_generation: true,
        }))
    }

    async fn load(
        &self,
        _: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        let l = self.engine.load();
        Ok(Response::new(pb::LoadResponse {
            running: l.running,
            queued: l.queued,
            kv_blocks_used: l.kv_blocks_used,
            kv_blocks_free: l.kv_blocks_free,
            preemptions: l.preemptions,
            prefix_cache_queries: l.prefix_cache_queries,
            prefix_cache_hits: l.prefix_cache_hits,
            iterations: l.iterations,
            iteration_tokens: l.iteration_tokens,
            step_seconds: Some(histogram(&l.steps.time_us, &STEP_TIME_BOUNDS_US, 1e-6)),
            step_batch_size: Some(histogram(&l.steps.batch_size, &STEP_BATCH_BOUNDS, 1.0)),
            step_tokens: Some(histogram(&l.steps.tokens, &STEP_TOKEN_BOUNDS, 1.0)),
            spec_draft_tokens: l.spec_draft_tokens,
            spec_accepted_tokens: l.spec_accepted_tokens,
        }))
    }
}

/// Waits for a request to finish; Err with the engine's message if it failed.
async fn finish_of(mut rx: UnboundedReceiver<TokenEvent>) -> Result<(), String> {
    while let Some(ev) = rx.recv().await {
        match ev {
            TokenEvent::Finished { .. } => return Ok(()),
            TokenEvent::Error(m) | TokenEvent::Refused(m) => return Err(m),
            _ => {}
        }
    }
    Err("the engine dropped the probe".into())
}

/// A step histogram on the wire, its bounds and sum multiplied by `scale` into the unit the
/// proto names (seconds for step time).
fn histogram(h: &StepHistogram, bounds: &[u64; STEP_BUCKETS - 1], scale: f64) -> pb::StepHistogram {
    pb::StepHistogram {
        upper_bounds: bounds.iter().map(|&b| b as f64 * scale).collect(),
        counts: h.counts.to_vec(),
        sum: h.sum as f64 * scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(v: &str) -> Option<Duration> {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", v.parse().ok()?);
        grpc_timeout(&md)
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_ignored() {
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("30S"), Some(Duration::from_secs(30)));
        assert_eq!(timeout_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout_of("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(timeout_of("123456789S"), None, "more than 8 digits");
        assert_eq!(timeout_of("S"), None);
        assert_eq!(timeout_of("10x"), None);
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
