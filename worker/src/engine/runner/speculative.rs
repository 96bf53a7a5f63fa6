//! Speculative decoding in the engine loop: drafts proposed before a step is planned (NGram)
//! or, for a draft model, placeholders planned and filled once the plan has cut them to their
//! room (DraftTarget, `draft_model`), and verified from the step's logits rows after it ran.
//!
//! A decoding sequence with drafts d1..dk computes `[last, d1..dk]` at `num_computed` in the
//! step's one batched forward pass, asking for every row. Row j decides position j: the
//! sampler accepts d(j+1) (greedy: it is the argmax; sampled: the rejection rule of
//! `sampling::verify`), and the first rejection, or the row after the last draft, gives one
//! more token of its own. Rejected positions are rolled back by lowering `num_computed`:
//! their KV slots are overwritten by the next step, nothing is copied. The emitted tokens go
//! through the usual stop checks one by one (`accept_token`), so a stop token, max_tokens or
//! a complete grammar cuts the run where it would have stopped anyway. Not for: planning
//! room for drafts (`scheduler::draft`) or proposing them (`crate::spec`, `draft_model`).

use std::time::Instant;

use super::draft_model::{DraftModel, running_mean};
use super::{Runner, Stopped, accept_token};
use crate::backend::{Backend, BackendError};
use crate::engine::TokenLogprob;
use crate::sampling::Banned;
use crate::scheduler::{PlanItem, Sequence};
use crate::spec::{NgramProposer, NgramSettings, SeqSpec};

/// Where drafts come from.
#[derive(Debug)]
pub(super) enum Proposer {
    /// Earlier text (`decoding_type: NGram`).
    Ngram(NgramProposer),
    /// A draft model (`decoding_type: DraftTarget`); drafts are proposed after the step is
    /// planned, into placeholders the scheduler has made room for.
    Model(DraftModel),
}

/// The engine's speculation: the proposer and the counters /metrics shows.
#[derive(Debug)]
pub(super) struct Speculation {
    pub(super) proposer: Proposer,
    /// Most drafts a sequence verifies per step.
    max_draft_len: usize,
    /// Draft tokens verified since the engine started.
    pub(super) drafted: u64,
    /// Of those, accepted.
    pub(super) accepted: u64,
    /// Running mean forward time of the steps that verified drafts and prefilled nothing,
    /// in microseconds; None before the first.
    verify_us: Option<f64>,
}

/// What each verified row adds to a step, as a share of the step (`--bench verify`: a step of
/// 5 tokens costs 1.3 to 1.7 steps of 1 on the CPU; less on a GPU).
const ROW_COST: f64 = 0.05;
/// The highest break-even acceptance asked of a draft model: a model as its own draft, which
/// costs about a target step per draft, keeps drafting while it is always right.
const MAX_FLOOR: f64 = 0.9;

impl Speculation {
    /// From `speculative_config` (validated by the configuration: max_draft_len > 0, a
    /// DraftTarget's `draft` backend loaded and its KV pool sized like the target's).
    pub(super) fn from_config(
        c: &llmapi_common::args::SpeculativeConfig,
        draft: Option<Box<dyn Backend>>,
        max_num_tokens: usize,
    ) -> Self {
        let max_draft_len = c.max_draft_len.unwrap_or(0) as usize;
        let proposer = match draft {
            Some(backend) => Proposer::Model(DraftModel::new(backend, max_num_tokens)),
            None => Proposer::Ngram(NgramProposer::new(NgramSettings {
                max_draft_len,
                max_matching_ngram_size: c.max_matching_ngram_size as usize,
                is_keep_all: c.is_keep_all,
                is_use_oldest: c.is_use_oldest,
                is_public_pool: c.is_public_pool,
            })),
        };
        Self {
            proposer,
            max_draft_len,
            drafted: 0,
            accepted: 0,
            verify_us: None,
        }
    }

    /// Records the forward time of a step that verified drafts and prefilled nothing.
    pub(super) fn record_verify_time(&mut self, time: std::time::Duration) {
        let us = time.as_secs_f64() * 1e6;
        self.verify_us = Some(running_mean(self.verify_us, us));
    }

    /// The share of its drafts a sequence must have accepted for drafting to pay: free for
    /// NGram drafts (their length controller still stops them when none is accepted); for a
    /// draft model, what one of its passes costs against a verification step, measured,
    /// plus a verified row's cost.
    fn floor(&self) -> f64 {
        match (&self.proposer, self.verify_us) {
            (Proposer::Model(m), Some(verify)) if verify > 0.0 => m.pass_us.map_or(0.0, |pass| {
                (pass / verify + ROW_COST).clamp(ROW_COST, MAX_FLOOR)
            }),
            _ => 0.0,
        }
    }

    /// Adds a finished sequence's tokens to the n-gram pool (NGram only).
    pub(super) fn record_finished(&mut self, tokens: &[u32]) {
        if let Proposer::Ngram(p) = &mut self.proposer {
            p.record(tokens);
        }
    }

    /// The state of a new sequence: grammar-guided ones never speculate (each of their
    /// tokens must pass the grammar before the next is drafted).
    pub(super) fn new_sequence(&self, guided: bool) -> SeqSpec {
        let max = if guided { 0 } else { self.max_draft_len };
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
    /// Proposes each decoding sequence's drafts for the coming step; a draft model only
    /// reserves their room here (placeholders), and fills them in `draft_with_model`.
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
                seq.draft = match &spec.proposer {
                    Proposer::Ngram(p) => p.propose(&seq.tokens, limit),
                    Proposer::Model(_) => vec![0; limit],
                };
            }
        }
    }

    /// DraftTarget: replaces the placeholder drafts of the planned sequences with the draft
    /// model's proposals, now that the scheduler has cut them to their room; drops those of
    /// sequences left out of the step.
    pub(super) fn draft_with_model(&mut self, plan: &[PlanItem]) -> Result<(), BackendError> {
        let Some(Speculation {
            proposer: Proposer::Model(model),
            ..
        }) = self.spec.as_mut()
        else {
            return Ok(());
        };
        let planned: Vec<usize> = plan.iter().map(|item| item.seq).collect();
        for (i, seq) in self.sched.running.iter_mut().enumerate() {
            if !planned.contains(&i) {
                seq.draft.clear();
            }
        }
        // Prompt (or recompute) chunks of sequences that may draft later; a decoding
        // sequence that does not draft this step (paused) is caught up only when it drafts.
        let prefilling: Vec<(usize, usize)> = plan
            .iter()
            .filter(|item| {
                let s = &self.sched.running[item.seq];
                !is_decoding(s) && s.spec.as_ref().is_some_and(|x| x.length.is_some())
            })
            .map(|item| (item.seq, self.sched.running[item.seq].num_computed + item.n))
            .collect();
        // A group's followers wait for this step's plan while rank 0 drafts: the target's
        // heartbeats reach them between the draft's passes.
        let (target, last_contact) = (&mut self.backend, &mut self.last_contact);
        let mut keep_alive = || {
            let Some(every) = target.heartbeat_interval() else {
                return Ok(());
            };
            if last_contact.elapsed() < every {
                return Ok(());
            }
            *last_contact = Instant::now();
            match target.heartbeat() {
                Err(e) if e.is_fatal() => Err(e),
                _ => Ok(()),
            }
        };
        model.propose(
            &mut self.sched.running,
            &planned,
            &prefilling,
            &mut keep_alive,
        )
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
        let floor = self.spec.as_ref().map_or(0.0, Speculation::floor);
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
                length.observe(draft.len(), accepted, floor);
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
