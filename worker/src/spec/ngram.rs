//! NGram drafts (prompt lookup), TensorRT-LLM's `decoding_type: NGram`.
//!
//! The last `size` tokens of a sequence (size from `max_matching_ngram_size` down to 1) are
//! looked up first in the sequence itself, then, with `is_public_pool`, in the pool of
//! finished requests; what followed the match is the draft. A summarise or edit request,
//! whose output copies its prompt, gets long accepted drafts; free text gets few. The
//! sequence's own tokens are scanned at each step instead of kept in a per-request pool: the
//! scan costs microseconds beside a forward pass, and it always sees the newest tokens.

use std::collections::HashMap;

/// Patterns the public pool holds before it starts over: bounds its memory (a pattern of two
/// tokens with a few continuations of four takes about a hundred bytes).
const MAX_PUBLIC_PATTERNS: usize = 200_000;
/// Continuations kept per pattern with `is_keep_all`.
const MAX_CONTINUATIONS: usize = 4;

/// `speculative_config` NGram settings (plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramSettings {
    /// Most drafts per step.
    pub max_draft_len: usize,
    /// Longest suffix looked up.
    pub max_matching_ngram_size: usize,
    /// Keep every continuation of a pattern in the public pool, not only one.
    pub is_keep_all: bool,
    /// Propose the oldest match (else the newest).
    pub is_use_oldest: bool,
    /// Share finished requests' n-grams with every request.
    pub is_public_pool: bool,
}

/// Proposes drafts for sequences; holds the public pool.
#[derive(Debug)]
pub struct NgramProposer {
    settings: NgramSettings,
    /// Pattern -> continuations (oldest first), from finished requests.
    public: HashMap<Vec<u32>, Vec<Vec<u32>>>,
}

impl NgramProposer {
    /// A proposer with an empty pool.
    pub fn new(settings: NgramSettings) -> Self {
        Self {
            settings,
            public: HashMap::new(),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> NgramSettings {
        self.settings
    }

    /// At most `limit` draft tokens to follow `tokens` (empty: no match).
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.settings.max_draft_len);
        let len = tokens.len();
        if limit == 0 || len < 2 {
            return Vec::new();
        }
        let largest = self.settings.max_matching_ngram_size.min(len - 1);
        for size in (1..=largest).rev() {
            let pattern = &tokens[len - size..];
            if let Some(at) = self.find_own(tokens, pattern) {
                return tokens[at..len.min(at + limit)].to_vec();
            }
            if let Some(c) = self.find_public(pattern) {
                return c[..c.len().min(limit)].to_vec();
            }
        }
        Vec::new()
    }

    /// Where the continuation of an earlier occurrence of `pattern` (the suffix of
    /// `tokens`) starts: the oldest or the newest occurrence that has one.
    fn find_own(&self, tokens: &[u32], pattern: &[u32]) -> Option<usize> {
        let size = pattern.len();
        // Occurrences ending before the last token: each has at least one token after it.
        let ends = size..tokens.len();
        let hit = |&end: &usize| &tokens[end - size..end] == pattern;
        if self.settings.is_use_oldest {
            ends.into_iter().find(hit)
        } else {
            ends.into_iter().rev().find(hit)
        }
    }

    fn find_public(&self, pattern: &[u32]) -> Option<&Vec<u32>> {
        if !self.settings.is_public_pool {
            return None;
        }
        let all = self.public.get(pattern)?;
        if self.settings.is_use_oldest {
            all.first()
        } else {
            all.last()
        }
    }

    /// Adds a finished request's tokens to the public pool (nothing without
    /// `is_public_pool`). Past `MAX_PUBLIC_PATTERNS` the pool starts over.
    pub fn record(&mut self, tokens: &[u32]) {
        let s = self.settings;
        if !s.is_public_pool || s.max_draft_len == 0 {
            return;
        }
        if self.public.len() > MAX_PUBLIC_PATTERNS {
            self.public.clear();
        }
        for size in 1..=s.max_matching_ngram_size {
            for end in size..tokens.len() {
                let pattern = &tokens[end - size..end];
                let cont = &tokens[end..tokens.len().min(end + s.max_draft_len)];
                let all = self.public.entry(pattern.to_vec()).or_default();
                if all.iter().any(|c| c.as_slice() == cont) {
                    continue;
                }
                if !s.is_keep_all {
                    // One continuation per pattern: the first seen, or the latest.
                    if all.is_empty() || !s.is_use_oldest {
                        *all = vec![cont.to_vec()];
                    }
                } else if all.len() < MAX_CONTINUATIONS {
                    all.push(cont.to_vec());
                } else if !s.is_use_oldest {
                    all.remove(0);
                    all.push(cont.to_vec());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> NgramSettings {
        NgramSettings {
            max_draft_len: 4,
            max_matching_ngram_size: 2,
            is_keep_all: true,
            is_use_oldest: true,
            is_public_pool: true,
        }
    }

    #[test]
    fn the_longest_matching_suffix_proposes_what_followed_it() {
        let p = NgramProposer::new(settings());
        // "... 5 6" occurred before, followed by 7 8 9 1.
        let tokens = [1, 5, 6, 7, 8, 9, 1, 2, 6, 3, 5, 6];
        assert_eq!(p.propose(&tokens, 8), vec![7, 8, 9, 1]);
        assert_eq!(p.propose(&tokens, 2), vec![7, 8], "capped by the limit");
        // Only the one-token suffix 6 matches: its oldest occurrence is followed by 7.
        let tokens = [1, 5, 6, 7, 8, 2, 6];
        assert_eq!(p.propose(&tokens, 4), vec![7, 8, 2, 6]);
        assert!(p.propose(&[1, 2, 3], 4).is_empty(), "no earlier occurrence");
    }

    #[test]
    fn use_oldest_false_proposes_the_newest_match() {
        let p = NgramProposer::new(NgramSettings {
            is_use_oldest: false,
            ..settings()
        });
        let tokens = [4, 1, 9, 4, 1, 8, 4, 1];
        assert_eq!(p.propose(&tokens, 4), vec![8, 4, 1]);
    }

    #[test]
    fn the_public_pool_proposes_continuations_of_finished_requests() {
        let mut p = NgramProposer::new(settings());
        p.record(&[10, 11, 12, 13, 14]);
        assert_eq!(p.propose(&[3, 10, 11], 4), vec![12, 13, 14]);
        let private = NgramProposer::new(NgramSettings {
            is_public_pool: false,
            ..settings()
        });
        assert!(private.propose(&[3, 10, 11], 4).is_empty());
    }
}
