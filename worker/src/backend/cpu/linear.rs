//! `y = x W^T` for HF-layout weights (rows are outputs), bf16 or f32, on the rayon pool.
//!
//! [`GemmDtype::F32`] (`dtype: auto | float32`) multiplies in f32, described below.
//! [`GemmDtype::Bf16`] (`dtype: bfloat16`) rounds the activations to bf16 and runs the bf16
//! kernels of `bf16.rs` for bf16 weights, on the panels packed at load
//! ([`WeightData::Bf16Panels`]) or row-major; f32-stored weights (MoE routers) stay f32.
//!
//! GGUF Q8_0 weights ([`WeightData::Q8_0`]) run on their blocks in both modes (`q8.rs`), and
//! so do Q4_K and Q6_K weights ([`WeightData::KQuant`], `q4k.rs`) and Q4_0 / Q4_1 weights
//! ([`WeightData::Q4`], `q4.rs`): on AVX512-VNNI CPUs in tiles that read each weight block
//! once for up to 8 input rows (`q8_tiles.rs`, `kq_tiles.rs`, `q4_tiles.rs`), up to
//! [`BLOCK_TILE_ROWS`] input rows; elsewhere by one-row dots up to
//! `BLOCK_MAX_ROWS`. Larger batches dequantize W as bf16 is widened (tiles of rows, or once
//! into the f32 scratch below for the gemm).
//!
//! One row (batch-1 decode): each task streams a slice of W and writes its outputs in place.
//! Few rows (small batches): each weight row is widened once and dotted with every input row;
//! bf16 is widened in registers (AVX-512 when the CPU has it, a portable loop otherwise), so
//! batch-1 decode reads 2 bytes per weight. Many rows (prefill): W is widened to f32 once
//! into a reused buffer and the whole product goes to the `gemm` crate on the same pool.

use rayon::prelude::*;

use super::bf16::{self, Bf16Kernel};
use super::microkernel::{WR, XR, block};
use super::{q4, q4k, q8};
use crate::model::{Mat, WeightData};

/// Rows of x up to which the streaming dot kernel is used instead of gemm.
const DOT_MAX_ROWS: usize = 64;

/// Rows of x up to which GGUF block weights are computed on their blocks by the one-row
/// dots (CPUs without the VNNI tiles). Beyond, the block dots (each re-decoding a weight row's scales for every input row) cost more than
/// dequantizing W as bf16 is widened: in tiles of rows for the register-blocked kernel up to
/// `DOT_MAX_ROWS`, once into f32 for the gemm past it. On the bench preset the block path
/// prefilled 512 tokens at a fifth of the gemm's rate, and decoded 16 sequences at 0.40x
/// (Q8_0) and 0.81x (Q4_K) of bf16 against 0.73x and 0.86x in tiles (docs/bench/engine.md).
const BLOCK_MAX_ROWS: usize = 8;

/// Input rows up to which GGUF block weights run the AVX512-VNNI tiles (`q8_tiles.rs`,
/// `kq_tiles.rs`) where the CPU has them; past it they are dequantized once into f32 for the
/// gemm. On the bench preset (`--bench q8`, one run) a 64-token prefill ran at 1.0 to 1.1x
/// on the tiles against the gemm, a 512-token one at 0.45 to 0.7x.
pub const BLOCK_TILE_ROWS: usize = DOT_MAX_ROWS;

static TILE_ROWS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(BLOCK_TILE_ROWS);

