//! Tests of the sampler: distributions, filters, penalties, grammar masks, seeded streams and
//! logprobs.

use super::*;
use llmapi_common::guided::{Constraint, GuidedCompiler};

fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn greedy_picks_the_largest_logit() {
    let mut s = Sampler::new(params(0.0, 1));
    let (t, _) = s.sample(&mut [0.1, 3.0, -1.0], &[], &[], Banned(&[]));
    assert_eq!(t, 1);
}

/// The plain scan the vectorized argmax must agree with.
fn argmax_scan(xs: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in xs.iter().enumerate() {
        if x > best.map_or(f32::NEG_INFINITY, |b| xs[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

#[test]
fn argmax_takes_the_first_of_equal_maxima_and_skips_nan() {
    for len in [1, 5, 15, 16, 17, 31, 32, 33, 100, 32000] {
        let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 113) as f32).collect();
        assert_eq!(argmax(&row), argmax_scan(&row), "len {len}");
        // Ties: the same maximum in several lanes and in the tail.
        let mut tied = vec![1.0f32; len];
        for i in (len / 3..len).step_by(5) {
            tied[i] = 9.0;
        }
        assert_eq!(argmax(&tied), argmax_scan(&tied), "tied, len {len}");
    }
    let mut row = vec![0.5f32; 40];
    row[3] = f32::NAN;
    row[20] = 2.0;
    row[37] = f32::NAN;
    assert_eq!(argmax(&row), 20);
    assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0, "everything banned");
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1e30]), 2);
    assert_eq!(argmax(&[]), 0);
}

fn frequencies(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut s = Sampler::new(params);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        let (t, _) = s.sample(&mut logits.to_vec(), &[], &[], Banned(&[]));
        counts[t as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

#[test]
fn temperature_sampling_follows_the_softmax() {
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let f = frequencies(params(1.0, 11), &logits, 20_000);
    for (got, want) in f.iter().zip(probs) {
        assert!((got - want as f64).abs() < 0.015, "{f:?} vs {probs:?}");
    }
    // Temperature 0.5 squares the odds: 25 : 9 : 2.25 : 0.25.
    let f = frequencies(params(0.5, 12), &logits, 20_000);
    assert!((f[0] / f[1] - 25.0 / 9.0).abs() < 0.2, "{f:?}");
}

#[test]
fn top_p_keeps_the_smallest_head_reaching_the_mass() {
    // 0.5 + 0.3 reaches 0.7: the last two tokens never come, the first two in 5 : 3.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let top_p = SamplingParams {
        top_p: 0.7,
        ..params(1.0, 13)
    };
    let f = frequencies(top_p, &logits, 20_000);
    assert_eq!(f[2] + f[3], 0.0, "{f:?}");
    assert!((f[0] - 0.625).abs() < 0.015, "{f:?}");
    // A long, slowly falling row: the head holding half the mass is several hundred
    // tokens, more than one bucket of weights, and nothing past it is drawn.
    let logits: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.002).collect();
    let weights: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let head = weights
        .iter()
        .position(|w| {
            acc += w;
            acc >= 0.5 * total
        })
        .unwrap()
        + 1;
    let mut s = Sampler::new(SamplingParams {
        top_p: 0.5,
        ..params(1.0, 14)
    });
    let drawn: Vec<u32> = (0..5000)
        .map(|_| s.sample(&mut logits.clone(), &[], &[], Banned(&[])).0)
        .collect();
    let highest = *drawn.iter().max().unwrap() as usize;
    assert!(highest < head, "drew {highest}, head is {head}");
    assert!(
        highest > head * 9 / 10,
        "drew up to {highest} of a head of {head}"
    );
}

#[test]
fn min_p_drops_tokens_below_the_fraction_of_the_best() {
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let min_p = SamplingParams {
        min_p: 0.2,
        ..params(1.0, 15)
    };
    // 0.05 < 0.2 * 0.5 is dropped; 0.15 stays.
    let f = frequencies(min_p, &logits, 20_000);
    assert_eq!(f[3], 0.0, "{f:?}");
    assert!((f[2] - 0.15 / 0.95).abs() < 0.015, "{f:?}");
}

