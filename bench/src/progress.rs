//! The live progress bar: completed requests, with running TTFT and ITL percentiles from HDR
//! histograms and the output token rate so far.
//!
//! These live figures are approximate (3 significant digits) and only for watching; the final
//! report is computed exactly from the recorded outputs.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::metrics::RequestOutput;

/// Latency histograms in microseconds, 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()
}

/// Running figures and the bar that shows them.
pub struct Progress {
    bar: Option<ProgressBar>,
    ttft_us: Option<Histogram<u64>>,
    itl_us: Option<Histogram<u64>>,
    tokens: u64,
    failed: u64,
    start: Instant,
    last_message: Instant,
}

impl Progress {
    /// A bar for `total` requests on stderr, or none when `disabled` (--disable-tqdm).
    pub fn new(total: u64, disabled: bool) -> Self {
        let bar = (!disabled).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "Benchmarking {percent:>3}%|{bar:30}| {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            ttft_us: histogram(),
            itl_us: histogram(),
            tokens: 0,
            failed: 0,
            start: now,
            last_message: now,
        }
    }

    /// Adds one finished request.
    pub fn record(&mut self, out: &RequestOutput) {
        let us = |s: f64| (s * 1e6).max(1.0) as u64;
        if out.success {
            if let Some(h) = &mut self.ttft_us
                && out.ttft > 0.0
            {
                h.saturating_record(us(out.ttft));
            }
            if let Some(h) = &mut self.itl_us {
                for &gap in &out.itl {
                    h.saturating_record(us(gap));
                }
            }
            self.tokens += out.output_tokens.max(out.itl.len() as u64 + 1);
        } else {
            self.failed += 1;
        }
        let Some(bar) = &self.bar else { return };
        bar.inc(1);
        // Formatting the message costs more than the bar; refresh it a few times a second.
        if self.last_message.elapsed() >= Duration::from_millis(200) {
            self.last_message = Instant::now();
            bar.set_message(self.summary());
        }
    }

    /// "TTFT p50/p99 .. ms | ITL p50/p99 .. ms | .. tok/s | N failed".
    pub fn summary(&self) -> String {
        let ms = |h: &Option<Histogram<u64>>, q: f64| {
            h.as_ref()
                .filter(|h| !h.is_empty())
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        let rate = self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        format!(
            "TTFT p50/p99 {:.1}/{:.1} ms | ITL p50/p99 {:.2}/{:.2} ms | {:.0} tok/s | {} failed",
            ms(&self.ttft_us, 0.5),
            ms(&self.ttft_us, 0.99),
            ms(&self.itl_us, 0.5),
            ms(&self.itl_us, 0.99),
            rate,
            self.failed
        )
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_shows_live_percentiles_within_histogram_precision() {
        let mut p = Progress::new(100, true);
        for i in 1..=100u32 {
            p.record(&RequestOutput {
                success: true,
                ttft: f64::from(i) / 1000.0,
                itl: vec![0.002; 4],
                output_tokens: 5,
                ..Default::default()
            });
        }
        p.record(&RequestOutput::default());
        let s = p.summary();
        // TTFTs 1..100 ms: p50 50 ms, p99 99 ms (3 significant digits); ITL 2 ms throughout.
        assert!(
            s.starts_with("TTFT p50/p99 50.0/99.0 ms | ITL p50/p99 2.00/2.00 ms"),
            "{s}"
        );
        assert!(s.ends_with("| 1 failed"), "{s}");
    }
}
