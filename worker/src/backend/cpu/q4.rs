//! Projections computed on GGUF Q4_0 / Q4_1 blocks ([`WeightData::Q4`]: 32 weights a block,
//! 4-bit codes, an f16 scale and for Q4_1 an f16 min). Each activation row is quantized per
//! 32 values to **int16** (`d_x = max|x| / 32767`, `q_x = round(x / d_x)`, [`Q4Input`]) and
//! each output is a sum over blocks of
//!
//! - Q4_0 (`w = d_w (q_w - 8)`): `d_w d_x (q_w . q_x - 8 sum(q_x))`;
//! - Q4_1 (`w = d_w q_w + m_w`): `d_w d_x (q_w . q_x) + m_w d_x sum(q_x)`,
//!
//! the integer dots and block sums exact in i32. llama.cpp quantizes these activations to
//! int8; on SmolLM2-135M-Instruct that moves logits by tenths, enough to turn the chat answer
//! to "What is the capital of France?" away from Paris (transformers' float32 margin there
//! is 0.08): with 16 bits the activations' rounding is 256 times smaller, and batch-1 decode,
//! bound by the weight bytes, pays little for the second `vpdpwssd` per 16 weights. Batch-1
//! decode reads 18 (Q4_0) or 20 (Q4_1) bytes per 32 weights, 0.56 to 0.63 bytes a weight
//! against 2 for bf16.
//!
//! Where the CPU has AVX512-VNNI, [`linear_q4`] runs the tiles of `q4_tiles.rs` (several
//! weight and input rows per pass); elsewhere the portable block dot, by rows across the pool.

use half::f16;

use super::q8::{self, QK8_0, blocked_linear};
use crate::model::weights::Q4Rows;
use crate::model::{Mat, ModelWeights, WeightData};

/// One activation row quantized per 32 values to int16, with the sum of each block's codes.
pub struct Q4Input {
    /// Codes, `|q| <= 32767`.
    pub q: Vec<i16>,
    /// Scales, one per 32 values.
    pub d: Vec<f32>,
    /// `sum(q_x)` of each block.
    pub sums: Vec<i32>,
}

impl Q4Input {
    /// Quantizes `x` (a multiple of 32 long) per block and sums each block's codes.
    pub fn new(x: &[f32]) -> Q4Input {
        let blocks = x.len() / QK8_0;
        let mut q = vec![0i16; blocks * QK8_0];
        let (mut d, mut sums) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xb, qb) in x.chunks_exact(QK8_0).zip(q.chunks_exact_mut(QK8_0)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax / 32767.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                sum += i32::from(*q);
            }
            d.push(scale);
            sums.push(sum);
        }
        Q4Input { q, d, sums }
    }
}

/// The portable block dot of row `r` of `w` (a matrix `k` wide) with `x`; the reference of
/// the tiles in tests.
pub fn dot_row_portable(w: &Q4Rows, r: usize, k: usize, x: &Q4Input) -> f32 {
    let blocks = k / QK8_0;
    let qs = &w.qs[r * k / 2..(r + 1) * k / 2];
    let mut acc = 0.0f32;
    for (b, q) in qs.chunks_exact(QK8_0 / 2).enumerate() {
        let xq = &x.q[b * QK8_0..(b + 1) * QK8_0];
        let mut s = 0i32;
        for (j, &v) in q.iter().enumerate() {
            s += i32::from(v & 0x0f) * i32::from(xq[j]) + i32::from(v >> 4) * i32::from(xq[j + 16]);
        }
        let d = f16::from_bits(w.d[r * blocks + b]).to_f32() * x.d[b];
        if w.with_min {
            let m = f16::from_bits(w.m[r * blocks + b]).to_f32();
            acc += d * s as f32 + m * x.d[b] * x.sums[b] as f32;
        } else {
            acc += d * (s - 8 * x.sums[b]) as f32;
        }
    }
    acc
}

/// `out[t, n] = x_t . w_n` for a Q4_0 / Q4_1 matrix: each input row quantized once, then the
/// VNNI tiles where the CPU has them, else the portable dot by rows across the pool.
pub fn linear_q4(x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    let WeightData::Q4(q4) = &w.data else {
        unreachable!("linear_q4 is called for Q4_0 / Q4_1 weights only");
    };
    let (k, n) = (w.cols, w.rows);
    #[cfg(target_arch = "x86_64")]
    {
        if super::linear::block_tiles(rows) {
            super::q4_tiles::linear(x, rows, q4, k, &mut out[..rows * n]);
            return;
        }
    }
    let xs: Vec<Q4Input> = (0..rows)
        .map(|t| Q4Input::new(&x[t * k..(t + 1) * k]))
        .collect();
    blocked_linear(rows, n, out, |r, t| dot_row_portable(q4, r, k, &xs[t]));
}

