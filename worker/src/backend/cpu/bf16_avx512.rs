//! AVX512_BF16 primitives of the bf16 GEMM mode: rounding, small-batch dot blocks and the
//! register-blocked micro-kernel of the many-row GEMM.
//!
//! Every function needs avx512f, avx512bw and avx512bf16; callers check
//! [`super::bf16::Bf16Kernel::detect`] first. `vdpbf16ps` multiplies pairs of adjacent bf16
//! elements and adds both products into one f32 lane, so a dot product over 32 elements of
//! two rows is one instruction; a product of two bf16 numbers is exact in f32.

use std::arch::x86_64::*;

/// Rows of the many-row micro-kernel (input rows sharing one packed weight panel).
pub const MR: usize = 12;
/// Columns of the many-row micro-kernel (weight rows of a packed panel, two zmm registers).
pub const NR: usize = 32;

/// Reinterprets 32 bf16 bit patterns as the bf16 vector type.
#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both types are 64 bytes of plain bits; every bit pattern is valid for both.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Loads `len` (at most 32) bf16 elements at `p`, zero-filling the other lanes.
///
/// # Safety
/// `p..p + len` must be readable; the CPU must support avx512f and avx512bw.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_bf16(p: *const u16, len: usize) -> __m512bh {
    // SAFETY: the caller guarantees len elements at p; masked-off lanes are not read.
    unsafe {
        if len >= 32 {
            bh(_mm512_loadu_si512(p as *const __m512i))
        } else {
            let mask: __mmask32 = (1u32 << len) - 1;
            bh(_mm512_maskz_loadu_epi16(mask, p as *const i16))
        }
    }
}

/// Rounds `x` to bf16 (round to nearest even, `vcvtneps2bf16`) into `out`.
///
/// # Safety
/// The CPU must support avx512f, avx512bw and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn round_into(x: &[f32], out: &mut [u16]) {
    let n = x.len().min(out.len());
    let body = n / 16 * 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n, so the 16-lane load and the 16-element store stay in bounds.
        unsafe {
            let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
            let bits = std::mem::transmute::<__m256bh, __m256i>(b);
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, bits);
        }
        i += 16;
    }
    for j in body..n {
        out[j] = super::bf16::to_bf16(x[j]);
    }
}

/// `x . w` over bf16 rows of length `k`.
///
/// # Safety
/// Both slices hold at least `k` elements; the CPU must support avx512f, avx512bw and
/// avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dot(x: &[u16], w: &[u16], k: usize) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut p = 0;
    while p + 64 <= k {
        // SAFETY: p + 64 <= k and both rows hold k elements.
        unsafe {
            a0 = _mm512_dpbf16_ps(
                a0,
                load_bf16(x.as_ptr().add(p), 32),
                load_bf16(w.as_ptr().add(p), 32),
            );
            a1 = _mm512_dpbf16_ps(
                a1,
                load_bf16(x.as_ptr().add(p + 32), 32),
                load_bf16(w.as_ptr().add(p + 32), 32),
            );
        }
        p += 64;
    }
    while p < k {
        let len = (k - p).min(32);
        // SAFETY: p + len <= k and both rows hold k elements.
        unsafe {
            a0 = _mm512_dpbf16_ps(
                a0,
                load_bf16(x.as_ptr().add(p), len),
                load_bf16(w.as_ptr().add(p), len),
            );
        }
        p += 32;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// `acc[i][j] = xs[i] . ws[j]` for 4 input rows and 4 weight rows of length `k` (bf16).
///
/// # Safety
/// Every slice holds at least `k` elements; the CPU must support avx512f, avx512bw and
/// avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn block_4x4(xs: [&[u16]; 4], ws: [&[u16]; 4], k: usize) -> [[f32; 4]; 4] {
    let mut a = [[_mm512_setzero_ps(); 4]; 4];
    let body = k / 32 * 32;
    // Full 32-element steps without a branch in the loop (a masked-load branch made the
    // compiler spill an accumulator), then one masked step for the tail.
    let mut p = 0;
    while p < body {
        // SAFETY: p + 32 <= k and every row holds k elements.
        unsafe { step_4x4(&mut a, xs, ws, p, 32) };
        p += 32;
    }
    if body < k {
        // SAFETY: body + (k - body) = k and every row holds k elements.
        unsafe { step_4x4(&mut a, xs, ws, body, k - body) };
    }
    sums_4x4(&a)
}

