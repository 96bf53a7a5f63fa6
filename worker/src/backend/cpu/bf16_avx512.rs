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
const _: () = assert!(NR == crate::model::PANEL_ROWS, "panels hold NR weight rows");

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

/// f32 to bf16 bits exactly as `half::bf16::from_f32` (the KV cache's conversion) rounds
/// them: to nearest even with integer arithmetic, so denormals keep their bits (where
/// `vcvtneps2bf16` flushes them to zero) and a NaN becomes a quiet NaN of the same sign and
/// high payload bits.
///
/// # Safety
/// The CPU must support avx512f and avx512bw.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn round_like_half(x: &[f32], out: &mut [u16]) {
    let n = x.len().min(out.len());
    let body = n / 16 * 16;
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    let inf = _mm512_set1_epi32(0x7f80_0000);
    let half_ulp = _mm512_set1_epi32(0x7fff);
    let one = _mm512_set1_epi32(1);
    let quiet = _mm512_set1_epi32(0x40);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n, so the 16-lane load and the 16-element store stay in bounds.
        unsafe {
            let b = _mm512_loadu_si512(x.as_ptr().add(i) as *const __m512i);
            let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs_mask), inf);
            let hi = _mm512_srli_epi32::<16>(b);
            // Adding 0x7fff plus the kept lowest bit carries into bit 16 exactly when the
            // dropped half is above one half, or equal to it with the kept part odd.
            let bias = _mm512_add_epi32(half_ulp, _mm512_and_si512(hi, one));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
            let r = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(hi, quiet));
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i) as *mut __m256i,
                _mm512_cvtepi32_epi16(r),
            );
        }
        i += 16;
    }
    for j in body..n {
        out[j] = half::bf16::from_f32(x[j]).to_bits();
    }
}

