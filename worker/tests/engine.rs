//! Engine behaviour on a real tiny checkpoint (the golden `llama` fixture): batching, chunked
//! prefill, prefix reuse, KV dtypes, block accounting, preemption, stopping and refusals.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmapi_common::args::ModelDtype;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::backend::{Backend, LogitsWanted, SeqChunk};
use llmapi_worker::engine::*;
use llmapi_worker::model::ModelWeights;

mod support;

use support::{collect, golden_config, greedy, wait_idle};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama")
}

fn config() -> EngineConfig {
    golden_config()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 31 + i * 17 + 3) % 250 + 3)
        .collect()
}

fn solo(cfg: EngineConfig, prompts: &[Vec<u32>], max_tokens: u32) -> Vec<Vec<u32>> {
    let h = Engine::start(&model_dir(), cfg).unwrap();
    let out = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            collect(
                h.submit(greedy(&format!("s{i}"), p.clone(), max_tokens))
                    .unwrap(),
            )
            .ids
        })
        .collect();
    h.shutdown();
    out
}

fn together(
    cfg: EngineConfig,
    prompts: &[Vec<u32>],
    max_tokens: u32,
) -> (Vec<Vec<u32>>, EngineHandle) {
    let h = Engine::start(&model_dir(), cfg).unwrap();
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            h.submit(greedy(&format!("b{i}"), p.clone(), max_tokens))
                .unwrap()
        })
        .collect();
    (rxs.into_iter().map(|rx| collect(rx).ids).collect(), h)
}

#[test]
fn batched_requests_equal_one_at_a_time() {
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 5 + 3 * i as usize)).collect();
    let one = solo(config(), &prompts, 12);
    let (batched, h) = together(config(), &prompts, 12);
    assert_eq!(one, batched);
    assert!(one.iter().all(|o| o.len() == 12));
    let l = wait_idle(&h);
    assert_eq!(l.kv_blocks_used, 0, "all blocks free after completion");
}

#[test]
fn batched_requests_equal_one_at_a_time_in_bf16_mode() {
    let bf16 = || EngineConfig {
        dtype: ModelDtype::Bfloat16,
        ..config()
    };
    // The batched first step prefills 75 rows at once (the packed many-row GEMM); decode
    // steps of 1 to 6 rows use the dot-product kernels.
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(i, 5 + 3 * i as usize)).collect();
    let one = solo(bf16(), &prompts, 12);
    let (batched, h) = together(bf16(), &prompts, 12);
    assert_eq!(one, batched);
    let l = wait_idle(&h);
    assert_eq!(l.kv_blocks_used, 0, "all blocks free after completion");
    // The mode is in effect: some greedy continuation differs from the f32 one.
    assert_ne!(
        one,
        solo(config(), &prompts, 12),
        "bf16 mode changed nothing"
    );
}

#[test]
fn chunked_prefill_equals_unchunked() {
    let prompts = vec![prompt(1, 40), prompt(2, 23)];
    let base = solo(config(), &prompts, 8);
    let chunked = EngineConfig {
        max_num_tokens: 7,
        enable_chunked_prefill: true,
        print_iter_log: true,
        ..config()
    };
    let (got, _h) = together(chunked, &prompts, 8);
    assert_eq!(base, got);
}

#[test]
fn reused_prefix_equals_fresh_and_reports_cached_tokens() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let p = prompt(3, 30);
    let first = collect(h.submit(greedy("a", p.clone(), 10)).unwrap());
    let second = collect(h.submit(greedy("b", p.clone(), 10)).unwrap());
    assert_eq!(first.ids, second.ids);
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(
        second.usage.cached_tokens, 28,
        "7 full blocks of 4 before the last token"
    );
    let no_reuse = solo(
        EngineConfig {
            enable_block_reuse: false,
            ..config()
        },
        &[p],
        10,
    );
    assert_eq!(no_reuse[0], first.ids);
}

/// Two 8-token blocks whose hashes under the 64-bit FNV-1a used before were equal (so a
/// prompt starting with one was served the other's cached KV); common/src/block_hash.rs
/// checks the old collision.
const FNV_COLLISION: ([u32; 8], [u32; 8]) = (
    [241, 9, 250, 248, 145, 180, 143, 42],
    [46, 74, 167, 138, 252, 124, 224, 19],
);