#[test]
fn top_k_samples_only_the_k_best_and_banned_tokens_never() {
    // Ten tokens share the best logit; with one of them banned, top_k 9 is the other nine.
    let logits: Vec<f32> = (0..100).map(|i| (i % 10) as f32 * 0.1).collect();
    let mut s = Sampler::new(SamplingParams {
        top_k: 9,
        ..params(1.0, 16)
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..500 {
        let (t, _) = s.sample(&mut logits.clone(), &[], &[], Banned(&[19]));
        assert!(t % 10 == 9 && t != 19, "token {t} is not among the top 9");
        seen.insert(t);
    }
    assert_eq!(seen.len(), 9, "all nine best tokens are drawn");
}

#[test]
fn exp_shifted_matches_libm() {
    let mut w: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.05).collect();
    w.push(f32::NEG_INFINITY);
    let want: Vec<f32> = w.iter().map(|x| x.exp()).collect();
    exp_shifted(&mut w, 0.0);
    for (g, e) in w.iter().zip(&want) {
        // Under exp(-87) (about 1.6e-38, near the smallest normal float) the result is 0.
        if *e > 1.7e-38 {
            assert!((g - e).abs() <= e * 1e-6, "{g} vs {e}");
        } else {
            assert!(*g <= 1.7e-38, "{g} vs {e}");
        }
    }
}

#[test]
fn only_unpenalized_greedy_without_logprobs_is_plain_greedy() {
    let plain = |p: SamplingParams| Sampler::new(p).is_plain_greedy();
    assert!(plain(params(0.0, 1)));
    let top1 = SamplingParams {
        temperature: 0.8,
        top_k: 1,
        ..Default::default()
    };
    assert!(plain(top1));
    assert!(!plain(params(0.7, 1)));
    for p in [
        SamplingParams {
            logprobs: Some(0),
            ..params(0.0, 1)
        },
        SamplingParams {
            repetition_penalty: 1.2,
            ..params(0.0, 1)
        },
        SamplingParams {
            presence_penalty: 0.5,
            ..params(0.0, 1)
        },
        SamplingParams {
            frequency_penalty: 0.5,
            ..params(0.0, 1)
        },
        SamplingParams {
            logit_bias: vec![(2, 1.0)],
            ..params(0.0, 1)
        },
    ] {
        assert!(!plain(p));
    }
}

#[test]
fn same_seed_gives_same_tokens() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let draw = |seed| {
        let mut s = Sampler::new(params(1.0, seed));
        (0..20)
            .map(|_| s.sample(&mut logits.clone(), &[], &[], Banned(&[])).0)
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn top_k_one_and_min_p_restrict_to_the_best_token() {
    let logits = [0.0, 5.0, 4.9, -2.0];
    let mut s = Sampler::new(SamplingParams {
        top_k: 1,
        ..params(1.0, 3)
    });
    let mut s2 = Sampler::new(SamplingParams {
        min_p: 0.99,
        ..params(1.0, 3)
    });
    for _ in 0..20 {
        assert_eq!(s.sample(&mut logits.clone(), &[], &[], Banned(&[])).0, 1);
        assert_eq!(s2.sample(&mut logits.clone(), &[], &[], Banned(&[])).0, 1);
    }
}

#[test]
fn banned_and_penalized_tokens_lose() {
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 10.0,
        ..params(0.0, 1)
    });
    assert_eq!(s.sample(&mut [1.0, 2.0, 1.5], &[1], &[], Banned(&[])).0, 2);
    assert_eq!(
        s.sample(&mut [1.0, 2.0, 1.5], &[], &[], Banned(&[1, 2])).0,
        0
    );
}

#[test]
fn logprobs_report_top_alternatives_in_order() {
    let mut s = Sampler::new(SamplingParams {
        logprobs: Some(2),
        ..params(0.0, 1)
    });
    let (_, lp) = s.sample(&mut [0.0, 2.0, 1.0], &[], &[], Banned(&[]));
    let lp = lp.unwrap();
    assert_eq!(lp.token_id, 1);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    let total: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| x.exp()).sum();
    assert!((lp.logprob - (2.0f32.exp() / total).ln()).abs() < 1e-5);
}

#[test]
fn penalties_kept_across_steps_equal_penalties_counted_afresh() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let vocab = 200;
    let prompt: Vec<u32> = (0..40).map(|_| rng.random_range(0..vocab as u32)).collect();
    let penalized = SamplingParams {
        repetition_penalty: 1.3,
        presence_penalty: 0.4,
        frequency_penalty: 0.25,
        logprobs: Some(3),
        ..SamplingParams::default()
    };
    let mut kept = Sampler::new(penalized.clone());
    let mut generated: Vec<u32> = Vec::new();
    for step in 0..60u32 {
        let row: Vec<f32> = (0..vocab)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect();
        let (mut a, mut b) = (row.clone(), row);
        let from_kept = kept.sample(&mut a, &prompt, &generated, Banned(&[]));
        let from_fresh =
            Sampler::new(penalized.clone()).sample(&mut b, &prompt, &generated, Banned(&[]));
        assert_eq!(a, b, "penalized logits differ at step {step}");
        assert_eq!(from_kept.0, from_fresh.0);
        assert_eq!(from_kept.1, from_fresh.1);
        // Mostly the greedy pick, sometimes a repeat, so counts above 1 occur.
        generated.push(if step.is_multiple_of(3) {
            7
        } else {
            from_kept.0
        });
    }
}

