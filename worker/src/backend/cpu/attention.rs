//! Causal attention over the paged KV cache, read block by block in place.
//!
//! One task per (sequence chunk, KV head, tile of up to `ROW_TILE` consecutive query rows):
//! each K/V block is read (and dequantized) once per task and used by every query of the
//! tile and every query head sharing that KV head (GQA/MQA). Scores come from the
//! register-blocked micro-kernel, four queries by four keys at a time. Decode rows over a
//! bf16 cache take the faster path of `decode_attention.rs` on AVX-512 CPUs: the whole step
//! when every chunk is one row, and the one-row chunks of a mixed step (prefill chunks and
//! decode rows together).
//!
//! A layer with a sliding window (`ModelConfig::attention_window`) attends from position `pos`
//! over `pos - window + 1 ..= pos` only, as transformers' masks do; blocks wholly before the
//! window are never read, so the block table may hold freed (stale) ids there.

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

/// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's sequence
/// (`pos - window + 1 ..= pos` on a layer with a sliding window).
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
    // ... and from lo[i] on; the tile's first row (lowest position) has the lowest.
    let window = c.attention_window(layer);
    let lo: Vec<usize> = lim
        .iter()
        .map(|&l| window.map_or(0, |w| l.saturating_sub(w)))
        .collect();
    let first_block = lo[0] / tpb;
    let mut scores = vec![f32::NEG_INFINITY; nqt * len];
    let mut buf = vec![0.0f32; tpb * d];
    let nblocks = len.div_ceil(tpb);
    for (bi, &blk) in table.iter().enumerate().take(nblocks).skip(first_block) {
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
                        if p < lim[i + x] && p >= lo[i + x] {
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
        super::kernels::softmax(&mut scores[i * len + lo[i]..i * len + lim[i]]);
        // Positions before the window weigh nothing in the sums below.
        scores[i * len..i * len + lo[i]].fill(0.0);
    }
    let mut o = vec![0.0f32; nqt * d];
    let mut tile = vec![0.0f32; XR * d];
    for (bi, &blk) in table.iter().enumerate().take(nblocks).skip(first_block) {
        let n = (len - bi * tpb).min(tpb);
        kv.read(layer, Kv::V, blk, t.g, n, &mut buf);
        if tpb > 64 {
            for i in 0..nqt {
                let upto = lim[i].saturating_sub(bi * tpb).min(n);
                let from = lo[i].saturating_sub(bi * tpb).min(upto);
                let dst = &mut o[i * d..(i + 1) * d];
                for s in from..upto {
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::LogitsWanted;
    use crate::engine::KvDtype;

    /// Two layers, both windowed over `window` positions when it is Some.
    fn config(window: Option<usize>) -> ModelConfig {
        let window = window.map_or("null".to_string(), |w| w.to_string());
        let json = format!(
            r#"{{"architectures":["MistralForCausalLM"],"hidden_size":64,"head_dim":16,
            "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":32,"rms_norm_eps":1e-5,
            "sliding_window":{window}}}"#
        );
        ModelConfig::from_json_str(&json, std::path::Path::new("test")).unwrap()
    }

    fn val(i: usize) -> f32 {
        ((i * 2654435761usize % 1000) as f32 / 250.0 - 2.0) * 0.9
    }

    /// softmax(q k^T / sqrt(d)) v over `lo..=pos`, written out plainly.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        lo: usize,
        pos: usize,
    ) -> Vec<f32> {
        let d = q.len();
        let s: Vec<f32> = (lo..=pos)
            .map(|j| q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
            .collect();
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut out = vec![0.0f32; d];
        for (w, j) in e.iter().zip(lo..=pos) {
            for (o, v) in out.iter_mut().zip(&values[j]) {
                *o += w / sum * v;
            }
        }
        out
    }

    /// A prefill chunk of 30 rows (two query tiles) at positions 10..40 and a decode row at
    /// 47, windowed: each row attends over its last `window` positions only, and the blocks
    /// wholly before the first row's window are never read (their table entries are ids
    /// outside the pool, as after the scheduler freed them).
    #[test]
    fn windowed_rows_attend_over_their_window_and_never_read_blocks_before_it() {
        let (nq, nkv, d) = (4usize, 2usize, 16usize);
        // Blocks of 4 (many blocks, some before the window) and of 128 (the value sums of
        // blocks over 64 rows take another path).
        for (tpb, window) in [4usize, 128]
            .into_iter()
            .flat_map(|t| [None, Some(1), Some(7), Some(16), Some(64)].map(|w| (t, w)))
        {
            let per_seq = 48usize.div_ceil(tpb) as u32;
            let c = config(window);
            let ends = [40usize, 48];
            let nblocks = 2 * per_seq as usize;
            let mut kv = KvStore::new(KvDtype::Float32, 2, nblocks, nkv, tpb, d).unwrap();
            let mut keys = vec![vec![vec![Vec::new(); 48]; nkv]; 2];
            let mut values = keys.clone();
            let tables: Vec<Vec<u32>> = (0..2u32)
                .map(|s| (0..per_seq).map(|i| s * per_seq + i).collect())
                .collect();
            for (s, &end) in ends.iter().enumerate() {
                for p in 0..end {
                    for g in 0..nkv {
                        let k: Vec<f32> = (0..d)
                            .map(|e| val(((s * 53 + p) * 7 + g) * 31 + e))
                            .collect();
                        let v: Vec<f32> = (0..d)
                            .map(|e| val(((s * 59 + p) * 5 + g) * 37 + e + 3))
                            .collect();
                        kv.write(1, Kv::K, tables[s][p / tpb], p % tpb, g, &k);
                        kv.write(1, Kv::V, tables[s][p / tpb], p % tpb, g, &v);
                        keys[s][g][p] = k;
                        values[s][g][p] = v;
                    }
                }
            }
            let lo = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
            // Freed blocks: wholly before the window of each chunk's first row.
            let first_rows = [10usize, 47];
            let freed: Vec<Vec<u32>> = tables
                .iter()
                .zip(first_rows)
                .map(|(t, first)| {
                    t.iter()
                        .enumerate()
                        .map(|(b, &id)| {
                            if (b + 1) * tpb <= lo(first) {
                                u32::MAX - b as u32
                            } else {
                                id
                            }
                        })
                        .collect()
                })
                .collect();
            let tokens = [1u32; 30];
            let batch = [
                SeqChunk {
                    tokens: &tokens,
                    start_pos: 10,
                    block_table: &freed[0],
                    logits: LogitsWanted::All,
                },
                SeqChunk {
                    tokens: &tokens[..1],
                    start_pos: 47,
                    block_table: &freed[1],
                    logits: LogitsWanted::Last,
                },
            ];
            let rows: Vec<(usize, usize)> = (10..40).map(|p| (0, p)).chain([(1, 47)]).collect();
            let qkv_w = (nq + 2 * nkv) * d;
            let qkv: Vec<f32> = (0..rows.len() * qkv_w).map(|i| val(i * 13 + 5)).collect();
            let mut got = vec![f32::NAN; rows.len() * nq * d];
            attend(&kv, 1, &batch, &rows, &qkv, &c, &mut got);
            for (r, &(s, pos)) in rows.iter().enumerate() {
                for h in 0..nq {
                    let g = h / (nq / nkv);
                    let q = &qkv[r * qkv_w + h * d..r * qkv_w + (h + 1) * d];
                    let want = reference(q, &keys[s][g], &values[s][g], lo(pos), pos);
                    let at = (r * nq + h) * d;
                    for (e, (a, b)) in got[at..at + d].iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "tpb {tpb} window {window:?} row {pos} head {h} [{e}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
