//! Draft proposers for speculative decoding, and the per-sequence draft length.
//!
//! A proposer guesses the next tokens of a sequence cheaply; the engine verifies the guesses
//! in one forward pass (`engine::runner::speculative`) and keeps the longest prefix the
//! model agrees with. Here: `NGram`, drafts copied from earlier text (prompt lookup), and the
//! draft length shared by every proposer; the DraftTarget proposer runs a model, so it lives
//! with the engine (`engine::runner::draft_model`). Not for: verification
//! (`sampling::verify`) or KV bookkeeping (the scheduler's).

mod adaptive;
mod ngram;

pub use adaptive::DraftLength;
pub use ngram::{NgramProposer, NgramSettings};

/// A sequence's speculation state and figures.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    /// How many drafts it may propose now; None: it never speculates (a grammar-guided
    /// request: its tokens must go through the grammar one by one).
    pub length: Option<DraftLength>,
    /// Steps in which it emitted tokens.
    pub steps: u32,
    /// Tokens it emitted over those steps.
    pub emitted: u32,
}

impl SeqSpec {
    /// State for a sequence that may speculate up to `max_draft_len` tokens a step (0: never).
    pub fn new(max_draft_len: usize) -> Self {
        Self {
            length: (max_draft_len > 0).then(|| DraftLength::new(max_draft_len)),
            steps: 0,
            emitted: 0,
        }
    }

    /// Records a step that emitted `n` tokens.
    pub fn record_step(&mut self, n: usize) {
        self.steps += 1;
        self.emitted += n as u32;
    }

    /// Tokens emitted per step (TensorRT-LLM's `avg_decoded_tokens_per_iter`); None before
    /// the first.
    pub fn avg_decoded_tokens_per_iter(&self) -> Option<f64> {
        (self.steps > 0).then(|| f64::from(self.emitted) / f64::from(self.steps))
    }
}