#[test]
fn a_batch_on_the_pool_draws_what_one_row_at_a_time_draws() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vocab = 1000;
    let rows: Vec<Vec<f32>> = (0..9)
        .map(|_| (0..vocab).map(|_| rng.random::<f32>() * 3.0).collect())
        .collect();
    let prompt = [1u32, 2, 3, 2];
    let generated = [4u32, 4, 9];
    let make = |i: usize| {
        Sampler::new(SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            repetition_penalty: 1.2,
            seed: Some(i as u64),
            logprobs: i.is_multiple_of(2).then_some(2),
            ..SamplingParams::default()
        })
    };
    let mut one_by_one = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let mut row = row.clone();
        let banned = [i as u32];
        one_by_one.push(make(i).sample(&mut row, &prompt, &generated, Banned(&banned)));
    }
    let mut samplers: Vec<Sampler> = (0..rows.len()).map(make).collect();
    let mut work = rows.clone();
    let jobs = samplers
        .iter_mut()
        .zip(work.iter_mut())
        .enumerate()
        .map(|(i, (sampler, row))| SampleJob {
            sampler,
            logits: row,
            prompt: &prompt,
            generated: &generated,
            banned: vec![i as u32],
        })
        .collect();
    assert_eq!(sample_batch(jobs), one_by_one);
}

#[test]
fn top_logprobs_are_the_best_in_order_with_lower_ids_first_on_ties() {
    let row = [-3.0f32, -1.0, -2.0, -1.0, f32::NAN, -0.5, -4.0];
    let lp = token_logprob(&row, 2, 4);
    assert_eq!(lp.logprob, -2.0);
    assert_eq!(lp.top, vec![(5, -0.5), (1, -1.0), (3, -1.0), (2, -2.0)]);
    assert!(token_logprob(&row, 0, 0).top.is_empty());
    assert_eq!(token_logprob(&row, 0, 20).top.len(), 6, "all but NaN");
}

#[test]
fn a_resumed_sampler_draws_what_the_undisturbed_one_draws_after_the_seam() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let vocab = 300;
    let prompt: Vec<u32> = (0..30).map(|_| rng.random_range(0..vocab as u32)).collect();
    // One row per step; step 9's row has nothing finite, which returns before filtering.
    let rows: Vec<Vec<f32>> = (0..40)
        .map(|step| {
            (0..vocab)
                .map(|_| match step {
                    9 => f32::NEG_INFINITY,
                    _ => rng.random::<f32>() * 5.0 - 2.5,
                })
                .collect()
        })
        .collect();
    let seeded = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 120,
        min_p: 0.01,
        seed: Some(77),
        repetition_penalty: 1.1,
        presence_penalty: 0.3,
        frequency_penalty: 0.2,
        ..SamplingParams::default()
    };
    // Step 3 bans a token, as min_tokens does.
    let run = |sampler: &mut Sampler, generated: &mut Vec<u32>, steps: std::ops::Range<usize>| {
        for step in steps {
            let banned: &[u32] = if step == 3 { &[5, 6] } else { &[] };
            let (t, _) =
                sampler.sample(&mut rows[step].clone(), &prompt, generated, Banned(banned));
            generated.push(t);
        }
    };
    let mut whole = Vec::new();
    run(&mut Sampler::new(seeded.clone()), &mut whole, 0..rows.len());
    assert!(
        whole.iter().collect::<std::collections::HashSet<_>>().len() > 10,
        "a varied draw: {whole:?}"
    );
    for seam in [1, 9, 10, 23, 39] {
        let mut resumed = Vec::new();
        run(&mut Sampler::new(seeded.clone()), &mut resumed, 0..seam);
        // A fresh sampler (another worker) takes over with the tokens generated so far.
        run(
            &mut Sampler::resumed(seeded.clone(), seam),
            &mut resumed,
            seam..rows.len(),
        );
        assert_eq!(resumed, whole, "seam after {seam} tokens");
    }
    // Without the resumed position the continuation differs: the test can tell.
    let mut restarted = whole[..20].to_vec();
    run(&mut Sampler::new(seeded), &mut restarted, 20..rows.len());
    assert_ne!(restarted, whole);
}

fn biased(temperature: f32, seed: u64, bias: Vec<(u32, f32)>) -> SamplingParams {
    SamplingParams {
        logit_bias: bias,
        ..params(temperature, seed)
    }
}

