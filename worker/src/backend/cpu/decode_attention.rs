//! Decode attention (one query row per sequence) over a bf16 KV cache, on AVX-512.
//!
//! Keys and values are read from the paged blocks in place as bf16 and widened in registers
//! (no f32 copy of the cache); arithmetic stays f32 (a widened bf16 element is exact, only the
//! order of the f32 additions differs from the tiled path).
//!
//! At batch 32 the cache read per step (about 60 MB on the bench preset) is larger than the
//! L3, so this kernel is shaped around memory:
//!
//! - A task is one row and all its KV heads (one row and one KV head when there are too few
//!   rows to share among the threads). It reads keys block by block and, inside a block, head
//!   by head: the pool stores a block's heads next to each other, so a task walks its
//!   sequence's K (then V) memory in address order rather than in 4 KiB stretches 16 KiB
//!   apart. Tasks are handed out in runs of consecutive tasks per rayon job.
//! - Each job keeps a software prefetch cursor [`PREFETCH_LINES`] cache lines ahead of the
//!   loads, over everything the job will read in order (K then V of each task, then the next
//!   task's), into L2 (`prefetcht1`): a steady number of misses in flight across block and
//!   task boundaries instead of bursts that overflow the L1 miss buffers.
//! - Scores: 16 keys at a time, each query's partial sums of four keys reduced together by a
//!   transposing add tree (`m1`..`m3`) into one vector of 16 scores, instead of a horizontal
//!   sum per (key, query). Softmax on 16 lanes with the polynomial exp. Values: the weighted sum of each block's rows for up to six queries in
//!   registers, 64 outputs at a time.
//!
//! Widening shifts the even elements of 32 bf16 into one vector and masks the odd ones into
//! another (see [`lane`]); queries are permuted into that order once and the outputs back, so
//! dot products and sums are unaffected.

use std::arch::x86_64::*;

use rayon::prelude::*;

use llmapi_common::model_config::ModelConfig;

use super::kv_store::{Kv, KvStore};
use super::vmath::softmax16;
use crate::backend::SeqChunk;

/// How far the prefetch cursor runs ahead of the loads (128 lines: 8 KiB).
const PREFETCH_LINES: usize = 128;
/// Jobs per thread: each job is a run of consecutive tasks with one prefetch cursor.
const JOBS_PER_THREAD: usize = 2;

/// Whether [`attend`] handles this step: every chunk one row, a bf16 pool, a head size of 64,
/// 128 or 256 and a CPU with avx512f and avx512bw.
pub fn applies(kv: &KvStore, rows: &[(usize, usize)], head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128 | 256)
        && !rows.is_empty()
        && rows.windows(2).all(|w| w[0].0 != w[1].0)
        && kv.bf16_rows(0, Kv::K, 0, 0).is_some()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Lane of element `w` of a 32-element chunk after widening: the even elements fill lanes
/// 0..16 of the first vector, the odd ones the second.
const fn lane(w: usize) -> usize {
    (w % 2) * 16 + w / 2
}

/// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's
/// sequence (`pos - window + 1 ..= pos` on a layer with a sliding window), for steps where
/// [`applies`] holds. Same contract as `attention::attend`.
pub fn attend(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
) {
    // All KV heads of a row per task once there are rows enough for every thread.
    let heads = if rows.len() >= 4 * rayon::current_num_threads() {
        c.num_key_value_heads
    } else {
        1
    };
    attend_tasks(kv, layer, batch, rows, qkv, c, out, heads);
}

/// [`attend`] with `heads` KV heads per task (1 or all of them).
#[allow(clippy::too_many_arguments)]
fn attend_tasks(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
    heads: usize,
) {
    match c.head_dim {
        64 => run::<64>(kv, layer, batch, rows, qkv, c, out, heads),
        128 => run::<128>(kv, layer, batch, rows, qkv, c, out, heads),
        _ => run::<256>(kv, layer, batch, rows, qkv, c, out, heads),
    }
}

/// One task: a row, its first KV head, the positions it attends over and their blocks (an
/// index into the job's list of (K, V) pointers, by block then head). The positions are
/// `len` consecutive ones starting `skip` rows into the first block.
struct Task {
    row: usize,
    head: usize,
    len: usize,
    skip: usize,
    first: usize,
    blocks: usize,
}

