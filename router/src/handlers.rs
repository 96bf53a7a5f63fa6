//! HTTP handlers: the OpenAI endpoints, health, models, version and metrics (the worker pool's
//! routes are `admin`'s; authentication is the server's layers', `auth`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use llmapi_common::block_hash::prefix_block_hashes;
use llmapi_common::guided::Constraint;
use llmapi_common::traces::TraceHeaders;
use llmapi_proto::v1::{GenerateRequest, HealthRequest, InfoResponse, StoppingParams};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::codec::TextCodec;
use crate::deadline::RequestDeadline;
use crate::error::ApiError;
use crate::generate::{ChoiceEvent, ChoiceJob, run_choice};
use crate::group::GroupPin;
use crate::guided::Guided;
use crate::logit_bias;
use crate::openai::{GenSettings, Prompt};
use crate::parse::{self, BodyCaps};
use crate::respond::{ResponseMeta, Shape, collect, stream};
use crate::spans::{self, RequestSpan};
use crate::state::{AdmitGuard, AppState, Fanout, UNAVAILABLE_RETRY_AFTER_S};
use crate::tools::{self, ToolMode};

type Shared = State<Arc<AppState>>;
/// The headers naming this hop's span to the worker, put in the request's extensions by the
/// server's trace layer.
pub(crate) type Trace = Option<Extension<Arc<TraceHeaders>>>;

pub(crate) fn trace_of(trace: Trace) -> Arc<TraceHeaders> {
    trace.map_or_else(|| Arc::new(TraceHeaders::default()), |Extension(t)| t)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:016x}{n:06x}")
}

/// The request body, or the OpenAI 413 / 400 error of a body too large or unreadable.
fn read_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.config.max_body_bytes)
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })
}

/// Parses a JSON body into `T`, mapping failures to OpenAI 400 / 413 errors.
pub(crate) fn parse<T: DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = read_body(state, body)?;
    serde_json::from_slice(&body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "request body is not valid JSON"
        } else {
            "request body has a wrong or missing field"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

fn model_info(state: &AppState) -> Result<InfoResponse, ApiError> {
    state.pool.model_info().ok_or_else(|| {
        ApiError::unavailable("no worker has reported its model yet; try again shortly")
    })
}

/// A prompt ready to send: its ids and, for echo, its text.
struct PreparedPrompt {
    ids: Vec<u32>,
    text: Option<String>,
}

/// The room a prompt leaves for output: trtllm-serve's engine runs with `max_seq_len + 1`
/// slots (the last sampled token never enters the KV cache), so a prompt of exactly
/// `max_seq_len` tokens still gets one token; a longer one gets none.
fn output_room(max_seq_len: usize, prompt_len: usize) -> usize {
    (max_seq_len + 1).saturating_sub(prompt_len)
}

/// Checks a prompt and settles its max_tokens as trtllm-serve does: a max_tokens (asked for,
/// or the endpoint's default) larger than the room the prompt leaves is lowered to that room
/// with a warning; no max_tokens means the whole room. Only a prompt that leaves no room,
/// or an explicit max_tokens of 0, is refused.
fn check_prompt(
    info: &InfoResponse,
    ids: &[u32],
    max_tokens: Option<u32>,
    default_max_tokens: Option<u32>,
) -> Result<u32, ApiError> {
    let max_seq_len = info.max_seq_len as usize;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "prompt is empty; send at least one token",
        ));
    }
    if let Some(bad) = ids
        .iter()
        .find(|&&t| info.vocab_size > 0 && t >= info.vocab_size)
    {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                info.vocab_size
            ),
        ));
    }
    let room = output_room(max_seq_len, ids.len());
    if room == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt has {} tokens but max_seq_len is {max_seq_len}, which leaves no room for output; \
                 shorten it to at most {max_seq_len} tokens or raise --max_seq_len",
                ids.len()
            ),
        ));
    }
    let room = u32::try_from(room).unwrap_or(u32::MAX);
    match max_tokens.or(default_max_tokens) {
        Some(0) => Err(ApiError::invalid(
            "max_tokens",
            "max_tokens is 0; ask for at least 1",
        )),
        Some(m) if m > room => {
            tracing::warn!(
                max_tokens = m,
                default_max_tokens = room,
                prompt_tokens = ids.len(),
                max_seq_len,
                "User-specified max_tokens ({m}) is greater than deduced default_max_tokens ({room}), \
                 using default_max_tokens instead"
            );
            Ok(room)
        }
        Some(m) => Ok(m),
        None => Ok(room),
    }
}

