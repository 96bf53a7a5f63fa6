//! 16-lane f32 math on AVX-512: `exp`, softmax and SiLU gating.

use std::arch::x86_64::*;

/// In-place softmax on 16 lanes with [`exp16`].
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub fn softmax16(x: &mut [f32]) {
    let n = x.len();
    let mask = |i: usize| -> __mmask16 {
        let m = (n - i).min(16);
        ((1u32 << m) - 1) as __mmask16
    };
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut mx = ninf;
    for i in (0..n).step_by(16) {
        // SAFETY: the mask covers only elements below n.
        let v = unsafe { _mm512_mask_loadu_ps(ninf, mask(i), x.as_ptr().add(i)) };
        mx = _mm512_max_ps(mx, v);
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        // SAFETY: as above.
        unsafe {
            let v = _mm512_mask_loadu_ps(ninf, mask(i), x.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(v, m));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), mask(i), e);
        }
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for i in (0..n).step_by(16) {
        // SAFETY: as above.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = _mm512_mask_loadu_ps(_mm512_setzero_ps(), mask(i), p);
            _mm512_mask_storeu_ps(p, mask(i), _mm512_mul_ps(v, inv));
        }
    }
}

/// `e^x` on 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r
/// (relative error about 2e-7, a couple of ulps), then `vscalefps` by 2^n, which also gives
/// 0 for -inf and very negative x and inf for large x.
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub fn exp16(x: __m512) -> __m512 {
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-103.0));
    let xc = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(89.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // r = x - n ln2 in two steps (ln2 split into a part exact in f32 and the rest).
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let c = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = _mm512_set1_ps(c[0]);
    for &ci in &c[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ci));
    }
    let e = _mm512_scalef_ps(p, n);
    // Far below the smallest f32 (and -inf, the masked lanes of a softmax): exactly 0.
    _mm512_maskz_mov_ps(keep, e)
}

/// `out[i] = silu(gate[i]) * up[i]` where `gate_up = [gate; up]`, 16 lanes at a time.
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub fn silu_mul16(gate_up: &[f32], out: &mut [f32]) {
    let n = out.len();
    assert!(gate_up.len() >= 2 * n, "silu_mul16 bounds");
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let m: __mmask16 = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        // SAFETY: the mask covers elements i..min(i + 16, n) of gate, up and out.
        unsafe {
            let g = _mm512_maskz_loadu_ps(m, gate_up.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(m, gate_up.as_ptr().add(n + i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_mul_ps(s, u));
        }
    }
}

/// [`silu_mul16`] of `gate` and `up` (each `out.len()` long), rounded to bf16 bits with
/// `vcvtneps2bf16` (the rounding of the bf16 GEMM's inputs): the same bits as `silu_mul16`
/// followed by `bf16_avx512::round_into`.
///
/// # Safety
/// The CPU must support avx512f, avx512bw and avx512bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn silu_mul_bf16(gate: &[f32], up: &[f32], out: &mut [u16]) {
    let n = out.len();
    assert!(gate.len() >= n && up.len() >= n, "silu_mul_bf16 bounds");
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let m: __mmask16 = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        // SAFETY: the mask covers elements i..min(i + 16, n) of gate, up and out.
        unsafe {
            let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            let b = _mm512_cvtneps_pbh(_mm512_mul_ps(s, u));
            let bits = _mm512_castsi256_si512(std::mem::transmute::<__m256bh, __m256i>(b));
            _mm512_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, m as __mmask32, bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused gating gives the bits of the f32 gating followed by the GEMM's rounding.
    #[test]
    fn silu_mul_bf16_is_silu_mul16_then_rounding() {
        if super::super::bf16::Bf16Kernel::detect() != super::super::bf16::Bf16Kernel::Avx512Bf16 {
            return;
        }
        for n in [1usize, 15, 16, 37, 2048] {
            let gu: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
                .collect();
            let mut f = vec![0.0f32; n];
            let mut want = vec![0u16; n];
            let mut got = vec![0xffffu16; n + 3];
            // SAFETY: the CPU features were checked above.
            unsafe {
                silu_mul16(&gu, &mut f);
                super::super::bf16_avx512::round_into(&f, &mut want);
                silu_mul_bf16(&gu[..n], &gu[n..], &mut got[..n]);
            }
            assert_eq!(&got[..n], &want[..], "n {n}");
            assert!(got[n..].iter().all(|&b| b == 0xffff), "wrote past the end");
        }
    }

    #[test]
    fn vector_exp_matches_the_scalar_exp() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -95.0 + i as f32 * 0.0459).collect();
        for c in xs.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: avx512f checked above; both arrays hold 16 floats.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                let want = f64::from(*x).exp();
                let rel = ((f64::from(g) - want) / want).abs();
                assert!(rel < 1e-6 || want < 1e-37, "exp({x}) = {g}, want {want}");
            }
        }
        let mut got = [0.0f32; 16];
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_set1_ps(f32::NEG_INFINITY))) };
        assert!(got.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn vector_silu_and_softmax_match_the_scalar_kernels() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for n in [1usize, 15, 16, 37, 2048] {
            let gu: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.31)
                .collect();
            let mut want = vec![0.0f32; n];
            super::super::kernels::silu_mul_scalar(&gu, &mut want);
            let mut got = vec![f32::NAN; n];
            // SAFETY: avx512f checked above.
            unsafe { silu_mul16(&gu, &mut got) };
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "silu {g} vs {w}");
            }
            let mut want = gu[..n].to_vec();
            super::super::kernels::softmax(&mut want);
            let mut got = gu[..n].to_vec();
            // SAFETY: avx512f checked above.
            unsafe { softmax16(&mut got) };
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "softmax {g} vs {w}");
            }
        }
    }
}
