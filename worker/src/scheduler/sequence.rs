//! One request's state inside the engine: its tokens, KV blocks, sampler and event channel.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{StoppingParams, TokenEvent};
use crate::kv::{BlockHash, BlockId};
use crate::sampling::Sampler;

/// A request being served.
pub struct Sequence {
    /// Caller's request id.
    pub id: String,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub prompt_len: usize,
    /// Sequence group key: running members of the same group share their computed full
    /// prompt blocks with it at admission. Empty: no group.
    pub group: String,
    /// Tokens whose KV is in the cache.
    pub num_computed: usize,
    /// KV blocks, in position order (`kv::FREED_BLOCK` where one fell out of the window).
    pub blocks: Vec<BlockId>,
    /// Free blocks the block manager promised it for later growth (a GUARANTEED_NO_EVICT
    /// request on a model whose every layer is windowed reserves only what it can hold at
    /// once: blocks it frees come back to it as promises).
    pub promised: usize,
    /// Chained hashes of the full blocks registered so far.
    pub hashes: Vec<BlockHash>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Prompt + completion limit (max_tokens capped by max_seq_len).
    pub max_total: usize,
    /// Asks for the whole room its prompt leaves (no max_tokens): under GUARANTEED_NO_EVICT
    /// it gets KV blocks as it grows instead of all at admission, and may pause.
    pub reserve_in_steps: bool,
    /// Stopping settings.
    pub stopping: StoppingParams,
    /// Sampler with this request's RNG.
    pub sampler: Sampler,
    /// Where events go.
    pub tx: UnboundedSender<TokenEvent>,
    /// Send prompt logprobs with the first logits.
    pub want_prompt_logprobs: bool,
    /// Prompt logprobs gathered so far (sent once complete).
    pub prompt_logprobs: Vec<crate::engine::TokenLogprob>,
    /// Arrival time.
    pub arrival: Instant,
    /// First admission.
    pub scheduled_at: Option<Instant>,
    /// First generated token.
    pub first_token_at: Option<Instant>,
    /// Draft tokens proposed to follow `tokens` this step (speculative decoding); the
    /// scheduler shortens them to what the step's budget and the KV blocks allow.
    pub draft: Vec<u32>,
    /// Speculation state and figures; None when speculative decoding is off.
    pub spec: Option<crate::spec::SeqSpec>,
    /// Positions whose KV the draft model holds (DraftTarget: it shares `blocks` with the
    /// target, in a pool of its own); never above what it computed last, lowered to
    /// `num_computed` before it drafts again.
    pub draft_computed: usize,
}

impl Sequence {
    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Records admission; the first one fixes the cached-token count and queue time.
    pub fn on_admitted(&mut self, cached_tokens: usize) {
        if self.scheduled_at.is_none() {
            self.scheduled_at = Some(Instant::now());
            self.cached_tokens = cached_tokens.min(self.prompt_len);
        }
    }

    /// Forgets KV state so the sequence can be recomputed from scratch after preemption.
    ///
    /// Prompt logprobs gathered so far go too: recomputing the prompt gathers them again
    /// from position 0 (once the prompt is done they have been sent and none are kept).
    pub fn reset_for_recompute(&mut self) {
        self.blocks.clear();
        self.promised = 0;
        self.hashes.clear();
        self.num_computed = 0;
        self.draft_computed = 0;
        self.prompt_logprobs.clear();
        self.draft.clear();
    }
}
