//! Projections computed on Q8_0 blocks ([`WeightData::Q8_0`]), as llama.cpp computes them:
//! each activation row is quantized per 32-element block to int8 with its own f32 scale
//! (`d = max|x| / 127`, `q = round(x / d)`), and each output is
//! `sum over blocks of d_w * d_x * (q_w . q_x)` with the integer dot exact in i32.
//!
//! Batch-1 decode reads 34 bytes per 32 weights (1.06 bytes a weight, against 2 for bf16).
//! The block dot runs on AVX512-VNNI where the CPU has it (`vpdpbusd`: |q_w| as unsigned
//! bytes times the sign-moved q_x, two blocks a register), else AVX2 (`vpmaddubsw` on the
//! same operands, then `vpmaddwd`), else a portable loop; all give the same i32 sums.
//! Where the CPU has AVX512-VNNI, [`linear_q8`] runs the tiles of `q8_tiles.rs` instead
//! (several weight and input rows per pass; the same i32 sums).
//! [`QKernel`] and the parallel driver [`blocked_linear`] are shared with the k-quants
//! (`q4k.rs`).

use half::f16;
use rayon::prelude::*;

use crate::model::{Mat, WeightData};

/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;

/// One activation row quantized per block: `q` (k values) and one scale per block.
pub struct QuantRow {
    /// int8 values.
    pub q: Vec<i8>,
    /// Scales, one per 32 values.
    pub d: Vec<f32>,
}

/// Quantizes `x` (a multiple of 32 long) per block, llama.cpp's `quantize_row_q8_0`.
pub fn quantize_row(x: &[f32]) -> QuantRow {
    let mut q = vec![0i8; x.len()];
    let mut d = Vec::with_capacity(x.len() / QK8_0);
    for (xb, qb) in x.chunks_exact(QK8_0).zip(q.chunks_exact_mut(QK8_0)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
        // llama.cpp keeps the activation scale as f16; so do we, for the same products.
        d.push(f16::from_f32(scale).to_f32());
    }
    QuantRow { q, d }
}

/// `m` quantized to Q8_0 as llama.cpp's `quantize_row_q8_0` does (per 32 values of a row:
/// `d = max|w| / 127` kept as f16, `q = round(w / d)`). `m.cols` must be a multiple of 32
/// (checked: the message names the width). For tests and benchmarks of the Q8_0 path.
pub fn quantize_mat(m: &Mat) -> Result<Mat, String> {
    if !m.cols.is_multiple_of(QK8_0) {
        return Err(format!(
            "a {}-column matrix does not split into Q8_0 blocks of {QK8_0}",
            m.cols
        ));
    }
    let mut row = vec![0.0f32; m.cols];
    let (mut q, mut d) = (Vec::with_capacity(m.rows * m.cols), Vec::new());
    for r in 0..m.rows {
        m.row_to_f32(r, &mut row);
        let qr = quantize_row(&row);
        q.extend_from_slice(&qr.q);
        d.extend(qr.d.iter().map(|&v| f16::from_f32(v).to_bits()));
    }
    Ok(Mat {
        rows: m.rows,
        cols: m.cols,
        data: WeightData::Q8_0 { q, d },
    })
}

/// The integer dot kernels of the block formats (Q8_0 here, Q4_K and Q6_K in `q4k.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKernel {
    /// Plain Rust loops; every host.
    Portable,
    /// AVX2 + FMA + F16C: `vpmaddubsw` / `vpmaddwd`.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI: `vpdpbusd`.
    Avx512Vnni,
}

impl QKernel {
    /// Every kernel, fastest last.
    pub const ALL: [QKernel; 3] = [QKernel::Portable, QKernel::Avx2, QKernel::Avx512Vnni];

    /// Whether this CPU runs the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                QKernel::Portable => true,
                QKernel::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                QKernel::Avx512Vnni => {
                    has!("avx2")
                        && has!("fma")
                        && has!("f16c")
                        && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == QKernel::Portable
        }
    }

    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> QKernel {
        static BEST: std::sync::OnceLock<QKernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            QKernel::ALL
                .into_iter()
                .rev()
                .find(|k| k.supported())
                .unwrap_or(QKernel::Portable)
        })
    }
}

