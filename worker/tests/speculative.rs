//! Speculative decoding (NGram drafts, and DraftTarget with a draft checkpoint) against plain
//! decoding on the golden checkpoints: greedy output token for token identical, drafts
//! accepted on text that repeats itself (every one when the target is its own draft, also
//! through preemptions), stop tokens and max_tokens honoured in the middle of an accepted run,
//! a draft of another vocabulary refused, adaptive draft length for a draft rarely right, and
//! the figures.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};

use llmapi_common::args::SpeculativeConfig;
use llmapi_worker::engine::{
    CapacityPolicy, Engine, EngineConfig, GenerateParams, SamplingParams, TokenEvent,
};
use support::{case, golden_config, greedy};
use tokio::sync::mpsc::UnboundedReceiver;

fn config(speculative: Option<SpeculativeConfig>) -> EngineConfig {
    EngineConfig {
        speculative,
        ..golden_config()
    }
}

/// A prompt that says the same thing three times: its continuation is likely to repeat it.
fn repeating(seed: u32) -> Vec<u32> {
    let phrase: Vec<u32> = (0..7).map(|i| (seed * 37 + i * 13 + 5) % 240 + 3).collect();
    phrase.iter().cycle().take(21).copied().collect()
}

fn plain(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 31 + i * 17 + 3) % 250 + 3)
        .collect()
}

/// Tokens, logprobs and `avg_decoded_tokens_per_iter` of one request.
struct Run {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    avg: Option<f64>,
    stop: Option<u32>,
}

fn read(mut rx: UnboundedReceiver<TokenEvent>) -> Run {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut run = Run {
        ids: Vec::new(),
        logprobs: Vec::new(),
        avg: None,
        stop: None,
    };
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(TokenEvent::Tokens { ids, logprobs }) => {
                run.ids.extend(ids);
                run.logprobs.extend(logprobs.iter().map(|l| l.logprob));
            }
            Ok(TokenEvent::Finished {
                avg_decoded_tokens_per_iter,
                stop_token_id,
                ..
            }) => {
                run.avg = avg_decoded_tokens_per_iter;
                run.stop = stop_token_id;
                return run;
            }
            Ok(TokenEvent::Error(e) | TokenEvent::Refused(e)) => panic!("engine error: {e}"),
            Ok(TokenEvent::PromptLogprobs(_)) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("stream ended without Finished: {e}"),
        }
    }
    panic!("no Finished event within 60 s");
}

/// Serves every request at once on an engine with `cfg` on the golden Llama.
fn serve(
    cfg: EngineConfig,
    reqs: &[GenerateParams],
) -> (Vec<Run>, llmapi_worker::engine::LoadStats) {
    let h = Engine::start(&case("llama"), cfg).unwrap();
    let rxs: Vec<_> = reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
    let runs = rxs.into_iter().map(read).collect();
    let load = support::wait_idle(&h);
    h.shutdown();
    (runs, load)
}

fn requests(max_tokens: u32) -> Vec<GenerateParams> {
    let mut reqs: Vec<GenerateParams> = (0..3)
        .map(|i| greedy(&format!("r{i}"), repeating(i), max_tokens))
        .collect();
    reqs.extend((0..2).map(|i| greedy(&format!("p{i}"), plain(i, 9 + 4 * i as usize), max_tokens)));
    reqs
}

#[test]
fn greedy_output_is_identical_with_ngram_drafts_and_drafts_are_accepted() {
    let reqs = requests(45);
    let (base, base_load) = serve(config(None), &reqs);
    let (spec, load) = serve(config(Some(SpeculativeConfig::ngram(4))), &reqs);
    for ((b, s), r) in base.iter().zip(&spec).zip(&reqs) {
        assert_eq!(
            b.ids, s.ids,
            "{}: speculation changed the greedy output",
            r.request_id
        );
        assert_eq!(b.ids.len(), 45);
        assert_eq!(b.avg, None, "no figure without speculation");
    }
    assert_eq!(base_load.spec_draft_tokens, 0);
    assert!(
        load.spec_accepted_tokens > 0,
        "no draft was accepted: {load:?}"
    );
    assert!(load.spec_accepted_tokens <= load.spec_draft_tokens);
    let best = spec.iter().filter_map(|s| s.avg).fold(0.0, f64::max);
    assert!(
        best > 1.0,
        "no request decoded more than a token per step: {best}"
    );
}

#[test]
fn one_request_at_a_time_gives_the_same_tokens_as_a_batch_with_drafts() {
    let reqs = requests(30);
    let (base, _) = serve(config(None), &reqs);
    for r in &reqs {
        let (one, _) = serve(
            config(Some(SpeculativeConfig::ngram(6))),
            std::slice::from_ref(r),
        );
        let b = base
            .iter()
            .zip(&reqs)
            .find(|(_, q)| q.request_id == r.request_id);
        assert_eq!(
            Some(&one[0].ids),
            b.map(|(b, _)| &b.ids),
            "{}",
            r.request_id
        );
    }
}

