//! Which decode steps the CUDA backend replays as CUDA graphs (`cuda_graph_config`).
//!
//! A graph is captured per batch size: a decode step of `n` sequences (one token each) runs
//! the graph of size `n`, or with `enable_padding` the smallest captured size above `n`,
//! with the extra rows padded (their KV writes skipped). Steps of other shapes (prefill,
//! batches above the largest size, or without padding a size not captured) run eagerly.
//! Capturing and replaying is `backend.rs`'s; this is the host-side choice.

use llmapi_common::args::{CudaGraphConfig, cuda_graph_batch_sizes};

/// Largest captured batch size when neither `max_batch_size` nor `batch_sizes` says one
/// (TensorRT-LLM's default).
const DEFAULT_MAX: u32 = 128;

/// The batch sizes graphs are captured for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSizes {
    /// Ascending, no duplicates, none zero.
    sizes: Vec<usize>,
    padding: bool,
}

impl GraphSizes {
    /// The sizes `cfg` asks for (None: `cuda_graph_config` is null, no graphs), capped at
    /// the engine's `max_batch_size` (a larger graph could never run).
    pub fn from_config(cfg: Option<&CudaGraphConfig>, max_batch_size: usize) -> Option<Self> {
        let cfg = cfg?;
        let mut sizes: Vec<usize> = match &cfg.batch_sizes {
            Some(list) => list.iter().map(|&s| s as usize).collect(),
            None => {
                let max = if cfg.max_batch_size > 0 {
                    cfg.max_batch_size
                } else {
                    DEFAULT_MAX
                };
                cuda_graph_batch_sizes(max, cfg.enable_padding)
                    .into_iter()
                    .map(|s| s as usize)
                    .collect()
            }
        };
        sizes.retain(|&s| s > 0 && s <= max_batch_size);
        sizes.sort_unstable();
        sizes.dedup();
        (!sizes.is_empty()).then_some(Self {
            sizes,
            padding: cfg.enable_padding,
        })
    }

    /// The captured size a decode step of `batch` sequences runs as, if any.
    pub fn padded(&self, batch: usize) -> Option<usize> {
        if batch == 0 {
            return None;
        }
        let i = self.sizes.partition_point(|&s| s < batch);
        let s = *self.sizes.get(i)?;
        (s == batch || self.padding).then_some(s)
    }

    /// The captured sizes, ascending.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The largest captured size.
    pub fn max(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// Whether smaller batches are padded up to a captured size.
    pub fn padding(&self) -> bool {
        self.padding
    }
}

/// Whether a graph's replay of a step agrees with the same step run eagerly: the largest
/// difference of the residual stream within 1e-3 of its largest magnitude (at least 1). The
/// same kernels on the same inputs should agree exactly; the bound leaves room for a GEMM
/// algorithm chosen differently under capture.
pub fn replay_agrees(eager: &[f32], replay: &[f32]) -> bool {
    if eager.len() != replay.len() {
        return false;
    }
    let scale = eager.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    eager
        .iter()
        .zip(replay)
        .all(|(a, b)| (a - b).abs() <= 1e-3 * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(padding: bool, max: u32, sizes: Option<Vec<u32>>) -> CudaGraphConfig {
        CudaGraphConfig {
            enable_padding: padding,
            max_batch_size: max,
            batch_sizes: sizes,
        }
    }

    #[test]
    fn a_null_config_or_no_usable_size_captures_nothing() {
        assert_eq!(GraphSizes::from_config(None, 64), None);
        let big = cfg(false, 0, Some(vec![128, 256]));
        assert_eq!(GraphSizes::from_config(Some(&big), 64), None);
    }

    #[test]
    fn sizes_come_from_the_list_or_the_maximum_and_stop_at_the_engines_batch() {
        let listed = cfg(true, 0, Some(vec![8, 1, 4, 8, 0, 512]));
        let g = GraphSizes::from_config(Some(&listed), 256).unwrap();
        assert_eq!(g.sizes(), &[1, 4, 8]);
        let generated = GraphSizes::from_config(Some(&cfg(true, 32, None)), 256).unwrap();
        assert_eq!(generated.sizes(), &[1, 2, 4, 8, 16, 24, 32]);
        let default = GraphSizes::from_config(Some(&CudaGraphConfig::default()), 2048).unwrap();
        assert_eq!(default.max(), 128);
        let capped = GraphSizes::from_config(Some(&cfg(false, 0, None)), 20).unwrap();
        assert_eq!(capped.max(), 20);
    }

    #[test]
    fn padding_rounds_up_to_the_next_captured_size() {
        let g = GraphSizes::from_config(Some(&cfg(true, 0, Some(vec![1, 2, 4, 8]))), 64).unwrap();
        let got: Vec<_> = (0..=9).map(|b| g.padded(b)).collect();
        assert_eq!(
            got,
            vec![
                None,
                Some(1),
                Some(2),
                Some(4),
                Some(4),
                Some(8),
                Some(8),
                Some(8),
                Some(8),
                None
            ]
        );
    }

    #[test]
    fn without_padding_only_captured_sizes_run_as_graphs() {
        let g = GraphSizes::from_config(Some(&cfg(false, 0, Some(vec![1, 2, 4, 8]))), 64).unwrap();
        assert_eq!(g.padded(4), Some(4));
        assert_eq!(g.padded(3), None);
        assert_eq!(g.padded(9), None);
    }

    #[test]
    fn a_replay_that_differs_from_the_eager_step_is_caught() {
        let eager = [1.0, -40.0, 3.0];
        assert!(replay_agrees(&eager, &[1.0, -40.0, 3.0]));
        assert!(replay_agrees(&eager, &[1.01, -40.0, 3.0]));
        assert!(!replay_agrees(&eager, &[1.1, -40.0, 3.0]));
        assert!(!replay_agrees(&eager, &[1.0, f32::NAN, 3.0]));
        assert!(!replay_agrees(&eager, &[1.0, -40.0]));
    }
}
