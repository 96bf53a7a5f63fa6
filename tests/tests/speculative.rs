//! Speculative decoding through the real binaries (`llmapi-launch serve` on the demo model
//! with a `speculative_config` YAML): greedy text identical to a server without it, drafts
//! accepted on a prompt that repeats itself (on one rank and on a tensor-parallel group) (`avg_decoded_tokens_per_iter` above 1 in the
//! choice, and in the final chunk of a stream), the worker's draft counters on /metrics, and
//! a decoding type llmapi does not run refused at start-up with what it runs. With
//! `LLMAPI_SMOLLM2_GGUF` set (as in gguf_model.rs), the same greedy equality on that real
//! model with an edit request, whose output copies its prompt. DraftTarget: the demo model as
//! its own draft (every draft accepted, on one rank and on a tp 2 group whose leader runs
//! the draft), a draft cut to its first layer by `make-model` (same
//! text, some drafts accepted), and a draft with another vocabulary refused at start-up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmapi_tests::{bin, demo_model, free_port, post, serve};
use serde_json::{Value, json};

const NGRAM: &str = "speculative_config:\n  decoding_type: NGram\n  max_draft_len: 4\n";

/// A prompt that says the same thing several times.
fn repetitive() -> String {
    "one two three four five six seven eight. ".repeat(6)
}

fn yaml(dir: &tempfile::TempDir, text: &str) -> String {
    let p = dir.path().join("extra.yml");
    std::fs::write(&p, text).expect("write the YAML");
    p.to_string_lossy().into_owned()
}