#[test]
fn stop_tokens_and_logprobs_inside_an_accepted_run_match_plain_decoding() {
    let prompt = repeating(1);
    let mut r = greedy("s", prompt.clone(), 40);
    r.sampling.logprobs = Some(2);
    let (base, _) = serve(config(None), std::slice::from_ref(&r));
    let (spec, _) = serve(
        config(Some(SpeculativeConfig::ngram(4))),
        std::slice::from_ref(&r),
    );
    assert_eq!(base[0].ids, spec[0].ids);
    // Each token's logprob is from its own row; rows of a verified chunk and of single
    // decode steps differ by f32 rounding only (1e-3 is far above it and far below any
    // difference between tokens' logprobs).
    for (a, b) in base[0].logprobs.iter().zip(&spec[0].logprobs) {
        assert!((a - b).abs() < 1e-3, "logprob {a} vs {b}");
    }
    // Stop at a token that comes late in the output: the run stops exactly there.
    let at = base[0].ids.len() * 2 / 3;
    let stop = base[0].ids[at];
    let first = base[0].ids.iter().position(|&t| t == stop).unwrap_or(at);
    let mut s = greedy("stop", prompt, 40);
    s.stopping.stop_token_ids = vec![stop];
    let (base, _) = serve(config(None), std::slice::from_ref(&s));
    let (spec, _) = serve(
        config(Some(SpeculativeConfig::ngram(4))),
        std::slice::from_ref(&s),
    );
    // The stop token ends the request without being emitted.
    assert_eq!(
        base[0].ids.len(),
        first,
        "plain decoding stops at the first {stop}"
    );
    assert_eq!(spec[0].ids, base[0].ids);
    assert_eq!(spec[0].stop, Some(stop));
}

#[test]
fn max_utilization_with_a_small_cache_gives_the_same_tokens_with_drafts() {
    let small = |spec| EngineConfig {
        capacity_policy: CapacityPolicy::MaxUtilization,
        kv_max_tokens: Some(160),
        enable_block_reuse: false,
        ..config(spec)
    };
    let reqs = requests(40);
    let (base, _) = serve(small(None), &reqs);
    let (spec, load) = serve(small(Some(SpeculativeConfig::ngram(4))), &reqs);
    for (b, s) in base.iter().zip(&spec) {
        assert_eq!(b.ids, s.ids);
    }
    assert_eq!(
        load.kv_blocks_used, 0,
        "every block went back after the requests: {load:?}"
    );
}

#[test]
fn sampled_requests_with_drafts_finish_with_valid_tokens() {
    let reqs: Vec<GenerateParams> = (0..3)
        .map(|i| GenerateParams {
            sampling: SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: Some(i),
                ..Default::default()
            },
            ..greedy(&format!("t{i}"), repeating(i as u32), 30)
        })
        .collect();
    let (runs, load) = serve(config(Some(SpeculativeConfig::ngram(4))), &reqs);
    for r in &runs {
        assert_eq!(r.ids.len(), 30);
        assert!(r.avg.is_some_and(|a| a >= 1.0));
    }
    assert!(
        load.spec_draft_tokens > 0,
        "sampled requests were drafted for"
    );
}

#[test]
fn prefix_blocks_cached_after_speculation_hold_only_accepted_tokens() {
    // A runs with drafts; B's prompt is A's prompt and output, so B starts from the blocks A
    // left in the prefix cache. Had a block been registered with a rejected draft's KV, B's
    // tokens would differ from those of an engine that computes B's prompt from scratch.
    let h = Engine::start(&case("llama"), config(Some(SpeculativeConfig::ngram(4)))).unwrap();
    let a = read(h.submit(greedy("a", repeating(2), 40)).unwrap());
    let mut prompt = repeating(2);
    prompt.extend(&a.ids[..36]);
    let b = read(h.submit(greedy("b", prompt.clone(), 12)).unwrap());
    let load = support::wait_idle(&h);
    h.shutdown();
    assert!(a.avg.is_some_and(|x| x > 1.0), "A's drafts were accepted");
    assert!(
        load.prefix_cache_hits >= 48,
        "B reused A's blocks: {load:?}"
    );
    let (fresh, _) = serve(config(None), &[greedy("b", prompt, 12)]);
    assert_eq!(b.ids, fresh[0].ids);
}

fn draft_target(k: u32, dir: &std::path::Path) -> Option<SpeculativeConfig> {
    Some(SpeculativeConfig::draft_target(k, dir.to_str().unwrap()))
}

