//! The bf16 GEMM mode (`dtype: bfloat16`): activations rounded to bf16, multiplied with bf16
//! weights, products summed in f32; everything around the GEMMs stays f32.
//!
//! Two kernels compute it. With AVX512_BF16, `vdpbf16ps` multiplies pairs of bf16 elements
//! (32 products per instruction, twice the f32 FMA rate) and needs no widening pass over the
//! weights. Without it the portable kernel rounds the activations the same way (round to
//! nearest even, denormals to zero, as `vcvtneps2bf16`) and runs the f32 kernels on the rounded
//! values: a product of two bf16 numbers is exact in f32, so the two kernels differ only in the
//! order of the f32 additions.

use rayon::prelude::*;

use crate::model::{Layer, Mat, Mlp, ModelWeights, WeightData};

/// Which code computes bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX512_BF16 `vdpbf16ps` dot products (x86-64 with avx512f, avx512bw, avx512bf16).
    Avx512Bf16,
    /// Any CPU: activations rounded to bf16, then the f32 kernels.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                return Self::Avx512Bf16;
            }
        }
        Self::Portable
    }

    /// A phrase for the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Avx512Bf16 => "AVX512_BF16 vdpbf16ps",
            Self::Portable => {
                "portable (no AVX512_BF16): inputs rounded to bf16, products summed by the f32 kernels"
            }
        }
    }
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays a quiet NaN, denormals become a
/// zero of the same sign and overflow becomes infinity (what `vcvtneps2bf16` does).
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
pub fn to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `x` with every element rounded to the nearest bf16 value (the portable kernel's input).
pub fn round_f32(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| to_f32(to_bf16(v))).collect()
}

/// Rounds `x` into bf16 bits with `kernel`'s instructions.
pub fn round_into(kernel: Bf16Kernel, x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel == Bf16Kernel::Avx512Bf16 {
            // SAFETY: this kernel is only chosen when the CPU has its features (detect()).
            unsafe { super::bf16_avx512::round_into(x, out) };
            return;
        }
    }
    let _ = kernel;
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = to_bf16(v));
}

/// The projections of every layer (MoE experts and shared experts included; routers and the
/// shared-expert gate are not projections of the hidden state into bf16 GEMMs, see below).
pub(super) fn layer_projections(layers: &mut [Layer]) -> Vec<&mut Mat> {
    let mut mats: Vec<&mut Mat> = Vec::new();
    for l in layers {
        mats.push(&mut l.qkv);
        mats.push(&mut l.o);
        match &mut l.mlp {
            Mlp::Dense(f) => mats.extend([&mut f.gate_up, &mut f.down]),
            Mlp::Moe {
                experts, shared, ..
            } => {
                for f in experts {
                    mats.extend([&mut f.gate_up, &mut f.down]);
                }
                if let Some((f, _gate)) = shared {
                    mats.extend([&mut f.gate_up, &mut f.down]);
                }
            }
        }
    }
    mats
}

/// Rounds every f32-stored projection and the embedding to bf16 (what loading a checkpoint
/// in bf16 does), so the bf16 kernels see bf16 weights. MoE routers and the shared-expert
/// gate stay f32: routing decisions keep f32 arithmetic in every mode.
pub fn round_weights(w: &mut ModelWeights) {
    let mut mats: Vec<&mut Mat> = vec![&mut w.embed];
    mats.extend(w.lm_head.as_mut());
    mats.extend(layer_projections(&mut w.layers));
    for m in mats {
        if let WeightData::F32(v) = &m.data {
            let bits = v.par_iter().map(|&x| to_bf16(x)).collect();
            m.data = WeightData::Bf16(bits);
        }
    }
}

/// Packs every bf16 projection and the lm_head into [`WeightData::Bf16Panels`] for `kernel`,
/// one matrix at a time, so the row-major copy is dropped before the next is packed (memory
/// grows by one matrix at most, and by the zero padding of each last panel afterwards).
/// Tied embeddings are packed too: the lookup reads its rows from the panels (a strided
/// gather of one row per token), which costs less than a second copy of the vocabulary
/// matrix. An untied embedding table is only looked up, so it stays row-major.
/// Returns whether anything was packed: only the AVX512_BF16 kernel reads panels.
pub fn pack_weights(w: &mut ModelWeights, kernel: Bf16Kernel) -> bool {
    if !reads_panels(kernel) {
        return false;
    }
    let head: &mut Mat = match w.lm_head.as_mut() {
        Some(m) => m,
        None => &mut w.embed,
    };
    pack_mat(head, kernel);
    for m in layer_projections(&mut w.layers) {
        pack_mat(m, kernel);
    }
    true
}

