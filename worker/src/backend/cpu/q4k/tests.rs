use super::*;
use crate::backend::cpu::q8::tests::lcg;

fn f32_mat(rows: usize, cols: usize, seed: &mut u64) -> Mat {
    Mat {
        rows,
        cols,
        data: WeightData::F32((0..rows * cols).map(|_| lcg(seed)).collect()),
    }
}

fn dequantized(m: &Mat) -> Vec<f32> {
    let mut v = vec![0.0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.row_to_f32(r, &mut v[r * m.cols..(r + 1) * m.cols]);
    }
    v
}

#[test]
fn activation_blocks_round_to_127_steps_of_their_max_and_keep_16_sums() {
    let mut x: Vec<f32> = (0..512).map(|i| (i % 256) as f32 / 255.0).collect();
    x[5] = -2.0;
    let r = quantize_row_q8k(&x);
    assert_eq!((r.q[5], r.q[0], r.q[511]), (-127, 0, 127));
    assert!((r.d[0] - 2.0 / 127.0).abs() < 1e-7 && (r.d[1] - 1.0 / 127.0).abs() < 1e-7);
    assert_eq!(r.bsums.len(), 32);
    for (s, &sum) in r.bsums.iter().enumerate() {
        let want: i16 = r.q[16 * s..16 * s + 16].iter().map(|&v| i16::from(v)).sum();
        assert_eq!(sum, want);
    }
    assert!(quantize_row_q8k(&[0.0; 256]).q.iter().all(|&v| v == 0));
}

/// The quantizers write blocks that `dequant.rs` (checked against llama.cpp's own values)
/// reads back within their steps: Q4_K within 1/15 of a 32-value range plus the 6-bit
/// rounding of scale and min (asserted 0.1 for values in [-1, 1]), Q6_K within 1/31 of a
/// 16-value max plus its scale rounding (asserted 0.04).
#[test]
fn quantized_blocks_dequantize_near_their_source() {
    let mut seed = 11;
    let m = f32_mat(3, 512, &mut seed);
    let WeightData::F32(src) = &m.data else {
        unreachable!()
    };
    for (ty, bound, bytes) in [
        (GgmlType::Q4K, 0.1, Q4K_BYTES),
        (GgmlType::Q6K, 0.04, Q6K_BYTES),
    ] {
        let q = quantize_mat(&m, ty).unwrap();
        assert_eq!(q.bytes(), 3 * 2 * bytes);
        let back = dequantized(&q);
        let worst = src
            .iter()
            .zip(&back)
            .fold(0.0f32, |a, (s, b)| a.max((s - b).abs()));
        assert!(worst < bound, "{ty:?}: worst error {worst}");
    }
    let narrow = f32_mat(1, 96, &mut seed);
    assert!(
        quantize_mat(&narrow, GgmlType::Q4K)
            .unwrap_err()
            .contains("96-column")
    );
    assert!(quantize_mat(&m, GgmlType::Q8_0).is_err());
}

/// The k-quant product against the f32 product of the same (dequantized) weights, for Q4_K,
/// Q6_K and a fused matrix mixing both, at widths 256, 512 and 768 (a multiple of 256 but not
/// of 512), for decode (1 row), small batches and prefill (70 rows): the two differ only by
/// the activations' rounding to int8, at most half a step `d_x` per value, so per output by
/// at most `sum over blocks of d_x / 2 * sum |w|` (asserted with 0.51, plus 1e-5 of
/// `sum |w x|` for the f32 sums).
#[test]
fn kquant_linear_matches_the_dequantized_product_within_the_activation_rounding() {
    let mut seed = 3;
    for (n, k) in [(24, 256), (40, 768), (17, 512)] {
        let m = f32_mat(n, k, &mut seed);
        let q4 = quantize_mat(&m, GgmlType::Q4K).unwrap();
        let q6 = quantize_mat(&m, GgmlType::Q6K).unwrap();
        let mixed = Mat::vstack(vec![q4.clone(), q6.clone(), q4.clone()]).unwrap();
        let WeightData::KQuant(runs) = &mixed.data else {
            panic!("k-quant parts stack as k-quant blocks");
        };
        assert_eq!(
            runs.runs,
            vec![(GgmlType::Q4K, n), (GgmlType::Q6K, n), (GgmlType::Q4K, n)]
        );
        for w in [&q4, &q6, &mixed] {
            let wf = dequantized(w);
            for rows in [1, 3, 70] {
                let x: Vec<f32> = (0..rows * k).map(|_| 4.0 * lcg(&mut seed)).collect();
                let mut got = vec![f32::NAN; rows * w.rows];
                linear_kquant(&x, rows, w, &mut got);
                for t in 0..rows {
                    let xr = &x[t * k..(t + 1) * k];
                    let xq = quantize_row_q8k(xr);
                    for j in 0..w.rows {
                        let wr = &wf[j * k..(j + 1) * k];
                        let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        let mag: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                        let bound = (0..k / QK_K)
                            .map(|b| {
                                let s: f32 =
                                    wr[b * QK_K..(b + 1) * QK_K].iter().map(|v| v.abs()).sum();
                                0.51 * xq.d[b] * s
                            })
                            .sum::<f32>()
                            + 1e-5 * mag;
                        let err = (got[t * w.rows + j] - exact).abs();
                        assert!(
                            err <= bound,
                            "k {k} rows {rows} out {j}: |{} - {exact}| > {bound}",
                            got[t * w.rows + j]
                        );
                    }
                }
            }
        }
    }
}

/// Each SIMD kernel against the portable loops on Q4_K and Q6_K rows of 1 and 3 blocks,
/// including all-negative, zero and extreme activations: the same integer sums, so only the
/// f32 accumulation order differs (relative 1e-5 of `sum |w x|`). Kernels this CPU lacks
/// are skipped, and the test says so.
#[test]
fn simd_kernels_give_the_portable_dots() {
    let mut seed = 5;
    for k in [256, 768] {
        let m = f32_mat(4, k, &mut seed);
        let xs: Vec<Vec<f32>> = vec![
            (0..k).map(|_| lcg(&mut seed)).collect(),
            (0..k).map(|_| -1.0 - lcg(&mut seed).abs()).collect(),
            vec![0.0; k],
            (0..k)
                .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
                .collect(),
        ];
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            let w = quantize_mat(&m, ty).unwrap();
            let WeightData::KQuant(blocks) = &w.data else {
                unreachable!()
            };
            let wf = dequantized(&w);
            for x in &xs {
                let xq = quantize_row_q8k(x);
                for r in 0..w.rows {
                    let (_, row) = blocks.row(r, k);
                    let portable = dot_with(QKernel::Portable, ty, row, &xq);
                    let mag: f32 = x
                        .iter()
                        .zip(&wf[r * k..(r + 1) * k])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    for kernel in QKernel::ALL {
                        if !kernel.supported() {
                            eprintln!("skipped: this CPU lacks the {kernel:?} k-quant kernel");
                            continue;
                        }
                        let fast = dot_with(kernel, ty, row, &xq);
                        assert!(
                            (fast - portable).abs() <= 1e-5 * mag.max(1.0),
                            "{kernel:?} {ty:?} k {k} row {r}: {fast} vs {portable}"
                        );
                    }
                }
            }
        }
    }
}
