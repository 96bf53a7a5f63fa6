//! Causal attention over the paged KV cache, read block by block in place.
//!
//! One task per (sequence chunk, KV head, tile of up to `ROW_TILE` consecutive query rows):
//! each K/V block is read (and dequantized) once per task and used by every query of the
//! tile and every query head sharing that KV head (GQA/MQA). Scores come from the
//! register-blocked micro-kernel, four queries by four keys at a time. Decode rows over a
//! bf16 cache take the faster path of `decode_attention.rs` on AVX-512 CPUs: the whole step
//! when every chunk is one row, and the one-row chunks of a mixed step (prefill chunks and
//! decode rows together).

use rayon::prelude::*;

use llmapi_common::model_config::ModelConfig;

use super::kv_store::{Kv, KvStore};
use super::linear::axpy;
use super::microkernel::{WR, XR, block, weighted_sum};
use crate::backend::SeqChunk;

/// Query rows per task.
const ROW_TILE: usize = 16;

struct Task {
    /// First row (index into the step's rows) and row count.
    r0: usize,
    nr: usize,
    g: usize,
}

/// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's sequence.
///
/// `rows[r] = (chunk, pos)` with each chunk's rows consecutive and in position order; `qkv`
/// holds `[q; k; v]` per row with q already rotated.
pub fn attend(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::decode_attention::applies(kv, rows, c.head_dim) {
            super::decode_attention::attend(kv, layer, batch, rows, qkv, c, out);
            return;
        }
        if attend_mixed(kv, layer, batch, rows, qkv, c, out) {
            return;
        }
    }
    attend_tiled(kv, layer, batch, rows, qkv, c, out);
}

