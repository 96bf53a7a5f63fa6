//! Per-token sampling cost on the engine thread: one 32000-token logits row (the bench
//! preset's vocabulary), for the settings clients send most.
//!
//! The engine samples every running sequence's row between two forward passes, so at batch 16
//! these figures count sixteen times per decode step. Rows come in two shapes: "peaked"
//! (probabilities falling off as a power of the rank, as trained models give) and "flat"
//! (the near-uniform logits of the random-weight bench model). Prints microseconds per row.
//! Run: `cargo bench -p llmapi-worker --bench sampling`.

use std::time::Instant;

use llmapi_worker::engine::SamplingParams;
use llmapi_worker::sampling::{Banned, Sampler};
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
}
