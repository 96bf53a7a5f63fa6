//! End-to-end: the real llmapi-bench binary against the scripted SSE server double, on loopback.

mod common;

use std::time::Duration;

use common::scripted_server::{Fault, Script, ScriptedSseServer, start_in_thread};
use common::{run_bench, texts, write_tokenizer};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// The flags of the tutorial's bench.sh, scaled down, against `base_url`.
fn bench_sh_args(base_url: &str, model_dir: &str, result_dir: &str) -> Vec<String> {
    [
        "--model",
        model_dir,
        "--served-model-name",
        "demo",
        "--base-url",
        base_url,
        "--backend",
        "openai",
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "8",
        "--random-prefix-len",
        "0",
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        result_dir,
        "--result-filename",
        "concurrency_2.json",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--disable-tqdm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Sets `flag` to `value`, replacing an existing occurrence.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_bench(&refs, LIMIT)
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("result file")).expect("json")
}

/// Runs the bench.sh line with --save-detailed against `server`; its stdout and saved result.
fn run_detailed(server: &ScriptedSseServer) -> (String, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.push("--save-detailed".into());
    let out = run(&args);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout, read_json(&dir.path().join("concurrency_2.json")))
}

#[test]
fn bench_sh_line_measures_scripted_ttft_and_itl() {
    let server = start_in_thread(Script {
        ttft: Duration::from_millis(60),
        itl: Duration::from_millis(15),
        ..Default::default()
    });
    let (stdout, r) = run_detailed(&server);
    assert!(stdout.contains("============ Serving Benchmark Result ============"));
    assert!(stdout.contains("Successful requests:                     4"));
    assert_eq!(r["completed"], 4);
    assert_eq!(r["total_output_tokens"], 32);
    assert_eq!(r["total_input_tokens"], 64);
    // Tolerances: never below the scripted sleeps (60 ms TTFT, 15 ms ITL, less 2 ms of timer
    // slack); above them by at most what a loaded shared 2-core machine adds in scheduling delay.
    let ttfts: Vec<f64> = r["ttfts"]
        .as_array()
        .expect("ttfts")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(ttfts.len(), 4);
    for t in &ttfts {
        assert!((0.058..1.0).contains(t), "ttft {t}");
    }
    let itls: Vec<f64> = r["itls"]
        .as_array()
        .expect("itls")
        .iter()
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64())
        .collect();
    assert_eq!(itls.len(), 4 * 7);
    let mean_itl = itls.iter().sum::<f64>() / itls.len() as f64;
    assert!((0.013..0.1).contains(&mean_itl), "mean itl {mean_itl}");
    let mean_tpot = r["mean_tpot_ms"].as_f64().expect("tpot");
    assert!((13.0..100.0).contains(&mean_tpot), "tpot {mean_tpot}");
    assert_eq!(
        server.requests.load(std::sync::atomic::Ordering::Relaxed),
        5,
        "4 + test request"
    );
}

/// Keep-alive comment lines (`:`) are valid SSE: they neither fail a request nor count as its
/// first token.
#[test]
fn sse_comment_lines_are_skipped_and_do_not_start_the_ttft() {
    let server = start_in_thread(Script {
        ttft: Duration::from_millis(60),
        sse_comments: true,
        ..Default::default()
    });
    let (_, r) = run_detailed(&server);
    assert_eq!(r["completed"], 4, "{r}");
    assert_eq!(r["total_output_tokens"], 32);
    for t in r["ttfts"].as_array().expect("ttfts") {
        let t = t.as_f64().expect("ttft");
        assert!(
            t >= 0.058,
            "ttft {t} s counted from the comment sent before the 60 ms wait"
        );
    }
}

/// Keys of the original's saved JSON with `--percentile-metrics ttft,tpot,itl,e2el` and
/// `--metric-percentiles 99`, in its order.
const ORIGINAL_KEYS: [&str; 33] = [
    "date",
    "backend",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "duration",
    "completed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput:",
    "output_throughput",
    "total_token_throughput",
    "user_throughput",
    "avg_decoded_tokens_per_iter",
    "std_ttft_ms",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "std_tpot_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "std_itl_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "std_e2el_ms",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
    "request_rate",
    "burstiness",
];

#[test]
fn saved_json_has_the_original_keys_in_order() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.extend(["--metadata".into(), "tp=1".into(), "--no-test-input".into()]);
    let out = run(&args);
    assert!(out.status.success(), "{:?}", texts(&out));
    let text = std::fs::read_to_string(dir.path().join("concurrency_2.json")).expect("file");
    let r: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("json");
    let mut expected: Vec<&str> = ORIGINAL_KEYS.to_vec();
    expected.insert(5, "tp");
    expected.push("max_concurrency");
    let mut got: Vec<&str> = r.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = expected.clone();
    want.sort_unstable();
    assert_eq!(got, want);
    // Order as written, which serde_json's map does not keep: check positions in the text.
    let pos: Vec<usize> = expected
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).expect("key in text"))
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "keys out of order");
    assert_eq!(r["request_rate"], "inf");
    assert_eq!(r["request_goodput:"], Value::Null);
}

