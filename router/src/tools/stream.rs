//! One choice's output split into content and tool calls as it streams, in OpenAI's delta
//! shape: a call's first delta carries its index, a new `call_...` id, its type and name with
//! empty arguments; later deltas carry argument text.
//!
//! Text that may start a call (a prefix of a marker, or leading whitespace where an anchored
//! format may begin) is held back as stop strings are. A JSON call starts once its name is
//! known and its arguments' text follows as it is written (`partial`); a pythonic call is sent
//! once complete. Text that turns out not to be calls is released as content.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use super::formats::{Format, RawCall, Status};
use super::partial::call_prefix;
use crate::detok::longest_suffix_prefix;

/// How a choice's output carries its tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// `tool_choice: "auto"`: calls written in `format` are parsed out of the text; without
    /// `parallel` only the first is kept.
    Auto {
        /// The `--tool_parser` format.
        format: Format,
        /// `parallel_tool_calls`.
        parallel: bool,
    },
    /// `tool_choice: "required"`: the output is a JSON array of `{name, parameters}`.
    Required {
        /// `parallel_tool_calls` (the schema already allows one call when false).
        parallel: bool,
    },
    /// A named function: the whole output is its arguments.
    Named(String),
}

/// The start of a call: its id and function name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStart {
    /// `call_` and random hex.
    pub id: String,
    /// The function's name.
    pub name: String,
}

/// One tool-call delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    /// The call's index in the choice.
    pub index: usize,
    /// Set on the call's first delta (whose arguments are empty).
    pub start: Option<CallStart>,
    /// Argument text to append.
    pub arguments: String,
}

impl CallDelta {
    /// The delta's `tool_calls` entry in a stream chunk.
    pub fn to_json(&self) -> Value {
        match &self.start {
            Some(s) => json!({
                "index": self.index,
                "id": s.id,
                "type": "function",
                "function": {"name": s.name, "arguments": self.arguments},
            }),
            None => json!({"index": self.index, "function": {"arguments": self.arguments}}),
        }
    }
}

/// What one piece of output gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolDelta {
    /// Text to show as content.
    pub content: String,
    /// Tool-call deltas, in order.
    pub calls: Vec<CallDelta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before any call: content, watching for the start of calls.
    Content,
    /// From the start of the calls on: held until each call is complete.
    Calls,
    /// After text that is not a call: everything is content.
    Plain,
}

/// Splits one choice's text into content and tool calls.
#[derive(Debug, Clone)]
pub struct ToolStream {
    mode: ToolMode,
    phase: Phase,
    pending: String,
    /// Some non-whitespace content was released (an anchored format can no longer start).
    seen_text: bool,
    /// Calls read from the region so far (kept or not).
    read: usize,
    /// Calls sent (started).
    sent: usize,
    /// The call being sent as it is written: bytes of its arguments sent so far.
    streaming: Option<usize>,
}

