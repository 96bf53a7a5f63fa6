//! The tool-call formats models write, read from the text after the start of the calls.
//!
//! A scan reads the calls of a region (the text from the format's start marker or anchor on)
//! and says whether the region ended cleanly, may still grow into more calls (a stream cut
//! mid-call), or holds something that is not a call. Rescanning a growing region gives the
//! same first calls, so a stream can send each call once it is complete. Not for: where the
//! region starts in the output, or the OpenAI shapes (`stream`).

use serde_json::Value;

use super::partial::arguments_of;
use super::pythonic;

/// One call as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text (an object).
    pub arguments: String,
}

/// How a scan of a region ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The whole region is calls (and whitespace).
    Done,
    /// The region ends inside a call, or where another may start: wait for more text.
    More,
    /// The text from `Scan::consumed` on is not a call.
    Invalid,
}

/// The calls read from a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Complete calls, in order.
    pub calls: Vec<RawCall>,
    /// Bytes of the region the calls cover.
    pub consumed: usize,
    /// How the scan ended.
    pub status: Status,
}

impl Scan {
    fn new(calls: Vec<RawCall>, consumed: usize, status: Status) -> Self {
        Self {
            calls,
            consumed,
            status,
        }
    }
}

/// A format of tool calls in a model's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated (Qwen2.5, Qwen3,
    /// Hermes).
    Hermes,
    /// `{"name": ..., "parameters": {...}}` objects separated by `;`, at the start of the
    /// output or after `<|python_tag|>` (Llama 3.1+ JSON tool calling).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral); the marker is a
    /// special token that decoding drops, so a bare array at the start counts too.
    Mistral,
    /// `[f(a=1), g(b="x")]`: Python call syntax with literal arguments (Llama 3.2, Llama 4).
    Pythonic,
    /// The JSON array `tool_choice: "required"` constrains the output to:
    /// `[{"name": ..., "parameters": {...}}, ...]`.
    Required,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_TAG: &str = "[TOOL_CALLS]";
const HERMES_ARGS: &[&str] = &["arguments", "parameters"];
const LLAMA3_ARGS: &[&str] = &["parameters", "arguments"];
const MISTRAL_ARGS: &[&str] = &["arguments"];
const REQUIRED_ARGS: &[&str] = &["parameters"];

impl Format {
    /// Strings that start the calls anywhere in the output.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &[HERMES_OPEN],
            Self::Llama3Json => &[PYTHON_TAG],
            Self::Mistral => &[MISTRAL_TAG],
            Self::Pythonic | Self::Required => &[],
        }
    }

    /// The character that starts the calls when it opens the output (after whitespace).
    pub fn anchor(self) -> Option<char> {
        match self {
            Self::Hermes => None,
            Self::Llama3Json => Some('{'),
            Self::Mistral | Self::Pythonic | Self::Required => Some('['),
        }
    }

    /// The keys a call object's arguments may be under (JSON formats; none for pythonic).
    pub fn arg_keys(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => HERMES_ARGS,
            Self::Llama3Json => LLAMA3_ARGS,
            Self::Mistral => MISTRAL_ARGS,
            Self::Required => REQUIRED_ARGS,
            Self::Pythonic => &[],
        }
    }

    /// The text of the call object being written after the `calls` complete calls that end
    /// at `consumed` in `region` (JSON formats), from its `{` to the end of the region.
    pub fn partial_object(self, region: &str, consumed: usize, calls: usize) -> Option<&str> {
        let rest = region.get(consumed..)?.trim_start();
        let rest = match (self, calls) {
            (Self::Hermes, _) => rest.strip_prefix(HERMES_OPEN)?,
            (Self::Llama3Json, 0) => rest.strip_prefix(PYTHON_TAG).unwrap_or(rest),
            (Self::Llama3Json, _) => rest.strip_prefix(';')?,
            (Self::Mistral, 0) => rest
                .strip_prefix(MISTRAL_TAG)
                .unwrap_or(rest)
                .trim_start()
                .strip_prefix('[')?,
            (Self::Required, 0) => rest.strip_prefix('[')?,
            (Self::Mistral | Self::Required, _) => rest.strip_prefix(',')?,
            (Self::Pythonic, _) => return None,
        };
        let rest = rest.trim_start();
        rest.starts_with('{').then_some(rest)
    }

    /// Reads the calls of `region`, which starts with a marker or the anchor. At the end of
    /// the output (`at_end`) a region that could still grow is invalid from its last call on,
    /// except hermes' last `<tool_call>` may lack its closing tag.
    pub fn scan(self, region: &str, at_end: bool) -> Scan {
        let start = region.trim_start();
        let in_marker = |m: &&str| start.len() < m.len() && m.starts_with(start);
        if !at_end && self.markers().iter().any(in_marker) {
            // `[TOOL_CALLS` so far: the anchor `[` may be the marker's start.
            return Scan::new(Vec::new(), 0, Status::More);
        }
        let scan = match self {
            Self::Hermes => hermes(region, at_end),
            Self::Llama3Json => {
                let skip = marker_len(region, PYTHON_TAG);
                offset(
                    json_objects(&region[skip..], ';', &["parameters", "arguments"]),
                    skip,
                )
            }
            Self::Mistral => {
                let skip = marker_len(region, MISTRAL_TAG);
                offset(json_array(&region[skip..], MISTRAL_ARGS), skip)
            }
            Self::Pythonic => pythonic::scan(region),
            Self::Required => json_array(region, REQUIRED_ARGS),
        };
        if at_end && scan.status == Status::More {
            return Scan {
                status: Status::Invalid,
                ..scan
            };
        }
        scan
    }
}

