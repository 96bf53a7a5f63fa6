//! The tool fields of a chat request, validated into what the template, the worker and the
//! response need (`ToolPlan`), and the messages turned into template turns with earlier
//! calls' arguments as objects, as vLLM hands them to chat templates.

use llmapi_proto::v1::guided_decoding::Constraint;
use llmapi_proto::v1::{GuidedDecoding, SamplingParams};
use serde_json::{Map, Value, json};

use super::{ToolMode, ToolParser};
use crate::codec::ChatTurn;
use crate::error::ApiError;
use crate::openai::ChatMessage;

/// `tools`, `tool_choice` and `parallel_tool_calls` as the body carries them.
#[derive(Debug, Clone, Default)]
pub struct ToolFields {
    /// `tools`: `{"type": "function", "function": {"name", "description", "parameters"}}`.
    pub tools: Option<Vec<Value>>,
    /// `tool_choice`.
    pub tool_choice: Option<ToolChoice>,
    /// `parallel_tool_calls` (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// What a request's tool fields ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolPlan {
    /// The tools, for the chat template's `tools` (None: no tools).
    pub template_tools: Option<Vec<Value>>,
    /// How the output carries calls (None: plain text).
    pub mode: Option<ToolMode>,
    /// The JSON schema (as text) the output must follow: a named function's parameters, or
    /// the call array of `"required"`.
    pub schema: Option<String>,
}

impl ToolPlan {
    /// Puts the schema into the worker's sampling parameters.
    pub fn apply(&self, sampling: &mut SamplingParams) {
        if let Some(schema) = &self.schema {
            sampling.guided = Some(GuidedDecoding {
                constraint: Some(Constraint::JsonSchema(schema.clone())),
            });
        }
    }
}

/// Longest function name OpenAI accepts.
const MAX_NAME: usize = 64;

/// `tool_choice`: which calls the output must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// `"none"`: no calls; the output is text.
    None,
    /// `"auto"`: the model chooses; calls are read by `--tool_parser`.
    Auto,
    /// `"required"`: at least one call.
    Required,
    /// `{"type": "function", "function": {"name": ...}}`: a call of this function.
    Named(String),
}

impl<'de> serde::Deserialize<'de> for ToolChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        choice_of(&v).map_err(serde::de::Error::custom)
    }
}

/// Validates the tool fields: a 400 names the bad entry (`tools[1].function.name`, ...).
/// `"auto"` (the default with tools) needs `parser`, as vLLM's needs its tool-call parser.
pub fn plan(fields: &ToolFields, parser: Option<ToolParser>) -> Result<ToolPlan, ApiError> {
    let tools = fields.tools.as_deref().unwrap_or_default();
    let mut functions: Vec<(String, Value)> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let (name, parameters) = check_tool(i, tool)?;
        if functions.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.name"),
                format!(
                    "tools[{i}].function.name {name:?} names an earlier tool too; give each function its own name"
                ),
            ));
        }
        functions.push((name, parameters));
    }
    let choice = match &fields.tool_choice {
        None if functions.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(c) => c.clone(),
    };
    if functions.is_empty() && choice != ToolChoice::None {
        return Err(ApiError::invalid(
            "tool_choice",
            "tool_choice asks for a tool call but the request has no tools; send `tools` or remove tool_choice",
        ));
    }
    let parallel = fields.parallel_tool_calls.unwrap_or(true);
    let (mode, schema) = match choice {
        ToolChoice::None => (None, None),
        ToolChoice::Auto => {
            let parser = parser.ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "tool_choice \"auto\" (the default when tools are given) needs the server started with \
                     --tool_parser (hermes, llama3_json, mistral or pythonic); send tool_choice \"required\", \
                     a named function or \"none\" instead",
                )
            })?;
            let mode = ToolMode::Auto {
                format: parser.format(),
                parallel,
            };
            (Some(mode), None)
        }
        ToolChoice::Required => (
            Some(ToolMode::Required { parallel }),
            Some(required_schema(&functions, parallel)),
        ),
        ToolChoice::Named(name) => {
            let Some((_, parameters)) = functions.iter().find(|(n, _)| *n == name) else {
                let known: Vec<&str> = functions.iter().map(|(n, _)| n.as_str()).collect();
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "tool_choice names function {name:?}, which is not in tools ({}); name one of them",
                        known.join(", ")
                    ),
                ));
            };
            (Some(ToolMode::Named(name)), Some(parameters.clone()))
        }
    };
    Ok(ToolPlan {
        template_tools: (!tools.is_empty()).then(|| tools.to_vec()),
        mode,
        schema: schema.map(|s| s.to_string()),
    })
}

