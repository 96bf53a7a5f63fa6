//! `/v1/responses` over a scripted worker: the response object, the streamed event order,
//! a follow-up with `previous_response_id` whose prompt holds the first exchange, GET and
//! DELETE of stored responses, 404 for unknown ids, and the store's bound.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llmapi_router::reasoning::ReasoningParser;
use llmapi_router::responses::store::StoreLimits;
use llmapi_router::server::app;
use llmapi_router::testing::Script;
use serde_json::{Value, json};
use tower::ServiceExt;

const EOS: u32 = 999;
const REPLY: &str = "hello";

/// A router over one worker that replies `reply` then EOS, with `tweak`ed configuration.
async fn harness(
    reply: &str,
    tweak: impl FnOnce(&mut llmapi_router::RouterConfig),
) -> common::Harness {
    let mut ids: Vec<u32> = reply.bytes().map(u32::from).collect();
    ids.push(EOS);
    let script = Script {
        reply: ids,
        eos: Some(EOS),
        max_seq_len: 4096,
        ..Script::default()
    };
    common::start(vec![script], tweak).await
}

/// The prompt of the worker's `i`th request, as text (the byte tokenizer).
fn prompt(h: &common::Harness, i: usize) -> String {
    let ids = &h.workers[0].worker.requests()[i].prompt_token_ids;
    String::from_utf8(ids.iter().map(|&i| i as u8).collect()).expect("byte tokens")
}

/// Sends `method` to `path` without a body; the status and the JSON answer.
async fn call(h: &common::Harness, method: &str, path: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let resp = app(h.state.clone()).oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_response_has_openai_s_shape_and_echoes_the_request() {
    let h = harness(REPLY, |_| {}).await;
    let (status, v) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "instructions": "be brief",
                   "metadata": {"k": "v"}, "temperature": 0.5}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["instructions"], "be brief");
    assert_eq!(v["metadata"]["k"], "v");
    assert_eq!(v["temperature"], 0.5);
    let item = &v["output"][0];
    assert_eq!(item["type"], "message");
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["text"], REPLY);
    let usage = &v["usage"];
    assert_eq!(usage["output_tokens"], REPLY.len() + 1, "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );
    // The instructions are the system message placed first.
    assert!(
        prompt(&h, 0).starts_with("system: be brief"),
        "{}",
        prompt(&h, 0)
    );
}

#[tokio::test]
async fn running_out_of_max_output_tokens_is_incomplete() {
    let h = harness(REPLY, |_| {}).await;
    let (status, v) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "max_output_tokens": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["content"][0]["text"], "he");
}

#[tokio::test]
async fn a_stream_sends_the_events_in_openai_s_order() {
    let h = harness(REPLY, |_| {}).await;
    let resp = h
        .send_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let events = common::sse_payloads(&text);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let deltas = kinds
        .iter()
        .filter(|k| **k == "response.output_text.delta")
        .count();
    assert!(deltas >= 1, "{kinds:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(kinds, expected);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{e}");
    }
    // Each event is named by its type, as OpenAI sends them.
    assert!(text.contains("event: response.completed\n"), "{text}");
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, REPLY);
    let done = events.last().unwrap();
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], REPLY);
    let item_id = &done["response"]["output"][0]["id"];
    assert!(
        events[4..4 + deltas]
            .iter()
            .all(|e| e["item_id"] == *item_id && e["output_index"] == 0)
    );
    // A streamed response is stored too.
    let id = done["response"]["id"].as_str().unwrap();
    let (status, got) = call(&h, "GET", &format!("/v1/responses/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["output"][0]["content"][0]["text"], REPLY);
}

#[tokio::test]
async fn previous_response_id_continues_the_conversation() {
    let h = harness(REPLY, |_| {}).await;
    let (_, first) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "first question", "instructions": "only once"}),
        )
        .await;
    let id = first["id"].as_str().unwrap();
    let (status, second) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": [{"role": "user", "content": [{"type": "input_text", "text": "second question"}]}],
                   "previous_response_id": id}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["previous_response_id"], id);
    let p = prompt(&h, 1);
    let expected = format!("user: first question\nassistant: {REPLY}\nuser: second question");
    assert!(p.contains(&expected), "{p}");
    // Instructions do not carry over to a follow-up.
    assert!(!p.contains("only once"), "{p}");
}

