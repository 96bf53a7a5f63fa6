//! DraftTarget drafts: a second, smaller checkpoint with the target's vocabulary proposes each
//! drafting sequence's next tokens greedily, on a KV pool of its own.
//!
//! The draft backend's pool has as many blocks, of the same size, as the target's, and a
//! sequence's block table serves both (ids shared, memory separate): no second block manager.
//! `Sequence::draft_computed` counts the positions whose draft KV is valid. Before the
//! target's step, the draft computes the prompt chunks the target computes in it (for the
//! sequences that may draft), and for the sequences the scheduler planned with a draft it
//! catches up on the tokens it has not seen (one chunk, up to and including the last token,
//! whose row gives d1), then runs one single-token step per further draft, batched over the
//! sequences. Its KV then reaches the last draft it was fed; drafts the target rejects are
//! rolled back by lowering `draft_computed` to the target's `num_computed` (their KV is
//! overwritten later, nothing is copied). Greedy proposals put all their mass on one token,
//! so the verification rule for point-mass proposals (`sampling::verify`) stays exact for
//! sampled requests. In a tensor-parallel group the draft runs whole on rank 0 while the
//! followers wait for the step's plan: `keep_alive` runs after each of its passes, so that
//! the leader's heartbeats keep them under their collective timeout however many passes a
//! step drafts. Not for: deciding draft lengths (`crate::spec`, the scheduler).

use std::time::Instant;

use crate::backend::{Backend, BackendError, LogitsWanted, SeqChunk};
use crate::scheduler::Sequence;

/// The draft model and how many tokens one of its passes may take.
pub(super) struct DraftModel {
    backend: Box<dyn Backend>,
    /// Most tokens of one catch-up pass (the engine's `max_num_tokens`).
    max_num_tokens: usize,
    /// Running mean time of one single-token draft pass (over the drafting sequences), in
    /// microseconds; None before the first.
    pub(super) pass_us: Option<f64>,
}

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftModel")
            .field("backend", &self.backend.name())
            .field("max_num_tokens", &self.max_num_tokens)
            .finish()
    }
}

impl DraftModel {
    /// Wraps a draft backend whose KV pool is already initialised like the target's.
    pub(super) fn new(backend: Box<dyn Backend>, max_num_tokens: usize) -> Self {
        Self {
            backend,
            max_num_tokens: max_num_tokens.max(1),
            pass_us: None,
        }
    }

    /// Replaces the placeholder drafts of `seqs[i]` for each `i` in `planned` (already cut to
    /// the step's room by the scheduler, which gave blocks for them) with the draft model's
    /// greedy proposals of the same length. `prefilling` lists the planned sequences that
    /// may draft later and compute `(i, end)`: positions up to `end` this step (a prompt
    /// chunk): the draft computes them too, in the same passes, so that its catch-up on the
    /// prompt weighs on the prefill steps rather than on the first decode step.
    /// `keep_alive` runs after each pass of the draft (an error ends the proposal).
    pub(super) fn propose(
        &mut self,
        seqs: &mut [Sequence],
        planned: &[usize],
        prefilling: &[(usize, usize)],
        keep_alive: &mut dyn FnMut() -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let drafting: Vec<usize> = planned
            .iter()
            .copied()
            .filter(|&i| !seqs[i].draft.is_empty())
            .collect();
        if drafting.is_empty() && prefilling.is_empty() {
            return Ok(());
        }
        for &i in drafting.iter().chain(prefilling.iter().map(|(i, _)| i)) {
            let s = &mut seqs[i];
            s.draft_computed = s.draft_computed.min(s.num_computed);
        }
        // Each drafting sequence computes up to and including its last token, whose row
        // gives its first draft; the prefilling ones up to their chunk's end, no row.
        let goals: Vec<(usize, usize, bool)> = drafting
            .iter()
            .map(|&i| (i, seqs[i].num_computed + 1, true))
            .chain(prefilling.iter().map(|&(i, end)| (i, end, false)))
            .collect();
        let first = self.catch_up(seqs, &goals, keep_alive)?;
        let mut proposals: Vec<Vec<u32>> = first.into_iter().map(|t| vec![t]).collect();
        let longest = drafting.iter().map(|&i| seqs[i].draft.len()).max();
        // Step j feeds d_j at position num_computed + j and reads d_(j+1).
        let passes_start = Instant::now();
        let passes = longest.unwrap_or(0).saturating_sub(1);
        for j in 1..longest.unwrap_or(0) {
            let fed: Vec<usize> = (0..drafting.len())
                .filter(|&k| seqs[drafting[k]].draft.len() > j)
                .collect();
            let out = {
                let chunks: Vec<SeqChunk<'_>> = fed
                    .iter()
                    .map(|&k| {
                        let s = &seqs[drafting[k]];
                        SeqChunk {
                            tokens: &proposals[k][j - 1..j],
                            start_pos: s.num_computed + j,
                            block_table: &s.blocks,
                            logits: LogitsWanted::Last,
                        }
                    })
                    .collect();
                self.backend.forward_greedy(&chunks)?
            };
            keep_alive()?;
            for (&k, token) in fed.iter().zip(out) {
                let token = token.ok_or_else(no_token)?;
                proposals[k].push(token);
                seqs[drafting[k]].draft_computed += 1;
            }
        }
        if passes > 0 {
            let us = passes_start.elapsed().as_secs_f64() * 1e6 / passes as f64;
            self.pass_us = Some(running_mean(self.pass_us, us));
        }
        for (&i, proposal) in drafting.iter().zip(proposals) {
            seqs[i].draft = proposal;
        }
        Ok(())
    }

