//! Turning choice events into OpenAI responses: one JSON body, or SSE chunks ending with
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use llmapi_proto::v1::TokenLogprob;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::codec::TextCodec;
use crate::error::ApiError;
use crate::generate::ChoiceEvent;
use crate::reasoning::{ReasoningParser, ReasoningSplitter, Split};
use crate::state::AdmitGuard;
use crate::tools::stream::{CallDelta, CallsAcc, ToolMode, ToolStream};

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
    /// Choices generated per prompt.
    pub n: u32,
    /// Choices returned per prompt (`GenSettings::keep`): a complete response keeps each
    /// prompt's `keep` choices with the highest cumulative logprob (best_of); a stream is
    /// never asked for fewer than `n`.
    pub keep: u32,
    /// Prompt length per prompt.
    pub prompt_lens: Vec<usize>,
    /// Echoed prompt text per prompt (completions with echo).
    pub echo: Vec<Option<String>>,
    /// Prompt token ids per prompt, for the echoed prompt's logprobs (completions with echo
    /// and logprobs; empty otherwise).
    pub echo_ids: Vec<Vec<u32>>,
    /// Whether logprobs were asked for.
    pub logprobs: bool,
    /// Final usage chunk in streams.
    pub include_usage: bool,
    /// Chat with `--reasoning_parser`: split the thinking part into `reasoning_content`.
    pub reasoning: Option<ReasoningParser>,
    /// Chat with tools: how the output carries tool calls (None: plain text).
    pub tools: Option<ToolMode>,
    /// Tokenizer, for logprob token strings.
    pub codec: Arc<dyn TextCodec>,
}

/// An echoed prompt's token ids and the logprobs of its tokens after the first.
#[derive(Clone, Copy)]
struct EchoLogprobs<'a> {
    ids: &'a [u32],
    logprobs: &'a [TokenLogprob],
}

#[derive(Default, Clone)]
struct ChoiceAcc {
    text: String,
    prompt_logprobs: Vec<TokenLogprob>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: u32,
    cached_tokens: u32,
    /// The worker's `avg_decoded_tokens_per_iter` (speculative decoding only).
    avg_decoded_tokens_per_iter: Option<f64>,
    /// The thinking part (`--reasoning_parser`).
    reasoning: String,
    splitter: Option<ReasoningSplitter>,
    /// Reads tool calls out of the content (requests with tools).
    tools: Option<ToolStream>,
    /// The tool calls read.
    calls: CallsAcc,
}

impl ChoiceAcc {
    fn new(parser: Option<ReasoningParser>, tools: Option<&ToolMode>) -> Self {
        Self {
            splitter: parser.map(ReasoningSplitter::new),
            tools: tools.cloned().map(ToolStream::new),
            ..Self::default()
        }
    }

    /// Splits a delta of `tokens` tokens into reasoning, content and tool calls (all content
    /// without parsers) and adds them to the choice.
    fn add(&mut self, text: &str, tokens: u32) -> (Split, Vec<CallDelta>) {
        let split = match &mut self.splitter {
            Some(s) => s.push(text, tokens),
            None => Split {
                reasoning: String::new(),
                content: text.to_owned(),
            },
        };
        self.keep(split)
    }

    /// Releases the splitters' held-back text at the end of the choice.
    fn flush(&mut self) -> (Split, Vec<CallDelta>) {
        let split = self
            .splitter
            .as_mut()
            .map(ReasoningSplitter::flush)
            .unwrap_or_default();
        let (mut split, mut calls) = self.keep(split);
        if let Some(tools) = &mut self.tools {
            let rest = tools.flush();
            self.text.push_str(&rest.content);
            self.calls.add(&rest.calls);
            split.content.push_str(&rest.content);
            calls.extend(rest.calls);
        }
        (split, calls)
    }

    /// Adds split text, its content read for tool calls first.
    fn keep(&mut self, mut split: Split) -> (Split, Vec<CallDelta>) {
        let mut calls = Vec::new();
        if let Some(tools) = &mut self.tools {
            let out = tools.push(&split.content);
            split.content = out.content;
            calls = out.calls;
        }
        self.reasoning.push_str(&split.reasoning);
        self.text.push_str(&split.content);
        self.calls.add(&calls);
        (split, calls)
    }

