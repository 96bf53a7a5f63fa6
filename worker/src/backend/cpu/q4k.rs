//! Projections computed on GGUF k-quant super-blocks ([`WeightData::KQuant`]: Q4_K and
//! Q6_K, 256 weights a block), as llama.cpp computes them: each activation row is quantized
//! per 256 values to int8 ([`Q8K`]: one f32 scale `d_x = max|x| / 127` plus the sums of each
//! 16 quantized values), and each output is a sum over blocks of integer dots scaled per
//! sub-block:
//!
//! - Q4_K (`x = d * sc_j * q - dmin * m_j`, 8 sub-blocks of 32, 6-bit `sc_j` and `m_j`):
//!   `d_w d_x sum_j sc_j (q_w . q_x)_j - dmin_w d_x sum_j m_j bsum_j`;
//! - Q6_K (`x = d * sc_s * (q - 32)`, 16 sub-blocks of 16, signed 8-bit `sc_s`):
//!   `d_w d_x sum_s sc_s ((q_w . q_x)_s - 32 bsum_s)`,
//!
//! every integer sum exact in i32. Batch-1 decode reads 144 bytes per 256 weights for Q4_K
//! (0.56 bytes a weight) and 210 for Q6_K (0.82), against 2 for bf16.
//!
//! The block dots run on AVX512-VNNI (Q6_K; Q4_K runs AVX2 there, measured faster) or AVX2
//! ([`QKernel`], kernels in `q4k_simd.rs`) or a portable loop; all give the same integer
//! sums. Where the CPU has AVX512-VNNI, [`linear_kquant`] runs the tiles of `kq_tiles.rs`
//! (each block decoded once for up to 8 input rows). Rows of one matrix may mix the two types
//! (a fused projection of a Q4_K_M file), each row dotted by its own.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::q4k_simd;
use super::q8::{QKernel, blocked_linear};
use crate::model::dequant::f16_at;
use crate::model::dequant::{GgmlType, q6k_quad};
use crate::model::weights::KRows;
use crate::model::{Mat, WeightData};

/// Values per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins, 128 of
/// nibbles.
pub const Q4K_BYTES: usize = 144;
/// Bytes of one Q6_K block: 128 of low nibbles, 64 of high 2-bit pairs, 16 signed scales,
/// f16 `d`.
pub const Q6K_BYTES: usize = 210;

/// One activation row quantized per 256 values (llama.cpp's `block_q8_K`).
pub struct Q8K {
    /// int8 values, `|q| <= 127`.
    pub q: Vec<i8>,
    /// Scales, one per 256 values.
    pub d: Vec<f32>,
    /// Sums of each 16 consecutive `q` (16 per block).
    pub bsums: Vec<i16>,
}

/// Quantizes `x` (a multiple of 256 long) per block of 256.
pub fn quantize_row_q8k(x: &[f32]) -> Q8K {
    let blocks = x.len() / QK_K;
    let mut q = vec![0i8; blocks * QK_K];
    let mut d = Vec::with_capacity(blocks);
    let mut bsums = Vec::with_capacity(blocks * 16);
    for (xb, qb) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        bsums.extend(
            qb.chunks_exact(16)
                .map(|s| s.iter().map(|&v| i16::from(v)).sum::<i16>()),
        );
        d.push(scale);
    }
    Q8K { q, d, bsums }
}

/// The 8 scales and 8 mins of a Q4_K block from its 12 packed bytes: sub-blocks 0..4 hold
/// 6 bits in bytes 0..8; 4..8 take 4 low bits from bytes 8..12 and their 2 high bits from
/// the tops of bytes 0..8. Done four bytes at a time in u32s: the masks keep each byte's
/// own bits after the shifts.
pub(super) fn q4k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc_hi = (c & four) | (((a >> 6) & two) << 4);
    let m_hi = ((c >> 4) & four) | (((b >> 6) & two) << 4);
    let join = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    (join(a & six, sc_hi), join(b & six, m_hi))
}

/// `sum_j m_j * (bsum_{2j} + bsum_{2j+1})`: the activation sums the Q4_K mins multiply.
pub(super) fn q4k_min_sum(m: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..8)
        .map(|j| i32::from(m[j]) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1])))
        .sum()
}

