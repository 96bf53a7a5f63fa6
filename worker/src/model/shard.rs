//! Which slice of the model one tensor-parallel rank holds.
//!
//! Attention heads, the MLP's inner width and the vocabulary are split evenly over `tp_size`
//! ranks; MoE experts are split over `ep_size` ranks and each expert's inner width over the
//! `tp_size / ep_size` ranks that share those experts. KV heads are split like the query heads,
//! or, when there are fewer KV heads than ranks (and tp_size is a multiple of them), each rank
//! keeps the one KV head its query heads use. Sizes that do not divide are refused by `check`.

use std::ops::Range;

use llmapi_common::model_config::ModelConfig;

use crate::engine::EngineError;

/// One rank's place in a tensor/expert-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..tp_size`.
    pub tp_rank: usize,
    /// Ranks the dense layers are split over.
    pub tp_size: usize,
    /// Ranks the experts are split over; divides `tp_size`.
    pub ep_size: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::whole()
    }
}

/// The `i`-th of `parts` equal slices of `0..n` (callers check that `parts` divides `n`).
fn part(n: usize, parts: usize, i: usize) -> Range<usize> {
    let len = n / parts;
    i * len..(i + 1) * len
}

impl Shard {
    /// The whole model on one rank.
    pub fn whole() -> Self {
        Self {
            tp_rank: 0,
            tp_size: 1,
            ep_size: 1,
        }
    }

