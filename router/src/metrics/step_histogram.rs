//! A worker's step histogram as the router re-exposes it: buckets counted by the worker
//! (`LoadResponse.step_*`), encoded as an OpenMetrics histogram with the worker's label.

use std::sync::OnceLock;

use llmapi_proto::v1::StepHistogram;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A histogram whose buckets are set once, from the worker's last Load, at scrape time.
#[derive(Debug, Default)]
pub struct WorkerHistogram {
    snapshot: OnceLock<Snapshot>,
}

#[derive(Debug)]
struct Snapshot {
    sum: f64,
    count: u64,
    /// (upper bound, steps in the bucket), not cumulative; the last bound is `f64::MAX`
    /// (+Inf), as the encoder expects.
    buckets: Vec<(f64, u64)>,
}

impl WorkerHistogram {
    /// Takes the worker's histogram. A malformed one (counts not one more than the bounds, a
    /// worker of another version) is left out of the scrape rather than shown wrong.
    pub fn set(&self, h: &StepHistogram) {
        if h.counts.len() != h.upper_bounds.len() + 1 {
            return;
        }
        let buckets = h
            .upper_bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(h.counts.iter().copied())
            .collect();
        let _ = self.snapshot.set(Snapshot {
            sum: h.sum,
            count: h.counts.iter().sum(),
            buckets,
        });
    }
}

impl TypedMetric for WorkerHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WorkerHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.snapshot.get() {
            Some(s) => encoder.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}