/// Sets, for every later call in this process, the input rows up to which GGUF block weights
/// run the VNNI tiles (default [`BLOCK_TILE_ROWS`]). 0 restores the path before the tiles:
/// one-row block dots up to `BLOCK_MAX_ROWS` rows, dequantized weights past it. Both paths
/// are exact in their integer sums; the switch exists for A/B measurements in the benches.
pub fn set_block_tile_rows(rows: usize) {
    TILE_ROWS.store(rows, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a product of `rows` input rows with GGUF block weights runs the VNNI tiles.
pub(super) fn block_tiles(rows: usize) -> bool {
    rows <= TILE_ROWS.load(std::sync::atomic::Ordering::Relaxed) && q8::tiles_supported()
}

/// Arithmetic of the projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmDtype {
    /// f32 products of f32 activations and (exactly widened) weights.
    F32,
    /// bf16-rounded activations times bf16 weights, summed in f32, with this kernel.
    Bf16(Bf16Kernel),
}

/// Computes `out[t, n] = sum_k x[t, k] * w[n, k]` for `t < rows` in `dtype`'s arithmetic.
pub fn linear(dtype: GemmDtype, x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    match (dtype, &w.data) {
        // GGUF Q8_0 blocks: int8 products with per-block activation scales, in either mode.
        // Batches of GGUF blocks: dequantized in tiles of rows (up to DOT_MAX_ROWS) or
        // once into f32 for the gemm (prefill), as bf16 is widened.
        (_, WeightData::Q8_0 { .. } | WeightData::KQuant(_) | WeightData::Q4(_))
            if rows > BLOCK_MAX_ROWS && !block_tiles(rows) =>
        {
            linear_f32(x, rows, w, out)
        }
        (_, WeightData::Q8_0 { .. }) => q8::linear_q8(x, rows, w, out),
        // Q4_K / Q6_K super-blocks: the same, with activations quantized per 256.
        (_, WeightData::KQuant(_)) => q4k::linear_kquant(x, rows, w, out),
        // Q4_0 / Q4_1 blocks: activations quantized per 32 to int16.
        (_, WeightData::Q4(_)) => q4::linear_q4(x, rows, w, out),
        (GemmDtype::Bf16(kernel), WeightData::Bf16(v)) => {
            #[cfg(target_arch = "x86_64")]
            {
                if kernel == Bf16Kernel::Avx512Bf16 && rows > 0 && w.rows > 0 && w.cols > 0 {
                    bf16::linear_avx512(x, rows, v, w.cols, w.rows, out);
                    return;
                }
            }
            let _ = (kernel, v);
            linear_f32(&bf16::round_f32(&x[..rows * w.cols]), rows, w, out);
        }
        (GemmDtype::Bf16(kernel), WeightData::Bf16Panels(v)) => {
            #[cfg(target_arch = "x86_64")]
            {
                if kernel == Bf16Kernel::Avx512Bf16 && rows > 0 && w.rows > 0 && w.cols > 0 {
                    bf16::linear_panels(x, rows, v, w.cols, w.rows, out);
                    return;
                }
            }
            let _ = (kernel, v);
            linear_f32(&bf16::round_f32(&x[..rows * w.cols]), rows, w, out);
        }
        _ => linear_f32(x, rows, w, out),
    }
}

/// `out = (silu(gate) * up) W^T` for the rows `[gate; up]` of `gate_up` (`w.cols` each), the
/// FFN's down projection, with the gating fused into the rounding of its input where the
/// packed AVX512_BF16 kernel runs ([`bf16::silu_mul_panels`], the same bits as gating into
/// f32 and then [`linear`]). Returns false, with nothing written, everywhere else: the
/// caller gates into f32 and calls [`linear`].
pub fn silu_mul_linear(
    dtype: GemmDtype,
    gate_up: &[f32],
    rows: usize,
    w: &Mat,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if let (GemmDtype::Bf16(Bf16Kernel::Avx512Bf16), WeightData::Bf16Panels(v)) =
            (dtype, &w.data)
            && rows > 0
            && w.rows > 0
            && w.cols > 0
        {
            bf16::silu_mul_panels(gate_up, rows, w.cols, v, w.rows, out);
            return true;
        }
    }
    let _ = (dtype, gate_up, rows, w, out);
    false
}

/// [`linear`] with every output row in its own slice (`outs[t]`, `w.rows` long, possibly
/// uninitialized), where the packed AVX512_BF16 kernel runs ([`bf16::linear_panels_rows`]):
/// returns true with every element of every slice written. Returns false, with nothing
/// written, everywhere else (the caller computes into one matrix and copies).
pub fn linear_rows(
    dtype: GemmDtype,
    x: &[f32],
    w: &Mat,
    outs: &mut [&mut [std::mem::MaybeUninit<f32>]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if let (GemmDtype::Bf16(Bf16Kernel::Avx512Bf16), WeightData::Bf16Panels(v)) =
            (dtype, &w.data)
            && !outs.is_empty()
            && w.rows > 0
            && w.cols > 0
        {
            bf16::linear_panels_rows(x, v, w.cols, w.rows, outs);
            return true;
        }
    }
    let _ = (dtype, x, w, outs);
    false
}