/// Whether `kernel` runs on packed panels (only AVX512_BF16 does).
fn reads_panels(kernel: Bf16Kernel) -> bool {
    cfg!(target_arch = "x86_64") && kernel == Bf16Kernel::Avx512Bf16
}

/// Packs one bf16 matrix into [`WeightData::Bf16Panels`] if `kernel` reads panels; other
/// matrices and kernels are left as they are.
pub fn pack_mat(m: &mut Mat, kernel: Bf16Kernel) {
    #[cfg(target_arch = "x86_64")]
    {
        if let (true, WeightData::Bf16(v)) = (reads_panels(kernel), &m.data) {
            // SAFETY: the AVX512_BF16 kernel is only chosen on CPUs with avx512f (detect()).
            let packed = unsafe { super::bf16_avx512::pack(v, m.rows, m.cols) };
            m.data = WeightData::Bf16Panels(packed);
        }
    }
    let _ = (m, kernel);
}

/// [`linear_panels`] with every output row in its own slice (`outs[t]`, at least `n` long):
/// the first `n` elements of every slice are written, whatever they held (they may start
/// uninitialized), so a batch's logits go straight into each sequence's own vector without a
/// copy through one matrix. The caller has checked that this CPU runs
/// [`Bf16Kernel::Avx512Bf16`].
#[cfg(target_arch = "x86_64")]
pub fn linear_panels_rows(
    x: &[f32],
    w: &[u32],
    k: usize,
    n: usize,
    outs: &mut [&mut [std::mem::MaybeUninit<f32>]],
) {
    let rows = outs.len();
    assert!(
        x.len() >= rows * k && outs.iter().all(|o| o.len() >= n),
        "linear_panels_rows bounds"
    );
    let out = RowsOut {
        rows: outs
            .iter_mut()
            .map(|o| o.as_mut_ptr().cast::<f32>())
            .collect(),
        n,
    };
    panels_from(rows, k, w, n, out, |r, d| {
        // SAFETY: only reached with the CPU features of this kernel (see linear()).
        unsafe { super::bf16_avx512::round_into(&x[r * k..(r + 1) * k], d) }
    });
}

/// `out[t, n] = bf16(x[t]) . w[n]` for `w` packed by [`pack_weights`] (`n x k`), with
/// `vdpbf16ps`: parallel over groups of panels; every panel is streamed once per tile of up
/// to 12 input rows (tiles balanced in size), so the weights are read once from memory per
/// call whatever the row count. The caller has checked that this CPU runs
/// [`Bf16Kernel::Avx512Bf16`].
#[cfg(target_arch = "x86_64")]
pub fn linear_panels(x: &[f32], rows: usize, w: &[u32], k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() >= rows * k, "linear_panels bounds");
    let out = RowsOut::matrix(out, rows, n);
    panels_from(rows, k, w, n, out, |r, d| {
        // SAFETY: only reached with the CPU features of this kernel (see linear()).
        unsafe { super::bf16_avx512::round_into(&x[r * k..(r + 1) * k], d) }
    });
}

/// The FFN's down projection fed straight from the gate/up projection: `out[t, n] =
/// bf16(silu(gate[t]) * up[t]) . w[n]` where row t of `gate_up` is `[gate; up]` (`inter`
/// each) and `w` (`n x inter`) was packed by [`pack_weights`]. The product of the gating is
/// rounded to bf16 as it is computed, row by row (on the pool for a batch), and never stored
/// in f32: the same bits as [`super::kernels::silu_mul`] followed by [`linear_panels`], one
/// pass and one fork/join fewer. The caller has checked that this CPU runs
/// [`Bf16Kernel::Avx512Bf16`].
#[cfg(target_arch = "x86_64")]
pub fn silu_mul_panels(
    gate_up: &[f32],
    rows: usize,
    inter: usize,
    w: &[u32],
    n: usize,
    out: &mut [f32],
) {
    assert!(gate_up.len() >= rows * 2 * inter, "silu_mul_panels bounds");
    let out = RowsOut::matrix(out, rows, n);
    panels_from(rows, inter, w, n, out, |r, d| {
        let (gate, up) = gate_up[2 * r * inter..2 * (r + 1) * inter].split_at(inter);
        // SAFETY: only reached with the CPU features of this kernel (see linear()).
        unsafe { super::vmath::silu_mul_bf16(gate, up, d) }
    });
}

