//! A response's output built from its chat choice's events: the response object (one JSON
//! body) or the Responses API's typed SSE events, each with its `sequence_number`.

use serde_json::{Map, Value, json};

use crate::generate::ChoiceEvent;
use crate::reasoning::{ReasoningParser, ReasoningSplitter};

/// A fresh id with OpenAI's prefix (`resp`, `msg`, `rs`): 24 random bytes in hex.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the clock still makes the id unique per router.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// What a response object echoes of its request, and its id.
#[derive(Debug, Clone)]
pub struct Head {
    /// `resp_...`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The request's fields echoed back (model, instructions, max_output_tokens,
    /// temperature, top_p, previous_response_id, metadata, user, store).
    pub echo: Map<String, Value>,
}

impl Head {
    /// The response object with `status`, `output` and `usage`.
    pub fn object(&self, status: &str, output: &[Value], usage: Option<&Value>) -> Value {
        let mut o = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": (status == "incomplete").then(|| json!({"reason": "max_output_tokens"})),
            "output": output,
            "parallel_tool_calls": false,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "reasoning": null,
            "usage": usage,
        });
        if let Some(obj) = o.as_object_mut() {
            obj.extend(self.echo.clone());
        }
        o
    }
}

/// Token counts of a finished choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Prompt tokens.
    pub input: usize,
    /// Of them, served from the prefix cache.
    pub cached: u32,
    /// Generated tokens.
    pub output: u32,
    /// Of them, thinking.
    pub reasoning: u32,
}

impl Counts {
    /// The `usage` object.
    pub fn usage(&self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input as u64 + u64::from(self.output),
        })
    }
}

/// A message output item holding `text`.
pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": if status == "in_progress" { json!([]) } else { json!([text_part(text)]) },
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A reasoning output item holding `text`.
pub fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "reasoning",
        "id": id,
        "summary": [],
        "content": if status == "in_progress" { json!([]) } else { json!([reasoning_part(text)]) },
        "status": status,
    })
}

fn reasoning_part(text: &str) -> Value {
    json!({"type": "reasoning_text", "text": text})
}

/// The kind of an output item being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Message,
}

/// The item being streamed.
#[derive(Debug, Clone)]
struct Open {
    kind: Kind,
    id: String,
    index: usize,
    text: String,
}

/// Builds a response from its choice's events; with `streaming`, also the SSE events, one
/// output item per run of reasoning or answer text.
pub struct Writer {
    head: Head,
    splitter: Option<ReasoningSplitter>,
    streaming: bool,
    sequence: u64,
    open: Option<Open>,
    /// Items finished, in output order.
    done: Vec<Value>,
    /// Events to send, in order.
    events: Vec<Value>,
    counts: Counts,
    /// The worker's finish reason, once it came.
    finish: Option<&'static str>,
}

impl Writer {
    /// A writer of the response `head`, splitting thinking out with `parser`.
    pub fn new(
        head: Head,
        parser: Option<ReasoningParser>,
        input_tokens: usize,
        streaming: bool,
    ) -> Self {
        Self {
            head,
            splitter: parser.map(ReasoningSplitter::new),
            streaming,
            sequence: 0,
            open: None,
            done: Vec::new(),
            events: Vec::new(),
            counts: Counts {
                input: input_tokens,
                ..Counts::default()
            },
            finish: None,
        }
    }

    fn emit(&mut self, kind: &str, mut fields: Value) {
        if !self.streaming {
            return;
        }
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.events.push(fields);
    }

    /// Queues `response.created` and `response.in_progress`.
    pub fn start(&mut self) {
        let response = self.head.object("in_progress", &[], None);
        self.emit("response.created", json!({"response": response}));
        self.emit("response.in_progress", json!({"response": response}));
    }

    /// Takes one choice event; false once the choice has ended (finished or failed: the
    /// caller handles `Failed` itself).
    pub fn on_event(&mut self, ev: ChoiceEvent) -> bool {
        match ev {
            ChoiceEvent::PromptLogprobs { .. } | ChoiceEvent::Failed { .. } => true,
            ChoiceEvent::Delta { text, tokens, .. } => {
                let (reasoning, content) = match &mut self.splitter {
                    Some(s) => {
                        let split = s.push(&text, tokens);
                        (split.reasoning, split.content)
                    }
                    None => (String::new(), text),
                };
                self.write(Kind::Reasoning, &reasoning);
                self.write(Kind::Message, &content);
                true
            }
            ChoiceEvent::Finish { reason, usage, .. } => {
                if let Some(s) = &mut self.splitter {
                    let split = s.flush();
                    self.counts.reasoning = s.reasoning_tokens();
                    self.write(Kind::Reasoning, &split.reasoning);
                    self.write(Kind::Message, &split.content);
                }
                self.counts.output = usage.completion_tokens;
                self.counts.cached = usage.cached_tokens;
                self.finish = Some(reason);
                false
            }
        }
    }