/// Spawns one task per choice; their events arrive on the returned receiver.
#[allow(clippy::too_many_arguments)]
fn spawn_choices(
    state: &Arc<AppState>,
    shape: Shape,
    model: String,
    prompts: Vec<PreparedPrompt>,
    max_tokens: Vec<u32>,
    settings: GenSettings,
    logprobs: bool,
    tokens_per_block: usize,
    trace: Arc<TraceHeaders>,
    deadline: RequestDeadline,
    tools: Option<ToolMode>,
) -> (ResponseMeta, mpsc::Receiver<ChoiceEvent>) {
    let id = new_id(match shape {
        Shape::Completion => "cmpl",
        Shape::Chat => "chatcmpl",
    });
    let n = settings.n;
    let choices = n * prompts.len() as u32;
    let (tx, rx) = mpsc::channel(64);
    for (p, (prompt, max)) in prompts.iter().zip(&max_tokens).enumerate() {
        state.metrics.add_prompt_tokens(prompt.ids.len());
        let hashes = Arc::new(prefix_block_hashes(&prompt.ids, tokens_per_block));
        // The prompt's choices run as one sequence group on one worker, which computes the
        // prompt once for all of them.
        let group = (n > 1).then(|| Arc::new(GroupPin::default()));
        let group_id = if n > 1 {
            format!("{id}-p{p}")
        } else {
            String::new()
        };
        for k in 0..n {
            let index = p as u32 * n + k;
            let mut sampling = settings.sampling.clone();
            // Distinct seeds per choice keep n > 1 seeded choices from being identical.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(u64::from(k)));
            let stopping = StoppingParams {
                max_tokens: *max,
                ..settings.stopping.clone()
            };
            let job = ChoiceJob {
                index,
                request: GenerateRequest {
                    request_id: format!("{id}-{index}"),
                    prompt_token_ids: prompt.ids.clone(),
                    sampling: Some(sampling),
                    stopping: Some(stopping),
                    traceparent: trace.traceparent.clone(),
                    generated_token_ids: Vec::new(),
                    group_id: group_id.clone(),
                },
                block_hashes: hashes.clone(),
                stop: settings.stop.clone(),
                trace: trace.clone(),
                deadline,
                group: group.clone(),
            };
            let span = tracing::info_span!("choice", request_id = %job.request.request_id, prompt_tokens = prompt.ids.len());
            tokio::spawn(run_choice(state.clone(), job, tx.clone()).instrument(span));
        }
    }
    let meta = ResponseMeta {
        id,
        created: now_secs(),
        model,
        shape,
        choices,
        n,
        keep: settings.keep,
        prompt_lens: prompts.iter().map(|p| p.ids.len()).collect(),
        echo_ids: if settings.sampling.prompt_logprobs {
            prompts.iter().map(|p| p.ids.clone()).collect()
        } else {
            Vec::new()
        },
        echo: prompts.into_iter().map(|p| p.text).collect(),
        logprobs,
        include_usage: settings.include_usage,
        reasoning: match shape {
            Shape::Chat => state.config.reasoning_parser,
            Shape::Completion => None,
        },
        tools,
        codec: state.codec.clone(),
    };
    (meta, rx)
}

