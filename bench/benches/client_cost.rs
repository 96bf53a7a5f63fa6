//! The client's own cost: CPU seconds per million streamed tokens, and requests per CPU-second
//! (the highest request rate one core sustains), against the scripted SSE server double
//! answering as fast as it can. Prints figures; never fails on timing.
//!
//! `cargo bench -p llmapi-bench --bench client_cost`; scale with LLMAPI_BENCH_SCALE (default 1).
//!
//! For a side-by-side figure, LLMAPI_BENCH_COMPARE names a shell command run against the same
//! server with the same streaming workload (e.g. the original benchmark_serving.py where it is
//! installed). It gets BASE_URL, MODEL_DIR, PROMPTS, OUTPUT_LEN and CONCURRENCY in its
//! environment and must print the original's "Total generated tokens:" line.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scripted_server::{Script, start_in_thread};

/// CPU seconds (user, system) of this process's waited-for children, from /proc/self/stat.
fn children_cpu_split() -> (f64, f64) {
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
    (ticks(13) / hz, ticks(14) / hz)
}

struct Measured {
    wall_s: f64,
    cpu_s: f64,
    sys_s: f64,
    tokens: u64,
    requests: u64,
}

/// A workload: how many requests, how long each output, how many at once.
#[derive(Clone, Copy)]
struct Workload {
    prompts: u64,
    output_len: u64,
    concurrency: u64,
}

/// Runs `cmd` to completion and measures its CPU time and the tokens it reports.
fn measure(cmd: &mut Command) -> Measured {
    let before = children_cpu_split();
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the client");
    let wall_s = start.elapsed().as_secs_f64();
    let after = children_cpu_split();
    let cpu_s = after.0 + after.1 - before.0 - before.1;
    let sys_s = after.1 - before.1;
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
        sys_s,
        tokens: field("Total generated tokens:"),
        requests: field("Successful requests:"),
    }
}

fn run_client(base_url: &str, model_dir: &str, w: Workload) -> Measured {
    let (prompts, output_len, concurrency) = (
        w.prompts.to_string(),
        w.output_len.to_string(),
        w.concurrency.to_string(),
    );
    measure(Command::new(env!("CARGO_BIN_EXE_llmapi-bench")).args([
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
        &output_len,
        "--num-prompts",
        &prompts,
        "--max-concurrency",
        &concurrency,
        "--ignore-eos",
        "--disable-tqdm",
        "--no-test-input",
        "--metrics-interval",
        "0",
    ]))
}

fn print_stream(who: &str, m: &Measured) {
    println!(
        "{who}: streamed {} tokens in {:.2} s wall, client CPU {:.2} s ({:.2} s system) -> \
         {:.2} CPU-s per million tokens ({:.0} tokens/CPU-s)",
        m.tokens,
        m.wall_s,
        m.cpu_s,
        m.sys_s,
        m.cpu_s / m.tokens.max(1) as f64 * 1e6,
        m.tokens as f64 / m.cpu_s.max(1e-9)
    );
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

    // Streaming cost, two regimes. Saturated: the server streams as fast as it can, so a client
    // that lags reads many tokens per syscall. Paced: tokens 2 ms apart on 128 streams, as a
    // busy real server sends them, so every client reads about one token per syscall.
    let paced_server = start_in_thread(Script {
        itl: Duration::from_millis(2),
        ..Default::default()
    });
    let regimes = [
        (
            "saturated",
            base.clone(),
            Workload {
                prompts: 400 * scale,
                output_len: 512,
                concurrency: 64,
            },
        ),
        (
            "paced",
            paced_server.base_url(),
            Workload {
                prompts: 512 * scale,
                output_len: 256,
                concurrency: 128,
            },
        ),
    ];
    for (regime, url, w) in &regimes {
        print_stream(
            &format!("{regime} llmapi-bench"),
            &run_client(url, model_dir, *w),
        );
        if let Ok(cmd) = std::env::var("LLMAPI_BENCH_COMPARE") {
            let m = measure(
                Command::new("sh")
                    .args(["-c", &cmd])
                    .env("BASE_URL", url)
                    .env("MODEL_DIR", model_dir)
                    .env("PROMPTS", w.prompts.to_string())
                    .env("OUTPUT_LEN", w.output_len.to_string())
                    .env("CONCURRENCY", w.concurrency.to_string()),
            );
            print_stream(&format!("{regime} LLMAPI_BENCH_COMPARE"), &m);
        }
    }
    // Request cost: short outputs, connections and requests dominate.
    let short = Workload {
        prompts: 4000 * scale,
        output_len: 4,
        concurrency: 128,
    };
    let r = run_client(&base, model_dir, short);
    println!(
        "short requests: {} in {:.2} s wall ({:.0} req/s achieved), client CPU {:.2} s -> {:.0} requests per CPU-second",
        r.requests,
        r.wall_s,
        r.requests as f64 / r.wall_s,
        r.cpu_s,
        r.requests as f64 / r.cpu_s.max(1e-9)
    );
}