fn choice_of(v: &Value) -> Result<ToolChoice, &'static str> {
    let bad = || "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}";
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(bad()),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Named(n.to_owned()))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A tool's function name and parameters schema (an empty object schema when absent).
fn check_tool(i: usize, tool: &Value) -> Result<(String, Value), ApiError> {
    let at = |field: &str| format!("tools[{i}]{field}");
    let bad = |field: &str, msg: String| Err(ApiError::invalid(&at(field), msg));
    let Some(tool) = tool.as_object() else {
        return bad(
            "",
            format!(
                "tools[{i}] is not an object; send {{\"type\": \"function\", \"function\": {{...}}}}"
            ),
        );
    };
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        other => {
            return bad(
                ".type",
                format!("tools[{i}].type is {other:?}; only \"function\" tools are supported"),
            );
        }
    }
    let Some(function) = tool.get("function").and_then(Value::as_object) else {
        return bad(
            ".function",
            format!(
                "tools[{i}].function is missing or not an object; send {{\"name\": ..., \"parameters\": {{...}}}}"
            ),
        );
    };
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name_ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok {
        return bad(
            ".function.name",
            format!(
                "tools[{i}].function.name is {name:?}; use 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"
            ),
        );
    }
    if !matches!(
        function.get("description"),
        None | Some(Value::Null | Value::String(_))
    ) {
        return bad(
            ".function.description",
            format!("tools[{i}].function.description must be a string"),
        );
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(p)) => {
            check_schema(p).map_err(|msg| {
                ApiError::invalid(
                    &at(".function.parameters"),
                    format!("tools[{i}].function.parameters is not a usable JSON schema: {msg}"),
                )
            })?;
            Value::Object(p.clone())
        }
        Some(_) => {
            return bad(
                ".function.parameters",
                format!("tools[{i}].function.parameters must be a JSON schema object"),
            );
        }
    };
    Ok((name.to_owned(), parameters))
}

/// The shape checks of a parameters schema that need no schema compiler: `type` a string or
/// a list of them, `properties` an object of schemas, `required` a list of strings.
fn check_schema(schema: &Map<String, Value>) -> Result<(), String> {
    match schema.get("type") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(t) => return Err(format!("`type` is {t}; use a type name or a list of them")),
    }
    match schema.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            if let Some((k, _)) = props
                .iter()
                .find(|(_, v)| !v.is_object() && !v.is_boolean())
            {
                return Err(format!("properties.{k} is not a schema object"));
            }
        }
        Some(_) => return Err("`properties` is not an object".into()),
    }
    match schema.get("required") {
        None => Ok(()),
        Some(Value::Array(r)) if r.iter().all(Value::is_string) => Ok(()),
        Some(_) => Err("`required` is not a list of property names".into()),
    }
}

/// The schema of `"required"`'s output: a list of at least one call (at most one without
/// parallel calls), each one of the tools with its parameters.
fn required_schema(functions: &[(String, Value)], parallel: bool) -> Value {
    let calls: Vec<Value> = functions
        .iter()
        .map(|(name, parameters)| {
            json!({
                "type": "object",
                "properties": {"name": {"type": "string", "const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    schema
}

/// The template turns of `messages`: tool results keep their `tool_call_id`; an assistant's
/// earlier `tool_calls` reach the template with their arguments parsed into objects.
pub fn chat_turns(messages: &[ChatMessage]) -> Result<Vec<ChatTurn>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let tool_calls = match &m.tool_calls {
                None => None,
                Some(calls) => Some(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(j, c)| template_call(i, j, c))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Ok(ChatTurn {
                role: m.role.clone(),
                content: m.text()?,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// One earlier call, `{"id", "type", "function": {"name", "arguments": object}}`.
fn template_call(i: usize, j: usize, call: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}].tool_calls[{j}]");
    let function = call.get("function").and_then(Value::as_object);
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
    let (Some(function), Some(name)) = (function, name) else {
        return Err(ApiError::invalid(
            &param,
            format!("{param} needs a function with a name and arguments"),
        ));
    };
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
            ApiError::invalid(
                &param,
                format!("{param}.function.arguments is not JSON ({e}); send the arguments the model produced"),
            )
        })?,
        Some(v) => v.clone(),
    };
    Ok(json!({
        "id": call.get("id").cloned().unwrap_or(Value::Null),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }))
}

#[cfg(test)]
mod tests;
