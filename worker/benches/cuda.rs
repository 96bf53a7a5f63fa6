//! CUDA backend throughput on a 1B-class Llama-shaped checkpoint with random bf16 weights
//! (Llama 3.2 1B's shape: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
//! vocab 128256), built in memory, or the checkpoint LLMAPI_BENCH_MODEL names.
//!
//! Prints one `key=value` line per figure (scripts/gpu_check.sh reads them): device copy
//! bandwidth, weight bytes per decoded token, batch-1 decode ms/token and its fraction of the
//! HBM roofline (bytes per token / copy bandwidth), and decode throughput at the batch sizes
//! of LLMAPI_BENCH_BATCHES (default 64,256) after 128-token prompts, each with the greedy
//! token picked on the device and (`_logits_` keys) with every logits row copied to the host,
//! then (`graphs_` keys) with decode steps replayed as CUDA graphs. Then the same, keys
//! prefixed `moe_`, for a Qwen3-MoE shape (`MOE_PRESET`) at batch 1 and 64, unless
//! LLMAPI_BENCH_MOE=0. Without a usable GPU it
//! prints why and exits with status 2 (so a script cannot mistake it for a result). Warnings
//! are logged to stderr (`RUST_LOG` widens or narrows that).
//! Build for a GPU machine: `cargo bench -p llmapi-worker --bench cuda --no-run`.

mod support;

use support::random_model;

use std::path::Path;
use std::time::Instant;

use llmapi_common::args::CudaGraphConfig;
use llmapi_worker::backend::cuda::graphs::GraphSizes;
use llmapi_worker::backend::cuda::select::probe;
use llmapi_worker::backend::cuda::{CudaBackend, CudaSettings, copy_bandwidth_gbs};
use llmapi_worker::backend::{Backend, LogitsWanted, SeqChunk};
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::ModelWeights;

const PRESET: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2048,
"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

/// Qwen3-30B-A3B's shape (128 experts of width 768, 8 per token, 32 query and 4 KV heads of
/// 128) cut to 8 layers so that random weights are drawn in seconds: 5.6 B parameters, of
/// which 0.77 B are read per decoded token at batch 1.
const MOE_PRESET: &str = r#"{"architectures":["Qwen3MoeForCausalLM"],"hidden_size":2048,
"intermediate_size":6144,"num_hidden_layers":8,"num_attention_heads":32,
"num_key_value_heads":4,"head_dim":128,"vocab_size":151936,"max_position_embeddings":8192,
"rope_theta":1000000.0,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"num_experts":128,
"num_experts_per_tok":8,"moe_intermediate_size":768,"norm_topk_prob":true,
"decoder_sparse_step":1,"mlp_only_layers":[]}"#;

const PROMPT: usize = 128;
const TPB: usize = 32;

/// Seconds per decode step of `batch` sequences, over `steps` steps after a prefill of
/// PROMPT tokens each (prefilled 16 sequences per step); `greedy` steps pick the tokens on
/// the device (`forward_greedy`, the engine's path for greedy requests), the others copy
/// every logits row to the host (`forward`, the path of sampled requests).
fn decode_seconds(be: &mut CudaBackend, batch: usize, steps: usize, greedy: bool) -> f64 {
    let vocab = be.vocab_size() as u32;
    let blocks = (PROMPT + steps + 1).div_ceil(TPB);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * blocks) as u32..((i + 1) * blocks) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..PROMPT)
                .map(|j| ((i * 7919 + j * 104_729) as u32) % vocab)
                .collect()
        })
        .collect();
    for group in (0..batch).collect::<Vec<_>>().chunks(16) {
        let chunks: Vec<SeqChunk> = group
            .iter()
            .map(|&i| SeqChunk {
                tokens: &prompts[i],
                start_pos: 0,
                block_table: &tables[i],
                logits: LogitsWanted::Last,
            })
            .collect();
        be.forward(&chunks).expect("prefill");
    }
    let tokens: Vec<[u32; 1]> = (0..batch).map(|i| [(i as u32 * 31) % vocab]).collect();
    let step = |be: &mut CudaBackend, s: usize| {
        let chunks: Vec<SeqChunk> = (0..batch)
            .map(|i| SeqChunk {
                tokens: &tokens[i],
                start_pos: PROMPT + s,
                block_table: &tables[i],
                logits: LogitsWanted::Last,
            })
            .collect();
        if greedy {
            be.forward_greedy(&chunks).expect("decode step");
        } else {
            be.forward(&chunks).expect("decode step");
        }
    };
    step(be, 0);
    let t = Instant::now();
    for s in 1..=steps {
        step(be, s);
    }
    t.elapsed().as_secs_f64() / steps as f64
}

