//! Golden tests against Hugging Face transformers: every case under tests/golden/ is loaded,
//! its prompts' full-vocabulary logits compared within the case's `tolerance_abs` (f32
//! checkpoints, f32 compute: 1e-3 absolute), and its 32-token greedy continuations compared
//! exactly. Passes with zero cases; any present case that mismatches fails.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::{Backend, LogitsWanted, SeqChunk};
use llmapi_worker::engine::KvDtype;
use llmapi_worker::model::ModelWeights;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    case: String,
    prompts: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
    greedy: Vec<Vec<u32>>,
    tolerance_abs: f32,
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.join("golden.json").exists());
    v.sort();
    v
}

const TPB: usize = 4;

/// Runs prompt prefill (all logits) then greedy decode, one sequence at a time.
fn run_case(dir: &Path, g: &Golden) -> Result<(), String> {
    let weights = ModelWeights::load(dir).map_err(|e| e.to_string())?;
    let vocab = weights.config.vocab_size;
    let mut be = CpuBackend::new(weights, KvDtype::Float32, Some(2)).map_err(|e| e.to_string())?;
    be.init_kv(64, TPB).map_err(|e| e.to_string())?;
    for (pi, prompt) in g.prompts.iter().enumerate() {
        let total = prompt.len() + g.greedy[pi].len();
        let table: Vec<u32> = (0..total.div_ceil(TPB) as u32).collect();
        let out = be
            .forward(&[SeqChunk {
                tokens: prompt,
                start_pos: 0,
                block_table: &table,
                logits: LogitsWanted::All,
            }])
            .map_err(|e| e.to_string())?;
        let rows = &out[0];
        let mut worst = 0.0f32;
        for (pos, want) in g.logits[pi].iter().enumerate() {
            let got = &rows[pos * vocab..(pos + 1) * vocab];
            for (a, b) in got.iter().zip(want) {
                worst = worst.max((a - b).abs());
            }
        }
        if worst > g.tolerance_abs {
            return Err(format!(
                "{}: prompt {pi}: max |logit diff| {worst} > {}",
                g.case, g.tolerance_abs
            ));
        }
        let mut last = llmapi_worker::sampling::argmax(&rows[rows.len() - vocab..]);
        let mut got = vec![last];
        let mut pos = prompt.len();
        while got.len() < g.greedy[pi].len() {
            let out = be
                .forward(&[SeqChunk {
                    tokens: &[last],
                    start_pos: pos,
                    block_table: &table,
                    logits: LogitsWanted::Last,
                }])
                .map_err(|e| e.to_string())?;
            last = llmapi_worker::sampling::argmax(&out[0]);
            got.push(last);
            pos += 1;
        }
        if got != g.greedy[pi] {
            return Err(format!(
                "{}: prompt {pi}: greedy differs\n got  {got:?}\n want {:?}",
                g.case, g.greedy[pi]
            ));
        }
    }
    Ok(())
}

#[test]
fn every_golden_case_matches_transformers() {
    let mut failures = Vec::new();
    for dir in cases() {
        let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
        let g: Golden = serde_json::from_str(&text).unwrap();
        if let Err(e) = run_case(&dir, &g) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
