//! Tests of the bf16 GEMM mode (`bf16.rs`): rounding, the kernels against a naive product,
//! and the bit-identity of every switchable path (prefetches, FMA tiles, fused gating).

use super::*;

#[test]
fn rounding_is_to_nearest_even_with_denormals_flushed() {
    // 1 + 2^-8 lies halfway between two bf16 values; ties go to the even mantissa.
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), to_bf16(1.0));
    assert_eq!(to_f32(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert_eq!(to_f32(to_bf16(1.0 + 1.5 / 256.0)), 1.0 + 2.0 / 256.0);
    assert_eq!(to_bf16(-0.0), 0x8000);
    assert_eq!(to_bf16(f32::from_bits(1)), 0);
    assert_eq!(to_bf16(-f32::from_bits(0x007f_ffff)), 0x8000);
    assert_eq!(to_f32(to_bf16(f32::MAX)), f32::INFINITY);
    assert!(to_f32(to_bf16(f32::NAN)).is_nan());
    assert_eq!(to_f32(to_bf16(f32::NEG_INFINITY)), f32::NEG_INFINITY);
}

fn awkward_values() -> Vec<f32> {
    let mut v: Vec<f32> = (0..4000)
        .map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 13 - 6))
        .collect();
    v.extend([
        0.0,
        -0.0,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -(1.0 + 1.0 / 256.0),
    ]);
    v
}

#[test]
fn native_rounding_equals_the_portable_rounding_bit_for_bit() {
    let kernel = Bf16Kernel::detect();
    if kernel == Bf16Kernel::Portable {
        eprintln!("no AVX512_BF16 on this CPU: only the portable rounding exists");
        return;
    }
    let x = awkward_values();
    let mut native = vec![0u16; x.len()];
    round_into(kernel, &x, &mut native);
    let mut portable = vec![0u16; x.len()];
    round_into(Bf16Kernel::Portable, &x, &mut portable);
    for (i, (a, b)) in native.iter().zip(&portable).enumerate() {
        assert_eq!(a, b, "x = {:e} ({:#x})", x[i], x[i].to_bits());
    }
}

/// The `n x k` row-major bf16 matrix `w` packed into panels by [`pack_mat`].
#[cfg(target_arch = "x86_64")]
fn packed_mat(n: usize, k: usize, w: Vec<u16>) -> crate::model::Mat {
    let mut m = crate::model::Mat {
        rows: n,
        cols: k,
        data: WeightData::Bf16(w),
    };
    pack_mat(&mut m, Bf16Kernel::Avx512Bf16);
    assert!(matches!(m.data, WeightData::Bf16Panels(_)));
    m
}

/// Weights and activations with bf16 bits, and the exact f64 reference on rounded inputs.
fn case(rows: usize, n: usize, k: usize) -> (Vec<f32>, Vec<u16>, Vec<f64>, Vec<f64>) {
    let x: Vec<f32> = (0..rows * k)
        .map(|i| ((i as f32) * 0.0137).sin() * 1.7)
        .collect();
    let w: Vec<u16> = (0..n * k)
        .map(|i| to_bf16(((i * 7919 % 1009) as f32 - 504.0) / 300.0))
        .collect();
    let mut want = vec![0.0f64; rows * n];
    let mut scale = vec![0.0f64; rows * n];
    for t in 0..rows {
        for c in 0..n {
            for i in 0..k {
                let p = f64::from(to_f32(to_bf16(x[t * k + i]))) * f64::from(to_f32(w[c * k + i]));
                want[t * n + c] += p;
                scale[t * n + c] += p.abs();
            }
        }
    }
    (x, w, want, scale)
}

