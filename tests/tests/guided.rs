//! Structured outputs through the real binaries (`llmapi-launch serve` on the demo model,
//! whose free output is not JSON): a JSON schema, `json_object`, a regex and a choice shape
//! every generated token, greedy and sampled, streamed or not; an invalid schema, regex or
//! grammar is a 400 that says where it is wrong, before any worker sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use llmapi_tests::{demo_model, free_port, post, serve};
use serde_json::{Value, json};

const COLORS: [&str; 3] = ["red", "green", "blue"];

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "color": {"enum": COLORS},
            "count": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["name", "color", "count"],
        "additionalProperties": false,
    })
}

/// Checks a document against `schema()`: every required field, the enum, the integer.
fn assert_valid(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(o.len(), 3, "{text}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 8),
        "{text}"
    );
    assert!(
        COLORS.contains(&o["color"].as_str().unwrap_or("")),
        "{text}"
    );
    assert!(o["count"].as_u64().is_some_and(|n| n <= 999), "{text}");
}

/// A bias of +8 on the demo tokenizer's `"` and `}` tokens.
fn ends_bias() -> Value {
    let tok = llmapi_common::tokenizer::Tokenizer::from_dir(demo_model()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap().to_string();
    json!({ id("\""): 8, id("}"): 8 })
}

fn chat(port: u16, extra: Value) -> (u16, Value) {
    let mut body = json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64, "seed": 7});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let r = post(port, "/v1/chat/completions", &body);
    (r.status, r.json())
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn outputs_follow_their_schema_regex_or_choice() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    // Free output of the demo model is not a JSON document: the constraint is what shapes it.
    let (status, free) = chat(port, json!({"temperature": 0}));
    assert_eq!(status, 200, "{free}");
    assert!(
        serde_json::from_str::<Value>(&content(&free)).is_err(),
        "{free}"
    );

    let format = json!({"type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema(), "strict": true}});
    for temperature in [0.0, 1.0] {
        let (status, v) = chat(
            port,
            json!({"temperature": temperature, "response_format": format}),
        );
        assert_eq!(status, 200, "{v}");
        assert_valid(&content(&v));
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

        // Any object: the demo model's random weights never close a free string on their
        // own, so a bias towards `"` and `}` lets the document end within max_tokens; the
        // grammar still decides which tokens are valid.
        let (status, v) = chat(
            port,
            json!({"temperature": temperature, "response_format": {"type": "json_object"},
                "logit_bias": ends_bias()}),
        );
        assert_eq!(status, 200, "{v}");
        let doc: Value = serde_json::from_str(&content(&v))
            .unwrap_or_else(|e| panic!("json_object at {temperature}: {e}: {v}"));
        assert!(doc.is_object(), "{v}");

        let (status, v) = chat(
            port,
            json!({"temperature": temperature, "guided_choice": ["alpha", "beta gamma"]}),
        );
        assert_eq!(status, 200, "{v}");
        assert!(
            ["alpha", "beta gamma"].contains(&content(&v).as_str()),
            "{v}"
        );

        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Date:", "max_tokens": 32,
                "temperature": temperature, "seed": 1,
                "guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let text = r.json()["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let b = text.as_bytes();
        assert!(
            b.len() == 10
                && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 {
                    *c == b'-'
                } else {
                    c.is_ascii_digit()
                }),
            "regex output {text:?}"
        );
    }

    // Streamed: the deltas join into a valid document (vLLM's `guided_json`, as text).
    let r = post(
        port,
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 64, "temperature": 1.0, "seed": 5, "stream": true,
            "guided_json": schema().to_string()}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let text: String = r
        .sse()
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_valid(&text);
}

#[test]
fn a_constraint_that_does_not_compile_is_a_400_saying_where() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let cases = [
        (
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object",
                    "properties": {"a": {"type": "strin"}}}}}}),
            "response_format",
            "strin",
        ),
        (json!({"guided_regex": "[0-9"}), "guided_regex", "unclosed"),
        (
            json!({"guided_grammar": "start: greeting\n"}),
            "guided_grammar",
            "greeting",
        ),
        (
            json!({"guided_json": {"type": "object"}, "guided_regex": "a"}),
            "guided_regex",
            "guided_json",
        ),
    ];
    for (extra, param, says) in cases {
        let (status, v) = chat(port, extra.clone());
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{extra}: {message}");
    }
}
