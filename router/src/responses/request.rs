//! The body of `POST /v1/responses`: which fields are served, and the conversation they
//! describe as chat messages (instructions first, then earlier turns, then the new input).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::{ChatMessage, Content};

/// Fields read from the body; any other field is refused by name (`check_fields`).
const SERVED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "previous_response_id",
    "metadata",
    "user",
];

/// Fields that clients send with their defaults; accepted only with these values
/// (`check_fields`): anything else asks for what this server does not do.
fn is_default(key: &str, value: &Value) -> bool {
    match key {
        "tools" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => matches!(value.as_str(), Some("auto" | "none")),
        "truncation" => value == "disabled",
        "parallel_tool_calls" | "background" => value == false,
        "text" => value.get("format").and_then(|f| f.get("type")) == Some(&Value::from("text")),
        _ => false,
    }
}

/// A `POST /v1/responses` body, its fields checked by `check_fields` first.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Served model name.
    pub model: String,
    /// A string (one user message) or a list of input items.
    pub input: Input,
    /// A system message placed before the conversation (not carried to follow-ups).
    pub instructions: Option<String>,
    /// Tokens to generate at most.
    pub max_output_tokens: Option<u32>,
    /// Sampling temperature, 0..=2.
    pub temperature: Option<f32>,
    /// Nucleus sampling, (0, 1].
    pub top_p: Option<f32>,
    /// Stream as server-sent events.
    pub stream: Option<bool>,
    /// Keep the response for `previous_response_id` and GET (default true).
    pub store: Option<bool>,
    /// The stored response this one continues.
    pub previous_response_id: Option<String>,
    /// Up to 16 string pairs, echoed back.
    pub metadata: Option<Map<String, Value>>,
    /// End-user id, echoed back.
    pub user: Option<String>,
}

/// `input`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// One user message.
    Text(String),
    /// Input items.
    Items(Vec<InputItem>),
}

/// One input item: a message (`type` "message" or absent).
#[derive(Debug, Clone, Deserialize)]
pub struct InputItem {
    /// "message" (or absent, the easy form).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// user, system, developer or assistant.
    pub role: Option<String>,
    /// A string or a list of text parts.
    pub content: Option<Value>,
}

/// One turn of a conversation, as stored between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// system, developer, user or assistant.
    pub role: String,
    /// Its text.
    pub text: String,
}

impl Turn {
    /// The chat message of this turn.
    pub fn message(&self) -> ChatMessage {
        ChatMessage {
            role: self.role.clone(),
            content: Some(Content::Text(self.text.clone())),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Most `metadata` pairs, as OpenAI allows.
const MAX_METADATA: usize = 16;

/// Refuses fields this server does not serve (hosted tools, background, images...), naming
/// them all, and reads the rest.
pub fn read(body: Map<String, Value>) -> Result<ResponsesRequest, ApiError> {
    let refused: Vec<&str> = body
        .iter()
        .filter(|(k, v)| !SERVED.contains(&k.as_str()) && !v.is_null() && !is_default(k, v))
        .map(|(k, _)| k.as_str())
        .collect();
    if let Some(first) = refused.first() {
        return Err(ApiError::invalid(
            first,
            format!(
                "unsupported field(s) {}: this server's /v1/responses takes only {}",
                refused.join(", "),
                SERVED.join(", ")
            ),
        ));
    }
    let req: ResponsesRequest = serde_json::from_value(Value::Object(body)).map_err(|e| {
        ApiError::bad_request(format!("request body has a wrong or missing field: {e}"))
    })?;
    if let Some(m) = &req.metadata {
        if m.len() > MAX_METADATA {
            return Err(ApiError::invalid(
                "metadata",
                format!("metadata has {} keys; at most {MAX_METADATA}", m.len()),
            ));
        }
        if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
            return Err(ApiError::invalid(
                "metadata",
                format!("metadata value of {k:?} is not a string"),
            ));
        }
    }
    Ok(req)
}

/// The text of an item's content: a string, or `input_text` / `output_text` parts joined.
fn content_text(content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
                if !matches!(kind, "input_text" | "output_text" | "text") {
                    return Err(ApiError::invalid(
                        "input",
                        format!(
                            "content part of type {kind:?} is not supported; send input_text parts"
                        ),
                    ));
                }
                text.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default());
            }
            Ok(text)
        }
        Some(other) => Err(ApiError::invalid(
            "input",
            format!("content must be a string or a list of parts, not {other}"),
        )),
    }
}

/// The turns of `input`.
pub fn input_turns(input: &Input) -> Result<Vec<Turn>, ApiError> {
    let items = match input {
        Input::Text(t) => {
            return Ok(vec![Turn {
                role: "user".into(),
                text: t.clone(),
            }]);
        }
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "input is an empty list; send at least one message",
        ));
    }
    items
        .iter()
        .map(|item| {
            if let Some(kind) = item.kind.as_deref().filter(|k| *k != "message") {
                return Err(ApiError::invalid(
                    "input",
                    format!("input item of type {kind:?} is not supported; send messages"),
                ));
            }
            let role = item.role.as_deref().unwrap_or_default();
            if !matches!(role, "user" | "system" | "developer" | "assistant") {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input message role {role:?} is not supported; use user, system, developer or assistant"
                    ),
                ));
            }
            Ok(Turn {
                role: role.to_owned(),
                text: content_text(item.content.as_ref())?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = read(body(json!({
            "model": "m", "input": "hi", "background": true,
            "tools": [{"type": "web_search"}], "tool_choice": "auto",
        })))
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("background, tools"), "{}", e.message);
    }

    #[test]
    fn fields_at_their_defaults_are_accepted() {
        let r = read(body(json!({
            "model": "m", "input": "hi", "tools": [], "truncation": "disabled",
            "text": {"format": {"type": "text"}},
        })));
        assert!(r.is_ok());
    }

    #[test]
    fn items_become_turns_and_images_are_refused() {
        let input: Input = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        ]))
        .unwrap();
        let turns = input_turns(&input).unwrap();
        assert_eq!(
            turns[1],
            Turn {
                role: "user".into(),
                text: "ab".into()
            }
        );
        let image: Input = serde_json::from_value(json!([
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
        ]))
        .unwrap();
        assert!(
            input_turns(&image)
                .unwrap_err()
                .message
                .contains("input_image")
        );
    }
}
