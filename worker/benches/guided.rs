//! The cost of structured outputs (llguidance grammars), on the "bench" preset (Llama-3
//! style, 124M parameters, vocab 32000) through the real engine on the CPU backend.
//!
//! Prints: the time to build the tokenizer's token trie (once per process), to compile a JSON
//! schema (first time, and again from the cache), to compute one token's mask, and the decode
//! step time at batch 32 with
//! 0, 8 and 32 of the sequences constrained by a JSON schema (each figure the best of
//! LLMAPI_BENCH_ROUNDS=3 rounds of LLMAPI_BENCH_STEPS=16 steps). The schema cannot complete
//! within the steps (an array of at least 64 integers), so every sequence runs every step.
//! The checkpoint is LLMAPI_BENCH_MODEL (a directory with tokenizer.json), else the bench
//! preset written to a temporary directory. Run: `cargo bench -p llmapi-worker --bench guided`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmapi_common::checkpoint::{Preset, write_checkpoint};
use llmapi_common::guided::{Constraint, GuidedCompiler};
use llmapi_common::tokenizer::Tokenizer;
use llmapi_worker::engine::{
    Engine, EngineConfig, EngineHandle, GenerateParams, SamplingParams, StoppingParams, TokenEvent,
};

const BATCH: usize = 32;

fn schema(tag: usize) -> String {
    serde_json::json!({
        "title": format!("bench{tag}"),
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"type": "integer"}, "minItems": 64},
            "label": {"enum": ["a", "b"]},
        },
        "required": ["values", "label"],
        "additionalProperties": false,
    })
    .to_string()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Mean decode step time over `steps` steps of `BATCH` sequences, `guided` of them
/// constrained: from the first token to the last, over the steps between them.
fn step_time(engine: &EngineHandle, round: usize, guided: usize, steps: usize) -> Duration {
    let rxs: Vec<_> = (0..BATCH)
        .map(|i| {
            let params = GenerateParams {
                request_id: format!("r{round}-{guided}-{i}"),
                prompt: (0..16)
                    .map(|t| (t * 31 + i as u32 * 7 + 100) % 30000)
                    .collect(),
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: Some(i as u64),
                    guided: (i < guided).then(|| Constraint::JsonSchema(schema(0))),
                    ..Default::default()
                },
                stopping: StoppingParams {
                    max_tokens: steps as u32 + 1,
                    ignore_eos: true,
                    ..Default::default()
                },
                ..Default::default()
            };
            engine.submit(params).expect("request accepted")
        })
        .collect();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    for mut rx in rxs {
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                TokenEvent::Tokens { .. } => {
                    let now = Instant::now();
                    first = Some(first.map_or(now, |f| f.min(now)));
                    last = last.max(now);
                }
                TokenEvent::Finished { usage, .. } => {
                    assert_eq!(
                        usage.completion_tokens as usize,
                        steps + 1,
                        "ran every step"
                    );
                    break;
                }
                TokenEvent::Error(e) | TokenEvent::Refused(e) => panic!("{e}"),
                TokenEvent::PromptLogprobs(_) => {}
            }
        }
    }
    (last - first.unwrap_or(last)) / steps as u32
}

fn main() {
    let (_tmp, dir): (Option<tempfile::TempDir>, PathBuf) =
        match std::env::var("LLMAPI_BENCH_MODEL") {
            Ok(d) => (None, PathBuf::from(d)),
            Err(_) => {
                let tmp = tempfile::tempdir().expect("temp dir");
                let preset = Preset::by_name("bench").expect("bench preset");
                write_checkpoint(&preset, tmp.path(), &mut |_, _| {}).expect("checkpoint written");
                let path = tmp.path().to_path_buf();
                (Some(tmp), path)
            }
        };
    compile_times(&dir);
    let steps = env_usize("LLMAPI_BENCH_STEPS", 16);
    let rounds = env_usize("LLMAPI_BENCH_ROUNDS", 3);
    let engine = Engine::start(
        &dir,
        EngineConfig {
            max_batch_size: BATCH,
            kv_max_tokens: Some(BATCH * 128),
            ..Default::default()
        },
    )
    .expect("engine starts");
    println!("decode step time at batch {BATCH} ({steps} steps, best of {rounds} rounds):");
    let mut base = None;
    for guided in [0, 8, 32] {
        let best = (0..rounds)
            .map(|r| step_time(&engine, r, guided, steps))
            .min()
            .unwrap_or_default();
        let ms = best.as_secs_f64() * 1e3;
        let over = base.map_or(String::new(), |b: f64| {
            format!(" ({:+.1}%)", (ms / b - 1.0) * 100.0)
        });
        base.get_or_insert(ms);
        println!("  {guided:>2} constrained: {ms:.2} ms/step{over}");
    }
}

fn compile_times(dir: &Path) {
    let tok = Tokenizer::from_dir(dir).expect("tokenizer loads");
    let eos = tok.eos().map_or(0, |e| e.1);
    let t = Instant::now();
    let compiler = GuidedCompiler::new(&tok, tok.vocab_size(), &[eos]).expect("compiler");
    println!(
        "token trie of {} tokens: {:.1} ms",
        compiler.vocab_size(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut firsts = Vec::new();
    let mut hits = Vec::new();
    for i in 1..=5 {
        let c = Constraint::JsonSchema(schema(i));
        let t = Instant::now();
        compiler.matcher(&c).expect("compiles");
        firsts.push(t.elapsed());
        let t = Instant::now();
        compiler.matcher(&c).expect("cached");
        hits.push(t.elapsed());
    }
    firsts.sort();
    hits.sort();
    // One mask per token, as the helper threads compute them: walk a document of the
    // schema, always taking the lowest allowed token, and time each mask.
    let mut m = compiler
        .matcher(&Constraint::JsonSchema(schema(0)))
        .expect("compiles");
    let mut masks = Vec::new();
    for _ in 0..64 {
        let t = Instant::now();
        let mask = m.compute_mask().expect("mask");
        masks.push(t.elapsed());
        let Some(next) = mask.iter().next() else {
            break;
        };
        m.consume_token(next).expect("allowed token");
    }
    masks.sort();
    println!(
        "mask of one token (vocab {}): median {:.3} ms, max {:.3} ms over {} tokens",
        compiler.vocab_size(),
        masks[masks.len() / 2].as_secs_f64() * 1e3,
        masks[masks.len() - 1].as_secs_f64() * 1e3,
        masks.len()
    );
    println!(
        "compile a JSON schema: {:.2} ms (median of 5), from the cache: {:.3} ms",
        firsts[2].as_secs_f64() * 1e3,
        hits[2].as_secs_f64() * 1e3
    );
}