#[test]
fn a_prompt_forged_to_collide_under_the_old_hash_gets_no_cached_tokens() {
    let cfg = EngineConfig {
        tokens_per_block: 8,
        ..config()
    };
    let tail = prompt(9, 17);
    let victim: Vec<u32> = FNV_COLLISION.0.iter().chain(&tail).copied().collect();
    let forged: Vec<u32> = FNV_COLLISION.1.iter().chain(&tail).copied().collect();
    let alone = solo(cfg.clone(), std::slice::from_ref(&forged), 10);
    let h = Engine::start(&model_dir(), cfg).unwrap();
    let first = collect(h.submit(greedy("victim", victim.clone(), 10)).unwrap());
    let again = collect(h.submit(greedy("victim2", victim, 10)).unwrap());
    assert_eq!(
        again.usage.cached_tokens, 24,
        "reuse works: 3 full blocks of 8"
    );
    let second = collect(h.submit(greedy("forged", forged, 10)).unwrap());
    assert_eq!(first.ids, again.ids);
    assert_eq!(
        second.usage.cached_tokens, 0,
        "the forged prompt shares no block with the victim's"
    );
    assert_eq!(second.ids, alone[0], "computed from its own tokens");
}

/// A decode batch of 16 sequences (the rows from which the epilogue runs on the pool; half
/// of the prompts want every position's logits) (prefill, then 6 steps of one token each) in bf16 mode,
/// with the fused batch epilogues of a step (rope and K/V store per row on the pool, the
/// gating rounded into the down projection's input) and with the serial code they replaced:
/// the same logits, bit for bit, for every KV dtype. Other tests may run steps meanwhile;
/// both settings give the same bits, so the switch cannot change their results.
#[test]
fn fused_step_gives_the_bits_of_the_serial_step() {
    use llmapi_worker::backend::cpu::set_fused_step;
    let run = |fused: bool, kv: KvDtype| -> Vec<Vec<u32>> {
        set_fused_step(fused);
        let w = ModelWeights::load(&model_dir()).unwrap();
        let mut be = CpuBackend::new(w, kv, Some(2))
            .unwrap()
            .with_dtype(ModelDtype::Bfloat16)
            .unwrap();
        be.init_kv(16 * 8, 4).unwrap();
        let tables: Vec<Vec<u32>> = (0..16u32).map(|s| (s * 8..(s + 1) * 8).collect()).collect();
        let prompts: Vec<Vec<u32>> = (0..16).map(|i| prompt(i, 5 + i as usize)).collect();
        let mut out = Vec::new();
        let chunks: Vec<SeqChunk<'_>> = prompts
            .iter()
            .zip(&tables)
            .enumerate()
            .map(|(i, (p, t))| SeqChunk {
                tokens: p,
                start_pos: 0,
                block_table: t,
                logits: if i % 2 == 0 {
                    LogitsWanted::All
                } else {
                    LogitsWanted::Last
                },
            })
            .collect();
        out.extend(be.forward(&chunks).unwrap());
        for step in 0..6u32 {
            let toks: Vec<[u32; 1]> = (0..16u32)
                .map(|s| [(s * 31 + step * 7) % 100 + 3])
                .collect();
            let chunks: Vec<SeqChunk<'_>> = toks
                .iter()
                .zip(&tables)
                .zip(&prompts)
                .map(|((t, table), p)| SeqChunk {
                    tokens: t,
                    start_pos: p.len() + step as usize,
                    block_table: table,
                    logits: LogitsWanted::Last,
                })
                .collect();
            out.extend(be.forward(&chunks).unwrap());
        }
        set_fused_step(true);
        out.iter()
            .map(|l| l.iter().map(|v| v.to_bits()))
            .map(|bits| bits.collect())
            .collect()
    };
    for kv in [KvDtype::Bf16, KvDtype::Fp8, KvDtype::Float32] {
        let fused = run(true, kv);
        assert_eq!(fused.len(), 16 * 7);
        assert!(fused.iter().all(|l| !l.is_empty()));
        assert_eq!(fused, run(false, kv), "{kv:?}");
    }
}