/// One step of [`block_4x4`] over elements `p..p + len` (len at most 32).
///
/// # Safety
/// Every row holds at least `p + len` elements; the CPU must support avx512f, avx512bw and
/// avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn step_4x4(
    a: &mut [[__m512; 4]; 4],
    xs: [&[u16]; 4],
    ws: [&[u16]; 4],
    p: usize,
    len: usize,
) {
    // SAFETY: the caller guarantees p + len elements in every row.
    unsafe {
        let w = [
            load_bf16(ws[0].as_ptr().add(p), len),
            load_bf16(ws[1].as_ptr().add(p), len),
            load_bf16(ws[2].as_ptr().add(p), len),
            load_bf16(ws[3].as_ptr().add(p), len),
        ];
        for i in 0..4 {
            let x = load_bf16(xs[i].as_ptr().add(p), len);
            for j in 0..4 {
                a[i][j] = _mm512_dpbf16_ps(a[i][j], x, w[j]);
            }
        }
    }
}

/// Horizontal sums of 16 accumulators, four at a time: fold 512 to 256 bits, then two rounds
/// of `hadd` leave the four sums spread over two 128-bit halves, added once.
#[target_feature(enable = "avx512f")]
#[inline]
fn sums_4x4(a: &[[__m512; 4]; 4]) -> [[f32; 4]; 4] {
    let mut out = [[0.0f32; 4]; 4];
    for (i, row) in a.iter().enumerate() {
        // Fold the upper 256 bits onto the lower ones.
        let [f0, f1, f2, f3] = row.map(|v| {
            _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
            )
        });
        // hadd pairs neighbouring lanes: [f0 f1 | f0 f1] sums per 128-bit lane.
        let h01 = _mm256_hadd_ps(f0, f1);
        let h23 = _mm256_hadd_ps(f2, f3);
        let h = _mm256_hadd_ps(h01, h23);
        // h's low and high 128-bit halves each hold [s0 s1 s2 s3] partial sums.
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut lanes = [0.0f32; 4];
        // SAFETY: lanes has room for 4 f32.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), s) };
        out[i] = lanes;
    }
    out
}

/// Packs weight rows `n0..n0 + NR` (fewer past `n`) of the row-major `n x k` bf16 `w` into
/// `panel` as `kp` groups of NR dwords: group p holds, for each row, elements 2p and 2p + 1
/// (the pair `vdpbf16ps` multiplies). Missing rows and the odd tail element are zero.
pub fn pack_panel(w: &[u16], n: usize, k: usize, n0: usize, panel: &mut [u32]) {
    let kp = k.div_ceil(2);
    debug_assert!(panel.len() >= kp * NR);
    let full = k / 2;
    for c in 0..NR {
        let r = n0 + c;
        if r >= n {
            for p in 0..kp {
                panel[p * NR + c] = 0;
            }
            continue;
        }
        let row = &w[r * k..(r + 1) * k];
        for p in 0..full {
            panel[p * NR + c] = u32::from(row[2 * p]) | (u32::from(row[2 * p + 1]) << 16);
        }
        if kp > full {
            panel[full * NR + c] = u32::from(row[k - 1]);
        }
    }
}

/// `tile[i][c] = sum_p a_i[p] . panel[p][c]` for MR input rows: `a` holds the rows as bf16
/// pairs (row i starts at `i * stride`), `panel` is a packed NR-column panel of `kp` pairs.
///
/// # Safety
/// `a` holds `(MR - 1) * stride + kp` dwords and `panel` `kp * NR`; the CPU must support
/// avx512f and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn kernel_mr_nr(a: &[u32], stride: usize, panel: &[u32], kp: usize) -> [[f32; NR]; MR] {
    debug_assert!(a.len() >= (MR - 1) * stride + kp && panel.len() >= kp * NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (ap, bp) = (a.as_ptr(), panel.as_ptr());
    for p in 0..kp {
        // SAFETY: p < kp, so the panel loads read group p and every broadcast reads a dword
        // inside row i (the bounds are asserted by the caller's contract above).
        unsafe {
            let b0 = bh(_mm512_loadu_si512(bp.add(p * NR) as *const __m512i));
            let b1 = bh(_mm512_loadu_si512(bp.add(p * NR + 16) as *const __m512i));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = bh(_mm512_set1_epi32(*ap.add(i * stride + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
    }
    let mut tile = [[0.0f32; NR]; MR];
    for (t, a) in tile.iter_mut().zip(&acc) {
        // SAFETY: each tile row has NR = 32 f32, two 16-lane stores.
        unsafe {
            _mm512_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(t.as_mut_ptr().add(16), a[1]);
        }
    }
    tile
}
