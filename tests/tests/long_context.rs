//! A model whose context (131072 positions) is far larger than its KV cache (4096 tokens):
//! chats without max_tokens may run up to the whole context, yet sixteen of them run at once,
//! because such requests get KV blocks as they grow rather than reserving the context at
//! admission (worker/src/scheduler, GUARANTEED_NO_EVICT).

use std::time::Duration;

use llmapi_tests::sse::first_event;
use llmapi_tests::{demo_model, free_port, get, send, serve, wait_until};
use serde_json::{Value, json};

/// The demo checkpoint, copied (as `demo` in the returned directory) with
/// max_position_embeddings raised to 131072.
fn long_context_demo() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("demo");
    std::fs::create_dir(&dir).expect("model dir");
    for entry in std::fs::read_dir(demo_model()).expect("demo model dir") {
        let entry = entry.expect("entry");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
        }
    }
    let path = dir.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    config["max_position_embeddings"] = json!(131072);
    std::fs::write(&path, config.to_string()).expect("write config");
    root
}

fn running(port: u16) -> u64 {
    get(port, "/workers").json()["workers"][0]["running"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn sixteen_chats_without_max_tokens_run_together_on_a_cache_far_below_the_context() {
    let model = long_context_demo();
    let port = free_port();
    let server = serve(
        &model.path().join("demo"),
        port,
        &[
            "--set",
            "kv_cache_config.max_tokens=4096",
            "--set",
            "print_iter_log=true",
            "--max_batch_size",
            "32",
        ],
        &[],
    );
    let probe = llmapi_tests::post(
        port,
        "/v1/chat/completions",
        &json!({"model": "demo", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(probe.status, 200, "{}", probe.body);
    let probe = llmapi_tests::post(
        port,
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(probe.status, 200, "{}", probe.body);
    let mut streams = Vec::new();
    for i in 0..16 {
        let body = json!({"model": "demo", "stream": true, "ignore_eos": true,
            "messages": [{"role": "user", "content": format!("tell story {i}")}]})
        .to_string();
        let s = send(
            port,
            "POST",
            "/v1/chat/completions",
            Some(body.as_bytes()),
            &[],
        )
        .expect("connect");
        let first = first_event(s, Duration::from_secs(60));
        assert!(first.is_some(), "chat {i} got no first token");
        streams.push(first);
    }
    // The iteration log shows steps that decoded all sixteen together.
    let together = || {
        std::fs::read_to_string(&server.log)
            .is_ok_and(|log| log.contains("'num_generation_tokens': 16}, running = 16"))
    };
    assert!(
        wait_until(Duration::from_secs(20), together),
        "no step decoded the sixteen chats together (log: {})",
        server.log.display()
    );
    drop(streams);
    assert!(
        wait_until(Duration::from_secs(15), || running(port) == 0),
        "the chats end when their clients leave"
    );
}