/// Asks for the cache lines of `w` (into L2), one prefetch per 64 bytes.
pub fn prefetch(w: &[u16]) {
    for i in (0..w.len()).step_by(32) {
        // SAFETY: a prefetch is a hint that never faults; the address lies inside w.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().add(i) as *const i8) };
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
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub unsafe fn pack_panel(w: &[u16], n: usize, k: usize, n0: usize, panel: &mut [u32]) {
    let kp = k.div_ceil(2);
    assert!(
        panel.len() >= kp * NR && w.len() >= n * k,
        "pack_panel bounds"
    );
    let mut done = 0;
    if k.is_multiple_of(2) && n0 + NR <= n {
        // Full panel of dword rows: 16 x 16 transposes.
        done = kp / 16 * 16;
        for c0 in (0..NR).step_by(16) {
            for p0 in (0..done).step_by(16) {
                // SAFETY: rows n0 + c0 + i < n hold kp dwords each, p0 + 16 <= kp; the
                // stores write groups p0..p0 + 16, columns c0..c0 + 16 of the panel.
                unsafe {
                    let src = w.as_ptr().add((n0 + c0) * k + 2 * p0) as *const u32;
                    let rows: [__m512i; 16] = std::array::from_fn(|i| {
                        _mm512_loadu_si512(src.add(i * kp) as *const __m512i)
                    });
                    let cols = transpose16(rows);
                    for (j, col) in cols.iter().enumerate() {
                        let dst = panel.as_mut_ptr().add((p0 + j) * NR + c0);
                        _mm512_storeu_si512(dst as *mut __m512i, *col);
                    }
                }
            }
        }
    }
    for c in 0..NR {
        let r = n0 + c;
        if r >= n {
            for p in done..kp {
                panel[p * NR + c] = 0;
            }
            continue;
        }
        let row = &w[r * k..(r + 1) * k];
        for p in done..kp {
            let hi = row.get(2 * p + 1).copied().unwrap_or(0);
            panel[p * NR + c] = u32::from(row[2 * p]) | (u32::from(hi) << 16);
        }
    }
}

/// The row-major `n x k` bf16 `w` as `n.div_ceil(NR)` panels of [`pack_panel`]'s layout
/// (`WeightData::Bf16Panels`), packed in parallel on the current pool.
///
/// # Safety
/// The CPU must support avx512f.
pub unsafe fn pack(w: &[u16], n: usize, k: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; n.div_ceil(NR) * kp * NR];
    // A step streams every weight once; with 4 KiB pages that is a TLB miss and a stop of
    // the hardware prefetcher every 4 KiB.
    if super::bf16::weight_huge_pages() {
        super::advise_huge_pages(&mut out);
    }
    out.par_chunks_mut((kp * NR).max(1))
        .enumerate()
        // SAFETY: the caller guarantees avx512f; each chunk is one panel of kp * NR dwords.
        .for_each(|(j, panel)| unsafe { pack_panel(w, n, k, j * NR, panel) });
    out
}

/// Transposes a 16 x 16 matrix of dwords held as 16 rows.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: interleave dwords of row pairs, then qwords of pair pairs,
    // which leaves s[4g + q] holding, in lane L, column 4L + q of rows 4g..4g + 3.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut s = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        s[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        s[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        s[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        s[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // Gather lane L of s[q], s[4 + q], s[8 + q], s[12 + q] into column 4L + q.
    let mut out = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(s[q], s[4 + q]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(s[q], s[4 + q]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(s[8 + q], s[12 + q]);
        let v3 = _mm512_shuffle_i32x4::<0xEE>(s[8 + q], s[12 + q]);
        out[q] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        out[4 + q] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
        out[8 + q] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        out[12 + q] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
    }
    out
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

/// The mask of the first `n` of 16 lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Cache lines that a [`tile`] call asks for while it runs: `lines` lines of 64 bytes from `at`
/// on, spread evenly over the call's `kp` steps (one prefetch per step, at most every line
/// once), into L2 or L1. Used for a share of the *next* panel, so that memory streams it
/// while this panel is multiplied from cache.
///
/// `stream`, when not zero, is for tiles of up to 4 rows (batch-1 decode, short drafts),
/// which read each panel line once from memory: every step also asks for the lines `stream`
/// bytes further on in the panel stream (into L2; past the panel's end that is the next
/// panel of the task's run, contiguous in memory). One core streams only as many lines at
/// once as its L1 fill buffers hold; the prefetches keep the L2 queue full as well, which
/// raised one thread's GEMV read rate from about 0.77x to 0.95-1.0x of a plain read loop.
#[derive(Clone, Copy, Debug)]
pub struct Ahead {
    pub at: *const u8,
    pub lines: usize,
    pub l1: bool,
    pub stream: usize,
}

impl Ahead {
    /// Nothing ahead.
    pub const NONE: Self = Self {
        at: std::ptr::null(),
        lines: 0,
        l1: false,
        stream: 0,
    };
}

/// Where a [`tile`] stores its `M x width` results: row i at `rows[i]`, `width` (at most
/// [`NR`]) consecutive f32 (rows need not be evenly spaced: the logits of a batch go straight
/// into each sequence's own vector).
#[derive(Clone, Copy, Debug)]
pub struct Dst {
    pub rows: [*mut f32; MR],
    pub width: usize,
}

/// `dst[i][c] = a_i . panel column c` for `M` (at most [`MR`]) input rows of `kp` bf16 pairs at
/// row stride `stride`, over one packed panel read in a single sequential stream, stored
/// straight from the registers (masked past `dst.width`). Up to 4 rows, even and odd pairs
/// go to two accumulator sets, so the `vdpbf16ps` latency is hidden with few rows; with more,
/// the next 2 KB of the panel are prefetched, and so are the lines of `ahead` (ignored up to
/// 4 rows). The prefetches do not change the result.
///
/// # Safety
/// `a` points at `(M - 1) * stride + kp` readable dwords and `panel` at `kp * NR`; `M <= MR`;
/// `dst` names `M` rows of `dst.width <= NR` writable f32 that no other thread touches; the
/// CPU must support avx512f, avx512bw and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn tile<const M: usize>(
    a: *const u32,
    stride: usize,
    panel: *const u32,
    kp: usize,
    dst: Dst,
    ahead: Ahead,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let mut acc2 = [[_mm512_setzero_ps(); 2]; M];
    let two = M <= 4;
    let mut p = 0;
    // SAFETY: every panel load reads pairs p (and p + 1) < kp of the panel, every broadcast a
    // dword p < kp of row i < M; prefetches are hints that never fault.
    unsafe {
        if two {
            let far = (panel as *const u8).wrapping_add(ahead.stream);
            while p + 2 <= kp {
                if ahead.stream > 0 {
                    // The 4 lines of this step's 256 bytes, `stream` bytes on.
                    let line = far.wrapping_add(p * NR * 4) as *const i8;
                    _mm_prefetch::<_MM_HINT_T1>(line);
                    _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
                    _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(128));
                    _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(192));
                }
                let b0 = bh(_mm512_loadu_si512(panel.add(p * NR) as *const __m512i));
                let b1 = bh(_mm512_loadu_si512(panel.add(p * NR + 16) as *const __m512i));
                let c0 = bh(_mm512_loadu_si512(panel.add(p * NR + NR) as *const __m512i));
                let c1 = bh(_mm512_loadu_si512(
                    panel.add(p * NR + NR + 16) as *const __m512i
                ));
                for (i, (r, r2)) in acc.iter_mut().zip(acc2.iter_mut()).enumerate() {
                    let av = bh(_mm512_set1_epi32(*a.add(i * stride + p) as i32));
                    r[0] = _mm512_dpbf16_ps(r[0], av, b0);
                    r[1] = _mm512_dpbf16_ps(r[1], av, b1);
                    let av = bh(_mm512_set1_epi32(*a.add(i * stride + p + 1) as i32));
                    r2[0] = _mm512_dpbf16_ps(r2[0], av, c0);
                    r2[1] = _mm512_dpbf16_ps(r2[1], av, c1);
                }
                p += 2;
            }
        }
        // Line of `ahead` for step p: (p * step) >> 16 with step = lines / kp in 16.16 fixed
        // point, so the lines are spread evenly; while lines <= kp consecutive steps move by
        // at most one line, and at most the last line or so is left out (rounding down).
        let step = (ahead.lines << 16).checked_div(kp).unwrap_or(0);
        let (far, far_l1) = (ahead.lines > 0 && !two, ahead.l1);
        while p < kp {
            if !two {
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((p + 16) * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((p + 16) * NR + 16) as *const i8);
            }
            if far {
                let line = ahead.at.wrapping_add(((p * step) >> 16) * 64) as *const i8;
                if far_l1 {
                    _mm_prefetch::<_MM_HINT_T0>(line);
                } else {
                    _mm_prefetch::<_MM_HINT_T1>(line);
                }
            }
            let b0 = bh(_mm512_loadu_si512(panel.add(p * NR) as *const __m512i));
            let b1 = bh(_mm512_loadu_si512(panel.add(p * NR + 16) as *const __m512i));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = bh(_mm512_set1_epi32(*a.add(i * stride + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
            p += 1;
        }
        let w = dst.width.min(NR);
        let (m0, m1) = (lanes(w), lanes(w.saturating_sub(16)));
        for (i, (r, r2)) in acc.iter().zip(&acc2).enumerate() {
            let (s0, s1) = if two {
                (_mm512_add_ps(r[0], r2[0]), _mm512_add_ps(r[1], r2[1]))
            } else {
                (r[0], r[1])
            };
            let d = dst.rows[i];
            if w == NR {
                _mm512_storeu_ps(d, s0);
                _mm512_storeu_ps(d.add(16), s1);
            } else {
                // Masked-off lanes are not written (nor touched).
                _mm512_mask_storeu_ps(d, m0, s0);
                _mm512_mask_storeu_ps(d.add(16), m1, s1);
            }
        }
    }
}

/// [`tile`] by f32 FMAs on the panel widened in registers, for 3 or more rows: `af` holds the
/// input rows widened to f32 (row i at `i * stride` floats, element 2p and 2p + 1 of pair p
/// at 2p and 2p + 1), every weight dword is split into its even (shifted up) and odd
/// (masked) element, and each accumulator adds the odd product first, then the even one:
/// the order in which `vdpbf16ps` adds them. A product of two bf16 numbers is exact in f32
/// and every addition rounds to nearest even in both, so the bits are those of [`tile`]
/// except where a sum falls below f32's normal range (`vdpbf16ps` flushes denormals to
/// zero, FMA keeps them). On this CPU `vdpbf16ps` (32 products) issues at about a quarter
/// of the FMA rate (16 products): with a panel line shared by 3 or more rows the product
/// is compute-bound and the FMAs do it 1.4 to 1.8x faster (5 to 12 rows, one thread,
/// panels in L2). Prefetches as in [`tile`]: `ahead.stream` when set, else the next 2 KB
/// of the panel and the lines of `ahead`.
///
/// # Safety
/// `af` points at `(M - 1) * stride + 2 * kp` readable f32 and `panel` at `kp * NR` dwords;
/// `M <= MR`; `dst` names `M` rows of `dst.width <= NR` writable f32 that no other thread
/// touches; the CPU must support avx512f and avx512bw.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn tile_f32<const M: usize>(
    af: *const f32,
    stride: usize,
    panel: *const u32,
    kp: usize,
    dst: Dst,
    ahead: Ahead,
) {
    // Up to 4 rows, as in `tile`, even and odd pairs go to two accumulator sets (the same
    // order of additions, and two FMA chains in flight per register).
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let mut acc2 = [[_mm512_setzero_ps(); 2]; M];
    let two = M <= 4;
    let odd_mask = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let step = (ahead.lines << 16).checked_div(kp).unwrap_or(0);
    let far = (panel as *const u8).wrapping_add(ahead.stream);
    // Pair p of the panel times pair p of every row, into `acc`.
    let pair = |acc: &mut [[__m512; 2]; M], p: usize| {
        // SAFETY: p < kp: the loads read pair p of the panel, the broadcasts floats 2p and
        // 2p + 1 < 2 kp of row i < M (the caller's contract); prefetches never fault.
        unsafe {
            if ahead.stream > 0 {
                let line = far.wrapping_add(p * NR * 4) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(line);
                _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
            } else {
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((p + 16) * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((p + 16) * NR + 16) as *const i8);
                if ahead.lines > 0 {
                    let line = ahead.at.wrapping_add(((p * step) >> 16) * 64) as *const i8;
                    if ahead.l1 {
                        _mm_prefetch::<_MM_HINT_T0>(line);
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(line);
                    }
                }
            }
            let b0 = _mm512_loadu_si512(panel.add(p * NR) as *const __m512i);
            let b1 = _mm512_loadu_si512(panel.add(p * NR + 16) as *const __m512i);
            let (o0, o1) = (
                _mm512_castsi512_ps(_mm512_and_si512(b0, odd_mask)),
                _mm512_castsi512_ps(_mm512_and_si512(b1, odd_mask)),
            );
            let (e0, e1) = (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b0)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b1)),
            );
            for (i, row) in acc.iter_mut().enumerate() {
                let x = af.add(i * stride + 2 * p);
                let (xo, xe) = (_mm512_set1_ps(*x.add(1)), _mm512_set1_ps(*x));
                row[0] = _mm512_fmadd_ps(xo, o0, row[0]);
                row[1] = _mm512_fmadd_ps(xo, o1, row[1]);
                row[0] = _mm512_fmadd_ps(xe, e0, row[0]);
                row[1] = _mm512_fmadd_ps(xe, e1, row[1]);
            }
        }
    };
    let mut p = 0;
    if two {
        while p + 2 <= kp {
            pair(&mut acc, p);
            pair(&mut acc2, p + 1);
            p += 2;
        }
    }
    while p < kp {
        pair(&mut acc, p);
        p += 1;
    }
    let w = dst.width.min(NR);
    let (m0, m1) = (lanes(w), lanes(w.saturating_sub(16)));
    for (i, (r, r2)) in acc.iter().zip(&acc2).enumerate() {
        let (s0, s1) = if two {
            (_mm512_add_ps(r[0], r2[0]), _mm512_add_ps(r[1], r2[1]))
        } else {
            (r[0], r[1])
        };
        let d = dst.rows[i];
        // SAFETY: dst names M rows of `width` writable f32 (the caller's contract); masked-off
        // lanes are not written.
        unsafe {
            if w == NR {
                _mm512_storeu_ps(d, s0);
                _mm512_storeu_ps(d.add(16), s1);
            } else {
                _mm512_mask_storeu_ps(d, m0, s0);
                _mm512_mask_storeu_ps(d.add(16), m1, s1);
            }
        }
    }
}