    /// The finish reason to report for the worker's: `tool_calls` after calls.
    fn finish_reason(&self, reason: &'static str) -> &'static str {
        self.tools
            .as_ref()
            .map_or(reason, |t| t.finish_reason(reason))
    }

    fn reasoning_tokens(&self) -> u32 {
        self.splitter
            .as_ref()
            .map_or(0, ReasoningSplitter::reasoning_tokens)
    }
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
        // Cached tokens are counted once per prompt, like prompt tokens: the most any of its
        // choices took from the cache. A sequence group's first choice computes the prompt and
        // the others share its blocks, so this is what the sharing ones report, as vLLM
        // reports the cached tokens of its parallel-sampling children.
        let cached: u64 = accs
            .chunks(self.n.max(1) as usize)
            .map(|c| {
                c.iter()
                    .map(|a| u64::from(a.cached_tokens))
                    .max()
                    .unwrap_or(0)
            })
            .sum();
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt as u64 + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        });
        if self.reasoning.is_some() {
            let reasoning: u64 = accs.iter().map(|a| u64::from(a.reasoning_tokens())).sum();
            usage["completion_tokens_details"] = json!({"reasoning_tokens": reasoning});
        }
        usage
    }

    fn token_str(&self, id: u32) -> String {
        self.codec.decode(&[id])
    }

    /// The echoed prompt of choice `index`, if any.
    /// The choices a complete response returns, each with its index among those generated:
    /// all of them, or per prompt the `keep` with the highest cumulative logprob (best
    /// first; of equal sums the earlier one), as vLLM's best_of ranks them.
    fn kept<'a>(&self, accs: &'a [ChoiceAcc]) -> Vec<(usize, &'a ChoiceAcc)> {
        let n = self.n.max(1) as usize;
        let keep = self.keep as usize;
        let mut out: Vec<(usize, &ChoiceAcc)> = accs.iter().enumerate().collect();
        if keep >= n {
            return out;
        }
        let score = |a: &ChoiceAcc| a.logprobs.iter().map(|l| f64::from(l.logprob)).sum::<f64>();
        out.chunks_mut(n)
            .flat_map(|group| {
                group.sort_by(|x, y| score(y.1).total_cmp(&score(x.1)).then(x.0.cmp(&y.0)));
                group[..keep.min(group.len())].to_vec()
            })
            .collect()
    }

    fn echo_of(&self, index: usize) -> Option<&str> {
        self.echo
            .get(index / self.n.max(1) as usize)
            .and_then(|e| e.as_deref())
    }

    /// The prompt's tokens and their logprobs for choice `index`, when echo and logprobs are
    /// both asked for.
    fn echo_logprobs<'a>(
        &'a self,
        index: usize,
        prompt_logprobs: &'a [TokenLogprob],
    ) -> Option<EchoLogprobs<'a>> {
        if !self.logprobs || self.echo_of(index).is_none() {
            return None;
        }
        let ids = self.echo_ids.get(index / self.n.max(1) as usize)?;
        Some(EchoLogprobs {
            ids,
            logprobs: prompt_logprobs,
        })
    }

    fn top_map(&self, lp: &TokenLogprob) -> Value {
        Value::Object(
            lp.top
                .iter()
                .map(|t| (self.token_str(t.token_id), json!(t.logprob)))
                .collect(),
        )
    }

    /// `logprobs` of a choice: for completions the legacy shape, with the echoed prompt's tokens
    /// first (the first one has no logprob) and text offsets counted from the start of the
    /// choice's text; for chat, `content`.
    fn logprobs_json(
        &self,
        echo: Option<EchoLogprobs<'_>>,
        lps: &[TokenLogprob],
        text_offset: usize,
    ) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.shape {
            Shape::Completion => {
                let mut tokens = Vec::new();
                let mut token_logprobs = Vec::new();
                let mut top_logprobs = Vec::new();
                let mut offsets = Vec::new();
                if let Some(echo) = echo {
                    let mut offset = 0;
                    for (i, &id) in echo.ids.iter().enumerate() {
                        let t = self.token_str(id);
                        offsets.push(offset);
                        offset += t.len();
                        tokens.push(t);
                        // Entry i - 1 is the logprob of prompt token i given the tokens before.
                        match i.checked_sub(1).and_then(|j| echo.logprobs.get(j)) {
                            Some(lp) => {
                                token_logprobs.push(json!(lp.logprob));
                                top_logprobs.push(self.top_map(lp));
                            }
                            None => {
                                token_logprobs.push(Value::Null);
                                top_logprobs.push(Value::Null);
                            }
                        }
                    }
                }
                let mut offset = text_offset;
                for lp in lps {
                    let t = self.token_str(lp.token_id);
                    offsets.push(offset);
                    offset += t.len();
                    tokens.push(t);
                    token_logprobs.push(json!(lp.logprob));
                    top_logprobs.push(self.top_map(lp));
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
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

    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &self,
        index: u32,
        text: &str,
        echo: Option<EchoLogprobs<'_>>,
        lps: &[TokenLogprob],
        offset: usize,
        finish: Option<&str>,
        first: bool,
    ) -> Value {
        let choice = match self.shape {
            Shape::Completion => json!({
                "index": index,
                "text": text,
                "logprobs": self.logprobs_json(echo, lps, offset),
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
                    "logprobs": self.logprobs_json(None, lps, offset),
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

/// Collects every choice into one response body; the first failure fails the request, and
/// so does the drain timeout passing (`AdmitGuard::cut_off`: 503).
pub async fn collect(
    meta: ResponseMeta,
    mut rx: mpsc::Receiver<ChoiceEvent>,
    admit: &AdmitGuard,
) -> Response {
    let mut accs = vec![ChoiceAcc::new(meta.reasoning, meta.tools.as_ref()); meta.choices as usize];
    let mut done = 0;
    while done < accs.len() {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            error = admit.cut_off() => return error.into_response(),
        };
        let Some(ev) = ev else {
            return ApiError::internal("a choice ended without finishing").into_response();
        };
        match ev {
            ChoiceEvent::PromptLogprobs { index, logprobs } => {
                if let Some(a) = accs.get_mut(index as usize) {
                    a.prompt_logprobs = logprobs;
                }
            }
            ChoiceEvent::Delta {
                index,
                text,
                logprobs,
                tokens,
            } => {
                if let Some(a) = accs.get_mut(index as usize) {
                    a.add(&text, tokens);
                    a.logprobs.extend(logprobs);
                }
            }
            ChoiceEvent::Finish {
                index,
                reason,
                usage,
            } => {
                if let Some(a) = accs.get_mut(index as usize) {
                    a.flush();
                    a.finish = Some(a.finish_reason(reason));
                    a.completion_tokens = usage.completion_tokens;
                    a.cached_tokens = usage.cached_tokens;
                    a.avg_decoded_tokens_per_iter = usage.avg_decoded_tokens_per_iter;
                }
                done += 1;
            }
            ChoiceEvent::Failed { error, .. } => return error.into_response(),
        }
    }
    let choices: Vec<Value> = meta
        .kept(&accs)
        .into_iter()
        .enumerate()
        .map(|(i, (from, a))| {
            let echo = meta.echo_of(from).unwrap_or_default();
            let mut choice = match meta.shape {
                Shape::Completion => json!({
                    "index": i,
                    "text": format!("{echo}{}", a.text),
                    "logprobs": meta.logprobs_json(
                        meta.echo_logprobs(from, &a.prompt_logprobs),
                        &a.logprobs,
                        echo.len(),
                    ),
                    "finish_reason": a.finish,
                }),
                Shape::Chat => {
                    let mut message = json!({"role": "assistant", "content": a.text});
                    if !a.calls.is_empty() {
                        if a.text.is_empty() {
                            message["content"] = Value::Null;
                        }
                        message["tool_calls"] = a.calls.to_json();
                    }
                    if meta.reasoning.is_some() {
                        message["reasoning_content"] =
                            json!((!a.reasoning.is_empty()).then_some(&a.reasoning));
                    }
                    json!({
                        "index": i,
                        "message": message,
                        "logprobs": meta.logprobs_json(None, &a.logprobs, 0),
                        "finish_reason": a.finish,
                    })
                }
            };
            with_acceptance(&mut choice, a.avg_decoded_tokens_per_iter);
            choice
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

/// Adds the worker's `avg_decoded_tokens_per_iter` to a choice, where TensorRT-LLM's
/// trtllm-serve puts it (speculative decoding; absent otherwise).
fn with_acceptance(choice: &mut Value, avg: Option<f64>) {
    if let (Some(avg), Some(c)) = (avg, choice.as_object_mut()) {
        c.insert("avg_decoded_tokens_per_iter".into(), json!(avg));
    }
}

fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Streams choices as SSE. Dropping the response (client gone) drops `rx`, which aborts every
/// choice on its worker.
///
/// The status line waits for the first choice event: a request that fails before any output
/// (no worker, a full worker queue, a timeout before the first token) gets its own status
/// (503, 429, 504) and an error body, which clients retry on, instead of a 200 whose error
/// only shows in-band. Once the 200 is out, failures are in-band error events before
/// `data: [DONE]`. `keepalive` sends an SSE comment line after that much silence.
pub async fn stream(
    meta: ResponseMeta,
    mut rx: mpsc::Receiver<ChoiceEvent>,
    admit: AdmitGuard,
    keepalive: Option<Duration>,
) -> Response {
    let first = tokio::select! {
        ev = rx.recv() => ev,
        // Past the drain timeout before any output: a 503 of its own.
        error = admit.cut_off() => Some(ChoiceEvent::Failed { index: 0, error }),
    };
    let first = match first {
        Some(ChoiceEvent::Failed { error, .. }) => return error.into_response(),
        None => return ApiError::internal("a choice ended without finishing").into_response(),
        Some(ev) => ev,
    };
    sse_response(sse_events(meta, first, rx, admit), keepalive)
}

/// An SSE response of `events`, with a comment line after `keepalive` of silence if set.
pub(crate) fn sse_response<S>(events: S, keepalive: Option<Duration>) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    match keepalive {
        Some(every) => Sse::new(events)
            .keep_alive(KeepAlive::new().interval(every))
            .into_response(),
        None => Sse::new(events).into_response(),
    }
}

struct StreamState {
    meta: ResponseMeta,
    rx: mpsc::Receiver<ChoiceEvent>,
    accs: Vec<ChoiceAcc>,
    started: Vec<bool>,
    /// Choices whose echoed prompt is still to be sent (it waits for the prompt's logprobs).
    echo_due: Vec<bool>,
    pending: std::collections::VecDeque<Value>,
    done: usize,
    finished: bool,
    /// Held for the stream's life; also says when the drain timeout cuts it off.
    admit: AdmitGuard,
}

impl StreamState {
    /// Queues choice `i`'s echoed prompt, with its logprobs when asked for, unless already sent.
    fn send_echo(&mut self, i: usize) {
        if !std::mem::replace(&mut self.echo_due[i], false) {
            return;
        }
        let meta = &self.meta;
        if let Some(echo) = meta.echo_of(i) {
            let lps = meta.echo_logprobs(i, &self.accs[i].prompt_logprobs);
            let v = meta.chunk(i as u32, echo, lps, &[], 0, None, false);
            self.pending.push_back(v);
        }
    }

    /// Where choice `i`'s next text starts in its whole text (echo included).
    fn text_offset(&self, i: usize) -> usize {
        self.meta.echo_of(i).map_or(0, str::len) + self.accs[i].text.len()
    }

    /// Queues a chunk of split text (a plain text chunk without a reasoning parser); none when
    /// there is no text (the parser holds it back) and no logprobs to send.
    fn send_split(&mut self, index: u32, split: &Split, logprobs: &[TokenLogprob], offset: usize) {
        let i = index as usize;
        if split.reasoning.is_empty() && split.content.is_empty() && logprobs.is_empty() {
            return;
        }
        let first = !std::mem::replace(&mut self.started[i], true);
        let mut v = self
            .meta
            .chunk(index, &split.content, None, logprobs, offset, None, first);
        if !split.reasoning.is_empty()
            && let Some(delta) = v["choices"][0]["delta"].as_object_mut()
        {
            if split.content.is_empty() {
                delta.remove("content");
            }
            delta.insert("reasoning_content".into(), json!(split.reasoning));
        }
        self.pending.push_back(v);
    }

    /// Queues one chunk per tool-call delta.
    fn send_calls(&mut self, index: u32, calls: &[CallDelta]) {
        for call in calls {
            let first = !std::mem::replace(&mut self.started[index as usize], true);
            let mut v = self.meta.chunk(index, "", None, &[], 0, None, first);
            if let Some(delta) = v["choices"][0]["delta"].as_object_mut() {
                delta.remove("content");
                delta.insert("tool_calls".into(), json!([call.to_json()]));
            }
            self.pending.push_back(v);
        }
    }

    /// Queues the chunks for one choice event; false when the stream must end.
    fn on_event(&mut self, ev: ChoiceEvent) -> bool {
        match ev {
            ChoiceEvent::PromptLogprobs { index, logprobs } => {
                let i = index as usize;
                self.accs[i].prompt_logprobs = logprobs;
                self.send_echo(i);
            }
            ChoiceEvent::Delta {
                index,
                text,
                logprobs,
                tokens,
            } => {
                let i = index as usize;
                self.send_echo(i);
                let offset = self.text_offset(i);
                let (split, calls) = self.accs[i].add(&text, tokens);
                self.send_split(index, &split, &logprobs, offset);
                self.send_calls(index, &calls);
            }
            ChoiceEvent::Finish {
                index,
                reason,
                usage,
            } => {
                let i = index as usize;
                self.send_echo(i);
                let offset = self.text_offset(i);
                let (split, calls) = self.accs[i].flush();
                self.send_split(index, &split, &[], offset);
                self.send_calls(index, &calls);
                let first = !std::mem::replace(&mut self.started[i], true);
                let reason = self.accs[i].finish_reason(reason);
                self.accs[i].finish = Some(reason);
                self.accs[i].completion_tokens = usage.completion_tokens;
                self.accs[i].cached_tokens = usage.cached_tokens;
                self.done += 1;
                let mut v = self
                    .meta
                    .chunk(index, "", None, &[], 0, Some(reason), first);
                with_acceptance(&mut v["choices"][0], usage.avg_decoded_tokens_per_iter);
                self.pending.push_back(v);
            }
            ChoiceEvent::Failed { error, .. } => {
                // The response is already 200: report the error in-band, then end.
                self.pending.push_back(error.body_json());
                return false;
            }
        }
        true
    }
}

/// The SSE events of a stream whose first choice event, `first`, has arrived.
fn sse_events(
    meta: ResponseMeta,
    first: ChoiceEvent,
    rx: mpsc::Receiver<ChoiceEvent>,
    admit: AdmitGuard,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let n = meta.choices as usize;
    let mut state = StreamState {
        accs: vec![ChoiceAcc::new(meta.reasoning, meta.tools.as_ref()); n],
        started: vec![false; n],
        echo_due: (0..n).map(|i| meta.echo_of(i).is_some()).collect(),
        meta,
        rx,
        pending: std::collections::VecDeque::new(),
        done: 0,
        finished: false,
        admit,
    };
    // Echoed prompts come first (completions); with logprobs they wait for the prompt's
    // logprobs, which arrive with the choice's first worker response.
    if !state.meta.logprobs {
        for i in 0..n {
            state.send_echo(i);
        }
    }
    if !state.on_event(first) {
        state.pending.push_back(Value::Null);
        state.finished = true;
    }
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
            let ev = tokio::select! {
                ev = st.rx.recv() => ev,
                // Past the drain timeout: end with an in-band error, never a silent cut.
                error = st.admit.cut_off() => Some(ChoiceEvent::Failed { index: 0, error }),
            };
            let more = match ev {
                None => false,
                Some(ev) => st.on_event(ev),
            };
            if !more {
                st.pending.push_back(Value::Null);
                st.finished = true;
            }
        }
    })
}
