//! Helpers shared by the worker's benchmarks: an in-memory Llama-shaped model with random
//! bf16 weights, and one-token decode chunks.
// Each bench binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;

use llmapi_common::model_config::ModelConfig;
use llmapi_worker::backend::{Backend, LogitsWanted, SeqChunk};
use llmapi_worker::model::{Ffn, Layer, Mat, Mlp, ModelWeights, Shard, WeightData};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// A `rows x cols` bf16 matrix, uniform in +-1/sqrt(cols); each row seeded from `seed` and
/// its index, so rows are drawn in parallel and the result does not depend on the pool.
fn random_mat(seed: u64, rows: usize, cols: usize) -> Mat {
    let scale = 1.0 / (cols as f32).sqrt();
    let data = (0..rows)
        .into_par_iter()
        .flat_map_iter(|r| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed * 1_000_003 + r as u64);
            (0..cols)
                .map(move |_| half::bf16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * scale))
                .map(half::bf16::to_bits)
                .collect::<Vec<u16>>()
        })
        .collect();
    Mat {
        rows,
        cols,
        data: WeightData::Bf16(data),
    }
}

/// A random FFN of inner width `inter`, seeds from `seed`.
fn random_ffn(seed: u64, h: usize, inter: usize) -> Ffn {
    Ffn {
        gate_up: random_mat(seed, 2 * inter, h),
        down: random_mat(seed + 1, h, inter),
        inter,
    }
}

/// A Llama-family model of the shape `config_json` gives (an HF config.json text), with
/// random bf16 weights, unit norms and an untied lm_head; MoE layers (a config with experts)
/// get random experts and router, without a shared expert.
pub fn random_model(config_json: &str) -> ModelWeights {
    let config =
        ModelConfig::from_json_str(config_json, Path::new("bench preset")).expect("preset parses");
    let c = &config;
    let (h, d) = (c.hidden_size, c.head_dim);
    let qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * d;
    let layers = (0..c.num_hidden_layers as u64)
        .map(|i| Layer {
            input_norm: vec![1.0; h],
            post_norm: vec![1.0; h],
            qkv: random_mat(10 * i + 1, qkv_rows, h),
            qkv_bias: None,
            o: random_mat(10 * i + 2, h, c.num_attention_heads * d),
            o_bias: None,
            qk_norm: None,
            mlp: match c.moe.as_ref().filter(|_| c.is_sparse_layer(i as usize)) {
                None => Mlp::Dense(random_ffn(10 * i + 3, h, c.intermediate_size)),
                Some(m) => Mlp::Moe {
                    router: random_mat(10 * i + 5, m.num_experts, h),
                    experts: (0..m.num_experts as u64)
                        .map(|e| random_ffn(10_000 * (i + 1) + 2 * e, h, m.moe_intermediate_size))
                        .collect(),
                    first_expert: 0,
                    top_k: m.num_experts_per_tok,
                    norm_topk_prob: m.norm_topk_prob,
                    shared: None,
                },
            },
        })
        .collect();
    ModelWeights {
        embed: random_mat(1_000_001, c.vocab_size, h),
        lm_head: Some(random_mat(1_000_002, c.vocab_size, h)),
        norm: vec![1.0; h],
        layers,
        config,
        shard: Shard::whole(),
    }
}

/// A chunk that wants the last position's logits.
pub fn chunk<'a>(tokens: &'a [u32], start_pos: usize, block_table: &'a [u32]) -> SeqChunk<'a> {
    SeqChunk {
        tokens,
        start_pos,
        block_table,
        logits: LogitsWanted::Last,
    }
}

/// Runs one step; a failure ends the bench with its message.
pub fn run(be: &mut dyn Backend, chunks: &[SeqChunk<'_>]) {
    if let Err(e) = be.forward(chunks) {
        eprintln!("forward failed: {e}");
        std::process::exit(1);
    }
}

/// GB/s of a parallel summing read of 1 GiB on `pool`: much larger than the caches, so it
/// measures what the pool's threads read from memory together (the roofline's bandwidth).
pub fn read_bandwidth(pool: &rayon::ThreadPool) -> f64 {
    let buf: Vec<u64> = (0..(1usize << 30) / 8).map(|i| i as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(s);
        best = best.max(buf.len() as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Nanoseconds all threads of this process have run on a CPU (Linux schedstat), if readable.
/// Threads waiting for the pool sleep or spin briefly; spinning counts, sleeping does not.
pub fn process_cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let s = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The value of the environment variable `name` as a number, or `default` when it is unset
/// or not one.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