/// POST /v1/completions.
pub async fn completions(
    State(state): Shared,
    trace: Trace,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(state, trace_of(trace), body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// 400 when the request's structured-output constraint does not compile (`guided`).
async fn check_guided(state: &Arc<AppState>, guided: Option<&Guided>) -> Result<(), ApiError> {
    let Some(guided) = guided.cloned() else {
        return Ok(());
    };
    let st = Arc::clone(state);
    state
        .blocking(move || st.guided.check(st.codec.as_ref(), &guided))
        .await
}

async fn completions_inner(
    state: Arc<AppState>,
    trace: Arc<TraceHeaders>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caps = state.body_caps();
    let req = parse::completion_request(&read_body(&state, body)?, caps)?;
    state.check_model(&req.common.model)?;
    let mut settings = req
        .common
        .settings(req.logprobs, &state.config.sampling_defaults)?;
    req.apply_best_of(&mut settings)?;
    let info = model_info(&state)?;
    logit_bias::check_vocab(&settings.sampling.logit_bias, info.vocab_size)?;
    check_guided(&state, req.common.guided.as_ref()).await?;
    let echo = req.echo.unwrap_or(false);
    // Echo with logprobs reports the prompt's tokens too, as OpenAI's legacy completions do.
    settings.sampling.prompt_logprobs = echo && req.logprobs.is_some();
    let prompt = req
        .prompt
        .ok_or_else(|| ApiError::invalid("prompt", "prompt is required"))?;
    let (prompts, id_tokens) = match &prompt {
        Prompt::Text(_) => (1, 0),
        Prompt::Texts(ts) => (ts.len(), 0),
        Prompt::Ids(ids) => (1, ids.len()),
        Prompt::IdLists(lists) => (lists.len(), lists.iter().map(Vec::len).sum()),
    };
    if prompts == 0 {
        return Err(ApiError::invalid(
            "prompt",
            "prompt is an empty list; send at least one prompt",
        ));
    }
    parse::check_prompt_tokens(&caps, "prompt", id_tokens, settings.n)?;
    let fanout = Fanout {
        prompts,
        n: settings.n,
    };
    let codec = state.codec.clone();
    // The legacy endpoint's default of 16 tokens, lowered (never raised) by the model's
    // max_new_tokens, as vLLM takes the smaller of the two.
    let max_tokens = req
        .max_tokens
        .or(settings.default_max_tokens.map(|m| m.min(16)));
    let n = settings.n;
    // Token ids without echo need no tokenizer: only a scan of ids already held to the caps.
    let tokenizes = echo || matches!(prompt, Prompt::Text(_) | Prompt::Texts(_));
    let prepare =
        move || prepare_completion(codec.as_ref(), &info, prompt, echo, max_tokens, &caps, n);
    // Token ids are checked before the request waits for admission; text once admitted.
    let ready = if tokenizes {
        Err(prepare)
    } else {
        Ok(prepare()?)
    };
    let admit = state.admit(fanout).await?;
    let (prompts, max_tokens) = match ready {
        Ok(prepared) => prepared,
        Err(prepare) => state.blocking(prepare).await?,
    };
    finish(
        state,
        admit,
        Shape::Completion,
        req.common.model,
        prompts,
        max_tokens,
        settings,
        req.logprobs.is_some(),
        trace,
        None,
    )
    .await
}

/// Tokenizes a completions request's prompts and checks them (on the blocking pool: text
/// may be megabytes): their ids, the echoed text when asked for, and each one's max_tokens.
fn prepare_completion(
    codec: &dyn TextCodec,
    info: &InfoResponse,
    prompt: Prompt,
    echo: bool,
    max_tokens: Option<u32>,
    caps: &BodyCaps,
    n: u32,
) -> Result<(Vec<PreparedPrompt>, Vec<u32>), ApiError> {
    let encode = |t: &str| {
        if t.is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                "prompt is empty; send some text",
            ));
        }
        codec
            .encode(t, true)
            .map_err(|e| ApiError::invalid("prompt", format!("prompt could not be tokenized: {e}")))
    };
    let texts = |ts: Vec<String>| -> Result<Vec<PreparedPrompt>, ApiError> {
        ts.into_iter()
            .map(|t| {
                Ok(PreparedPrompt {
                    ids: encode(&t)?,
                    text: Some(t),
                })
            })
            .collect()
    };
    let (prompts, tokenized) = match prompt {
        Prompt::Text(t) => (texts(vec![t])?, true),
        Prompt::Texts(ts) => (texts(ts)?, true),
        Prompt::Ids(ids) => (vec![PreparedPrompt { ids, text: None }], false),
        Prompt::IdLists(lists) => (
            lists
                .into_iter()
                .map(|ids| PreparedPrompt { ids, text: None })
                .collect(),
            false,
        ),
    };
    if tokenized {
        let tokens = prompts.iter().map(|p| p.ids.len()).sum();
        parse::check_prompt_tokens(caps, "prompt", tokens, n)?;
    }
    let max_tokens = prompts
        .iter()
        .map(|p| check_prompt(info, &p.ids, max_tokens, Some(16)))
        .collect::<Result<Vec<_>, _>>()?;
    let prompts = prompts
        .into_iter()
        .map(|p| PreparedPrompt {
            text: if echo {
                Some(p.text.unwrap_or_else(|| codec.decode(&p.ids)))
            } else {
                None
            },
            ids: p.ids,
        })
        .collect();
    Ok((prompts, max_tokens))
}