/// Logits of the same prompt with a given KV dtype.
fn prompt_logits(dtype: KvDtype, tokens: &[u32]) -> Vec<f32> {
    let w = ModelWeights::load(&model_dir()).unwrap();
    let mut be = CpuBackend::new(w, dtype, Some(1)).unwrap();
    be.init_kv(32, 4).unwrap();
    let table: Vec<u32> = (0..32).collect();
    be.forward(&[SeqChunk {
        tokens,
        start_pos: 0,
        block_table: &table,
        logits: LogitsWanted::All,
    }])
    .unwrap()
    .remove(0)
}

#[test]
fn bf16_and_fp8_kv_stay_within_stated_tolerance_of_f32() {
    let p = prompt(4, 48);
    let exact = prompt_logits(KvDtype::Float32, &p);
    let spread = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // The tiny random fixture has very sharp attention (logits up to ~18), so KV rounding is
    // amplified. Stated tolerances: mean |diff| over all prompt logits within 0.5% (bf16, 8
    // mantissa bits) and 3% (fp8 e4m3 with a per-token/head scale, 3 bits) of the largest
    // logit, and the argmax agreeing at 95% / 75% of positions.
    for (dtype, rel, agree_min) in [(KvDtype::Bf16, 0.005, 0.95), (KvDtype::Fp8, 0.03, 0.75)] {
        let got = prompt_logits(dtype, &p);
        let mean = got
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / got.len() as f32;
        assert!(
            mean <= rel * spread,
            "{dtype:?}: mean diff {mean} > {rel} x {spread}"
        );
        let agree = (0..p.len())
            .filter(|pos| {
                let r = pos * 256..(pos + 1) * 256;
                llmapi_worker::sampling::argmax(&got[r.clone()])
                    == llmapi_worker::sampling::argmax(&exact[r])
            })
            .count();
        assert!(
            agree as f32 >= agree_min * p.len() as f32,
            "{dtype:?}: argmax agrees at {agree}/{} positions",
            p.len()
        );
    }
}

#[test]
fn preempted_requests_resume_with_the_same_greedy_output() {
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| prompt(10 + i, 10)).collect();
    let base = solo(config(), &prompts, 20);
    // 20 blocks of 4 tokens = 80 tokens for 5 requests of 30 tokens: someone must be preempted.
    let tight = EngineConfig {
        kv_max_tokens: Some(80),
        capacity_policy: CapacityPolicy::MaxUtilization,
        enable_block_reuse: false,
        ..config()
    };
    let (got, h) = together(tight, &prompts, 20);
    assert_eq!(base, got);
    assert_eq!(wait_idle(&h).kv_blocks_used, 0);
}

/// Submits `prompts` at once with prompt logprobs (top 1) and returns, per request, every
/// PromptLogprobs event it got and its generated ids.
fn with_prompt_logprobs(
    h: &EngineHandle,
    prompts: &[Vec<u32>],
    max_tokens: u32,
) -> Vec<(Vec<Vec<TokenLogprob>>, Vec<u32>)> {
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut params = greedy(&format!("lp{i}"), p.clone(), max_tokens);
            params.sampling.logprobs = Some(1);
            params.sampling.prompt_logprobs = true;
            h.submit(params).unwrap()
        })
        .collect();
    rxs.into_iter()
        .map(|mut rx| {
            let deadline = Instant::now() + Duration::from_secs(30);
            let (mut prompt_lps, mut ids) = (Vec::new(), Vec::new());
            loop {
                assert!(Instant::now() < deadline, "no Finished event within 30 s");
                match rx.try_recv() {
                    Ok(TokenEvent::PromptLogprobs(lps)) => prompt_lps.push(lps),
                    Ok(TokenEvent::Tokens { ids: new, .. }) => ids.extend(new),
                    Ok(TokenEvent::Finished { .. }) => return (prompt_lps, ids),
                    Ok(TokenEvent::Error(e) | TokenEvent::Refused(e)) => panic!("engine: {e}"),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("stream ended without Finished: {e}"),
                }
            }
        })
        .collect()
}