/// Builds a backend for `w` and prints its figures, each key prefixed with `prefix`.
fn measure(prefix: &str, w: ModelWeights, batches: &[usize], bw: f64) {
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
    let bytes_per_token = w.bytes_per_token();
    let settings = CudaSettings {
        device: 0,
        max_num_tokens: 16 * PROMPT,
        max_batch_size: max_batch,
        kv_dtype: KvDtype::Auto,
        max_seq_len: PROMPT + 80,
        cuda_graphs: None,
    };
    let mut be = CudaBackend::new(w, &settings).unwrap_or_else(|e| {
        eprintln!("cuda bench: {e}");
        std::process::exit(1)
    });
    println!("{prefix}device={}", be.device_description());
    let blocks = max_batch * (PROMPT + 80).div_ceil(TPB);
    be.init_kv(blocks, TPB).expect("KV pool");
    println!("{prefix}bytes_per_token={bytes_per_token}");
    let b1 = decode_seconds(&mut be, 1, 64, true);
    let roofline = bytes_per_token as f64 / (bw * 1e9);
    println!("{prefix}batch1_ms_per_token={:.3}", b1 * 1e3);
    println!("{prefix}batch1_roofline_ms={:.3}", roofline * 1e3);
    println!("{prefix}batch1_roofline_fraction={:.2}", roofline / b1);
    let b1_logits = decode_seconds(&mut be, 1, 64, false);
    println!("{prefix}batch1_logits_ms_per_token={:.3}", b1_logits * 1e3);
    for &b in batches {
        let s = decode_seconds(&mut be, b, 32, true);
        println!("{prefix}batch{b}_tokens_per_s={:.0}", b as f64 / s);
        let s = decode_seconds(&mut be, b, 32, false);
        println!("{prefix}batch{b}_logits_tokens_per_s={:.0}", b as f64 / s);
    }
    // The same decode steps replayed as CUDA graphs (padded sizes up to the largest batch).
    let graphs = CudaGraphConfig {
        enable_padding: true,
        max_batch_size: max_batch as u32,
        batch_sizes: None,
    };
    be.set_cuda_graphs(GraphSizes::from_config(Some(&graphs), max_batch))
        .expect("CUDA graphs on");
    let b1 = decode_seconds(&mut be, 1, 64, true);
    println!("{prefix}graphs_batch1_ms_per_token={:.3}", b1 * 1e3);
    for &b in batches {
        let s = decode_seconds(&mut be, b, 32, true);
        println!("{prefix}graphs_batch{b}_tokens_per_s={:.0}", b as f64 / s);
    }
    println!("{prefix}graphs_captured={:?}", be.captured_graphs());
}

fn main() {
    // Warnings (a CUDA graph capture that falls back, with its cause) go to stderr.
    llmapi_common::telemetry::init_logging("warning", llmapi_common::telemetry::LogFormat::Text);
    if let Err(e) = probe() {
        eprintln!("cuda bench: no usable GPU: {e}");
        std::process::exit(2);
    }
    let batches: Vec<usize> = std::env::var("LLMAPI_BENCH_BATCHES")
        .unwrap_or_else(|_| "64,256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let bw = copy_bandwidth_gbs(0).expect("copy bandwidth");
    println!("copy_bandwidth_gbs={bw:.0}");
    let t = Instant::now();
    let w = match std::env::var_os("LLMAPI_BENCH_MODEL") {
        Some(dir) => ModelWeights::load(Path::new(&dir)).expect("LLMAPI_BENCH_MODEL loads"),
        None => random_model(PRESET),
    };
    println!("weights_seconds={:.1}", t.elapsed().as_secs_f64());
    measure("", w, &batches, bw);
    if std::env::var("LLMAPI_BENCH_MOE").is_ok_and(|v| v == "0") {
        return;
    }
    let t = Instant::now();
    let w = random_model(MOE_PRESET);
    println!("moe_weights_seconds={:.1}", t.elapsed().as_secs_f64());
    measure("moe_", w, &[64], bw);
}
