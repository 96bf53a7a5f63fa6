//! Sequence groups against `ScriptedWorker` doubles: the choices of one prompt go to one
//! worker with one group key (where the worker computes the prompt once), under a policy that
//! would otherwise spread them, and when that worker fails mid-stream each choice still moves
//! to another worker and completes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use llmapi_router::testing::Script;
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn the_choices_of_a_prompt_go_to_one_worker_with_one_group_key() {
    // Round robin over two doubles would alternate the choices.
    let h = common::start(vec![Script::default(), Script::default()], |_| {}).await;
    let (status, v) = h
        .post(
            json!({"model": "demo", "prompt": ["abcdefgh", "ijklmnop"], "max_tokens": 3,
                     "n": 4, "seed": 5, "temperature": 1.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 8, "{v}");
    let sent: Vec<_> = (0..2)
        .flat_map(|i| h.workers[i].worker.requests())
        .collect();
    assert_eq!(sent.len(), 8);
    for prompt in ["abcdefgh", "ijklmnop"] {
        let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let on: BTreeSet<usize> = (0..2)
            .filter(|&i| {
                h.workers[i]
                    .worker
                    .requests()
                    .iter()
                    .any(|r| r.prompt_token_ids == ids)
            })
            .collect();
        assert_eq!(on.len(), 1, "{prompt}: every choice on one worker");
        let members: Vec<_> = sent.iter().filter(|r| r.prompt_token_ids == ids).collect();
        let keys: BTreeSet<&str> = members.iter().map(|r| r.group_id.as_str()).collect();
        assert_eq!(keys.len(), 1, "{prompt}: one group key: {keys:?}");
        assert!(!keys.contains(""), "{prompt}: a group key is sent");
        // Seeds per choice are as before: the request's seed plus the choice's index.
        let mut seeds: Vec<u64> = members
            .iter()
            .map(|r| r.sampling.as_ref().unwrap().seed.unwrap())
            .collect();
        seeds.sort_unstable();
        assert_eq!(seeds, [5, 6, 7, 8]);
    }
    let keys: BTreeSet<&str> = sent.iter().map(|r| r.group_id.as_str()).collect();
    assert_eq!(keys.len(), 2, "one group per prompt");

    // A lone choice carries no group key.
    let (status, v) = h
        .post(json!({"model": "demo", "prompt": "ab", "max_tokens": 2}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let all: Vec<_> = (0..2)
        .flat_map(|i| h.workers[i].worker.requests())
        .collect();
    assert_eq!(all.len(), 9);
    assert!(all.iter().any(|r| r.group_id.is_empty()));
}

#[tokio::test]
async fn when_the_groups_worker_fails_mid_stream_every_choice_moves_and_completes() {
    // Round robin puts the group on the first double, which fails every stream after two
    // tokens; each choice then continues on the second.
    let failing = Script {
        fails_after_tokens: Some((2, Code::Unavailable)),
        ..Script::default()
    };
    let h = common::start(vec![failing, Script::default()], |_| {}).await;
    let (status, v) = h
        .post(json!({"model": "demo", "prompt": "abcdefgh", "max_tokens": 6, "n": 3}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    for c in choices {
        assert_eq!(c["text"], "abcdef", "{v}");
        assert_eq!(c["finish_reason"], "length", "{v}");
    }
    assert_eq!(
        v["usage"]["prompt_tokens"], 8,
        "the prompt counted once: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 18, "{v}");
    let first = h.workers[0].worker.requests();
    let moved = h.workers[1].worker.requests();
    assert_eq!(first.len(), 3, "the group started on one worker");
    assert_eq!(moved.len(), 3, "every choice moved");
    assert!(moved.iter().all(|r| r.generated_token_ids.len() == 2));
}

#[tokio::test]
async fn when_the_groups_worker_fails_before_the_first_token_the_group_moves_together() {
    // The first double fails every request before its first token: each choice is retried,
    // and the pin moves with the first retry so that the group stays on one worker.
    let failing = Script {
        fails_after_tokens: Some((0, Code::Unavailable)),
        ..Script::default()
    };
    let h = common::start(vec![failing, Script::default(), Script::default()], |_| {}).await;
    let (status, v) = h
        .post(json!({"model": "demo", "prompt": "abcdefgh", "max_tokens": 4, "n": 3}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3, "{v}");
    let retried: Vec<usize> = (1..3).map(|i| h.requests(i)).collect();
    assert!(
        retried.contains(&3) && retried.contains(&0),
        "the retried choices stay together: {retried:?}"
    );
}
