//! Q4_K and Q6_K projections on AVX512-VNNI in tiles: each weight block is decoded once
//! (codes, scales, min or offset terms) into registers and dotted with up to 8 input rows,
//! so a batched decode step reads and decodes the weights once instead of once per row.
//!
//! Per block of 256 weights and input row: `vpmaddubsw` multiplies 64 unsigned codes (Q4_K
//! 0..15, Q6_K 0..63) by 64 int8 activations into i16 pairs (at most 2 * 63 * 127: exact),
//! `vpdpwssd` multiplies the pairs by their sub-block's scale (i16) and adds them into i32
//! lanes; four such vectors give the block's `sum_j sc_j (q_w . q_x)_j`, scaled once by
//! `d_w d_x`. The term that depends on the activations' sums (Q4_K's `dmin m_j bsum_j`,
//! Q6_K's `32 d sc_s bsum_s`) is one f32 multiply-add of 16 weight-side lanes with the
//! row's `d_x bsum_s` ([`KAct::bsf`]). The integer sums equal the portable loops' in
//! `q4k.rs`; only the f32 summation order differs.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::q4k::{Q4K_BYTES, Q6K_BYTES, Q8K, QK_K, q4k_scales_mins, quantize_row_q8k};
use super::q4k_simd::f16c_at;
use super::q8_tiles::clear_high_zmm;
use crate::model::dequant::GgmlType;
use crate::model::weights::KRows;

/// One input row prepared for the tiles.
pub struct KAct {
    /// int8 codes, 256 a block, in order.
    q: Vec<i8>,
    /// `d_x` per block.
    d: Vec<f32>,
    /// `d_x * bsum_s` per 16 values (16 a block).
    bsf: Vec<f32>,
}

impl KAct {
    /// The tile layout of one quantized row.
    pub fn new(x: Q8K) -> KAct {
        let bsf = x
            .bsums
            .iter()
            .enumerate()
            .map(|(s, &v)| x.d[s / 16] * f32::from(v))
            .collect();
        KAct {
            q: x.q,
            d: x.d,
            bsf,
        }
    }
}

/// `out[t * n + r] = x_t . w_r` for the k-quant rows `w` (n rows of `k` values; each row
/// Q4_K or Q6_K) and `rows` input rows of `x`. The caller checks `q8::tiles_supported`.
pub fn linear(x: &[f32], rows: usize, w: &KRows, k: usize, out: &mut [f32]) {
    let n = out.len().checked_div(rows).unwrap_or(0);
    let blocks = k / QK_K;
    if n == 0 || blocks == 0 {
        return;
    }
    // One row is quantized in place; a batch's rows in parallel.
    let act = |t: usize| KAct::new(quantize_row_q8k(&x[t * k..(t + 1) * k]));
    let acts: Vec<KAct> = if rows == 1 {
        vec![act(0)]
    } else {
        (0..rows).into_par_iter().map(act).collect()
    };
    let acts: Vec<&KAct> = acts.iter().collect();
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 8)).max(16);
    if rows == 1 {
        out[..n]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, o)| {
                for (j, o) in o.iter_mut().enumerate() {
                    let (ty, row) = w.row(c * chunk + j, k);
                    tile_into(ty, row, &acts, blocks, std::slice::from_mut(o), 0);
                }
                // SAFETY: the caller checked `q8::tiles_supported()` (AVX-512 F among them).
                unsafe { clear_high_zmm() };
            });
        return;
    }
    super::linear::by_column_parts(rows, n, chunk, out, |n0, n1, part| {
        let width = n1 - n0;
        for r in n0..n1 {
            let (ty, row) = w.row(r, k);
            for (t, xr) in super::linear::input_row_tiles(rows) {
                let dst = &mut part[t * width + r - n0..];
                tile_into(ty, row, &acts[t..t + xr], blocks, dst, width);
            }
        }
        // SAFETY: the caller checked `q8::tiles_supported()` (AVX-512 F among them).
        unsafe { clear_high_zmm() };
    });
}

/// The dots of the weight row `row` (type `ty`) with the input rows `acts` (1, 2, 4 or 8),
/// written to `out[u * stride]` for input row u.
fn tile_into(
    ty: GgmlType,
    row: &[u8],
    acts: &[&KAct],
    blocks: usize,
    out: &mut [f32],
    stride: usize,
) {
    macro_rules! run {
        ($x:literal) => {{
            let xs: [&KAct; $x] = std::array::from_fn(|t| acts[t]);
            // SAFETY: `linear`'s callers check `q8::tiles_supported()`; lengths
            // are checked inside.
            let sums = unsafe {
                match ty {
                    GgmlType::Q6K => tile::<true, $x>(row, xs, blocks),
                    _ => tile::<false, $x>(row, xs, blocks),
                }
            };
            for (u, &v) in sums.iter().enumerate() {
                out[u * stride] = v;
            }
        }};
    }
    match acts.len() {
        8 => run!(8),
        4 => run!(4),
        2 => run!(2),
        _ => run!(1),
    }
}