/// The f32 product (also the portable bf16 kernel, on pre-rounded activations). Packed
/// panels only reach it outside the kernel they were packed for; it reads them row by row.
fn linear_f32(x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(out.len(), rows * n);
    if rows == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let packed = matches!(w.data, WeightData::Bf16Panels(_));
    if rows == 1 && !packed {
        // Output is one contiguous row: tasks write their slice in place.
        let chunk = (n / (threads * 8)).max(16);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            let n0 = c * chunk;
            for (j, o) in o.iter_mut().enumerate() {
                let wr = (n0 + j) * k..(n0 + j + 1) * k;
                *o = match &w.data {
                    WeightData::Bf16(v) => dot_bf16(x, &v[wr]),
                    WeightData::F32(v) => dot_f32(x, &v[wr]),
                    WeightData::Bf16Panels(_)
                    | WeightData::Q8_0 { .. }
                    | WeightData::KQuant(_)
                    | WeightData::Q4(_) => {
                        unreachable!("packed and block weights never take this loop")
                    }
                };
            }
        });
        return;
    }
    if rows > DOT_MAX_ROWS && !packed {
        gemm_full(x, rows, w, out);
        return;
    }
    let chunk = (n / (threads * 8)).max(16).next_multiple_of(WR);
    by_column_parts(rows, n, chunk, out, |n0, n1, part| {
        dot_rows(x, rows, w, n0, n1, part)
    });
}

/// Computes the row-major rows x n `out` in column blocks of `chunk`, in parallel:
/// `fill(n0, n1, part)` writes the values of columns n0..n1 into `part`, rows x (n1 - n0)
/// row by row, which are then copied into place.
pub(super) fn by_column_parts(
    rows: usize,
    n: usize,
    chunk: usize,
    out: &mut [f32],
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (n0, n1) = (c * chunk, ((c + 1) * chunk).min(n));
            let mut part = vec![0.0f32; rows * (n1 - n0)];
            fill(n0, n1, &mut part);
            (n0, part)
        })
        .collect();
    scatter_column_parts(parts, rows, n, out);
}

/// The input-row tiles of a batch of `rows`: `(t, len)` for rows t..t + len, each 8, 4, 2
/// or 1 rows long (the widths the VNNI block tiles are built for), in order.
pub(super) fn input_row_tiles(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut t = 0;
    std::iter::from_fn(move || {
        let left = rows - t;
        let len = [8, 4, 2, 1].into_iter().find(|&g| g <= left)?;
        let tile = (t, len);
        t += len;
        Some(tile)
    })
}

/// Writes column blocks into the row-major rows x n `out`: each part, starting at column n0,
/// holds rows x width values, row by row.
fn scatter_column_parts(parts: Vec<(usize, Vec<f32>)>, rows: usize, n: usize, out: &mut [f32]) {
    for (n0, part) in parts {
        let width = part.len() / rows;
        for t in 0..rows {
            out[t * n + n0..t * n + n0 + width].copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
}

/// part[t, j] = x_t . w[n0 + j]; part is rows x (n1 - n0). Weight rows are widened once,
/// four at a time, and multiplied with the batch by the register-blocked micro-kernel.
fn dot_rows(x: &[f32], rows: usize, w: &Mat, n0: usize, n1: usize, part: &mut [f32]) {
    let k = w.cols;
    let width = n1 - n0;
    let mut wbuf = vec![0.0f32; WR * k];
    let mut j = n0;
    while j < n1 {
        let nw = (n1 - j).min(WR);
        for r in 0..WR {
            let dst = &mut wbuf[r * k..(r + 1) * k];
            if r < nw {
                w.row_to_f32(j + r, dst);
            } else {
                dst.fill(0.0);
            }
        }
        let ws: [&[f32]; WR] = std::array::from_fn(|r| &wbuf[r * k..(r + 1) * k]);
        let mut t = 0;
        while t < rows {
            let nt = (rows - t).min(XR);
            let xs: [&[f32]; XR] =
                std::array::from_fn(|i| &x[(t + i.min(nt - 1)) * k..(t + i.min(nt - 1) + 1) * k]);
            let acc = block(&xs, &ws, k);
            for (i, row) in acc.iter().enumerate().take(nt) {
                for (r, v) in row.iter().enumerate().take(nw) {
                    part[(t + i) * width + (j - n0 + r)] = *v;
                }
            }
            t += nt;
        }
        j += nw;
    }
}

/// Writes W (n x k, bf16) into `wf` as f32 in the same layout, in parallel.
fn widen(v: &[u16], k: usize, wf: &mut [f32]) {
    wf.par_chunks_mut(k * 16)
        .zip(v.par_chunks(k * 16))
        .for_each(|(d, s)| {
            for (d, &b) in d.iter_mut().zip(s) {
                *d = f32::from_bits(u32::from(b) << 16);
            }
        });
}

thread_local! {
    /// Reused buffer for widened weights, so prefill steps do not fault in fresh pages.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Many rows: bf16 W is widened (GGUF block W dequantized) once into a reused buffer and the
/// whole product runs as one multi-threaded gemm on the current pool.
fn gemm_full(x: &[f32], rows: usize, w: &Mat, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    match &w.data {
        WeightData::F32(v) => gemm_nxk(x, rows, v, k, n, out),
        WeightData::Bf16Panels(_) => unreachable!("packed weights take dot_rows"),
        WeightData::Q8_0 { .. } | WeightData::KQuant(_) | WeightData::Q4(_) => {
            SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                if scratch.len() < n * k {
                    scratch.resize(n * k, 0.0);
                }
                let wf = &mut scratch[..n * k];
                wf.par_chunks_mut(k)
                    .with_min_len(16)
                    .enumerate()
                    .for_each(|(r, row)| w.row_to_f32(r, row));
                gemm_nxk(x, rows, wf, k, n, out);
            })
        }
        WeightData::Bf16(v) => SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < n * k {
                scratch.resize(n * k, 0.0);
            }
            let wf = &mut scratch[..n * k];
            widen(v, k, wf);
            gemm_nxk(x, rows, wf, k, n, out);
        }),
    }
}

