//! The README's one-command server (`llmapi-launch serve MODEL`): completions and chat,
//! streaming and not, every error status, client disconnects and SIGTERM drain.

use std::io::Read;
use std::time::Duration;

use llmapi_tests::{
    bench_model, bin, demo_model, free_port, get, post, request, send, serve, wait_until,
};
use serde_json::{Value, json};

fn kv_state(port: u16) -> (u64, u64, u64) {
    let w = get(port, "/workers").json();
    let w = &w["workers"][0];
    (
        w["running"].as_u64().unwrap_or(99),
        w["kv_blocks_used"].as_u64().unwrap_or(0),
        w["kv_blocks_free"].as_u64().unwrap_or(0),
    )
}

#[test]
fn serve_answers_completions_and_chat_streaming_and_not() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);

    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "Hello, my name is", "max_tokens": 8}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0);

    let r = post(
        port,
        "/v1/chat/completions",
        &json!({"model": "demo",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());

    // Sampled at the default temperature, the demo model may draw its end-of-sequence token
    // within six tokens (finish_reason "stop"): ignore_eos makes "length" the only ending.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": "Once upon", "max_tokens": 6, "stream": true,
            "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true},
            "ignore_eos": true}),
        ),
    ] {
        let r = post(port, path, &body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"))
        );
        let events = r.sse();
        assert_eq!(events.last(), Some(&json!("[DONE]")), "{path}: {events:?}");
        assert!(
            events
                .iter()
                .any(|e| e["choices"][0]["finish_reason"] == "length"),
            "{path}: {events:?}"
        );
    }

    // Greedy decoding is deterministic: the streamed text equals the non-streamed text.
    let body = json!({"model": "demo", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0});
    let whole = post(port, "/v1/completions", &body).json()["choices"][0]["text"].clone();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text: String = post(port, "/v1/completions", &streamed)
        .sse()
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(Value::String(text), whole);
}

#[test]
fn every_error_status_has_an_openai_error_body() {
    let port = free_port();
    let _server = serve(
        demo_model(),
        port,
        &[],
        &[("LLMAPI_API_KEY", "sk-e2e".to_owned())],
    );
    let auth = [("Authorization", "Bearer sk-e2e")];
    let raw = |body: &[u8]| {
        let s = send(port, "POST", "/v1/completions", Some(body), &auth).expect("connect");
        llmapi_tests::read_response(s).expect("response")
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"model\": \"demo\", ".to_vec(), 400),
        (
            "wrong type",
            json!({"model": "demo", "prompt": 42})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "wrong field type",
            json!({"model": "demo", "prompt": "x", "n": "two"})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "empty prompt",
            json!({"model": "demo", "prompt": ""})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "oversized prompt",
            json!({"model": "demo", "prompt": "word ".repeat(5000)})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "unknown model",
            json!({"model": "gpt-5", "prompt": "x"})
                .to_string()
                .into_bytes(),
            404,
        ),
        (
            "huge body",
            format!(
                "{{\"model\": \"demo\", \"prompt\": \"{}\"}}",
                "x".repeat(40 << 20)
            )
            .into_bytes(),
            413,
        ),
    ];
    for (what, body, status) in cases {
        let r = raw(&body);
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            &r.body[..r.body.len().min(300)]
        );
        let v = r.json();
        assert_eq!(v["error"]["code"], status, "{what}: {}", r.body);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let r = request(
        port,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "demo", "prompt": "x"})),
        &[],
    )
    .expect("request");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = get(port, "/v1/no_such_route");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
}

#[test]
fn a_client_disconnect_frees_every_block() {
    let port = free_port();
    let _server = serve(bench_model(), port, &[], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || kv_state(port).2 > 0),
        "load reported"
    );
    let (_, _, free_before) = kv_state(port);
    let mut streams = Vec::new();
    for i in 0..4 {
        let body =
            json!({"model": "bench", "prompt": format!("story number {i}"), "max_tokens": 1000,
            "stream": true, "ignore_eos": true})
            .to_string();
        let mut s =
            send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect");
        let mut first = [0u8; 256];
        let n = s.read(&mut first).expect("first bytes");
        assert!(n > 0);
        streams.push(s);
    }
    assert!(
        wait_until(Duration::from_secs(10), || kv_state(port).0 == 4),
        "four running: {:?}",
        kv_state(port)
    );
    drop(streams);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (running, _, free) = kv_state(port);
            running == 0 && free == free_before
        }),
        "blocks freed after disconnect: {:?} (free before {free_before})",
        kv_state(port)
    );

    // The same for clients waiting on a non-streamed answer.
    let body = json!({"model": "bench", "prompt": "a long answer", "max_tokens": 1000, "ignore_eos": true})
        .to_string();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect")
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || kv_state(port).0 == 2),
        "two running: {:?}",
        kv_state(port)
    );
    drop(waiting);
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (running, _, free) = kv_state(port);
            running == 0 && free == free_before
        }),
        "blocks freed after a non-streaming client left: {:?}",
        kv_state(port)
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let port = free_port();
    let mut server = serve(demo_model(), port, &[], &[]);
    let body =
        json!({"model": "demo", "prompt": "drain me", "max_tokens": 200, "ignore_eos": true})
            .to_string();
    let s = send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect");
    std::thread::sleep(Duration::from_millis(100));
    let reader = std::thread::spawn(move || llmapi_tests::read_response(s));
    assert!(
        server.terminate(Duration::from_secs(30)),
        "server exits after draining"
    );
    let r = reader.join().expect("reader thread").expect("response");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 200);
}