/// One weight block in registers: the codes of values `64v..64v + 64` in `codes[v]`, the
/// i16 scale of each code pair in `scales[v]`, `d_w`, and the 16 lanes that multiply the
/// activations' `d_x bsum_s` (subtracted).
struct Block {
    codes: [__m512i; 4],
    scales: [__m512i; 4],
    d: f32,
    off: __m512,
}

/// i16 lane indexes of a permute that gives lane `l` the value `first + l / per`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn spread16(first: usize, per: usize) -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|l| (first + l / per) as i16);
    // SAFETY: idx is 64 bytes; the load is unaligned.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// Decodes one Q4_K block (`Q4K_BYTES` of `blk`).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k_block(blk: &[u8]) -> Block {
    assert!(blk.len() >= Q4K_BYTES);
    let (sc, m) = q4k_scales_mins(&blk[4..16]);
    let m4 = _mm512_set1_epi8(0x0f);
    // Values 64i..64i + 32 are the low nibbles of bytes 16 + 32i.., the next 32 the high
    // ones: the 32 bytes in both halves, shifted by 0 and 4.
    let shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    let codes = std::array::from_fn(|i| {
        // SAFETY: bytes 16 + 32i..48 + 32i lie within the block (asserted).
        let g = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * i).cast()) };
        let g = _mm512_broadcast_i64x4(g);
        _mm512_and_si512(_mm512_srlv_epi16(g, shifts), m4)
    });
    let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(sc))));
    let scales = std::array::from_fn(|i| _mm512_permutexvar_epi16(spread16(2 * i, 16), sc16));
    // Lane s takes m_{s / 2}: each 32-value min covers two 16-value activation sums.
    let pairs: [u8; 16] = std::array::from_fn(|s| (s / 2) as u8);
    // SAFETY: pairs is 16 bytes; the load is unaligned.
    let pairs = unsafe { _mm_loadu_si128(pairs.as_ptr().cast()) };
    let m = _mm_shuffle_epi8(_mm_cvtsi64_si128(i64::from_le_bytes(m)), pairs);
    let mins = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m));
    Block {
        codes,
        scales,
        d: f16c_at(blk, 0),
        off: _mm512_mul_ps(mins, _mm512_set1_ps(f16c_at(blk, 2))),
    }
}

/// Decodes one Q6_K block (`Q6K_BYTES` of `blk`).
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k_block(blk: &[u8]) -> Block {
    assert!(blk.len() >= Q6K_BYTES);
    let (m4, m3) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(3));
    let mut codes = [_mm512_setzero_si512(); 4];
    for h in 0..2 {
        // SAFETY: ql bytes 64h..64h + 64 and qh bytes 128 + 32h..160 + 32h lie within the
        // block (asserted).
        let (ql, qh) = unsafe {
            (
                _mm512_loadu_si512(blk.as_ptr().add(64 * h).cast()),
                _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h).cast()),
            )
        };
        // Lanes 0..32 take qh's bits 0..2 (values 128h..+32) and, after the shift by 4,
        // bits 4..6 (values +64..+96); lanes 32..64 bits 2..4 and 6..8. The masks drop what
        // the 16-bit shifts carry across bytes.
        let qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
        let h01 = _mm512_slli_epi16(_mm512_and_si512(qh, m3), 4);
        let h23 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 4), m3), 4);
        codes[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), h01);
        codes[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), h23);
    }
    // SAFETY: the 16 scale bytes 192..208 lie within the block (asserted).
    let scb = unsafe { _mm_loadu_si128(blk.as_ptr().add(192).cast()) };
    let sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(scb));
    let scales = std::array::from_fn(|v| _mm512_permutexvar_epi16(spread16(4 * v, 8), sc16));
    let d = f16c_at(blk, 208);
    let off = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scb)),
        _mm512_set1_ps(32.0 * d),
    );
    Block {
        codes,
        scales,
        d,
        off,
    }
}

