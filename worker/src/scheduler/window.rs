//! Freeing the KV blocks that fall out of a sliding window every layer shares (Mistral v0.1):
//! a long generation then holds the blocks of its window, not of its whole length.

use super::Scheduler;
use crate::engine::CapacityPolicy;
use crate::kv::FREED_BLOCK;

impl Scheduler {
    /// Gives back the blocks of running[i] that no later query of it can see: with a window
    /// of `w` positions on every layer, the next query (position `num_computed`) and every
    /// later one attend from `num_computed + 1 - w` on, so whole blocks before that are
    /// dead. Call after `register_full_blocks`: a freed full block stays cached under its
    /// prefix hash, valid for any later request with that prefix (a block's KV depends only
    /// on the tokens up to it; the window decides which keys a query reads, not what is
    /// stored). Its table entry becomes [`FREED_BLOCK`].
    pub fn free_out_of_window(&mut self, i: usize) {
        let Some(w) = self.window else { return };
        let tpb = self.blocks.tokens_per_block();
        // A sequence that reserved what it holds at once (see `admit_front`) gets each block
        // it frees back as a promise, so it can always grow.
        let keeps = self.limits.policy == CapacityPolicy::GuaranteedNoEvict
            && !self.running[i].reserve_in_steps;
        let seq = &mut self.running[i];
        let dead = (seq.num_computed + 1).saturating_sub(w) / tpb;
        // Freed entries are a prefix of the table: walk back from the last dead block.
        for b in (0..dead.min(seq.blocks.len())).rev() {
            if seq.blocks[b] == FREED_BLOCK {
                break;
            }
            // The released block is free now, and promised back. One another sequence still
            // holds (a shared prefix) frees nothing: a promise then needs a free block nobody
            // was promised, and without one this sequence may wait for a block later.
            self.blocks.release(seq.blocks[b]);
            if keeps && self.blocks.promise(1) {
                seq.promised += 1;
            }
            seq.blocks[b] = FREED_BLOCK;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::PlanItem;
    use super::super::tests::{prompt_seq, run, seq, small_limits};
    use super::*;
    use crate::kv::BlockManager;

    /// Applies a plan as the engine does after a step: computed tokens, registered blocks,
    /// blocks out of the window freed.
    fn run_and_free(s: &mut Scheduler, plan: &[PlanItem]) {
        run(s, plan);
        for item in plan {
            s.register_full_blocks(item.seq);
            s.free_out_of_window(item.seq);
        }
    }

    #[test]
    fn blocks_out_of_every_layers_window_go_back_to_the_pool() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        // 8 blocks of 4 tokens hold 32 positions; the request grows to 200 with a window of
        // 6: the next query at n sees n - 5 ..= n, so at most 3 blocks are live at once.
        let mut s = Scheduler::new(limits, BlockManager::new(8, 4, false))
            .with_window_of_every_layer(Some(6));
        let mut q = seq("long", 10);
        q.max_total = 200;
        s.waiting.push_back(q);
        while s.running.first().is_none_or(|q| q.tokens.len() < 200) {
            let plan = s.schedule();
            assert!(!plan.is_empty());
            run_and_free(&mut s, &plan);
            let q = &s.running[0];
            let live = q.blocks.iter().filter(|&&b| b != FREED_BLOCK).count();
            assert!(live <= 3, "{live} blocks live at {}", q.num_computed);
            let first_live = (q.num_computed + 1).saturating_sub(6) / 4;
            assert!(q.blocks[first_live..].iter().all(|&b| b != FREED_BLOCK));
        }
        assert_eq!(s.preemptions, 0);
        assert!(s.out_of_room.is_empty());
        s.finish(0);
        assert_eq!(s.blocks.num_in_use(), 0);
        assert_eq!(s.blocks.num_free(), 8);
        // Without the window the same request runs out of blocks alone.
        let mut s = Scheduler::new(limits, BlockManager::new(8, 4, false));
        let mut q = seq("long", 10);
        q.max_total = 200;
        s.waiting.push_back(q);
        for _ in 0..40 {
            let plan = s.schedule();
            run_and_free(&mut s, &plan);
        }
        assert_eq!(s.out_of_room.len(), 1);
    }

    #[test]
    fn guaranteed_no_evict_reserves_only_what_a_windowed_sequence_holds_at_once() {
        let limits = small_limits(CapacityPolicy::GuaranteedNoEvict);
        // 12 blocks of 4; requests of 10 prompt tokens and 200 in all (50 blocks each): with
        // a window of 6, each holds its 3 prompt blocks now and is promised 3 more (prompt 3 +
        // window 2 + 1 = 6 at most), so two run together to the end, never paused, and a
        // third waits for one of them.
        let mut s = Scheduler::new(limits, BlockManager::new(12, 4, false))
            .with_window_of_every_layer(Some(6));
        for id in ["a", "b", "c"] {
            let mut q = seq(id, 10);
            q.max_total = 200;
            s.waiting.push_back(q);
        }
        let first = s.schedule();
        assert_eq!(
            first.len(),
            2,
            "the third waits: every free block is promised"
        );
        assert!(
            s.running
                .iter()
                .all(|q| (q.blocks.len(), q.promised) == (3, 3))
        );
        run_and_free(&mut s, &first);
        let mut steps = 0;
        while !s.running.is_empty() {
            let plan = s.schedule();
            assert_eq!(plan.len(), s.running.len(), "nobody pauses");
            run_and_free(&mut s, &plan);
            for q in &s.running {
                let live = q.blocks.iter().filter(|&&b| b != FREED_BLOCK).count();
                assert_eq!(live + q.promised, 6, "{}: holds and is promised 6", q.id);
            }
            if let Some(i) = s.running.iter().position(|q| q.tokens.len() >= 200) {
                s.finish(i);
            }
            steps += 1;
            assert!(steps < 500);
        }
        assert!(s.waiting.is_empty() && s.running.is_empty());
        assert_eq!(s.preemptions, 0);
        assert_eq!((s.blocks.num_free(), s.blocks.num_promised()), (12, 0));
    }

    #[test]
    fn a_freed_block_stays_cached_for_a_later_request_with_its_prefix() {
        let limits = small_limits(CapacityPolicy::MaxUtilization);
        let mut s = Scheduler::new(limits, BlockManager::new(8, 4, true))
            .with_window_of_every_layer(Some(6));
        let prompt: Vec<u32> = (100..110).collect();
        s.waiting.push_back(prompt_seq("first", prompt.clone(), 40));
        for _ in 0..4 {
            let plan = s.schedule();
            run_and_free(&mut s, &plan);
        }
        // 13 computed: the next query (13) sees 8..=13, so blocks 0 and 1 are freed.
        let first = &s.running[0];
        assert_eq!(first.num_computed, 13);
        assert_eq!(first.blocks[..2], [FREED_BLOCK; 2]);
        assert_eq!(s.blocks.num_in_use(), 2);
        // Their KV is that of the prompt's first 8 tokens whatever the window: a request with
        // the same prompt is served them from the cache and computes from position 8.
        s.waiting.push_back(prompt_seq("second", prompt, 40));
        s.schedule();
        let second = s.running.iter().find(|q| q.id == "second").unwrap();
        assert_eq!(second.num_computed, 8);
        assert!(second.blocks.iter().all(|&b| b != FREED_BLOCK));
        s.finish(1);
        s.finish(0);
        assert_eq!(s.blocks.num_in_use(), 0);
    }
}