/// Bytes of rounded input rows kept from call to call on each thread (a decode batch's fit;
/// larger inputs, prefill chunks, take a fresh buffer so that none is held for long).
#[cfg(target_arch = "x86_64")]
const KEPT_INPUT_BYTES: usize = 1 << 20;

#[cfg(target_arch = "x86_64")]
thread_local! {
    static INPUT: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = a w^T` where `fill(t, row)` writes input row t as its first k bf16 elements
/// (the packed-panel product behind [`linear_panels`] and [`silu_mul_panels`]).
#[cfg(target_arch = "x86_64")]
fn panels_from(
    rows: usize,
    k: usize,
    w: &[u32],
    n: usize,
    out: RowsOut,
    fill: impl Fn(usize, &mut [u16]) + Sync,
) {
    use super::bf16_avx512::NR;
    let kp = k.div_ceil(2);
    assert!(
        w.len() >= n.div_ceil(NR) * kp * NR && out.rows.len() >= rows && out.n >= n,
        "linear_panels bounds"
    );
    // The input as bf16 pairs; the element past an odd k is zero. The row stride is an odd
    // number of cache lines: a tile broadcasts dword p of each of its rows at every step, and
    // with a stride of a multiple of 4 KiB (k = 2048) all of them would fall into one set of
    // the 8-way L1 and evict each other; an odd stride in lines puts every row in its own set.
    // Only the first kp dwords of a row are read, so the buffer is reused (not zeroed) from
    // call to call.
    let stride = if panel_path() == PanelPath::Plain {
        kp
    } else {
        row_stride(kp)
    };
    let len = rows * stride;
    let run = |xa: &mut Vec<u32>| {
        if xa.len() < len {
            xa.resize(len, 0);
        }
        let xb: &mut [u16] = bytemuck::cast_slice_mut(&mut xa[..len]);
        let put = |(t, d): (usize, &mut [u16])| {
            fill(t, &mut d[..k]);
            if k % 2 == 1 {
                d[k] = 0;
            }
        };
        if rows * k < 1 << 16 {
            xb.chunks_mut(2 * stride).enumerate().for_each(put);
        } else {
            xb.par_chunks_mut(2 * stride).enumerate().for_each(put);
        }
        panels_product(&xa[..len], stride, rows, w, kp, n, &out);
    };
    if len * 4 > KEPT_INPUT_BYTES || !super::fused_step() {
        return run(&mut vec![0; len]);
    }
    INPUT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut xa) => run(&mut xa),
        // A call nested in another on this thread (a task stolen while waiting).
        Err(_) => run(&mut Vec::new()),
    });
}

/// `out = a w^T` for the rounded rows `xa` (`rows` at `stride` dwords, kp pairs each) and
/// the packed panels `w`.
#[cfg(target_arch = "x86_64")]
fn panels_product(
    xa: &[u32],
    stride: usize,
    rows: usize,
    w: &[u32],
    kp: usize,
    n: usize,
    target: &RowsOut,
) {
    use super::bf16_avx512::{self as simd, MR, NR};
    assert!(
        rows > 0 && xa.len() >= (rows - 1) * stride + kp && stride >= kp,
        "linear_panels input"
    );
    let path = panel_path();
    let tiles = rows.div_ceil(MR);
    let per = rows.div_ceil(tiles);
    let threads = rayon::current_num_threads().max(1);
    let panels = n.div_ceil(NR);
    // With several row tiles, smaller chunks at the end of a call leave less for one thread to
    // finish alone (8 per thread: 2 panels of o or down at 32 rows, about 40 us of work);
    // one tile, which streams each panel once, keeps longer runs of consecutive panels.
    let per_thread = if path == PanelPath::Plain || tiles < 2 {
        4
    } else {
        8
    };
    let chunk = panels.div_ceil(threads * per_thread).max(1);
    // With two or more row tiles a panel is read from memory by the first tile only, and from
    // L2 by the others; the tiles of panel j prefetch panel j + 1, each an equal share of its
    // lines spread over its steps, so memory streams all the time instead of in bursts at
    // the rate of one tile. One tile (batch 1 included) keeps the plain stream.
    let ahead_mode = match path {
        PanelPath::Plain => None,
        _ if tiles < 2 => None,
        PanelPath::NextToL2 => Some(false),
        PanelPath::NextToL1 => Some(true),
    };
    let panel_lines = kp * NR * 4 / 64;
    let stream = if stream_prefetch() && tiles < 2 {
        STREAM_AHEAD
    } else {
        0
    };
    // Tiles of FMA_MIN_ROWS or more rows multiply by f32 FMAs (`tile_f32`) on the input
    // widened once here; a row stride of an odd number of lines, as for `xa`.
    let fstride = 2 * stride + 16;
    let xf = (fma_tiles() && per >= FMA_MIN_ROWS).then(|| {
        let mut xf = vec![0.0f32; rows * fstride];
        // SAFETY (both calls): only reached with the CPU features of this kernel (see
        // linear()); group g starts at row 8g of xa.
        let widen = |(g, o): (usize, &mut [f32])| unsafe {
            simd::widen_pairs(&xa[g * 8 * stride..], stride, kp, o, fstride)
        };
        // A prefill chunk's rows (megabytes) are widened on the pool.
        if rows * kp < 1 << 16 {
            widen((0, &mut xf));
        } else {
            xf.par_chunks_mut(8 * fstride).enumerate().for_each(widen);
        }
        xf
    });
    (0..panels.div_ceil(chunk)).into_par_iter().for_each(|c| {
        for j in c * chunk..((c + 1) * chunk).min(panels) {
            let panel = w[j * kp * NR..].as_ptr();
            let width = (n - j * NR).min(NR);
            let mut t = 0;
            let mut ti = 0;
            while t < rows {
                let m = per.min(rows - t);
                let a = xa[t * stride..].as_ptr();
                let ahead = match ahead_mode {
                    Some(l1) if j + 1 < panels => {
                        let (l0, l1_end) =
                            (ti * panel_lines / tiles, (ti + 1) * panel_lines / tiles);
                        simd::Ahead {
                            at: w[(j + 1) * kp * NR..].as_ptr().wrapping_add(l0 * 16) as *const u8,
                            lines: l1_end - l0,
                            l1,
                            stream: 0,
                        }
                    }
                    _ => simd::Ahead {
                        stream,
                        ..simd::Ahead::NONE
                    },
                };
                let dst = simd::Dst {
                    rows: target.tile(t, m, j * NR, width),
                    width,
                };
                // SAFETY: the caller checked the CPU features; a holds m rows of kp dwords at
                // `stride` and the panel kp * NR dwords (asserted above); m <= MR; dst names
                // columns j * NR..j * NR + width of rows t..t + m, which belong to this task.
                if let Some(xf) = &xf
                    && m >= FMA_MIN_ROWS
                {
                    let af = xf[t * fstride..].as_ptr();
                    // SAFETY: as below, with af holding m rows of 2 kp floats at fstride.
                    unsafe {
                        match m {
                            3 => simd::tile_f32::<3>(af, fstride, panel, kp, dst, ahead),
                            4 => simd::tile_f32::<4>(af, fstride, panel, kp, dst, ahead),
                            5 => simd::tile_f32::<5>(af, fstride, panel, kp, dst, ahead),
                            6 => simd::tile_f32::<6>(af, fstride, panel, kp, dst, ahead),
                            7 => simd::tile_f32::<7>(af, fstride, panel, kp, dst, ahead),
                            8 => simd::tile_f32::<8>(af, fstride, panel, kp, dst, ahead),
                            9 => simd::tile_f32::<9>(af, fstride, panel, kp, dst, ahead),
                            10 => simd::tile_f32::<10>(af, fstride, panel, kp, dst, ahead),
                            11 => simd::tile_f32::<11>(af, fstride, panel, kp, dst, ahead),
                            _ => simd::tile_f32::<12>(af, fstride, panel, kp, dst, ahead),
                        }
                    }
                    t += m;
                    ti += 1;
                    continue;
                }
                unsafe {
                    match m {
                        1 => simd::tile::<1>(a, stride, panel, kp, dst, ahead),
                        2 => simd::tile::<2>(a, stride, panel, kp, dst, ahead),
                        3 => simd::tile::<3>(a, stride, panel, kp, dst, ahead),
                        4 => simd::tile::<4>(a, stride, panel, kp, dst, ahead),
                        5 => simd::tile::<5>(a, stride, panel, kp, dst, ahead),
                        6 => simd::tile::<6>(a, stride, panel, kp, dst, ahead),
                        7 => simd::tile::<7>(a, stride, panel, kp, dst, ahead),
                        8 => simd::tile::<8>(a, stride, panel, kp, dst, ahead),
                        9 => simd::tile::<9>(a, stride, panel, kp, dst, ahead),
                        10 => simd::tile::<10>(a, stride, panel, kp, dst, ahead),
                        11 => simd::tile::<11>(a, stride, panel, kp, dst, ahead),
                        _ => simd::tile::<12>(a, stride, panel, kp, dst, ahead),
                    }
                }
                t += m;
                ti += 1;
            }
        }
    });
}

/// Row stride in dwords of the bf16-pair copy of the input rows for `kp` pairs: at least `kp`,
/// an odd number of 64-byte lines.
#[cfg(target_arch = "x86_64")]
fn row_stride(kp: usize) -> usize {
    let lines = kp.div_ceil(16);
    (lines | 1) * 16
}

/// How the packed-panel GEMM streams its panels at two or more tiles of input rows. The
/// default is [`PanelPath::NextToL1`], which measured fastest in the engine bench; the others
/// exist for A/B measurements (the benches set them from the environment) and give
/// bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelPath {
    /// The path before the next-panel prefetch: no prefetch of the next panel, input rows at
    /// a stride of exactly `k / 2` dwords, 4 chunks of panels per thread.
    Plain,
    /// The next panel is prefetched with `prefetcht1` (into L2); input rows at an odd stride
    /// of cache lines, 8 chunks of panels per thread.
    NextToL2,
    /// As `NextToL2`, with `prefetcht0` (into L1 and L2).
    NextToL1,
}

static PANEL_PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Sets [`PanelPath`] for every later call in this process.
pub fn set_panel_path(p: PanelPath) {
    let v = match p {
        PanelPath::Plain => 0,
        PanelPath::NextToL2 => 1,
        PanelPath::NextToL1 => 2,
    };
    PANEL_PATH.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`PanelPath`].
pub fn panel_path() -> PanelPath {
    match PANEL_PATH.load(std::sync::atomic::Ordering::Relaxed) {
        0 => PanelPath::Plain,
        1 => PanelPath::NextToL2,
        _ => PanelPath::NextToL1,
    }
}

/// Input rows from which a tile multiplies by f32 FMAs (`bf16_avx512::tile_f32`) instead of
/// `vdpbf16ps`: with fewer the tile is bound by memory either way, and the FMA kernel's
/// chain of two dependent FMAs per accumulator and step makes it slower (0.85 to 0.9x at 1
/// and 2 rows from L2); from 3 rows it is 1.4x faster, 1.8x at 8 to 12.
#[cfg(target_arch = "x86_64")]
const FMA_MIN_ROWS: usize = 3;

static FMA_TILES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether tiles of 3 or more input rows multiply by f32 FMAs on the weights widened in
/// registers (default true) or by `vdpbf16ps`. The same bits either way (outside the
/// denormal range, which `vdpbf16ps` flushes); the switch exists for A/B measurements.
pub fn set_fma_tiles(on: bool) {
    FMA_TILES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_fma_tiles`].
