//! Per-token sampling cost on the engine thread: one 32000-token logits row (the bench
//! preset's vocabulary), for the settings clients send most.
//!
//! The engine samples every running sequence's row between two forward passes, so at batch 16
//! these figures count sixteen times per decode step. Rows come in two shapes: "peaked"
//! (probabilities falling off as a power of the rank, as trained models give) and "flat"
//! (the near-uniform logits of the random-weight bench model). Prints microseconds per row.
//! A second table times a whole decode step's sampling at batch 64: every sequence with a
//! 256-token prompt and a history of 512 generated tokens that grows by the token drawn, as in
//! the engine (milliseconds per step by the wall clock, and by on-CPU time of all threads,
//! which other processes' load leaves alone; best of 3 rounds of 32 steps).
//! Run: `cargo bench -p llmapi-worker --bench sampling`.

mod support;

use std::time::Instant;

use llmapi_worker::engine::SamplingParams;
use llmapi_worker::sampling::{Banned, SampleJob, Sampler, sample_batch};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 32000;

fn rows(peaked: bool, n: usize) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(if peaked { 1 } else { 2 });
    (0..n)
        .map(|_| {
            let mut row: Vec<f32> = if peaked {
                (0..VOCAB).map(|r| -1.1 * ((r + 1) as f32).ln()).collect()
            } else {
                (0..VOCAB).map(|_| rng.random::<f32>() * 0.5).collect()
            };
            row.shuffle(&mut rng);
            row
        })
        .collect()
}

fn main() {
    let settings: [(&str, SamplingParams); 6] = [
        ("greedy", SamplingParams::default()),
        (
            "temperature 1",
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        ),
        (
            "temperature 0.8, top_p 0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "temperature 1, top_k 50",
            SamplingParams {
                temperature: 1.0,
                top_k: 50,
                ..Default::default()
            },
        ),
        (
            "temperature 1, min_p 0.05",
            SamplingParams {
                temperature: 1.0,
                min_p: 0.05,
                ..Default::default()
            },
        ),
        (
            "greedy, logprobs 5",
            SamplingParams {
                logprobs: Some(5),
                ..Default::default()
            },
        ),
    ];
    let n = 64;
    let shapes = [("peaked", rows(true, n)), ("flat", rows(false, n))];
    println!(
        "| setting | {} us/row | {} us/row |",
        shapes[0].0, shapes[1].0
    );
    println!("|---|---|---|");
    for (name, params) in settings {
        let mut cells = Vec::new();
        for (_, rows) in &shapes {
            let mut sampler = Sampler::new(SamplingParams {
                seed: Some(7),
                ..params.clone()
            });
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let mut work = rows.clone();
                let t = Instant::now();
                for row in &mut work {
                    std::hint::black_box(sampler.sample(row, &[], &[], Banned(&[])));
                }
                best = best.min(t.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
            cells.push(format!("{best:.1}"));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    batch_step_table();
}

/// Samples one decode step as the engine does: every sequence's row on the rayon pool.
fn sample_step(
    samplers: &mut [Sampler],
    rows: &mut [Vec<f32>],
    prompt: &[u32],
    generated: &[Vec<u32>],
) -> Vec<u32> {
    let jobs = samplers
        .iter_mut()
        .zip(rows.iter_mut())
        .zip(generated)
        .map(|((sampler, row), g)| SampleJob {
            sampler,
            logits: row,
            prompt,
            generated: g,
            banned: Vec::new(),
        })
        .collect();
    sample_batch(jobs).into_iter().map(|(t, _)| t).collect()
}

fn batch_step_table() {
    const BATCH: usize = 64;
    const STEPS: usize = 32;
    let settings: [(&str, SamplingParams); 2] = [
        (
            "temperature 0.8, top_p 0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "same + repetition 1.1, presence 0.1, frequency 0.2",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                repetition_penalty: 1.1,
                presence_penalty: 0.1,
                frequency_penalty: 0.2,
                ..Default::default()
            },
        ),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let prompt: Vec<u32> = (0..256)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let history: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| {
            (0..512)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect();
    let base = rows(true, BATCH);
    println!();
    println!("load average {}", support::loadavg());
    println!("| setting, batch {BATCH} | ms per step | on-CPU ms per step |");
    println!("|---|---|---|");
    for (name, params) in settings {
        let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let mut samplers: Vec<Sampler> = (0..BATCH)
                .map(|i| {
                    Sampler::new(SamplingParams {
                        seed: Some(i as u64),
                        ..params.clone()
                    })
                })
                .collect();
            let mut generated = history.clone();
            let (mut spent, mut spent_cpu) = (0.0, 0.0);
            for _ in 0..STEPS {
                let mut work = base.clone();
                let t = Instant::now();
                let cpu = support::process_cpu_ns().unwrap_or(0);
                let picked = sample_step(&mut samplers, &mut work, &prompt, &generated);
                spent_cpu +=
                    support::process_cpu_ns().unwrap_or(0).saturating_sub(cpu) as f64 * 1e-9;
                spent += t.elapsed().as_secs_f64();
                for (g, token) in generated.iter_mut().zip(picked) {
                    g.push(token);
                }
            }
            best = best.min(spent * 1e3 / STEPS as f64);
            best_cpu = best_cpu.min(spent_cpu * 1e3 / STEPS as f64);
        }
        println!("| {name} | {best:.2} | {best_cpu:.2} |");
    }
}