/// On CPUs without the VNNI tiles, turns every Q4_0 / Q4_1 matrix of `w` into bf16, as the
/// loader did before the tiles: there the portable block dot (510 ns per 768-wide row on
/// one thread, against 31 on the tiles) is slower than the bf16 kernels on 3x the bytes.
pub fn dequantize_without_tiles(w: &mut ModelWeights) {
    if !q8::tiles_supported() {
        dequantize_all(w);
    }
}

/// Turns every Q4_0 / Q4_1 matrix of `w` into bf16 (rounded to nearest, as at load).
fn dequantize_all(w: &mut ModelWeights) {
    let mut mats: Vec<&mut Mat> = vec![&mut w.embed];
    mats.extend(w.lm_head.as_mut());
    mats.extend(super::bf16::layer_projections(&mut w.layers));
    dequantize_mats(mats);
}

/// Turns each Q4_0 / Q4_1 matrix of `mats` into bf16; others stay as they are.
fn dequantize_mats(mats: Vec<&mut Mat>) {
    for m in mats {
        if matches!(m.data, WeightData::Q4(_)) {
            let mut row = vec![0.0f32; m.cols];
            let mut bits = Vec::with_capacity(m.rows * m.cols);
            for r in 0..m.rows {
                m.row_to_f32(r, &mut row);
                bits.extend(row.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
            }
            m.data = WeightData::Bf16(bits);
        }
    }
}

/// `m` quantized to Q4_1 (`with_min`) or Q4_0 as llama.cpp's reference quantizers do (per
/// 32 values; Q4_1: `d = (max - min) / 15`, `m = min`; Q4_0: `d = -v / 8` for the value `v`
/// of largest magnitude), scales and mins kept as f16. `m.cols` must be a multiple of 32
/// (checked: the message names the width). For tests and benchmarks of the Q4 path.
pub fn quantize_mat(m: &Mat, with_min: bool) -> Result<Mat, String> {
    if !m.cols.is_multiple_of(QK8_0) {
        return Err(format!(
            "a {}-column matrix does not split into Q4 blocks of {QK8_0}",
            m.cols
        ));
    }
    let mut w = Q4Rows {
        with_min,
        qs: Vec::with_capacity(m.rows * m.cols / 2),
        d: Vec::new(),
        m: Vec::new(),
    };
    let mut row = vec![0.0f32; m.cols];
    for r in 0..m.rows {
        m.row_to_f32(r, &mut row);
        for xb in row.chunks_exact(QK8_0) {
            let (d, min, offset) = if with_min {
                let lo = xb.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let hi = xb.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                ((hi - lo) / 15.0, lo, 0.5)
            } else {
                let big = xb
                    .iter()
                    .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                (big / -8.0, 0.0, 8.5)
            };
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let code = |v: f32| (((v - min) * inv + offset) as i32).clamp(0, 15) as u8;
            w.qs.extend((0..16).map(|j| code(xb[j]) | (code(xb[j + 16]) << 4)));
            w.d.push(f16::from_f32(d).to_bits());
            if with_min {
                w.m.push(f16::from_f32(min).to_bits());
            }
        }
    }
    Ok(Mat {
        rows: m.rows,
        cols: m.cols,
        data: WeightData::Q4(Box::new(w)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::q8::tests::lcg;

    fn random_mat(n: usize, k: usize, seed: &mut u64) -> Mat {
        Mat {
            rows: n,
            cols: k,
            data: WeightData::F32((0..n * k).map(|_| lcg(seed)).collect()),
        }
    }

    /// Quantizing keeps each Q4_1 weight within half a step (`d / 2`, plus the f16 rounding
    /// of `d` and `m`: asserted 0.51 d + 2^-10 |m|) and each Q4_0 weight within a step (the
    /// code 16 steps from the block's extreme value does not fit in 4 bits and clamps to 15,
    /// as in llama.cpp), and gives the layout's byte count.
    #[test]
    fn q4_codes_round_each_weight_to_its_blocks_steps() {
        let mut seed = 11;
        let (n, k) = (3, 96);
        let w = random_mat(n, k, &mut seed);
        let WeightData::F32(wf) = &w.data else {
            unreachable!()
        };
        for with_min in [false, true] {
            let q = quantize_mat(&w, with_min).unwrap();
            let WeightData::Q4(rows) = &q.data else {
                unreachable!()
            };
            let mut back = vec![0.0f32; k];
            for r in 0..n {
                q.row_to_f32(r, &mut back);
                for (j, (&a, &b)) in wf[r * k..(r + 1) * k].iter().zip(&back).enumerate() {
                    let blk = r * k / 32 + j / 32;
                    let d = f16::from_bits(rows.d[blk]).to_f32().abs();
                    let m = rows
                        .m
                        .get(blk)
                        .map_or(0.0, |&v| f16::from_bits(v).to_f32().abs());
                    let steps = if with_min { 0.51 } else { 1.01 };
                    assert!(
                        (a - b).abs() <= steps * d + m / 1024.0 + 1e-6,
                        "min {with_min} row {r} col {j}: {a} vs {b}"
                    );
                }
            }
            let per_block = if with_min { 20 } else { 18 };
            assert_eq!(q.bytes(), n * k / 32 * per_block);
        }
        assert!(quantize_mat(&random_mat(1, 40, &mut seed), true).is_err());
    }

    /// Without the tiles the Q4 matrices of a model become bf16 holding the dequantized
    /// values (rounded to bf16), and other matrices stay as they are.
    #[test]
    fn q4_matrices_become_bf16_of_their_values() {
        let mut seed = 19;
        let q = quantize_mat(&random_mat(3, 64, &mut seed), true).unwrap();
        let (mut a, mut b) = (q.clone(), random_mat(2, 64, &mut seed));
        dequantize_mats(vec![&mut a, &mut b]);
        let WeightData::Bf16(bits) = &a.data else {
            panic!("the Q4_1 matrix is not bf16")
        };
        let mut row = vec![0.0f32; 64];
        q.row_to_f32(1, &mut row);
        let back: Vec<f32> = bits[64..128]
            .iter()
            .map(|&v| half::bf16::from_bits(v).to_f32())
            .collect();
        let want: Vec<f32> = row
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(back, want);
        assert!(matches!(b.data, WeightData::F32(_)));
    }

    /// The Q4 product against the f32 product of the same (dequantized) weights, on the
    /// portable path and the tiles (whichever `linear_q4` runs here), 1 to 11 input rows:
    /// they differ by the activations' rounding to int16, at most half a step `d_x / 2` per
    /// value, and the f32 summation order (1e-5 of `sum |w x|`); asserted with `0.6 d_x`.
    #[test]
    fn q4_linear_matches_the_dequantized_product_within_the_activation_rounding() {
        let mut seed = 13;
        for (n, k) in [(40, 96), (9, 576)] {
            let w = random_mat(n, k, &mut seed);
            for with_min in [false, true] {
                let wq = quantize_mat(&w, with_min).unwrap();
                let mut wf = vec![0.0f32; n * k];
                for r in 0..n {
                    wq.row_to_f32(r, &mut wf[r * k..(r + 1) * k]);
                }
                for rows in [1, 3, 11] {
                    let x: Vec<f32> = (0..rows * k).map(|_| 4.0 * lcg(&mut seed)).collect();
                    let mut got = vec![0.0f32; rows * n];
                    linear_q4(&x, rows, &wq, &mut got);
                    for t in 0..rows {
                        let xr = &x[t * k..(t + 1) * k];
                        let xq = Q4Input::new(xr);
                        for j in 0..n {
                            let wr = &wf[j * k..(j + 1) * k];
                            let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                            let bound: f32 = (0..k / QK8_0)
                                .map(|b| {
                                    let s: f32 = wr[b * QK8_0..(b + 1) * QK8_0]
                                        .iter()
                                        .map(|v| v.abs())
                                        .sum();
                                    0.6 * xq.d[b] * s
                                })
                                .sum::<f32>()
                                + 1e-4;
                            let mag: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                            let bound = bound + 1e-5 * mag;
                            let err = (got[t * n + j] - exact).abs();
                            assert!(
                                err <= bound,
                                "min {with_min} k {k} row {t} out {j}: |{} - {exact}| > {bound}",
                                got[t * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}
