//! The client's own cost: CPU seconds per million streamed tokens, and requests per CPU-second
//! (the highest request rate one core sustains), against the scripted SSE server double
//! answering as fast as it can. Prints figures; never fails on timing.
//!
//! `cargo bench -p llmapi-bench --bench client_cost`; scale with LLMAPI_BENCH_SCALE (default 1).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::scripted_server::{Script, start_in_thread};

/// CPU seconds (user + system) of this process's waited-for children, from /proc/self/stat.
fn children_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 16 and 17 of stat(5) (cutime, cstime); `rest` starts at field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    (ticks(13) + ticks(14)) / hz
}

struct Measured {
    wall_s: f64,
    cpu_s: f64,
    tokens: u64,
    requests: u64,
}

fn run_client(
    base_url: &str,
    model_dir: &str,
    prompts: u64,
    output_len: u64,
    concurrency: u64,
) -> Measured {
    let before = children_cpu_seconds();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_llmapi-bench"))
        .args([
            "--model",
            model_dir,
            "--served-model-name",
            "demo",
            "--base-url",
            base_url,
            "--dataset-name",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            &output_len.to_string(),
            "--num-prompts",
            &prompts.to_string(),
            "--max-concurrency",
            &concurrency.to_string(),
            "--ignore-eos",
            "--disable-tqdm",
            "--no-test-input",
            "--metrics-interval",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("run llmapi-bench");
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = children_cpu_seconds() - before;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l[label.len()..].trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Measured {
        wall_s,
        cpu_s,
        tokens: field("Total generated tokens:"),
        requests: field("Successful requests:"),
    }
}

fn main() {
    let scale: u64 = std::env::var("LLMAPI_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let server = start_in_thread(Script::default());
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_tokenizer(dir.path());
    let model_dir = dir.path().to_str().expect("utf8 path");
    let base = server.base_url();

    // Streaming cost: long outputs, tokens dominate.
    let m = run_client(&base, model_dir, 400 * scale, 512, 64);
    println!(
        "streamed tokens: {} in {:.2} s wall, client CPU {:.2} s -> {:.2} CPU-s per million tokens ({:.0} tokens/CPU-s)",
        m.tokens,
        m.wall_s,
        m.cpu_s,
        m.cpu_s / m.tokens.max(1) as f64 * 1e6,
        m.tokens as f64 / m.cpu_s.max(1e-9)
    );
    // Request cost: short outputs, connections and requests dominate.
    let r = run_client(&base, model_dir, 4000 * scale, 4, 128);
    println!(
        "short requests: {} in {:.2} s wall ({:.0} req/s achieved), client CPU {:.2} s -> {:.0} requests per CPU-second",
        r.requests,
        r.wall_s,
        r.requests as f64 / r.wall_s,
        r.cpu_s,
        r.requests as f64 / r.cpu_s.max(1e-9)
    );
}
