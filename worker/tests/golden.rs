//! Golden tests against Hugging Face transformers: every case under tests/golden/ is loaded,
//! its prompts' full-vocabulary logits compared within the case's `tolerance_abs` (f32
//! checkpoints, f32 compute: 1e-3 absolute), and its 32-token greedy continuations compared
//! exactly. Passes with zero cases; any present case that mismatches fails. bf16 mode
//! (`dtype: bfloat16`) is compared with the same f32 logits at a looser stated tolerance.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::prefill;

use std::path::{Path, PathBuf};

use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::cpu::bf16::Bf16Kernel;
use llmapi_worker::backend::cpu::linear::GemmDtype;
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

/// KV blocks of `tpb` tokens enough for every prompt of `g` and its greedy continuation.
fn blocks_needed(g: &Golden, tpb: usize) -> usize {
    let longest = g
        .prompts
        .iter()
        .zip(&g.greedy)
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    longest.div_ceil(tpb).max(1)
}

/// Runs prompt prefill (all logits) then greedy decode, one sequence at a time.
fn run_case(dir: &Path, g: &Golden) -> Result<(), String> {
    let weights = ModelWeights::load(dir).map_err(|e| e.to_string())?;
    let vocab = weights.config.vocab_size;
    let mut be = CpuBackend::new(weights, KvDtype::Float32, Some(2)).map_err(|e| e.to_string())?;
    be.init_kv(blocks_needed(g, TPB), TPB)
        .map_err(|e| e.to_string())?;
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

/// How far bf16 mode lands from the f32 transformers reference on one case.
struct Bf16Diff {
    case: String,
    /// Largest |diff| over all prompt logits.
    max: f32,
    /// Mean |diff| over all prompt logits.
    mean: f32,
    /// Largest |reference logit|.
    spread: f32,
    /// Positions whose argmax agrees, and positions.
    agree: (usize, usize),
}

/// Prompt logits of every case with projections in `gemm`, one Vec per prompt.
fn prompt_logits(dir: &Path, g: &Golden, gemm: GemmDtype) -> Vec<Vec<f32>> {
    let weights = ModelWeights::load(dir).unwrap();
    let mut be = CpuBackend::new(weights, KvDtype::Float32, Some(2))
        .unwrap()
        .with_gemm(gemm);
    be.init_kv(blocks_needed(g, TPB), TPB).unwrap();
    g.prompts
        .iter()
        .map(|prompt| prefill(&mut be, prompt, TPB, 0, LogitsWanted::All).unwrap())
        .collect()
}

fn golden(dir: &Path) -> Golden {
    serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap()
}

/// Prompt logits of every case in bf16 mode (`dtype: bfloat16`) with `kernel`, against the
/// f32 reference.
fn bf16_mode_diffs(kernel: Bf16Kernel) -> Vec<Bf16Diff> {
    let mut out = Vec::new();
    for dir in cases() {
        let g = golden(&dir);
        let vocab = g.logits[0][0].len();
        let all = prompt_logits(&dir, &g, GemmDtype::Bf16(kernel));
        let mut d = Bf16Diff {
            case: format!("{} ({kernel:?})", g.case),
            max: 0.0,
            mean: 0.0,
            spread: 0.0,
            agree: (0, 0),
        };
        let mut count = 0usize;
        for (pi, out) in all.iter().enumerate() {
            for (pos, want) in g.logits[pi].iter().enumerate() {
                let got = &out[pos * vocab..(pos + 1) * vocab];
                for (a, b) in got.iter().zip(want) {
                    d.max = d.max.max((a - b).abs());
                    d.mean += (a - b).abs();
                    d.spread = d.spread.max(b.abs());
                }
                count += got.len();
                let same =
                    llmapi_worker::sampling::argmax(got) == llmapi_worker::sampling::argmax(want);
                d.agree.0 += usize::from(same);
                d.agree.1 += 1;
            }
        }
        d.mean /= count as f32;
        out.push(d);
    }
    out
}

/// bf16 mode (`dtype: bfloat16`: weights and GEMM inputs rounded to bf16, f32 accumulation)
/// against the same f32 transformers logits. Measured on these fixtures (2026-11-28): mean
/// |diff| at most 0.30% of the largest |logit|, max |diff| at most 7.8% (llama_sharded; the
/// random fixtures have very sharp attention), argmax agreeing at 36 of 39 positions or more.
/// Stated tolerance, about twice that: mean within 0.6%, max within 15%, argmax agreeing at 85%
/// of positions. Every case must also differ by more than the f32 tolerance, so the test fails
/// if the mode silently stayed f32. Both kernels are held to it: the portable one (CPUs
/// without AVX512_BF16) rounds identically but sums in another order, which can flip the
/// rounding of a later activation (observed: up to 0.09 between the two kernels' logits).
#[test]
fn bf16_mode_stays_within_stated_tolerance_of_transformers_f32() {
    let mut diffs = bf16_mode_diffs(Bf16Kernel::Portable);
    if Bf16Kernel::detect() != Bf16Kernel::Portable {
        diffs.extend(bf16_mode_diffs(Bf16Kernel::detect()));
    }
    let mut failures = Vec::new();
    for d in &diffs {
        let line = format!(
            "{}: max |diff| {:.4} ({:.1}% of {:.1}), mean {:.4} ({:.2}%), argmax agrees at {}/{}",
            d.case,
            d.max,
            100.0 * d.max / d.spread,
            d.spread,
            d.mean,
            100.0 * d.mean / d.spread,
            d.agree.0,
            d.agree.1
        );
        eprintln!("{line}");
        let ok = d.mean <= 0.006 * d.spread
            && d.max <= 0.15 * d.spread
            && d.agree.0 as f32 >= 0.85 * d.agree.1 as f32
            && d.max > 1e-3;
        if !ok {
            failures.push(line);
        }
    }
    assert!(!diffs.is_empty(), "no golden cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The decode path (one token a step, attending over the paged KV cache) at the production
/// block size of 32 tokens, fed each prompt token by token: every step's logits are the
/// prompt logits transformers gave at that position. The long cases (300 positions) cross
/// the attention tile (128 positions) and ten KV blocks.
fn decode_logits(dir: &Path, g: &Golden, kv: KvDtype) -> Vec<Vec<Vec<f32>>> {
    const PRODUCTION_TPB: usize = 32;
    let weights = ModelWeights::load(dir).unwrap();
    let mut be = CpuBackend::new(weights, kv, Some(2)).unwrap();
    be.init_kv(blocks_needed(g, PRODUCTION_TPB), PRODUCTION_TPB)
        .unwrap();
    let table: Vec<u32> = (0..blocks_needed(g, PRODUCTION_TPB) as u32).collect();
    g.prompts
        .iter()
        .map(|prompt| {
            prompt
                .iter()
                .enumerate()
                .map(|(pos, token)| {
                    let out = be
                        .forward(&[SeqChunk {
                            tokens: std::slice::from_ref(token),
                            start_pos: pos,
                            block_table: &table,
                            logits: LogitsWanted::Last,
                        }])
                        .unwrap();
                    out.into_iter().next().unwrap()
                })
                .collect()
        })
        .collect()
}

/// Largest |diff| and mean |diff| of `got` against the golden prompt logits, the largest
/// |reference logit|, and the positions whose argmax agrees out of all.
fn decode_diff(g: &Golden, got: &[Vec<Vec<f32>>]) -> (f32, f32, f32, (usize, usize)) {
    let (mut max, mut sum, mut spread, mut n) = (0.0f32, 0.0f64, 0.0f32, 0usize);
    let mut agree = (0, 0);
    for (pi, rows) in got.iter().enumerate() {
        for (pos, row) in rows.iter().enumerate() {
            let want = &g.logits[pi][pos];
            for (a, b) in row.iter().zip(want) {
                max = max.max((a - b).abs());
                sum += f64::from((a - b).abs());
                spread = spread.max(b.abs());
                n += 1;
            }
            let same =
                llmapi_worker::sampling::argmax(row) == llmapi_worker::sampling::argmax(want);
            agree.0 += usize::from(same);
            agree.1 += 1;
        }
    }
    (max, (sum / n.max(1) as f64) as f32, spread, agree)
}

/// With an f32 KV cache the decode kernel must give transformers' logits within the case's
/// f32 tolerance at every position; with the CPU default bf16 KV cache (keys and values
/// rounded to bf16 when stored) within a stated tolerance. Measured on the 15 cases
/// (2026-12-07; the two long ones run 300 positions over ten 32-token blocks and cross the
/// 128-position attention tile; the two `*_window` ones run 72 positions past windows of 16
/// and 13 that start inside the blocks): max |diff| at most 1.61% of the largest |logit|
/// (llama_hd64_long), mean at most 0.144%, argmax agreeing at 97% of a case's positions or
/// more (79 of 81 on mistral_window, 303 of 307 on llama_hd64_long).
/// Stated, about twice that: max within 3%, mean within 0.35%, argmax agreeing at 90% of
/// positions; and the bf16 cache must
/// differ by more than the f32 tolerance somewhere, so the test fails if it silently stored f32.
#[test]
fn the_decode_kernel_over_the_paged_cache_gives_transformers_logits_at_every_position() {
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for dir in cases() {
        let g = golden(&dir);
        for kv in [KvDtype::Float32, KvDtype::Bf16] {
            let (max, mean, spread, agree) = decode_diff(&g, &decode_logits(&dir, &g, kv));
            let line = format!(
                "{} ({kv:?} KV): max |diff| {max:.5} ({:.2}% of {spread:.1}), mean {mean:.5} ({:.3}%), argmax agrees at {}/{}",
                g.case,
                100.0 * max / spread,
                100.0 * mean / spread,
                agree.0,
                agree.1
            );
            let ok = match kv {
                KvDtype::Float32 => max <= g.tolerance_abs,
                _ => {
                    mean <= 0.0035 * spread
                        && max <= 0.03 * spread
                        && agree.0 as f32 >= 0.90 * agree.1 as f32
                        && max > g.tolerance_abs
                }
            };
            if !ok {
                failures.push(line.clone());
            }
            lines.push(line);
        }
    }
    eprintln!("{}", lines.join("\n"));
    assert!(!lines.is_empty(), "no golden cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