/// POST /v1/chat/completions.
pub async fn chat_completions(
    State(state): Shared,
    trace: Trace,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(state, trace_of(trace), body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    trace: Arc<TraceHeaders>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caps = state.body_caps();
    let req = parse::chat_request(&read_body(&state, body)?, caps)?;
    state.check_model(&req.common.model)?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    let mut settings = req.common.settings(
        want_logprobs.then(|| req.top_logprobs.unwrap_or(0)),
        &state.config.sampling_defaults,
    )?;
    let tool_plan = tools::request::plan(&req.tools, state.config.tool_parser)?;
    let tool_guided = tool_plan.schema.as_ref().map(|schema| Guided {
        param: "tools",
        constraint: Constraint::JsonSchema(schema.clone()),
    });
    if let (Some(_), Some(asked)) = (&tool_guided, &req.common.guided) {
        return Err(ApiError::invalid(
            asked.param,
            format!(
                "{} cannot be combined with tool_choice \"required\" or a named function, \
                 whose output is the call's JSON; drop one of them",
                asked.param
            ),
        ));
    }
    tool_plan.apply(&mut settings.sampling);
    let info = model_info(&state)?;
    logit_bias::check_vocab(&settings.sampling.logit_bias, info.vocab_size)?;
    check_guided(&state, tool_guided.as_ref().or(req.common.guided.as_ref())).await?;
    let messages = req.messages.unwrap_or_default();
    let ids = match req.prompt_token_ids {
        Some(ids) => {
            if !messages.is_empty() {
                return Err(ApiError::invalid(
                    "prompt_token_ids",
                    "both messages and prompt_token_ids are given; send the conversation as messages, or the whole templated prompt as prompt_token_ids with messages empty",
                ));
            }
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "prompt_token_ids",
                    "prompt_token_ids is empty; send at least one token, or send messages instead",
                ));
            }
            parse::check_prompt_tokens(&caps, "prompt_token_ids", ids.len(), settings.n)?;
            Some(ids)
        }
        None if messages.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "messages is empty; send at least one message",
            ));
        }
        None => None,
    };
    let admit = state
        .admit(Fanout {
            prompts: 1,
            n: settings.n,
        })
        .await?;
    let ids = match ids {
        Some(ids) => ids,
        None => {
            let codec = state.codec.clone();
            let n = settings.n;
            let tools = tool_plan.template_tools.clone();
            state
                .blocking(move || {
                    let ids = chat_prompt_ids(codec.as_ref(), &messages, tools.as_deref())?;
                    parse::check_prompt_tokens(&caps, "messages", ids.len(), n)?;
                    Ok(ids)
                })
                .await?
        }
    };
    let max = check_prompt(
        &info,
        &ids,
        req.max_completion_tokens.or(req.max_tokens),
        settings.default_max_tokens,
    )?;
    let prompts = vec![PreparedPrompt { ids, text: None }];
    finish(
        state,
        admit,
        Shape::Chat,
        req.common.model,
        prompts,
        vec![max],
        settings,
        want_logprobs,
        trace,
        tool_plan.mode,
    )
    .await
}

/// An admitted chat generation of one choice, for endpoints built on the chat path
/// (`responses`): its events, its prompt's length, and the admission held while it runs.
pub(crate) struct ChatRun {
    /// The choice's events (index 0).
    pub events: mpsc::Receiver<ChoiceEvent>,
    /// Tokens of the templated prompt.
    pub prompt_tokens: usize,
    /// Held until the answer is sent; says when the drain timeout cuts it off.
    pub admit: AdmitGuard,
}

/// Starts one chat choice over `messages` with `common`'s sampling, as /v1/chat/completions
/// does (same template, checks, admission, metrics), without tools or logprobs.
pub(crate) async fn start_chat(
    state: &Arc<AppState>,
    trace: Arc<TraceHeaders>,
    common: crate::openai::CommonFields,
    messages: Vec<crate::openai::ChatMessage>,
    max_tokens: Option<u32>,
) -> Result<ChatRun, ApiError> {
    let caps = state.body_caps();
    let settings = common.settings(None, &state.config.sampling_defaults)?;
    logit_bias::check_vocab(&settings.sampling.logit_bias, model_info(state)?.vocab_size)?;
    let admit = state.admit(Fanout { prompts: 1, n: 1 }).await?;
    let codec = state.codec.clone();
    let ids = state
        .blocking(move || {
            let ids = chat_prompt_ids(codec.as_ref(), &messages, None)?;
            parse::check_prompt_tokens(&caps, "input", ids.len(), 1)?;
            Ok(ids)
        })
        .await?;
    let info = model_info(state)?;
    let max = check_prompt(&info, &ids, max_tokens, settings.default_max_tokens)?;
    let prompt_tokens = ids.len();
    let (_, rx) = spawn_choices(
        state,
        Shape::Chat,
        common.model,
        vec![PreparedPrompt { ids, text: None }],
        vec![max],
        settings,
        false,
        info.tokens_per_block as usize,
        trace,
        state.config.deadlines.start(),
        None,
    );
    let events = state.metrics.observe(admit.arrived(), prompt_tokens, 1, rx);
    Ok(ChatRun {
        events,
        prompt_tokens,
        admit,
    })
}