/// Widens rows of bf16 pairs (`kp` dwords each, row i at `i * stride`) into f32 rows of `2 *
/// kp` floats at `i * fstride` in `out`, for [`tile_f32`].
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub unsafe fn widen_pairs(xa: &[u32], stride: usize, kp: usize, out: &mut [f32], fstride: usize) {
    let rows = out.len() / fstride;
    assert!(
        fstride >= 2 * kp && (rows == 0 || xa.len() >= (rows - 1) * stride + kp),
        "widen_pairs bounds"
    );
    for (i, o) in out.chunks_exact_mut(fstride).enumerate() {
        let src = &xa[i * stride..i * stride + kp];
        for (d, &v) in o.chunks_exact_mut(2).zip(src) {
            d[0] = f32::from_bits(v << 16);
            d[1] = f32::from_bits(v & 0xffff_0000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packing written out one element at a time.
    fn naive_pack(w: &[u16], n: usize, k: usize, n0: usize) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; kp * NR];
        for c in 0..NR {
            for p in 0..kp {
                let at = |i: usize| {
                    if n0 + c < n && i < k {
                        u32::from(w[(n0 + c) * k + i])
                    } else {
                        0
                    }
                };
                out[p * NR + c] = at(2 * p) | (at(2 * p + 1) << 16);
            }
        }
        out
    }

    /// The KV cache's vector conversion gives the bits of `half::bf16::from_f32` for every
    /// kind of value: ties both ways, denormals, infinities, overflow, NaNs with payloads,
    /// and a long run of scattered bit patterns (with a tail shorter than a vector).
    #[test]
    fn round_like_half_matches_half_bit_for_bit() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            return;
        }
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x0000_8001,
            0x807f_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0x7fbf_8000,
        ];
        let mut s = 0x9e37_79b9_u32;
        for _ in 0..100_003 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            bits.push(s);
        }
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![0u16; x.len()];
        // SAFETY: the CPU features were checked above.
        unsafe { round_like_half(&x, &mut got) };
        for (i, (&v, &g)) in x.iter().zip(&got).enumerate() {
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(g, want, "element {i}: {:#010x}", v.to_bits());
        }
    }

    /// Packing into memory advised for huge pages (a matrix of 8 MB, so it holds whole 2 MiB
    /// pages) gives the same panels as packing without the advice.
    #[test]
    fn packing_on_huge_pages_gives_the_same_panels() {
        if super::super::bf16::Bf16Kernel::detect() == super::super::bf16::Bf16Kernel::Portable {
            return;
        }
        let (n, k) = (4096, 1024);
        let w: Vec<u16> = (0..n * k).map(|i| ((i * 40503) >> 3) as u16).collect();
        let pack_with = |huge: bool| {
            super::super::bf16::set_weight_huge_pages(huge);
            // SAFETY: detect() reported AVX512_BF16, which implies avx512f.
            let p = unsafe { pack(&w, n, k) };
            super::super::bf16::set_weight_huge_pages(true);
            p
        };
        let (plain, huge) = (pack_with(false), pack_with(true));
        assert_eq!(plain.len(), n / NR * (k / 2) * NR);
        assert!(plain == huge, "huge-page packing changed the panels");
        assert_eq!(&plain[..NR * 2], &naive_pack(&w, n, k, 0)[..NR * 2]);
    }

    #[test]
    fn packed_panels_match_the_naive_layout() {
        if super::super::bf16::Bf16Kernel::detect() == super::super::bf16::Bf16Kernel::Portable {
            return;
        }
        // Full panels (transposed 16 x 16), odd k, short last panels and long tails.
        for &(n, k) in &[(64, 64), (70, 96), (40, 67), (33, 36), (96, 770)] {
            let w: Vec<u16> = (0..n * k)
                .map(|i| ((i * 2654435761usize) >> 7) as u16)
                .collect();
            for n0 in (0..n).step_by(NR) {
                let mut got = vec![u32::MAX; k.div_ceil(2) * NR];
                // SAFETY: detect() reported AVX512_BF16, which implies avx512f.
                unsafe { pack_panel(&w, n, k, n0, &mut got) };
                assert_eq!(got, naive_pack(&w, n, k, n0), "n {n} k {k} n0 {n0}");
            }
        }
    }
}