#[test]
fn a_checkpoint_as_its_own_draft_has_every_draft_accepted_and_plain_output() {
    let reqs = requests(45);
    let (base, _) = serve(config(None), &reqs);
    let (spec, load) = serve(config(draft_target(4, &case("llama"))), &reqs);
    for ((b, s), r) in base.iter().zip(&spec).zip(&reqs) {
        assert_eq!(
            b.ids, s.ids,
            "{}: the draft model changed the output",
            r.request_id
        );
        // 45 tokens: the prefill's, then 8 steps of 4 drafts and a bonus, then 4 tokens
        // (3 drafts, cut by max_tokens): 45 / 10 steps.
        assert_eq!(s.avg, Some(4.5), "{}: every draft accepted", r.request_id);
    }
    assert!(load.spec_draft_tokens > 0);
    assert_eq!(
        load.spec_accepted_tokens, load.spec_draft_tokens,
        "acceptance 1.0 with the target as its own draft"
    );
}

#[test]
fn a_truncated_draft_gives_plain_greedy_output_and_sampled_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    llmapi_common::checkpoint::truncate::write_truncated(&case("llama"), 1, dir.path()).unwrap();
    let reqs = requests(40);
    let (base, _) = serve(config(None), &reqs);
    let (spec, load) = serve(config(draft_target(3, dir.path())), &reqs);
    for (b, s) in base.iter().zip(&spec) {
        assert_eq!(b.ids, s.ids);
        assert!(
            s.avg.is_some_and(|a| (1.0..=4.0).contains(&a)),
            "{:?}",
            s.avg
        );
    }
    assert!(load.spec_draft_tokens > 0 && load.spec_accepted_tokens <= load.spec_draft_tokens);
    let sampled: Vec<GenerateParams> = (0..2)
        .map(|i| GenerateParams {
            sampling: SamplingParams {
                temperature: 0.8,
                seed: Some(i),
                ..Default::default()
            },
            ..greedy(&format!("t{i}"), repeating(i as u32), 30)
        })
        .collect();
    let (runs, _) = serve(config(draft_target(3, dir.path())), &sampled);
    for r in &runs {
        assert_eq!(r.ids.len(), 30);
        assert!(r.ids.iter().all(|&t| t < 256));
    }
}

#[test]
fn a_draft_with_another_vocabulary_is_refused_naming_both_sizes() {
    // qwen2's golden checkpoint has 512 tokens, llama's 256.
    match Engine::start(&case("llama"), config(draft_target(4, &case("qwen2")))) {
        Ok(h) => {
            h.shutdown();
            panic!("a 512-token draft for a 256-token target was accepted");
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("512") && e.contains("256"), "{e}");
        }
    }
}

#[test]
fn a_self_draft_keeps_acceptance_1_through_preemptions_in_a_small_cache() {
    // Preempted sequences lose their blocks, and with them the draft's KV: the draft must
    // recompute it (draft_computed back to 0), or its proposals would stop matching.
    let small = |spec| EngineConfig {
        capacity_policy: CapacityPolicy::MaxUtilization,
        kv_max_tokens: Some(160),
        enable_block_reuse: false,
        ..config(spec)
    };
    let reqs = requests(40);
    let (base, _) = serve(small(None), &reqs);
    let (spec, load) = serve(small(draft_target(4, &case("llama"))), &reqs);
    for (b, s) in base.iter().zip(&spec) {
        assert_eq!(b.ids, s.ids);
    }
    assert!(
        load.preemptions > 0,
        "the cache was small enough to preempt: {load:?}"
    );
    assert_eq!(load.spec_accepted_tokens, load.spec_draft_tokens);
    assert_eq!(load.kv_blocks_used, 0);
}

#[test]
fn adaptive_draft_length_cuts_the_drafts_of_a_draft_model_that_is_rarely_right() {
    // Another checkpoint with the same vocabulary size: its guesses rarely match llama's.
    let reqs = requests(60);
    let (base, _) = serve(config(None), &reqs);
    let (spec, load) = serve(config(draft_target(4, &case("llama_tf4"))), &reqs);
    for (b, s) in base.iter().zip(&spec) {
        assert_eq!(b.ids, s.ids);
    }
    let emitted: usize = spec.iter().map(|s| s.ids.len()).sum();
    assert!(
        (load.spec_accepted_tokens as f64) < 0.25 * load.spec_draft_tokens as f64,
        "this draft is rarely right: {load:?}"
    );
    // Four drafts a step all along would be about 4 * 60 per request; the halving and the
    // pauses keep it under one per emitted token.
    assert!(
        (load.spec_draft_tokens as usize) < emitted,
        "{} drafts for {emitted} tokens",
        load.spec_draft_tokens
    );
}