/// `[t] = w . x_t` for one Q6_K (`Q6`) or Q4_K weight row and XR prepared input rows.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and F16C.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const Q6: bool, const XR: usize>(
    row: &[u8],
    xs: [&KAct; XR],
    blocks: usize,
) -> [f32; XR] {
    let bytes = if Q6 { Q6K_BYTES } else { Q4K_BYTES };
    assert!(row.len() >= blocks * bytes);
    for x in &xs {
        assert!(x.q.len() >= blocks * QK_K && x.d.len() >= blocks && x.bsf.len() >= blocks * 16);
    }
    let mut acc = [_mm512_setzero_ps(); XR];
    for b in 0..blocks {
        let blk = &row[b * bytes..(b + 1) * bytes];
        let w = if Q6 { q6k_block(blk) } else { q4k_block(blk) };
        for (t, x) in xs.iter().enumerate() {
            let mut s = _mm512_setzero_si512();
            for v in 0..4 {
                // SAFETY: values 256b + 64v..+64 lie within x.q (asserted).
                let xv = unsafe { _mm512_loadu_si512(x.q.as_ptr().add(b * QK_K + 64 * v).cast()) };
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(w.codes[v], xv), w.scales[v]);
            }
            // SAFETY: the 16 sums of block b lie within x.bsf (asserted).
            let bsf = unsafe { _mm512_loadu_ps(x.bsf.as_ptr().add(16 * b)) };
            let scale = _mm512_set1_ps(w.d * x.d[b]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);
            acc[t] = _mm512_fnmadd_ps(w.off, bsf, acc[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::q4k::{dot_q4k_portable, dot_q6k_portable, quantize_mat};
    use crate::backend::cpu::q8::tests::lcg;
    use crate::model::{Mat, WeightData};

    /// The tiles against the portable block dots on the same quantized rows, for Q4_K, Q6_K
    /// and a matrix mixing both (a Q4_K_M fused projection), widths of 1 to 3 blocks, 1 to
    /// 13 input rows (ragged against the 8/4/2/1 tiles): the integer sums are the same, so
    /// they differ by f32 summation order only (asserted 1e-5 of `sum |w x|` + 1e-5).
    #[test]
    fn tiles_match_the_portable_block_dots() {
        if !crate::backend::cpu::q8::tiles_supported() {
            eprintln!("skipped: this CPU lacks AVX512-VNNI");
            return;
        }
        let mut seed = 9;
        for (blocks, rows, n) in [(1, 1, 3), (3, 13, 5), (2, 5, 4), (3, 1, 6)] {
            let k = blocks * QK_K;
            let src = Mat {
                rows: n,
                cols: k,
                data: WeightData::F32((0..n * k).map(|_| lcg(&mut seed)).collect()),
            };
            let q4 = quantize_mat(&src, GgmlType::Q4K).unwrap();
            let q6 = quantize_mat(&src, GgmlType::Q6K).unwrap();
            let (WeightData::KQuant(a), WeightData::KQuant(b)) = (&q4.data, &q6.data) else {
                unreachable!()
            };
            let half = n / 2;
            let row4 = Q4K_BYTES * blocks;
            let mixed = KRows {
                runs: vec![(GgmlType::Q4K, half), (GgmlType::Q6K, n - half)],
                bytes: [
                    &a.bytes[..half * row4],
                    &b.bytes[half * Q6K_BYTES * blocks..],
                ]
                .concat(),
            };
            let x: Vec<f32> = (0..rows * k).map(|_| 2.0 * lcg(&mut seed)).collect();
            for w in [a, b, &mixed] {
                let mut got = vec![0.0f32; rows * n];
                linear(&x, rows, w, k, &mut got);
                for t in 0..rows {
                    let xq = quantize_row_q8k(&x[t * k..(t + 1) * k]);
                    let mut wf = vec![0.0f32; k];
                    for r in 0..n {
                        let (ty, row) = w.row(r, k);
                        let want = match ty {
                            GgmlType::Q6K => dot_q6k_portable(row, &xq),
                            _ => dot_q4k_portable(row, &xq),
                        };
                        let m = Mat {
                            rows: 1,
                            cols: k,
                            data: WeightData::KQuant(KRows {
                                runs: vec![(ty, 1)],
                                bytes: row.to_vec(),
                            }),
                        };
                        m.row_to_f32(0, &mut wf);
                        let mag: f32 = wf
                            .iter()
                            .zip(&x[t * k..(t + 1) * k])
                            .map(|(a, b)| (a * b).abs())
                            .sum();
                        let v = got[t * n + r];
                        assert!(
                            (v - want).abs() <= 1e-5 * mag + 1e-5,
                            "{ty:?} blocks {blocks} rows {rows} t {t} r {r}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