#[test]
fn prompt_logprobs_of_a_preempted_request_are_those_of_an_undisturbed_run() {
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(40 + i, 24)).collect();
    // Prompts go in chunks of 8 tokens, so a request can be preempted halfway through its
    // prompt, after some of its prompt logprobs were gathered.
    let chunked = EngineConfig {
        max_num_tokens: 8,
        enable_chunked_prefill: true,
        capacity_policy: CapacityPolicy::MaxUtilization,
        ..config()
    };
    let roomy = Engine::start(&model_dir(), chunked.clone()).unwrap();
    let base: Vec<_> = prompts
        .iter()
        .flat_map(|p| with_prompt_logprobs(&roomy, std::slice::from_ref(p), 4))
        .collect();
    assert_eq!(wait_idle(&roomy).preemptions, 0);
    roomy.shutdown();
    // 10 blocks of 4 tokens for four requests of 28: the second to start is preempted
    // while its prompt is still being computed.
    let tight = Engine::start(
        &model_dir(),
        EngineConfig {
            kv_max_tokens: Some(40),
            ..chunked
        },
    )
    .unwrap();
    let got = with_prompt_logprobs(&tight, &prompts, 4);
    assert!(
        wait_idle(&tight).preemptions > 0,
        "the test must preempt to test anything"
    );
    tight.shutdown();
    for (i, ((lps, ids), (base_lps, base_ids))) in got.iter().zip(&base).enumerate() {
        assert_eq!(ids, base_ids, "request {i}: generated tokens");
        assert_eq!(lps.len(), 1, "request {i}: one PromptLogprobs event");
        let (lps, base_lps) = (&lps[0], &base_lps[0]);
        // One entry per prompt token after the first (the HTTP answer puts a null first,
        // making one per prompt token).
        assert_eq!(lps.len(), prompts[i].len() - 1, "request {i}: entries");
        for (pos, (a, b)) in lps.iter().zip(base_lps).enumerate() {
            assert_eq!(a.token_id, prompts[i][pos + 1]);
            assert_eq!(a.token_id, b.token_id);
            assert_eq!(a.top.len(), 1);
            assert_eq!(
                a.top[0].0, b.top[0].0,
                "request {i} position {pos}: top token"
            );
            // f32 throughout; chunks may split differently after a preemption, which can
            // move the last bits of a sum.
            assert!(
                (a.logprob - b.logprob).abs() <= 1e-4,
                "request {i} position {pos}: {} vs {}",
                a.logprob,
                b.logprob
            );
        }
    }
}

#[test]
fn guaranteed_no_evict_queues_instead_of_preempting_and_serves_everyone() {
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| prompt(20 + i, 10)).collect();
    let base = solo(config(), &prompts, 20);
    let tight = EngineConfig {
        kv_max_tokens: Some(80),
        ..config()
    };
    let (got, _h) = together(tight, &prompts, 20);
    assert_eq!(base, got);
}

#[test]
fn abort_and_dropped_receivers_free_every_block() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let rx = h.submit(greedy("long", prompt(5, 20), 200)).unwrap();
    let dropped = h.submit(greedy("gone", prompt(6, 20), 200)).unwrap();
    drop(dropped);
    assert!(h.abort("long"));
    let out = collect(rx);
    assert_eq!(out.reason, FinishReason::Abort);
    assert!(!h.abort("never-submitted"));
    let l = wait_idle(&h);
    assert_eq!((l.running, l.queued, l.kv_blocks_used), (0, 0, 0));
}

#[test]
fn stop_tokens_min_tokens_and_max_tokens_end_requests_as_asked() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let p = prompt(7, 9);
    let free = collect(h.submit(greedy("free", p.clone(), 16)).unwrap());
    assert_eq!(free.reason, FinishReason::Length);
    assert_eq!(free.usage.completion_tokens, 16);
    let stop_at = free.ids[3];
    let first_at = free.ids.iter().position(|&t| t == stop_at).unwrap();
    let mut req = greedy("stop", p.clone(), 16);
    req.stopping.stop_token_ids = vec![stop_at];
    let stopped = collect(h.submit(req.clone()).unwrap());
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert_eq!(stopped.stop, Some(stop_at));
    assert_eq!(stopped.ids, free.ids[..first_at]);
    req.request_id = "min".into();
    req.stopping.min_tokens = 16;
    let min = collect(h.submit(req).unwrap());
    assert_eq!(min.reason, FinishReason::Length);
    assert_eq!(min.ids.len(), 16);
}