#[test]
fn serve_admission_cap_answers_429_with_an_openai_error_body() {
    let port = free_port();
    // The TGI / sglang spelling is an alias of --max_inflight_requests.
    let _server = serve(
        bench_model(),
        port,
        &["--max_concurrent_requests", "1", "--queue_size", "0"],
        &[],
    );
    let body = json!({"model": "bench", "prompt": "a long story", "max_tokens": 1000,
        "stream": true, "ignore_eos": true})
    .to_string();
    let mut held =
        send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).expect("connect");
    let mut first = [0u8; 256];
    assert!(held.read(&mut first).expect("first bytes") > 0);
    let r = post(
        port,
        "/v1/chat/completions",
        &json!({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], 429);
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--max_inflight_requests"),
        "the message names the flag: {e}"
    );
    // Once the held request is gone, requests are admitted again.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(15), || {
            post(
                port,
                "/v1/completions",
                &json!({"model": "bench", "prompt": "x", "max_tokens": 1}),
            )
            .status
                == 200
        }),
        "admitted again after the slot freed"
    );
}

#[test]
fn llmapi_bench_chat_with_client_tokenization_is_served() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let model = demo_model().to_string_lossy().into_owned();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(bin("llmapi-bench"))
        .args(["--backend", "openai-chat", "--tokenize-on-client"])
        .args(["--dataset-name", "random", "--num-prompts", "4"])
        .args([
            "--random-input-len",
            "16",
            "--random-output-len",
            "4",
            "--ignore-eos",
        ])
        .args([
            "--model",
            &model,
            "--port",
            &port.to_string(),
            "--disable-tqdm",
        ])
        .arg("--no-test-input")
        .args(["--save-result", "--result-dir"])
        .arg(out_dir.path())
        .args(["--result-filename", "chat.json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start llmapi-bench");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("llmapi-bench did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    let _ = child
        .stdout
        .take()
        .map(|mut o| o.read_to_string(&mut stdout));
    let _ = child
        .stderr
        .take()
        .map(|mut e| e.read_to_string(&mut stderr));
    assert!(status.success(), "llmapi-bench failed:\n{stdout}\n{stderr}");
    let result: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("chat.json")).expect("result file"),
    )
    .expect("result json");
    assert_eq!(result["completed"], 4, "{result}");
    assert_eq!(result["total_output_tokens"], 16);
    // The router took the ids as the whole prompt: 16 tokens each, no chat template added.
    let metrics = get(port, "/metrics").body;
    assert!(
        metrics.contains("llmapi_router_prompt_tokens_total 64"),
        "{metrics}"
    );
    // The request histograms saw the four requests, and the worker's engine counters reach
    // /metrics through its Load answers (polled with the health checks).
    assert!(
        metrics.contains("llmapi_router_request_prompt_tokens_count 4\n")
            && metrics.contains("llmapi_router_request_generation_tokens_sum 16.0\n")
            && metrics.contains("llmapi_router_time_to_first_token_seconds_count 4\n"),
        "{metrics}"
    );
    let worker_counter = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{worker=")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let mut last = String::new();
    let polled = wait_until(Duration::from_secs(30), || {
        last = get(port, "/metrics").body;
        worker_counter(&last, "llmapi_worker_prefix_cache_queries_total") >= 64.0
    });
    assert!(polled, "{last}");
    assert!(
        worker_counter(&last, "llmapi_worker_iterations_total") >= 1.0,
        "{last}"
    );
    assert!(
        worker_counter(&last, "llmapi_worker_iteration_tokens_total") >= 64.0,
        "{last}"
    );
    // The step histograms count the same steps and tokens the counters do.
    let iterations = worker_counter(&last, "llmapi_worker_iterations_total");
    for name in [
        "llmapi_worker_step_duration_seconds_count",
        "llmapi_worker_step_batch_size_count",
        "llmapi_worker_step_tokens_count",
    ] {
        assert_eq!(worker_counter(&last, name), iterations, "{name}: {last}");
    }
    assert_eq!(
        worker_counter(&last, "llmapi_worker_step_tokens_sum"),
        worker_counter(&last, "llmapi_worker_iteration_tokens_total"),
        "{last}"
    );
    assert!(
        last.contains("llmapi_worker_step_duration_seconds_bucket{le=\"+Inf\",worker=")
            || last.contains("llmapi_worker_step_duration_seconds_bucket{worker="),
        "{last}"
    );
}

/// Text without ANSI colour sequences (log lines are coloured by default).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_clients_trace_id_reaches_the_workers_log_lines() {
    let port = free_port();
    let _server = serve(
        demo_model(),
        port,
        &[],
        &[("RUST_LOG", "info,llmapi_worker=debug".to_owned())],
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = request(
        port,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "demo", "prompt": "trace me", "max_tokens": 2})),
        &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))],
    )
    .expect("request");
    assert_eq!(r.status, 200, "{}", r.body);
    let answered = r
        .headers
        .iter()
        .find(|(k, _)| k == "traceresponse")
        .map(|(_, v)| v.clone())
        .expect("traceresponse header");
    let parts: Vec<&str> = answered.split('-').collect();
    assert_eq!(parts[1], trace_id);
    let router_span = parts[2].to_owned();
    assert_ne!(router_span, "00f067aa0ba902b7");
    // The worker's lines carry the trace, with the router's span as their parent.
    let log = std::env::temp_dir().join(format!(
        "llmapi-e2e-serve-{port}-{}.log",
        std::process::id()
    ));
    let wanted = [
        format!("trace_id={trace_id}"),
        format!("parent_span_id={router_span}"),
    ];
    let mut text = String::new();
    let found = wait_until(Duration::from_secs(10), || {
        text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
        text.lines()
            .any(|l| l.contains("finished") && wanted.iter().all(|w| l.contains(w.as_str())))
    });
    assert!(
        found,
        "no worker log line with {wanted:?} in {}:\n{text}",
        log.display()
    );
}
