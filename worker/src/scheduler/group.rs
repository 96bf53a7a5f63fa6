//! Sequence groups: the choices of one prompt (`n > 1`, `best_of`) compute the prompt once.
//!
//! Each choice arrives as its own request carrying the same group key. The first member to
//! be admitted computes the prompt; a member at the head of the queue while another runs
//! takes a reference on that member's computed full prompt blocks and computes only the rest
//! (at most the partial last block, and always the last prompt token, whose logits it
//! samples from). While the running member is still computing those blocks the newcomer
//! waits at the head of the queue, a step or a few. The blocks are shared by reference count
//! as the prefix cache shares them, but directly from the running member, so it works with
//! `enable_block_reuse` off too. Not for: choosing members' workers (the router pins a group
//! to one) or sampling (each member keeps its own sampler and seed).

use super::Scheduler;
use crate::kv::{BlockHash, BlockId, FREED_BLOCK, prefix_block_hashes};
use crate::scheduler::Sequence;

/// What a waiting sequence can take from the running members of its group.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum GroupShare {
    /// No member runs that holds its prompt (or it has no group): admit it alone.
    Alone,
    /// A member is still computing blocks this sequence could share: wait for them.
    Wait,
    /// Take a reference on these full blocks (their hashes alongside) and start after them.
    Share {
        /// The member's blocks, in position order.
        blocks: Vec<BlockId>,
        /// Their chained prefix hashes.
        hashes: Vec<BlockHash>,
    },
}

impl Scheduler {
    /// What the waiting sequence `seq` can share with the running members of its group.
    pub(super) fn group_share(&self, seq: &Sequence) -> GroupShare {
        let tpb = self.blocks.tokens_per_block();
        // The last token is always computed: its logits give the first sample.
        let limit = seq.tokens.len().saturating_sub(1) / tpb;
        // Prompt logprobs need the whole prompt's logits: such a member computes it all.
        if seq.group.is_empty() || seq.want_prompt_logprobs || limit == 0 {
            return GroupShare::Alone;
        }
        let mut wait = false;
        let mut best: Option<(&Sequence, usize)> = None;
        for member in self.running.iter().filter(|m| m.group == seq.group) {
            let shareable = common_blocks(&member.tokens, &seq.tokens, tpb, limit);
            let ready = shareable.min(member.num_computed / tpb);
            let usable = member.blocks.len() >= ready
                && member.blocks[..ready].iter().all(|&b| b != FREED_BLOCK);
            if ready < shareable && member.num_computed < member.prompt_len {
                wait = true;
            }
            if usable && ready > best.map_or(0, |(_, n)| n) {
                best = Some((member, ready));
            }
        }
        // A member that will soon hold more than another offers now is worth the wait.
        match best {
            Some((member, n)) if !wait || n == limit => {
                let hashes = if member.hashes.len() >= n {
                    member.hashes[..n].to_vec()
                } else {
                    prefix_block_hashes(&seq.tokens[..n * tpb], tpb)
                };
                GroupShare::Share {
                    blocks: member.blocks[..n].to_vec(),
                    hashes,
                }
            }
            _ if wait => GroupShare::Wait,
            _ => GroupShare::Alone,
        }
    }
}

/// Leading full blocks of `tpb` tokens that `a` and `b` hold alike, at most `limit`.
fn common_blocks(a: &[u32], b: &[u32], tpb: usize, limit: usize) -> usize {
    a.chunks_exact(tpb)
        .zip(b.chunks_exact(tpb))
        .take(limit)
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{prompt_seq, run, small_limits};
    use super::*;
    use crate::engine::CapacityPolicy;
    use crate::kv::BlockManager;

    /// A member of group `g` with a 10-token prompt (two full blocks of 4 and a partial one).
    fn member(id: &str, g: &str) -> Sequence {
        let mut q = prompt_seq(id, (100..110).collect(), 14);
        q.group = g.into();
        q
    }

    /// Schedules one step and applies it as the engine does (computed tokens, registered
    /// blocks).
    fn step(s: &mut Scheduler) -> Vec<(String, usize)> {
        let plan = s.schedule();
        let items = plan
            .iter()
            .map(|p| (s.running[p.seq].id.clone(), p.n))
            .collect();
        run(s, &plan);
        for p in &plan {
            s.register_full_blocks(p.seq);
        }
        items
    }

    #[test]
    fn group_members_share_the_leaders_prompt_blocks_without_prefix_reuse() {
        for policy in [
            CapacityPolicy::GuaranteedNoEvict,
            CapacityPolicy::MaxUtilization,
        ] {
            let mut s = Scheduler::new(small_limits(policy), BlockManager::new(32, 4, false));
            for id in ["a", "b", "c"] {
                s.waiting.push_back(member(id, "g"));
            }
            // The leader computes the prompt; the others wait for its blocks.
            assert_eq!(step(&mut s), vec![("a".to_owned(), 10usize)], "{policy:?}");
            // Then each computes only what follows the two shared full blocks.
            assert_eq!(
                step(&mut s),
                vec![
                    ("a".to_owned(), 1usize),
                    ("b".to_owned(), 2usize),
                    ("c".to_owned(), 2usize)
                ],
                "{policy:?}"
            );
            let leader = s.running[0].blocks[..2].to_vec();
            for q in &s.running[1..] {
                assert_eq!(q.blocks[..2], leader[..], "{policy:?}: shared blocks");
                assert_ne!(q.blocks[2], s.running[0].blocks[2], "{policy:?}: own tail");
                assert_eq!(q.cached_tokens, 8, "{policy:?}");
            }
            assert_eq!(s.prefix_cache_hits, 16, "{policy:?}");
            // The leader's end leaves its shared blocks with the others, counted once.
            s.finish(0);
            let held: std::collections::BTreeSet<_> =
                s.running.iter().flat_map(|q| q.blocks.clone()).collect();
            assert_eq!(s.blocks.num_in_use(), held.len(), "{policy:?}");
            assert!(held.contains(&leader[0]) && held.contains(&leader[1]));
            s.finish(0);
            s.finish(0);
            assert_eq!(s.blocks.num_free(), 32, "{policy:?}: every block is free");
        }
    }

    #[test]
    fn a_request_of_another_group_or_none_computes_its_prompt_whole() {
        let mut s = Scheduler::new(
            small_limits(CapacityPolicy::MaxUtilization),
            BlockManager::new(32, 4, false),
        );
        s.waiting.push_back(member("a", "g"));
        s.waiting.push_back(member("b", "h"));
        s.waiting.push_back(member("c", ""));
        assert_eq!(
            step(&mut s),
            vec![
                ("a".to_owned(), 10usize),
                ("b".to_owned(), 10usize),
                ("c".to_owned(), 10usize)
            ]
        );
    }

    #[test]
    fn a_member_with_another_prompt_shares_only_the_blocks_they_have_in_common() {
        let mut s = Scheduler::new(
            small_limits(CapacityPolicy::MaxUtilization),
            BlockManager::new(32, 4, false),
        );
        s.waiting.push_back(member("a", "g"));
        let mut other = member("b", "g");
        other.tokens[5] = 7;
        s.waiting.push_back(other);
        step(&mut s);
        assert_eq!(
            step(&mut s),
            vec![("a".to_owned(), 1usize), ("b".to_owned(), 6usize)]
        );
        assert_eq!(s.running[1].blocks[0], s.running[0].blocks[0]);
        assert_ne!(s.running[1].blocks[1], s.running[0].blocks[1]);
    }
}
