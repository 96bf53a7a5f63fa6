//! Per-request outcomes and the benchmark metrics computed from them.
//!
//! Definitions follow benchmark_serving.py's `calculate_metrics` exactly: TTFT is the time to the
//! first chunk that carries choices; TPOT per request is `(e2el - ttft) / (output_len - 1)` for
//! requests with more than one output token; ITLs of all requests are pooled; output length comes
//! from `usage.completion_tokens`, else from re-tokenizing the generated text; goodput counts the
//! requests that meet every given SLO (a request with one output token has TPOT 0 there).

use std::collections::BTreeMap;

use crate::stats::{self, Summary};

/// What one request produced, as `RequestFuncOutput` in the original. Times are in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    /// Concatenated text of every chunk.
    pub generated_text: String,
    /// The request completed with a 200 status and (for completions) at least one token chunk.
    pub success: bool,
    /// From sending the request to the last chunk (E2EL).
    pub latency: f64,
    /// `usage.completion_tokens` from the server; 0 when it sent none.
    pub output_tokens: u64,
    /// Time to the first chunk with choices; -1 in non-streaming mode.
    pub ttft: f64,
    /// Gaps between consecutive token chunks.
    pub itl: Vec<f64>,
    /// Prompt length in tokens, as sampled.
    pub prompt_len: u64,
    /// Human-readable error; empty on success.
    pub error: String,
    /// Error class, counted in the "Error type" lines; `None` when the request succeeded.
    pub exception_type: Option<String>,
    /// `avg_decoded_tokens_per_iter` when the server reports it (speculative decoding), else 0.
    pub avg_decoded_tokens_per_iter: f64,
    /// The finish_reason the server gave the (first) choice, if any.
    pub finish_reason: Option<String>,
}

/// Service-level objectives for goodput, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Goodput {
    /// Largest acceptable TTFT.
    pub ttft_ms: Option<f64>,
    /// Largest acceptable TPOT.
    pub tpot_ms: Option<f64>,
    /// Largest acceptable end-to-end latency.
    pub e2el_ms: Option<f64>,
}

impl Goodput {
    /// True when no SLO is given (the original then prints no goodput line).
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }
}

/// The aggregate figures of one run (`BenchmarkMetrics` in the original; latencies in ms).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkMetrics {
    /// Successful requests.
    pub completed: u64,
    /// Prompt tokens over successful requests.
    pub total_input: u64,
    /// Output tokens over successful requests.
    pub total_output: u64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Requests meeting every SLO per second.
    pub request_goodput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    /// Mean over requests of output_len / e2el (tokens per second one user sees).
    pub tput_user: f64,
    /// Time to first token.
    pub ttft: Summary,
    /// Time per output token after the first.
    pub tpot: Summary,
    /// Inter-token latency, pooled over requests.
    pub itl: Summary,
    /// End-to-end latency.
    pub e2el: Summary,
    /// Tokens decoded per iteration, with min and max (unitless), when the server reports it.
    pub avg_decoded_tokens_per_iter: Summary,
    /// Smallest `avg_decoded_tokens_per_iter`.
    pub min_avg_decoded_tokens_per_iter: f64,
    /// Largest `avg_decoded_tokens_per_iter`.
    pub max_avg_decoded_tokens_per_iter: f64,
    /// Failed requests by error class, for the "Error type" lines.
    pub error_counts: BTreeMap<String, u64>,
}

/// Counts output tokens of a text when the server sent no usage.
pub trait OutputTokenCounter {
    /// Number of tokens of `text` without special tokens.
    fn count_tokens(&self, text: &str) -> u64;
}

