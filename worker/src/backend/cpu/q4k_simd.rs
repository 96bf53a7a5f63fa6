//! The Q4_K and Q6_K block dots of `q4k.rs` on AVX2 and AVX512-VNNI. Both give the integer
//! sums of the portable loops; only the f32 accumulation order differs.
//!
//! AVX2: `vpmaddubsw` multiplies the unsigned weight codes (Q4_K 0..15, Q6_K 0..63) by the
//! signed activations into i16 pairs (at most 2 * 63 * 127: no saturation), `vpmaddwd`
//! multiplies those by the sub-block scales into i32. AVX512-VNNI: `vpdpbusd` multiplies
//! 64 codes (unsigned, so no sign trick is needed) by 64 activations and sums each 4 into
//! an i32 lane; the lanes are scaled by their sub-block's scale with `vpmulld`.

use std::arch::x86_64::*;

use super::q4k::{Q4K_BYTES, Q6K_BYTES, Q8K, QK_K, q4k_scales_mins};
use super::q8::QKernel;

/// The block dot of a Q4_K (`q6` false) or Q6_K row on `kernel`; `None` when the kernel is
/// portable or this CPU lacks it.
pub(super) fn dot(kernel: QKernel, q6: bool, w: &[u8], x: &Q8K) -> Option<f32> {
    if kernel == QKernel::Portable || !kernel.supported() {
        return None;
    }
    // SAFETY: the CPU has the features each kernel enables (checked just above: F16C with
    // both); every
    // kernel bounds-checks its loads.
    Some(unsafe {
        match (kernel, q6) {
            (QKernel::Avx512Vnni, false) => q4k_vnni(w, x),
            (QKernel::Avx512Vnni, true) => q6k_vnni(w, x),
            (_, false) => q4k_avx2(w, x),
            (_, true) => q6k_avx2(w, x),
        }
    })
}

/// 32 bytes of `s` from `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn ld256<T: Copy>(s: &[T], at: usize) -> __m256i {
    assert!(std::mem::size_of::<T>() == 1 && at + 32 <= s.len());
    // SAFETY: bytes at..at + 32 lie within s (asserted); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

/// 64 bytes of `s` from `at`.
#[inline]
#[target_feature(enable = "avx512f")]
fn ld512<T: Copy>(s: &[T], at: usize) -> __m512i {
    assert!(std::mem::size_of::<T>() == 1 && at + 64 <= s.len());
    // SAFETY: bytes at..at + 64 lie within s (asserted); the load is unaligned.
    unsafe { _mm512_loadu_si512(s.as_ptr().add(at).cast()) }
}

/// The 16 i16 of `s` from `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn ld_i16(s: &[i16], at: usize) -> __m256i {
    assert!(at + 16 <= s.len());
    // SAFETY: elements at..at + 16 lie within s (asserted); the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().add(at).cast()) }
}

/// The f16 at byte `at` of `b`, as f32, with F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16c_at(b: &[u8], at: usize) -> f32 {
    let bits = i32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// `sum_j m_j * (bsum_2j + bsum_2j+1)` as 8 i32 lanes (lane j: `m_j` times its two sums).
#[inline]
#[target_feature(enable = "avx2")]
fn q4k_min_lanes(m: [u8; 8], bsums: &[i16], at: usize) -> __m256i {
    let mv = _mm_shuffle_epi8(_mm_cvtsi64_si128(i64::from_le_bytes(m)), spread(0, 2));
    _mm256_madd_epi16(ld_i16(bsums, at), _mm256_cvtepu8_epi16(mv))
}

/// `sum_s sc_s * bsum_s` as 8 i32 lanes, the 16 signed scales in `scb`.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_offset_lanes(scb: __m128i, bsums: &[i16], at: usize) -> __m256i {
    _mm256_madd_epi16(ld_i16(bsums, at), _mm256_cvtepi8_epi16(scb))
}

/// The 16 bytes of `s` from `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn ld128(s: &[u8], at: usize) -> __m128i {
    assert!(at + 16 <= s.len());
    // SAFETY: bytes at..at + 16 lie within s (asserted); the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().add(at).cast()) }
}