/// Instruct checkpoints (Llama 3's `<|eot_id|>`) often name their end-of-turn token only in
/// generation_config.json: the engine must stop there, not only on config.json's EOS.
#[test]
fn an_end_token_named_only_in_generation_config_ends_generation() {
    let p = prompt(7, 9);
    let h = Engine::start(&model_dir(), config()).unwrap();
    let free = collect(h.submit(greedy("free", p.clone(), 16)).unwrap());
    h.shutdown();
    // config.json's EOS is 2; the end-of-turn token is the fourth token greedy decoding draws.
    let eot = free.ids[3];
    assert_ne!(eot, 2, "pick a token config.json does not already name");
    let ends = free.ids.iter().position(|&t| t == eot || t == 2).unwrap();

    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir().join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"bos_token_id": 1, "eos_token_id": [{eot}, 2]}}"#),
    )
    .unwrap();
    let h = Engine::start(dir.path(), config()).unwrap();
    assert_eq!(h.info().eos_token_ids, vec![eot, 2]);
    let mut req = greedy("turn", p, 16);
    req.stopping.ignore_eos = false;
    let turn = collect(h.submit(req).unwrap());
    assert_eq!(turn.reason, FinishReason::Stop);
    assert_eq!(turn.stop, Some(free.ids[ends]));
    assert_eq!(turn.ids, free.ids[..ends]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let run = |id: &str, seed| {
        let mut r = greedy(id, prompt(8, 6), 16);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(seed),
            logprobs: Some(3),
            ..Default::default()
        };
        collect(h.submit(r).unwrap()).ids
    };
    assert_eq!(run("x", 1), run("y", 1));
    assert_ne!(run("z", 1), run("w", 2));
}

/// Request migration: a request resumed on a fresh engine from the tokens it generated so far
/// (`GenerateParams::generated`) continues as the undisturbed run did, seeded sampling and
/// penalties included, and reports the whole completion in its usage.
#[test]
fn a_resumed_request_continues_as_the_undisturbed_run() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let request = |id: &str| {
        let mut r = greedy(id, prompt(9, 7), 20);
        r.sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(5),
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            repetition_penalty: 1.2,
            logprobs: Some(1),
            ..Default::default()
        };
        r
    };
    let whole = collect(h.submit(request("whole")).unwrap());
    assert_eq!(whole.ids.len(), 20);
    for seam in [1, 8, 19] {
        let mut resumed = request(&format!("resumed-{seam}"));
        resumed.generated = whole.ids[..seam].to_vec();
        let rest = collect(h.submit(resumed).unwrap());
        assert_eq!(rest.ids, whole.ids[seam..], "seam after {seam} tokens");
        assert_eq!(
            rest.usage.completion_tokens, 20,
            "all generated tokens count"
        );
        assert_eq!(
            rest.usage.prompt_tokens, 7,
            "the carried tokens are not prompt"
        );
        assert_eq!(rest.reason, FinishReason::Length);
    }
    // Counted as prompt instead, the penalties and the random stream would differ.
    let mut as_prompt = request("as-prompt");
    as_prompt.prompt.extend_from_slice(&whole.ids[..8]);
    as_prompt.stopping.max_tokens = 12;
    assert_ne!(collect(h.submit(as_prompt).unwrap()).ids, whole.ids[8..]);
    let mut done = request("done");
    done.generated = whole.ids.clone();
    let err = h
        .submit(done)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("nothing is left to generate"), "{err}");
}

