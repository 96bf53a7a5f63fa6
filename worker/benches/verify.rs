//! What a speculative-decoding verification step costs on the CPU backend: one sequence with
//! a prefilled context runs steps of k tokens (the last token and k - 1 drafts) with logits
//! for every position, as the engine verifies drafts, against plain 1-token decode steps.
//!
//! Speculation pays when a step of k tokens costs much less than k decode steps: at batch 1
//! the weights are read once either way, so the ideal ratio is near 1. Printed per k: ms per
//! step and the ratio to a 1-token step, which is also the break-even: the tokens a step of
//! k must yield on average (Request AR) for speculation not to lose. Models: the "bench" preset (hidden 768, 12 layers, vocab
//! 32000) and a SmolLM2-135M-shaped one (hidden 576, 30 layers, vocab 49152, tied head),
//! random bf16 weights, bf16 arithmetic.
//!
//! Env: LLMAPI_BENCH_THREADS (default all), LLMAPI_BENCH_STEPS (24), LLMAPI_BENCH_ROUNDS (3),
//! LLMAPI_BENCH_CTX (256), LLMAPI_BENCH_KS (1,2,3,5,8), LLMAPI_BENCH_STREAM (`on`, `off` or
//! `both`: the weight-stream prefetch of few-row tiles, `bf16::set_stream_prefetch`; `both`
//! measures each k with it on and off, interleaved in every round, for an A/B in one run),
//! LLMAPI_BENCH_FMA (the same for the f32-FMA tiles of 3+ rows, `bf16::set_fma_tiles`).
//! Run: `cargo bench --workspace --bench verify`.

mod support;

use support::{env_usize, loadavg, process_cpu_ns, random_model, run};

use std::time::Instant;

use llmapi_common::args::ModelDtype;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::cpu::bf16::{set_fma_tiles, set_stream_prefetch};
use llmapi_worker::backend::{Backend, LogitsWanted, SeqChunk};
use llmapi_worker::engine::KvDtype;

const BENCH: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":768,
"intermediate_size":2048,"num_hidden_layers":12,"num_attention_heads":12,
"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":4096,
"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,
"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
"num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,
"rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;

const TPB: usize = 32;

/// Mean ms per step of `k` tokens, by the wall clock and on-CPU (all threads of the process:
/// spinning counts, being descheduled on a loaded machine does not), at positions `ctx..ctx + k`, every position's logits wanted
/// (k = 1: the last only, as plain decode). The same positions are recomputed each step, as a
/// rejected draft's KV is overwritten.
fn step_ms(be: &mut CpuBackend, table: &[u32], ctx: usize, k: usize, steps: usize) -> (f64, f64) {
    let tokens: Vec<u32> = (0..k as u32).map(|i| (i * 13 + 7) % 30000).collect();
    let logits = if k == 1 {
        LogitsWanted::Last
    } else {
        LogitsWanted::All
    };
    let chunk = [SeqChunk {
        tokens: &tokens,
        start_pos: ctx,
        block_table: table,
        logits,
    }];
    run(be, &chunk);
    let (t, cpu) = (Instant::now(), process_cpu_ns());
    for _ in 0..steps {
        run(be, &chunk);
    }
    let cpu_ms = match (cpu, process_cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6 / steps as f64,
        _ => f64::NAN,
    };
    (t.elapsed().as_secs_f64() * 1e3 / steps as f64, cpu_ms)
}

fn main() {
    let threads = std::env::var("LLMAPI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok());
    let steps = env_usize("LLMAPI_BENCH_STEPS", 24);
    let rounds = env_usize("LLMAPI_BENCH_ROUNDS", 3);
    let ctx = env_usize("LLMAPI_BENCH_CTX", 256);
    let ks: Vec<usize> = std::env::var("LLMAPI_BENCH_KS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3, 5, 8]);
    let switch = |name: &str| match std::env::var(name).as_deref() {
        Ok("off") => vec![false],
        Ok("both") => vec![true, false],
        _ => vec![true],
    };
    // (stream prefetch, FMA tiles) pairs measured side by side.
    let mut variants: Vec<(bool, bool)> = Vec::new();
    for s in switch("LLMAPI_BENCH_STREAM") {
        for f in switch("LLMAPI_BENCH_FMA") {
            variants.push((s, f));
        }
    }
    println!("load average at start: {}", loadavg());
    for (name, preset) in [("bench", BENCH), ("smollm2-shaped", SMOLLM2)] {
        let mut be = CpuBackend::new(random_model(preset), KvDtype::Bf16, threads)
            .and_then(|b| b.with_dtype(ModelDtype::Bfloat16))
            .expect("backend starts");
        let blocks = (ctx + 16).div_ceil(TPB);
        be.init_kv(blocks + 1, TPB).expect("kv allocates");
        let table: Vec<u32> = (0..blocks as u32).collect();
        let prompt: Vec<u32> = (0..ctx as u32).map(|i| (i * 7 + 1) % 30000).collect();
        run(
            &mut be,
            &[SeqChunk {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                logits: LogitsWanted::None,
            }],
        );
        // Best of `rounds`, the ks interleaved within each round so that load drifts hit all.
        let mut best = vec![vec![(f64::INFINITY, f64::INFINITY); ks.len()]; variants.len()];
        for _ in 0..rounds {
            for (i, &k) in ks.iter().enumerate() {
                for (b, &(stream, fma)) in best.iter_mut().zip(&variants) {
                    set_stream_prefetch(stream);
                    set_fma_tiles(fma);
                    let (wall, cpu) = step_ms(&mut be, &table, ctx, k, steps);
                    b[i] = (b[i].0.min(wall), b[i].1.min(cpu));
                }
            }
        }
        set_stream_prefetch(true);
        set_fma_tiles(true);
        println!("{name}: one sequence, context {ctx}, best of {rounds} rounds of {steps} steps");
        for (best, &(stream, fma)) in best.iter().zip(&variants) {
            let one = ks
                .iter()
                .position(|&k| k == 1)
                .map_or((f64::NAN, f64::NAN), |i| best[i]);
            let on = |b: bool| if b { "on" } else { "off" };
            // The ratio is also the break-even: a step of k must yield more tokens than it.
            println!("  stream prefetch {}, FMA tiles {}", on(stream), on(fma));
            println!(
                "  k tokens | ms/step | vs 1-token step (= tokens a step must yield) | on-CPU ms/step | vs 1-token"
            );
            for (&k, &(ms, cpu)) in ks.iter().zip(best) {
                println!(
                    "  {k:>8} | {ms:>7.2} | {:>6.2}x | {cpu:>7.2} | {:>6.2}x",
                    ms / one.0,
                    cpu / one.1
                );
            }
        }
    }
    println!("load average at end: {}", loadavg());
}
