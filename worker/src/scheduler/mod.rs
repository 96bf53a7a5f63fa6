//! Iteration-level scheduling: which sequences compute how many tokens in the next step.
//!
//! Decode and in-flight prefill of running sequences first, then first-come-first-served
//! admission of waiting ones, under `max_batch_size` sequences and `max_num_tokens` tokens,
//! of which at most `prefill_budget` are prompt tokens. The prefill budget keeps prompts
//! that arrive together from all waiting for one long step: they start decoding a few at
//! a time, and a step never stalls running decodes for a whole wave of prefills. Without
//! chunked prefill a prompt is never split: one longer than the budget runs whole, in a step
//! that prefills nothing else.
//! GUARANTEED_NO_EVICT reserves blocks for a request's whole length at admission, except for
//! a request that asks for the whole room its prompt leaves (no max_tokens: `reserve_in_steps`),
//! which would reserve the model's entire context (131072 tokens for many models, more than
//! the cache): it gets blocks as it grows, and when none is free it pauses, keeping its
//! blocks, while the others go on and no new request is admitted. Only when every running
//! sequence is paused is the newest one preempted (recomputed later, its output continuing),
//! or, alone in the cache, ended with finish reason `length` (`out_of_room`). Sequences with
//! a max_tokens are never paused or preempted. MAX_UTILIZATION allocates as it goes and
//! preempts the newest request (to be recomputed) when blocks run out. When every layer of the
//! model attends over a sliding window, the blocks a sequence's next query can no longer see
//! go back to the pool as it grows (`free_out_of_window`). The choices of one prompt share
//! its computed full blocks (`group`). Not for: arithmetic, sampling or event delivery.

mod draft;
mod group;
pub mod sequence;
mod window;

use std::collections::VecDeque;

use llmapi_common::block_hash::{ROOT_BLOCK_HASH, block_hash};

use crate::engine::CapacityPolicy;
use crate::kv::{BlockManager, prefix_block_hashes};
use group::GroupShare;
pub use sequence::Sequence;

/// Limits the scheduler works under.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    /// Most sequences per step.
    pub max_batch_size: usize,
    /// Most tokens per step.
    pub max_num_tokens: usize,
    /// Most prompt tokens per step (prefill and recompute; decode tokens do not count).
    pub prefill_budget: usize,
    /// Split prompts over steps.
    pub chunked_prefill: bool,
    /// Block policy.
    pub policy: CapacityPolicy,
}

/// One sequence's work in a step: compute `n` tokens from its `num_computed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    /// Index into `Scheduler::running`.
    pub seq: usize,
    /// Tokens to compute.
    pub n: usize,
}

/// What is left of a step's prefill budget.
struct PrefillBudget {
    /// Prompt tokens the step may still take on.
    left: usize,
    /// Whether the step already prefills something.
    used: bool,
}

impl PrefillBudget {
    fn take(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n);
        self.used = true;
    }
}

/// Holds waiting and running sequences and the block manager.
pub struct Scheduler {
    limits: SchedulerLimits,
    /// The block manager (KV accounting).
    pub blocks: BlockManager,
    /// Admitted sequences, oldest admission first.
    pub running: Vec<Sequence>,
    /// Sequences waiting for admission, first come first.
    pub waiting: VecDeque<Sequence>,
    /// Preemptions so far (for logs and tests).
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission so far.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// Steps planned so far (non-empty plans).
    pub iterations: u64,
    /// Tokens those steps compute.
    pub iteration_tokens: u64,
    /// Sequences that filled the whole cache alone and could not grow: the engine ends them
    /// with finish reason `length`.
    pub out_of_room: Vec<Sequence>,
    /// The sliding window every layer shares, when every layer has one and the backend
    /// applies it: blocks before a sequence's window are freed.
    window: Option<usize>,
}

/// What `grow` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growth {
    /// The sequence has its blocks.
    Ready,
    /// No block is free; the sequence waits with what it holds (GUARANTEED_NO_EVICT,
    /// `reserve_in_steps`).
    Paused,
    /// The sequence itself was preempted (MAX_UTILIZATION).
    Preempted,
}

