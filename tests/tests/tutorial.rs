//! TensorRT-LLM's "Run benchmarking with trtllm-serve" tutorial, run as a new user would: its
//! start.sh and bench.sh written as the tutorial prints them, with only the model path, the two
//! command names (`trtllm-serve` -> `llmapi-launch serve`, `python -m
//! tensorrt_llm.serve.scripts.benchmark_serving` -> `llmapi-bench`), a shorter
//! `concurrency_list` and `multi_round` changed to fit CI. The server listens on the
//! tutorial's port, 8000, and the results go to its /tmp/llama3.1_output.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llmapi_tests::{Proc, bench_model, bin, wait_healthy};
use serde_json::Value;

const CONCURRENCY: [usize; 3] = [1, 2, 4];
const MULTI_ROUND: usize = 2;
const PORT: u16 = 8000;
const RESULT_DIR: &str = "/tmp/llama3.1_output";

fn start_sh(model: &Path) -> String {
    format!(
        r#"#! /bin/bash
model_path={model}
extra_llm_api_file=/tmp/extra-llm-api-config.yml

cat << EOF > ${{extra_llm_api_file}}
enable_attention_dp: false
print_iter_log: true
cuda_graph_config:
  enable_padding: true
  max_batch_size: 1024
kv_cache_config:
  dtype: fp8
EOF

llmapi-launch serve ${{model_path}} \
    --max_batch_size 1024 \
    --max_num_tokens 2048 \
    --max_seq_len 1024 \
    --kv_cache_free_gpu_memory_fraction 0.9 \
    --tp_size 1 \
    --ep_size 1 \
    --trust_remote_code \
    --extra_llm_api_options ${{extra_llm_api_file}}
"#,
        model = model.display()
    )
}

fn bench_sh(model: &Path) -> String {
    let concurrency: Vec<String> = CONCURRENCY.iter().map(ToString::to_string).collect();
    format!(
        r#"concurrency_list="{list}"
multi_round={MULTI_ROUND}
isl=1024
osl=1024
result_dir={RESULT_DIR}
model_path={model}

for concurrency in ${{concurrency_list}}; do
    num_prompts=$((concurrency * multi_round))
    llmapi-bench \
        --model ${{model_path}} \
        --backend openai \
        --dataset-name "random" \
        --random-input-len ${{isl}} \
        --random-output-len ${{osl}} \
        --random-prefix-len 0 \
        --num-prompts ${{num_prompts}} \
        --max-concurrency ${{concurrency}} \
        --ignore-eos \
        --save-result \
        --result-dir "${{result_dir}}" \
        --result-filename "concurrency_${{concurrency}}.json" \
        --percentile-metrics "ttft,tpot,itl,e2el"
done
"#,
        list = concurrency.join(" "),
        model = model.display()
    )
}

/// Kills a script's whole process group (bash and the binaries it started) when dropped.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `bash -x SCRIPT` in `dir` with the workspace binaries first on PATH, in its own process
/// group.
fn bash_x(dir: &Path, script: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let bins = bin("llmapi-launch").parent().unwrap().to_path_buf();
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("bash");
    cmd.arg("-x")
        .arg(script)
        .current_dir(dir)
        .env("PATH", format!("{}:{path}", bins.display()))
        .process_group(0);
    cmd
}

#[test]
fn the_tutorial_start_and_bench_scripts_run_as_written() {
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", PORT)).is_ok(),
        "port {PORT} is taken; the tutorial's scripts need it free"
    );
    let model = bench_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("start.sh"), start_sh(model)).unwrap();
    std::fs::write(dir.path().join("bench.sh"), bench_sh(model)).unwrap();
    let _ = std::fs::remove_dir_all(RESULT_DIR);

    // bash -x start.sh &
    let server = Proc::spawn("tutorial-start", bash_x(dir.path(), "start.sh"));
    let _server_group = GroupGuard(server.pid());
    wait_healthy(PORT, Duration::from_secs(180));

    // bash -x bench.sh &> output_bench.log
    let log_path = dir.path().join("output_bench.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut bench_cmd = bash_x(dir.path(), "bench.sh");
    bench_cmd
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(std::process::Stdio::null());
    let mut bench = bench_cmd.spawn().expect("run bash -x bench.sh");
    let _bench_group = GroupGuard(bench.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(s) = bench.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bench.sh still running after 900 s; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "bench.sh failed: {status}\n{output}");

    // One result block and one result file per concurrency, every request successful, every
    // prompt exactly the requested 1024 tokens as the server counted them.
    assert_eq!(
        output.matches("Serving Benchmark Result").count(),
        CONCURRENCY.len(),
        "{output}"
    );
    assert_eq!(
        output
            .matches("Input length: requested 1024 tokens per prompt")
            .count(),
        CONCURRENCY.len(),
        "{output}"
    );
    for c in CONCURRENCY {
        let path = Path::new(RESULT_DIR).join(format!("concurrency_{c}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{output}", path.display()));
        let v: Value = serde_json::from_str(&text).unwrap();
        let n = (c * MULTI_ROUND) as u64;
        for key in [
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
            "output_throughput",
            "total_token_throughput",
            "mean_ttft_ms",
            "median_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "mean_itl_ms",
            "mean_e2el_ms",
            "max_concurrency",
        ] {
            assert!(v.get(key).is_some(), "{}: no {key}: {v}", path.display());
        }
        assert_eq!(v["num_prompts"], n, "{}", path.display());
        assert_eq!(v["completed"], n, "concurrency {c}: every request succeeds");
        assert_eq!(v["max_concurrency"], c as u64);
        assert_eq!(
            v["total_input_tokens"],
            n * 1024,
            "concurrency {c}: every prompt is 1024 tokens"
        );
        // A 1024-token prompt under --max_seq_len 1024 leaves room for one token.
        assert_eq!(v["total_output_tokens"], n, "concurrency {c}");
    }

    let server_log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        server_log.contains("iter = ") && server_log.contains("num_scheduled_requests"),
        "print_iter_log lines: {server_log}"
    );
    assert!(
        server_log.contains(
            "User-specified max_tokens (1024) is greater than deduced default_max_tokens (1), \
             using default_max_tokens instead"
        ),
        "the lowered max_tokens warning: {server_log}"
    );
    let _ = std::fs::remove_dir_all(RESULT_DIR);
}
