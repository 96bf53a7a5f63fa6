//! Request migration against `ScriptedWorker` doubles: a worker that fails after the first
//! token hands the choice to another, which continues from the tokens already streamed, and
//! the client reads one response (text across a split character, stop strings across the
//! seam, logprobs, usage, finish_reason). Request faults never migrate; `--max_migrations`
//! bounds the moves, and past it (or with no other worker) the stream ends in-band as before.

mod common;

use axum::http::StatusCode;
use common::{Harness, message, sse_payloads, start};
use llmapi_proto::v1::GenerateRequest;
use llmapi_router::testing::Script;
use serde_json::{Value, json};
use tonic::Code;

/// A double whose streams fail with `code` after `n` tokens.
fn fails_after(n: u32, code: Code) -> Script {
    Script {
        fails_after_tokens: Some((n, code)),
        ..Script::default()
    }
}

/// The doubles replay the prompt: what `max_tokens` tokens of `prompt` read as.
fn replayed(prompt: &str, max_tokens: usize) -> String {
    let bytes: Vec<u8> = prompt.bytes().cycle().take(max_tokens).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// 13 bytes; the second and third make one character, split by a failure after 2 tokens.
const PROMPT: &str = "héllo wörld!";
const MAX_TOKENS: usize = 26;

fn body(stream: bool) -> Value {
    json!({"model": "demo", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream,
           "logprobs": 2, "seed": 11, "temperature": 0.5,
           "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
}

/// A streamed response: its events, read to the end.
async fn stream(h: &Harness, body: Value) -> Vec<Value> {
    let resp = h.send(body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    sse_payloads(&String::from_utf8_lossy(&bytes))
}

/// The concatenated text of a stream's choice chunks.
fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect()
}

/// `llmapi_router_migrations_total` of one worker and cause (0 when absent).
fn migrations(metrics: &str, worker: &str, cause: &str) -> u64 {
    let series =
        format!("llmapi_router_migrations_total{{worker=\"{worker}\",cause=\"{cause}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The first `n` token ids of `PROMPT` (the doubles' ids are bytes).
fn ids(n: usize) -> Vec<u32> {
    PROMPT.bytes().take(n).map(u32::from).collect()
}

/// The one request double `i` received.
fn only_request(h: &Harness, i: usize) -> GenerateRequest {
    let r = h.workers[i].worker.requests();
    assert_eq!(r.len(), 1, "worker {i}: {r:?}");
    r[0].clone()
}

#[tokio::test]
async fn a_stream_whose_worker_fails_mid_way_moves_to_another_and_reads_as_one_response() {
    let h = start(
        vec![fails_after(2, Code::Unavailable), Script::default()],
        |_| {},
    )
    .await;
    let events = stream(&h, body(true)).await;
    assert!(
        events.iter().all(|e| e["error"].is_null()),
        "no error: {events:?}"
    );
    assert_eq!(text_of(&events), replayed(PROMPT, MAX_TOKENS), "{events:?}");
    let finishes: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);
    let logprobs: usize = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(logprobs, MAX_TOKENS, "a logprob per token, across the seam");
    let usage = events.iter().find(|e| !e["usage"].is_null());
    let usage = &usage.expect("a usage chunk")["usage"];
    assert_eq!(usage["prompt_tokens"], PROMPT.len(), "{usage}");
    assert_eq!(usage["completion_tokens"], MAX_TOKENS, "{usage}");
    assert_eq!(events.last(), Some(&json!("[DONE]")));

    let first = only_request(&h, 0);
    let resumed = only_request(&h, 1);
    assert_eq!(resumed.request_id, first.request_id);
    assert_eq!(resumed.prompt_token_ids, first.prompt_token_ids);
    assert_eq!(resumed.generated_token_ids, ids(2));
    assert_eq!(resumed.stopping, first.stopping, "the same stop conditions");
    let (s0, s1) = (
        first.sampling.unwrap_or_default(),
        resumed.sampling.unwrap_or_default(),
    );
    assert_eq!((s1.seed, s1.temperature), (Some(11), 0.5));
    assert_eq!(s1.seed, s0.seed, "the seeded stream continues");
    assert!(!s1.prompt_logprobs);
    let metrics = h.metrics().await;
    assert_eq!(
        migrations(&metrics, &h.workers[0].url(), "stream_error"),
        1,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_non_streaming_request_migrates_the_same_way() {
    let h = start(
        vec![fails_after(5, Code::Unknown), Script::default()],
        |_| {},
    )
    .await;
    let (status, v) = h.post(body(false)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], replayed(PROMPT, MAX_TOKENS), "{v}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        choice["logprobs"]["tokens"].as_array().map(Vec::len),
        Some(MAX_TOKENS)
    );
    assert_eq!(v["usage"]["completion_tokens"], MAX_TOKENS, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT.len(), "{v}");
    assert_eq!(only_request(&h, 1).generated_token_ids, ids(5));
}

#[tokio::test]
async fn a_worker_that_fails_after_the_last_token_but_before_its_finish_moves_nothing() {
    let h = start(
        vec![
            fails_after(MAX_TOKENS as u32, Code::Unavailable),
            Script::default(),
        ],
        |_| {},
    )
    .await;
    let events = stream(&h, body(true)).await;
    assert!(events.iter().all(|e| e["error"].is_null()), "{events:?}");
    assert_eq!(text_of(&events), replayed(PROMPT, MAX_TOKENS));
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "length"),
        "{events:?}"
    );
    let usage = events.iter().find(|e| !e["usage"].is_null());
    assert_eq!(
        usage.expect("usage")["usage"]["completion_tokens"],
        MAX_TOKENS
    );
    assert!(
        h.workers[1].worker.requests().is_empty(),
        "nothing was left to generate elsewhere"
    );
}

#[tokio::test]
async fn a_stop_string_spanning_the_seam_still_stops_the_choice() {
    // "abcde" comes from worker 0, "f..." from worker 1: "ef" spans the seam.
    let h = start(
        vec![fails_after(5, Code::Unavailable), Script::default()],
        |_| {},
    )
    .await;
    let req = json!({"model": "demo", "prompt": "abcdefghij", "max_tokens": 10,
                     "stop": ["ef"], "stream": true});
    let events = stream(&h, req).await;
    assert_eq!(text_of(&events), "abcd", "{events:?}");
    assert!(events.iter().all(|e| e["error"].is_null()), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "stop"),
        "{events:?}"
    );
}

#[tokio::test]
async fn with_max_migrations_0_a_stream_cut_mid_way_ends_with_an_in_band_error() {
    let h = start(
        vec![fails_after(3, Code::Unavailable), Script::default()],
        |c| c.max_migrations = 0,
    )
    .await;
    let events = stream(&h, body(true)).await;
    let n = events.len();
    assert_eq!(text_of(&events), "hé", "the tokens before the cut");
    assert_eq!(events[n - 2]["error"]["code"], 503, "{events:?}");
    assert_eq!(events[n - 1], "[DONE]");
    assert!(h.workers[1].worker.requests().is_empty(), "nothing moved");
    assert_eq!(
        migrations(&h.metrics().await, &h.workers[0].url(), "stream_error"),
        0
    );
}

#[tokio::test]
async fn past_max_migrations_or_without_another_worker_the_stream_ends_in_band() {
    // Every worker fails after 3 tokens; one migration is allowed.
    let h = start(vec![fails_after(3, Code::Unavailable); 3], |c| {
        c.max_migrations = 1
    })
    .await;
    let events = stream(&h, body(true)).await;
    let n = events.len();
    assert_eq!(text_of(&events), replayed(PROMPT, 6), "{events:?}");
    assert_eq!(events[n - 2]["error"]["code"], 503, "{events:?}");
    let tried: usize = (0..3).map(|i| h.workers[i].worker.requests().len()).sum();
    assert_eq!(tried, 2, "one move, then no more");

    // Two workers, both failing: the second failure leaves nowhere to go.
    let h = start(vec![fails_after(3, Code::Unavailable); 2], |_| {}).await;
    let events = stream(&h, body(true)).await;
    let n = events.len();
    assert_eq!(text_of(&events), replayed(PROMPT, 6), "{events:?}");
    assert_eq!(events[n - 2]["error"]["code"], 503, "{events:?}");
    let why = message(&events[n - 2]);
    assert!(
        why.contains("failed during the request")
            && why.contains("moving the request to another worker failed"),
        "{why}"
    );
}

#[tokio::test]
async fn a_request_fault_mid_stream_is_answered_not_migrated() {
    let h = start(
        vec![fails_after(3, Code::InvalidArgument), Script::default()],
        |_| {},
    )
    .await;
    let events = stream(&h, body(true)).await;
    let n = events.len();
    assert_eq!(events[n - 2]["error"]["code"], 400, "{events:?}");
    assert!(h.workers[1].worker.requests().is_empty());
}

#[tokio::test]
async fn each_of_n_choices_migrates_on_its_own_and_keeps_its_seed() {
    let h = start(
        vec![
            fails_after(4, Code::Unavailable),
            fails_after(4, Code::Unavailable),
            Script::default(),
        ],
        |_| {},
    )
    .await;
    let mut req = body(false);
    req["n"] = json!(2);
    let (status, v) = h.post(req).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for choice in v["choices"].as_array().expect("choices") {
        assert_eq!(choice["text"], replayed(PROMPT, MAX_TOKENS), "{v}");
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(v["usage"]["completion_tokens"], 2 * MAX_TOKENS, "{v}");
    let all: Vec<GenerateRequest> = (0..3)
        .flat_map(|i| h.workers[i].worker.requests())
        .collect();
    let seed_of = |id: &str| {
        all.iter()
            .find(|r| r.request_id == id && r.generated_token_ids.is_empty())
            .and_then(|r| r.sampling.as_ref()?.seed)
    };
    let resumed: Vec<&GenerateRequest> = all
        .iter()
        .filter(|r| !r.generated_token_ids.is_empty())
        .collect();
    assert!(resumed.len() >= 2, "{all:?}");
    for r in resumed {
        assert_eq!(
            r.sampling.as_ref().and_then(|s| s.seed),
            seed_of(&r.request_id)
        );
    }
}
