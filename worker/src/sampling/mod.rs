//! Token sampling: penalties, greedy, temperature, top-k, top-p, min-p, seeded RNG, logprobs.
//!
//! Works on one request's logits row at a time. Not for: stopping decisions (the scheduler's).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::{SamplingParams, TokenLogprob};

/// Per-request sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Tokens that must not be sampled yet (EOS and stop ids before min_tokens).
pub struct Banned<'a>(pub &'a [u32]);

impl Sampler {
    /// A sampler seeded from `params.seed`, or from entropy when absent.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::seed_from_u64(rand::random()),
        };
        Self { params, rng }
    }

    /// Whether the next token is the plain argmax of the raw logits (greedy, no penalties,
    /// no logprobs), so a backend may pick it itself (`Backend::forward_greedy`); tokens the
    /// caller bans are its own to check.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        let penalized = (p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0)
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0;
        (p.temperature <= 0.0 || p.top_k == 1) && p.logprobs.is_none() && !penalized
    }

    /// Whether sampling needs top-n logprobs for each token.
    pub fn logprobs(&self) -> Option<u32> {
        self.params.logprobs
    }

    /// Picks the next token from `logits` (modified in place).
    ///
    /// `prompt` and `generated` feed the penalties; `banned` tokens get probability zero.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        banned: Banned<'_>,
    ) -> (u32, Option<TokenLogprob>) {
        let raw_logprobs = self.params.logprobs.map(|_| log_softmax(logits));
        self.apply_penalties(logits, prompt, generated);
        for &t in banned.0 {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let greedy = self.params.temperature <= 0.0 || self.params.top_k == 1;
        let token = if greedy {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        let top_n = self.params.logprobs.unwrap_or(0);
        let logprob = raw_logprobs.map(|lp| token_logprob(&lp, token, top_n));
        (token, logprob)
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                let i = t as usize;
                if i < logits.len() && !seen[i] {
                    seen[i] = true;
                    let l = &mut logits[i];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && (p.top_k as usize) < cand.len() {
            let k = p.top_k as usize;
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
        }
        cand.sort_unstable_by(by_logit_desc);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 && p.top_p > 0.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of a row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|&l| l - lse).collect()
}

/// The logprob of `token` and the `top_n` best alternatives from a log-softmax row.
pub fn token_logprob(logprobs: &[f32], token: u32, top_n: u32) -> TokenLogprob {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = (top_n as usize).min(idx.len());
    let by_desc = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]);
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_desc);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by_desc);
    TokenLogprob {
        token_id: token,
        logprob: logprobs
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY),
        top: idx.iter().map(|&i| (i, logprobs[i as usize])).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
