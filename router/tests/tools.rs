//! Tool calling through the router: a scripted worker replies with tool calls in a model's
//! format; the router sends the tools to the chat template, reads the calls back into
//! `message.tool_calls` (auto, with `--tool_parser`), streamed as OpenAI's deltas and not,
//! and for `required` / a named function sends the worker the JSON schema to hold the output
//! to and builds the calls from the JSON it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use axum::http::StatusCode;
use llmapi_proto::v1::guided_decoding::Constraint;
use llmapi_router::testing::Script;
use llmapi_router::tools::ToolParser;
use serde_json::{Value, json};

/// An id the byte-level test tokenizer decodes to nothing: the reply's end-of-sequence.
const EOS: u32 = 999;

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

fn body(stream: bool, extra: Value) -> Value {
    let mut b = json!({
        "model": "demo",
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
        "max_tokens": 200,
        "stream": stream,
        "tools": [weather_tool()],
    });
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

/// A router with `parser` over one worker that replies `reply` then EOS.
async fn harness(reply: &str, parser: Option<ToolParser>) -> common::Harness {
    let mut ids: Vec<u32> = reply.bytes().map(u32::from).collect();
    ids.push(EOS);
    let script = Script {
        reply: ids,
        eos: Some(EOS),
        // The byte tokenizer makes the tools in the prompt hundreds of tokens.
        max_seq_len: 4096,
        ..Script::default()
    };
    common::start(vec![script], |c| c.tool_parser = parser).await
}

/// The prompt the worker got, as text.
fn prompt(h: &common::Harness) -> String {
    let ids = &h.workers[0].worker.requests()[0].prompt_token_ids;
    String::from_utf8(ids.iter().map(|&i| i as u8).collect()).unwrap()
}

const HERMES_REPLY: &str = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";

#[tokio::test]
async fn auto_calls_are_read_into_tool_calls_with_the_tools_in_the_prompt() {
    let h = harness(HERMES_REPLY, Some(ToolParser::Hermes)).await;
    let (status, v) = h
        .post_to("/v1/chat/completions", body(false, json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], "Let me check.\n", "{v}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("tool_calls");
    assert_eq!(calls.len(), 1, "{v}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"), "{v}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    let p = prompt(&h);
    assert!(
        p.starts_with("tools: [{") && p.contains("\"get_weather\""),
        "{p}"
    );
    // Without calls in the output the answer is plain content.
    let h = harness("It is sunny.", Some(ToolParser::Hermes)).await;
    let (_, v) = h
        .post_to("/v1/chat/completions", body(false, json!({})))
        .await;
    assert_eq!(v["choices"][0]["message"]["content"], "It is sunny.", "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
}

/// Reads a stream: the content, the calls put together from their deltas as the openai SDK
/// does (checking each call's first delta has id, type, name and empty arguments), and the
/// finish reason.
async fn read_stream(h: &common::Harness, body: Value) -> (String, Vec<(String, String)>, String) {
    let resp = h.send_to("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let events = common::sse_payloads(&String::from_utf8_lossy(&bytes));
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = String::new();
    for e in &events {
        let choice = &e["choices"][0];
        let delta = &choice["delta"];
        content.push_str(delta["content"].as_str().unwrap_or_default());
        for d in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = d["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert!(d["id"].as_str().unwrap().starts_with("call_"), "{e}");
                assert_eq!(d["type"], "function", "{e}");
                assert_eq!(d["function"]["arguments"], "", "{e}");
                calls.push((
                    d["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            } else {
                assert!(d.get("id").is_none(), "{e}");
                calls[index]
                    .1
                    .push_str(d["function"]["arguments"].as_str().unwrap());
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (content, calls, finish)
}

#[tokio::test]
async fn streamed_auto_calls_arrive_as_openai_deltas() {
    let h = harness(HERMES_REPLY, Some(ToolParser::Hermes)).await;
    let (content, calls, finish) = read_stream(&h, body(true, json!({}))).await;
    assert_eq!(content, "Let me check.\n");
    assert_eq!(
        calls,
        vec![("get_weather".to_owned(), r#"{"city": "Oslo"}"#.to_owned())]
    );
    assert_eq!(finish, "tool_calls");
}

#[tokio::test]
async fn pythonic_calls_are_read_too() {
    let h = harness(
        r#"[get_weather(city="Oslo"), get_weather(city="Bergen")]"#,
        Some(ToolParser::Pythonic),
    )
    .await;
    let (content, calls, finish) = read_stream(&h, body(true, json!({}))).await;
    assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1, r#"{"city":"Bergen"}"#);
    let (_, v) = h
        .post_to(
            "/v1/chat/completions",
            body(false, json!({"parallel_tool_calls": false})),
        )
        .await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(
        calls.len(),
        1,
        "only the first call without parallel calls: {v}"
    );
}

fn guided_schema(h: &common::Harness) -> Value {
    let sampling = h.workers[0].worker.requests()[0].sampling.clone().unwrap();
    match sampling.guided.and_then(|g| g.constraint) {
        Some(Constraint::JsonSchema(s)) => serde_json::from_str(&s).unwrap(),
        other => panic!("no JSON schema sent: {other:?}"),
    }
}

#[tokio::test]
async fn required_sends_the_call_array_schema_and_builds_calls_from_the_json() {
    let reply = r#"[{"name": "get_weather", "parameters": {"city": "Oslo"}}]"#;
    let h = harness(reply, None).await;
    let (status, v) = h
        .post_to(
            "/v1/chat/completions",
            body(false, json!({"tool_choice": "required"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let schema = guided_schema(&h);
    assert_eq!(schema["type"], "array");
    assert_eq!(schema["minItems"], 1);
    assert_eq!(
        schema["items"]["anyOf"][0]["properties"]["name"]["const"],
        "get_weather"
    );
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null, "{v}");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        r#"{"city": "Oslo"}"#
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn a_named_function_gets_its_parameters_schema_and_the_output_as_arguments() {
    let h = harness(r#"{"city": "Oslo"}"#, None).await;
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (status, v) = h
        .post_to("/v1/chat/completions", body(false, named.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(guided_schema(&h), weather_tool()["function"]["parameters"]);
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    assert_eq!(call["function"]["arguments"], r#"{"city": "Oslo"}"#);
    // As OpenAI answers a forced function.
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (content, calls, _) = read_stream(&h, body(true, named)).await;
    assert_eq!(content, "");
    assert_eq!(
        calls,
        vec![("get_weather".to_owned(), r#"{"city": "Oslo"}"#.to_owned())]
    );
}

#[tokio::test]
async fn earlier_calls_and_tool_results_reach_the_template() {
    let h = harness("It is cold.", Some(ToolParser::Hermes)).await;
    let messages = json!([
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]);
    let (status, v) = h
        .post_to(
            "/v1/chat/completions",
            body(false, json!({"messages": messages})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p = prompt(&h);
    assert!(p.contains(r#""arguments":{"city":"Oslo"}"#), "{p}");
    assert!(p.contains("tool: -3 C\n"), "{p}");
}

#[tokio::test]
async fn bad_tool_requests_are_400s_naming_the_field() {
    let h = harness("x", None).await;
    let cases = [
        (json!({}), "tool_choice", "--tool_parser"),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
            "not in tools",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": ""}}], "tool_choice": "required"}),
            "tools[0].function.name",
            "tools[0].function.name",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
                   "tool_choice": "none"}),
            "messages[0].tool_calls[0]",
            "not JSON",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
            "cannot be combined with tool_choice",
        ),
    ];
    for (extra, param, says) in cases {
        let (status, v) = h
            .post_to("/v1/chat/completions", body(false, extra.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{extra}: {message}");
    }
    let (status, v) = h
        .post_to(
            "/v1/chat/completions",
            body(false, json!({"tool_choice": "maybe"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tool_choice must be")
    );
    assert_eq!(
        h.workers[0].worker.requests().len(),
        0,
        "no bad request reached the worker"
    );
}