#[test]
fn detailed_json_adds_exactly_the_per_request_lists() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.push("--save-detailed".into());
    let out = run(&args);
    assert!(out.status.success(), "{:?}", texts(&out));
    let r = read_json(&dir.path().join("concurrency_2.json"));
    let obj = r.as_object().expect("object");
    for k in [
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "e2els",
        "generated_texts",
        "errors",
    ] {
        assert_eq!(obj[k].as_array().map(Vec::len), Some(4), "{k}");
    }
    assert_eq!(obj.len(), ORIGINAL_KEYS.len() + 1 + 7);
}

#[test]
fn unreachable_server_fails_the_test_request_with_a_clear_message() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let args = bench_sh_args(&format!("http://127.0.0.1:{port}"), d, d);
    let out = run(&args);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("Initial test run failed"), "{stderr}");
    assert!(stderr.contains("cannot connect to 127.0.0.1"), "{stderr}");
}

#[test]
fn wrong_model_name_reports_the_servers_message() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    let i = args.iter().position(|a| a == "demo").expect("model flag");
    args[i] = "nope".into();
    let out = run(&args);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("HTTP 404"), "{stderr}");
    assert!(
        stderr.contains("The model `nope` does not exist."),
        "{stderr}"
    );
}

#[test]
fn server_errors_mid_run_count_as_failed_requests_by_type() {
    let server = start_in_thread(Script {
        fault: Fault::Http500Every(2),
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.push("--no-test-input".into());
    let out = run(&args);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Error type: HTTP 500, Count: 2 requests"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Failed requests:                         2"),
        "{stdout}"
    );
    assert!(stdout.contains("!FAILED REQUESTS!"));
    assert_eq!(
        read_json(&dir.path().join("concurrency_2.json"))["completed"],
        2
    );
}