/// A row whose argmax (id 3) leads the weakest token (id 7) by 12 logits.
fn spread_row() -> Vec<f32> {
    (0..10)
        .map(|i| {
            if i == 3 {
                6.0
            } else if i == 7 {
                -6.0
            } else {
                (i as f32).sin()
            }
        })
        .collect()
}

#[test]
fn a_full_positive_bias_forces_its_token_under_greedy_and_sampling() {
    for (temperature, top_p, top_k) in [(0.0, 1.0, 0), (1.0, 1.0, 0), (1.5, 0.9, 5), (0.7, 1.0, 0)]
    {
        let p = SamplingParams {
            top_p,
            top_k,
            ..biased(temperature, 11, vec![(7, 100.0)])
        };
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            let (t, _) = s.sample(&mut spread_row(), &[], &[], Banned(&[]));
            assert_eq!(
                t, 7,
                "temperature {temperature}, top_p {top_p}, top_k {top_k}"
            );
        }
    }
}

#[test]
fn a_full_negative_bias_bans_the_argmax() {
    let mut greedy = Sampler::new(biased(0.0, 1, vec![(3, -100.0)]));
    let mut row = spread_row();
    let (t, _) = greedy.sample(&mut row, &[], &[], Banned(&[]));
    let mut expected = spread_row();
    expected[3] = f32::NEG_INFINITY;
    assert_eq!(t, argmax(&expected));
    let f = frequencies(biased(1.0, 5, vec![(3, -100.0)]), &spread_row(), 20_000);
    assert_eq!(f[3], 0.0, "a token 100 logits down drew {}", f[3]);
    // Unbiased, the same token takes most draws (6 logits above the rest).
    let free = frequencies(params(1.0, 5), &spread_row(), 2_000);
    assert!(free[3] > 0.9, "{}", free[3]);
}

#[test]
fn a_bias_shifts_the_distribution_by_its_exponential() {
    // Two equal logits; +ln 3 on the second makes it three times as likely.
    let f = frequencies(biased(1.0, 9, vec![(1, 3f32.ln())]), &[0.0, 0.0], 40_000);
    assert!((f[1] - 0.75).abs() < 0.015, "{f:?}");
}

#[test]
fn logprobs_are_those_of_the_unbiased_row() {
    let mut row = spread_row();
    let raw = log_softmax(&row);
    let mut s = Sampler::new(SamplingParams {
        logprobs: Some(2),
        ..biased(0.0, 1, vec![(7, 100.0)])
    });
    let (t, lp) = s.sample(&mut row, &[], &[], Banned(&[]));
    let lp = lp.expect("logprobs asked for");
    assert_eq!(t, 7);
    assert_eq!(lp.logprob, raw[7]);
    assert_eq!(lp.top[0].0, 3, "the raw row's best alternative");
}

/// A compiler over the demo checkpoint's tokenizer (the checkpoint written to `dir`).
fn demo_compiler(dir: &std::path::Path) -> GuidedCompiler {
    use llmapi_common::checkpoint::{EOT, Preset, write_checkpoint};
    let preset = Preset::by_name("demo").unwrap();
    write_checkpoint(&preset, dir, &mut |_, _| {}).unwrap();
    let tok = llmapi_common::tokenizer::Tokenizer::from_dir(dir).unwrap();
    let eot = tok.token_to_id(EOT).unwrap();
    GuidedCompiler::new(&tok, tok.vocab_size(), &[eot]).unwrap()
}

#[test]
fn a_guided_sampler_takes_only_allowed_tokens_greedy_or_not_and_ends_with_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let compiler = demo_compiler(dir.path());
    let tok = llmapi_common::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    let choice = Constraint::Choice(vec!["yes".into()]);
    for temperature in [0.0, 1.0] {
        let guide = Guide::new(compiler.matcher(&choice).unwrap(), &[]).unwrap();
        let mut s = Sampler::new(params(temperature, 1)).with_guide(Some(guide));
        // A guided sampler never hands the pick to the backend's plain argmax.
        assert!(!s.is_plain_greedy());
        let mut out = Vec::new();
        let mut complete = false;
        for _ in 0..8 {
            // The raw row prefers token 0, a special token the grammar never allows.
            let mut row = vec![0.0f32; compiler.vocab_size()];
            row[0] = 100.0;
            let (t, _) = s.sample(&mut row, &[], &out, Banned(&[]));
            out.push(t);
            complete = s.advance_guide(t).unwrap();
            if complete {
                break;
            }
        }
        assert!(complete, "temperature {temperature}: {out:?}");
        assert_eq!(
            tok.decode(&out, false).unwrap(),
            "yes",
            "temperature {temperature}"
        );
    }
}
