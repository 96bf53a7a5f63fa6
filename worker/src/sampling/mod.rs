//! Token sampling: logit bias, penalties, grammar masks, greedy, temperature, top-k, top-p,
//! min-p, seeded RNG, logprobs.
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

mod guide;
mod verify;
pub use guide::Guide;
pub use verify::Verdict;

/// Per-request sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    penalties: Penalties,
    scratch: Scratch,
    /// The request's grammar (structured outputs), when it has one.
    guide: Option<Guide>,
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

/// 32-bit words of the ChaCha stream that one sampled token takes: a token that is not
/// greedy costs exactly one draw (`sample_random` draws a uniform f32 first thing, even when
/// the row then turns out to leave no choice), and rand builds an f32 from one word. Greedy
/// tokens draw nothing, and a request is greedy for all its tokens or none.
const WORDS_PER_TOKEN: u128 = 1;

impl Sampler {
    /// A sampler seeded from `params.seed`, or from entropy when absent.
    pub fn new(params: SamplingParams) -> Self {
        Self::resumed(params, 0)
    }

    /// A sampler for a request that already sampled `drawn` tokens elsewhere (request
    /// migration: another worker generated them, then failed). A seeded one continues its
    /// random stream after those tokens' draws, so the tokens it samples next are the ones an
    /// undisturbed run would have sampled. Penalties need nothing here: they count the
    /// generated tokens `sample` is given.
    pub fn resumed(params: SamplingParams, drawn: usize) -> Self {
        let mut rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::seed_from_u64(rand::random()),
        };
        if drawn > 0 {
            rng.set_word_pos(drawn as u128 * WORDS_PER_TOKEN);
        }
        Self {
            params,
            rng,
            penalties: Penalties::default(),
            scratch: Scratch::default(),
            guide: None,
        }
    }

    /// The sampler with the request's grammar: every token it samples is one the grammar
    /// allows (in every sampling mode), and `advance_guide` follows what was accepted.
    pub fn with_guide(mut self, guide: Option<Guide>) -> Self {
        self.guide = guide;
        self
    }

    /// Moves the grammar past the accepted `token`: Ok(true) when the output is now a
    /// complete document (the sequence stops), Ok(false) when it may go on or there is no
    /// grammar, Err when the grammar failed (the request ends with that error).
    pub fn advance_guide(&mut self, token: u32) -> Result<bool, String> {
        match &mut self.guide {
            Some(g) => g.advance(token),
            None => Ok(false),
        }
    }

    /// Whether the next token is the plain argmax of the raw logits (greedy, no logit bias,
    /// no penalties, no logprobs, no grammar), so a backend may pick it itself
    /// (`Backend::forward_greedy`); tokens the caller bans are its own to check.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        let penalized = (p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0)
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0;
        (p.temperature <= 0.0 || p.top_k == 1)
            && p.logprobs.is_none()
            && p.logit_bias.is_empty()
            && !penalized
            && self.guide.is_none()
    }

    /// Whether sampling needs top-n logprobs for each token.
    pub fn logprobs(&self) -> Option<u32> {
        self.params.logprobs
    }

    /// Picks the next token from `logits` (modified in place).
    ///
    /// `prompt` and `generated` feed the penalties; `banned` tokens, and those the grammar
    /// does not allow, get probability zero.
    /// Logprobs are those of the raw row, before the logit bias and the penalties (vLLM's
    /// default `logprobs_mode`, `raw_logprobs`).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        banned: Banned<'_>,
    ) -> (u32, Option<TokenLogprob>) {
        self.process(logits, prompt, generated, banned);
        let token = if self.is_greedy() {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        (token, self.raw_logprob(token))
    }

    /// Whether tokens are the argmax of the processed row (no random draw).
    fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    /// The logprob of `token` in the raw row `process` saw, when logprobs are asked for.
    fn raw_logprob(&self, token: u32) -> Option<TokenLogprob> {
        self.params
            .logprobs
            .map(|top_n| token_logprob(&self.scratch.logprobs, token, top_n))
    }

    /// Turns a raw row into the one tokens are drawn from: keeps the raw log-softmax when
    /// logprobs are asked for, then adds the logit bias, applies the penalties and the
    /// grammar mask, and bans `banned`.
    fn process(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        banned: Banned<'_>,
    ) {
        if self.params.logprobs.is_some() {
            log_softmax_into(logits, &mut self.scratch.logprobs);
        }
        // The bias first, then the penalties, in vLLM's order.
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        self.apply_penalties(logits, prompt, generated);
        // A failed mask leaves the row as it is: `advance_guide` then fails the request.
        if let Some(g) = &mut self.guide
            && let Err(e) = g.apply(logits)
        {
            tracing::warn!(error = %e, "grammar mask failed");
        }
        for &t in banned.0 {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
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
        // Drawn before anything can return early: one draw per token (`WORDS_PER_TOKEN`).
        let uniform = self.rng.random::<f32>();
        match self.filtered_weights(logits) {
            Some(kept) => self.weight_token(pick(&self.scratch.weights, uniform * kept)),
            None => argmax(logits),
        }
    }

    /// Fills `scratch.weights` with the unnormalised probabilities of the tempered
    /// distribution restricted by top_k, top_p and min_p (over `scratch.candidates` when
    /// top_k selects them, else over every id) and returns their sum. None: nothing finite,
    /// or a temperature so low that a logit overflowed: all the mass sits on the argmax.
    fn filtered_weights(&mut self, logits: &[f32]) -> Option<f32> {
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
        cand.clear();
        // With top_k, the candidates are the k best ids (in `cand`); otherwise every id.
        if p.top_k > 0 && (p.top_k as usize) < logits.len() {
            let k = p.top_k as usize;
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
            return None;
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
        Some(kept)
    }

    /// The token id of index `i` of `scratch.weights`.
    fn weight_token(&self, i: usize) -> u32 {
        self.scratch.candidates.get(i).map_or(i as u32, |c| c.0)
    }

    /// The index in `scratch.weights` of `token`, if it is a candidate.
    fn weight_index(&self, token: u32) -> Option<usize> {
        let cand = &self.scratch.candidates;
        if cand.is_empty() {
            return ((token as usize) < self.scratch.weights.len()).then_some(token as usize);
        }
        cand.iter().position(|c| c.0 == token)
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
mod tests;