    /// Adds `text` to the open item of `kind`, closing another kind's item and opening one
    /// of `kind` first.
    fn write(&mut self, kind: Kind, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.open.as_ref().is_some_and(|o| o.kind != kind) {
            self.close("completed");
        }
        if self.open.is_none() {
            self.open_item(kind);
        }
        let Some(open) = &mut self.open else {
            return;
        };
        open.text.push_str(text);
        let (id, index) = (open.id.clone(), open.index);
        let event = match kind {
            Kind::Reasoning => "response.reasoning_text.delta",
            Kind::Message => "response.output_text.delta",
        };
        let mut fields =
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text});
        if kind == Kind::Message {
            fields["logprobs"] = json!([]);
        }
        self.emit(event, fields);
    }

    fn open_item(&mut self, kind: Kind) {
        let index = self.done.len();
        let (id, item, part) = match kind {
            Kind::Reasoning => {
                let id = new_id("rs");
                let item = reasoning_item(&id, "", "in_progress");
                (id, item, reasoning_part(""))
            }
            Kind::Message => {
                let id = new_id("msg");
                let item = message_item(&id, "", "in_progress");
                (id, item, text_part(""))
            }
        };
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        self.open = Some(Open {
            kind,
            id,
            index,
            text: String::new(),
        });
    }

    fn close(&mut self, status: &str) {
        let Some(open) = self.open.take() else {
            return;
        };
        let (done_event, item, part) = match open.kind {
            Kind::Reasoning => (
                "response.reasoning_text.done",
                reasoning_item(&open.id, &open.text, status),
                reasoning_part(&open.text),
            ),
            Kind::Message => (
                "response.output_text.done",
                message_item(&open.id, &open.text, status),
                text_part(&open.text),
            ),
        };
        let place = json!({"item_id": open.id, "output_index": open.index, "content_index": 0});
        let mut fields = place.clone();
        fields["text"] = json!(open.text);
        if open.kind == Kind::Message {
            fields["logprobs"] = json!([]);
        }
        self.emit(done_event, fields);
        let mut fields = place;
        fields["part"] = part;
        self.emit("response.content_part.done", fields);
        self.emit(
            "response.output_item.done",
            json!({"output_index": open.index, "item": item}),
        );
        self.done.push(item);
    }

    /// The status of the finished response: `incomplete` when it ran out of tokens.
    fn status(&self) -> &'static str {
        match self.finish {
            Some("length") => "incomplete",
            _ => "completed",
        }
    }

    /// Ends the response (the choice has finished): closes the open item, adds an empty
    /// message when no answer text came, queues `response.completed` (or `.incomplete`) and
    /// returns the response object and the answer's text.
    pub fn finish(&mut self) -> (Value, String) {
        let status = self.status();
        let answered = self.open.as_ref().is_some_and(|o| o.kind == Kind::Message)
            || self.done.iter().any(|i| i["type"] == "message");
        if !answered {
            self.close(status);
            self.open_item(Kind::Message);
        }
        self.close(status);
        let response = self
            .head
            .object(status, &self.done, Some(&self.counts.usage()));
        let event = match status {
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(event, json!({"response": response}));
        let text = self
            .done
            .iter()
            .filter(|i| i["type"] == "message")
            .filter_map(|i| i["content"][0]["text"].as_str())
            .collect();
        (response, text)
    }

    /// The events queued since the last call.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Queues an in-band `error` event (the stream's 200 is already out).
    pub fn error(&mut self, error: &crate::error::ApiError) {
        let body = error.body_json();
        let detail = &body["error"];
        self.emit(
            "error",
            json!({
                "code": detail["type"],
                "message": detail["message"],
                "param": detail["param"],
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmapi_proto::v1::Usage;

    fn head() -> Head {
        Head {
            id: "resp_1".into(),
            created_at: 0,
            echo: Map::new(),
        }
    }

    fn delta(text: &str) -> ChoiceEvent {
        ChoiceEvent::Delta {
            index: 0,
            text: text.into(),
            logprobs: Vec::new(),
            tokens: 1,
        }
    }

    fn finish(reason: &'static str) -> ChoiceEvent {
        ChoiceEvent::Finish {
            index: 0,
            reason,
            usage: Usage {
                completion_tokens: 3,
                ..Usage::default()
            },
        }
    }

    #[test]
    fn reasoning_and_answer_become_two_items() {
        let mut w = Writer::new(head(), Some(ReasoningParser::DeepseekR1), 5, true);
        w.start();
        w.on_event(delta("ab</think>"));
        w.on_event(delta("xy"));
        w.on_event(finish("stop"));
        let (response, text) = w.finish();
        assert_eq!(text, "xy");
        assert_eq!(response["output"][0]["type"], "reasoning");
        assert_eq!(response["output"][0]["content"][0]["text"], "ab");
        assert_eq!(response["output"][1]["content"][0]["text"], "xy");
        let events = w.take_events();
        let seqs: Vec<u64> = events
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
        assert_eq!(events.last().unwrap()["type"], "response.completed");
    }

    #[test]
    fn running_out_of_tokens_is_incomplete_and_silence_is_an_empty_message() {
        let mut w = Writer::new(head(), None, 5, false);
        w.on_event(finish("length"));
        let (response, text) = w.finish();
        assert_eq!(text, "");
        assert_eq!(response["status"], "incomplete");
        assert_eq!(
            response["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(response["output"][0]["content"][0]["text"], "");
        assert!(w.take_events().is_empty(), "no events without streaming");
    }
}