impl Scheduler {
    /// A scheduler over a block manager.
    pub fn new(limits: SchedulerLimits, blocks: BlockManager) -> Self {
        Self {
            limits,
            blocks,
            running: Vec::new(),
            waiting: VecDeque::new(),
            preemptions: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            iterations: 0,
            iteration_tokens: 0,
            out_of_room: Vec::new(),
            window: None,
        }
    }

    /// Frees, as sequences grow, the blocks before the window of `window` positions that
    /// every layer attends over (None: some layer sees the whole sequence; nothing is freed).
    pub fn with_window_of_every_layer(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// Whether there is any work.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Vec<PlanItem> {
        // Each round either plans work or takes a sequence out of `running`.
        loop {
            let (plan, paused) = self.plan_step();
            if !plan.is_empty() {
                self.iterations += 1;
                self.iteration_tokens += plan.iter().map(|p| p.n as u64).sum::<u64>();
                return plan;
            }
            if !paused {
                return plan;
            }
            self.unblock();
        }
    }

    /// Every running sequence is paused for a block: preempt the newest that reserves in
    /// steps, or end the only one (it fills the cache alone).
    fn unblock(&mut self) {
        if self.running.len() > 1 {
            let newest = self
                .running
                .iter()
                .rposition(|s| s.reserve_in_steps)
                .unwrap_or(self.running.len() - 1);
            tracing::warn!(
                request_id = %self.running[newest].id,
                running = self.running.len(),
                "every running request waits for a KV block: preempting the newest (it is recomputed when blocks free up)"
            );
            self.preempt(newest);
        } else if let Some(seq) = self.running.pop() {
            self.release_blocks(&seq);
            tracing::warn!(
                request_id = %seq.id,
                tokens = seq.tokens.len(),
                "the request fills the whole KV cache and cannot grow: it ends with finish_reason length (raise kv_cache_config.max_tokens or ask for fewer tokens)"
            );
            self.out_of_room.push(seq);
        }
    }

    /// One planning pass; also whether a running sequence is paused for want of a block.
    fn plan_step(&mut self) -> (Vec<PlanItem>, bool) {
        let mut plan = Vec::new();
        let mut paused = false;
        let mut budget = self.limits.max_num_tokens;
        let mut prefill = PrefillBudget {
            left: self.limits.prefill_budget,
            used: false,
        };
        let mut i = 0;
        while i < self.running.len() {
            if budget == 0 {
                break;
            }
            let seq = &self.running[i];
            let computed = seq.num_computed;
            let remaining = seq.tokens.len() - computed;
            let decode = remaining == 1 && computed >= seq.prompt_len;
            let n = if decode {
                1 + self.fit_draft(i, budget)
            } else {
                match self.prefill_tokens(remaining, budget, &prefill) {
                    Some(n) => n,
                    None => {
                        i += 1;
                        continue;
                    }
                }
            };
            match self.grow(i, computed + n) {
                Growth::Ready => {}
                Growth::Paused => {
                    paused = true;
                    i += 1;
                    continue;
                }
                // grow() preempted sequences from the back; `i` itself is gone.
                Growth::Preempted => continue,
            }
            budget -= n;
            if !decode {
                prefill.take(n);
            }
            plan.push(PlanItem { seq: i, n });
            i += 1;
        }
        // A paused sequence gets the next free block before any new request.
        while !paused && plan.len() < self.limits.max_batch_size && budget > 0 {
            if self.waiting.is_empty() || self.running.len() >= self.limits.max_batch_size {
                break;
            }
            let Some(n) = self.admit_front(budget, &prefill) else {
                break;
            };
            budget -= n;
            prefill.take(n);
            plan.push(PlanItem {
                seq: self.running.len() - 1,
                n,
            });
        }
        (plan, paused)
    }

    /// Prompt tokens a sequence with `remaining` uncomputed tokens computes this step, under
    /// `budget` step tokens and the prefill budget; None: it waits for a later step.
    fn prefill_tokens(
        &self,
        remaining: usize,
        budget: usize,
        prefill: &PrefillBudget,
    ) -> Option<usize> {
        let cap = budget.min(prefill.left);
        // A preempted sequence may have grown past max_num_tokens: it is recomputed in
        // chunks even when chunked prefill is off, or it could never run again.
        if self.limits.chunked_prefill || remaining > self.limits.max_num_tokens {
            return (cap > 0).then(|| remaining.min(cap));
        }
        if remaining <= cap || (!prefill.used && remaining <= budget) {
            return Some(remaining);
        }
        None
    }