/// Whether this CPU runs the AVX512-VNNI tiles of Q8_0 and k-quant products (`q8_tiles.rs`,
/// `kq_tiles.rs`).
pub fn tiles_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        QKernel::best() == QKernel::Avx512Vnni && super::q8_tiles::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `sum_b dw[b] * dx[b] * (qw_b . qx_b)` over the blocks of one weight row.
pub fn dot_row(qw: &[i8], dw: &[u16], x: &QuantRow) -> f32 {
    dot_row_with(QKernel::best(), qw, dw, x)
}

/// [`dot_row`] on `kernel`, which must be [`QKernel::supported`] (checked: an unsupported
/// kernel runs the portable loop).
pub fn dot_row_with(kernel: QKernel, qw: &[i8], dw: &[u16], x: &QuantRow) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        match kernel {
            // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI and AVX2 (checked); lengths are checked
            // inside.
            QKernel::Avx512Vnni if kernel.supported() => {
                return unsafe { avx512::dot_row(qw, dw, x) };
            }
            // SAFETY: the CPU has AVX2 and FMA (checked); lengths are checked inside.
            QKernel::Avx2 if kernel.supported() => return unsafe { avx2::dot_row(qw, dw, x) },
            _ => {}
        }
    }
    let _ = kernel;
    dot_row_portable(qw, dw, x)
}

/// The portable block dot (also the reference of the AVX2 one in tests).
pub fn dot_row_portable(qw: &[i8], dw: &[u16], x: &QuantRow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (wb, xb)) in qw
        .chunks_exact(QK8_0)
        .zip(x.q.chunks_exact(QK8_0))
        .enumerate()
    {
        let s: i32 = wb
            .iter()
            .zip(xb)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        acc += f16::from_bits(dw[b]).to_f32() * x.d[b] * s as f32;
    }
    acc
}

/// `out[t, n] = x_t . w_n` for a Q8_0 matrix: each input row quantized once, outputs split
/// across the pool ([`blocked_linear`]).
pub fn linear_q8(x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    let WeightData::Q8_0 { q, d } = &w.data else {
        unreachable!("linear_q8 is called for Q8_0 weights only");
    };
    let (k, n) = (w.cols, w.rows);
    #[cfg(target_arch = "x86_64")]
    {
        if super::linear::block_tiles(rows) {
            super::q8_tiles::linear(x, rows, (q, d), k, &mut out[..rows * n]);
            return;
        }
    }
    let xs: Vec<QuantRow> = (0..rows)
        .map(|t| quantize_row(&x[t * k..(t + 1) * k]))
        .collect();
    let blocks = k / QK8_0;
    let kernel = QKernel::best();
    blocked_linear(rows, n, out, |r, t| {
        dot_row_with(
            kernel,
            &q[r * k..(r + 1) * k],
            &d[r * blocks..(r + 1) * blocks],
            &xs[t],
        )
    });
}

