//! Turning choice events into OpenAI responses: one JSON body, or SSE chunks ending with
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use llmapi_proto::v1::TokenLogprob;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::codec::TextCodec;
use crate::error::ApiError;
use crate::generate::ChoiceEvent;
use crate::state::AdmitGuard;

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// /v1/completions: `text_completion`.
    Completion,
    /// /v1/chat/completions: `chat.completion` / `chat.completion.chunk`.
    Chat,
}

/// Facts about the whole response.
pub struct ResponseMeta {
    /// Response id (`cmpl-...` / `chatcmpl-...`).
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name echoed back.
    pub model: String,
    /// Endpoint shape.
    pub shape: Shape,
    /// Number of choices.
    pub choices: u32,
    /// Choices per prompt.
    pub n: u32,
    /// Prompt length per prompt.
    pub prompt_lens: Vec<usize>,
    /// Echoed prompt text per prompt (completions with echo).
    pub echo: Vec<Option<String>>,
    /// Whether logprobs were asked for.
    pub logprobs: bool,
    /// Final usage chunk in streams.
    pub include_usage: bool,
    /// Tokenizer, for logprob token strings.
    pub codec: Arc<dyn TextCodec>,
}

#[derive(Default, Clone)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: u32,
    cached_tokens: u32,
}

impl ResponseMeta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Completion, _) => "text_completion",
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
        }
    }

    fn usage(&self, accs: &[ChoiceAcc]) -> Value {
        let prompt: usize = self.prompt_lens.iter().sum();
        let completion: u64 = accs.iter().map(|a| u64::from(a.completion_tokens)).sum();
        // Cached tokens are counted once per prompt, like prompt tokens.
        let cached: u64 = accs
            .iter()
            .step_by(self.n.max(1) as usize)
            .map(|a| u64::from(a.cached_tokens))
            .sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt as u64 + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    fn token_str(&self, id: u32) -> String {
        self.codec.decode(&[id])
    }

    fn logprobs_json(&self, lps: &[TokenLogprob], text_offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.shape {
            Shape::Completion => {
                let mut offset = text_offset;
                let mut tokens = Vec::new();
                let mut offsets = Vec::new();
                for lp in lps {
                    let t = self.token_str(lp.token_id);
                    offsets.push(offset);
                    offset += t.len();
                    tokens.push(t);
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|l| {
                        l.top.iter().map(|t| (self.token_str(t.token_id), json!(t.logprob)))
                            .collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Shape::Chat => {
                let entry = |id: u32, logprob: f32| {
                    let t = self.token_str(id);
                    json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let mut e = entry(l.token_id, l.logprob);
                        e["top_logprobs"] = Value::Array(
                            l.top.iter().map(|t| entry(t.token_id, t.logprob)).collect(),
                        );
                        e
                    })
                    .collect();
                json!({"content": content})
            }
        }
    }

    fn chunk(
        &self,
        index: u32,
        text: &str,
        lps: &[TokenLogprob],
        offset: usize,
        finish: Option<&str>,
        first: bool,
    ) -> Value {
        let choice = match self.shape {
            Shape::Completion => json!({
                "index": index,
                "text": text,
                "logprobs": self.logprobs_json(lps, offset),
                "finish_reason": finish,
            }),
            Shape::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if finish.is_none() || !text.is_empty() {
                    delta.insert("content".into(), json!(text));
                }
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": self.logprobs_json(lps, offset),
                    "finish_reason": finish,
                })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

/// Collects every choice into one response body; the first failure fails the request.
pub async fn collect(meta: ResponseMeta, mut rx: mpsc::Receiver<ChoiceEvent>) -> Response {
    let mut accs = vec![ChoiceAcc::default(); meta.choices as usize];
    let mut done = 0;
    while done < accs.len() {
        let Some(ev) = rx.recv().await else {
            return ApiError::internal("a choice ended without finishing").into_response();
        };
        match ev {
            ChoiceEvent::Delta {
                index,
                text,
                logprobs,
            } => {
                if let Some(a) = accs.get_mut(index as usize) {
                    a.text.push_str(&text);
                    a.logprobs.extend(logprobs);
                }
            }
            ChoiceEvent::Finish {
                index,
                reason,
                usage,
            } => {
                if let Some(a) = accs.get_mut(index as usize) {
                    a.finish = Some(reason);
                    a.completion_tokens = usage.completion_tokens;
                    a.cached_tokens = usage.cached_tokens;
                }
                done += 1;
            }
            ChoiceEvent::Failed { error, .. } => return error.into_response(),
        }
    }
    let choices: Vec<Value> = accs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let echo = meta
                .echo
                .get(i / meta.n.max(1) as usize)
                .cloned()
                .flatten()
                .unwrap_or_default();
            match meta.shape {
                Shape::Completion => json!({
                    "index": i,
                    "text": format!("{echo}{}", a.text),
                    "logprobs": meta.logprobs_json(&a.logprobs, echo.len()),
                    "finish_reason": a.finish,
                }),
                Shape::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": a.text},
                    "logprobs": meta.logprobs_json(&a.logprobs, 0),
                    "finish_reason": a.finish,
                }),
            }
        })
        .collect();
    let body = json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": meta.usage(&accs),
    });
    axum::Json(body).into_response()
}

fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Streams choices as SSE. Dropping the response (client gone) drops `rx`, which aborts every
/// choice on its worker.
pub fn stream(meta: ResponseMeta, rx: mpsc::Receiver<ChoiceEvent>, admit: AdmitGuard) -> Response {
    let events = sse_events(meta, rx, admit);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

struct StreamState {
    meta: ResponseMeta,
    rx: mpsc::Receiver<ChoiceEvent>,
    accs: Vec<ChoiceAcc>,
    started: Vec<bool>,
    pending: std::collections::VecDeque<Value>,
    done: usize,
    finished: bool,
    _admit: AdmitGuard,
}

fn sse_events(
    meta: ResponseMeta,
    rx: mpsc::Receiver<ChoiceEvent>,
    admit: AdmitGuard,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let n = meta.choices as usize;
    let mut pending = std::collections::VecDeque::new();
    // Echoed prompts come first (completions).
    for i in 0..n {
        if let Some(Some(echo)) = meta.echo.get(i / meta.n.max(1) as usize) {
            pending.push_back(meta.chunk(i as u32, echo, &[], 0, None, false));
        }
    }
    let state = StreamState {
        accs: vec![ChoiceAcc::default(); n],
        started: vec![false; n],
        meta,
        rx,
        pending,
        done: 0,
        finished: false,
        _admit: admit,
    };
    // A `Null` queued in `pending` stands for the closing `[DONE]`.
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(v) = st.pending.pop_front() {
                if v.is_null() {
                    return Some((Ok(Event::default().data("[DONE]")), st));
                }
                return Some((event(&v), st));
            }
            if st.finished {
                return None;
            }
            if st.done == st.accs.len() {
                if st.meta.include_usage {
                    let usage = st.meta.usage(&st.accs);
                    st.pending.push_back(json!({
                        "id": st.meta.id, "object": st.meta.object(true), "created": st.meta.created,
                        "model": st.meta.model, "choices": [], "usage": usage,
                    }));
                }
                st.pending.push_back(Value::Null);
                st.finished = true;
                continue;
            }
            match st.rx.recv().await {
                None => {
                    st.pending.push_back(Value::Null);
                    st.finished = true;
                }
                Some(ChoiceEvent::Delta {
                    index,
                    text,
                    logprobs,
                }) => {
                    let i = index as usize;
                    let first = !std::mem::replace(&mut st.started[i], true);
                    let offset = st.accs[i].text.len();
                    st.accs[i].text.push_str(&text);
                    let v = st.meta.chunk(index, &text, &logprobs, offset, None, first);
                    return Some((event(&v), st));
                }
                Some(ChoiceEvent::Finish {
                    index,
                    reason,
                    usage,
                }) => {
                    let i = index as usize;
                    let first = !std::mem::replace(&mut st.started[i], true);
                    st.accs[i].finish = Some(reason);
                    st.accs[i].completion_tokens = usage.completion_tokens;
                    st.accs[i].cached_tokens = usage.cached_tokens;
                    st.done += 1;
                    let v = st.meta.chunk(index, "", &[], 0, Some(reason), first);
                    return Some((event(&v), st));
                }
                Some(ChoiceEvent::Failed { error, .. }) => {
                    // The response is already 200: report the error in-band, then end.
                    st.pending.push_back(error.body_json());
                    st.pending.push_back(Value::Null);
                    st.finished = true;
                }
            }
        }
    })
}