#[tokio::test]
async fn unknown_ids_are_404_naming_them_and_delete_forgets() {
    let h = harness(REPLY, |_| {}).await;
    let (status, v) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "previous_response_id": "resp_nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(common::message(&v).contains("resp_nope"), "{v}");
    assert_eq!(v["error"]["param"], "previous_response_id");
    assert_eq!(h.requests(0), 0, "nothing was generated");

    let (_, r) = h
        .post_to("/v1/responses", json!({"model": "demo", "input": "hi"}))
        .await;
    let path = format!("/v1/responses/{}", r["id"].as_str().unwrap());
    assert_eq!(call(&h, "GET", &path).await.0, StatusCode::OK);
    let (status, v) = call(&h, "DELETE", &path).await;
    assert_eq!((status, &v["deleted"]), (StatusCode::OK, &json!(true)));
    assert_eq!(call(&h, "GET", &path).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_store_evicts_past_its_bound_and_store_false_keeps_nothing() {
    let h = harness(REPLY, |c| {
        c.responses_store = StoreLimits {
            max_responses: 2,
            ..StoreLimits::default()
        }
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, r) = h
            .post_to("/v1/responses", json!({"model": "demo", "input": "hi"}))
            .await;
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let (status, v) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "previous_response_id": ids[0]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the oldest was evicted: {v}");
    for id in &ids[1..] {
        assert_eq!(
            call(&h, "GET", &format!("/v1/responses/{id}")).await.0,
            StatusCode::OK
        );
    }
    let (_, r) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "store": false}),
        )
        .await;
    let path = format!("/v1/responses/{}", r["id"].as_str().unwrap());
    assert_eq!(call(&h, "GET", &path).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unsupported_fields_are_a_400_naming_them() {
    let h = harness(REPLY, |_| {}).await;
    let (status, v) = h
        .post_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "tools": [{"type": "web_search"}], "background": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let m = common::message(&v);
    assert!(m.contains("tools") && m.contains("background"), "{m}");
}

#[tokio::test]
async fn with_a_reasoning_parser_thinking_is_a_reasoning_item() {
    let h = harness("<think>abc</think>xy", |c| {
        c.reasoning_parser = Some(ReasoningParser::DeepseekR1)
    })
    .await;
    let (status, v) = h
        .post_to("/v1/responses", json!({"model": "demo", "input": "hi"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["output"][0]["type"], "reasoning");
    assert_eq!(v["output"][0]["content"][0]["text"], "abc");
    assert_eq!(v["output"][1]["content"][0]["text"], "xy");
    assert!(
        v["usage"]["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn the_routes_take_the_api_key() {
    let h = harness(REPLY, |c| {
        c.api_key =
            Some(llmapi_router::auth::Secret::new("API key", "sk-test").expect("a non-empty key"))
    })
    .await;
    let (status, _) = h
        .post_to("/v1/responses", json!({"model": "demo", "input": "hi"}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&h, "GET", "/v1/responses/resp_x").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&h, "DELETE", "/v1/responses/resp_x").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(h.requests(0), 0);
}

#[tokio::test]
async fn a_failure_after_the_first_token_ends_the_stream_with_an_error_event() {
    let mut ids: Vec<u32> = REPLY.bytes().map(u32::from).collect();
    ids.push(EOS);
    let script = Script {
        reply: ids,
        eos: Some(EOS),
        max_seq_len: 4096,
        fails_after_tokens: Some((2, tonic::Code::InvalidArgument)),
        ..Script::default()
    };
    let h = common::start(vec![script], |_| {}).await;
    let resp = h
        .send_to(
            "/v1/responses",
            json!({"model": "demo", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let events = common::sse_payloads(&String::from_utf8_lossy(&bytes));
    let last = events.last().expect("events");
    assert_eq!(last["type"], "error", "{events:?}");
    assert!(last["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(!events.iter().any(|e| e["type"] == "response.completed"));
}
