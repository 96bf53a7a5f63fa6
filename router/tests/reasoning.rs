//! `--reasoning_parser`: a scripted worker streams a reply with a thinking part; the router
//! splits it into `reasoning_content` and `content` and counts the reasoning tokens, streamed
//! and not.

mod common;

use axum::http::StatusCode;
use llmapi_router::reasoning::ReasoningParser;
use llmapi_router::testing::Script;
use serde_json::{Value, json};

/// The byte-level test tokenizer makes every byte one token.
const REPLY: &str = "<think>abc</think>xy";

fn body(stream: bool) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": REPLY.len(),
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

async fn harness(parser: Option<ReasoningParser>) -> common::Harness {
    let script = Script {
        reply: REPLY.bytes().map(u32::from).collect(),
        ..Script::default()
    };
    common::start(vec![script], |c| c.reasoning_parser = parser).await
}

/// Reasoning tokens as the byte tokenizer counts them for deepseek-r1: the deltas while the
/// thinking part is open, i.e. `<think>abc` and the 7 bytes of `</think` before the byte that
/// completes the tag (in the real vocabularies each tag is one token).
const REASONING_TOKENS: u64 = 7 + 3 + 7;
/// The same for qwen3, which counts from the byte completing `<think>` on.
const QWEN3_REASONING_TOKENS: u64 = 1 + 3 + 7;

#[tokio::test]
async fn a_complete_chat_response_has_reasoning_content_and_its_token_count() {
    let h = harness(Some(ReasoningParser::DeepseekR1)).await;
    let (status, v) = h.post_to("/v1/chat/completions", body(false)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "abc", "{v}");
    assert_eq!(message["content"], "xy", "{v}");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"], REASONING_TOKENS,
        "{v}"
    );
}

#[tokio::test]
async fn a_streamed_chat_response_sends_reasoning_deltas_then_content_deltas() {
    let h = harness(Some(ReasoningParser::Qwen3)).await;
    let resp = h.send_to("/v1/chat/completions", body(true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let events = common::sse_payloads(&String::from_utf8_lossy(&bytes));
    let (mut reasoning, mut content) = (String::new(), String::new());
    for e in &events {
        let delta = &e["choices"][0]["delta"];
        if let Some(r) = delta["reasoning_content"].as_str() {
            assert!(content.is_empty(), "reasoning after content: {events:?}");
            reasoning.push_str(r);
        }
        content.push_str(delta["content"].as_str().unwrap_or_default());
    }
    assert_eq!((reasoning.as_str(), content.as_str()), ("abc", "xy"));
    let usage = events
        .iter()
        .find(|e| !e["usage"].is_null())
        .expect("a usage chunk");
    assert_eq!(
        usage["usage"]["completion_tokens_details"]["reasoning_tokens"],
        QWEN3_REASONING_TOKENS
    );
}

#[tokio::test]
async fn without_the_flag_the_tags_stay_in_the_content() {
    let h = harness(None).await;
    let (status, v) = h.post_to("/v1/chat/completions", body(false)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], REPLY, "{v}");
    assert!(
        v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
    assert!(v["usage"].get("completion_tokens_details").is_none());
}