/// A step with both one-row chunks (decode) and longer ones (prefill chunks), as inflight
/// batching makes them: the one-row chunks through the decode kernel, the others tiled, each
/// on a gathered copy of its rows' qkv. False (nothing written) when the decode kernel does
/// not apply or the step is not mixed.
#[cfg(target_arch = "x86_64")]
pub(super) fn attend_mixed(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
) -> bool {
    let alone = |r: usize| {
        (r == 0 || rows[r - 1].0 != rows[r].0) && rows.get(r + 1).is_none_or(|n| n.0 != rows[r].0)
    };
    let (single, multi): (Vec<usize>, Vec<usize>) = (0..rows.len()).partition(|&r| alone(r));
    let single_rows: Vec<(usize, usize)> = single.iter().map(|&r| rows[r]).collect();
    if multi.is_empty() || !super::decode_attention::applies(kv, &single_rows, c.head_dim) {
        return false;
    }
    let (nq, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let (qkv_w, out_w) = ((nq + 2 * nkv) * d, nq * d);
    let gather = |idx: &[usize]| -> Vec<f32> {
        idx.iter()
            .flat_map(|&r| &qkv[r * qkv_w..(r + 1) * qkv_w])
            .copied()
            .collect()
    };
    let mut part = vec![0.0f32; single.len() * out_w];
    super::decode_attention::attend(
        kv,
        layer,
        batch,
        &single_rows,
        &gather(&single),
        c,
        &mut part,
    );
    for (&r, o) in single.iter().zip(part.chunks_exact(out_w)) {
        out[r * out_w..(r + 1) * out_w].copy_from_slice(o);
    }
    let multi_rows: Vec<(usize, usize)> = multi.iter().map(|&r| rows[r]).collect();
    let mut part = vec![0.0f32; multi.len() * out_w];
    attend_tiled(kv, layer, batch, &multi_rows, &gather(&multi), c, &mut part);
    for (&r, o) in multi.iter().zip(part.chunks_exact(out_w)) {
        out[r * out_w..(r + 1) * out_w].copy_from_slice(o);
    }
    true
}

/// [`attend`] by tiles of query rows, for every KV dtype and step shape.
pub fn attend_tiled(
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
    let mut tasks = Vec::new();
    let mut r = 0;
    while r < rows.len() {
        let chunk = rows[r].0;
        let mut end = r;
        while end < rows.len() && rows[end].0 == chunk && end - r < ROW_TILE {
            end += 1;
        }
        for g in 0..nkv {
            tasks.push(Task {
                r0: r,
                nr: end - r,
                g,
            });
        }
        r = end;
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| attend_tile(kv, layer, batch, rows, qkv, c, t))
        .collect();
    for (t, res) in tasks.iter().zip(results) {
        for i in 0..t.nr {
            let dst = (t.r0 + i) * nq * d + t.g * group * d;
            out[dst..dst + group * d].copy_from_slice(&res[i * group * d..(i + 1) * group * d]);
        }
    }
}

/// Output of one task: `nr x group x d`.
fn attend_tile(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    t: &Task,
) -> Vec<f32> {
    let (nq, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let group = nq / nkv;
    let qkv_w = (nq + 2 * nkv) * d;
    let tpb = kv.tokens_per_block();
    let scale = 1.0 / (d as f32).sqrt();
    let table = batch[rows[t.r0].0].block_table;
    let len = rows[t.r0 + t.nr - 1].1 + 1;
    // Queries of the tile: row-major (row, head in group); query i sees positions 0..lim[i].
    let nqt = t.nr * group;
    let queries: Vec<&[f32]> = (0..nqt)
        .map(|i| {
            let (row, qh) = (t.r0 + i / group, t.g * group + i % group);
            &qkv[row * qkv_w + qh * d..row * qkv_w + (qh + 1) * d]
        })
        .collect();
    let lim: Vec<usize> = (0..nqt).map(|i| rows[t.r0 + i / group].1 + 1).collect();
    let mut scores = vec![f32::NEG_INFINITY; nqt * len];
    let mut buf = vec![0.0f32; tpb * d];
    let nblocks = len.div_ceil(tpb);
    for (bi, &blk) in table.iter().enumerate().take(nblocks) {
        let n = (len - bi * tpb).min(tpb);
        kv.read(layer, Kv::K, blk, t.g, n, &mut buf);
        let mut s = 0;
        while s < n {
            let ns = (n - s).min(WR);
            let ws: [&[f32]; WR] = std::array::from_fn(|j| {
                let sj = s + j.min(ns - 1);
                &buf[sj * d..(sj + 1) * d]
            });
            let mut i = 0;
            while i < nqt {
                let ni = (nqt - i).min(XR);
                let xs: [&[f32]; XR] = std::array::from_fn(|x| queries[i + x.min(ni - 1)]);
                let acc = block(&xs, &ws, d);
                for (x, row) in acc.iter().enumerate().take(ni) {
                    for (j, &v) in row.iter().enumerate().take(ns) {
                        let p = bi * tpb + s + j;
                        if p < lim[i + x] {
                            scores[(i + x) * len + p] = v * scale;
                        }
                    }
                }
                i += ni;
            }
            s += ns;
        }
    }
    for i in 0..nqt {
        super::kernels::softmax(&mut scores[i * len..i * len + lim[i]]);
    }
    let mut o = vec![0.0f32; nqt * d];
    let mut tile = vec![0.0f32; XR * d];
    for (bi, &blk) in table.iter().enumerate().take(nblocks) {
        let n = (len - bi * tpb).min(tpb);
        kv.read(layer, Kv::V, blk, t.g, n, &mut buf);
        if tpb > 64 {
            for i in 0..nqt {
                let upto = lim[i].saturating_sub(bi * tpb).min(n);
                let dst = &mut o[i * d..(i + 1) * d];
                for s in 0..upto {
                    axpy(
                        scores[i * len + bi * tpb + s],
                        &buf[s * d..(s + 1) * d],
                        dst,
                    );
                }
            }
            continue;
        }
        // Four queries at a time keep their output rows in registers over the block's values;
        // a last group of fewer (decode with a GQA group of 3, say) is padded with zero
        // weights into a scratch tile.
        for i in (0..nqt).step_by(XR) {
            let ni = (nqt - i).min(XR);
            let mut p = [[0.0f32; 64]; XR];
            for (x, px) in p.iter_mut().enumerate().take(ni) {
                let upto = lim[i + x].saturating_sub(bi * tpb).min(n);
                let from = (i + x) * len + bi * tpb;
                px[..upto].copy_from_slice(&scores[from..from + upto]);
            }
            if ni == XR {
                weighted_sum(&p, &buf, n, d, &mut o[i * d..(i + XR) * d]);
            } else {
                tile.fill(0.0);
                tile[..ni * d].copy_from_slice(&o[i * d..(i + ni) * d]);
                weighted_sum(&p, &buf, n, d, &mut tile);
                o[i * d..(i + ni) * d].copy_from_slice(&tile[..ni * d]);
            }
        }
    }
    o
}
