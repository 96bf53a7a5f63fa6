//! Decode attention (one query row per sequence) over a bf16 KV cache, on AVX-512.
//!
//! One task per (row, KV head) writes its `group x head_dim` outputs in place. Keys and values
//! are read from the paged blocks as bf16 and widened in registers (no f32 copy of the
//! cache), the next block is prefetched while the current one is used (each block of one
//! head is a separate 4 KiB stretch the hardware prefetcher does not run into), and the
//! softmax runs on 16 lanes with a polynomial exp. Arithmetic stays f32: a bf16 element
//! widened to f32 is exact, only the order of the f32 additions differs from the tiled path.
//!
//! Widening by interleaving with zero words (`vpunpck[lh]wd`) leaves each 32-element chunk
//! in a fixed lane order; queries are permuted into that order once, and the outputs back,
//! so dot products and sums are unaffected.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use llmapi_common::model_config::ModelConfig;

use super::kv_store::{Kv, KvStore};
use super::vmath::softmax16;
use crate::backend::SeqChunk;

/// Queries per pass over the keys (four keys each: 16 accumulators).
const QC: usize = 4;
/// Queries per pass over the values (four registers each for a 64-wide slab).
const QV: usize = 6;

thread_local! {
    /// Per-thread scratch: permuted queries, scores, permuted outputs.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`attend`] handles this step: every chunk one row, a bf16 pool, a head size that
/// is a multiple of 64 and a CPU with avx512f and avx512bw.
pub fn applies(kv: &KvStore, rows: &[(usize, usize)], head_dim: usize) -> bool {
    head_dim.is_multiple_of(64)
        && !rows.is_empty()
        && rows.windows(2).all(|w| w[0].0 != w[1].0)
        && kv.bf16_rows(0, Kv::K, 0, 0).is_some()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Lane position of element `e` of a head vector after widening (see the module header).
fn lane_of(e: usize) -> usize {
    let (b, w) = (e / 32 * 32, e % 32);
    let (lane, i) = (w / 8, w % 8);
    if i < 4 {
        b + 4 * lane + i
    } else {
        b + 16 + 4 * lane + i - 4
    }
}

/// `out[row, q_head]` = softmax(q k^T / sqrt(d)) v over positions `0..=pos` of the row's
/// sequence, for steps where [`applies`] holds. Same contract as `attention::attend`.
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
    out[..rows.len() * nq * d]
        .par_chunks_mut(group * d)
        .enumerate()
        .for_each(|(t, o)| {
            let (r, g) = (t / nkv, t % nkv);
            let (chunk, pos) = rows[r];
            let table = batch[chunk].block_table;
            let q = &qkv[r * qkv_w + g * group * d..r * qkv_w + (g + 1) * group * d];
            let len = pos + 1;
            let nblocks = len.div_ceil(tpb);
            // Rows that fail here were checked by the step (block table long enough); an
            // empty slice only happens for a pool that is not bf16, excluded by `applies`.
            let blocks: Vec<(&[u16], &[u16])> = table[..nblocks]
                .iter()
                .map(|&b| {
                    let k = kv.bf16_rows(layer, Kv::K, b, g).unwrap_or_default();
                    let v = kv.bf16_rows(layer, Kv::V, b, g).unwrap_or_default();
                    (k, v)
                })
                .collect();
            SCRATCH.with(|cell| {
                let mut s = cell.borrow_mut();
                let need = 2 * group * d + group * len;
                if s.len() < need {
                    s.resize(need, 0.0);
                }
                let (qp, rest) = s.split_at_mut(group * d);
                let (op, scores) = rest.split_at_mut(group * d);
                for (i, &v) in q.iter().enumerate() {
                    qp[i / d * d + lane_of(i % d)] = v;
                }
                // SAFETY: `applies` checked avx512f and avx512bw; every block slice holds
                // tpb * d elements, len <= nblocks * tpb, d is a multiple of 64, and the
                // scratch slices hold group * d and group * len floats.
                unsafe {
                    head(
                        &blocks,
                        len,
                        tpb,
                        d,
                        group,
                        scale,
                        qp,
                        &mut scores[..group * len],
                        op,
                    )
                };
                for (i, v) in o.iter_mut().enumerate() {
                    *v = op[i / d * d + lane_of(i % d)];
                }
            });
        });
}

/// Widens 32 bf16 at `p` into two vectors in the module's lane order.
#[inline(always)]
unsafe fn widen32(p: *const u16) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 32 readable elements at p and the CPU features.
    unsafe {
        let x = _mm512_loadu_si512(p as *const __m512i);
        let z = _mm512_setzero_si512();
        (
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, x)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, x)),
        )
    }
}

