//! Token sampling: penalties, greedy, temperature, top-k, top-p, min-p, seeded RNG, logprobs.
//!
//! A `Sampler` works on one request's logits row; `sample_batch` samples a step's rows on the
//! rayon pool, one task per sequence. Each sampler keeps its own scratch rows and its penalty
//! counts across steps (updated by the tokens generated since the last call), so a step
//! allocates nothing vocabulary-sized and penalties cost the number of distinct tokens seen,
//! not the length of the history. Not for: stopping decisions (the scheduler's).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::engine::{SamplingParams, TokenLogprob};

/// Per-request sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    penalties: Penalties,
    scratch: Scratch,
}

/// What the penalties need of a request's tokens, kept up to date across steps.
#[derive(Debug, Default)]
struct Penalties {
    /// Every distinct token of the prompt and the output (the repetition penalty's set), with
    /// how often it occurs in the output (the presence and frequency penalties' counts).
    seen: HashMap<u32, u32>,
    /// Whether the prompt's tokens are in `seen`.
    prompt_absorbed: bool,
    /// How many generated tokens are counted in `seen`.
    generated_absorbed: usize,
}

impl Penalties {
    /// Counts the tokens of `prompt` (once) and of `generated` since the last call. A
    /// `generated` shorter than what was counted (a caller that starts over) recounts.
    fn absorb(&mut self, prompt: &[u32], generated: &[u32]) {
        if generated.len() < self.generated_absorbed {
            *self = Self::default();
        }
        if !self.prompt_absorbed {
            for &t in prompt {
                self.seen.entry(t).or_insert(0);
            }
            self.prompt_absorbed = true;
        }
        for &t in &generated[self.generated_absorbed..] {
            *self.seen.entry(t).or_insert(0) += 1;
        }
        self.generated_absorbed = generated.len();
    }
}

/// Vocabulary-sized rows reused from step to step.
#[derive(Debug, Default)]
struct Scratch {
    /// Candidate weights.
    weights: Vec<f32>,
    /// Candidate ids and scaled logits, when top_k selects them.
    candidates: Vec<(u32, f32)>,
    /// The raw row's log-softmax, when logprobs are asked for.
    logprobs: Vec<f32>,
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
        Self {
            params,
            rng,
            penalties: Penalties::default(),
            scratch: Scratch::default(),
        }
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
        if self.params.logprobs.is_some() {
            log_softmax_into(logits, &mut self.scratch.logprobs);
        }
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
        let logprob = self
            .params
            .logprobs
            .map(|top_n| token_logprob(&self.scratch.logprobs, token, top_n));
        (token, logprob)
    }

    fn apply_penalties(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        let repetition = p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0;
        let additive = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if !repetition && !additive {
            return;
        }
        self.penalties.absorb(prompt, generated);
        for (&t, &count) in &self.penalties.seen {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if repetition {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            if additive && count > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
    }

    /// Draws from the tempered distribution restricted by top_k, top_p and min_p.
    ///
    /// Works on a dense row of weights `exp((l - max) / T)`, so the best candidate weighs 1
    /// and a weight is also the ratio min_p compares against. Nothing is sorted but the few
    /// candidates where top_p's mass is reached (see `keep_top_p`); top_k selects its k in
    /// linear time. Plain temperature sampling is three vectorized passes over the row.
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let scaled = |l: f32| {
            if l.is_finite() {
                l * inv_t
            } else {
                f32::NEG_INFINITY
            }
        };
        let Scratch {
            weights: w,
            candidates: cand,
            ..
        } = &mut self.scratch;
        w.clear();
        // With top_k, the candidates are the k best ids (in `cand`); otherwise every id.
        let top_k = p.top_k > 0 && (p.top_k as usize) < logits.len();
        if top_k {
            let k = p.top_k as usize;
            cand.clear();
            cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, scaled(l))),
            );
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
            w.extend(cand.iter().map(|c| c.1));
        } else {
            w.extend(logits.iter().map(|&l| scaled(l)));
        }
        let max = w[argmax(w) as usize];
        if !max.is_finite() {
            // Nothing finite, or a temperature so low that a logit overflowed (then all
            // the mass sits on the best token).
            return argmax(logits);
        }
        exp_shifted(w, max);
        let total = sum(w);
        let mut kept = total;
        if p.min_p > 0.0 {
            for x in w.iter_mut() {
                if *x < p.min_p {
                    *x = 0.0;
                }
            }
            kept = sum(w);
        }
        if p.top_p < 1.0 && p.top_p > 0.0 {
            keep_top_p(w, p.top_p * total);
            kept = sum(w);
        }
        let i = pick(w, self.rng.random::<f32>() * kept);
        if top_k { cand[i].0 } else { i as u32 }
    }
}

