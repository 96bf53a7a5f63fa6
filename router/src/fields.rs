//! Which request fields each endpoint accepts, and the refusal of every other one.
//!
//! A field the server does not implement is never silently dropped: an unknown key, or an
//! OpenAI field this server does not implement (`functions`, `suffix`, ...)
//! with a value that asks for something, is a 400 naming the field (`param`), as
//! trtllm-serve's request models, which forbid extra fields, answer. Values that ask for
//! nothing (null, `function_call` `"none"`, empty `functions`, an empty `suffix`) are
//! accepted. The values
//! are probed while the body is read (`Probe`), never buffered. docs/serving.md lists the
//! accepted fields; a test checks it against these lists. Not for: value ranges (`openai`).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;

/// Fields both endpoints read (`openai::CommonFields`).
pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stop_token_ids",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stream",
    "stream_options",
    "user",
    "logit_bias",
    // Structured outputs (`guided::read`).
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
];

/// Fields only /v1/completions reads.
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "max_tokens", "logprobs", "echo", "best_of"];

/// Fields only /v1/chat/completions reads.
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "prompt_token_ids",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// OpenAI fields of /v1/completions that are not implemented: accepted only with a value that
/// asks for nothing.
pub const COMPLETION_UNIMPLEMENTED: &[&str] = &["suffix"];

/// OpenAI fields of /v1/chat/completions that are not implemented: accepted only with a
/// value that asks for nothing.
pub const CHAT_UNIMPLEMENTED: &[&str] = &["functions", "function_call"];

/// The two endpoints that take a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// POST /v1/completions.
    Completions,
    /// POST /v1/chat/completions.
    Chat,
}

impl Endpoint {
    /// Fields read and applied, common ones first.
    pub fn accepted(self) -> Vec<&'static str> {
        let own = match self {
            Self::Completions => COMPLETION_FIELDS,
            Self::Chat => CHAT_FIELDS,
        };
        COMMON_FIELDS.iter().chain(own).copied().collect()
    }

    /// OpenAI fields accepted only with a value that asks for nothing.
    pub fn unimplemented(self) -> &'static [&'static str] {
        match self {
            Self::Completions => COMPLETION_UNIMPLEMENTED,
            Self::Chat => CHAT_UNIMPLEMENTED,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Completions => "/v1/completions",
            Self::Chat => "/v1/chat/completions",
        }
    }
}

/// The shape of a value, enough to tell whether it asks for anything; read without keeping
/// more than a short string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// null.
    Null,
    /// true or false.
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A string (kept when at most 16 bytes).
    Str(Option<String>),
    /// A list, and whether it is empty.
    List {
        /// No items.
        empty: bool,
    },
    /// An object: whether it is empty, and its `type` when a short string.
    Object {
        /// No keys.
        empty: bool,
        /// The `type` member.
        kind: Option<String>,
    },
    /// A float.
    Float,
}

impl<'de> serde::Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ProbeVisitor)
    }
}

struct ProbeVisitor;

const SHORT: usize = 16;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Probe, E> {
        Ok(Probe::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Probe, E> {
        Ok(Probe::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Probe, E> {
        Ok(Probe::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Probe, E> {
        Ok(Probe::Int(v.into()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Probe, E> {
        Ok(Probe::Float)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Probe, E> {
        Ok(Probe::Str((v.len() <= SHORT).then(|| v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Probe, A::Error> {
        let empty = seq.next_element::<IgnoredAny>()?.is_none();
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Probe::List { empty })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut empty = true;
        let mut kind = None;
        while let Some(key) = map.next_key::<String>()? {
            empty = false;
            if key == "type" {
                if let Probe::Str(s) = map.next_value::<Probe>()? {
                    kind = s;
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Probe::Object { empty, kind })
    }
}

/// What the endpoint's parse found that it must refuse: the first key it does not know, or
/// the first unimplemented field whose value asks for something.
#[derive(Debug, Default)]
pub struct Refusals {
    unknown: Option<String>,
    unimplemented: Option<&'static str>,
}

impl Refusals {
    /// Files `key` (not one of the endpoint's own fields) with its value, read from `map`.
    pub fn note<'de, A: MapAccess<'de>>(
        &mut self,
        endpoint: Endpoint,
        key: &str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        if COMMON_FIELDS.contains(&key) {
            map.next_value::<IgnoredAny>()?; // read by `CommonFields`
            return Ok(());
        }
        let Some(field) = endpoint.unimplemented().iter().find(|f| **f == key) else {
            map.next_value::<IgnoredAny>()?;
            if self.unknown.is_none() {
                self.unknown = Some(clipped(key));
            }
            return Ok(());
        };
        let value: Probe = map.next_value()?;
        if !asks_for_nothing(field, &value) && self.unimplemented.is_none() {
            self.unimplemented = Some(field);
        }
        Ok(())
    }

    /// 400 for the first refused field; `stream` as the request set it.
    pub fn check(
        self,
        endpoint: Endpoint,
        stream: Option<bool>,
        stream_options: bool,
    ) -> Result<(), ApiError> {
        if let Some(key) = self.unknown {
            let message = format!(
                "unknown field `{key}`: {} does not read it; remove it (accepted fields: {})",
                endpoint.path(),
                endpoint.accepted().join(", ")
            );
            return Err(ApiError::invalid(&key, message));
        }
        if let Some(field) = self.unimplemented {
            return Err(ApiError::invalid(
                field,
                format!(
                    "`{field}` is not implemented by this server; send the request without it{}",
                    accepted_value(field)
                ),
            ));
        }
        if stream_options && stream != Some(true) {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with \"stream\": true; remove it or stream the response",
            ));
        }
        Ok(())
    }
}

/// `key`, cut to 64 bytes at a character boundary: a hostile body may send a huge key.
fn clipped(key: &str) -> String {
    let mut end = key.len().min(64);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_owned()
}

/// Values of an unimplemented field that ask for nothing.
fn asks_for_nothing(field: &str, value: &Probe) -> bool {
    let text = |want: &str| matches!(value, Probe::Str(Some(s)) if s == want);
    match value {
        Probe::Null => true,
        _ => match field {
            "functions" => matches!(value, Probe::List { empty: true }),
            "function_call" => text("none"),
            "suffix" => text(""),
            _ => false,
        },
    }
}

fn accepted_value(field: &str) -> &'static str {
    match field {
        "functions" => " or with an empty list (send `tools` instead)",
        "function_call" => r#" or with "none" (send `tool_choice` instead)"#,
        "suffix" => r#" or with """#,
        _ => "",
    }
}