/// The token ids of `messages` rendered with the chat template, which gets `tools`.
fn chat_prompt_ids(
    codec: &dyn TextCodec,
    messages: &[crate::openai::ChatMessage],
    tools: Option<&[serde_json::Value]>,
) -> Result<Vec<u32>, ApiError> {
    let turns = tools::request::chat_turns(messages)?;
    let text = codec
        .render_chat(&turns, tools)
        .map_err(|e| ApiError::invalid("messages", e))?;
    codec
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", format!("messages could not be tokenized: {e}")))
}

/// Runs an admitted request's choices and answers as a stream or one body.
#[allow(clippy::too_many_arguments)]
async fn finish(
    state: Arc<AppState>,
    admit: AdmitGuard,
    shape: Shape,
    model: String,
    prompts: Vec<PreparedPrompt>,
    max_tokens: Vec<u32>,
    settings: GenSettings,
    logprobs: bool,
    trace: Arc<TraceHeaders>,
    tools: Option<ToolMode>,
) -> Result<Response, ApiError> {
    let deadline = state.config.deadlines.start();
    let tokens_per_block = model_info(&state)?.tokens_per_block as usize;
    let streaming = settings.stream;
    let otlp = RequestSpan::current();
    if let Some(s) = &otlp {
        let operation = match shape {
            Shape::Completion => "text_completion",
            Shape::Chat => "chat",
        };
        let prompt_tokens = prompts.iter().map(|p| p.ids.len()).sum();
        s.request(operation, &model, &max_tokens, &settings, prompt_tokens);
    }
    let (meta, rx) = spawn_choices(
        &state,
        shape,
        model,
        prompts,
        max_tokens,
        settings,
        logprobs,
        tokens_per_block,
        trace,
        deadline,
        tools,
    );
    if let Some(s) = &otlp {
        s.response_id(&meta.id);
    }
    let rx = spans::observe(otlp, rx);
    let prompt_tokens = meta.prompt_lens.iter().sum();
    let rx = state
        .metrics
        .observe(admit.arrived(), prompt_tokens, meta.choices as usize, rx);
    if streaming {
        Ok(stream(meta, rx, admit, state.config.sse_keepalive).await)
    } else {
        let response = collect(meta, rx, &admit).await;
        drop(admit);
        Ok(response)
    }
}

/// GET /v1/models.
pub async fn models(State(state): Shared) -> Response {
    let max_model_len = state.pool.model_info().map(|i| i.max_seq_len);
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.served_model_name,
            "object": "model",
            "created": now_secs(),
            "owned_by": "llmapi",
            "root": state.config.model_path,
            "max_model_len": max_model_len,
        }],
    }))
    .into_response()
}

/// GET /health: 200 when at least one worker is routable and the router is not draining
/// (a load balancer then stops sending it new requests).
pub async fn health(State(state): Shared) -> Response {
    if state.is_draining() {
        ApiError::unavailable("draining: the router is shutting down")
            .with_retry_after(UNAVAILABLE_RETRY_AFTER_S)
            .into_response()
    } else if state.pool.routable().is_empty() {
        ApiError::unavailable("no healthy worker").into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

/// GET /health_generate: a real one-token generation on a routable worker.
pub async fn health_generate(State(state): Shared) -> Response {
    let Some((worker, _)) = state.router.pick(&state.pool.routable(), &[]) else {
        return ApiError::unavailable("no healthy worker").into_response();
    };
    match worker.client().health(HealthRequest { probe: true }).await {
        Ok(r) if r.get_ref().healthy => StatusCode::OK.into_response(),
        Ok(r) => ApiError::unavailable(format!(
            "worker {} failed its generation probe: {}",
            worker.url,
            r.get_ref().message
        ))
        .into_response(),
        Err(e) => ApiError::unavailable(format!(
            "worker {} failed its generation probe: {}",
            worker.url,
            e.message()
        ))
        .into_response(),
    }
}

/// GET /version.
pub async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// GET /metrics: the OpenMetrics text exposition (`metrics`).
pub async fn metrics(State(state): Shared) -> Response {
    (
        [("content-type", crate::metrics::CONTENT_TYPE)],
        state.metrics.render(&state.pool, state.admission()),
    )
        .into_response()
}

/// Any other route: 404 in OpenAI's shape.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!(
        "no route {}; see /v1/models, /v1/completions, /v1/chat/completions, /v1/responses",
        uri.path()
    ))
    .into_response()
}