    /// Ensures running[i] has blocks for `upto` tokens. When blocks run out, MAX_UTILIZATION
    /// preempts the newest sequences (possibly `i` itself); GUARANTEED_NO_EVICT pauses `i`
    /// (only a `reserve_in_steps` sequence can get here: the others hold their whole length).
    fn grow(&mut self, i: usize, upto: usize) -> Growth {
        let need = self.blocks.blocks_for(upto);
        while self.running[i].blocks.len() < need {
            let promised = self.running[i].promised > 0;
            let block = if promised {
                self.blocks.allocate_promised()
            } else {
                self.blocks.allocate()
            };
            if let Some(b) = block {
                self.running[i].promised -= usize::from(promised);
                self.running[i].blocks.push(b);
                continue;
            }
            if self.limits.policy == CapacityPolicy::GuaranteedNoEvict {
                return Growth::Paused;
            }
            if self.running.len() == 1 {
                // Alone and out of blocks: it fills the cache (a request for the whole room).
                let seq = self.running.remove(i);
                self.release_blocks(&seq);
                self.out_of_room.push(seq);
                return Growth::Preempted;
            }
            // Out of blocks: preempt the newest sequence, which is never planned before `i`.
            let victim = self.running.len() - 1;
            self.preempt(victim);
            if victim == i {
                return Growth::Preempted;
            }
        }
        Growth::Ready
    }

    fn preempt(&mut self, idx: usize) {
        let mut seq = self.running.remove(idx);
        self.release_blocks(&seq);
        seq.reset_for_recompute();
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Tries to admit the head of the queue; returns the tokens it computes this step.
    fn admit_front(&mut self, budget: usize, prefill: &PrefillBudget) -> Option<usize> {
        let seq = self.waiting.front()?;
        let tpb = self.blocks.tokens_per_block();
        let (hashes, cached, shared) = match self.group_share(seq) {
            GroupShare::Wait => return None,
            GroupShare::Share { blocks, hashes } => (hashes, blocks.len(), Some(blocks)),
            GroupShare::Alone => {
                // Leave at least one token to compute so the step yields logits.
                let hashes = if seq.want_prompt_logprobs {
                    Vec::new()
                } else {
                    prefix_block_hashes(&seq.tokens[..seq.tokens.len() - 1], tpb)
                };
                let cached = self.blocks.count_cached_prefix(&hashes);
                (hashes, cached, None)
            }
        };
        let start = cached * tpb;
        let remaining = seq.tokens.len() - start;
        let n = self.prefill_tokens(remaining, budget, prefill)?;
        // The last token is sampled, never computed: it takes no KV slot.
        let whole = self.blocks.blocks_for(seq.max_total.saturating_sub(1));
        let (target, promise) = match (self.limits.policy, self.window) {
            (CapacityPolicy::GuaranteedNoEvict, _) if seq.reserve_in_steps => (start + n, 0),
            // With a window on every layer it never holds more than the blocks of what it
            // prefills (its prompt; after a preemption, its output too) and its window's at
            // once: those it does not take now are promised, and the blocks it frees come
            // back to it as promises.
            (CapacityPolicy::GuaranteedNoEvict, Some(w)) => {
                let now = self.blocks.blocks_for(start + n);
                let prefilled = self.blocks.blocks_for(seq.tokens.len());
                let most = whole.min(prefilled + w.div_ceil(tpb) + 1);
                (start + n, most.saturating_sub(now))
            }
            (CapacityPolicy::GuaranteedNoEvict, None) => (seq.max_total.saturating_sub(1), 0),
            (CapacityPolicy::MaxUtilization, _) => (start + n, 0),
        };
        let need_new = self.blocks.blocks_for(target).saturating_sub(cached);
        // All or nothing: a head that does not fit evicts no one's cached prefix while it waits.
        let blocks = match shared {
            Some(shared) => self.blocks.admit_shared(&shared, need_new, promise)?,
            None => self.blocks.admit(&hashes[..cached], need_new, promise)?,
        };
        let mut seq = self.waiting.pop_front()?;
        seq.blocks = blocks;
        seq.promised = promise;
        seq.hashes = hashes[..cached].to_vec();
        seq.num_computed = start;
        seq.on_admitted(start);
        self.prefix_cache_queries += seq.tokens.len() as u64;
        self.prefix_cache_hits += start as u64;
        self.running.push(seq);
        Some(n)
    }

    /// Registers full computed blocks of running[i] for prefix reuse.
    pub fn register_full_blocks(&mut self, i: usize) {
        let tpb = self.blocks.tokens_per_block();
        let seq = &mut self.running[i];
        while (seq.hashes.len() + 1) * tpb <= seq.num_computed {
            let b = seq.hashes.len();
            let parent = seq.hashes.last().copied();
            let h = block_hash(
                &parent.unwrap_or(ROOT_BLOCK_HASH),
                &seq.tokens[b * tpb..(b + 1) * tpb],
            );
            seq.hashes.push(h);
            self.blocks.register(seq.blocks[b], h, parent);
        }
    }

    /// Removes running[i] and frees its blocks.
    pub fn finish(&mut self, i: usize) -> Sequence {
        let seq = self.running.remove(i);
        self.release_blocks(&seq);
        seq
    }

    /// Gives back everything a sequence holds: its blocks and its promises.
    fn release_blocks(&mut self, seq: &Sequence) {
        self.blocks.release_all(&seq.blocks);
        self.blocks.release_promise(seq.promised);
    }

    /// Removes a sequence by id from either queue, freeing its blocks.
    pub fn remove(&mut self, id: &str) -> Option<Sequence> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.finish(i));
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::{SamplingParams, StoppingParams};
    use crate::sampling::Sampler;

