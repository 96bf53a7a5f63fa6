//! Batch-1 decode on Q8_0 blocks against bf16, in one run: the bench preset (Llama-3 style,
//! hidden 768, 12 layers, vocab 32000) with random bf16 weights, and the same weights
//! quantized to Q8_0 (every projection and the lm_head; `cpu::q8::quantize_mat`).
//! Prints weight bytes read per token, decode tok/s of each (best of rounds that alternate
//! the two) and their ratio. LLMAPI_BENCH_THREADS sets the thread count (default: all),
//! LLMAPI_BENCH_STEPS=32 the decode steps per round, LLMAPI_BENCH_ROUNDS=3 the rounds.
//! Run: `cargo bench -p llmapi-worker --bench q8`.

mod support;

use support::{chunk, random_model, run};

use std::time::Instant;

use llmapi_worker::backend::Backend;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::cpu::q8::quantize_mat;
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::{Mat, Mlp, ModelWeights};

const PRESET: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":768,
"intermediate_size":2048,"num_hidden_layers":12,"num_attention_heads":12,
"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":4096,
"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

const TPB: usize = 32;
const CTX: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn q8(m: &Mat) -> Mat {
    quantize_mat(m).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    })
}

/// `w` with every projection and the lm_head quantized to Q8_0.
fn quantized(w: &ModelWeights) -> ModelWeights {
    let mut out = w.clone();
    for l in &mut out.layers {
        l.qkv = q8(&l.qkv);
        l.o = q8(&l.o);
        if let Mlp::Dense(f) = &mut l.mlp {
            f.gate_up = q8(&f.gate_up);
            f.down = q8(&f.down);
        }
    }
    out.lm_head = Some(q8(w.lm_head()));
    out
}

fn main() {
    let threads = env_usize(
        "LLMAPI_BENCH_THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let (steps, rounds) = (
        env_usize("LLMAPI_BENCH_STEPS", 32),
        env_usize("LLMAPI_BENCH_ROUNDS", 3),
    );
    let bf16 = random_model(PRESET);
    let q8w = quantized(&bf16);
    let mut runs: Vec<(&str, usize, CpuBackend, f64)> = Vec::new();
    for (name, w) in [("bf16", bf16), ("q8_0", q8w)] {
        let bytes = w.bytes_per_token();
        let mut be = CpuBackend::new(w, KvDtype::Bf16, Some(threads)).expect("backend starts");
        be.init_kv((CTX + steps * rounds).div_ceil(TPB) + 1, TPB)
            .expect("kv allocates");
        runs.push((name, bytes, be, 0.0));
    }
    let table: Vec<u32> = (0..((CTX + steps * rounds).div_ceil(TPB) + 1) as u32).collect();
    let prompt: Vec<u32> = (0..CTX as u32).map(|i| (i * 7 + 1) % 32000).collect();
    for (_, _, be, _) in &mut runs {
        run(be, &[chunk(&prompt, 0, &table)]);
    }
    for round in 0..rounds {
        for (_, _, be, best) in &mut runs {
            let t = Instant::now();
            for s in 0..steps {
                let pos = CTX + round * steps + s;
                run(be, &[chunk(&[5], pos, &table)]);
            }
            *best = best.max(steps as f64 / t.elapsed().as_secs_f64());
        }
    }
    println!("batch-1 decode, {threads} threads, best of {rounds} rounds of {steps} steps");
    println!("| weights | bytes per token | tok/s |");
    println!("|---|---|---|");
    for (name, bytes, _, tps) in &runs {
        println!("| {name} | {:.1} MB | {tps:.1} |", *bytes as f64 / 1e6);
    }
    let ratio = runs[1].3 / runs[0].3;
    let bytes = runs[0].1 as f64 / runs[1].1 as f64;
    println!("q8_0 / bf16: {ratio:.2}x tok/s, {bytes:.2}x fewer bytes per token");
}
