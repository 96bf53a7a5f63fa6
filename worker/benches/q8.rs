//! Batch-1 decode and prefill on GGUF blocks against bf16, in one run: the bench preset
//! (Llama-3 style, hidden 768, 12 layers, vocab 32000) with random bf16 weights, the same
//! weights quantized to Q8_0 (every projection and the lm_head; `cpu::q8::quantize_mat`),
//! to Q4_K with a Q6_K lm_head (as a Q4_K_M file keeps `output.weight`;
//! `cpu::q4k::quantize_mat`), and to Q4_1 with a Q8_0 lm_head (as SmolLM2's Q4_1 file keeps
//! its tied embedding; `cpu::q4::quantize_mat`; its "before" is the bf16 row: Q4_1 was
//! dequantized to bf16 at load). Prints weight bytes read per token, decode tok/s of each (best
//! of rounds that alternate the weights), prefill tok/s of one 512-token prompt (best of
//! LLMAPI_BENCH_PREFILL_ROUNDS=2) and the ratios to bf16. LLMAPI_BENCH_THREADS sets the
//! thread count (default: all), LLMAPI_BENCH_STEPS=32 the decode steps per round,
//! LLMAPI_BENCH_ROUNDS=3 the rounds, LLMAPI_BENCH_PROMPT=512 the prefill length. Where
//! the CPU has AVX512-VNNI, each block format runs twice in the same rounds, "before" (the
//! one-row block dots up to 8 rows, dequantized weights past them) and "tiles" (the VNNI
//! tiles up to `linear::BLOCK_TILE_ROWS` input rows, the gemm on dequantized weights past
//! them), as do the single-thread projection figures.
//! Run: `cargo bench -p llmapi-worker --bench q8`.

mod support;

use support::{chunk, env_usize, random_model, run};

use std::time::Instant;

use llmapi_worker::backend::Backend;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::cpu::linear::{BLOCK_TILE_ROWS, set_block_tile_rows};
use llmapi_worker::backend::cpu::{q4, q4k, q8};
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::dequant::GgmlType;
use llmapi_worker::model::{Mat, Mlp, ModelWeights, WeightData};

const PRESET: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":768,
"intermediate_size":2048,"num_hidden_layers":12,"num_attention_heads":12,
"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":4096,
"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

const TPB: usize = 32;
const CTX: usize = 64;
/// Sequences of the batched decode, one KV block each (8 prompt + 2 x 8 decoded tokens).
const BATCH: usize = 16;

/// Single-thread ns per weight row of each supported kernel on `w` (Q8_0 or k-quant),
/// best of 5 sweeps of all rows: whether AVX512-VNNI pays over AVX2 apart from threading.
fn kernel_sweeps(name: &str, w: &Mat) {
    let k = w.cols;
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let (x8, xk) = (q8::quantize_row(&x), q4k::quantize_row_q8k(&x));
    let one_row_dots = !matches!(w.data, WeightData::Q4(_));
    for kernel in q8::QKernel::ALL
        .into_iter()
        .filter(|k| k.supported() && one_row_dots)
    {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let mut s = 0.0f32;
            for r in 0..w.rows {
                s += match &w.data {
                    WeightData::Q8_0 { q, d } => q8::dot_row_with(
                        kernel,
                        &q[r * k..(r + 1) * k],
                        &d[r * k / 32..(r + 1) * k / 32],
                        &x8,
                    ),
                    WeightData::KQuant(b) => {
                        let (ty, row) = b.row(r, k);
                        q4k::dot_with(kernel, ty, row, &xk)
                    }
                    _ => 0.0,
                };
            }
            std::hint::black_box(s);
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / w.rows as f64);
        }
        println!(
            "{name} {}x{k}, {kernel:?}: {best:.0} ns a row, {:.1} GB/s of weights (1 thread)",
            w.rows,
            w.bytes() as f64 / w.rows as f64 / best
        );
    }
    // The whole projection as the engine runs it (tiles where the CPU has VNNI), on one
    // thread: ns per weight row for 1 input row and for BATCH rows.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a 1-thread pool starts");
    for (rows, (mode, tile_rows)) in [1, BATCH]
        .into_iter()
        .flat_map(|r| [(r, ("before", 0)), (r, ("tiles", BLOCK_TILE_ROWS))])
    {
        set_block_tile_rows(tile_rows);
        let xs: Vec<f32> = (0..rows).flat_map(|_| x.iter().copied()).collect();
        let mut out = vec![0.0f32; rows * w.rows];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            pool.install(|| {
                llmapi_worker::backend::cpu::linear::linear(
                    llmapi_worker::backend::cpu::linear::GemmDtype::F32,
                    &xs,
                    rows,
                    w,
                    &mut out,
                )
            });
            std::hint::black_box(&out);
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / w.rows as f64);
        }
        println!(
            "{name} {}x{k}, linear of {rows} input rows ({mode}): {best:.0} ns a weight \
             row, {:.1} GB/s of weights (1 thread)",
            w.rows,
            w.bytes() as f64 / w.rows as f64 / best
        );
    }
    set_block_tile_rows(BLOCK_TILE_ROWS);
}

