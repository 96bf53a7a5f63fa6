//! The compute backend door: one forward step over a batch of sequence chunks.
//!
//! The scheduler and block manager speak only in token ids, positions and block ids; a backend
//! owns the weights and the KV memory on its device and turns a step into logits. The CPU
//! backend lives in `cpu`; a CUDA backend implements the same trait.

pub mod cpu;
pub mod cuda;

use crate::kv::BlockId;

/// Which logits a sequence needs from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that does not reach the end of the known tokens).
    None,
    /// Only the last position's row.
    Last,
    /// A row for every position of the chunk (prompt logprobs).
    All,
}

/// One sequence's share of a step: compute KV for `tokens` at positions `start_pos..`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The tokens whose KV is computed this step.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; KV for positions before it is already in the cache.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`, in order.
    pub block_table: &'a [BlockId],
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Host memory a backend holds besides its KV pool (`Backend::host_footprint`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFootprint {
    /// Bytes of weights, resident.
    pub weights: u64,
    /// Bytes of step workspaces (activations, logits), allocated as steps run.
    pub workspace: u64,
}

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A CUDA driver or cuBLAS call failed; the device context may be unusable.
    #[error("CUDA error: {0}")]
    Device(String),
    /// The KV pool could not be allocated.
    #[error("cannot allocate {bytes} bytes of KV cache: {reason}")]
    KvAlloc {
        /// Requested bytes.
        bytes: usize,
        /// Cause.
        reason: String,
    },
    /// A step referenced data it must not (a scheduler bug); the step is refused.
    #[error("invalid step: {0}")]
    InvalidStep(String),
    /// A collective with the other ranks of the group failed: the group cannot go on.
    #[error("tensor-parallel group failed: {0}")]
    Collective(#[from] crate::dist::CommError),
    /// A setting this backend cannot honour; the message says what to use instead.
    #[error("{0}")]
    Unsupported(String),
}

impl BackendError {
    /// Whether the backend can take no further steps (its group is broken).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Collective(_) | Self::Device(_))
    }
}

/// A compute device that runs the model.
pub trait Backend: Send {
    /// Short name reported in `info()`, e.g. "cpu".
    fn name(&self) -> &'static str;
    /// Rows of the logits.
    fn vocab_size(&self) -> usize;
    /// Whether `forward` applies each layer's sliding window
    /// (`ModelConfig::attention_window`) and never reads the blocks before it. A backend that
    /// does not is given only models whose window covers max_seq_len (checked at start).
    fn windowed_attention(&self) -> bool {
        false
    }
    /// Bytes of KV memory one token takes across all layers.
    fn kv_bytes_per_token(&self) -> usize;
    /// Bytes of device memory the KV pool may draw from (free after weights and workspace),
    /// of which the engine takes `kv_cache_config.free_gpu_memory_fraction`; None: the pool
    /// lives in host memory and is sized from it.
    fn kv_memory_available(&self) -> Option<usize> {
        None
    }
    /// Host memory this backend holds besides its KV pool, for the budget: its resident
    /// weights and the workspaces of a step of `max_num_tokens` tokens over `max_batch_size`
    /// sequences. Zero for a backend that keeps them on a device (and reports the device's
    /// free memory in `kv_memory_available` instead).
    fn host_footprint(&self, max_num_tokens: usize, max_batch_size: usize) -> HostFootprint {
        let _ = (max_num_tokens, max_batch_size);
        HostFootprint::default()
    }
    /// Allocates the KV pool and backs it with memory (every page touched), so that a pool
    /// the machine cannot hold fails here; must be called once before `forward`.
    fn init_kv(&mut self, num_blocks: usize, tokens_per_block: usize) -> Result<(), BackendError>;
    /// Runs one step; returns per chunk its logits rows (0, 1 or `tokens.len()` rows of
    /// `vocab_size`, flattened) as asked by `LogitsWanted`.
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError>;
    /// Runs one step for greedy decoding: per chunk, the argmax (the lowest index among equal
    /// largest values) of its last logits row when it wants logits, else None. Backends that
    /// can pick it on the device (CUDA) skip copying whole logits rows back; this default
    /// takes it from `forward`'s rows.
    fn forward_greedy(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Option<u32>>, BackendError> {
        let vocab = self.vocab_size();
        Ok(self
            .forward(batch)?
            .iter()
            .map(|rows| {
                (rows.len() >= vocab && vocab > 0)
                    .then(|| crate::sampling::argmax(&rows[rows.len() - vocab..]))
            })
            .collect())
    }
    /// How often an idle engine must call `heartbeat` (a group leader keeping its followers
    /// and itself sure the group is alive); None: never.
    fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// Proves the group is alive while no step runs; an error is fatal when `is_fatal`.
    fn heartbeat(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test double: returns fixed logits rows, whatever the batch.
    struct FixedRows(Vec<Vec<f32>>);

    impl Backend for FixedRows {
        fn name(&self) -> &'static str {
            "fixed-rows"
        }
        fn vocab_size(&self) -> usize {
            3
        }
        fn kv_bytes_per_token(&self) -> usize {
            0
        }
        fn init_kv(&mut self, _: usize, _: usize) -> Result<(), BackendError> {
            Ok(())
        }
        fn forward(&mut self, _: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn default_greedy_takes_the_argmax_of_each_chunks_last_row() {
        let mut be = FixedRows(vec![
            vec![0.0, 5.0, 1.0],
            Vec::new(),
            // Two rows (LogitsWanted::All): the last one counts; ties go to the lower index.
            vec![9.0, 0.0, 0.0, 2.0, 7.0, 7.0],
        ]);
        assert_eq!(
            be.forward_greedy(&[]).unwrap(),
            vec![Some(1), None, Some(1)]
        );
    }
}