/// One sequence's share of a step: its sampler, its logits row (modified in place), its
/// prompt and generated tokens, and the tokens it may not draw yet.
pub struct SampleJob<'a> {
    /// The sequence's sampler.
    pub sampler: &'a mut Sampler,
    /// Its logits row.
    pub logits: &'a mut [f32],
    /// Its prompt tokens (for the repetition penalty).
    pub prompt: &'a [u32],
    /// Its generated tokens so far.
    pub generated: &'a [u32],
    /// Tokens banned at this length.
    pub banned: Vec<u32>,
}

/// Samples every job of a step on the rayon pool (each job on one thread: a row is too small
/// to split); results in the jobs' order.
pub fn sample_batch(jobs: Vec<SampleJob<'_>>) -> Vec<(u32, Option<TokenLogprob>)> {
    let one = |j: SampleJob<'_>| {
        j.sampler
            .sample(j.logits, j.prompt, j.generated, Banned(&j.banned))
    };
    if jobs.len() < 2 {
        return jobs.into_iter().map(one).collect();
    }
    jobs.into_par_iter().with_max_len(1).map(one).collect()
}

/// The index where the running sum of `w` first reaches `r`: whole blocks whose sum stays
/// below are skipped. Rounding can leave `r` above the total; then the last positive weight.
fn pick(w: &[f32], mut r: f32) -> usize {
    const BLOCK: usize = 64;
    let mut last = 0;
    for (b, block) in w.chunks(BLOCK).enumerate() {
        let s = sum(block);
        if s <= 0.0 {
            continue;
        }
        if r > s {
            r -= s;
            last = b * BLOCK + block.iter().rposition(|&x| x > 0.0).unwrap_or(0);
            continue;
        }
        for (j, &x) in block.iter().enumerate() {
            if x > 0.0 {
                last = b * BLOCK + j;
                r -= x;
                if r <= 0.0 {
                    break;
                }
            }
        }
        return last;
    }
    last
}

/// Sum with 16 partial sums, so the compiler vectorizes it.
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `w[i] = exp(w[i] - max)` for `w[i] <= max`, 0 for negative infinity; relative error
/// below 2e-7, in a form the compiler vectorizes (libm's `expf` is one value per call).
fn exp_shifted(w: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { exp_shifted_avx512(w, max) };
        }
    }
    exp_shifted_lanes(w, max);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_shifted_avx512(w: &mut [f32], max: f32) {
    exp_shifted_lanes(w, max);
}

#[inline(always)]
fn exp_shifted_lanes(w: &mut [f32], max: f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    for v in w.iter_mut() {
        // Below -87 the result is under the smallest normal float: call it 0.
        let x = (*v - max).max(-87.0);
        let n = (x * LOG2E).round();
        let r = x - n * LN2_HI - n * LN2_LO;
        // Taylor terms to r^6 for |r| <= ln2/2.
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        let scale = f32::from_bits((((n as i32) + 127).max(0) as u32) << 23);
        *v = if x > -87.0 { p * scale } else { 0.0 };
    }
}

