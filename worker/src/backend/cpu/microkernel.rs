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