/// Rows `start..start + n` of block `b` (counted from a task's first block) that a task of
/// `len` positions starting `skip` rows into its first block attends over.
#[inline(always)]
fn block_rows(b: usize, skip: usize, len: usize, tpb: usize) -> (usize, usize) {
    let start = if b == 0 { skip } else { 0 };
    (start, (skip + len - b * tpb).min(tpb) - start)
}

#[allow(clippy::too_many_arguments)]
fn run<const D: usize>(
    kv: &KvStore,
    layer: usize,
    batch: &[SeqChunk<'_>],
    rows: &[(usize, usize)],
    qkv: &[f32],
    c: &ModelConfig,
    out: &mut [f32],
    heads: usize,
) {
    let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    let group = nq / nkv;
    let qkv_w = (nq + 2 * nkv) * D;
    let tpb = kv.tokens_per_block();
    let scale = 1.0 / (D as f32).sqrt();
    let per_row = nkv / heads;
    let ntask = rows.len() * per_row;
    let per_job = ntask
        .div_ceil(rayon::current_num_threads() * JOBS_PER_THREAD)
        .max(1);
    let tw = heads * group * D;
    let perm: [usize; 32] = std::array::from_fn(lane);
    let window = c.attention_window(layer);
    out[..rows.len() * nq * D]
        .par_chunks_mut(per_job * tw)
        .enumerate()
        .for_each(|(job, outs)| {
            let t0 = job * per_job;
            let mut ptrs: Vec<(*const u16, *const u16)> = Vec::new();
            let mut tasks = Vec::with_capacity(outs.len() / tw);
            let mut maxlen = 0;
            for t in t0..t0 + outs.len() / tw {
                let (row, head) = (t / per_row, t % per_row * heads);
                let (chunk, pos) = rows[row];
                let end = pos + 1;
                let lo = window.map_or(0, |w| end.saturating_sub(w));
                let (fb, nb) = (lo / tpb, end.div_ceil(tpb));
                let first = ptrs.len();
                // The step checked that the table covers every position; blocks before the
                // window's are never touched (they may have been freed).
                for &b in &batch[chunk].block_table[fb..nb] {
                    for g in head..head + heads {
                        let k = kv.bf16_rows(layer, Kv::K, b, g).unwrap_or_default();
                        let v = kv.bf16_rows(layer, Kv::V, b, g).unwrap_or_default();
                        assert!(
                            k.len() >= tpb * D && v.len() >= tpb * D,
                            "decode attention: block {b} is not in the bf16 pool"
                        );
                        ptrs.push((k.as_ptr(), v.as_ptr()));
                    }
                }
                let len = end - lo;
                maxlen = maxlen.max(len);
                tasks.push(Task {
                    row,
                    head,
                    len,
                    skip: lo - fb * tpb,
                    first,
                    blocks: nb - fb,
                });
            }
            let mut cursor = Prefetch::new(&tasks, &ptrs, heads, tpb, D);
            let mut qp = vec![0.0f32; tw];
            let mut op = vec![0.0f32; tw];
            let mut sc = vec![0.0f32; heads * group * maxlen];
            for (t, o) in tasks.iter().zip(outs.chunks_exact_mut(tw)) {
                let at = t.row * qkv_w + t.head * group * D;
                for (dst, src) in qp
                    .chunks_exact_mut(32)
                    .zip(qkv[at..at + tw].chunks_exact(32))
                {
                    for (w, &x) in src.iter().enumerate() {
                        dst[perm[w]] = x;
                    }
                }
                let blocks = &ptrs[t.first..t.first + t.blocks * heads];
                let sc = &mut sc[..heads * group * t.len];
                // SAFETY: avx512f and avx512bw (checked by `applies`); every pointer starts
                // tpb * D readable bf16 (asserted above); skip + len <= blocks * tpb; the
                // scratch slices hold heads * group * D and heads * group * len floats.
                unsafe {
                    task::<D>(
                        blocks,
                        heads,
                        t.len,
                        t.skip,
                        tpb,
                        group,
                        scale,
                        &qp,
                        sc,
                        &mut op,
                        &mut cursor,
                    )
                };
                for (dst, src) in o.chunks_exact_mut(32).zip(op.chunks_exact(32)) {
                    for (w, x) in dst.iter_mut().enumerate() {
                        *x = src[perm[w]];
                    }
                }
            }
        });
}

/// A software prefetch cursor over the stretches of memory a job reads, in the order it
/// reads them.
struct Prefetch {
    /// (start, bytes) of each stretch: one head's used rows of one block.
    spans: Vec<(*const u8, usize)>,
    at: usize,
    off: usize,
}

impl Prefetch {
    /// The cursor over `tasks` (K of every block and head, then V, task by task), already
    /// [`PREFETCH_LINES`] ahead of the first load.
    fn new(
        tasks: &[Task],
        ptrs: &[(*const u16, *const u16)],
        heads: usize,
        tpb: usize,
        d: usize,
    ) -> Self {
        let mut spans = Vec::with_capacity(2 * ptrs.len());
        for t in tasks {
            for kv in 0..2 {
                for b in 0..t.blocks {
                    let (start, n) = block_rows(b, t.skip, t.len, tpb);
                    for h in 0..heads {
                        let (k, v) = ptrs[t.first + b * heads + h];
                        let p =
                            (if kv == 0 { k } else { v } as *const u8).wrapping_add(start * d * 2);
                        spans.push((p, n * d * 2));
                    }
                }
            }
        }
        let mut p = Self {
            spans,
            at: 0,
            off: 0,
        };
        p.ahead(PREFETCH_LINES);
        p
    }

    /// Prefetches the next `lines` cache lines into L2.
    #[inline(always)]
    fn ahead(&mut self, mut lines: usize) {
        while lines > 0 {
            let Some(&(p, bytes)) = self.spans.get(self.at) else {
                return;
            };
            let n = lines.min((bytes - self.off).div_ceil(64));
            for i in 0..n {
                // SAFETY: a prefetch is a hint and never faults; the address is inside the
                // stretch.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(self.off + 64 * i) as *const i8)
                };
            }
            lines -= n;
            self.off += 64 * n;
            if self.off >= bytes {
                self.at += 1;
                self.off = 0;
            }
        }
    }
}