/// `sum_s sc_s * bsum_s`: the activation sums the Q6_K offset of 32 multiplies.
pub(super) fn q6k_offset_sum(sc: &[u8], bsums: &[i16]) -> i32 {
    (0..16)
        .map(|s| i32::from(sc[s] as i8) * i32::from(bsums[s]))
        .sum()
}

/// The Q4_K row `w` (whole blocks) dotted with `x`, portable.
pub fn dot_q4k_portable(w: &[u8], x: &Q8K) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(Q4K_BYTES).enumerate() {
        let (sc, m) = q4k_scales_mins(&blk[4..16]);
        let xq = &x.q[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for i in 0..4 {
            let qs = &blk[16 + 32 * i..16 + 32 * i + 32];
            let (lo, hi) = (&xq[64 * i..64 * i + 32], &xq[64 * i + 32..64 * i + 64]);
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                s1 += i32::from(qs[l] & 0x0f) * i32::from(lo[l]);
                s2 += i32::from(qs[l] >> 4) * i32::from(hi[l]);
            }
            sumi += i32::from(sc[2 * i]) * s1 + i32::from(sc[2 * i + 1]) * s2;
        }
        let summ = q4k_min_sum(&m, &x.bsums[b * 16..b * 16 + 16]);
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32 - f16_at(blk, 2) * x.d[b] * summ as f32;
    }
    acc
}

/// The Q6_K row `w` (whole blocks) dotted with `x`, portable.
pub fn dot_q6k_portable(w: &[u8], x: &Q8K) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(Q6K_BYTES).enumerate() {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let xq = &x.q[b * QK_K..(b + 1) * QK_K];
        let mut sub = [0i32; 16];
        for h in 0..2 {
            let (ql, qh) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
            for l in 0..32 {
                for (k, &qk) in q6k_quad(ql, qh, l).iter().enumerate() {
                    let e = 128 * h + l + 32 * k;
                    sub[e / 16] += i32::from(qk) * i32::from(xq[e]);
                }
            }
        }
        let sumi: i32 = (0..16).map(|s| i32::from(sc[s] as i8) * sub[s]).sum();
        let off = q6k_offset_sum(sc, &x.bsums[b * 16..b * 16 + 16]);
        acc += f16_at(blk, 208) * x.d[b] * (sumi - 32 * off) as f32;
    }
    acc
}

/// The row `w` of type `ty` (Q4_K or Q6_K, whole blocks) dotted with `x` on `kernel`, which
/// must be [`QKernel::supported`] (checked: an unsupported kernel runs the portable loop).
pub fn dot_with(kernel: QKernel, ty: GgmlType, w: &[u8], x: &Q8K) -> f32 {
    let q6 = match ty {
        GgmlType::Q4K => false,
        GgmlType::Q6K => true,
        other => unreachable!("k-quant rows are Q4_K or Q6_K (loader), not {other:?}"),
    };
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(v) = q4k_simd::dot(kernel, q6, w, x) {
            return v;
        }
    }
    let _ = kernel;
    if q6 {
        dot_q6k_portable(w, x)
    } else {
        dot_q4k_portable(w, x)
    }
}

/// `out[t, n] = x_t . w_n` for a k-quant matrix: each input row quantized once to [`Q8K`],
/// outputs split across the pool (`q8::blocked_linear`).
pub fn linear_kquant(x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    let WeightData::KQuant(blocks) = &w.data else {
        unreachable!("linear_kquant is called for k-quant weights only");
    };
    let k = w.cols;
    #[cfg(target_arch = "x86_64")]
    {
        if super::linear::block_tiles(rows) {
            super::kq_tiles::linear(x, rows, blocks, k, &mut out[..rows * w.rows]);
            return;
        }
    }
    let xs: Vec<Q8K> = (0..rows)
        .map(|t| quantize_row_q8k(&x[t * k..(t + 1) * k]))
        .collect();
    let q6 = QKernel::best();
    // Q4_K's VNNI kernel measured slower than its AVX2 one (the bench's kernel table: the
    // per-sub-block `vpmulld` costs what `vpdpbusd` saves), so Q4_K rows run AVX2 there.
    let q4 = if q6 == QKernel::Avx512Vnni {
        QKernel::Avx2
    } else {
        q6
    };
    blocked_linear(rows, w.rows, out, |r, t| {
        let (ty, row) = blocks.row(r, k);
        let kernel = if ty == GgmlType::Q6K { q6 } else { q4 };
        dot_with(kernel, ty, row, &xs[t])
    });
}

