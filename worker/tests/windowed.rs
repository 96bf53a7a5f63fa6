//! Sliding-window models through the engine (the golden `mistral_window` and `qwen2_window`
//! cases): transformers' greedy answers past the window, KV blocks freed out of the window,
//! prefix reuse of freed blocks, and the refusal by a backend without windowed attention.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::PathBuf;

use llmapi_common::model_config::ModelConfig;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::{Backend, BackendError, SeqChunk};
use llmapi_worker::engine::*;
use llmapi_worker::model::ModelWeights;
use support::{collect, greedy, wait_idle};

fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_num_tokens: 256,
        max_seq_len: None,
        tokens_per_block: 4,
        kv_dtype: KvDtype::Float32,
        kv_max_tokens: Some(4096),
        threads: Some(2),
        ..Default::default()
    }
}

#[derive(serde::Deserialize)]
struct GoldenGreedy {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn golden_case(name: &str) -> (PathBuf, GoldenGreedy) {
    let dir = support::case(name);
    let g = serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    (dir, g)
}

/// The windowed golden cases (Mistral: a window of 16 on every layer; Qwen2: 13 on layer 1
/// only) served at their full context of 512 positions, as Mistral v0.1 is: both prompts (9
/// and 72 tokens) get transformers' 32-token greedy continuations, run whole or chunked into
/// mixed steps (the short one decodes while the long one prefills), with Mistral's blocks
/// out of the window freed as they grow.
#[test]
fn windowed_models_serve_transformers_greedy_past_the_window() {
    for case in ["mistral_window", "qwen2_window"] {
        let (dir, g) = golden_case(case);
        for chunked in [false, true] {
            let cfg = EngineConfig {
                enable_chunked_prefill: chunked,
                max_num_tokens: if chunked { 24 } else { 256 },
                ..config()
            };
            let h = Engine::start(&dir, cfg).unwrap();
            assert_eq!(h.info().max_seq_len, 512);
            let rxs: Vec<_> = g
                .prompts
                .iter()
                .enumerate()
                .map(|(i, p)| h.submit(greedy(&format!("w{i}"), p.clone(), 32)).unwrap())
                .collect();
            for (rx, want) in rxs.into_iter().zip(&g.greedy) {
                assert_eq!(&collect(rx).ids, want, "{case}, chunked {chunked}");
            }
            // The long prompt again: its first blocks (freed before the first run ended, on
            // Mistral) come from the prefix cache and the answer is unchanged.
            let again = collect(h.submit(greedy("again", g.prompts[1].clone(), 32)).unwrap());
            assert_eq!(again.ids, g.greedy[1], "{case}, chunked {chunked}, again");
            assert_eq!(
                again.usage.cached_tokens, 68,
                "{case}: 17 blocks of 4 cached"
            );
            assert_eq!(wait_idle(&h).kv_blocks_used, 0, "{case}: every block freed");
            h.shutdown();
        }
    }
}

/// With a window on every layer a generation holds only the blocks its window covers: 300
/// tokens after a 72-token prompt (93 blocks of 4) run to the end in a cache of 32 blocks,
/// beside a second request, and give back every block: under MAX_UTILIZATION, under
/// GUARANTEED_NO_EVICT with a max_tokens (it reserves its prompt's blocks and its window's,
/// not its whole length) and without one (blocks as it grows). Without the freeing the first
/// would end out of room, be preempted, or be refused at submit.
#[test]
fn a_generation_on_a_windowed_model_runs_far_past_the_cache_size() {
    let (dir, g) = golden_case("mistral_window");
    for (policy, max_tokens) in [
        (CapacityPolicy::MaxUtilization, 300),
        (CapacityPolicy::GuaranteedNoEvict, 300),
        (CapacityPolicy::GuaranteedNoEvict, 0),
    ] {
        let cfg = EngineConfig {
            kv_max_tokens: Some(128),
            capacity_policy: policy,
            ..config()
        };
        let h = Engine::start(&dir, cfg).unwrap();
        assert_eq!(h.info().kv_capacity_blocks, 32);
        let what = format!("{policy:?}, max_tokens {max_tokens}");
        let long = h
            .submit(greedy("long", g.prompts[1].clone(), max_tokens))
            .unwrap();
        let short = h.submit(greedy("short", g.prompts[0].clone(), 32)).unwrap();
        assert_eq!(collect(short).ids, g.greedy[0], "{what}");
        let out = collect(long);
        assert_eq!(out.reason, FinishReason::Length, "{what}");
        assert!(out.ids.len() >= 300, "{what}: {} tokens", out.ids.len());
        assert_eq!(out.ids[..32], g.greedy[1], "{what}");
        let l = wait_idle(&h);
        assert_eq!((l.kv_blocks_used, l.preemptions), (0, 0), "{what}");
        h.shutdown();
    }
}

/// The CPU backend with its windowed attention hidden, as a backend without it (CUDA) is.
struct NoWindows(CpuBackend);

impl Backend for NoWindows {
    fn name(&self) -> &'static str {
        "no-windows"
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.0.kv_bytes_per_token()
    }
    fn init_kv(&mut self, num_blocks: usize, tokens_per_block: usize) -> Result<(), BackendError> {
        self.0.init_kv(num_blocks, tokens_per_block)
    }
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.0.forward(batch)
    }
}

/// A backend that attends over the whole sequence serves a windowed model only where that
/// equals the window: the start is refused naming the window and the max_seq_len that fits,
/// which is then served.
#[test]
fn a_backend_without_windowed_attention_serves_a_window_only_within_it() {
    let (dir, _) = golden_case("mistral_window");
    let model = ModelConfig::from_model_dir(&dir).unwrap();
    let start = |max_seq_len| {
        let weights = ModelWeights::load(&dir).unwrap();
        let be = CpuBackend::new(weights, KvDtype::Float32, Some(2)).unwrap();
        let cfg = EngineConfig {
            max_seq_len,
            ..config()
        };
        Engine::start_with_backend(Box::new(NoWindows(be)), &model, &dir, "m".into(), cfg)
    };
    let e = start(None).err().unwrap().to_string();
    assert!(
        e.contains("sliding_window 16")
            && e.contains("max_seq_len is 512")
            && e.contains("--max_seq_len 16")
            && e.contains("no-windows"),
        "{e}"
    );
    let h = start(Some(16)).unwrap();
    assert_eq!(h.info().max_seq_len, 16);
    h.shutdown();
}