/// Widens 32 bf16 at `p`: even elements into the first vector, odd into the second.
#[inline(always)]
unsafe fn widen(p: *const u16) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 32 readable elements at p and the CPU features.
    unsafe {
        let x = _mm512_loadu_si512(p as *const __m512i);
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)),
            _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(-65536))),
        )
    }
}

/// Partial sums of keys a and b (16 lanes each) into one vector: [a b a b] per 128-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn m1(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
}

/// [a b a b] and [c d c d] into [a b c d] per 128-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn m2(x: __m512, y: __m512) -> __m512 {
    let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    )
}

/// Two vectors whose 128-bit lanes hold partial sums of 4 keys each into one whose lanes
/// hold half as many partial sums of twice as many keys: (a0+a1, a2+a3, b0+b1, b2+b3).
#[inline]
#[target_feature(enable = "avx512f")]
fn m3(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xDD>(a, b),
    )
}

/// Per query, the partial dot products of keys `j0..j0 + 4` (clamped to `n - 1`), as
/// [k0 k1 k2 k3] per 128-bit lane; zero when `j0 >= n`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quad<const NQ: usize, const D: usize>(
    kb: *const u16,
    j0: usize,
    n: usize,
    qp: *const f32,
) -> [__m512; NQ] {
    // SAFETY: the caller guarantees the CPU features, n rows of D bf16 at kb and NQ * D
    // floats at qp.
    unsafe {
        if j0 >= n {
            return [_mm512_setzero_ps(); NQ];
        }
        let key = |j: usize| kb.add((j0 + j).min(n - 1) * D);
        let mut acc = [[_mm512_setzero_ps(); 4]; NQ];
        for c in (0..D).step_by(32) {
            let ks = [
                widen(key(0).add(c)),
                widen(key(1).add(c)),
                widen(key(2).add(c)),
                widen(key(3).add(c)),
            ];
            for (qi, a) in acc.iter_mut().enumerate() {
                let x0 = _mm512_loadu_ps(qp.add(qi * D + c));
                let x1 = _mm512_loadu_ps(qp.add(qi * D + c + 16));
                for (aj, kj) in a.iter_mut().zip(&ks) {
                    *aj = _mm512_fmadd_ps(x1, kj.1, _mm512_fmadd_ps(x0, kj.0, *aj));
                }
            }
        }
        std::array::from_fn(|qi| m2(m1(acc[qi][0], acc[qi][1]), m1(acc[qi][2], acc[qi][3])))
    }
}