    /// Computes the draft KV of each goal's sequence `(i, end, wants_row)` up to position
    /// `end`, in passes of at most `max_num_tokens` tokens; returns, for the goals that want
    /// it (the first ones), the argmax of their last row: their first draft.
    fn catch_up(
        &mut self,
        seqs: &mut [Sequence],
        goals: &[(usize, usize, bool)],
        keep_alive: &mut dyn FnMut() -> Result<(), BackendError>,
    ) -> Result<Vec<u32>, BackendError> {
        let mut first: Vec<Option<u32>> = goals.iter().map(|_| None).collect();
        // Every pass computes at least one token of a sequence that is behind.
        let behind: usize = goals
            .iter()
            .map(|&(i, end, _)| end.saturating_sub(seqs[i].draft_computed))
            .sum();
        for _ in 0..behind {
            let mut budget = self.max_num_tokens;
            let mut taken: Vec<(usize, usize)> = Vec::new();
            let out = {
                let mut chunks: Vec<SeqChunk<'_>> = Vec::new();
                for (k, &(i, end, wants_row)) in goals.iter().enumerate() {
                    let s = &seqs[i];
                    if s.draft_computed >= end || budget == 0 {
                        continue;
                    }
                    let n = (end - s.draft_computed).min(budget);
                    budget -= n;
                    let row = wants_row && s.draft_computed + n == end;
                    chunks.push(SeqChunk {
                        tokens: &s.tokens[s.draft_computed..s.draft_computed + n],
                        start_pos: s.draft_computed,
                        block_table: &s.blocks,
                        logits: if row {
                            LogitsWanted::Last
                        } else {
                            LogitsWanted::None
                        },
                    });
                    taken.push((k, n));
                }
                if chunks.is_empty() {
                    break;
                }
                self.backend.forward_greedy(&chunks)?
            };
            keep_alive()?;
            for (&(k, n), token) in taken.iter().zip(out) {
                let (i, end, wants_row) = goals[k];
                seqs[i].draft_computed += n;
                if wants_row && seqs[i].draft_computed == end {
                    first[k] = Some(token.ok_or_else(no_token)?);
                }
            }
        }
        goals
            .iter()
            .zip(first)
            .filter(|((_, _, wants_row), _)| *wants_row)
            .map(|(_, t)| t.ok_or_else(no_token))
            .collect()
    }
}

fn no_token() -> BackendError {
    BackendError::InvalidStep(
        "the draft model returned no token for a chunk that wanted one".into(),
    )
}

/// `prev` moved a fifth of the way to `x` (`x` itself when there is no `prev`).
pub(super) fn running_mean(prev: Option<f64>, x: f64) -> f64 {
    prev.map_or(x, |p| p + 0.2 * (x - p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test double: proposes token 7 for every chunk that wants a row.
    struct Sevens;

    impl Backend for Sevens {
        fn name(&self) -> &'static str {
            "sevens"
        }
        fn vocab_size(&self) -> usize {
            16
        }
        fn kv_bytes_per_token(&self) -> usize {
            0
        }
        fn init_kv(&mut self, _: usize, _: usize) -> Result<(), BackendError> {
            Ok(())
        }
        fn forward(&mut self, _: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
            Err(BackendError::InvalidStep(
                "the draft runs forward_greedy".into(),
            ))
        }
        fn forward_greedy(
            &mut self,
            batch: &[SeqChunk<'_>],
        ) -> Result<Vec<Option<u32>>, BackendError> {
            Ok(batch
                .iter()
                .map(|c| (c.logits != LogitsWanted::None).then_some(7))
                .collect())
        }
    }

    /// A decoding sequence of `len` tokens, all but the last computed by the target, none
    /// by the draft, with `drafts` placeholder drafts.
    fn decoding(len: usize, drafts: usize) -> Sequence {
        Sequence {
            prompt_len: len - 1,
            num_computed: len - 1,
            blocks: vec![0, 1, 2],
            max_total: 64,
            draft: vec![0; drafts],
            ..crate::scheduler::tests::seq("s", len)
        }
    }

    #[test]
    fn keep_alive_runs_after_every_pass_of_the_draft() {
        // 20 tokens to catch up in passes of 8 (8, 8, 4; the last gives d1), then one
        // single-token pass for each of d2 and d3.
        let mut model = DraftModel::new(Box::new(Sevens), 8);
        let mut seqs = vec![decoding(20, 3)];
        let mut beats = 0;
        model
            .propose(&mut seqs, &[0], &[], &mut || {
                beats += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(seqs[0].draft, vec![7, 7, 7]);
        assert_eq!(seqs[0].draft_computed, 22);
        assert_eq!(beats, 5, "one keep-alive per pass");
    }

    #[test]
    fn a_failed_keep_alive_ends_the_proposal_with_its_error() {
        let mut model = DraftModel::new(Box::new(Sevens), 8);
        let mut seqs = vec![decoding(20, 3)];
        let e = model
            .propose(&mut seqs, &[0], &[], &mut || {
                Err(BackendError::InvalidStep("rank 1 is gone".into()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("rank 1 is gone"), "{e}");
    }
}
