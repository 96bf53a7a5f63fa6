//! Speculative decoding in the engine loop: drafts proposed before a step is planned, and
//! verified from the step's logits rows after it ran.
//!
//! A decoding sequence with drafts d1..dk computes `[last, d1..dk]` at `num_computed` in the
//! step's one batched forward pass, asking for every row. Row j decides position j: the
//! sampler accepts d(j+1) (greedy: it is the argmax; sampled: the rejection rule of
//! `sampling::verify`), and the first rejection, or the row after the last draft, gives one
//! more token of its own. Rejected positions are rolled back by lowering `num_computed`:
//! their KV slots are overwritten by the next step, nothing is copied. The emitted tokens go
//! through the usual stop checks one by one (`accept_token`), so a stop token, max_tokens or
//! a complete grammar cuts the run where it would have stopped anyway. Not for: planning
//! room for drafts (`scheduler::draft`) or proposing them (`crate::spec`).

use super::{Runner, Stopped, accept_token};
use crate::engine::TokenLogprob;
use crate::sampling::Banned;
use crate::scheduler::Sequence;
use crate::spec::{NgramProposer, NgramSettings, SeqSpec};

/// The engine's speculation: the proposer and the counters /metrics shows.
#[derive(Debug)]
pub(super) struct Speculation {
    pub(super) proposer: NgramProposer,
    /// Draft tokens verified since the engine started.
    pub(super) drafted: u64,
    /// Of those, accepted.
    pub(super) accepted: u64,
}

impl Speculation {
    /// From `speculative_config` (validated by the configuration: NGram, max_draft_len > 0).
    pub(super) fn from_config(c: &llmapi_common::args::SpeculativeConfig) -> Self {
        let settings = NgramSettings {
            max_draft_len: c.max_draft_len.unwrap_or(0) as usize,
            max_matching_ngram_size: c.max_matching_ngram_size as usize,
            is_keep_all: c.is_keep_all,
            is_use_oldest: c.is_use_oldest,
            is_public_pool: c.is_public_pool,
        };
        Self {
            proposer: NgramProposer::new(settings),
            drafted: 0,
            accepted: 0,
        }
    }

    /// The state of a new sequence: grammar-guided ones never speculate (each of their
    /// tokens must pass the grammar before the next is drafted).
    pub(super) fn new_sequence(&self, guided: bool) -> SeqSpec {
        let max = if guided {
            0
        } else {
            self.proposer.settings().max_draft_len
        };
        SeqSpec::new(max)
    }
}

/// Whether `seq` decodes its next token this step (prompt done, only the last token left).
fn is_decoding(seq: &Sequence) -> bool {
    seq.num_computed + 1 == seq.tokens.len() && seq.num_computed >= seq.prompt_len
}

/// Tokens one step may emit for `seq` before its length limit: drafts beyond `max_total`
/// would only be cut.
fn drafts_allowed(seq: &Sequence) -> usize {
    // The token after the last draft is always emitted too.
    seq.max_total.saturating_sub(seq.tokens.len() + 1)
}

impl Runner {
    /// Proposes each decoding sequence's drafts for the coming step.
    pub(super) fn propose_drafts(&mut self) {
        let Some(spec) = self.spec.as_ref() else {
            return;
        };
        for seq in &mut self.sched.running {
            seq.draft.clear();
            if !is_decoding(seq) || seq.want_prompt_logprobs {
                continue;
            }
            let allowed = drafts_allowed(seq);
            let Some(length) = seq.spec.as_mut().and_then(|s| s.length.as_mut()) else {
                continue;
            };
            let limit = length.allowance().min(allowed);
            if limit > 0 {
                seq.draft = spec.proposer.propose(&seq.tokens, limit);
            }
        }
    }

    /// Verifies the drafts of running[i] from its logits `rows` (one per position of
    /// `[last, drafts]`), emits the tokens and rolls back what was rejected. Some: the
    /// sequence is done (Ok: why it stopped; Err: its grammar or its rows failed).
    pub(super) fn verify_drafts(
        &mut self,
        i: usize,
        mut rows: Vec<f32>,
    ) -> Option<Result<Stopped, String>> {
        let vocab = self.info.vocab_size as usize;
        let eos = &self.info.eos_token_ids;
        let seq = &mut self.sched.running[i];
        let draft = std::mem::take(&mut seq.draft);
        if rows.len() < (draft.len() + 1) * vocab {
            return Some(Err(format!(
                "the backend returned {} logits for {} positions of {vocab}",
                rows.len(),
                draft.len() + 1
            )));
        }
        let before = seq.tokens.len();
        let start = seq.num_computed;
        // Accepted drafts join `tokens` as they are decided, so that the next position's
        // penalties and bans see them; they are taken out again and re-emitted below.
        let mut emitted: Vec<(u32, Option<TokenLogprob>)> = Vec::new();
        for (j, row) in rows
            .chunks_exact_mut(vocab)
            .take(draft.len() + 1)
            .enumerate()
        {
            let banned = banned_now(seq, eos);
            let (prompt, generated) = seq.tokens.split_at(seq.prompt_len);
            let v = seq.sampler.verify(
                row,
                prompt,
                generated,
                Banned(&banned),
                draft.get(j).copied(),
            );
            emitted.push((v.token, v.logprob));
            if !v.accepted {
                break;
            }
            seq.tokens.push(v.token);
        }
        seq.tokens.truncate(before);
        let accepted = emitted.len() - 1;
        if let Some(spec) = self.spec.as_mut() {
            spec.drafted += draft.len() as u64;
            spec.accepted += accepted as u64;
        }
        let mut end = None;
        let mut sent = 0;
        for (token, logprob) in emitted {
            sent += 1;
            match accept_token(seq, token, logprob, eos) {
                Ok(None) => {}
                Ok(Some(stop)) => {
                    end = Some(Ok(stop));
                    break;
                }
                Err(e) => {
                    end = Some(Err(e));
                    break;
                }
            }
        }
        // The last token and the accepted drafts before the last emitted token have valid KV.
        seq.num_computed = start + sent;
        if let Some(s) = seq.spec.as_mut() {
            s.record_step(sent);
            if let Some(length) = s.length.as_mut() {
                length.observe(draft.len(), accepted);
            }
        }
        self.sched.register_full_blocks(i);
        self.sched.free_out_of_window(i);
        self.sched.trim_draft_blocks(i);
        end
    }
}

/// Stop and EOS ids a sequence may not emit at its current length (before min_tokens).
pub(super) fn banned_now(seq: &Sequence, eos: &[u32]) -> Vec<u32> {
    let mut banned = Vec::new();
    if seq.tokens.len() - seq.prompt_len < seq.stopping.min_tokens as usize {
        banned.extend(&seq.stopping.stop_token_ids);
        if !seq.stopping.ignore_eos {
            banned.extend(eos);
        }
    }
    banned
}
