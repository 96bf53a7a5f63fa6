//! Engine throughput on the "bench" preset (Llama-3 style: hidden 768, 12 layers, 12 heads,
//! 4 KV heads, intermediate 2048, vocab 32000, bf16 weights), through the CPU backend.
//!
//! Prints: measured memory read bandwidth, batch-1 decode tok/s and its ratio to the roofline
//! (weight bytes per token / bandwidth), decode throughput at batch 8/32/64 and prefill tok/s
//! for 512-token prompts (decode and prefill also by on-CPU time). Random weights are generated in-process unless LLMAPI_BENCH_MODEL
//! names a checkpoint directory. LLMAPI_BENCH_THREADS sets the thread count (default: all);
//! LLMAPI_BENCH_SKIP_PREFILL=1 skips the prefill figure (for profiling decode);
//! LLMAPI_BENCH_DTYPE=float32|bfloat16|both (default both) picks the projection arithmetic,
//! each mode on its own backend of the same weights, ending with one table of both.
//! LLMAPI_BENCH_BATCHES=8,32,64 and LLMAPI_BENCH_STEPS=16 set the batched decode runs, and
//! LLMAPI_BENCH_ROUNDS=3 how many rounds each figure alternates the modes (the best counts).
//! LLMAPI_BENCH_PANEL_PATH=plain,l2,l1 (default: the library's) runs bfloat16 once per
//! path of the packed-panel GEMM (`bf16::PanelPath`: plain, next panel prefetched to L2 or
//! L1), all on one backend, switching between rounds (the order reversed every other round),
//! and prints each path's per-round rate over the first one's. LLMAPI_BENCH_HUGE_PAGES=0 packs
//! the bf16 panels without asking for transparent huge pages (the library asks by default).
//! LLMAPI_BENCH_STEP_PATH=before,fused runs bfloat16 the same way once per step path
//! (`cpu::set_fused_step`: the serial epilogues of a step, or the fused batch ones), crossed
//! with the panel paths when both are given.
//! LLMAPI_BENCH_STREAM=off and LLMAPI_BENCH_FMA=off turn off the weight-stream prefetch of
//! few-row tiles and the f32-FMA tiles of 3+ rows (`bf16::set_stream_prefetch`,
//! `bf16::set_fma_tiles`) for the whole run, the kernels before them, to compare runs.
//! Run: `cargo bench -p llmapi-worker --bench engine`.

mod support;

use support::{chunk, process_cpu_ns, random_model, read_bandwidth, run};

use std::path::Path;
use std::time::Instant;

use llmapi_common::args::ModelDtype;
use llmapi_worker::backend::cpu::bf16::{
    PanelPath, panel_path, set_fma_tiles, set_panel_path, set_stream_prefetch,
    set_weight_huge_pages,
};
use llmapi_worker::backend::cpu::{CpuBackend, fused_step, set_fused_step};
use llmapi_worker::backend::{Backend, SeqChunk};
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::ModelWeights;

const PRESET: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":768,
"intermediate_size":2048,"num_hidden_layers":12,"num_attention_heads":12,
"num_key_value_heads":4,"vocab_size":32000,"max_position_embeddings":4096,
"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

const TPB: usize = 32;

/// `batch` sequences with `ctx` tokens of context prefilled, advanced one token per step.
struct Decoder {
    tables: Vec<Vec<u32>>,
    pos: usize,
}

impl Decoder {
    /// Prefills the contexts, with room for `max_steps` decode steps.
    fn new(be: &mut CpuBackend, batch: usize, ctx: usize, max_steps: usize) -> Self {
        let per_seq = (ctx + max_steps).div_ceil(TPB);
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let prompt: Vec<u32> = (0..ctx as u32).map(|i| (i * 7 + 1) % 32000).collect();
        let setup: Vec<SeqChunk<'_>> = tables.iter().map(|t| chunk(&prompt, 0, t)).collect();
        run(be, &setup);
        Self { tables, pos: ctx }
    }

