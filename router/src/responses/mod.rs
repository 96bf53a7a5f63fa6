//! `/v1/responses`: OpenAI's Responses API on top of the chat path (same template, sampling
//! and workers), as vLLM and trtllm-serve serve it: create (one body or typed SSE events),
//! `previous_response_id` continuing a stored conversation, and GET / DELETE of stored
//! responses. Not for: hosted tools, background runs or image inputs (refused by name).
//!
//! The store is the router's memory (`store`): a follow-up must reach the router that
//! answered the first request.

pub mod output;
pub mod request;
pub mod store;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::generate::ChoiceEvent;
use crate::handlers::{self, ChatRun, Trace};
use crate::openai::CommonFields;
use crate::state::AppState;
use output::{Head, Writer};
use request::{ResponsesRequest, Turn};
use store::{StoreLimits, Stored};

/// The flags of the response store.
#[derive(Debug, Clone, clap::Args)]
pub struct ResponsesArgs {
    /// Most responses `/v1/responses` keeps in this router's memory for
    /// `previous_response_id` and GET (least recently used leave first; 0 stores none).
    #[arg(long = "responses_store_max", default_value_t = store::DEFAULT_MAX_RESPONSES, value_name = "N")]
    pub responses_store_max: usize,
    /// Most bytes (conversation text and response JSON) the response store keeps.
    #[arg(long = "responses_store_max_bytes", default_value_t = store::DEFAULT_MAX_BYTES, value_name = "BYTES")]
    pub responses_store_max_bytes: usize,
}

impl ResponsesArgs {
    /// The store's limits.
    pub fn limits(&self) -> StoreLimits {
        StoreLimits {
            max_responses: self.responses_store_max,
            max_bytes: self.responses_store_max_bytes,
        }
    }
}

/// 404 for a response id not in the store, naming it.
fn unknown(id: &str, param: &str) -> ApiError {
    ApiError {
        param: Some(param.to_owned()),
        ..ApiError::not_found(format!(
            "Response with id '{id}' not found: it was never stored here, was deleted, or was \
             evicted (the store is per router and bounded by --responses_store_max)"
        ))
    }
}

/// POST /v1/responses.
pub async fn create(
    State(state): State<Arc<AppState>>,
    trace: Trace,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match create_inner(state, trace, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_inner(
    state: Arc<AppState>,
    trace: Trace,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: Map<String, Value> = handlers::parse(&state, body)?;
    let req = request::read(body)?;
    state.check_model(&req.model)?;
    if req.max_output_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_output_tokens",
            "max_output_tokens is 0; ask for at least 1",
        ));
    }
    let mut turns = match &req.previous_response_id {
        Some(id) => {
            state
                .responses
                .get(id)
                .ok_or_else(|| unknown(id, "previous_response_id"))?
                .turns
        }
        None => Vec::new(),
    };
    turns.extend(request::input_turns(&req.input)?);
    let instructions = req.instructions.as_ref().map(|text| Turn {
        role: "system".into(),
        text: text.clone(),
    });
    let messages = instructions
        .iter()
        .chain(&turns)
        .map(Turn::message)
        .collect();
    let common = CommonFields {
        model: req.model.clone(),
        temperature: req.temperature,
        top_p: req.top_p,
        user: req.user.clone(),
        ..CommonFields::default()
    };
    let run = handlers::start_chat(
        &state,
        handlers::trace_of(trace),
        common,
        messages,
        req.max_output_tokens,
    )
    .await?;
    let head = head(&state, &req);
    let finished = Finished {
        state: state.clone(),
        store: req.store.unwrap_or(true),
        turns,
    };
    let writer = Writer::new(
        head,
        state.config.reasoning_parser,
        run.prompt_tokens,
        req.stream.unwrap_or(false),
    );
    if req.stream.unwrap_or(false) {
        Ok(stream(writer, run, finished).await)
    } else {
        Ok(collect(writer, run, finished).await)
    }
}

/// The response object's echo of `req`.
fn head(state: &AppState, req: &ResponsesRequest) -> Head {
    let defaults = &state.config.sampling_defaults;
    let echo = json!({
        "model": req.model,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature.or(defaults.temperature).unwrap_or(1.0),
        "top_p": req.top_p.or(defaults.top_p).unwrap_or(1.0),
        "previous_response_id": req.previous_response_id,
        "metadata": req.metadata.clone().unwrap_or_default(),
        "user": req.user,
        "store": req.store.unwrap_or(true),
    });
    Head {
        id: output::new_id("resp"),
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        echo: match echo {
            Value::Object(m) => m,
            _ => Map::new(),
        },
    }
}