/// Sums of four vectors, as four lanes.
#[inline(always)]
unsafe fn sum4(a: [__m512; 4]) -> __m128 {
    // SAFETY: register-only arithmetic; the caller guarantees the CPU features.
    unsafe {
        let f0 = fold(a[0]);
        let f1 = fold(a[1]);
        let f2 = fold(a[2]);
        let f3 = fold(a[3]);
        let h = _mm256_hadd_ps(_mm256_hadd_ps(f0, f1), _mm256_hadd_ps(f2, f3));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }
}

/// The upper 256 bits added onto the lower ones.
#[inline(always)]
unsafe fn fold(v: __m512) -> __m256 {
    // SAFETY: register-only arithmetic; the caller guarantees the CPU features.
    unsafe {
        _mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
        )
    }
}

/// Prefetches `elems` bf16 elements at `p` into L1, one line at a time.
#[inline(always)]
fn prefetch(p: *const u16, elems: usize) {
    let mut off = 0;
    while off < elems {
        // SAFETY: prefetching is a hint and never faults; the address stays inside the block.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
        off += 32;
    }
}

/// One (row, KV head): scores, softmax and the weighted values of `group` queries.
///
/// # Safety
/// avx512f and avx512bw; every block slice holds `tpb * d` bf16, `len <= blocks.len() * tpb`,
/// `d % 64 == 0`, `qp` and `op` hold `group * d` and `scores` `group * len` floats.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn head(
    blocks: &[(&[u16], &[u16])],
    len: usize,
    tpb: usize,
    d: usize,
    group: usize,
    scale: f32,
    qp: &[f32],
    scores: &mut [f32],
    op: &mut [f32],
) {
    assert!(
        d.is_multiple_of(64)
            && len <= blocks.len() * tpb
            && qp.len() >= group * d
            && op.len() >= group * d
            && scores.len() >= group * len
            && blocks
                .iter()
                .all(|(k, v)| k.len() >= tpb * d && v.len() >= tpb * d),
        "decode attention bounds"
    );
    // Scores: four keys by up to QC queries at a time.
    for (bi, (kb, vb)) in blocks.iter().enumerate() {
        if let Some((next, _)) = blocks.get(bi + 1) {
            prefetch(next.as_ptr(), tpb * d);
        }
        prefetch(vb.as_ptr(), tpb * d);
        let n = (len - bi * tpb).min(tpb);
        for s0 in (0..n).step_by(4) {
            let key = |j: usize| kb.as_ptr().wrapping_add((s0 + j).min(n - 1) * d);
            for q0 in (0..group).step_by(QC) {
                let nq = (group - q0).min(QC);
                let mut acc = [[_mm512_setzero_ps(); 4]; QC];
                for c in (0..d).step_by(32) {
                    // SAFETY: keys s0 + j are clamped below n <= tpb, c + 32 <= d.
                    let ks = unsafe {
                        [
                            widen32(key(0).add(c)),
                            widen32(key(1).add(c)),
                            widen32(key(2).add(c)),
                            widen32(key(3).add(c)),
                        ]
                    };
                    for (qi, a) in acc.iter_mut().enumerate().take(nq) {
                        // SAFETY: query q0 + qi < group, c + 32 <= d, inside qp.
                        let (x0, x1) = unsafe {
                            let p = qp.as_ptr().add((q0 + qi) * d + c);
                            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                        };
                        for (aj, kj) in a.iter_mut().zip(&ks) {
                            *aj = _mm512_fmadd_ps(x1, kj.1, _mm512_fmadd_ps(x0, kj.0, *aj));
                        }
                    }
                }
                for (qi, a) in acc.iter().enumerate().take(nq) {
                    let mut four = [0.0f32; 4];
                    // SAFETY: four has room for 4 floats.
                    unsafe { _mm_storeu_ps(four.as_mut_ptr(), sum4(*a)) };
                    let base = (q0 + qi) * len + bi * tpb + s0;
                    for (j, v) in four.iter().enumerate().take(n - s0) {
                        scores[base + j] = v * scale;
                    }
                }
            }
        }
    }
    for qi in 0..group {
        softmax16(&mut scores[qi * len..(qi + 1) * len]);
    }
    // Values: 64-wide slabs of the output in registers, up to QV queries at a time.
    for slab in (0..d).step_by(64) {
        for q0 in (0..group).step_by(QV) {
            let nq = (group - q0).min(QV);
            let mut acc = [[_mm512_setzero_ps(); 4]; QV];
            for (bi, (_, vb)) in blocks.iter().enumerate() {
                let n = (len - bi * tpb).min(tpb);
                for s in 0..n {
                    // SAFETY: s < n <= tpb and slab + 64 <= d: inside the block.
                    let (v0, v1, v2, v3) = unsafe {
                        let p = vb.as_ptr().add(s * d + slab);
                        let (a, b) = widen32(p);
                        let (c, e) = widen32(p.add(32));
                        (a, b, c, e)
                    };
                    for (qi, a) in acc.iter_mut().enumerate().take(nq) {
                        let w = _mm512_set1_ps(scores[(q0 + qi) * len + bi * tpb + s]);
                        a[0] = _mm512_fmadd_ps(w, v0, a[0]);
                        a[1] = _mm512_fmadd_ps(w, v1, a[1]);
                        a[2] = _mm512_fmadd_ps(w, v2, a[2]);
                        a[3] = _mm512_fmadd_ps(w, v3, a[3]);
                    }
                }
            }
            for (qi, a) in acc.iter().enumerate().take(nq) {
                for (j, v) in a.iter().enumerate() {
                    // SAFETY: (q0 + qi) * d + slab + 16 j + 16 <= group * d.
                    unsafe {
                        _mm512_storeu_ps(op.as_mut_ptr().add((q0 + qi) * d + slab + 16 * j), *v)
                    };
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
        let json = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":{},"head_dim":{d},
            "intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":{nq},
            "num_key_value_heads":{nkv},"vocab_size":32,"rms_norm_eps":1e-5}}"#,
            nq * d
        );
        ModelConfig::from_json_str(&json, std::path::Path::new("test")).unwrap()
    }

    /// Decode rows of several lengths (partial, full and multiple blocks; GQA groups of 1 to
    /// 8 queries, head sizes 64 and 128) against the tiled kernel on the same cache.
    #[test]
    fn decode_rows_match_the_tiled_kernel() {
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return;
        }
        let tpb = 16;
        for &(nq, nkv, d) in &[(6, 2, 64), (8, 8, 64), (8, 1, 128), (12, 4, 64), (5, 1, 64)] {
            let c = config(nq, nkv, d);
            let lens = [1usize, 3, 16, 17, 40, 4];
            let per_seq = 3;
            let mut kv = KvStore::new(KvDtype::Bf16, 1, lens.len() * per_seq, nkv, tpb, d);
            let tables: Vec<Vec<u32>> = (0..lens.len())
                .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
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
                        kv.write(0, Kv::K, b, p % tpb, g, &k);
                        kv.write(0, Kv::V, b, p % tpb, g, &v);
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
            let mut got = vec![f32::NAN; rows.len() * nq * d];
            attend(&kv, 0, &batch, &rows, &qkv, &c, &mut got);
            let mut want = vec![0.0f32; rows.len() * nq * d];
            super::super::attention::attend_tiled(&kv, 0, &batch, &rows, &qkv, &c, &mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "nq {nq} nkv {nkv} d {d} at {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn multi_row_chunks_and_other_kv_dtypes_take_the_tiled_path() {
        let kv = KvStore::new(KvDtype::Float32, 1, 2, 1, 16, 64);
        assert!(!applies(&kv, &[(0, 0), (1, 0)], 64));
        let kv = KvStore::new(KvDtype::Bf16, 1, 2, 1, 16, 64);
        assert!(!applies(&kv, &[(0, 0), (0, 1)], 64));
        assert!(!applies(&kv, &[(0, 0)], 96));
    }

    #[test]
    fn lane_order_is_a_permutation_of_each_chunk() {
        let mut seen: Vec<usize> = (0..64).map(lane_of).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
    }
}
