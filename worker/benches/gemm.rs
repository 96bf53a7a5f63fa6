//! Projection kernels alone, per mode: `y = x W^T` on the bench preset's shapes (bf16
//! weights), for 1 to 512 input rows. Prints GFLOP/s, and for one row the weight GB/s.
//! Run: `cargo bench -p llmapi-worker --bench gemm` (LLMAPI_BENCH_THREADS=N sets threads,
//! LLMAPI_BENCH_ROWS=1,8,512 the row counts). With one thread the rates are per second on
//! the CPU (from /proc/thread-self/schedstat), so other processes' load does not count.

use std::time::Instant;

use llmapi_worker::backend::cpu::bf16::Bf16Kernel;
use llmapi_worker::backend::cpu::linear::{GemmDtype, linear};
use llmapi_worker::model::{Mat, WeightData};

const SHAPES: &[(&str, usize, usize)] = &[
    ("qkv", 1280, 768),
    ("o", 768, 768),
    ("gate_up", 4096, 768),
    ("down", 768, 2048),
    ("lm_head", 32000, 768),
];

fn main() {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = std::env::var("LLMAPI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        builder = builder.num_threads(n);
    }
    let pool = builder.build().expect("pool");
    let cpu_time = pool.current_num_threads() == 1 && on_cpu_ns().is_some();
    if cpu_time {
        println!("one thread: rates per second on the CPU (other load does not count)");
    }
    let modes = [
        ("f32", GemmDtype::F32),
        ("bf16", GemmDtype::Bf16(Bf16Kernel::detect())),
    ];
    let row_counts: Vec<usize> = match std::env::var("LLMAPI_BENCH_ROWS") {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("LLMAPI_BENCH_ROWS is a list like 1,8,512")
            })
            .collect(),
        Err(_) => vec![1, 4, 8, 16, 32, 64, 128, 512],
    };
    println!("| shape | rows | {} |", modes.map(|m| m.0).join(" | "));
    println!("|---|---|---|---|");
    for &(name, n, k) in SHAPES {
        let w = Mat {
            rows: n,
            cols: k,
            data: WeightData::Bf16((0..n * k).map(|i| (0x3c00 + (i % 255)) as u16).collect()),
        };
        for &rows in &row_counts {
            if name == "lm_head" && rows > 64 {
                continue;
            }
            let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.01).sin()).collect();
            let mut out = vec![0.0f32; rows * n];
            // Wall clock: modes alternate over 5 rounds and the best round counts, so a burst
            // of load from other processes hits both modes alike and is mostly filtered out.
            // CPU time: one long round (schedstat advances in scheduler ticks).
            let (reps, rounds) = if cpu_time {
                ((20_000_000_000 / (2 * rows * n * k)).max(2), 1)
            } else {
                ((400_000_000 / (2 * rows * n * k)).clamp(2, 400), 5)
            };
            let mut best = [f64::INFINITY; 2];
            for _ in 0..rounds {
                for (m, (_, mode)) in modes.iter().enumerate() {
                    let s = pool.install(|| {
                        linear(*mode, &x, rows, &w, &mut out);
                        let (t, cpu) = (Instant::now(), on_cpu_ns());
                        for _ in 0..reps {
                            linear(*mode, &x, rows, &w, &mut out);
                        }
                        match (cpu_time, cpu, on_cpu_ns()) {
                            (true, Some(a), Some(b)) => (b - a) as f64 / 1e9,
                            _ => t.elapsed().as_secs_f64(),
                        }
                    });
                    best[m] = best[m].min(s / reps as f64);
                }
            }
            let cells: Vec<String> = best
                .iter()
                .map(|&s| {
                    let gflops = 2.0 * (rows * n * k) as f64 / s / 1e9;
                    if rows == 1 {
                        format!(
                            "{gflops:.1} GFLOP/s, {:.1} GB/s",
                            (2 * n * k) as f64 / s / 1e9
                        )
                    } else {
                        format!("{gflops:.1} GFLOP/s")
                    }
                })
                .collect();
            println!("| {name} {n}x{k} | {rows} | {} |", cells.join(" | "));
        }
    }
}

/// Nanoseconds the calling thread has run on a CPU (Linux schedstat), if readable.
fn on_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}
