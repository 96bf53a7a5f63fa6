//! Room for draft tokens (speculative decoding): a decoding sequence with a draft computes
//! its last token and the draft in one step, so it needs step tokens and KV slots for them.
//!
//! A draft never costs anyone else a block: it is shortened to the step's token budget and
//! to the blocks the sequence holds or was promised, plus one free block only while every
//! running sequence could still take one. Rejected positions are rolled back by the engine
//! (it lowers `num_computed`; the next step overwrites their KV), and `trim_draft_blocks`
//! gives back blocks that then lie wholly past the sequence.

use super::Scheduler;
use crate::engine::CapacityPolicy;

impl Scheduler {
    /// Shortens running[i]'s draft to what fits `budget` step tokens (its last token counts
    /// too) and its blocks; returns the draft's new length.
    pub(super) fn fit_draft(&mut self, i: usize, budget: usize) -> usize {
        let tpb = self.blocks.tokens_per_block();
        let spare = usize::from(self.blocks.num_unpromised_free() > self.running.len());
        let seq = &mut self.running[i];
        if seq.draft.is_empty() {
            return 0;
        }
        let slots = (seq.blocks.len() + seq.promised + spare) * tpb;
        // Positions num_computed (the last token) through num_computed + draft.
        let room = slots.saturating_sub(seq.num_computed + 1);
        let fit = seq.draft.len().min(room).min(budget.saturating_sub(1));
        seq.draft.truncate(fit);
        fit
    }

    /// Gives back running[i]'s blocks that lie wholly past its tokens after a rollback, when
    /// it holds blocks as it grows (MAX_UTILIZATION, or a request for the whole room); a
    /// sequence that reserved its whole length keeps them.
    pub fn trim_draft_blocks(&mut self, i: usize) {
        let reserved = self.limits.policy == CapacityPolicy::GuaranteedNoEvict
            && !self.running[i].reserve_in_steps;
        if reserved || self.window.is_some() {
            return;
        }
        // The last token is computed next step: its position needs a slot.
        let keep = self.blocks.blocks_for(self.running[i].tokens.len());
        while self.running[i].blocks.len() > keep {
            if let Some(b) = self.running[i].blocks.pop() {
                self.blocks.release(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{run, seq, small_limits};
    use super::*;
    use crate::kv::BlockManager;

    #[test]
    fn a_draft_is_planned_with_its_last_token_and_cut_to_the_budget_and_blocks() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        let mut s = Scheduler::new(limits, BlockManager::new(16, 4, false));
        s.waiting.push_back(seq("a", 6));
        let plan = s.schedule();
        run(&mut s, &plan);
        // 7 tokens, 6 computed, 2 blocks held: a draft of 5 needs positions 6..=11 (3 blocks).
        s.running[0].draft = vec![1, 2, 3, 4, 5];
        let plan = s.schedule();
        assert_eq!(plan[0].n, 6, "the last token and five drafts");
        assert_eq!(s.running[0].blocks.len(), 3);
        // Past the blocks it holds and one more, the draft is cut: 3 + 1 blocks are 16
        // slots, positions 6..=15 are the last token and 9 drafts.
        s.running[0].draft = vec![1; 100];
        assert_eq!(s.schedule()[0].n, 10);
        // With room to spare, past what the step's budget allows.
        let mut s = Scheduler::new(limits, BlockManager::new(16, 64, false));
        s.waiting.push_back(seq("b", 6));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.running[0].draft = vec![1; 100];
        assert_eq!(s.schedule()[0].n, 64, "max_num_tokens counts the drafts");
        assert_eq!(s.running[0].draft.len(), 63);
    }

    #[test]
    fn blocks_past_the_accepted_tokens_go_back_after_a_rollback() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        let mut s = Scheduler::new(limits, BlockManager::new(16, 4, false));
        s.waiting.push_back(seq("a", 6));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.running[0].draft = vec![1, 2, 3, 4, 5];
        s.schedule();
        assert_eq!(s.running[0].blocks.len(), 3);
        // Nothing accepted: one token (the bonus) more, 8 tokens in 2 blocks.
        s.running[0].tokens.push(9);
        s.running[0].num_computed = 7;
        s.trim_draft_blocks(0);
        assert_eq!(s.running[0].blocks.len(), 2);
        assert_eq!(s.blocks.num_free(), 14);
    }
}
