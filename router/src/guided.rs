//! Structured-output fields of both endpoints: OpenAI's `response_format` (`json_object`,
//! `json_schema`) and vLLM's / trtllm-serve's `guided_json`, `guided_regex`,
//! `guided_choice`, `guided_grammar` (Lark) and `structural_tag`.
//!
//! At most one may ask for a constraint (a 400 naming both otherwise). The value's shape is
//! checked while the body is read (`read`); the constraint is compiled against the model's
//! tokenizer before any worker sees it (`Validator::check`), so a schema, regex or grammar
//! that does not compile is a 400 quoting the compiler, which says where it is wrong. The
//! workers enforce it (llguidance masks in the sampler). Not for: applying masks.

use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use crate::codec::TextCodec;
use crate::error::ApiError;
use llmapi_common::guided::{Constraint, GuidedCompiler};
use llmapi_proto::v1::{GuidedChoice, GuidedDecoding, guided_decoding};

/// The request's constraint and the field that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guided {
    /// The field (`param` of any 400 about it).
    pub param: &'static str,
    /// What the output must follow.
    pub constraint: Constraint,
}

impl Guided {
    /// The worker's form of the constraint.
    pub fn to_proto(&self) -> GuidedDecoding {
        use guided_decoding::Constraint as C;
        let c = match &self.constraint {
            Constraint::JsonSchema(s) => C::JsonSchema(s.clone()),
            Constraint::JsonObject => C::JsonObject(true),
            Constraint::Regex(r) => C::Regex(r.clone()),
            Constraint::Choice(c) => C::Choice(GuidedChoice { choices: c.clone() }),
            Constraint::Lark(l) => C::LarkGrammar(l.clone()),
            Constraint::StructuralTag(t) => C::StructuralTag(t.clone()),
        };
        GuidedDecoding {
            constraint: Some(c),
        }
    }
}

/// The fields as the body holds them (every other key skipped).
#[derive(Debug, Default, Deserialize)]
struct Fields {
    response_format: Option<Value>,
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
    structural_tag: Option<Value>,
}

/// Reads the structured-output fields of a request body: the constraint, None when no field
/// asks for one, or a 400 for a value of the wrong shape or two fields at once.
pub fn read(body: &[u8]) -> Result<Option<Guided>, ApiError> {
    let f: Fields = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "response_format",
            format!("a structured-output field has the wrong type: {e}"),
        )
    })?;
    let mut found: Vec<Guided> = Vec::new();
    let mut add = |param: &'static str, constraint: Constraint| {
        found.push(Guided { param, constraint });
    };
    if let Some(rf) = &f.response_format
        && let Some(c) = response_format(rf)?
    {
        add("response_format", c);
    }
    if let Some(v) = &f.guided_json {
        add(
            "guided_json",
            Constraint::JsonSchema(json_text(v, "guided_json")?),
        );
    }
    if let Some(r) = f.guided_regex {
        add("guided_regex", Constraint::Regex(r));
    }
    if let Some(c) = f.guided_choice {
        if c.is_empty() {
            return Err(ApiError::invalid(
                "guided_choice",
                "guided_choice is an empty list; give at least one choice",
            ));
        }
        add("guided_choice", Constraint::Choice(c));
    }
    if let Some(g) = f.guided_grammar {
        add("guided_grammar", Constraint::Lark(g));
    }
    if let Some(v) = &f.structural_tag {
        add(
            "structural_tag",
            Constraint::StructuralTag(json_text(v, "structural_tag")?),
        );
    }
    if let [first, second, ..] = &found[..] {
        return Err(ApiError::invalid(
            second.param,
            format!(
                "both `{}` and `{}` ask for structured output; send only one of them",
                first.param, second.param
            ),
        ));
    }
    Ok(found.pop())
}