pub fn fma_tiles() -> bool {
    FMA_TILES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Bytes ahead in the weight stream that tiles of up to 4 input rows prefetch (see
/// `bf16_avx512::Ahead::stream`): 4 KiB measured best among 1 to 8 KiB in a one-thread GEMV
/// over the SmolLM2 head (8 KiB within noise of it, 1 KiB half the gain).
#[cfg(target_arch = "x86_64")]
const STREAM_AHEAD: usize = 4096;

static STREAM_PREFETCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether tiles of up to 4 input rows (batch-1 decode, short verification steps) prefetch
/// their weight stream ahead (default true). Results are the same bits either way; the
/// switch exists for A/B measurements in the benches.
pub fn set_stream_prefetch(on: bool) {
    STREAM_PREFETCH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_stream_prefetch`].
pub fn stream_prefetch() -> bool {
    STREAM_PREFETCH.load(std::sync::atomic::Ordering::Relaxed)
}

static WEIGHT_HUGE_PAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether packing asks for transparent huge pages for the panels (default true; the benches
/// turn it off for A/B measurements).
pub fn set_weight_huge_pages(on: bool) {
    WEIGHT_HUGE_PAGES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_weight_huge_pages`].
pub fn weight_huge_pages() -> bool {
    WEIGHT_HUGE_PAGES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Rows of x up to which the dot-product kernels run; more rows go to the packed GEMM.
#[cfg(target_arch = "x86_64")]
const DOT_MAX_ROWS: usize = 64;

/// `out[t, n] = bf16(x[t]) . w[n]` for the row-major `n x k` bf16 `w`, with `vdpbf16ps`.
/// The caller has checked that this CPU runs [`Bf16Kernel::Avx512Bf16`].
#[cfg(target_arch = "x86_64")]
pub fn linear_avx512(x: &[f32], rows: usize, w: &[u16], k: usize, n: usize, out: &mut [f32]) {
    use super::bf16_avx512 as simd;
    debug_assert!(x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n);
    if rows > DOT_MAX_ROWS {
        gemm::linear(x, rows, w, k, n, out);
        return;
    }
    let mut xb = vec![0u16; rows * k];
    // SAFETY: the caller checked the CPU features of this kernel.
    unsafe { simd::round_into(&x[..rows * k], &mut xb) };
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 8)).max(16).next_multiple_of(4);
    let wrow = |r: usize| &w[r.min(n - 1) * k..(r.min(n - 1) + 1) * k];
    if rows == 1 {
        out[..n]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, o)| {
                let n0 = c * chunk;
                for (j, o) in o.iter_mut().enumerate() {
                    // SAFETY: CPU features as above; rows hold k elements.
                    *o = unsafe { simd::dot(&xb, wrow(n0 + j), k) };
                }
            });
        return;
    }
    let target = Out::new(&mut out[..rows * n]);
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let (n0, n1) = (c * chunk, ((c + 1) * chunk).min(n));
        for j in (n0..n1).step_by(4) {
            let nw = (n1 - j).min(4);
            let ws = std::array::from_fn(|i| wrow(j + i));
            if j + 12 <= n {
                // Four weight rows (contiguous) two groups ahead come from memory while these
                // four are multiplied with every row of x (one group ahead measured slower
                // on the DRAM-streamed lm_head).
                simd::prefetch(&w[(j + 8) * k..(j + 12) * k]);
            }
            for t in (0..rows).step_by(4) {
                let nt = (rows - t).min(4);
                let xs = std::array::from_fn(|i| {
                    let r = t + i.min(nt - 1);
                    &xb[r * k..(r + 1) * k]
                });
                // SAFETY: CPU features as above; every row slice holds k elements.
                let acc = unsafe { simd::block_4x4(xs, ws, k) };
                for (i, a) in acc.iter().enumerate().take(nt) {
                    // SAFETY: columns n0..n1 of every row belong to this task alone.
                    unsafe { target.write((t + i) * n + j, &a[..nw]) };
                }
            }
        }
    });
}