fn or_exit(m: Result<Mat, String>) -> Mat {
    m.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    })
}

/// `w` with every projection quantized by `proj` and the lm_head by `head`.
fn quantized(
    w: &ModelWeights,
    proj: impl Fn(&Mat) -> Mat,
    head: impl Fn(&Mat) -> Mat,
) -> ModelWeights {
    let mut out = w.clone();
    for l in &mut out.layers {
        l.qkv = proj(&l.qkv);
        l.o = proj(&l.o);
        if let Mlp::Dense(f) = &mut l.mlp {
            f.gate_up = proj(&f.gate_up);
            f.down = proj(&f.down);
        }
    }
    out.lm_head = Some(head(w.lm_head()));
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
    let prompt_len = env_usize("LLMAPI_BENCH_PROMPT", 512);
    let prefill_rounds = env_usize("LLMAPI_BENCH_PREFILL_ROUNDS", 2);
    let bf16 = random_model(PRESET);
    let q8w = quantized(
        &bf16,
        |m| or_exit(q8::quantize_mat(m)),
        |m| or_exit(q8::quantize_mat(m)),
    );
    let q4w = quantized(
        &bf16,
        |m| or_exit(q4k::quantize_mat(m, GgmlType::Q4K)),
        |m| or_exit(q4k::quantize_mat(m, GgmlType::Q6K)),
    );
    let q41w = quantized(
        &bf16,
        |m| or_exit(q4::quantize_mat(m, true)),
        |m| or_exit(q8::quantize_mat(m)),
    );
    if let (Mlp::Dense(a), Mlp::Dense(b), Mlp::Dense(c)) =
        (&q8w.layers[0].mlp, &q4w.layers[0].mlp, &q41w.layers[0].mlp)
    {
        kernel_sweeps("q8_0 gate_up", &a.gate_up);
        kernel_sweeps("q4_k gate_up", &b.gate_up);
        kernel_sweeps("q4_1 gate_up", &c.gate_up);
    }
    kernel_sweeps("q6_k lm_head", q4w.lm_head());
    let decode_blocks = (CTX + steps * rounds).div_ceil(TPB) + 1;
    let prefill_blocks = prompt_len.div_ceil(TPB) + 1;
    // Each block format runs twice on one backend: "before" (the one-row block dots up to 8
    // rows, dequantized weights past them; `set_block_tile_rows(0)`) and "tiles" (the
    // engine's default: the VNNI tiles up to BLOCK_TILE_ROWS rows where the CPU has them).
    let mut backends = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    for (name, w) in [("bf16", bf16), ("q8_0", q8w), ("q4_k", q4w), ("q4_1", q41w)] {
        let bytes = w.bytes_per_token();
        let mut be = CpuBackend::new(w, KvDtype::Bf16, Some(threads)).expect("backend starts");
        be.init_kv(decode_blocks + prefill_blocks + BATCH, TPB)
            .expect("kv allocates");
        let modes: &[(&str, usize)] = if name == "bf16" {
            &[("", BLOCK_TILE_ROWS)]
        } else if name == "q4_1" {
            // Before the Q4 tiles, Q4_1 ran as bf16 (the first row).
            &[("", BLOCK_TILE_ROWS)]
        } else if q8::tiles_supported() {
            &[(" before", 0), (" tiles", BLOCK_TILE_ROWS)]
        } else {
            &[("", BLOCK_TILE_ROWS)]
        };
        for &(mode, tile_rows) in modes {
            runs.push(Run {
                name: format!("{name}{mode}"),
                bytes,
                backend: backends.len(),
                tile_rows,
                decode: 0.0,
                prefill: 0.0,
                batch: 0.0,
            });
        }
        backends.push(be);
    }
    let table: Vec<u32> = (0..decode_blocks as u32).collect();
    let prefill_table: Vec<u32> =
        (decode_blocks as u32..(decode_blocks + prefill_blocks) as u32).collect();
    let prompt: Vec<u32> = (0..CTX as u32).map(|i| (i * 7 + 1) % 32000).collect();
    let long: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 13 + 5) % 32000)
        .collect();
    for be in &mut backends {
        run(be, &[chunk(&prompt, 0, &table)]);
    }
    for round in 0..rounds {
        for r in &mut runs {
            set_block_tile_rows(r.tile_rows);
            let be = &mut backends[r.backend];
            let t = Instant::now();
            for s in 0..steps {
                let pos = CTX + round * steps + s;
                run(be, &[chunk(&[5], pos, &table)]);
            }
            r.decode = r.decode.max(steps as f64 / t.elapsed().as_secs_f64());
        }
    }
    for _ in 0..prefill_rounds {
        for r in &mut runs {
            set_block_tile_rows(r.tile_rows);
            let t = Instant::now();
            run(&mut backends[r.backend], &[chunk(&long, 0, &prefill_table)]);
            r.prefill = r.prefill.max(prompt_len as f64 / t.elapsed().as_secs_f64());
        }
    }
    let first = (decode_blocks + prefill_blocks) as u32;
    let tables: Vec<[u32; 1]> = (0..BATCH as u32).map(|i| [first + i]).collect();
    let short: Vec<u32> = (0..8u32).map(|i| i * 11 + 3).collect();
    for be in &mut backends {
        let chunks: Vec<_> = tables.iter().map(|t| chunk(&short, 0, t)).collect();
        run(be, &chunks);
    }
    for round in 0..2 {
        for r in &mut runs {
            set_block_tile_rows(r.tile_rows);
            let be = &mut backends[r.backend];
            let t = Instant::now();
            for s in 0..8 {
                let chunks: Vec<_> = tables
                    .iter()
                    .map(|t| chunk(&[5], 8 + round * 8 + s, t))
                    .collect();
                run(be, &chunks);
            }
            r.batch = r.batch.max((BATCH * 8) as f64 / t.elapsed().as_secs_f64());
        }
    }
    set_block_tile_rows(BLOCK_TILE_ROWS);
    println!(
        "{threads} threads, load {}: batch-1 decode best of {rounds} rounds of {steps} steps, \
         prefill of {prompt_len} tokens best of {prefill_rounds}, \
         decode of {BATCH} sequences best of 2 rounds of 8 steps",
        support::loadavg()
    );
    println!("| weights | bytes per token | decode tok/s | prefill tok/s | batch-{BATCH} tok/s |");
    println!("|---|---|---|---|---|");
    for r in &runs {
        let mb = r.bytes as f64 / 1e6;
        println!(
            "| {} | {mb:.1} MB | {:.1} | {:.1} | {:.1} |",
            r.name, r.decode, r.prefill, r.batch
        );
    }
    for r in &runs[1..] {
        println!(
            "{} / bf16: {:.2}x decode, {:.2}x prefill, {:.2}x batch-{BATCH} decode tok/s, \
             {:.2}x fewer bytes per token",
            r.name,
            r.decode / runs[0].decode,
            r.prefill / runs[0].prefill,
            r.batch / runs[0].batch,
            runs[0].bytes as f64 / r.bytes as f64
        );
    }
}

/// One measured configuration: weights, the backend holding them, the block-tile setting.
struct Run {
    name: String,
    bytes: usize,
    backend: usize,
    tile_rows: usize,
    decode: f64,
    prefill: f64,
    batch: f64,
}