/// Bytes of `marker` and the whitespace before it at the start of `region` (0: none).
fn marker_len(region: &str, marker: &str) -> usize {
    let ws = region.len() - region.trim_start().len();
    if region[ws..].starts_with(marker) {
        ws + marker.len()
    } else {
        0
    }
}

/// `scan` of a region that started `skip` bytes later.
fn offset(mut scan: Scan, skip: usize) -> Scan {
    if !scan.calls.is_empty() || scan.status == Status::Done {
        scan.consumed += skip;
    }
    scan
}

fn skip_ws(s: &str, at: usize) -> usize {
    at + (s.len() - at - s[at..].trim_start().len())
}

/// One JSON value at the start of `s`: the value and the bytes it took, `Ok(None)` when `s`
/// ends inside it, `Err` when it is not JSON.
fn json_value(s: &str) -> Result<Option<(Value, usize)>, ()> {
    let mut values = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match values.next() {
        Some(Ok(v)) => Ok(Some((v, values.byte_offset()))),
        Some(Err(e)) if e.is_eof() => Ok(None),
        Some(Err(_)) => Err(()),
        None => Ok(None),
    }
}

/// A call from the object `text`, parsed as `v`: `{"name": ..., <one of arg_keys>: {...}}`
/// (`partial::arguments_of`).
fn call_of(text: &str, v: &Value, arg_keys: &[&str]) -> Option<RawCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = arguments_of(text, v, arg_keys)?;
    Some(RawCall { name, arguments })
}

/// `<tool_call>{json}</tool_call>` blocks separated by whitespace.
fn hermes(region: &str, at_end: bool) -> Scan {
    let mut calls = Vec::new();
    let mut consumed = 0;
    loop {
        let at = skip_ws(region, consumed);
        let rest = &region[at..];
        if rest.is_empty() {
            let status = if calls.is_empty() {
                Status::More
            } else {
                Status::Done
            };
            return Scan::new(calls, region.len(), status);
        }
        let Some(body_and_more) = rest.strip_prefix(HERMES_OPEN) else {
            let status = if HERMES_OPEN.starts_with(rest) {
                Status::More
            } else {
                Status::Invalid
            };
            return Scan::new(calls, consumed, status);
        };
        let (body, next) = match body_and_more.find(HERMES_CLOSE) {
            Some(close) => (
                &body_and_more[..close],
                at + HERMES_OPEN.len() + close + HERMES_CLOSE.len(),
            ),
            // A model may stop at EOS right after the object, without the closing tag.
            None if at_end => (body_and_more, region.len()),
            None => return Scan::new(calls, consumed, Status::More),
        };
        let body = body.trim();
        let call = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| call_of(body, &v, HERMES_ARGS));
        match call {
            Some(c) => calls.push(c),
            None => return Scan::new(calls, consumed, Status::Invalid),
        }
        consumed = next;
    }
}

/// JSON call objects separated by `sep` (and whitespace).
fn json_objects(s: &str, sep: char, arg_keys: &[&str]) -> Scan {
    let mut calls = Vec::new();
    let mut consumed = 0;
    let mut at = skip_ws(s, 0);
    loop {
        let n = match json_value(&s[at..]) {
            Ok(Some((v, n))) => match call_of(&s[at..at + n], &v, arg_keys) {
                Some(c) => {
                    calls.push(c);
                    n
                }
                None => return Scan::new(calls, consumed, Status::Invalid),
            },
            Ok(None) => return Scan::new(calls, consumed, Status::More),
            Err(()) => return Scan::new(calls, consumed, Status::Invalid),
        };
        at += n;
        consumed = at;
        at = skip_ws(s, at);
        if at == s.len() {
            return Scan::new(calls, s.len(), Status::Done);
        }
        if !s[at..].starts_with(sep) {
            return Scan::new(calls, consumed, Status::Invalid);
        }
        at = skip_ws(s, at + sep.len_utf8());
        if at == s.len() {
            return Scan::new(calls, consumed, Status::More);
        }
    }
}

