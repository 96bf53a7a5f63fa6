//! Causal attention over the paged KV cache, read block by block in place.
//!
//! One task per (row, KV head): the query heads sharing that KV head (GQA/MQA) are scored
//! together so each K/V block is read once per task.

use rayon::prelude::*;

use llmapi_common::model_config::ModelConfig;

use super::kv_store::{Kv, KvStore};
use crate::backend::SeqChunk;

/// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's sequence.
///
/// `rows[r] = (chunk, pos)`; `qkv` holds `[q; k; v]` per row with q already rotated.
pub fn attend(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
) {
    let (nq, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let group = nq / nkv;
    let qkv_w = (nq + 2 * nkv) * d;
    let tpb = kv.tokens_per_block();
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(group * d)
        .enumerate()
        .for_each(|(task, o)| {
            let (r, g) = (task / nkv, task % nkv);
            let (chunk, pos) = rows[r];
            let table = batch[chunk].block_table;
            let q = &qkv[r * qkv_w + g * group * d..r * qkv_w + (g + 1) * group * d];
            let len = pos + 1;
            let mut scores = vec![0.0f32; group * len];
            let mut buf = vec![0.0f32; tpb * d];
            for (bi, &block) in table.iter().enumerate().take(len.div_ceil(tpb)) {
                let n = (len - bi * tpb).min(tpb);
                kv.read(layer, Kv::K, block, g, n, &mut buf);
                for s in 0..n {
                    let k = &buf[s * d..(s + 1) * d];
                    for qh in 0..group {
                        let qv = &q[qh * d..(qh + 1) * d];
                        scores[qh * len + bi * tpb + s] =
                            qv.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    }
                }
            }
            for qh in 0..group {
                super::kernels::softmax(&mut scores[qh * len..(qh + 1) * len]);
            }
            o.iter_mut().for_each(|v| *v = 0.0);
            for (bi, &block) in table.iter().enumerate().take(len.div_ceil(tpb)) {
                let n = (len - bi * tpb).min(tpb);
                kv.read(layer, Kv::V, block, g, n, &mut buf);
                for s in 0..n {
                    let v = &buf[s * d..(s + 1) * d];
                    for qh in 0..group {
                        let p = scores[qh * len + bi * tpb + s];
                        o[qh * d..(qh + 1) * d]
                            .iter_mut()
                            .zip(v)
                            .for_each(|(acc, x)| *acc += p * x);
                    }
                }
            }
        });
}