    /// Decode tok/s over `steps` steps: by the wall clock, and by the time the process's
    /// threads ran on a CPU divided by `threads` (what the wall clock would read with the
    /// cores to ourselves).
    fn steps(&mut self, be: &mut CpuBackend, steps: usize, threads: usize) -> (f64, f64) {
        let batch = self.tables.len();
        let toks: Vec<[u32; 1]> = (0..batch).map(|s| [s as u32 + 5]).collect();
        let cpu0 = process_cpu_ns();
        let t = Instant::now();
        for _ in 0..steps {
            let chunks: Vec<SeqChunk<'_>> = (0..batch)
                .map(|s| chunk(&toks[s], self.pos, &self.tables[s]))
                .collect();
            run(be, &chunks);
            self.pos += 1;
        }
        let wall = t.elapsed().as_secs_f64();
        let tokens = (batch * steps) as f64;
        let cpu = match (cpu0, process_cpu_ns()) {
            (Some(a), Some(b)) if b > a => tokens / ((b - a) as f64 / 1e9 / threads as f64),
            _ => f64::NAN,
        };
        (tokens / wall, cpu)
    }
}

/// A comma-separated list of numbers from the environment, or `default`.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim().parse().unwrap_or_else(|_| {
                    eprintln!("{name}={s}: expected numbers like 8,32,64");
                    std::process::exit(2)
                })
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn main() {
    if std::env::var("LLMAPI_BENCH_STREAM").as_deref() == Ok("off") {
        set_stream_prefetch(false);
    }
    if std::env::var("LLMAPI_BENCH_FMA").as_deref() == Ok("off") {
        set_fma_tiles(false);
    }
    let threads = std::env::var("LLMAPI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok());
    let dtypes = match std::env::var("LLMAPI_BENCH_DTYPE").as_deref() {
        Ok("float32") => vec![ModelDtype::Float32],
        Ok("bfloat16") => vec![ModelDtype::Bfloat16],
        Ok("both") | Err(_) => vec![ModelDtype::Float32, ModelDtype::Bfloat16],
        Ok(other) => {
            eprintln!("LLMAPI_BENCH_DTYPE={other}: expected float32, bfloat16 or both");
            std::process::exit(2);
        }
    };
    let weights = match std::env::var("LLMAPI_BENCH_MODEL") {
        Ok(dir) => ModelWeights::load(Path::new(&dir)).expect("LLMAPI_BENCH_MODEL loads"),
        Err(_) => random_model(PRESET),
    };
    let bytes_per_token = weights.bytes_per_token();
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    let pool = builder.build().expect("pool");
    let bw = read_bandwidth(&pool);
    drop(pool);
    let roofline = bw * 1e9 / bytes_per_token as f64;
    println!(
        "threads: {}",
        threads.unwrap_or_else(rayon::current_num_threads)
    );
    println!("memory read bandwidth: {bw:.1} GB/s");
    println!(
        "weight bytes per decoded token: {:.1} MB",
        bytes_per_token as f64 / 1e6
    );
    let paths: Vec<PanelPath> = match std::env::var("LLMAPI_BENCH_PANEL_PATH") {
        Ok(s) => s
            .split(',')
            .map(|x| match x.trim() {
                "plain" => PanelPath::Plain,
                "l2" => PanelPath::NextToL2,
                "l1" => PanelPath::NextToL1,
                other => {
                    eprintln!("LLMAPI_BENCH_PANEL_PATH: {other}: expected plain, l2 or l1");
                    std::process::exit(2)
                }
            })
            .collect(),
        Err(_) => vec![panel_path()],
    };
    if std::env::var("LLMAPI_BENCH_HUGE_PAGES").is_ok_and(|v| v == "0") {
        set_weight_huge_pages(false);
    }
    let steps_paths: Vec<bool> = match std::env::var("LLMAPI_BENCH_STEP_PATH") {
        Ok(s) => s
            .split(',')
            .map(|x| match x.trim() {
                "before" => false,
                "fused" => true,
                other => {
                    eprintln!("LLMAPI_BENCH_STEP_PATH: {other}: expected before or fused");
                    std::process::exit(2)
                }
            })
            .collect(),
        Err(_) => vec![fused_step()],
    };
    // Every (panel path, step path) pair.
    let paths: Vec<(PanelPath, bool)> = paths
        .iter()
        .flat_map(|&p| steps_paths.iter().map(move |&f| (p, f)))
        .collect();
    // One backend per dtype; bfloat16 with several panel paths runs them all on its one
    // backend (the same weights in the same memory), switching the path between rounds.
    let mut bes: Vec<CpuBackend> = Vec::new();
    // (name, backend index, (panel path, step path)).
    let mut backends: Vec<(String, usize, (PanelPath, bool))> = Vec::new();
    for &dtype in &dtypes {
        let name = format!("{dtype:?}").to_lowercase();
        let mut be = CpuBackend::new(weights.clone(), KvDtype::Bf16, threads)
            .and_then(|b| b.with_dtype(dtype))
            .expect("backend starts");
        let uses = if dtype == ModelDtype::Bfloat16 {
            paths.len()
        } else {
            1
        };
        be.init_kv(64 * 24 * uses, TPB).expect("kv allocates");
        println!("[{name}] projections: {:?}", be.gemm_dtype());
        bes.push(be);
        if dtype == ModelDtype::Bfloat16 && paths.len() > 1 {
            for &(pf, fused) in &paths {
                let step = if fused { "fused" } else { "before" };
                let label = if steps_paths.len() > 1 {
                    format!("{name} {pf:?} {step}")
                } else {
                    format!("{name} {pf:?}")
                };
                backends.push((label.to_lowercase(), bes.len() - 1, (pf, fused)));
            }
        } else {
            backends.push((name, bes.len() - 1, paths[0]));
        }
    }
    drop(weights);
    // Every figure alternates the modes over `rounds` rounds and keeps each mode's best, so
    // load from other processes hits both modes alike and mostly drops out.
    let rounds = env_list("LLMAPI_BENCH_ROUNDS", &[3])[0].max(1);
    let steps = env_list("LLMAPI_BENCH_STEPS", &[16])[0].max(1);
    let mut batches = vec![1];
    batches.extend(env_list("LLMAPI_BENCH_BATCHES", &[8, 32, 64]));
    let mut best = vec![vec![0.0f64; batches.len() + 1]; backends.len()];
    let mut best_cpu = vec![vec![0.0f64; batches.len() + 1]; backends.len()];
    let nthreads = threads.unwrap_or_else(rayon::current_num_threads);
    // Every round's (wall, on-CPU) rate per mode and batch, for the paired ratios at the end.
    let mut per_round = vec![vec![Vec::<(f64, f64)>::new(); batches.len()]; backends.len()];
    for (bi, &batch) in batches.iter().enumerate() {
        let n = if batch == 1 { 64 } else { steps };
        let mut decoders: Vec<Decoder> = bes
            .iter_mut()
            .enumerate()
            .map(|(i, be)| {
                let uses = backends.iter().filter(|m| m.1 == i).count();
                Decoder::new(be, batch, 128, n * rounds * uses)
            })
            .collect();
        for r in 0..rounds {
            // Every other round runs the modes in reverse order, so neither goes first always.
            let mut order: Vec<usize> = (0..backends.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for m in order {
                let (name, b, (pf, fused)) = &backends[m];
                set_panel_path(*pf);
                set_fused_step(*fused);
                let (tps, cpu) = decoders[*b].steps(&mut bes[*b], n, nthreads);
                best[m][bi] = best[m][bi].max(tps);
                best_cpu[m][bi] = best_cpu[m][bi].max(cpu);
                per_round[m][bi].push((tps, cpu));
                println!("[{name}] decode batch {batch}: {tps:.1} tok/s ({cpu:.1} by on-CPU time)");
            }
        }
    }
    let prefill = std::env::var_os("LLMAPI_BENCH_SKIP_PREFILL").is_none();
    if prefill {
        let prompt: Vec<u32> = (0..512u32).map(|i| (i * 13 + 2) % 32000).collect();
        let table: Vec<u32> = (0..16).collect();
        for be in bes.iter_mut() {
            run(be, &[chunk(&prompt, 0, &table)]);
        }
        for _ in 0..rounds {
            for (m, (name, b, (pf, fused))) in backends.iter().enumerate() {
                set_panel_path(*pf);
                set_fused_step(*fused);
                let (t, cpu0) = (Instant::now(), process_cpu_ns());
                run(&mut bes[*b], &[chunk(&prompt, 0, &table)]);
                let tps = 512.0 / t.elapsed().as_secs_f64();
                let cpu = match (cpu0, process_cpu_ns()) {
                    (Some(a), Some(b)) if b > a => 512.0 * nthreads as f64 / ((b - a) as f64 / 1e9),
                    _ => f64::NAN,
                };
                best[m][batches.len()] = best[m][batches.len()].max(tps);
                best_cpu[m][batches.len()] = best_cpu[m][batches.len()].max(cpu);
                println!(
                    "[{name}] prefill 512-token prompt: {tps:.1} tok/s ({cpu:.1} by on-CPU time)"
                );
            }
        }
    }
    println!();
    println!("best of {rounds} rounds; roofline {roofline:.1} tok/s");
    let cols: Vec<String> = batches
        .iter()
        .skip(1)
        .map(|b| format!("batch {b}"))
        .collect();
    println!(
        "| dtype | batch 1 tok/s | % of roofline | {} | batch 32 / batch 1 | prefill 512 tok/s |",
        cols.join(" | ")
    );
    println!("|---|---|---|{}---|---|", "---|".repeat(cols.len()));
    for ((name, _, _), f) in backends.iter().zip(&best) {
        let mid: Vec<String> = f[1..batches.len()]
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        let b32 = batches
            .iter()
            .position(|&b| b == 32)
            .map_or("-".into(), |i| format!("{:.1}x", f[i] / f[0]));
        println!(
            "| {name} | {:.1} | {:.0}% | {} | {b32} | {} |",
            f[0],
            100.0 * f[0] / roofline,
            mid.join(" | "),
            if prefill {
                format!("{:.1}", f[batches.len()])
            } else {
                "-".into()
            },
        );
    }
    // Decode rates by on-CPU time: other processes' load (compilers of other engineers on a
    // shared machine) mostly drops out, so before/after comparisons hold across runs.
    println!();
    println!("tok/s by on-CPU time (tokens / (CPU seconds of all threads / {nthreads})):");
    let heads: Vec<String> = batches.iter().map(|b| format!("batch {b}")).collect();
    println!(
        "| dtype | {} | batch 32 / batch 1 | prefill 512 |",
        heads.join(" | ")
    );
    println!("|---|{}---|---|", "---|".repeat(heads.len()));
    for ((name, _, _), f) in backends.iter().zip(&best_cpu) {
        let cells: Vec<String> = f[..batches.len()]
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        let pf = if prefill {
            format!("{:.1}", f[batches.len()])
        } else {
            "-".into()
        };
        let b32 = batches
            .iter()
            .position(|&b| b == 32)
            .map_or("-".into(), |i| format!("{:.1}x", f[i] / f[0]));
        println!("| {name} | {} | {b32} | {pf} |", cells.join(" | "));
    }
    // Several bf16 paths: each round's rate over the first mode's rate in the same round,
    // as a geometric mean over the rounds (the modes ran back to back, so slow phases of a
    // shared machine mostly cancel).
    if backends.len() > 1 && paths.len() > 1 {
        println!();
        println!(
            "per-round ratios to [{}], geometric mean (min..max) by wall clock | by on-CPU time:",
            backends[0].0
        );
        for (m, (name, _, _)) in backends.iter().enumerate().skip(1) {
            let cells: Vec<String> = batches
                .iter()
                .enumerate()
                .map(|(bi, b)| {
                    let stat = |f: fn(&(f64, f64)) -> f64| {
                        let r: Vec<f64> = per_round[m][bi]
                            .iter()
                            .zip(&per_round[0][bi])
                            .map(|(a, z)| f(a) / f(z))
                            .collect();
                        let g = (r.iter().map(|x| x.ln()).sum::<f64>() / r.len() as f64).exp();
                        let (lo, hi) = r
                            .iter()
                            .fold((f64::INFINITY, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
                        format!("{g:.3} ({lo:.2}..{hi:.2})")
                    };
                    format!("batch {b}: {} | {}", stat(|x| x.0), stat(|x| x.1))
                })
                .collect();
            println!("[{name}] {}", cells.join("; "));
        }
    }
}
