//! Streamed logprobs ride with their text: a token whose text is held back (here the first
//! byte of a two-byte character) sends its logprobs in the chunk that releases the text, so
//! no chunk carries text without the logprobs of the tokens that made it, or logprobs
//! without text (the openai SDK's reading of `text_offset` depends on it).

mod common;

use axum::http::StatusCode;
use common::{sse_payloads, start};
use llmapi_router::testing::Script;
use serde_json::json;

#[tokio::test]
async fn a_split_character_sends_both_tokens_logprobs_with_its_text() {
    // The doubles' tokens are bytes: "é" is 0xC3 0xA9, one byte per message.
    let script = Script {
        reply: vec![b'a'.into(), 0xC3, 0xA9, b'b'.into()],
        tokens_per_message: 1,
        ..Script::default()
    };
    let h = start(vec![script], |_| {}).await;
    let resp = h
        .send(
            json!({"model": "demo", "prompt": "x", "max_tokens": 4, "stream": true,
                     "logprobs": 1}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let events = sse_payloads(&String::from_utf8_lossy(&bytes));
    let chunks: Vec<(String, usize)> = events
        .iter()
        .filter_map(|e| {
            let c = &e["choices"][0];
            let n = c["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
            Some((c["text"].as_str()?.to_owned(), n))
        })
        .filter(|(t, n)| !t.is_empty() || *n > 0)
        .collect();
    assert_eq!(
        chunks,
        [
            ("a".to_owned(), 1),
            ("é".to_owned(), 2),
            ("b".to_owned(), 1)
        ],
        "{events:?}"
    );
}