impl ToolStream {
    /// A splitter for one choice in `mode`.
    pub fn new(mode: ToolMode) -> Self {
        Self {
            mode,
            phase: Phase::Content,
            pending: String::new(),
            seen_text: false,
            read: 0,
            sent: 0,
            streaming: None,
        }
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> ToolDelta {
        let mut out = ToolDelta::default();
        if let ToolMode::Named(name) = &self.mode {
            if !text.is_empty() {
                let name = name.clone();
                self.start_named(&name, &mut out);
                out.calls.push(CallDelta {
                    index: 0,
                    start: None,
                    arguments: text.to_owned(),
                });
            }
            return out;
        }
        self.pending.push_str(text);
        self.advance(false, &mut out);
        out
    }

    /// Releases what is held at the end of the choice.
    pub fn flush(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        if let ToolMode::Named(name) = &self.mode {
            let name = name.clone();
            self.start_named(&name, &mut out);
            return out;
        }
        self.advance(true, &mut out);
        out
    }

    /// The finish reason to report for the worker's `reason`: `tool_calls` when calls were
    /// read from an output that ended by itself, as vLLM reports auto and required calls;
    /// a named function keeps the reason, as OpenAI does.
    pub fn finish_reason(&self, reason: &'static str) -> &'static str {
        let forced = matches!(self.mode, ToolMode::Named(_));
        if self.sent > 0 && reason == "stop" && !forced {
            "tool_calls"
        } else {
            reason
        }
    }

    fn start_named(&mut self, name: &str, out: &mut ToolDelta) {
        if self.sent == 0 {
            self.sent = 1;
            out.calls.push(CallDelta {
                index: 0,
                start: Some(CallStart {
                    id: new_call_id(),
                    name: name.to_owned(),
                }),
                arguments: String::new(),
            });
        }
    }

    fn format(&self) -> (Format, bool) {
        match &self.mode {
            ToolMode::Auto { format, parallel } => (*format, *parallel),
            ToolMode::Required { parallel } => (Format::Required, *parallel),
            // Named output never reaches the scanner.
            ToolMode::Named(_) => (Format::Required, true),
        }
    }

    fn advance(&mut self, at_end: bool, out: &mut ToolDelta) {
        let (format, parallel) = self.format();
        loop {
            match self.phase {
                Phase::Content => {
                    if !self.seen_text
                        && let Some(anchor) = format.anchor()
                    {
                        // The scan skips the leading whitespace, kept should it be content.
                        let trimmed = self.pending.trim_start();
                        if trimmed.starts_with(anchor) {
                            self.phase = Phase::Calls;
                            continue;
                        }
                        if trimmed.is_empty() && !at_end {
                            return;
                        }
                    }
                    let found = format
                        .markers()
                        .iter()
                        .filter_map(|m| self.pending.find(m))
                        .min();
                    let cut = match found {
                        Some(at) => at,
                        None if at_end => self.pending.len(),
                        None => {
                            let hold = format
                                .markers()
                                .iter()
                                .map(|m| longest_suffix_prefix(&self.pending, m))
                                .max()
                                .unwrap_or(0);
                            self.pending.len() - hold
                        }
                    };
                    let released: String = self.pending.drain(..cut).collect();
                    self.seen_text |= !released.trim().is_empty();
                    out.content.push_str(&released);
                    if found.is_none() {
                        return;
                    }
                    self.phase = Phase::Calls;
                }
                Phase::Calls => {
                    let scan = format.scan(&self.pending, at_end);
                    for call in scan.calls.iter().skip(self.read) {
                        self.read += 1;
                        if let Some(done) = self.streaming.take() {
                            // Its start went out while it was written: the rest of its text.
                            self.send_arguments(call.arguments.get(done..), out);
                        } else if parallel || self.sent == 0 {
                            self.send(call, out);
                        }
                    }
                    let more = scan.status == Status::More;
                    if more && (parallel || self.sent == 0 || self.streaming.is_some()) {
                        self.send_partial(format, scan.consumed, scan.calls.len(), out);
                    }
                    if scan.status == Status::Invalid {
                        // A call cut short was sent as far as it went; its text is not
                        // content again.
                        if self.streaming.take().is_none() {
                            out.content.push_str(&self.pending[scan.consumed..]);
                        }
                        self.pending.clear();
                        self.phase = Phase::Plain;
                    } else if at_end {
                        self.pending.clear();
                    }
                    return;
                }
                Phase::Plain => {
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// Sends a complete call: its start, then its arguments.
    fn send(&mut self, call: &RawCall, out: &mut ToolDelta) {
        self.send_start(&call.name, out);
        self.send_arguments(Some(&call.arguments), out);
    }

    /// Sends the start of the call being written once its name is known, and its arguments
    /// written so far.
    fn send_partial(&mut self, format: Format, consumed: usize, calls: usize, out: &mut ToolDelta) {
        let Some(object) = format.partial_object(&self.pending, consumed, calls) else {
            return;
        };
        let known = call_prefix(object, format.arg_keys());
        let args = known.arguments.unwrap_or_default().to_owned();
        let Some(name) = known.name else {
            return;
        };
        let done = match self.streaming {
            Some(done) => done,
            None => {
                self.send_start(&name, out);
                0
            }
        };
        self.send_arguments(args.get(done..), out);
        self.streaming = Some(done.max(args.len()));
    }

    fn send_start(&mut self, name: &str, out: &mut ToolDelta) {
        let index = self.sent;
        self.sent += 1;
        out.calls.push(CallDelta {
            index,
            start: Some(CallStart {
                id: match self.mode {
                    // Mistral's chat templates refuse ids that are not 9 letters and digits.
                    ToolMode::Auto {
                        format: Format::Mistral,
                        ..
                    } => new_mistral_call_id(),
                    _ => new_call_id(),
                },
                name: name.to_owned(),
            }),
            arguments: String::new(),
        });
    }

    /// Sends argument text of the last call started (nothing when empty).
    fn send_arguments(&mut self, text: Option<&str>, out: &mut ToolDelta) {
        match text {
            Some(t) if !t.is_empty() => out.calls.push(CallDelta {
                index: self.sent.saturating_sub(1),
                start: None,
                arguments: t.to_owned(),
            }),
            _ => {}
        }
    }
}

/// A choice's calls put together from their deltas (complete responses).
#[derive(Debug, Clone, Default)]
pub struct CallsAcc {
    calls: Vec<(CallStart, String)>,
}

impl CallsAcc {
    /// Adds deltas in order.
    pub fn add(&mut self, deltas: &[CallDelta]) {
        for d in deltas {
            if let Some(start) = &d.start {
                self.calls.push((start.clone(), String::new()));
            }
            if let Some((_, args)) = self.calls.get_mut(d.index) {
                args.push_str(&d.arguments);
            }
        }
    }

    /// No call was made.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// `message.tool_calls`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.calls
                .iter()
                .map(|(s, args)| {
                    json!({
                        "id": s.id,
                        "type": "function",
                        "function": {"name": s.name, "arguments": args},
                    })
                })
                .collect(),
        )
    }
}

/// 96 random bits from std's randomly keyed hasher (a process-wide random key, then a
/// counter and the clock): unique per call without a random-number crate.
fn random_bits() -> (u64, u32) {
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = STATE.get_or_init(std::collections::hash_map::RandomState::new);
    let mut h = state.build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    let a = h.finish();
    h.write_u8(1);
    (a, h.finish() as u32)
}

/// `call_` and 24 random hex digits.
fn new_call_id() -> String {
    let (a, b) = random_bits();
    format!("call_{a:016x}{b:08x}")
}

/// 9 random letters and digits, the id shape Mistral's templates check (as vLLM's mistral
/// parser makes them).
fn new_mistral_call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let (mut a, _) = random_bits();
    (0..9)
        .map(|_| {
            let c = ALPHABET[(a % 62) as usize] as char;
            a /= 62;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests;