    /// Four sequences and 64 tokens a step, prompts whole: the limits most tests run under.
    pub(super) fn small_limits(policy: CapacityPolicy) -> SchedulerLimits {
        SchedulerLimits {
            max_batch_size: 4,
            max_num_tokens: 64,
            prefill_budget: 64,
            chunked_prefill: false,
            policy,
        }
    }

    pub(crate) fn seq(id: &str, prompt_len: usize) -> Sequence {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Sequence {
            id: id.into(),
            tokens: (0..prompt_len as u32).collect(),
            prompt_len,
            group: String::new(),
            num_computed: 0,
            blocks: Vec::new(),
            promised: 0,
            hashes: Vec::new(),
            cached_tokens: 0,
            max_total: 32,
            reserve_in_steps: false,
            stopping: StoppingParams::default(),
            sampler: Sampler::new(SamplingParams::default()),
            tx,
            want_prompt_logprobs: false,
            prompt_logprobs: Vec::new(),
            arrival: std::time::Instant::now(),
            scheduled_at: None,
            first_token_at: None,
            draft: Vec::new(),
            draft_computed: 0,
            spec: None,
        }
    }

    /// Applies a plan as the engine would, appending one sampled token per finished prefill.
    pub(super) fn run(s: &mut Scheduler, plan: &[PlanItem]) {
        for item in plan {
            let q = &mut s.running[item.seq];
            q.num_computed += item.n;
            if q.num_computed == q.tokens.len() {
                q.tokens.push(7);
            }
        }
    }

