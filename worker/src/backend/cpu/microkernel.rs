//! Register-blocked kernel for small batches: 4 weight rows x 4 input rows per block.
//!
//! The 4 weight rows are widened to f32 once (12 KiB at K = 768, inside L1) and every input
//! row of the batch is multiplied against them with 16 independent accumulators, so the FMA
//! units rather than load latency set the pace.

/// Weight rows per block.
pub const WR: usize = 4;
/// Input rows per block.
pub const XR: usize = 4;

/// `acc[i][j] = x[i] . w[j]` for `i < xs.len()` (at most XR) and `j < WR`; rows have length k.
pub fn block(xs: &[&[f32]], ws: &[&[f32]; WR], k: usize) -> [[f32; WR]; XR] {
    #[cfg(target_arch = "x86_64")]
    {
        if xs.len() == XR && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above); all rows have length k.
            return unsafe { avx512_block(xs, ws, k) };
        }
    }
    let mut acc = [[0.0f32; WR]; XR];
    for (i, x) in xs.iter().enumerate().take(XR) {
        for (j, w) in ws.iter().enumerate() {
            acc[i][j] = super::linear::dot_f32(&x[..k], &w[..k]);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_block(xs: &[&[f32]], ws: &[&[f32]; WR], k: usize) -> [[f32; WR]; XR] {
    use std::arch::x86_64::*;
    let body = k / 16 * 16;
    let mut a = [[_mm512_setzero_ps(); WR]; XR];
    let mut p = 0;
    while p < body {
        // SAFETY: p + 16 <= k and every row has k elements, so each 16-lane load is in bounds.
        unsafe {
            let w = [
                _mm512_loadu_ps(ws[0].as_ptr().add(p)),
                _mm512_loadu_ps(ws[1].as_ptr().add(p)),
                _mm512_loadu_ps(ws[2].as_ptr().add(p)),
                _mm512_loadu_ps(ws[3].as_ptr().add(p)),
            ];
            for i in 0..XR {
                let x = _mm512_loadu_ps(xs[i].as_ptr().add(p));
                for j in 0..WR {
                    a[i][j] = _mm512_fmadd_ps(x, w[j], a[i][j]);
                }
            }
        }
        p += 16;
    }
    let mut out = [[0.0f32; WR]; XR];
    for i in 0..XR {
        for j in 0..WR {
            let mut s = _mm512_reduce_add_ps(a[i][j]);
            for q in body..k {
                s += xs[i][q] * ws[j][q];
            }
            out[i][j] = s;
        }
    }
    out
}

/// `o[x * d..(x + 1) * d] += sum_{s < n} p[x][s] * v[s * d..(s + 1) * d]` for XR queries `x`
/// (attention's probabilities times values). Each query's weights past its causal limit
/// must be zero. The output rows stay in registers across all `n` values on AVX-512 when
/// `d` is a multiple of 64; otherwise one `axpy` per (query, value).
pub fn weighted_sum(p: &[[f32; 64]; XR], v: &[f32], n: usize, d: usize, o: &mut [f32]) {
    debug_assert!(n <= 64 && v.len() >= n * d && o.len() >= XR * d);
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(64) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above); bounds asserted above.
            unsafe { avx512_weighted_sum(p, v, n, d, o) };
            return;
        }
    }
    for (x, px) in p.iter().enumerate() {
        let dst = &mut o[x * d..(x + 1) * d];
        for (s, &w) in px.iter().enumerate().take(n) {
            super::linear::axpy(w, &v[s * d..(s + 1) * d], dst);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_weighted_sum(p: &[[f32; 64]; XR], v: &[f32], n: usize, d: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(
        n <= 64 && v.len() >= n * d && o.len() >= XR * d,
        "weighted_sum bounds"
    );
    for c in (0..d).step_by(64) {
        let mut acc = [[_mm512_setzero_ps(); 4]; XR];
        #[allow(clippy::needless_range_loop)] // s indexes the values and every query's weights
        for s in 0..n {
            // SAFETY: s < n and c + 64 <= d, so the four loads read row s of v.
            let vs = unsafe {
                let r = v.as_ptr().add(s * d + c);
                [
                    _mm512_loadu_ps(r),
                    _mm512_loadu_ps(r.add(16)),
                    _mm512_loadu_ps(r.add(32)),
                    _mm512_loadu_ps(r.add(48)),
                ]
            };
            for (x, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(p[x][s]);
                for (q, vq) in a.iter_mut().zip(&vs) {
                    *q = _mm512_fmadd_ps(w, *vq, *q);
                }
            }
        }
        for (x, a) in acc.iter().enumerate() {
            for (q, aq) in a.iter().enumerate() {
                // SAFETY: x < XR and c + 16 q + 16 <= d, inside o's XR rows of d.
                unsafe {
                    let dst = o.as_mut_ptr().add(x * d + c + 16 * q);
                    _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *aq));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_matches_a_naive_sum_on_both_paths() {
        // d = 64 and 128 take the register-blocked path on AVX-512, d = 48 the axpy one.
        for (d, n) in [(64usize, 32usize), (128, 7), (48, 5), (64, 1)] {
            let v: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut p = [[0.0f32; 64]; XR];
            for (x, px) in p.iter_mut().enumerate() {
                // Query x sees the first n - x values, as a causal tile does.
                for (s, w) in px.iter_mut().enumerate().take(n.saturating_sub(x)) {
                    *w = ((x * 64 + s) as f32 * 0.11).cos();
                }
            }
            let mut o: Vec<f32> = (0..XR * d).map(|i| i as f32 * 0.01).collect();
            let mut want = o.clone();
            for x in 0..XR {
                for s in 0..n {
                    for c in 0..d {
                        want[x * d + c] += p[x][s] * v[s * d + c];
                    }
                }
            }
            weighted_sum(&p, &v, n, d, &mut o);
            for (i, (a, b)) in o.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "d {d} n {n} at {i}: {a} vs {b}"
                );
            }
        }
    }
}
