//! Verification of drafted tokens (speculative decoding) against a request's own sampling.
//!
//! A draft proposer that puts all its mass on one token `d` (NGram copies text: q = δ(d))
//! is verified by the standard rejection rule: accept `d` with probability p(d) under the
//! distribution the sampler would draw from at that position (the processed row: logit bias,
//! penalties, bans, temperature, top_k, top_p, min_p), else draw from p with `d` removed and
//! renormalised. The token that comes out is distributed exactly as p, so speculation keeps
//! the target distribution. Greedy requests accept `d` when it is the argmax. Not for:
//! proposing drafts (`crate::spec`) or the KV bookkeeping (`engine::speculative`).

use rand::Rng;

use super::{Banned, Sampler, argmax, pick};
use crate::engine::TokenLogprob;

/// What verification of one position gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The token emitted at this position: the draft when accepted, else the replacement.
    pub token: u32,
    /// Whether the draft was accepted (false when there was none).
    pub accepted: bool,
    /// The token's logprob in the raw row, when asked for.
    pub logprob: Option<TokenLogprob>,
}

impl Sampler {
    /// Verifies `draft` (None: the position after the last draft, sampled as usual) against
    /// the row `logits` (modified in place), with `prompt`, `generated` and `banned` as
    /// `sample` takes them. Seeded requests draw from their own stream: one draw for the
    /// acceptance test, one more for a replacement.
    pub fn verify(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        banned: Banned<'_>,
        draft: Option<u32>,
    ) -> Verdict {
        let Some(d) = draft else {
            let (token, logprob) = self.sample(logits, prompt, generated, banned);
            return Verdict {
                token,
                accepted: false,
                logprob,
            };
        };
        self.process(logits, prompt, generated, banned);
        let token = if self.is_greedy() {
            argmax(logits)
        } else {
            self.rejection_sample(logits, d)
        };
        Verdict {
            token,
            accepted: token == d,
            logprob: self.raw_logprob(token),
        }
    }

    /// Accepts `d` with probability p(d), else draws from p without `d` (renormalised).
    fn rejection_sample(&mut self, logits: &[f32], d: u32) -> u32 {
        let uniform = self.rng.random::<f32>();
        let Some(kept) = self.filtered_weights(logits) else {
            // A point mass on the argmax: `d` is accepted exactly when it is that token.
            return argmax(logits);
        };
        let at = self.weight_index(d);
        let p_d = at.map_or(0.0, |i| self.scratch.weights[i] / kept);
        if uniform < p_d {
            return d;
        }
        if let Some(i) = at {
            self.scratch.weights[i] = 0.0;
        }
        let rest = super::sum(&self.scratch.weights);
        if rest <= 0.0 {
            // Only reachable through rounding when p(d) is 1 within a float: keep `d`.
            return d;
        }
        let again = self.rng.random::<f32>();
        self.weight_token(pick(&self.scratch.weights, again * rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplingParams;

    fn sampler(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Default::default()
        })
    }

    /// The probabilities of `logits` at temperature `t`, restricted to the top `k` and
    /// renormalised (k = 0: all).
    fn target(logits: &[f32], t: f32, k: usize) -> Vec<f64> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let keep = if k == 0 { logits.len() } else { k };
        let mut p = vec![0.0f64; logits.len()];
        for &i in &order[..keep] {
            p[i] = (f64::from(logits[i]) / f64::from(t)).exp();
        }
        let z: f64 = p.iter().sum();
        p.iter().map(|x| x / z).collect()
    }

    /// Emitted-token frequencies over `n` verifications of `draft` on `logits`.
    fn frequencies(s: &mut Sampler, logits: &[f32], draft: u32, n: usize) -> (Vec<f64>, usize) {
        let mut counts = vec![0usize; logits.len()];
        let mut accepted = 0;
        for _ in 0..n {
            let mut row = logits.to_vec();
            let v = s.verify(&mut row, &[], &[], Banned(&[]), Some(draft));
            counts[v.token as usize] += 1;
            accepted += usize::from(v.accepted);
        }
        let f = counts.iter().map(|&c| c as f64 / n as f64).collect();
        (f, accepted)
    }

    #[test]
    fn rejection_sampling_keeps_the_target_distribution_for_any_draft() {
        // 40000 draws: a frequency's standard deviation is at most 0.0025; 0.012 is over
        // 4.5 of them, so a correct rule fails this about once in 10^5 runs (fixed seeds
        // make it deterministic anyway), while a rule that always accepted the draft, or
        // drew the replacement from p without removing it, is off by more than 0.05.
        let logits = [1.0f32, 0.2, -0.5, 2.0, 0.0];
        let n = 40_000;
        for (t, k) in [(1.0, 0), (0.7, 0), (1.3, 3)] {
            let p = target(&logits, t, k);
            for draft in [0u32, 2, 3] {
                let mut s = sampler(t, k as u32, 1.0, 7 + u64::from(draft));
                let (f, accepted) = frequencies(&mut s, &logits, draft, n);
                for (i, (fi, pi)) in f.iter().zip(&p).enumerate() {
                    assert!(
                        (fi - pi).abs() < 0.012,
                        "t {t} top_k {k} draft {draft}: token {i} drawn {fi:.4}, p {pi:.4}"
                    );
                }
                // The draft is accepted with probability p(draft).
                let rate = accepted as f64 / n as f64;
                assert!(
                    (rate - p[draft as usize]).abs() < 0.012,
                    "draft {draft} accepted {rate:.4} of the time, p {:.4}",
                    p[draft as usize]
                );
            }
        }
    }

    #[test]
    fn a_draft_outside_top_k_is_never_accepted() {
        let logits = [1.0f32, 0.2, -0.5, 2.0, 0.0];
        let mut s = sampler(1.0, 2, 1.0, 3);
        let (f, accepted) = frequencies(&mut s, &logits, 2, 2_000);
        assert_eq!(accepted, 0);
        assert_eq!(f[2], 0.0);
        assert!(
            (f[0] + f[3] - 1.0).abs() < 1e-9,
            "only the top two are drawn"
        );
    }

    #[test]
    fn greedy_verification_accepts_exactly_the_argmax() {
        let logits = [1.0f32, 0.2, 3.0, 2.0];
        let mut s = sampler(0.0, 0, 1.0, 1);
        let mut row = logits.to_vec();
        let v = s.verify(&mut row, &[], &[], Banned(&[]), Some(2));
        assert_eq!((v.token, v.accepted), (2, true));
        let mut row = logits.to_vec();
        let v = s.verify(&mut row, &[], &[], Banned(&[]), Some(3));
        assert_eq!((v.token, v.accepted), (2, false));
        // A banned argmax is not accepted either: the next best is emitted.
        let mut row = logits.to_vec();
        let v = s.verify(&mut row, &[], &[], Banned(&[2]), Some(2));
        assert_eq!((v.token, v.accepted), (3, false));
    }
}