/// A JSON array of call objects.
fn json_array(s: &str, arg_keys: &[&str]) -> Scan {
    let mut calls = Vec::new();
    let mut at = skip_ws(s, 0);
    match s[at..].chars().next() {
        None => return Scan::new(calls, 0, Status::More),
        Some('[') => at += 1,
        Some(_) => return Scan::new(calls, 0, Status::Invalid),
    }
    let mut consumed = 0;
    loop {
        at = skip_ws(s, at);
        let rest = &s[at..];
        if rest.is_empty() {
            return Scan::new(calls, consumed, Status::More);
        }
        if calls.is_empty() && rest.starts_with(']') {
            // An empty list names no call.
            return Scan::new(calls, 0, Status::Invalid);
        }
        match json_value(rest) {
            Ok(Some((v, n))) => match call_of(&rest[..n], &v, arg_keys) {
                Some(c) => {
                    calls.push(c);
                    at += n;
                    consumed = at;
                }
                None => return Scan::new(calls, consumed, Status::Invalid),
            },
            Ok(None) => return Scan::new(calls, consumed, Status::More),
            Err(()) => return Scan::new(calls, consumed, Status::Invalid),
        }
        at = skip_ws(s, at);
        match s[at..].chars().next() {
            None => return Scan::new(calls, consumed, Status::More),
            Some(',') => at += 1,
            Some(']') => {
                let end = at + 1;
                return if skip_ws(s, end) == s.len() {
                    Scan::new(calls, s.len(), Status::Done)
                } else {
                    Scan::new(calls, end, Status::Invalid)
                };
            }
            Some(_) => return Scan::new(calls, consumed, Status::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> RawCall {
        RawCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_reads_each_block_and_waits_inside_one() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>";
        let s = Format::Hermes.scan(text, false);
        assert_eq!(s.calls, vec![call("f", r#"{"a": 1}"#), call("g", "{}")]);
        assert_eq!(s.status, Status::Done);
        let cut = &text[..text.len() - 3];
        let s = Format::Hermes.scan(cut, false);
        assert_eq!((s.calls.len(), s.status), (1, Status::More));
        let s = Format::Hermes.scan(cut, true);
        assert_eq!((s.calls.len(), s.status), (1, Status::Invalid));
    }

    #[test]
    fn hermes_takes_a_last_block_without_its_closing_tag_at_the_end() {
        let s = Format::Hermes.scan("<tool_call>{\"name\": \"f\", \"arguments\": {}}", true);
        assert_eq!((s.calls, s.status), (vec![call("f", "{}")], Status::Done));
    }

    #[test]
    fn text_after_the_calls_is_left_over() {
        let text = "<tool_call>{\"name\": \"f\"}</tool_call> and more";
        let s = Format::Hermes.scan(text, false);
        assert_eq!(s.calls, vec![call("f", "{}")]);
        assert_eq!(
            (s.status, &text[s.consumed..]),
            (Status::Invalid, " and more")
        );
    }

    #[test]
    fn llama3_json_reads_objects_separated_by_semicolons() {
        let text = r#"<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}"#;
        let s = Format::Llama3Json.scan(text, false);
        assert_eq!(s.calls, vec![call("f", r#"{"x": "y"}"#), call("g", "{}")]);
        assert_eq!(s.status, Status::Done);
        let s = Format::Llama3Json.scan(r#"{"name": "f", "parameters": {"#, false);
        assert_eq!((s.calls.len(), s.status), (0, Status::More));
        let s = Format::Llama3Json.scan(r#"{"weather": 1}"#, false);
        assert_eq!(s.status, Status::Invalid);
    }

    #[test]
    fn mistral_reads_an_array_with_or_without_its_marker() {
        for (text, args) in [
            (
                r#"[TOOL_CALLS] [{"name": "f", "arguments": {"a": [1, 2]}}]"#,
                r#"{"a": [1, 2]}"#,
            ),
            (
                r#"[{"name": "f", "arguments": "{\"a\": [1, 2]}"}]"#,
                r#"{"a":[1,2]}"#,
            ),
        ] {
            let s = Format::Mistral.scan(text, false);
            assert_eq!(
                (s.calls, s.status),
                (vec![call("f", args)], Status::Done),
                "{text}"
            );
        }
        let s = Format::Mistral.scan("[1, 2]", false);
        assert_eq!(s.status, Status::Invalid);
    }

    #[test]
    fn required_reads_name_and_parameters() {
        let s = Format::Required.scan(
            r#"[{"name": "f", "parameters": {"q": "x"}}, {"name": "g", "parameters": {}}]"#,
            true,
        );
        assert_eq!(
            (s.calls, s.status),
            (
                vec![call("f", r#"{"q": "x"}"#), call("g", "{}")],
                Status::Done
            )
        );
        let s = Format::Required.scan("[]", true);
        assert_eq!(s.status, Status::Invalid);
    }
}