fn completion(port: u16, prompt: &str) -> Value {
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": prompt, "max_tokens": 48, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The first sample of `name` (any labels) in /metrics, polled until it is positive.
fn metric_until_positive(port: u16, name: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = llmapi_tests::request(port, "GET", "/metrics", None, &[])
            .map(|r| r.body)
            .unwrap_or_default();
        let v = text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        if v > 0.0 || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ngram_speculation_keeps_greedy_text_and_reports_its_acceptance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(&dir, NGRAM);
    let (plain_port, spec_port) = (free_port(), free_port());
    let _plain = serve(demo_model(), plain_port, &[], &[]);
    let _spec = serve(
        demo_model(),
        spec_port,
        &["--extra_llm_api_options", &cfg],
        &[],
    );
    for prompt in [
        repetitive(),
        "A short story about a lighthouse keeper".to_string(),
    ] {
        let a = completion(plain_port, &prompt);
        let b = completion(spec_port, &prompt);
        assert_eq!(
            a["choices"][0]["text"], b["choices"][0]["text"],
            "speculation changed the greedy text of {prompt:?}"
        );
        assert_eq!(a["usage"], b["usage"]);
        assert!(
            a["choices"][0].get("avg_decoded_tokens_per_iter").is_none(),
            "{a}"
        );
        assert!(
            b["choices"][0]["avg_decoded_tokens_per_iter"]
                .as_f64()
                .is_some(),
            "{b}"
        );
    }
    let b = completion(spec_port, &repetitive());
    let avg = b["choices"][0]["avg_decoded_tokens_per_iter"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(avg > 1.0, "drafts were accepted on repetitive text: {b}");

    // Streaming chat: the final chunk (the one with finish_reason) carries the figure.
    let r = post(
        spec_port,
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": repetitive()}],
            "max_tokens": 32, "temperature": 0, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks = r.sse();
    let last = chunks
        .iter()
        .rev()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .expect("a chunk with finish_reason");
    assert!(
        last["choices"][0]["avg_decoded_tokens_per_iter"].as_f64() >= Some(1.0),
        "{last}"
    );

    let drafted = metric_until_positive(spec_port, "llmapi_worker_spec_decode_num_draft_tokens");
    let accepted =
        metric_until_positive(spec_port, "llmapi_worker_spec_decode_num_accepted_tokens");
    assert!(
        accepted > 0.0 && accepted <= drafted,
        "{accepted} of {drafted}"
    );
}

#[test]
fn a_tensor_parallel_group_verifies_drafts_like_one_rank_decodes() {
    // The followers run the leader's plan: a chunk of [last, drafts] with every row wanted.
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(&dir, NGRAM);
    let (one_port, tp_port) = (free_port(), free_port());
    let want = {
        let _one = serve(demo_model(), one_port, &[], &[]);
        completion(one_port, &repetitive())
    };
    let _tp = serve(
        demo_model(),
        tp_port,
        &["--tp_size", "2", "--extra_llm_api_options", &cfg],
        &[],
    );
    let got = completion(tp_port, &repetitive());
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    assert!(
        got["choices"][0]["avg_decoded_tokens_per_iter"].as_f64() > Some(1.0),
        "{got}"
    );
}

#[test]
fn an_unsupported_decoding_type_is_refused_at_start_up_naming_ngram() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(
        &dir,
        "speculative_config:\n  decoding_type: Eagle3\n  max_draft_len: 3\n",
    );
    let out = std::process::Command::new(bin("llmapi-launch"))
        .arg("serve")
        .arg(demo_model())
        .args(["--port", &free_port().to_string()])
        .args(["--extra_llm_api_options", &cfg])
        .output()
        .expect("run llmapi-launch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("decoding_type Eagle3") && err.contains("supported: NGram"),
        "{err}"
    );
}

#[test]
fn smollm2_edit_requests_give_the_same_greedy_text_with_drafts_accepted() {
    let Some(file) = std::env::var_os("LLMAPI_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    else {
        eprintln!("SKIPPED: LLMAPI_SMOLLM2_GGUF does not name the SmolLM2 GGUF file");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(&dir, NGRAM);
    let (plain_port, spec_port) = (free_port(), free_port());
    let _plain = serve(&file, plain_port, &[], &[]);
    let _spec = serve(&file, spec_port, &["--extra_llm_api_options", &cfg], &[]);
    let para = "The river runs north through the valley and past the old mill. In spring the \
                water is high and fast, and in late summer children wade across it.";
    let models = llmapi_tests::request(plain_port, "GET", "/v1/models", None, &[])
        .expect("GET /v1/models")
        .json();
    let name = models["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let chat = |port: u16| {
        let r = post(
            port,
            "/v1/chat/completions",
            &json!({"model": name, "max_tokens": 64, "temperature": 0, "messages": [
                {"role": "user", "content": format!("Repeat this text exactly:\n\n{para}")}]}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let (a, b) = (chat(plain_port), chat(spec_port));
    assert_eq!(
        a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"],
        "speculation changed SmolLM2's greedy text"
    );
    let avg = b["choices"][0]["avg_decoded_tokens_per_iter"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(avg > 1.5, "the copy was drafted and accepted: {b}");
}

fn draft_target(dir: &std::path::Path, k: u32) -> String {
    format!(
        "speculative_config:\n  decoding_type: DraftTarget\n  max_draft_len: {k}\n  speculative_model_dir: {}\n",
        dir.display()
    )
}

/// Greedy completions of `prompts` from a plain one-rank server and from one with `cfg` and
/// the flags `extra`: the texts must match; returns the second server's
/// `avg_decoded_tokens_per_iter`, completion tokens and finish reason per prompt.
fn same_text_with(cfg: &str, extra: &[&str], prompts: &[String]) -> Vec<(f64, u64, Value)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(&dir, cfg);
    let (plain_port, spec_port) = (free_port(), free_port());
    let _plain = serve(demo_model(), plain_port, &[], &[]);
    let mut args = vec!["--extra_llm_api_options", cfg.as_str()];
    args.extend(extra);
    let _spec = serve(demo_model(), spec_port, &args, &[]);
    prompts
        .iter()
        .map(|prompt| {
            let a = completion(plain_port, prompt);
            let b = completion(spec_port, prompt);
            assert_eq!(
                a["choices"][0]["text"], b["choices"][0]["text"],
                "the draft model changed the greedy text of {prompt:?}"
            );
            let avg = b["choices"][0]["avg_decoded_tokens_per_iter"]
                .as_f64()
                .unwrap_or(0.0);
            let n = b["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            (avg, n, b["choices"][0]["finish_reason"].clone())
        })
        .collect()
}

fn prompts() -> Vec<String> {
    vec![
        repetitive(),
        "A short story about a lighthouse keeper".to_string(),
    ]
}

/// The demo model as its own draft on a server started with `extra`: the plain server's
/// text, and every draft accepted.
fn every_draft_accepted_with(extra: &[&str]) {
    let k = 4;
    for (avg, n, finish) in same_text_with(&draft_target(demo_model(), k), extra, &prompts()) {
        assert_eq!(finish, "length");
        // The prefill's token, then k drafts and a bonus per step until max_tokens cuts the
        // last run: n tokens over 1 + ceil((n - 1) / (k + 1)) steps.
        let steps = 1 + (n - 1).div_ceil(u64::from(k) + 1);
        assert_eq!(avg, n as f64 / steps as f64, "{n} tokens");
    }
}

#[test]
fn the_demo_model_as_its_own_draft_has_every_draft_accepted() {
    every_draft_accepted_with(&[]);
}

#[test]
fn a_tensor_parallel_group_drafts_on_its_leader_with_one_ranks_text() {
    // The draft runs whole on rank 0 of the tp 2 group; the sharded target verifies.
    every_draft_accepted_with(&["--tp_size", "2"]);
}

#[test]
fn a_draft_cut_to_one_layer_keeps_the_text_and_some_drafts_are_accepted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("draft");
    let made = std::process::Command::new(bin("llmapi-launch"))
        .arg("make-model")
        .arg("--from")
        .arg(demo_model())
        .args(["--num_layers", "1", "--out"])
        .arg(&out)
        .output()
        .expect("run make-model");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let k = 4;
    let runs = same_text_with(&draft_target(&out, k), &[], &prompts());
    let best = runs.iter().map(|r| r.0).fold(0.0, f64::max);
    assert!(
        best > 1.0 && best < f64::from(k + 1),
        "a one-layer draft is right sometimes, not always: {runs:?}"
    );
}

#[test]
fn a_draft_with_another_vocabulary_is_refused_at_start_up_naming_both_sizes() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/golden/qwen2");
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = yaml(&dir, &draft_target(&golden, 4));
    let out = std::process::Command::new(bin("llmapi-launch"))
        .arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &free_port().to_string()])
        .args(["--extra_llm_api_options", &cfg])
        .output()
        .expect("run llmapi-launch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vocabulary has 512 tokens but the target's has 2048"),
        "{err}"
    );
}