/// The row-major and (on AVX512_BF16) the packed kernels against the exact sum of exact
/// products of the rounded inputs: the only error left is f32 summation over 16 lanes (or
/// 2 x 32 accumulators) and their reduction, bounded by (k / 16 + 8) ulps of the sum of
/// |products|, far below the 2^-9 relative error that skipping the input rounding would
/// leave.
#[test]
fn bf16_kernels_match_a_naive_product_of_rounded_inputs() {
    for &(rows, n, k) in &[
        (1, 37, 67),
        (1, 64, 768),
        (2, 96, 64),
        (3, 33, 31),
        (4, 31, 2),
        (5, 32, 33),
        (8, 40, 96),
        (12, 70, 130),
        (13, 65, 77),
        (32, 19, 130),
        (33, 70, 67),
        (64, 33, 40),
        (100, 65, 256),
    ] {
        let (x, w, want, scale) = case(rows, n, k);
        let mut got = vec![f32::NAN; rows * n];
        let row_major = crate::model::Mat {
            rows: n,
            cols: k,
            data: crate::model::WeightData::Bf16(w.clone()),
        };
        let mut mats = vec![("row-major", Bf16Kernel::Portable, row_major.clone())];
        mats.push(("row-major", Bf16Kernel::detect(), row_major.clone()));
        let mut packed = row_major;
        #[cfg(target_arch = "x86_64")]
        if Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16 {
            pack_mat(&mut packed, Bf16Kernel::Avx512Bf16);
            assert!(matches!(packed.data, WeightData::Bf16Panels(_)));
            mats.push(("packed", Bf16Kernel::Avx512Bf16, packed.clone()));
            mats.push(("packed", Bf16Kernel::Portable, packed));
        }
        for (layout, kernel, mat) in &mats {
            got.fill(f32::NAN);
            let mode = super::super::linear::GemmDtype::Bf16(*kernel);
            super::super::linear::linear(mode, &x, rows, mat, &mut got);
            for i in 0..rows * n {
                let tol = scale[i] * (k / 16 + 8) as f64 * f64::from(f32::EPSILON);
                let err = (f64::from(got[i]) - want[i]).abs();
                assert!(
                    err <= tol,
                    "{layout} {kernel:?} rows {rows} n {n} k {k} at {i}: {} vs {} (tol {tol:e})",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// Prefetching the next panel (any setting) changes nothing in the result, bit for bit, for
/// row counts of one tile and of several (where the prefetch runs), full and partial
/// panels.
#[cfg(target_arch = "x86_64")]
#[test]
fn next_panel_prefetch_gives_bit_identical_results() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    let mode = super::super::linear::GemmDtype::Bf16(Bf16Kernel::Avx512Bf16);
    for &(rows, n, k) in &[(32, 100, 768), (13, 64, 130), (25, 33, 67), (64, 96, 2048)] {
        let (x, w, _, _) = case(rows, n, k);
        let mat = packed_mat(n, k, w);
        let outs: Vec<Vec<f32>> = [PanelPath::Plain, PanelPath::NextToL2, PanelPath::NextToL1]
            .iter()
            .map(|&pf| {
                set_panel_path(pf);
                let mut out = vec![f32::NAN; rows * n];
                super::super::linear::linear(mode, &x, rows, &mat, &mut out);
                out
            })
            .collect();
        set_panel_path(PanelPath::NextToL1);
        assert!(
            outs[0].iter().all(|v| v.is_finite()),
            "rows {rows} n {n} k {k}"
        );
        for o in &outs[1..] {
            let same = o
                .iter()
                .zip(&outs[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rows {rows} n {n} k {k}: prefetch changed the result");
        }
    }
}

/// The weight-stream prefetch of few-row tiles (decode, short drafts) leaves the bits of
/// the product unchanged, for 1 to 4 rows, short and odd widths.
#[cfg(target_arch = "x86_64")]
#[test]
fn stream_prefetch_gives_bit_identical_results() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    let mode = super::super::linear::GemmDtype::Bf16(Bf16Kernel::Avx512Bf16);
    for &(rows, n, k) in &[(1, 100, 768), (2, 64, 130), (3, 33, 67), (4, 96, 576)] {
        let (x, w, _, _) = case(rows, n, k);
        let mat = packed_mat(n, k, w);
        let outs: Vec<Vec<f32>> = [false, true]
            .iter()
            .map(|&on| {
                set_stream_prefetch(on);
                let mut out = vec![f32::NAN; rows * n];
                super::super::linear::linear(mode, &x, rows, &mat, &mut out);
                out
            })
            .collect();
        set_stream_prefetch(true);
        assert!(
            outs[0].iter().all(|v| v.is_finite()),
            "rows {rows} n {n} k {k}"
        );
        let same = outs[1]
            .iter()
            .zip(&outs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "rows {rows} n {n} k {k}: the stream prefetch changed the result"
        );
    }
}

/// Tiles of 3 or more rows on f32 FMAs give the bits of `vdpbf16ps` (which adds the odd
/// product of a pair before the even one, as they do): one tile of 3 to 12 rows, several
/// tiles, odd k, short last panels, a prefill-sized input.
#[cfg(target_arch = "x86_64")]
#[test]
fn fma_tiles_give_the_bits_of_vdpbf16ps() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    let mode = super::super::linear::GemmDtype::Bf16(Bf16Kernel::Avx512Bf16);
    let shapes = [
        (3, 64, 576),
        (4, 33, 67),
        (5, 100, 768),
        (8, 96, 130),
        (12, 40, 1536),
        (13, 64, 96),
        (32, 70, 300),
        // Input widened on the pool (rows x pairs >= 2^16).
        (67, 40, 2048),
    ];
    for &(rows, n, k) in &shapes {
        let (x, w, _, _) = case(rows, n, k);
        let mat = packed_mat(n, k, w);
        let outs: Vec<Vec<f32>> = [false, true]
            .iter()
            .map(|&on| {
                set_fma_tiles(on);
                let mut out = vec![f32::NAN; rows * n];
                super::super::linear::linear(mode, &x, rows, &mat, &mut out);
                out
            })
            .collect();
        set_fma_tiles(true);
        assert!(
            outs[0].iter().all(|v| v.is_finite()),
            "rows {rows} n {n} k {k}"
        );
        let same = outs[1]
            .iter()
            .zip(&outs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "rows {rows} n {n} k {k}: the FMA tiles changed the result"
        );
    }
}

/// The down projection fed by the fused gating gives the bits of gating into f32 and
/// then the packed product, for batch and single rows, odd and even widths.
#[cfg(target_arch = "x86_64")]
#[test]
fn fused_gating_gives_the_bits_of_gating_then_linear() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    let mode = super::super::linear::GemmDtype::Bf16(Bf16Kernel::Avx512Bf16);
    for &(rows, n, inter) in &[(1, 40, 67), (5, 33, 130), (32, 96, 2048), (40, 64, 100)] {
        let (gu, w, _, _) = case(rows, n, 2 * inter);
        let down = packed_mat(n, inter, w[..n * inter].to_vec());
        let mut act = vec![0.0f32; rows * inter];
        for (a, g) in act.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
            super::super::kernels::silu_mul(g, a);
        }
        let mut want = vec![f32::NAN; rows * n];
        super::super::linear::linear(mode, &act, rows, &down, &mut want);
        let mut got = vec![f32::NAN; rows * n];
        assert!(super::super::linear::silu_mul_linear(
            mode, &gu, rows, &down, &mut got
        ));
        assert!(want.iter().all(|v| v.is_finite()));
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rows {rows} n {n} inter {inter}");
    }
    let (gu, w, _, _) = case(2, 8, 16);
    let row_major = crate::model::Mat {
        rows: 8,
        cols: 8,
        data: WeightData::Bf16(w[..64].to_vec()),
    };
    let mut out = vec![0.0f32; 16];
    assert!(!super::super::linear::silu_mul_linear(
        mode, &gu, 2, &row_major, &mut out
    ));
}

/// Output rows in separate, uninitialized vectors get the bits of the same product into
/// one matrix, for one row, one tile and several tiles of rows, odd and even widths.
#[cfg(target_arch = "x86_64")]
#[test]
fn product_into_separate_rows_gives_the_bits_of_the_matrix() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    for &(rows, n, k) in &[(1, 70, 67), (5, 33, 130), (13, 64, 768), (32, 100, 96)] {
        let (x, w, _, _) = case(rows, n, k);
        let mat = packed_mat(n, k, w);
        let WeightData::Bf16Panels(panels) = &mat.data else {
            unreachable!("packed above")
        };
        let mut want = vec![f32::NAN; rows * n];
        linear_panels(&x, rows, panels, k, n, &mut want);
        assert!(want.iter().all(|v| v.is_finite()));
        let mut vecs: Vec<Vec<f32>> = (0..rows).map(|_| Vec::with_capacity(n)).collect();
        let mut outs: Vec<&mut [std::mem::MaybeUninit<f32>]> = vecs
            .iter_mut()
            .map(|v| &mut v.spare_capacity_mut()[..n])
            .collect();
        let mode = super::super::linear::GemmDtype::Bf16(Bf16Kernel::Avx512Bf16);
        assert!(super::super::linear::linear_rows(mode, &x, &mat, &mut outs));
        drop(outs);
        for (t, v) in vecs.iter_mut().enumerate() {
            // SAFETY: linear_rows wrote the first n elements of every row.
            unsafe { v.set_len(n) };
            let same = v
                .iter()
                .zip(&want[t * n..(t + 1) * n])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rows {rows} n {n} k {k}: row {t}");
        }
    }
}

/// The rounded input rows are kept from call to call on a thread without zeroing: a call
/// after a larger one (which left its values in the buffer) gives the same bits as the
/// same call on a fresh thread, for odd k (whose last pair's upper half must be zero).
#[cfg(target_arch = "x86_64")]
#[test]
fn reused_input_rows_give_the_bits_of_fresh_ones() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    let packed = |n: usize, k: usize, w: &[u16]| match packed_mat(n, k, w.to_vec()).data {
        WeightData::Bf16Panels(p) => p,
        _ => unreachable!("packed_mat packs"),
    };
    let (rows, n, k) = (9, 40, 131);
    let (x, w, _, _) = case(rows, n, k);
    let small = packed(n, k, &w);
    let fresh = std::thread::spawn({
        let (x, small) = (x.clone(), small.clone());
        move || {
            let mut out = vec![f32::NAN; rows * n];
            linear_panels(&x, rows, &small, k, n, &mut out);
            out
        }
    })
    .join()
    .expect("fresh thread");
    let (bx, bw, _, _) = case(20, 32, 400);
    let big: Vec<f32> = bx.iter().map(|v| v * 1e3 + 7.0).collect();
    let mut junk = vec![0.0f32; 20 * 32];
    linear_panels(&big, 20, &packed(32, 400, &bw), 400, 32, &mut junk);
    let mut out = vec![f32::NAN; rows * n];
    linear_panels(&x, rows, &small, k, n, &mut out);
    let same = out
        .iter()
        .zip(&fresh)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "a reused buffer changed the result");
}

/// Rows read back from packed panels (the tied-embedding lookup) equal the original rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn rows_read_from_packed_panels_equal_the_row_major_rows() {
    if Bf16Kernel::detect() != Bf16Kernel::Avx512Bf16 {
        return;
    }
    for &(n, k) in &[(70, 67), (32, 64), (5, 1), (100, 768)] {
        let (_, w, _, _) = case(1, n, k);
        let row_major = crate::model::Mat {
            rows: n,
            cols: k,
            data: WeightData::Bf16(w),
        };
        let mut packed = row_major.clone();
        pack_mat(&mut packed, Bf16Kernel::Avx512Bf16);
        let (mut a, mut b) = (vec![0.0f32; k], vec![f32::NAN; k]);
        for r in 0..n {
            row_major.row_to_f32(r, &mut a);
            packed.row_to_f32(r, &mut b);
            assert_eq!(a, b, "n {n} k {k} row {r}");
        }
    }
}