/// out (rows x n) = x (rows x k) times the transpose of the row-major n x k `wf`.
fn gemm_nxk(x: &[f32], rows: usize, wf: &[f32], k: usize, n: usize, out: &mut [f32]) {
    assert!(wf.len() >= n * k && x.len() >= rows * k && out.len() >= rows * n);
    // SAFETY: dst is rows x n (row stride n), lhs is rows x k (row stride k), rhs is k x n read
    // from the n x k row-major `wf` (column stride k); the assert above bounds every access.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            wf.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// Dot product of f32 `x` with bf16 bit patterns `w`.
pub fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above).
            return unsafe { avx512::dot_bf16(x, w) };
        }
    }
    let mut acc = [0.0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(&a, &b)| a * f32::from_bits(u32::from(b) << 16))
        .sum();
    for (xs, ws) in xc.zip(wc) {
        for i in 0..16 {
            acc[i] += xs[i] * f32::from_bits(u32::from(ws[i]) << 16);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product of two f32 slices.
pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above).
            return unsafe { avx512::dot_f32(x, w) };
        }
    }
    let mut acc = [0.0f32; 16];
    let (xc, wc) = (x.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xs, ws) in xc.zip(wc) {
        for i in 0..16 {
            acc[i] += xs[i] * ws[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Widens bf16 bit patterns to f32 (exact), 16 at a time on AVX-512.
pub fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above).
            return unsafe { avx512::widen_bf16(src, dst) };
        }
    }
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(b) << 16);
    }
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports avx512f (checked just above).
            return unsafe { avx512::axpy(a, x, y) };
        }
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// AVX-512 bf16 x f32 dot product, widening 16 weights per load.
    ///
    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
        let n = x.len().min(w.len());
        let body = n / 32 * 32;
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < body {
            // SAFETY: i + 32 <= n, so both 16-lane loads of x and w stay in bounds.
            unsafe {
                let w0 = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
                let w1 = _mm256_loadu_si256(w.as_ptr().add(i + 16) as *const __m256i);
                let f0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w0), 16));
                let f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w1), 16));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(i)), f0, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), f1, a1);
            }
            i += 32;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        for j in body..n {
            sum += x[j] * f32::from_bits(u32::from(w[j]) << 16);
        }
        sum
    }

    /// AVX-512 f32 dot product.
    ///
    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        let n = x.len().min(w.len());
        let body = n / 16 * 16;
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 <= n, so both loads stay in bounds.
            unsafe {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(x.as_ptr().add(i)),
                    _mm512_loadu_ps(w.as_ptr().add(i)),
                    acc,
                );
            }
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        for j in body..n {
            sum += x[j] * w[j];
        }
        sum
    }

    /// AVX-512 bf16 to f32 widening.
    ///
    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n / 16 * 16;
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 <= n, so the 16-element load and store stay in bounds.
            unsafe {
                let w = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                let f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), f);
            }
            i += 16;
        }
        for j in body..n {
            dst[j] = f32::from_bits(u32::from(src[j]) << 16);
        }
    }

    /// AVX-512 `y += a * x`.
    ///
    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let body = n / 16 * 16;
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 <= n, so the loads and the store stay in bounds.
            unsafe {
                let yp = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(
                    yp,
                    _mm512_fmadd_ps(av, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(yp)),
                );
            }
            i += 16;
        }
        for j in body..n {
            y[j] += a * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat_bf16(rows: usize, cols: usize) -> (Mat, Vec<f32>) {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let bits: Vec<u16> = vals.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let exact = bits_to_f32(&bits);
        (
            Mat {
                rows,
                cols,
                data: WeightData::Bf16(bits),
            },
            exact,
        )
    }

    fn bits_to_f32(b: &[u16]) -> Vec<f32> {
        b.iter()
            .map(|&x| f32::from_bits(u32::from(x) << 16))
            .collect()
    }

    #[test]
    fn widening_is_exact_on_the_vector_body_and_the_tail() {
        let src: Vec<u16> = (0..37u16).map(|i| 0x3f80 ^ (i * 977)).collect();
        let mut dst = vec![0.0f32; 37];
        widen_bf16(&src, &mut dst);
        assert_eq!(dst, bits_to_f32(&src));
    }

    #[test]
    fn dot_and_gemm_paths_match_a_naive_product() {
        let (rows_w, k) = (200, 67);
        let (w, wf) = mat_bf16(rows_w, k);
        for rows in [1, 3, 20, 70] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.013).sin()).collect();
            let mut out = vec![0.0; rows * rows_w];
            linear(GemmDtype::F32, &x, rows, &w, &mut out);
            for t in 0..rows {
                for n in 0..rows_w {
                    let want: f32 = (0..k).map(|i| x[t * k + i] * wf[n * k + i]).sum();
                    let got = out[t * rows_w + n];
                    assert!(
                        (got - want).abs() < 1e-3,
                        "rows {rows} t {t} n {n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Batches of Q8_0, Q4_0, Q4_1 and k-quant weights (9 rows: past `BLOCK_MAX_ROWS`; 64: the most on
    /// the tiles; 70: past `DOT_MAX_ROWS` and the tiles) equal the f32 product of the
    /// dequantized weights up to f32 summation order (1e-4 of `sum |w x|`) where the
    /// weights are dequantized (70 rows, and every batch on CPUs without the VNNI tiles),
    /// and within the activations' rounding to int8 where the tiles run: per value at
    /// most 0.6 of its block's step `max|x| / 127` (half a step, plus the f16 rounding of
    /// Q8_0's step), times `|w|` (the per-kernel bounds are tested in `q8`, `q4k` and the
    /// tiles' own tests).
    #[test]
    fn batches_of_block_weights_match_the_dequantized_product() {
        let (n, k) = (40, 512);
        let (w, _) = mat_bf16(n, k);
        let blocks = [
            q8::quantize_mat(&w).unwrap(),
            q4k::quantize_mat(&w, crate::model::dequant::GgmlType::Q4K).unwrap(),
            q4k::quantize_mat(&w, crate::model::dequant::GgmlType::Q6K).unwrap(),
            q4::quantize_mat(&w, false).unwrap(),
            q4::quantize_mat(&w, true).unwrap(),
        ];
        for wq in &blocks {
            let mut wf = vec![0.0f32; n * k];
            for r in 0..n {
                wq.row_to_f32(r, &mut wf[r * k..(r + 1) * k]);
            }
            for rows in [BLOCK_MAX_ROWS + 1, BLOCK_TILE_ROWS, 70] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.017).sin()).collect();
                let mut out = vec![0.0; rows * n];
                linear(GemmDtype::F32, &x, rows, wq, &mut out);
                for t in 0..rows {
                    for j in 0..n {
                        let (xr, wr) = (&x[t * k..(t + 1) * k], &wf[j * k..(j + 1) * k]);
                        let want: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        let mag: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                        let rounding: f32 = if block_tiles(rows) {
                            let step = xr.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                            0.6 * step * wr.iter().map(|v| v.abs()).sum::<f32>()
                        } else {
                            0.0
                        };
                        let got = out[t * n + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * mag + rounding,
                            "rows {rows}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
