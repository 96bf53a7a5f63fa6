//! `logit_bias` through the real router app: on both endpoints it reaches the worker's
//! SamplingParams as token ids and biases, and every kind of bad value is a 400 in OpenAI's
//! error shape naming `logit_bias`, before any worker is asked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;

use axum::http::StatusCode;
use llmapi_router::testing::Script;
use serde_json::{Value, json};

const ENDPOINTS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

fn body(path: &str, bias: Value) -> Value {
    let mut b = if path == "/v1/completions" {
        json!({"model": "demo", "prompt": "hello", "max_tokens": 3})
    } else {
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    };
    b["logit_bias"] = bias;
    b
}

#[tokio::test]
async fn logit_bias_reaches_the_worker_as_ids_and_biases() {
    let h = common::start(vec![Script::default()], |_| {}).await;
    for path in ENDPOINTS {
        let (status, v) = h
            .post_to(path, body(path, json!({"5": 100, "200": -100, "7": 0.25})))
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        let sent = h.workers[0]
            .worker
            .requests()
            .pop()
            .expect("a request reached the worker");
        let bias = sent.sampling.expect("sampling params").logit_bias;
        assert_eq!(
            bias,
            HashMap::from([(5, 100.0), (200, -100.0), (7, 0.25)]),
            "{path}"
        );
    }
    // Null and {} ask for nothing.
    for bias in [Value::Null, json!({})] {
        let (status, v) = h.post(body(ENDPOINTS[0], bias)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let sent = h.workers[0].worker.requests().pop().unwrap();
        assert!(sent.sampling.unwrap().logit_bias.is_empty());
    }
}

#[tokio::test]
async fn bad_logit_bias_is_a_400_naming_the_field() {
    let h = common::start(vec![Script::default()], |_| {}).await;
    let vocab = Script::default().vocab_size;
    let too_many: serde_json::Map<String, Value> =
        (0..301).map(|i| (i.to_string(), json!(1))).collect();
    let cases = [
        (json!({"x": 1}), "not a token id"),
        (json!({"-3": 1}), "not a token id"),
        (json!({"5": 100.5}), "between -100 and 100"),
        (json!({"5": -101}), "between -100 and 100"),
        (json!({"5": "1"}), "not a number"),
        (json!({ vocab.to_string(): 1 }), "outside the vocabulary"),
        (Value::Object(too_many), "at most 300"),
        (json!([1, 2]), "object of token ids to biases"),
    ];
    let before = h.workers[0].worker.requests().len();
    for path in ENDPOINTS {
        for (bias, says) in &cases {
            let (status, v) = h.post_to(path, body(path, bias.clone())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {bias}: {v}");
            assert!(common::message(&v).contains(says), "{path} {bias}: {v}");
            assert_eq!(v["error"]["code"], 400, "{path} {bias}");
            if bias.is_object() {
                assert_eq!(v["error"]["param"], "logit_bias", "{path} {bias}: {v}");
            }
        }
    }
    assert_eq!(
        h.workers[0].worker.requests().len(),
        before,
        "no bad request reached a worker"
    );
}