    #[test]
    fn load_counters_count_prefix_lookups_hits_and_iterations() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        let mut s = Scheduler::new(limits, BlockManager::new(16, 4, true));
        s.waiting.push_back(seq("a", 9));
        let plan = s.schedule();
        assert_eq!((s.iterations, s.iteration_tokens), (1, 9));
        run(&mut s, &plan);
        s.register_full_blocks(0);
        // Nothing cached yet: 9 prompt tokens looked up, none found.
        assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits), (9, 0));
        let done = s.finish(0);
        assert_eq!(done.id, "a");
        // The same prompt again finds its two whole blocks (8 tokens) cached.
        s.waiting.push_back(seq("b", 9));
        let plan = s.schedule();
        assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits), (18, 8));
        assert_eq!((s.iterations, s.iteration_tokens), (2, 10));
        assert_eq!(plan.len(), 1);
    }

    #[test]
    fn max_utilization_preempts_the_newest_when_blocks_run_out() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        let mut s = Scheduler::new(limits, BlockManager::new(4, 4, false));
        s.waiting.push_back(seq("old", 6));
        s.waiting.push_back(seq("new", 6));
        for _ in 0..4 {
            let plan = s.schedule();
            run(&mut s, &plan);
        }
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].id, "old");
        assert_eq!(s.waiting[0].id, "new");
        assert_eq!(s.waiting[0].num_computed, 0, "preempted work is recomputed");
    }

    #[test]
    fn guaranteed_no_evict_reserves_the_whole_request_at_admission() {
        let limits = small_limits(CapacityPolicy::GuaranteedNoEvict);
        let mut s = Scheduler::new(limits, BlockManager::new(10, 4, false));
        s.waiting.push_back(seq("a", 6));
        s.waiting.push_back(seq("b", 6));
        let plan = s.schedule();
        assert_eq!(
            plan.len(),
            1,
            "the second request waits: 8 blocks reserved, 2 free"
        );
        assert_eq!(s.running[0].blocks.len(), 8);
    }

    /// A sequence with the given tokens as its prompt, reserving `max_total` under
    /// GUARANTEED_NO_EVICT.
    pub(super) fn prompt_seq(id: &str, tokens: Vec<u32>, max_total: usize) -> Sequence {
        let mut q = seq(id, tokens.len());
        q.tokens = tokens;
        q.max_total = max_total;
        q
    }

    /// Serves `q` alone to the end of its prompt, registers its full blocks and finishes it,
    /// leaving its prefix cached.
    fn serve_alone(s: &mut Scheduler, q: Sequence) {
        s.waiting.push_back(q);
        let plan = s.schedule();
        assert_eq!(plan.len(), 1);
        run(s, &plan);
        s.register_full_blocks(0);
        s.finish(0);
    }

    #[test]
    fn a_waiting_request_that_does_not_fit_leaves_other_prefixes_cached() {
        for policy in [
            CapacityPolicy::GuaranteedNoEvict,
            CapacityPolicy::MaxUtilization,
        ] {
            let limits = small_limits(policy);
            let mut s = Scheduler::new(limits, BlockManager::new(10, 4, true));
            let p: Vec<u32> = (1000..1009).collect();
            let q: Vec<u32> = (2000..2009).collect();
            serve_alone(&mut s, prompt_seq("p", p.clone(), 10));
            serve_alone(&mut s, prompt_seq("q", q.clone(), 10));
            let p_blocks = prefix_block_hashes(&p, 4);
            assert_eq!(s.blocks.count_cached_prefix(&p_blocks), 2);
            // A running request holds 4 blocks; 2 plain and 4 cached ones are free.
            s.waiting
                .push_back(prompt_seq("r", (3000..3016).collect(), 17));
            assert_eq!(s.schedule().len(), 1);
            assert_eq!(s.blocks.num_free(), 6);
            // 28 tokens (7 blocks) starting with q's cached 2: 5 new blocks needed, and only
            // 4 are left once q's are taken. The old check (6 free + 2 cached >= 5) let it try,
            // evicting p's prefix on the way to running out.
            let big: Vec<u32> = q[..8].iter().copied().chain(4000..4020).collect();
            s.waiting.push_back(prompt_seq("big", big, 29));
            for _ in 0..3 {
                let plan = s.schedule();
                assert!(plan.iter().all(|i| s.running[i.seq].id == "r"));
                assert_eq!(s.waiting.len(), 1, "{policy:?}: big waits");
            }
            assert_eq!(
                s.blocks.count_cached_prefix(&p_blocks),
                2,
                "{policy:?}: p's prefix is still cached"
            );
            assert!(
                s.blocks
                    .take_cache_changes()
                    .iter()
                    .all(|c| matches!(c, crate::kv::CacheChange::Cached { .. })),
                "{policy:?}: nothing was evicted"
            );
            // Once big is gone, the next request with p's prefix gets its 8 tokens cached.
            assert!(s.remove("big").is_some());
            s.waiting.push_back(prompt_seq("p2", p.clone(), 10));
            s.schedule();
            let p2 = s.running.iter().find(|q| q.id == "p2").unwrap();
            assert_eq!(p2.num_computed, 8, "{policy:?}");
        }
    }

    /// A scheduler with room for everything but the given token budgets.
    fn wave(prefill_budget: usize, chunked_prefill: bool, prompts: &[usize]) -> Scheduler {
        let limits = SchedulerLimits {
            max_batch_size: 64,
            max_num_tokens: 8192,
            prefill_budget,
            chunked_prefill,
            policy: CapacityPolicy::GuaranteedNoEvict,
        };
        let mut s = Scheduler::new(limits, BlockManager::new(4096, 16, false));
        for (i, &n) in prompts.iter().enumerate() {
            let mut q = seq(&format!("r{i}"), n);
            q.max_total = n + 128;
            s.waiting.push_back(q);
        }
        s
    }

    fn prompt_tokens(s: &Scheduler, plan: &[PlanItem]) -> usize {
        plan.iter()
            .filter(|p| s.running[p.seq].num_computed < s.running[p.seq].prompt_len)
            .map(|p| p.n)
            .sum()
    }

    #[test]
    fn prompts_arriving_together_prefill_a_budget_at_a_time_and_decode_meanwhile() {
        let mut s = wave(512, false, &[144; 16]);
        let first = s.schedule();
        assert_eq!(first.len(), 3, "three whole 144-token prompts fit in 512");
        assert_eq!(prompt_tokens(&s, &first), 432);
        run(&mut s, &first);
        let second = s.schedule();
        let decodes = second.iter().filter(|p| p.n == 1).count();
        assert_eq!(
            decodes, 3,
            "the first three decode while the next ones prefill"
        );
        assert_eq!(prompt_tokens(&s, &second), 432);
        run(&mut s, &second);
        // Steps go on until every prompt has run; no step prefills more than the budget.
        let mut steps = 2;
        while s.running.iter().any(|q| q.num_computed < q.prompt_len) || !s.waiting.is_empty() {
            let plan = s.schedule();
            assert!(prompt_tokens(&s, &plan) <= 512);
            run(&mut s, &plan);
            steps += 1;
            assert!(steps < 20, "the wave never finished prefilling");
        }
        assert_eq!(steps, 6, "16 prompts, three a step");
    }

    #[test]
    fn chunked_prefill_fills_the_budget_exactly() {
        let mut s = wave(512, true, &[144; 16]);
        let first = s.schedule();
        assert_eq!(prompt_tokens(&s, &first), 512);
        assert_eq!(first.last().map(|p| p.n), Some(512 - 3 * 144));
        run(&mut s, &first);
        let second = s.schedule();
        // The split prompt goes on first, then new ones, besides three decodes.
        assert_eq!(second[3].n, 144 - (512 - 3 * 144));
        assert_eq!(prompt_tokens(&s, &second), 512);
        assert_eq!(second.iter().filter(|p| p.n == 1).count(), 3);
    }

    #[test]
    fn an_unchunked_prompt_over_the_budget_runs_whole_in_a_step_of_its_own() {
        let mut s = wave(512, false, &[100, 1000, 100]);
        let first = s.schedule();
        assert_eq!(first.iter().map(|p| p.n).collect::<Vec<_>>(), vec![100]);
        run(&mut s, &first);
        // The long one is next in line: it does not fit what is left of the budget, so it
        // waits one step rather than being split, then runs alone with the decode.
        let second = s.schedule();
        assert_eq!(
            second.iter().map(|p| p.n).collect::<Vec<_>>(),
            vec![1, 1000]
        );
        run(&mut s, &second);
        let third = s.schedule();
        assert_eq!(
            third.iter().map(|p| p.n).collect::<Vec<_>>(),
            vec![1, 1, 100]
        );
    }

    #[test]
    fn decodes_do_not_count_against_the_prefill_budget() {
        let mut s = wave(8, false, &[4; 12]);
        for _ in 0..6 {
            let plan = s.schedule();
            run(&mut s, &plan);
        }
        assert!(s.waiting.is_empty());
        let plan = s.schedule();
        assert_eq!(plan.len(), 12, "every running sequence decodes");
        assert!(plan.iter().all(|p| p.n == 1));
    }

    /// A GUARANTEED_NO_EVICT scheduler over `blocks` blocks of 4 tokens.
    fn no_evict(blocks: usize) -> Scheduler {
        let limits = SchedulerLimits {
            max_batch_size: 64,
            max_num_tokens: 4096,
            prefill_budget: 4096,
            chunked_prefill: false,
            policy: CapacityPolicy::GuaranteedNoEvict,
        };
        Scheduler::new(limits, BlockManager::new(blocks, 4, false))
    }

    /// A request without max_tokens on a model of 131072 positions.
    fn whole_room(id: &str, prompt_len: usize) -> Sequence {
        let mut q = seq(id, prompt_len);
        q.max_total = 131_073;
        q.reserve_in_steps = true;
        q
    }

    #[test]
    fn requests_without_max_tokens_run_together_on_a_cache_far_below_the_context() {
        // 64 blocks of 4 tokens: one request reserving its whole room would need 32769.
        let mut s = no_evict(64);
        for i in 0..16 {
            s.waiting.push_back(whole_room(&format!("chat{i}"), 6));
        }
        let first = s.schedule();
        assert_eq!(first.len(), 16, "all sixteen are admitted at once");
        assert!(s.waiting.is_empty());
        run(&mut s, &first);
        // Each holds two blocks (6 prompt tokens + the first sampled one fits 8).
        let second = s.schedule();
        assert_eq!(second.len(), 16, "and all decode together");
        assert_eq!(s.preemptions, 0);
    }

    #[test]
    fn a_request_without_max_tokens_pauses_for_a_block_and_the_newest_yields_when_all_wait() {
        let mut s = no_evict(6);
        // A request with max_tokens holds its whole length (4 blocks) from admission.
        let mut fixed = seq("fixed", 6);
        fixed.max_total = 16;
        s.waiting.push_back(fixed);
        s.waiting.push_back(whole_room("old", 3));
        s.waiting.push_back(whole_room("new", 3));
        let mut paused_seen = false;
        for step in 0..40 {
            let plan = s.schedule();
            assert!(!plan.is_empty(), "step {step}: nothing could run");
            if s.running.len() + s.waiting.len() == 3 && plan.len() < s.running.len() {
                paused_seen = true;
            }
            run(&mut s, &plan);
            // Finish `fixed` at its max_total as the engine would, freeing its blocks.
            if let Some(i) = s
                .running
                .iter()
                .position(|q| q.id == "fixed" && q.tokens.len() >= q.max_total)
            {
                s.finish(i);
            }
            assert!(
                s.waiting.iter().all(|q| q.id != "fixed" && q.id != "old"),
                "neither the request with max_tokens nor the oldest is preempted"
            );
        }
        assert!(
            paused_seen,
            "a request without max_tokens waited for a block"
        );
        assert!(s.preemptions >= 1, "when all waited, the newest yielded");
        // The oldest went on until it filled the cache alone (6 blocks: 24 tokens, one more
        // sampled), never preempted.
        assert_eq!(
            s.out_of_room
                .iter()
                .map(|q| (q.id.as_str(), q.tokens.len()))
                .collect::<Vec<_>>(),
            vec![("old", 25)]
        );
    }

    #[test]
    fn a_request_filling_the_whole_cache_alone_ends_out_of_room() {
        let mut s = no_evict(3);
        s.waiting.push_back(whole_room("long", 5));
        for _ in 0..20 {
            let plan = s.schedule();
            run(&mut s, &plan);
            if !s.out_of_room.is_empty() {
                break;
            }
        }
        assert_eq!(s.out_of_room.len(), 1);
        assert_eq!(
            s.out_of_room[0].tokens.len(),
            13,
            "12 tokens fill 3 blocks, one more is sampled"
        );
        assert!(s.running.is_empty());
        assert_eq!(s.blocks.num_free(), 3, "its blocks are free again");
    }
}