    /// Rank `tp_rank` of `tp_size`, experts over `ep_size` ranks.
    pub fn new(tp_rank: usize, tp_size: usize, ep_size: usize) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidConfig(m));
        if tp_size == 0 || tp_rank >= tp_size {
            return bad(format!("rank {tp_rank} is outside a group of {tp_size}"));
        }
        if ep_size == 0 || !tp_size.is_multiple_of(ep_size) {
            return bad(format!(
                "ep_size {ep_size} must divide tp_size {tp_size} (each expert's FFN is split over tp_size / ep_size ranks)"
            ));
        }
        Ok(Self {
            tp_rank,
            tp_size,
            ep_size,
        })
    }

    /// Whether this is the whole model.
    pub fn is_whole(&self) -> bool {
        self.tp_size == 1
    }

    /// Refuses a model whose sizes this split cannot divide, naming every such size.
    pub fn check(&self, c: &ModelConfig) -> Result<(), EngineError> {
        let tp = self.tp_size;
        if tp == 1 {
            return Ok(());
        }
        let mut bad = Vec::new();
        let nkv = c.num_key_value_heads;
        if nkv < tp && (nkv == 0 || !tp.is_multiple_of(nkv)) {
            bad.push(format!(
                "num_key_value_heads {nkv} neither divides nor is divisible by tp_size {tp}"
            ));
        }
        let mut need = |what: &str, n: usize, by: usize, by_name: &str| {
            if by == 0 || !n.is_multiple_of(by) {
                bad.push(format!("{what} {n} is not divisible by {by_name} {by}"));
            }
        };
        need("num_attention_heads", c.num_attention_heads, tp, "tp_size");
        if nkv >= tp {
            need("num_key_value_heads", nkv, tp, "tp_size");
        }
        need("vocab_size", c.vocab_size, tp, "tp_size");
        let any_dense = (0..c.num_hidden_layers).any(|i| c.moe.is_none() || !c.is_sparse_layer(i));
        if any_dense {
            need("intermediate_size", c.intermediate_size, tp, "tp_size");
        }
        if let Some(m) = &c.moe {
            need("num_experts", m.num_experts, self.ep_size, "ep_size");
            let moe_tp = self.moe_tp_size();
            need(
                "moe_intermediate_size",
                m.moe_intermediate_size,
                moe_tp,
                "tp_size / ep_size",
            );
            if let Some(si) = m.shared_expert_intermediate_size {
                need("shared_expert_intermediate_size", si, tp, "tp_size");
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(EngineError::InvalidConfig(format!(
                "the model cannot be split over {tp} tensor-parallel ranks (ep_size {}): {}; choose a tp_size that divides these sizes",
                self.ep_size,
                bad.join(", ")
            )))
        }
    }

    /// Query heads of this rank.
    pub fn q_heads(&self, c: &ModelConfig) -> Range<usize> {
        part(c.num_attention_heads, self.tp_size, self.tp_rank)
    }

    /// KV heads of this rank (one shared head when there are fewer KV heads than ranks).
    pub fn kv_heads(&self, c: &ModelConfig) -> Range<usize> {
        let nkv = c.num_key_value_heads;
        if nkv >= self.tp_size {
            part(nkv, self.tp_size, self.tp_rank)
        } else {
            let group = c.num_attention_heads / nkv.max(1);
            let g = self.q_heads(c).start / group.max(1);
            g..g + 1
        }
    }

    /// Vocabulary rows of the embedding and lm_head on this rank.
    pub fn vocab(&self, c: &ModelConfig) -> Range<usize> {
        part(c.vocab_size, self.tp_size, self.tp_rank)
    }

    /// Inner columns of a dense FFN (or shared expert) of width `inter` on this rank.
    pub fn inner(&self, inter: usize) -> Range<usize> {
        part(inter, self.tp_size, self.tp_rank)
    }

    /// Ranks each expert's FFN is split over.
    pub fn moe_tp_size(&self) -> usize {
        self.tp_size / self.ep_size.max(1)
    }

    /// Experts held by this rank.
    pub fn experts(&self, num_experts: usize) -> Range<usize> {
        part(num_experts, self.ep_size, self.tp_rank / self.moe_tp_size())
    }

    /// Inner columns of each local expert of width `inter` on this rank.
    pub fn expert_inner(&self, inter: usize) -> Range<usize> {
        let moe_tp = self.moe_tp_size();
        part(inter, moe_tp, self.tp_rank % moe_tp)
    }

    /// The config as this rank sees it: local query/KV heads and dense inner width. Hidden
    /// size and vocabulary stay whole (the vocabulary split is handled by the caller).
    pub fn local_config(&self, c: &ModelConfig) -> ModelConfig {
        let mut l = c.clone();
        l.num_attention_heads = self.q_heads(c).len();
        l.num_key_value_heads = self.kv_heads(c).len();
        if self.tp_size > 1 && c.intermediate_size.is_multiple_of(self.tp_size) {
            l.intermediate_size = c.intermediate_size / self.tp_size;
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nq: usize, nkv: usize, inter: usize, vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":{vocab},
            "hidden_size":64,"intermediate_size":{inter},"num_hidden_layers":1,
            "num_attention_heads":{nq},"num_key_value_heads":{nkv},"max_position_embeddings":64,
            "head_dim":16,"rms_norm_eps":1e-5}}"#
        );
        ModelConfig::from_json_str(&json, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn heads_vocab_and_inner_width_are_split_evenly() {
        let c = config(8, 4, 128, 256);
        let s = Shard::new(1, 2, 2).unwrap();
        s.check(&c).unwrap();
        assert_eq!(s.q_heads(&c), 4..8);
        assert_eq!(s.kv_heads(&c), 2..4);
        assert_eq!(s.vocab(&c), 128..256);
        assert_eq!(s.inner(128), 64..128);
    }

    #[test]
    fn fewer_kv_heads_than_ranks_keeps_the_shared_head() {
        let c = config(4, 2, 128, 256);
        let heads: Vec<_> = (0..4)
            .map(|r| Shard::new(r, 4, 4).unwrap().kv_heads(&c))
            .collect();
        assert_eq!(heads, vec![0..1, 0..1, 1..2, 1..2]);
        Shard::new(0, 4, 4).unwrap().check(&c).unwrap();
    }

    #[test]
    fn experts_go_to_ep_ranks_and_each_expert_splits_over_the_rest() {
        let s = |r| Shard::new(r, 4, 2).unwrap();
        assert_eq!(s(0).experts(8), 0..4);
        assert_eq!(s(1).experts(8), 0..4);
        assert_eq!(s(2).experts(8), 4..8);
        assert_eq!(s(1).expert_inner(32), 16..32);
        assert_eq!(s(2).expert_inner(32), 0..16);
    }

    #[test]
    fn sizes_that_do_not_divide_are_named() {
        let c = config(6, 3, 90, 250);
        let e = Shard::new(0, 4, 4)
            .unwrap()
            .check(&c)
            .unwrap_err()
            .to_string();
        for what in [
            "num_attention_heads 6",
            "num_key_value_heads 3",
            "vocab_size 250",
            "intermediate_size 90",
        ] {
            assert!(e.contains(what), "{e}");
        }
        assert!(Shard::new(0, 4, 3).is_err());
        assert!(Shard::new(2, 2, 1).is_err());
    }
}
