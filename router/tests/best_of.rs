//! `best_of` through the real router app over a `ScriptedWorker`: best_of choices run per
//! prompt with logprobs asked of the worker, n come back indexed from 0 (their logprobs only
//! when asked for), and usage counts every generated token.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use axum::http::StatusCode;
use llmapi_router::testing::Script;
use serde_json::json;

#[tokio::test]
async fn best_of_runs_more_choices_than_it_returns() {
    let h = common::start(vec![Script::default()], |_| {}).await;
    let (status, v) = h
        .post(
            json!({"model": "demo", "prompt": ["ab", "cd"], "max_tokens": 3,
            "n": 2, "best_of": 3, "seed": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indices, [0, 1, 2, 3], "n per prompt, indexed from 0: {v}");
    assert!(
        choices.iter().all(|c| c["logprobs"].is_null()),
        "not asked for: {v}"
    );
    assert_eq!(
        v["usage"]["completion_tokens"],
        2 * 3 * 3,
        "every generated token: {v}"
    );
    let sent = h.workers[0].worker.requests();
    assert_eq!(sent.len(), 6, "best_of choices per prompt");
    let mut seeds: Vec<u64> = sent
        .iter()
        .map(|r| {
            let s = r.sampling.as_ref().unwrap();
            assert_eq!(s.logprobs, Some(0), "ranking needs the tokens' logprobs");
            s.seed.unwrap()
        })
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, [10, 10, 11, 11, 12, 12], "one seed per choice");

    // Asked for, logprobs come back; with best_of = n nothing is dropped.
    let (status, v) = h
        .post(
            json!({"model": "demo", "prompt": "ab", "max_tokens": 2, "n": 2,
            "best_of": 4, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        v["choices"][1]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{v}"
    );
}

#[tokio::test]
async fn streaming_with_best_of_above_n_is_refused() {
    let h = common::start(vec![Script::default()], |_| {}).await;
    let (status, v) = h
        .post(
            json!({"model": "demo", "prompt": "ab", "max_tokens": 2, "best_of": 2,
            "stream": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "best_of", "{v}");
    assert!(h.workers[0].worker.requests().is_empty());
}