/// The output rows of a packed-panel product, each `n` writable f32 at its own address
/// (rows of one matrix, or separate vectors), shared by parallel tasks that each write their
/// own columns of every row.
#[cfg(target_arch = "x86_64")]
struct RowsOut {
    rows: Vec<*mut f32>,
    n: usize,
}

// SAFETY: the rows are distinct memory (made from one `&mut` matrix or from distinct `&mut`
// slices) and tasks write disjoint columns of them, see `tile`'s callers.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for RowsOut {}

#[cfg(target_arch = "x86_64")]
impl RowsOut {
    /// The first `rows` rows of the row-major `rows x n` matrix `out`.
    fn matrix(out: &mut [f32], rows: usize, n: usize) -> Self {
        assert!(out.len() >= rows * n, "linear_panels bounds");
        let at = out.as_mut_ptr();
        Self {
            rows: (0..rows).map(|t| at.wrapping_add(t * n)).collect(),
            n,
        }
    }

    /// The addresses of column `col` of rows `row..row + m` (the rest of the array null),
    /// after checking that those rows exist and `col + width <= n`. Writing through them is
    /// the caller's to make exclusive.
    fn tile(
        &self,
        row: usize,
        m: usize,
        col: usize,
        width: usize,
    ) -> [*mut f32; super::bf16_avx512::MR] {
        assert!(
            m <= super::bf16_avx512::MR && row + m <= self.rows.len() && col + width <= self.n,
            "tile rows inside the output"
        );
        std::array::from_fn(|i| {
            if i < m {
                self.rows[row + i].wrapping_add(col)
            } else {
                std::ptr::null_mut()
            }
        })
    }
}