/// A byte shuffle that repeats byte `first + i / per` in byte `i` (16 bytes).
#[inline]
#[target_feature(enable = "avx2")]
fn spread(first: usize, per: usize) -> __m128i {
    let idx: [u8; 16] = std::array::from_fn(|i| (first + i / per) as u8);
    ld128(&idx, 0)
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

fn check(w: &[u8], bytes: usize, x: &Q8K) -> usize {
    let blocks = w.len() / bytes;
    assert!(x.q.len() >= blocks * QK_K && x.d.len() >= blocks && x.bsums.len() >= blocks * 16);
    blocks
}

/// The four 32-value code vectors of one half (128 values) of a Q6_K block: values
/// `32k..32k + 32` of the half in vector k.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_half(blk: &[u8], h: usize) -> [__m256i; 4] {
    let (m4, m3) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
    let (ql0, ql1, qh) = (
        ld256(blk, 64 * h),
        ld256(blk, 64 * h + 32),
        ld256(blk, 128 + 32 * h),
    );
    // Bits 2k..2k + 2 of qh moved to bits 4..6 of each byte (shifts of 16-bit lanes; the
    // masks drop what crosses a byte).
    let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4);
    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4);
    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4);
    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4);
    [
        _mm256_or_si256(_mm256_and_si256(ql0, m4), h0),
        _mm256_or_si256(_mm256_and_si256(ql1, m4), h1),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h2),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h3),
    ]
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_avx2(w: &[u8], x: &Q8K) -> f32 {
    let blocks = check(w, Q4K_BYTES, x);
    let m4 = _mm256_set1_epi8(0x0f);
    let (mut acc, mut mins) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..blocks {
        let blk = &w[b * Q4K_BYTES..(b + 1) * Q4K_BYTES];
        let xb = &x.q[b * QK_K..(b + 1) * QK_K];
        let (sc, m) = q4k_scales_mins(&blk[4..16]);
        let dx = x.d[b];
        let ml = _mm256_cvtepi32_ps(q4k_min_lanes(m, &x.bsums, b * 16));
        mins = _mm256_fmadd_ps(_mm256_set1_ps(f16c_at(blk, 2) * dx), ml, mins);
        let mut sumi = _mm256_setzero_si256();
        for i in 0..4 {
            let q = ld256(blk, 16 + 32 * i);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            let pl = _mm256_maddubs_epi16(lo, ld256(xb, 64 * i));
            let ph = _mm256_maddubs_epi16(hi, ld256(xb, 64 * i + 32));
            let pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(i16::from(sc[2 * i])));
            let ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(i16::from(sc[2 * i + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        let d = _mm256_set1_ps(f16c_at(blk, 0) * dx);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum256(_mm256_sub_ps(acc, mins))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_avx2(w: &[u8], x: &Q8K) -> f32 {
    let blocks = check(w, Q6K_BYTES, x);
    let (mut acc, mut offs) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..blocks {
        let blk = &w[b * Q6K_BYTES..(b + 1) * Q6K_BYTES];
        let xb = &x.q[b * QK_K..(b + 1) * QK_K];
        let scb = ld128(blk, 192);
        let d = f16c_at(blk, 208) * x.d[b];
        let ol = _mm256_cvtepi32_ps(q6k_offset_lanes(scb, &x.bsums, b * 16));
        offs = _mm256_fmadd_ps(_mm256_set1_ps(32.0 * d), ol, offs);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            for (k, q) in q6k_half(blk, h).into_iter().enumerate() {
                let at = 128 * h + 32 * k;
                let p = _mm256_maddubs_epi16(q, ld256(xb, at));
                // i16 lanes 0..8 cover values at..at + 16 (scale at / 16), 8..16 the next 16.
                let scv = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scb, spread(at / 16, 8)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum256(_mm256_sub_ps(acc, offs))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k_vnni(w: &[u8], x: &Q8K) -> f32 {
    let blocks = check(w, Q4K_BYTES, x);
    let m4 = _mm256_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let shuffles = [spread(0, 8), spread(2, 8), spread(4, 8), spread(6, 8)];
    let (mut acc, mut mins) = (_mm512_setzero_ps(), _mm256_setzero_ps());
    for b in 0..blocks {
        let blk = &w[b * Q4K_BYTES..(b + 1) * Q4K_BYTES];
        let xb = &x.q[b * QK_K..(b + 1) * QK_K];
        let (sc, m) = q4k_scales_mins(&blk[4..16]);
        let dx = x.d[b];
        let ml = _mm256_cvtepi32_ps(q4k_min_lanes(m, &x.bsums, b * 16));
        mins = _mm256_fmadd_ps(_mm256_set1_ps(f16c_at(blk, 2) * dx), ml, mins);
        let scb = _mm_cvtsi64_si128(i64::from_le_bytes(sc));
        let mut sumi = zero;
        for (i, shuffle) in shuffles.iter().enumerate() {
            // Values 64i..64i + 64 in order: the low nibbles, then the high ones.
            let q = ld256(blk, 16 + 32 * i);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            let codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            let dots = _mm512_dpbusd_epi32(zero, codes, ld512(xb, 64 * i));
            let scv = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(scb, *shuffle));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dots, scv));
        }
        let d = _mm512_set1_ps(f16c_at(blk, 0) * dx);
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc) - hsum256(mins)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k_vnni(w: &[u8], x: &Q8K) -> f32 {
    let blocks = check(w, Q6K_BYTES, x);
    let zero = _mm512_setzero_si512();
    let shuffles = [spread(0, 4), spread(4, 4), spread(8, 4), spread(12, 4)];
    let (mut acc, mut offs) = (_mm512_setzero_ps(), _mm256_setzero_ps());
    for b in 0..blocks {
        let blk = &w[b * Q6K_BYTES..(b + 1) * Q6K_BYTES];
        let xb = &x.q[b * QK_K..(b + 1) * QK_K];
        let scb = ld128(blk, 192);
        let d = f16c_at(blk, 208) * x.d[b];
        let ol = _mm256_cvtepi32_ps(q6k_offset_lanes(scb, &x.bsums, b * 16));
        offs = _mm256_fmadd_ps(_mm256_set1_ps(32.0 * d), ol, offs);
        let mut sumi = zero;
        for h in 0..2 {
            let [k0, k1, k2, k3] = q6k_half(blk, h);
            for (c, (a, z)) in [(k0, k1), (k2, k3)].into_iter().enumerate() {
                // 64 values from 128h + 64c; i32 lane l covers values 4l..4l + 4, so each 4
                // lanes share one 16-value scale (bytes 4j..4j + 4 of the 16, j = 2h + c).
                let j = 2 * h + c;
                let codes = _mm512_inserti64x4(_mm512_castsi256_si512(a), z, 1);
                let dots = _mm512_dpbusd_epi32(zero, codes, ld512(xb, 64 * j));
                let scv = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(scb, shuffles[j]));
                sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(dots, scv));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    _mm512_reduce_add_ps(acc) - hsum256(offs)
}
