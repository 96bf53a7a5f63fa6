//! Distributions of the engine's steps since it started: how long each took, how many
//! sequences it ran and how many tokens it computed. The worker's Load reports them and the
//! router's /metrics shows them as per-worker histograms, the iteration statistics that
//! vLLM's (`vllm:iteration_tokens_total`) and trtllm-serve's users chart.

/// Buckets of every step histogram: the bounds below, then one for what lies above them all.
pub const STEP_BUCKETS: usize = 13;

/// Upper bounds of the step-time buckets, in microseconds (1 ms to 10 s).
pub const STEP_TIME_BOUNDS_US: [u64; STEP_BUCKETS - 1] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// Upper bounds of the batch-size buckets, in sequences per step.
pub const STEP_BATCH_BOUNDS: [u64; STEP_BUCKETS - 1] =
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048];

/// Upper bounds of the tokens-per-step buckets (prefill and decode tokens computed).
pub const STEP_TOKEN_BOUNDS: [u64; STEP_BUCKETS - 1] =
    [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];

/// Counts of one per-step quantity by bucket, with their sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepHistogram {
    /// Steps whose value was at most the bucket's bound and above the one before (not
    /// cumulative); the last bucket holds those above every bound.
    pub counts: [u64; STEP_BUCKETS],
    /// Sum of the values observed (in the bounds' unit).
    pub sum: u64,
}

impl StepHistogram {
    /// Counts `value` in the first bucket whose bound is not below it.
    pub fn observe(&mut self, bounds: &[u64; STEP_BUCKETS - 1], value: u64) {
        let i = bounds.partition_point(|&b| b < value);
        self.counts[i] += 1;
        self.sum = self.sum.saturating_add(value);
    }

    /// Steps observed.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The three step histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepStats {
    /// Wall time of each step, scheduling and forward pass, in microseconds.
    pub time_us: StepHistogram,
    /// Sequences in each step.
    pub batch_size: StepHistogram,
    /// Tokens each step computed.
    pub tokens: StepHistogram,
}

impl StepStats {
    /// Counts one step.
    pub fn observe(&mut self, time_us: u64, batch_size: u64, tokens: u64) {
        self.time_us.observe(&STEP_TIME_BOUNDS_US, time_us);
        self.batch_size.observe(&STEP_BATCH_BOUNDS, batch_size);
        self.tokens.observe(&STEP_TOKEN_BOUNDS, tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_whose_bound_holds_them() {
        let mut s = StepStats::default();
        s.observe(900, 1, 1);
        s.observe(1_000, 2, 9);
        s.observe(1_001, 3, 8192);
        s.observe(20_000_000, 5000, 10_000);
        assert_eq!(s.time_us.counts[0], 2, "900 and 1000 us are within 1 ms");
        assert_eq!(s.time_us.counts[1], 1);
        assert_eq!(
            s.time_us.counts[STEP_BUCKETS - 1],
            1,
            "past 10 s: the last bucket"
        );
        assert_eq!(s.batch_size.counts[..3], [1, 1, 1]);
        assert_eq!(s.batch_size.counts[STEP_BUCKETS - 1], 1);
        assert_eq!(s.tokens.counts[0], 1);
        assert_eq!(s.tokens.counts[2], 1, "9 tokens: the 16 bucket");
        assert_eq!(s.tokens.counts[STEP_BUCKETS - 2], 1, "8192: its own bound");
        assert_eq!(s.tokens.sum, 1 + 9 + 8192 + 10_000);
        assert_eq!(s.time_us.count(), 4);
    }
}
