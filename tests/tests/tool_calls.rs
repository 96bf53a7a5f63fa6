//! Tool calling on the built-in demo model through `llmapi-launch serve --tool_parser hermes`:
//! the demo chat template renders the tools (the prompt grows by them), and the response has
//! OpenAI's shape for auto, named and required tool choices, complete and streamed. The demo
//! model's random weights write valid arguments only because guided decoding holds them to
//! the function's schema (its string bounded so that it ends within max_tokens).

use std::process::Command;

use llmapi_tests::{bin, demo_model, free_port, post, serve};
use serde_json::{Value, json};

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": false},
    }})
}

fn chat(extra: Value) -> Value {
    let mut b = json!({
        "model": "demo",
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "max_tokens": 16,
        "temperature": 0,
    });
    b.as_object_mut()
        .expect("object")
        .extend(extra.as_object().expect("object").clone());
    b
}

fn named() -> Value {
    json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
}

/// The single call of a complete response, checked for OpenAI's shape.
fn only_call(v: &Value) -> &Value {
    let calls = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"));
    assert_eq!(calls.len(), 1, "{v}");
    let call = &calls[0];
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{v}"
    );
    assert_eq!(call["type"], "function", "{v}");
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    assert!(call["function"]["arguments"].is_string(), "{v}");
    call
}

#[test]
fn tool_requests_get_openai_shaped_answers_on_the_demo_model() {
    let port = free_port();
    let _server = serve(demo_model(), port, &["--tool_parser", "hermes"], &[]);
    let path = "/v1/chat/completions";

    // auto: the tools are in the prompt; the random model writes text, not calls.
    let plain = post(port, path, &chat(json!({}))).json();
    let auto = post(port, path, &chat(json!({"tools": [weather()]})));
    assert_eq!(auto.status, 200, "{}", auto.body);
    let auto = auto.json();
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!(
        tokens(&auto) > tokens(&plain) + 20,
        "tools in the prompt: {auto} vs {plain}"
    );
    let message = &auto["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let finish = auto["choices"][0]["finish_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(["stop", "length", "tool_calls"].contains(&finish), "{auto}");
    assert_eq!(
        message.get("tool_calls").is_some(),
        finish == "tool_calls",
        "{auto}"
    );

    // named: one call of that function, whatever the model wrote as arguments.
    let r = post(port, path, &chat(named()));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    only_call(&v);
    assert_ne!(
        v["choices"][0]["finish_reason"], "tool_calls",
        "a forced call keeps its reason"
    );

    // streamed named: the call's first delta names it, then argument fragments follow.
    let mut body = chat(named());
    body["stream"] = json!(true);
    let events = post(port, path, &body).sse();
    let deltas: Vec<&Value> = events
        .iter()
        .flat_map(|e| {
            e["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect();
    let first = deltas
        .first()
        .unwrap_or_else(|| panic!("no tool-call deltas: {events:?}"));
    assert_eq!(first["index"], 0);
    assert_eq!(first["function"]["name"], "get_weather");
    assert_eq!(first["function"]["arguments"], "");
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    assert!(
        deltas[1..]
            .iter()
            .all(|d| d.get("id").is_none() && d["index"] == 0)
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")));

    // required: answered (calls only when the worker holds the output to the schema).
    let r = post(
        port,
        path,
        &chat(json!({"tools": [weather()], "tool_choice": "required"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // A named tool that is not in tools is the client's error.
    let mut bad = chat(named());
    bad["tool_choice"]["function"]["name"] = json!("get_time");
    let r = post(port, path, &bad);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "tool_choice");
}

#[test]
fn forced_tool_calls_have_arguments_valid_against_the_schema() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let path = "/v1/chat/completions";
    let valid = |arguments: &str| {
        let args: Value = serde_json::from_str(arguments)
            .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {arguments}"));
        let object = args.as_object().expect("an object");
        assert!(object["city"].is_string(), "{args}");
        assert!(object.keys().all(|k| k == "city"), "{args}");
    };
    let mut body = chat(named());
    body["max_tokens"] = json!(64);
    let v = post(port, path, &body).json();
    valid(
        only_call(&v)["function"]["arguments"]
            .as_str()
            .unwrap_or_default(),
    );
    body["tool_choice"] = json!("required");
    let v = post(port, path, &body).json();
    valid(
        only_call(&v)["function"]["arguments"]
            .as_str()
            .unwrap_or_default(),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
}

#[test]
fn an_unknown_tool_parser_is_a_cli_error_listing_the_known_ones() {
    let out = Command::new(bin("llmapi-launch"))
        .args(["serve", "/nonexistent-model", "--tool_parser", "qwen"])
        .output()
        .expect("run llmapi-launch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["hermes", "llama3_json", "mistral", "pythonic"] {
        assert!(err.contains(name), "{name}: {err}");
    }
}