/// Zeroes all but the fewest heaviest weights that sum to at least `mass` (all stay when
/// none do).
///
/// Weights lie in [0, 1], where the bit patterns of floats order like their values, so one
/// pass sums the mass per bucket of equal top bits (1/64 of a power of two wide); the
/// heaviest buckets are kept whole, and only the bucket where the mass is reached is sorted.
/// A full sort of a 32000-token row would cost several times more.
fn keep_top_p(w: &mut [f32], mass: f32) {
    const SHIFT: u32 = 17;
    let bucket = |x: f32| (x.to_bits() >> SHIFT) as usize;
    let mut bucket_mass = vec![0.0f32; bucket(1.0) + 1];
    for &x in w.iter() {
        bucket_mass[bucket(x)] += x;
    }
    let mut acc = 0.0f32;
    let mut edge = None;
    for (b, &m) in bucket_mass.iter().enumerate().rev() {
        if acc + m >= mass {
            edge = Some(b);
            break;
        }
        acc += m;
    }
    let Some(edge) = edge else {
        return;
    };
    let mut at_edge: Vec<(u32, f32)> = w
        .iter()
        .enumerate()
        .filter(|(_, x)| bucket(**x) == edge)
        .map(|(i, &x)| (i as u32, x))
        .collect();
    at_edge.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut reached = at_edge.len();
    for (j, c) in at_edge.iter().enumerate() {
        acc += c.1;
        if acc >= mass {
            reached = j + 1;
            break;
        }
    }
    for c in &at_edge[reached..] {
        w[c.0 as usize] = 0.0;
    }
    for x in w.iter_mut() {
        if bucket(*x) < edge {
            *x = 0.0;
        }
    }
}

/// Index of the largest value (the first one on ties); NaN never wins, and a row with nothing
/// above negative infinity gives 0.
///
/// Greedy decoding scans one vocab-sized row per sequence per step on the engine thread,
/// between two forward passes, so this is written to vectorize: 16 running maxima, one per
/// lane, merged at the end; on AVX-512 machines it is compiled for AVX-512.
pub fn argmax(xs: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { argmax_avx512(xs) };
        }
    }
    argmax_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn argmax_avx512(xs: &[f32]) -> u32 {
    argmax_lanes(xs)
}

const ARGMAX_LANES: usize = 16;

#[inline(always)]
fn argmax_lanes(xs: &[f32]) -> u32 {
    let mut max = [f32::NEG_INFINITY; ARGMAX_LANES];
    let mut arg = [0u32; ARGMAX_LANES];
    let chunks = xs.chunks_exact(ARGMAX_LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * ARGMAX_LANES) as u32;
        for l in 0..ARGMAX_LANES {
            let gt = chunk[l] > max[l];
            max[l] = if gt { chunk[l] } else { max[l] };
            arg[l] = if gt { base + l as u32 } else { arg[l] };
        }
    }
    // Each lane holds its first maximum; across lanes the smallest index wins a tie.
    let mut best: Option<(f32, u32)> = None;
    for l in 0..ARGMAX_LANES {
        if max[l] == f32::NEG_INFINITY {
            continue;
        }
        best = match best {
            Some((m, i)) if m > max[l] || (m == max[l] && i < arg[l]) => Some((m, i)),
            _ => Some((max[l], arg[l])),
        };
    }
    let offset = (xs.len() - tail.len()) as u32;
    for (i, &x) in tail.iter().enumerate() {
        if x > best.map_or(f32::NEG_INFINITY, |b| b.0) {
            best = Some((x, offset + i as u32));
        }
    }
    best.map_or(0, |b| b.1)
}

/// Log-softmax of a row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    log_softmax_into(logits, &mut out);
    out
}

/// Log-softmax of a row into `out` (its allocation reused).
fn log_softmax_into(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    out.clear();
    out.extend(logits.iter().map(|&l| l - lse));
}

/// The logprob of `token` and the `top_n` best alternatives from a log-softmax row (best
/// first; of equal values the lower id first). One pass over the row, keeping the best
/// `top_n` seen so far (OpenAI allows at most 20), with nothing vocabulary-sized allocated.
pub fn token_logprob(logprobs: &[f32], token: u32, top_n: u32) -> TokenLogprob {
    let n = (top_n as usize).min(logprobs.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &v) in logprobs.iter().enumerate() {
            if v.is_nan() || (top.len() == n && v <= top[n - 1].1) {
                continue;
            }
            // After the last entry not below `v`: equal values keep the lower id first.
            let at = top.partition_point(|e| e.1 >= v);
            top.insert(at, (i as u32, v));
            top.truncate(n);
        }
    }
    TokenLogprob {
        token_id: token,
        logprob: logprobs
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY),
        top,
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
}