/// Scaled scores of NQ queries against the `n` keys of one block: `out[qi * stride + j]`.
///
/// # Safety
/// avx512f and avx512bw; `n` rows of D bf16 at `kb`, NQ * D floats at `qp`, and
/// `out[qi * stride + j]` writable for qi < NQ, j < n.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores<const NQ: usize, const D: usize>(
    kb: *const u16,
    n: usize,
    qp: *const f32,
    scale: f32,
    out: *mut f32,
    stride: usize,
    mut cursor: Option<&mut Prefetch>,
) {
    let sc = _mm512_set1_ps(scale);
    for k0 in (0..n).step_by(16) {
        let m = (n - k0).min(16);
        if let Some(p) = cursor.as_deref_mut() {
            p.ahead(m * D / 32);
        }
        // SAFETY: keys k0 + j < n (clamped inside quad); the caller's bounds.
        unsafe {
            let kb = kb.add(k0 * D);
            let a = quad::<NQ, D>(kb, 0, m, qp);
            let b = quad::<NQ, D>(kb, 4, m, qp);
            let c = quad::<NQ, D>(kb, 8, m, qp);
            let e = quad::<NQ, D>(kb, 12, m, qp);
            let mask = ((1u32 << m) - 1) as __mmask16;
            for qi in 0..NQ {
                let s = m3(m3(a[qi], b[qi]), m3(c[qi], e[qi]));
                _mm512_mask_storeu_ps(out.add(qi * stride + k0), mask, _mm512_mul_ps(s, sc));
            }
        }
    }
}

/// Adds the `n` value rows of one block, weighted by `w[qi * stride + j]`, onto NQ output
/// rows of D floats at `op` (or stores them there when `first`).
///
/// # Safety
/// avx512f and avx512bw; `n` rows of D bf16 at `vb`, the weights readable, NQ * D floats
/// writable at `op`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn values<const NQ: usize, const D: usize>(
    vb: *const u16,
    n: usize,
    w: *const f32,
    stride: usize,
    op: *mut f32,
    first: bool,
    mut cursor: Option<&mut Prefetch>,
) {
    for slab in (0..D).step_by(64) {
        // SAFETY: the caller's bounds; slab + 64 <= D.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; NQ];
            if !first {
                for (qi, a) in acc.iter_mut().enumerate() {
                    for (j, v) in a.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(op.add(qi * D + slab + 16 * j));
                    }
                }
            }
            for s in 0..n {
                if let Some(p) = cursor.as_deref_mut() {
                    p.ahead(2);
                }
                let row = vb.add(s * D + slab);
                let (v0, v1) = widen(row);
                let (v2, v3) = widen(row.add(32));
                for (qi, a) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*w.add(qi * stride + s));
                    a[0] = _mm512_fmadd_ps(x, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(x, v1, a[1]);
                    a[2] = _mm512_fmadd_ps(x, v2, a[2]);
                    a[3] = _mm512_fmadd_ps(x, v3, a[3]);
                }
            }
            for (qi, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(op.add(qi * D + slab + 16 * j), *v);
                }
            }
        }
    }
}