/// Runs bench.sh's line (with `--no-test-input` and `extra`) against a server with `fault`;
/// asserts every request failed with the `kind` line, and returns the result directory.
fn every_request_fails_as(fault: Fault, extra: &[&str], kind: &str) -> tempfile::TempDir {
    let server = start_in_thread(Script {
        fault,
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.push("--no-test-input".into());
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = run(&args);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(kind), "{fault:?}: {stdout}");
    assert!(
        stdout.contains("Successful requests:                     0"),
        "{fault:?}: {stdout}"
    );
    dir
}

#[test]
fn a_stalled_stream_times_out_and_a_dropped_one_counts_as_payload_error() {
    let timeout = ["--chunk-timeout", "1.0"];
    every_request_fails_as(
        Fault::StallAfter(3),
        &timeout,
        "Error type: TimeoutError, Count: 4 requests",
    );
    every_request_fails_as(
        Fault::DropAfter(3),
        &timeout,
        "Error type: ClientPayloadError, Count: 4 requests",
    );
}

#[test]
fn streams_cut_short_count_as_failed_by_class_where_benchmark_serving_counts_success() {
    for (fault, kind) in [
        (
            Fault::InBandErrorAfter(3),
            "Error type: InBandError, Count: 4 requests",
        ),
        (
            Fault::NoFinishAfter(3),
            "Error type: TruncatedStream, Count: 4 requests",
        ),
        // bench.sh sends --ignore-eos: three tokens of the ones asked for is a cut stream.
        (
            Fault::ShortAfter(3),
            "Error type: TruncatedStream, Count: 4 requests",
        ),
    ] {
        let dir = every_request_fails_as(fault, &[], kind);
        let saved = read_json(&dir.path().join("concurrency_2.json"));
        assert_eq!(saved["completed"], 0, "{fault:?}");
    }
}

#[test]
fn ctrl_c_prints_the_partial_result() {
    let server = start_in_thread(Script {
        itl: Duration::from_millis(20),
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    set_flag(&mut args, "--num-prompts", "40");
    set_flag(&mut args, "--random-output-len", "20");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_llmapi-bench"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // 40 requests of ~0.4 s, two at a time, take ~8 s; interrupt after ~1.5 s.
    std::thread::sleep(Duration::from_millis(1500));
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stdout.contains("Interrupted by Ctrl-C"), "{stdout}");
    assert!(stdout.contains("Serving Benchmark Result"), "{stdout}");
    let r = read_json(&dir.path().join("concurrency_2.json"));
    assert_eq!(r["interrupted"], true);
    let done = r["completed"].as_u64().expect("completed");
    assert!((1..40).contains(&done), "completed {done}");
}

#[test]
fn server_metrics_are_sampled_into_the_result() {
    let server = start_in_thread(Script {
        metrics: true,
        itl: Duration::from_millis(10),
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    args.extend(["--metrics-interval".into(), "0.02".into()]);
    let out = run(&args);
    assert!(out.status.success(), "{:?}", texts(&out));
    let r = read_json(&dir.path().join("concurrency_2.json"));
    let samples = r["server_metrics"]["samples"].as_array().expect("samples");
    assert!(!samples.is_empty());
    assert_eq!(samples[0]["values"]["llmapi_kv_cache_usage_ratio"], 0.5);
    assert!(
        samples[0]["values"]
            .get("process_cpu_seconds_total")
            .is_none()
    );
}

#[test]
fn chat_backend_and_non_streaming_mode_both_complete() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    for extra in [vec!["--backend", "openai-chat"], vec!["--non-streaming"]] {
        let mut args = bench_sh_args(&server.base_url(), d, d);
        let i = args.iter().position(|a| a == "--backend").expect("flag");
        args.drain(i..i + 2);
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = run(&args);
        assert!(out.status.success(), "{extra:?}: {:?}", texts(&out));
        let r = read_json(&dir.path().join("concurrency_2.json"));
        assert_eq!(r["completed"], 4, "{extra:?}");
        assert_eq!(r["total_output_tokens"], 32, "{extra:?}");
    }
}

#[test]
fn bad_flags_get_messages_that_say_what_to_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let cases = [
        ("--percentile-metrics", "ttft,foo", "unknown metric 'foo'"),
        ("--goodput", "ttft=5", "is not KEY:VALUE"),
        ("--random-range-ratio", "1.5", "must be in [0, 1)"),
        ("--dataset-name", "sharegpt", "needs --dataset-path"),
        (
            "--base-url",
            "https://127.0.0.1:9",
            "https is not supported",
        ),
    ];
    for (flag, value, msg) in cases {
        let extra = (flag, value);
        let mut args = bench_sh_args("http://127.0.0.1:9", d, d);
        set_flag(&mut args, flag, value);
        let out = run(&args);
        let (_, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(msg), "{extra:?}: {stderr}");
    }
    let out = run_bench(
        &["--model", "/nonexistent/model", "--dataset-name", "random"],
        LIMIT,
    );
    assert!(
        texts(&out).1.contains("not a local directory"),
        "{:?}",
        texts(&out)
    );
}

#[test]
fn sweep_writes_one_json_per_point_a_summary_and_plots() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args: Vec<String> = ["sweep", "--concurrency", "1,2,4", "--multi-round", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut rest = bench_sh_args(&server.base_url(), d, d);
    for flag in ["--result-filename", "--max-concurrency", "--num-prompts"] {
        let i = rest.iter().position(|a| a == flag).expect("flag");
        rest.drain(i..i + 2);
    }
    args.extend(rest);
    let out = run(&args);
    assert!(out.status.success(), "{:?}", texts(&out));
    for c in [1, 2, 4] {
        let r = read_json(&dir.path().join(format!("concurrency_{c}.json")));
        assert_eq!(r["max_concurrency"], c);
        assert_eq!(r["num_prompts"], c * 2);
    }
    let csv = std::fs::read_to_string(dir.path().join("sweep_summary.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.starts_with("concurrency,num_prompts,completed,"));
    let md = std::fs::read_to_string(dir.path().join("sweep_summary.md")).expect("md");
    assert!(md.contains("| 4 | 8 |"), "{md}");
    for stem in [
        "throughput_vs_concurrency",
        "tpot_vs_throughput",
        "ttft_percentiles",
    ] {
        let png = std::fs::read(dir.path().join(format!("{stem}.png"))).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).expect("svg");
        assert!(
            svg.contains("<svg") && svg.contains("<text"),
            "{stem}.svg has no text"
        );
    }
}

#[test]
fn a_finite_request_rate_spaces_the_requests_by_the_gamma_gaps() {
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8 path");
    write_tokenizer(dir.path());
    let mut args = bench_sh_args(&server.base_url(), d, d);
    set_flag(&mut args, "--num-prompts", "8");
    set_flag(&mut args, "--request-rate", "20");
    set_flag(&mut args, "--burstiness", "2.0");
    let out = run(&args);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Traffic request rate: 20.0"), "{stdout}");
    assert!(
        stdout.contains("Burstiness factor: 2.0 (Gamma distribution)"),
        "{stdout}"
    );
    let r = read_json(&dir.path().join("concurrency_2.json"));
    assert_eq!(r["request_rate"], 20.0);
    // The last request leaves after the first seven gaps of the same seeded draw.
    let gaps = llmapi_bench::runner::arrival_gaps(8, 20.0, 2.0, 0);
    let released_last = gaps[..7].iter().sum::<f64>();
    let duration = r["duration"].as_f64().expect("duration");
    assert!(duration >= released_last, "{duration} < {released_last}");
}