/// `response_format`: `{"type": "text"}` asks for nothing, `json_object` for any JSON
/// object, `json_schema` for its `json_schema.schema` (`strict` or not: always enforced).
fn response_format(v: &Value) -> Result<Option<Constraint>, ApiError> {
    let bad = |m: &str| ApiError::invalid("response_format", m.to_owned());
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("response_format must be an object with a `type`: \"text\", \"json_object\" or \"json_schema\""))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| {
                    bad("response_format of type json_schema needs `json_schema.schema`, the JSON Schema of the output")
                })?;
            Ok(Some(Constraint::JsonSchema(json_text(
                schema,
                "response_format",
            )?)))
        }
        other => Err(ApiError::invalid(
            "response_format",
            format!(
                "response_format type {other:?} is not one of \"text\", \"json_object\", \"json_schema\""
            ),
        )),
    }
}

/// A JSON value sent as an object or as JSON text: its text, checked to be JSON.
fn json_text(v: &Value, param: &'static str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str::<Value>(s)
            .map(|_| s.clone())
            .map_err(|e| ApiError::invalid(param, format!("{param} is not valid JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(ApiError::invalid(
            param,
            format!("{param} must be a JSON object (or its JSON text)"),
        )),
    }
}

/// Compiles requests' constraints against the model's tokenizer (built on first use).
#[derive(Default)]
pub struct Validator {
    compiler: OnceLock<Option<Arc<GuidedCompiler>>>,
}

impl Validator {
    /// A 400 naming the field when `guided` does not compile (llguidance's message says
    /// where). Without a tokenizer (a test codec) only the shape checks of `read` apply.
    /// Compiling can take milliseconds: call it on a blocking thread.
    pub fn check(&self, codec: &dyn TextCodec, guided: &Guided) -> Result<(), ApiError> {
        let compiler = self.compiler.get_or_init(|| {
            let tok = codec.tokenizer()?;
            let eos = tok.eos().map_or(0, |e| e.1);
            GuidedCompiler::new(tok, tok.vocab_size(), &[eos])
                .map_err(|e| tracing::warn!(error = %e, "structured outputs are not validated in the router"))
                .ok()
                .map(Arc::new)
        });
        match compiler {
            Some(c) => c
                .check(&guided.constraint)
                .map_err(|e| ApiError::invalid(guided.param, e.to_string())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_json(v: Value) -> Result<Option<Guided>, ApiError> {
        read(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn each_field_becomes_its_constraint() {
        let schema = serde_json::json!({"type": "object"});
        let cases = [
            (
                serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Constraint::JsonSchema(schema.to_string()),
            ),
            (
                serde_json::json!({"response_format": {"type": "json_object"}}),
                Constraint::JsonObject,
            ),
            (
                serde_json::json!({"guided_json": schema.to_string()}),
                Constraint::JsonSchema(schema.to_string()),
            ),
            (
                serde_json::json!({"guided_regex": "a+"}),
                Constraint::Regex("a+".into()),
            ),
            (
                serde_json::json!({"guided_choice": ["a", "b"]}),
                Constraint::Choice(vec!["a".into(), "b".into()]),
            ),
            (
                serde_json::json!({"guided_grammar": "start: \"a\""}),
                Constraint::Lark("start: \"a\"".into()),
            ),
        ];
        for (body, want) in cases {
            let got = read_json(body.clone()).unwrap().unwrap();
            assert_eq!(got.constraint, want, "{body}");
        }
        assert_eq!(
            read_json(serde_json::json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
    }

    #[test]
    fn two_fields_or_a_bad_shape_are_a_400_naming_the_field() {
        let e = read_json(
            serde_json::json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guided_regex"));
        assert!(e.message.contains("response_format"), "{}", e.message);
        let e = read_json(serde_json::json!({"guided_json": "{not json"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guided_json"));
        assert!(e.message.contains("line 1 column"), "{}", e.message);
        let e =
            read_json(serde_json::json!({"response_format": {"type": "json_schema"}})).unwrap_err();
        assert!(e.message.contains("json_schema.schema"), "{}", e.message);
        assert!(read_json(serde_json::json!({"guided_choice": []})).is_err());
    }
}