/// An output matrix shared by parallel tasks that each write their own columns.
#[cfg(target_arch = "x86_64")]
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (their own columns of every row), see `write`'s callers.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
impl Out {
    fn new(out: &mut [f32]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Copies `src` to elements `at..at + src.len()`.
    ///
    /// # Safety
    /// No other thread touches those elements meanwhile.
    unsafe fn write(&self, at: usize, src: &[f32]) {
        assert!(at + src.len() <= self.len, "tile write inside the output");
        // SAFETY: in bounds (asserted); exclusive per the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
    }
}

/// The many-row GEMM: weights packed per 32-row panel, a 12 x 32 register-blocked kernel.
#[cfg(target_arch = "x86_64")]
mod gemm {
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::super::bf16_avx512::{self as simd, MR, NR};
    use super::Out;

    thread_local! {
        /// Reused panel buffer of each pool thread.
        static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// `out[t, n] = bf16(x[t]) . w[n]`: parallel over panels of NR weight rows; each task packs
    /// its panel once (k x NR bf16, in L2) and runs every MR-row block of x against it.
    pub fn linear(x: &[f32], rows: usize, w: &[u16], k: usize, n: usize, out: &mut [f32]) {
        let kp = k.div_ceil(2);
        let padded_rows = rows.next_multiple_of(MR);
        // x as bf16 pairs, row stride kp dwords; padding (odd k, missing rows) is zero.
        let mut xa = vec![0u32; padded_rows * kp];
        {
            let xb: &mut [u16] = bytemuck::cast_slice_mut(&mut xa);
            xb.par_chunks_mut(2 * kp)
                .zip(x.par_chunks(k))
                .take(rows)
                // SAFETY: only reached with the CPU features of this kernel (see linear_avx512).
                .for_each(|(d, s)| unsafe { simd::round_into(s, &mut d[..k]) });
        }
        let target = Out::new(&mut out[..rows * n]);
        (0..n.div_ceil(NR)).into_par_iter().for_each(|pj| {
            let n0 = pj * NR;
            let width = (n - n0).min(NR);
            PANEL.with(|cell| {
                let mut panel = cell.borrow_mut();
                if panel.len() < kp * NR {
                    panel.resize(kp * NR, 0);
                }
                // SAFETY: only reached with the CPU features of this kernel.
                unsafe { simd::pack_panel(w, n, k, n0, &mut panel) };
                for t0 in (0..rows).step_by(MR) {
                    // SAFETY: the CPU features were checked by the caller; xa holds
                    // padded_rows >= t0 + MR rows of kp dwords and the panel kp * NR.
                    let tile = unsafe { simd::kernel_mr_nr(&xa[t0 * kp..], kp, &panel, kp) };
                    for (i, trow) in tile.iter().enumerate().take(rows - t0) {
                        // SAFETY: columns n0..n0 + width of every row belong to this task.
                        unsafe { target.write((t0 + i) * n + n0, &trow[..width]) };
                    }
                }
            });
        });
    }
}

#[cfg(test)]
#[path = "bf16_tests.rs"]
mod tests;