/// `out[t * n + r] = dot(r, t)` for every weight row `r < n` and input row `t < rows`, the
/// weight rows split across the pool in contiguous runs. One input row (decode): each task
/// writes its run in place. More: each weight row (hot in L1) meets every input row in turn.
pub fn blocked_linear<F>(rows: usize, n: usize, out: &mut [f32], dot: F)
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    if rows == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 8)).max(16);
    if rows == 1 {
        out[..n]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, o)| {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = dot(c * chunk + j, 0);
                }
            });
        return;
    }
    super::linear::by_column_parts(rows, n, chunk, out, |n0, n1, part| {
        let width = n1 - n0;
        for r in n0..n1 {
            for t in 0..rows {
                part[t * width + r - n0] = dot(r, t);
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QK8_0, QuantRow};

    /// The block dot on AVX2: `vpsignb` moves the weight's sign onto the activation so that
    /// `vpmaddubsw` (unsigned x signed bytes) can multiply |q_w| by ±q_x into i16 pairs
    /// (at most 2 * 127 * 128 in magnitude: no saturation), `vpmaddwd` sums them into i32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(qw: &[i8], dw: &[u16], x: &QuantRow) -> f32 {
        let blocks = qw.len() / QK8_0;
        assert!(x.q.len() >= blocks * QK8_0 && dw.len() >= blocks && x.d.len() >= blocks);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (b, (&dwb, &dxb)) in dw.iter().zip(&x.d).enumerate().take(blocks) {
            // SAFETY: block b lies within qw and x.q (asserted above); loads are unaligned.
            let (w, v) = unsafe {
                (
                    _mm256_loadu_si256(qw.as_ptr().add(b * QK8_0).cast()),
                    _mm256_loadu_si256(x.q.as_ptr().add(b * QK8_0).cast()),
                )
            };
            let aw = _mm256_sign_epi8(w, w);
            let sv = _mm256_sign_epi8(v, w);
            let pairs = _mm256_maddubs_epi16(aw, sv);
            let sums = _mm256_madd_epi16(pairs, ones);
            let scale = half::f16::from_bits(dwb).to_f32() * dxb;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sums), acc);
        }
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{QK8_0, QuantRow};

    /// The block dot on AVX512-VNNI, two blocks a 512-bit register: `vpdpbusd` multiplies
    /// |q_w| (unsigned) by q_x with the weight's sign moved onto it (a masked `0 - q_x`
    /// where q_w < 0) and sums each 4 products into i32 (at most 4 * 128 * 127: exact).
    /// Lanes 0..8 hold block b, 8..16 block b + 1; each half is scaled by its `d_w * d_x`.
    /// An odd last block runs on 256-bit VNNI.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and AVX-512 F/BW/VL/VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_row(qw: &[i8], dw: &[u16], x: &QuantRow) -> f32 {
        let blocks = qw.len() / QK8_0;
        assert!(x.q.len() >= blocks * QK8_0 && dw.len() >= blocks && x.d.len() >= blocks);
        let scale = |b: usize| half::f16::from_bits(dw[b]).to_f32() * x.d[b];
        let zero = _mm512_setzero_si512();
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 2 <= blocks {
            // SAFETY: blocks b and b + 1 lie within qw and x.q (asserted above).
            let (w, v) = unsafe {
                (
                    _mm512_loadu_si512(qw.as_ptr().add(b * QK8_0).cast()),
                    _mm512_loadu_si512(x.q.as_ptr().add(b * QK8_0).cast()),
                )
            };
            let negative = _mm512_movepi8_mask(w);
            let sv = _mm512_mask_sub_epi8(v, negative, zero, v);
            let sums = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w), sv);
            let scales = _mm512_mask_blend_ps(
                0xff00,
                _mm512_set1_ps(scale(b)),
                _mm512_set1_ps(scale(b + 1)),
            );
            acc = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(sums), acc);
            b += 2;
        }
        let mut total = _mm512_reduce_add_ps(acc);
        if b < blocks {
            // SAFETY: block b lies within qw and x.q (asserted above).
            let (w, v) = unsafe {
                (
                    _mm256_loadu_si256(qw.as_ptr().add(b * QK8_0).cast()),
                    _mm256_loadu_si256(x.q.as_ptr().add(b * QK8_0).cast()),
                )
            };
            let sums = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(w, w),
                _mm256_sign_epi8(v, w),
            );
            let s = _mm512_reduce_add_epi32(_mm512_zextsi256_si512(sums));
            total += scale(b) * s as f32;
        }
        total
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic value in [-1, 1) from a 64-bit LCG: test data for the block kernels.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn activation_blocks_round_to_127_steps_of_their_max() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 / 31.0).collect();
        x[5] = -2.0;
        let r = quantize_row(&x);
        assert_eq!(r.q[5], -127);
        assert_eq!(r.q[0], 0);
        assert!((r.d[0] - 2.0 / 127.0).abs() < 1e-5);
        assert_eq!(quantize_row(&[0.0; 32]).q, vec![0i8; 32]);
    }

    /// The Q8_0 product against the f32 product of the same (dequantized) weights: they
    /// differ only by the activations' rounding to int8, at most half a step `d_x` per
    /// value plus the f16 rounding of `d_x` (127 * 2^-11 steps): per output, at most
    /// `sum over blocks of 0.57 * d_x * sum |w|` (asserted with 0.6).
    #[test]
    fn q8_linear_matches_the_dequantized_product_within_the_activation_rounding() {
        let mut seed = 3;
        let (n, k) = (40, 96);
        let w = Mat {
            rows: n,
            cols: k,
            data: WeightData::F32((0..n * k).map(|_| lcg(&mut seed)).collect()),
        };
        let wq = quantize_mat(&w).unwrap();
        let mut wf = vec![0.0f32; n * k];
        for r in 0..n {
            wq.row_to_f32(r, &mut wf[r * k..(r + 1) * k]);
        }
        for rows in [1, 3] {
            let x: Vec<f32> = (0..rows * k).map(|_| 4.0 * lcg(&mut seed)).collect();
            let mut got = vec![0.0f32; rows * n];
            linear_q8(&x, rows, &wq, &mut got);
            for t in 0..rows {
                let xr = &x[t * k..(t + 1) * k];
                let xq = quantize_row(xr);
                for j in 0..n {
                    let wr = &wf[j * k..(j + 1) * k];
                    let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    let bound: f32 = (0..k / QK8_0)
                        .map(|b| {
                            let s: f32 =
                                wr[b * QK8_0..(b + 1) * QK8_0].iter().map(|v| v.abs()).sum();
                            0.6 * xq.d[b] * s
                        })
                        .sum::<f32>()
                        + 1e-4;
                    let err = (got[t * n + j] - exact).abs();
                    assert!(
                        err <= bound,
                        "row {t} out {j}: |{} - {exact}| > {bound}",
                        got[t * n + j]
                    );
                }
            }
        }
        assert_eq!(wq.bytes(), n * k + n * k / QK8_0 * 2);
        assert!(
            quantize_mat(&Mat {
                rows: 1,
                cols: 40,
                data: WeightData::F32(vec![0.0; 40])
            })
            .is_err()
        );
    }

    /// Every SIMD kernel against the portable one, on an even (256) and an odd (288 = 9
    /// blocks: the 256-bit VNNI tail) width: the same i32 block sums, so only the f32
    /// accumulation order differs (relative 1e-5). Kernels this CPU lacks are skipped, and
    /// the test says so.
    #[test]
    fn simd_and_portable_dots_agree_and_track_the_float_dot() {
        let mut seed = 7;
        for k in [256, 288] {
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut seed)).collect();
            let mut w: Vec<f32> = (0..k).map(|_| lcg(&mut seed)).collect();
            w[3] = 0.0;
            let wq = quantize_row(&w);
            let dw: Vec<u16> = wq.d.iter().map(|&d| f16::from_f32(d).to_bits()).collect();
            let xq = quantize_row(&x);
            let portable = dot_row_portable(&wq.q, &dw, &xq);
            for kernel in QKernel::ALL {
                if !kernel.supported() {
                    eprintln!("skipped: this CPU lacks the {kernel:?} Q8_0 kernel");
                    continue;
                }
                let fast = dot_row_with(kernel, &wq.q, &dw, &xq);
                assert!(
                    (portable - fast).abs() <= 1e-5 * portable.abs().max(1.0),
                    "{kernel:?} k {k}: {fast} vs {portable}"
                );
            }
            let exact: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
            // Two 8-bit roundings of values in [-1, 1]: |error| <= sum |x||dw|/2 + |w||dx|/2.
            assert!((portable - exact).abs() < 0.05, "{portable} vs {exact}");
        }
    }
}