/// One task: `heads` KV heads of one row, `group` queries each, over `len` positions that
/// start `skip` rows into the first block. Leaves the outputs in `op` (query by query, D
/// floats each, in lane order).
///
/// # Safety
/// avx512f and avx512bw; `blocks` holds `heads` (K, V) pointers per block, each to
/// `tpb * D` readable bf16; `skip < tpb`, `skip + len <= blocks.len() / heads * tpb`; `qp`,
/// `op` hold `heads * group * D` floats, `sc` `heads * group * len`.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn task<const D: usize>(
    blocks: &[(*const u16, *const u16)],
    heads: usize,
    len: usize,
    skip: usize,
    tpb: usize,
    group: usize,
    scale: f32,
    qp: &[f32],
    sc: &mut [f32],
    op: &mut [f32],
    cursor: &mut Prefetch,
) {
    let nb = blocks.len() / heads;
    assert!(
        skip < tpb
            && len > 0
            && skip + len <= nb * tpb
            && qp.len() >= heads * group * D
            && op.len() >= heads * group * D
            && sc.len() == heads * group * len,
        "decode attention bounds"
    );
    for b in 0..nb {
        // Score columns col..col + n are the block's rows start..start + n.
        let (start, n) = block_rows(b, skip, len, tpb);
        let col = b * tpb + start - skip;
        for h in 0..heads {
            // SAFETY: start + n <= tpb rows of the block.
            let kb = unsafe { blocks[b * heads + h].0.add(start * D) };
            for q0 in (0..group).step_by(4) {
                let cur = if q0 == 0 { Some(&mut *cursor) } else { None };
                // SAFETY: query h * group + q0 + 3 < heads * group, block columns
                // col + n <= len: inside qp and sc.
                unsafe {
                    let q = qp.as_ptr().add((h * group + q0) * D);
                    let o = sc.as_mut_ptr().add((h * group + q0) * len + col);
                    match group - q0 {
                        1 => scores::<1, D>(kb, n, q, scale, o, len, cur),
                        2 => scores::<2, D>(kb, n, q, scale, o, len, cur),
                        3 => scores::<3, D>(kb, n, q, scale, o, len, cur),
                        _ => scores::<4, D>(kb, n, q, scale, o, len, cur),
                    }
                }
            }
        }
    }
    for row in sc.chunks_exact_mut(len) {
        softmax16(row);
    }
    for b in 0..nb {
        let (start, n) = block_rows(b, skip, len, tpb);
        let col = b * tpb + start - skip;
        for h in 0..heads {
            // SAFETY: as for the keys.
            let vb = unsafe { blocks[b * heads + h].1.add(start * D) };
            for q0 in (0..group).step_by(6) {
                let cur = if q0 == 0 { Some(&mut *cursor) } else { None };
                // SAFETY: as for the scores.
                unsafe {
                    let w = sc.as_ptr().add((h * group + q0) * len + col);
                    let o = op.as_mut_ptr().add((h * group + q0) * D);
                    let first = b == 0;
                    match group - q0 {
                        1 => values::<1, D>(vb, n, w, len, o, first, cur),
                        2 => values::<2, D>(vb, n, w, len, o, first, cur),
                        3 => values::<3, D>(vb, n, w, len, o, first, cur),
                        4 => values::<4, D>(vb, n, w, len, o, first, cur),
                        5 => values::<5, D>(vb, n, w, len, o, first, cur),
                        _ => values::<6, D>(vb, n, w, len, o, first, cur),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::LogitsWanted;
    use crate::engine::KvDtype;

    fn config(nq: usize, nkv: usize, d: usize) -> ModelConfig {
        windowed_config(nq, nkv, d, None)
    }

    /// Two layers, both with a sliding window of `window` positions when it is Some.
    fn windowed_config(nq: usize, nkv: usize, d: usize, window: Option<usize>) -> ModelConfig {
        let window = window.map_or("null".to_string(), |w| w.to_string());
        let json = format!(
            r#"{{"architectures":["MistralForCausalLM"],"hidden_size":{},"head_dim":{d},
            "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":{nq},
            "num_key_value_heads":{nkv},"vocab_size":32,"rms_norm_eps":1e-5,
            "sliding_window":{window}}}"#,
            nq * d
        );
        ModelConfig::from_json_str(&json, std::path::Path::new("test")).unwrap()
    }

    /// Decode rows of several lengths (partial, full and multiple blocks; GQA groups of 1 to
    /// 8 queries, head sizes 64, 128 and 256; blocks of 8, 16 and 32 tokens, tables out of
    /// pool order; no window, and sliding windows starting inside and at the edge of a
    /// block) against the tiled kernel on the same cache, with one KV head per task and
    /// with all of a row's.
    #[test]
    fn decode_rows_match_the_tiled_kernel() {
        for window in [None, Some(1), Some(5), Some(16), Some(21)] {
            decode_rows_match_the_tiled_kernel_with(window);
        }
    }

    fn decode_rows_match_the_tiled_kernel_with(window: Option<usize>) {
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return;
        }
        let shapes = [
            (6, 2, 64, 16),
            (8, 8, 64, 32),
            (8, 1, 128, 16),
            (12, 4, 64, 32),
            (5, 1, 64, 8),
            (16, 2, 256, 16),
            (32, 8, 128, 32),
        ];
        for &(nq, nkv, d, tpb) in &shapes {
            let c = windowed_config(nq, nkv, d, window);
            let lens = [1usize, 3, 16, 17, 40, 4, 33, 70, 8, 9];
            let per_seq = 70usize.div_ceil(tpb);
            let nblocks = lens.len() * per_seq;
            let mut kv = KvStore::new(KvDtype::Bf16, 2, nblocks, nkv, tpb, d).unwrap();
            // Sequence s owns blocks s, s + n, s + 2n, ... of the pool, last first.
            let tables: Vec<Vec<u32>> = (0..lens.len())
                .map(|s| {
                    (0..per_seq)
                        .rev()
                        .map(|i| (i * lens.len() + s) as u32)
                        .collect()
                })
                .collect();
            let val = |i: usize| ((i * 2654435761usize % 1000) as f32 / 250.0 - 2.0) * 0.9;
            for (s, &len) in lens.iter().enumerate() {
                for p in 0..len {
                    for g in 0..nkv {
                        let at =
                            |kvi: usize, e: usize| val(((s * 97 + p) * 31 + g) * 977 + kvi * 7 + e);
                        let k: Vec<f32> = (0..d).map(|e| at(0, e)).collect();
                        let v: Vec<f32> = (0..d).map(|e| at(1, e)).collect();
                        let b = tables[s][p / tpb];
                        kv.write(1, Kv::K, b, p % tpb, g, &k);
                        kv.write(1, Kv::V, b, p % tpb, g, &v);
                    }
                }
            }
            let tokens = [1u32];
            let batch: Vec<SeqChunk<'_>> = lens
                .iter()
                .zip(&tables)
                .map(|(&len, t)| SeqChunk {
                    tokens: &tokens,
                    start_pos: len - 1,
                    block_table: t,
                    logits: LogitsWanted::Last,
                })
                .collect();
            let rows: Vec<(usize, usize)> =
                lens.iter().enumerate().map(|(s, &l)| (s, l - 1)).collect();
            assert!(applies(&kv, &rows, d));
            let qkv_w = (nq + 2 * nkv) * d;
            let qkv: Vec<f32> = (0..rows.len() * qkv_w).map(|i| val(i * 13 + 5)).collect();
            let mut want = vec![0.0f32; rows.len() * nq * d];
            super::super::attention::attend_tiled(&kv, 1, &batch, &rows, &qkv, &c, &mut want);
            for heads in [1, nkv] {
                let mut got = vec![f32::NAN; rows.len() * nq * d];
                attend_tasks(&kv, 1, &batch, &rows, &qkv, &c, &mut got, heads);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "window {window:?} nq {nq} nkv {nkv} d {d} tpb {tpb} heads {heads} at {i}: {g} vs {w}"
                    );
                }
            }
            let mut got = vec![f32::NAN; rows.len() * nq * d];
            attend(&kv, 1, &batch, &rows, &qkv, &c, &mut got);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| (g - w).abs() <= 1e-5 * (1.0 + w.abs()))
            );
        }
    }

    /// A mixed step (decode rows between prefill chunks of several rows): `attend` sends
    /// the one-row chunks through this kernel and the rest through the tiled one, and the
    /// result matches the tiled kernel on the whole step.
    #[test]
    fn mixed_steps_match_the_tiled_kernel() {
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return;
        }
        let (nq, nkv, d, tpb) = (12, 4, 64, 16);
        let c = config(nq, nkv, d);
        // (start position, rows) per chunk: decode, prefill, decode, prefill from 0, decode.
        let chunks = [(40usize, 1usize), (10, 5), (3, 1), (0, 3), (70, 1)];
        let per_seq = 5;
        let mut kv = KvStore::new(KvDtype::Bf16, 1, chunks.len() * per_seq, nkv, tpb, d).unwrap();
        let tables: Vec<Vec<u32>> = (0..chunks.len())
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let val = |i: usize| ((i * 2654435761usize % 1000) as f32 / 250.0 - 2.0) * 0.9;
        for (s, &(start, n)) in chunks.iter().enumerate() {
            for p in 0..start + n {
                for g in 0..nkv {
                    let k: Vec<f32> = (0..d)
                        .map(|e| val((s * 131 + p) * 977 + g * 7 + e))
                        .collect();
                    let v: Vec<f32> = (0..d)
                        .map(|e| val((s * 71 + p) * 911 + g * 5 + e))
                        .collect();
                    kv.write(0, Kv::K, tables[s][p / tpb], p % tpb, g, &k);
                    kv.write(0, Kv::V, tables[s][p / tpb], p % tpb, g, &v);
                }
            }
        }
        let tokens = [1u32; 5];
        let batch: Vec<SeqChunk<'_>> = chunks
            .iter()
            .zip(&tables)
            .map(|(&(start, n), t)| SeqChunk {
                tokens: &tokens[..n],
                start_pos: start,
                block_table: t,
                logits: LogitsWanted::Last,
            })
            .collect();
        let rows: Vec<(usize, usize)> = chunks
            .iter()
            .enumerate()
            .flat_map(|(s, &(start, n))| (start..start + n).map(move |p| (s, p)))
            .collect();
        assert!(!applies(&kv, &rows, d));
        let qkv_w = (nq + 2 * nkv) * d;
        let qkv: Vec<f32> = (0..rows.len() * qkv_w).map(|i| val(i * 17 + 3)).collect();
        let mut want = vec![0.0f32; rows.len() * nq * d];
        super::super::attention::attend_tiled(&kv, 0, &batch, &rows, &qkv, &c, &mut want);
        let mut got = vec![f32::NAN; rows.len() * nq * d];
        assert!(super::super::attention::attend_mixed(
            &kv, 0, &batch, &rows, &qkv, &c, &mut got
        ));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "at {i}: {g} vs {w}"
            );
        }
        let mut again = vec![f32::NAN; rows.len() * nq * d];
        super::super::attention::attend(&kv, 0, &batch, &rows, &qkv, &c, &mut again);
        assert_eq!(got, again);
        // Only prefill chunks, or only decode rows: not a mixed step.
        for keep in [1, 0] {
            let part: Vec<(usize, usize)> = rows.iter().copied().filter(|r| r.0 == keep).collect();
            assert!(!super::super::attention::attend_mixed(
                &kv, 0, &batch, &part, &qkv, &c, &mut again
            ));
        }
    }

    #[test]
    fn multi_row_chunks_and_other_kv_dtypes_take_the_tiled_path() {
        let kv = KvStore::new(KvDtype::Float32, 1, 2, 1, 16, 64).unwrap();
        assert!(!applies(&kv, &[(0, 0), (1, 0)], 64));
        let kv = KvStore::new(KvDtype::Bf16, 1, 2, 1, 16, 64).unwrap();
        assert!(!applies(&kv, &[(0, 0), (0, 1)], 64));
        assert!(!applies(&kv, &[(0, 0)], 96));
        assert!(!applies(&kv, &[(0, 0)], 192));
        assert!(!applies(&kv, &[], 64));
    }

    #[test]
    fn lane_order_is_a_permutation_of_each_chunk() {
        let mut seen: Vec<usize> = (0..32).map(lane).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..32).collect::<Vec<_>>());
        // The widening really puts element w in that lane.
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            let bits: Vec<u16> = (0..32)
                .map(|w| half::bf16::from_f32(w as f32).to_bits())
                .collect();
            let mut got = [0.0f32; 32];
            // SAFETY: features checked; 32 elements read, 32 floats written.
            unsafe {
                let (a, b) = widen(bits.as_ptr());
                _mm512_storeu_ps(got.as_mut_ptr(), a);
                _mm512_storeu_ps(got.as_mut_ptr().add(16), b);
            }
            for w in 0..32 {
                assert_eq!(got[lane(w)], w as f32);
            }
        }
    }
}