/// Computes the metrics of a run of `dur_s` seconds; also returns the per-request output lengths
/// (0 for failed requests), which the detailed JSON saves.
pub fn calculate_metrics(
    outputs: &[RequestOutput],
    dur_s: f64,
    counter: &dyn OutputTokenCounter,
    percentiles: &[f64],
    goodput: &Goodput,
) -> (BenchmarkMetrics, Vec<u64>) {
    let mut actual_output_lens = Vec::with_capacity(outputs.len());
    let (mut total_input, mut completed, mut good_completed) = (0u64, 0u64, 0u64);
    let mut itls = Vec::new();
    let (mut tpots, mut ttfts, mut e2els, mut tput_user) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut decoded_per_iter = Vec::new();
    let mut error_counts = BTreeMap::new();
    for out in outputs {
        if let Some(kind) = &out.exception_type {
            *error_counts.entry(kind.clone()).or_insert(0) += 1;
        }
        if !out.success {
            actual_output_lens.push(0);
            continue;
        }
        let output_len = if out.output_tokens > 0 {
            out.output_tokens
        } else {
            counter.count_tokens(&out.generated_text)
        };
        actual_output_lens.push(output_len);
        total_input += out.prompt_len;
        // A request with a single output token has no TPOT; goodput then treats it as 0.
        let tpot = if output_len > 1 {
            let t = (out.latency - out.ttft) / (output_len - 1) as f64;
            tpots.push(t);
            t
        } else {
            0.0
        };
        itls.extend_from_slice(&out.itl);
        ttfts.push(out.ttft);
        e2els.push(out.latency);
        tput_user.push(output_len as f64 / out.latency);
        completed += 1;
        if out.avg_decoded_tokens_per_iter > 0.0 {
            decoded_per_iter.push(out.avg_decoded_tokens_per_iter);
        }
        let meets = |slo: Option<f64>, value_s: f64| slo.is_none_or(|ms| ms / 1000.0 >= value_s);
        if !goodput.is_empty()
            && meets(goodput.ttft_ms, out.ttft)
            && meets(goodput.tpot_ms, tpot)
            && meets(goodput.e2el_ms, out.latency)
        {
            good_completed += 1;
        }
    }
    let total_output: u64 = actual_output_lens.iter().sum();
    let min_max =
        |f: fn(f64, f64) -> f64| decoded_per_iter.iter().copied().reduce(f).unwrap_or(0.0);
    let metrics = BenchmarkMetrics {
        completed,
        total_input,
        total_output,
        request_throughput: completed as f64 / dur_s,
        request_goodput: good_completed as f64 / dur_s,
        output_throughput: total_output as f64 / dur_s,
        total_token_throughput: (total_input + total_output) as f64 / dur_s,
        tput_user: stats::mean(&tput_user),
        ttft: Summary::of(&ttfts, 1000.0, percentiles),
        tpot: Summary::of(&tpots, 1000.0, percentiles),
        itl: Summary::of(&itls, 1000.0, percentiles),
        e2el: Summary::of(&e2els, 1000.0, percentiles),
        avg_decoded_tokens_per_iter: Summary::of(&decoded_per_iter, 1.0, percentiles),
        min_avg_decoded_tokens_per_iter: min_max(f64::min),
        max_avg_decoded_tokens_per_iter: min_max(f64::max),
        error_counts,
    };
    (metrics, actual_output_lens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts whitespace-separated words: enough to check the re-tokenizing fallback.
    struct WordCounter;
    impl OutputTokenCounter for WordCounter {
        fn count_tokens(&self, text: &str) -> u64 {
            text.split_whitespace().count() as u64
        }
    }

    fn ok(ttft: f64, itl: &[f64], tokens: u64, prompt_len: u64) -> RequestOutput {
        RequestOutput {
            success: true,
            ttft,
            latency: ttft + itl.iter().sum::<f64>(),
            itl: itl.to_vec(),
            output_tokens: tokens,
            prompt_len,
            ..Default::default()
        }
    }

    #[test]
    fn synthetic_timeline_gives_hand_computed_metrics() {
        // A: ttft 100 ms, 4 tokens 10 ms apart -> e2el 130 ms, tpot 10 ms.
        // B: ttft 200 ms, 3 tokens 20/40 ms apart -> e2el 260 ms, tpot 30 ms.
        let outs = vec![
            ok(0.100, &[0.010, 0.010, 0.010], 4, 10),
            ok(0.200, &[0.020, 0.040], 3, 20),
        ];
        let (m, lens) = calculate_metrics(&outs, 2.0, &WordCounter, &[99.0], &Goodput::default());
        assert_eq!(lens, vec![4, 3]);
        assert_eq!((m.completed, m.total_input, m.total_output), (2, 30, 7));
        assert!((m.request_throughput - 1.0).abs() < 1e-12);
        assert!((m.output_throughput - 3.5).abs() < 1e-12);
        assert!((m.total_token_throughput - 18.5).abs() < 1e-12);
        assert!((m.ttft.mean - 150.0).abs() < 1e-9);
        assert!((m.ttft.std - 50.0).abs() < 1e-9);
        assert!((m.ttft.percentiles[0].1 - 199.0).abs() < 1e-9);
        assert!((m.tpot.mean - 20.0).abs() < 1e-9);
        // ITLs pooled: [10, 10, 10, 20, 40] ms -> mean 18, median 10.
        assert!((m.itl.mean - 18.0).abs() < 1e-9);
        assert!((m.itl.median - 10.0).abs() < 1e-9);
        assert!((m.e2el.mean - 195.0).abs() < 1e-9);
        // User throughput: mean(4 / 0.13, 3 / 0.26).
        assert!((m.tput_user - (4.0 / 0.13 + 3.0 / 0.26) / 2.0).abs() < 1e-9);
    }

    #[test]
    fn failed_requests_count_by_type_and_add_no_tokens() {
        let failed = RequestOutput {
            exception_type: Some("ClientPayloadError".into()),
            output_tokens: 99,
            ..Default::default()
        };
        let outs = vec![ok(0.1, &[0.1], 2, 5), failed.clone(), failed];
        let (m, lens) = calculate_metrics(&outs, 1.0, &WordCounter, &[99.0], &Goodput::default());
        assert_eq!(lens, vec![2, 0, 0]);
        assert_eq!(m.completed, 1);
        assert_eq!(m.total_output, 2);
        assert_eq!(m.error_counts.get("ClientPayloadError"), Some(&2));
    }

    #[test]
    fn missing_usage_falls_back_to_counting_the_text() {
        let mut out = ok(0.1, &[0.1, 0.1], 0, 5);
        out.generated_text = "one two three".into();
        let (m, _) = calculate_metrics(&[out], 1.0, &WordCounter, &[], &Goodput::default());
        assert_eq!(m.total_output, 3);
        assert!((m.tpot.mean - 100.0).abs() < 1e-9);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let outs = vec![
            ok(0.050, &[0.010], 2, 1), // ttft 50 ms, tpot 10 ms: good
            ok(0.300, &[0.010], 2, 1), // ttft too slow
            ok(0.050, &[0.090], 2, 1), // tpot too slow
            ok(0.050, &[], 1, 1),      // one token: tpot counts as 0, good
        ];
        let slo = Goodput {
            ttft_ms: Some(100.0),
            tpot_ms: Some(20.0),
            e2el_ms: None,
        };
        let (m, _) = calculate_metrics(&outs, 2.0, &WordCounter, &[], &slo);
        assert!((m.request_goodput - 1.0).abs() < 1e-12);
    }

    #[test]
    fn single_token_requests_have_no_tpot() {
        let (m, _) = calculate_metrics(
            &[ok(0.2, &[], 1, 1)],
            1.0,
            &WordCounter,
            &[],
            &Goodput::default(),
        );
        assert_eq!(m.tpot.mean, 0.0);
        assert!((m.ttft.mean - 200.0).abs() < 1e-9);
    }
}