#[test]
fn impossible_requests_are_refused_with_reasons() {
    let h = Engine::start(
        &model_dir(),
        EngineConfig {
            kv_max_tokens: Some(64),
            ..config()
        },
    )
    .unwrap();
    let err = |r: GenerateParams| h.submit(r).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(greedy("a", prompt(1, 300), 1)).contains("max_seq_len is 256"));
    assert!(err(greedy("b", prompt(1, 10), 100)).contains("whole cache holds 16 blocks"));
    assert!(err(greedy("c", vec![], 1)).contains("empty"));
    assert!(err(greedy("d", vec![9999], 1)).contains("vocabulary"));
    let mut bad = greedy("e", prompt(1, 3), 1);
    bad.sampling.top_p = 0.0;
    assert!(err(bad).contains("top_p"));
    let _live = h.submit(greedy("dup", prompt(1, 3), 40)).unwrap();
    assert!(err(greedy("dup", prompt(1, 3), 1)).contains("already in use"));
}

/// trtllm-serve's margin: a sequence may reach max_seq_len + 1 tokens (the last one is sampled,
/// never computed), so a prompt of exactly max_seq_len tokens still gets one token.
#[test]
fn a_sequence_reaches_max_seq_len_plus_one_tokens_and_no_more() {
    let h = Engine::start(
        &model_dir(),
        EngineConfig {
            max_seq_len: Some(32),
            ..config()
        },
    )
    .unwrap();
    let full = collect(h.submit(greedy("full", prompt(1, 32), 5)).unwrap());
    assert_eq!((full.ids.len(), full.reason), (1, FinishReason::Length));
    let open = collect(h.submit(greedy("open", prompt(2, 30), 0)).unwrap());
    assert_eq!((open.ids.len(), open.reason), (3, FinishReason::Length));
    let err = h.submit(greedy("over", prompt(3, 33), 1)).err().unwrap();
    assert!(
        err.to_string()
            .contains("prompt has 33 tokens but max_seq_len is 32"),
        "{err}"
    );
}

#[test]
fn info_reports_the_model_and_limits() {
    let h = Engine::start(&model_dir(), config()).unwrap();
    let i = h.info();
    assert_eq!(
        (
            i.model.as_str(),
            i.vocab_size,
            i.max_seq_len,
            i.tokens_per_block
        ),
        ("llama", 256, 256, 4)
    );
    assert_eq!(i.kv_capacity_blocks, 1024);
    assert_eq!(i.eos_token_ids, vec![2]);
    assert_eq!(i.backend, "cpu");
}

#[test]
fn bad_model_directories_and_settings_are_refused_with_reasons() {
    let missing = Engine::start(Path::new("/nonexistent/model"), config())
        .err()
        .unwrap();
    assert!(missing.to_string().contains("config.json"), "{missing}");
    let zero = Engine::start(
        &model_dir(),
        EngineConfig {
            max_batch_size: 0,
            ..config()
        },
    )
    .err()
    .unwrap();
    assert!(zero.to_string().contains("max_batch_size"), "{zero}");
    let tiny = Engine::start(
        &model_dir(),
        EngineConfig {
            kv_max_tokens: Some(2),
            ..config()
        },
    )
    .err()
    .unwrap();
    assert!(
        tiny.to_string().contains("kv_cache_config.max_tokens"),
        "{tiny}"
    );
    let f16 = Engine::start(
        &model_dir(),
        EngineConfig {
            dtype: ModelDtype::Float16,
            ..config()
        },
    )
    .err()
    .unwrap();
    assert!(
        f16.to_string().contains("float16") && f16.to_string().contains("bfloat16"),
        "{f16}"
    );
}

/// The mistral fixture with `edit` applied to its config.json, in a temporary directory.
fn mistral_with(edit: serde_json::Value) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mistral");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config
        .as_object_mut()
        .unwrap()
        .extend(edit.as_object().unwrap().clone());
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn config_values_the_engine_does_not_implement_fail_the_start_by_name() {
    let gelu = mistral_with(serde_json::json!({"hidden_act": "gelu"}));
    let e = Engine::start(gelu.path(), config())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hidden_act is \"gelu\""), "{e}");
    // A window of no positions: a query would see nothing (transformers gives NaN).
    let empty = mistral_with(serde_json::json!({"sliding_window": 0}));
    let e = Engine::start(empty.path(), config())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sliding_window 0"), "{e}");
}