/// What to do with a response once it is complete: store it with its conversation.
struct Finished {
    state: Arc<AppState>,
    store: bool,
    /// The conversation before the answer (instructions excluded).
    turns: Vec<Turn>,
}

impl Finished {
    fn keep(mut self, response: &Value, answer: String) {
        if !self.store {
            return;
        }
        let Some(id) = response["id"].as_str() else {
            return;
        };
        self.turns.push(Turn {
            role: "assistant".into(),
            text: answer,
        });
        let stored = Stored {
            response: response.clone(),
            turns: self.turns,
        };
        if !self.state.responses.insert(id.to_owned(), stored) {
            tracing::warn!(
                response_id = id,
                "response is larger than --responses_store_max_bytes; not stored"
            );
        }
    }
}

/// The next event of the choice, or the drain timeout's error.
async fn next(run: &mut ChatRun) -> Option<ChoiceEvent> {
    tokio::select! {
        ev = run.events.recv() => ev,
        error = run.admit.cut_off() => Some(ChoiceEvent::Failed { index: 0, error }),
    }
}

async fn collect(mut writer: Writer, mut run: ChatRun, finished: Finished) -> Response {
    loop {
        match next(&mut run).await {
            None => {
                return ApiError::internal("the choice ended without finishing").into_response();
            }
            Some(ChoiceEvent::Failed { error, .. }) => return error.into_response(),
            Some(ev) => {
                if !writer.on_event(ev) {
                    break;
                }
            }
        }
    }
    let (response, answer) = writer.finish();
    finished.keep(&response, answer);
    axum::Json(response).into_response()
}

/// Streams the response's events. As for chat, the status line waits for the first choice
/// event, so that a request failing before any output gets its own status (429, 503, 504).
async fn stream(mut writer: Writer, mut run: ChatRun, finished: Finished) -> Response {
    let first = match next(&mut run).await {
        None => return ApiError::internal("the choice ended without finishing").into_response(),
        Some(ChoiceEvent::Failed { error, .. }) => return error.into_response(),
        Some(ev) => ev,
    };
    writer.start();
    let keepalive = finished.state.config.sse_keepalive;
    let state = StreamState {
        writer,
        run,
        finished: Some(finished),
        first: Some(first),
        queue: std::collections::VecDeque::new(),
        ended: false,
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(v) = st.queue.pop_front() {
                let kind = v["type"].as_str().unwrap_or("message").to_owned();
                let event = Event::default().event(kind).data(v.to_string());
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.ended {
                return None;
            }
            let ev = match st.first.take() {
                Some(ev) => Some(ev),
                None => next(&mut st.run).await,
            };
            st.step(ev);
        }
    });
    crate::respond::sse_response(events, keepalive)
}

struct StreamState {
    writer: Writer,
    run: ChatRun,
    finished: Option<Finished>,
    first: Option<ChoiceEvent>,
    queue: std::collections::VecDeque<Value>,
    ended: bool,
}

impl StreamState {
    /// Takes one choice event (None: the choice's senders are gone) and queues its SSE events.
    fn step(&mut self, ev: Option<ChoiceEvent>) {
        match ev {
            None => {
                self.writer
                    .error(&ApiError::internal("the choice ended without finishing"));
                self.ended = true;
            }
            Some(ChoiceEvent::Failed { error, .. }) => {
                self.writer.error(&error);
                self.ended = true;
            }
            Some(ev) => {
                if !self.writer.on_event(ev) {
                    let (response, answer) = self.writer.finish();
                    if let Some(f) = self.finished.take() {
                        f.keep(&response, answer);
                    }
                    self.ended = true;
                }
            }
        }
        self.queue.extend(self.writer.take_events());
    }
}

/// GET /v1/responses/{id}: a stored response.
pub async fn get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.responses.get(&id) {
        Some(stored) => axum::Json(stored.response).into_response(),
        None => unknown(&id, "response_id").into_response(),
    }
}

/// DELETE /v1/responses/{id}: forgets a stored response.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if state.responses.remove(&id) {
        (
            StatusCode::OK,
            axum::Json(json!({"id": id, "object": "response", "deleted": true})),
        )
            .into_response()
    } else {
        unknown(&id, "response_id").into_response()
    }
}