/// `m` quantized to `ty` (Q4_K or Q6_K) with a plain scale search (not llama.cpp's
/// iterative one: the exact codes do not matter, the format does). `m.cols` must be a
/// multiple of 256 (checked: the message names the width). For tests and benchmarks.
pub fn quantize_mat(m: &Mat, ty: GgmlType) -> Result<Mat, String> {
    if !m.cols.is_multiple_of(QK_K) {
        return Err(format!(
            "a {}-column matrix does not split into k-quant blocks of {QK_K}",
            m.cols
        ));
    }
    let block: fn(&[f32], &mut Vec<u8>) = match ty {
        GgmlType::Q4K => quantize_block_q4k,
        GgmlType::Q6K => quantize_block_q6k,
        other => {
            return Err(format!(
                "{other:?} is not a k-quant type computed on blocks"
            ));
        }
    };
    let mut row = vec![0.0f32; m.cols];
    let mut bytes = Vec::new();
    for r in 0..m.rows {
        m.row_to_f32(r, &mut row);
        for xb in row.chunks_exact(QK_K) {
            block(xb, &mut bytes);
        }
    }
    Ok(Mat {
        rows: m.rows,
        cols: m.cols,
        data: WeightData::KQuant(KRows {
            runs: vec![(ty, m.rows)],
            bytes,
        }),
    })
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// One Q4_K block of `x` (256 values): per 32, `scale = (max - min) / 15` and `min` (<= 0),
/// then 6-bit codes of both against the block's largest.
fn quantize_block_q4k(x: &[f32], out: &mut Vec<u8>) {
    let (mut scale, mut min) = ([0.0f32; 8], [0.0f32; 8]);
    for (j, s) in x.chunks_exact(32).enumerate() {
        let lo = s.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = s.iter().fold(lo, |a, &v| a.max(v));
        scale[j] = (hi - lo) / 15.0;
        min[j] = -lo;
    }
    let d = f16_round(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = f16_round(min.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let code = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc: [u8; 8] = std::array::from_fn(|j| code(scale[j], d));
    let m: [u8; 8] = std::array::from_fn(|j| code(min[j], dmin));
    out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    out.extend_from_slice(&f16::from_f32(dmin).to_bits().to_le_bytes());
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    out.extend_from_slice(&packed);
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let j = e / 32;
            let step = d * f32::from(sc[j]);
            if step > 0.0 {
                ((v + dmin * f32::from(m[j])) / step)
                    .round()
                    .clamp(0.0, 15.0) as u8
            } else {
                0
            }
        })
        .collect();
    for i in 0..4 {
        out.extend((0..32).map(|l| q[64 * i + l] | (q[64 * i + 32 + l] << 4)));
    }
}

/// One Q6_K block of `x` (256 values): per 16, `scale = max|x| / 31`, as a signed 8-bit
/// code against the block's largest.
fn quantize_block_q6k(x: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|s| {
        x[16 * s..16 * s + 16]
            .iter()
            .fold(0.0f32, |a, v| a.max(v.abs()))
            / 31.0
    });
    let d = f16_round(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 127.0);
    let sc: [i8; 16] = std::array::from_fn(|s| {
        if d > 0.0 {
            (scale[s] / d).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        }
    });
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let step = d * f32::from(sc[e / 16]);
            let c = if step > 0.0 {
                (v / step).round().clamp(-32.0, 31.0)
            } else {
                0.0
            };
            (c as i32 + 32) as u8
        })
        .collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for h in 0..2 {
        for l in 0..32 {
            let v: [u8; 4] = std::array::from_fn(|k| q[128 * h + l + 32 * k]);
            ql[64 * h + l] = (v[0] & 0x0f) | ((v[2] & 0x0f) << 4);
            ql[64 * h + l + 32] = (v[1] & 0x0f) | ((v[3] & 0x0f) << 4);
            qh[32 * h + l] =
                (v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests;
