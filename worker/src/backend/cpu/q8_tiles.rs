//! Q8_0 projections on AVX512-VNNI in tiles: several weight rows times several input rows
//! per pass, so that each loaded weight vector meets every input row of the tile (batched
//! decode reads the weights once per step) and each loaded input vector meets several weight
//! rows (batch-1 decode spends fewer instructions per weight byte).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. The weight codes are made unsigned by
//! flipping their top bit (`q_w ^ 0x80 = q_w + 128`, one instruction per weight vector,
//! shared by every input row), which adds `128 * sum(q_x)` to each block's dot; that term
//! depends on the input alone, so it is computed once per input row and preloaded into the
//! i32 accumulator of each block ([`Q8Act::corr`]): the block sums are exactly the portable
//! ones. Per pair of blocks (64 weights, one 512-bit register; i32 lanes 0..8 hold block b,
//! 8..16 block b + 1) the sums are scaled by `d_w d_x` per lane in f32: `d_w` of 16 blocks is
//! widened from f16 once (`vcvtph2ps`) and spread to the lanes with one permute per weight
//! row, `d_x` comes spread already ([`Q8Act::dxe`]).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::q8::{QK8_0, QuantRow, quantize_row};

/// One input row prepared for the tiles: int8 codes, block-sum corrections and scales, each
/// laid out per pair of blocks (64 values) and zero-padded to whole pairs.
pub struct Q8Act {
    /// Codes, `64 * pairs` bytes (zeros past the row).
    q: Vec<i8>,
    /// Per pair, 16 i32 lanes: `-128 * sum(q_x)` of block 2p in lane 0 and of block 2p + 1
    /// in lane 8, zeros elsewhere.
    corr: Vec<i32>,
    /// Per pair, 16 f32 lanes: `d_x` of block 2p in lanes 0..8, of block 2p + 1 in 8..16.
    dxe: Vec<f32>,
}

impl Q8Act {
    /// The tile layout of one quantized row (`quantize_row`'s codes and scales).
    pub fn new(x: &QuantRow) -> Q8Act {
        let blocks = x.d.len();
        let pairs = blocks.div_ceil(2);
        let mut q = vec![0i8; 64 * pairs];
        q[..x.q.len()].copy_from_slice(&x.q);
        let mut corr = vec![0i32; 16 * pairs];
        let mut dxe = vec![0.0f32; 16 * pairs];
        for b in 0..blocks {
            let sum: i32 = x.q[b * QK8_0..(b + 1) * QK8_0]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
            let lane = 16 * (b / 2) + 8 * (b % 2);
            corr[lane] = -128 * sum;
            dxe[lane..lane + 8].fill(x.d[b]);
        }
        Q8Act { q, corr, dxe }
    }

    fn pairs(&self) -> usize {
        self.q.len() / 64
    }
}

/// Whether this CPU runs the tiles (AVX-512 F/BW/VL/VNNI and F16C).
pub fn supported() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") && has!("f16c")
}

/// Zeroes zmm16..zmm31, which the tiles may use: `vzeroupper` (emitted at function exits)
/// clears only the upper halves of registers 0..16, and while any upper half is dirty Intel
/// CPUs run legacy-SSE instructions (the scalar f32 code compiled for baseline x86-64) with
/// a penalty. A precaution: the q8 bench did not isolate an effect on this machine.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn clear_high_zmm() {
    // SAFETY: the instructions write only the registers declared clobbered.
    unsafe {
        std::arch::asm!(
            "vpxord xmm16, xmm16, xmm16",
            "vpxord xmm17, xmm17, xmm17",
            "vpxord xmm18, xmm18, xmm18",
            "vpxord xmm19, xmm19, xmm19",
            "vpxord xmm20, xmm20, xmm20",
            "vpxord xmm21, xmm21, xmm21",
            "vpxord xmm22, xmm22, xmm22",
            "vpxord xmm23, xmm23, xmm23",
            "vpxord xmm24, xmm24, xmm24",
            "vpxord xmm25, xmm25, xmm25",
            "vpxord xmm26, xmm26, xmm26",
            "vpxord xmm27, xmm27, xmm27",
            "vpxord xmm28, xmm28, xmm28",
            "vpxord xmm29, xmm29, xmm29",
            "vpxord xmm30, xmm30, xmm30",
            "vpxord xmm31, xmm31, xmm31",
            out("zmm16") _,
            out("zmm17") _,
            out("zmm18") _,
            out("zmm19") _,
            out("zmm20") _,
            out("zmm21") _,
            out("zmm22") _,
            out("zmm23") _,
            out("zmm24") _,
            out("zmm25") _,
            out("zmm26") _,
            out("zmm27") _,
            out("zmm28") _,
            out("zmm29") _,
            out("zmm30") _,
            out("zmm31") _,
            options(nomem, nostack, preserves_flags)
        );
    }
}

/// Weight rows a batch-1 tile takes at once.
const DECODE_WR: usize = 4;
/// Weight rows a batched tile takes at once; input rows go by 8, 4, 2, 1.
const BATCH_WR: usize = 2;

/// `out[t * n + r] = x_t . w_r` for the Q8_0 matrix (`q`, `d`: n rows of k codes and k / 32
/// f16 scales) and `rows` input rows of `x`. The caller checks [`supported`].
pub fn linear(x: &[f32], rows: usize, (q, d): (&[i8], &[u16]), k: usize, out: &mut [f32]) {
    let blocks = k / QK8_0;
    let n = out.len().checked_div(rows).unwrap_or(0);
    if rows == 0 || n == 0 || blocks == 0 {
        return;
    }
    // One row is quantized in place; a batch's rows in parallel.
    let act = |t: usize| Q8Act::new(&quantize_row(&x[t * k..(t + 1) * k]));
    let acts: Vec<Q8Act> = if rows == 1 {
        vec![act(0)]
    } else {
        (0..rows).into_par_iter().map(act).collect()
    };
    let acts: Vec<&Q8Act> = acts.iter().collect();
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 8)).max(16).next_multiple_of(DECODE_WR);
    let weights = |r: usize| (&q[r * k..(r + 1) * k], &d[r * blocks..(r + 1) * blocks]);
    if rows == 1 {
        out[..n]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, o)| {
                let r0 = c * chunk;
                let mut j = 0;
                while j < o.len() {
                    let take = if o.len() - j >= DECODE_WR {
                        DECODE_WR
                    } else {
                        1
                    };
                    tile_into(r0 + j, take, &acts, &weights, blocks, &mut o[j..], 0);
                    j += take;
                }
                // SAFETY: the caller checked `q8::tiles_supported()` (AVX-512 F among them).
                unsafe { clear_high_zmm() };
            });
        return;
    }
    super::linear::by_column_parts(rows, n, chunk, out, |n0, n1, part| {
        let width = n1 - n0;
        let mut r = n0;
        while r < n1 {
            let take = (n1 - r).min(BATCH_WR);
            for (t, xr) in super::linear::input_row_tiles(rows) {
                let dst = &mut part[t * width + r - n0..];
                tile_into(r, take, &acts[t..t + xr], &weights, blocks, dst, width);
            }
            r += take;
        }
        // SAFETY: the caller checked `q8::tiles_supported()` (AVX-512 F among them).
        unsafe { clear_high_zmm() };
    });
}

/// The weight rows of a matrix by index: codes and f16 scales.
type Rows<'a> = dyn Fn(usize) -> (&'a [i8], &'a [u16]) + Sync + 'a;

/// The tile of weight rows `r..r + wr` (wr 1, 2 or 4) and the input rows `acts` (1, 2, 4 or
/// 8; 4 weight rows with 1 input row only), written to `out[u * stride + i]` for input row u
/// and weight row r + i.
fn tile_into<'a>(
    r: usize,
    wr: usize,
    acts: &[&Q8Act],
    weights: &Rows<'a>,
    blocks: usize,
    out: &mut [f32],
    stride: usize,
) {
    macro_rules! run {
        ($w:literal, $x:literal) => {{
            let ws: [(&[i8], &[u16]); $w] = std::array::from_fn(|i| weights(r + i));
            let xs: [&Q8Act; $x] = std::array::from_fn(|t| acts[t]);
            // SAFETY: `linear`'s callers check `q8::tiles_supported()`; lengths
            // are checked inside.
            let sums = unsafe { tile::<$w, $x>(ws, xs, blocks) };
            for (i, row) in sums.iter().enumerate() {
                for (u, &v) in row.iter().enumerate() {
                    out[u * stride + i] = v;
                }
            }
        }};
    }
    match (wr, acts.len()) {
        (4, _) => run!(4, 1),
        (2, 8) => run!(2, 8),
        (2, 4) => run!(2, 4),
        (2, 2) => run!(2, 2),
        (2, _) => run!(2, 1),
        (_, 8) => run!(1, 8),
        (_, 4) => run!(1, 4),
        (_, 2) => run!(1, 2),
        _ => run!(1, 1),
    }
}

/// `[i][t] = w_i . x_t` for WR weight rows (codes, f16 scales) and XR prepared input rows.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn tile<const WR: usize, const XR: usize>(
    ws: [(&[i8], &[u16]); WR],
    xs: [&Q8Act; XR],
    blocks: usize,
) -> [[f32; XR]; WR] {
    let pairs = blocks.div_ceil(2);
    for (wq, wd) in &ws {
        assert!(wq.len() >= blocks * QK8_0 && wd.len() >= blocks);
    }
    for x in &xs {
        assert!(x.pairs() >= pairs && x.corr.len() >= 16 * pairs && x.dxe.len() >= 16 * pairs);
    }
    let flip = _mm512_set1_epi8(-128);
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); XR]; WR];
    let mut g = 0;
    while g < blocks {
        let nb = (blocks - g).min(16);
        let dmask: __mmask16 = if nb == 16 { 0xffff } else { (1u16 << nb) - 1 };
        // SAFETY: blocks g..g + nb lie within each wd (asserted); masked lanes are not read.
        let dw: [__m512; WR] = std::array::from_fn(|i| unsafe {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                dmask,
                ws[i].1.as_ptr().add(g).cast(),
            ))
        });
        for p in 0..nb.div_ceil(2) {
            let b = g + 2 * p;
            let at = b * QK8_0;
            let idx = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * p as i32));
            let wv: [__m512i; WR] = std::array::from_fn(|i| {
                let ptr = ws[i].0.as_ptr();
                // SAFETY: blocks b (and b + 1 when it exists) lie within the row (asserted):
                // a lone last block is loaded under a 32-byte mask.
                let v = unsafe {
                    if b + 1 < blocks {
                        _mm512_loadu_si512(ptr.add(at).cast())
                    } else {
                        _mm512_maskz_loadu_epi8(0xffff_ffff, ptr.add(at).cast())
                    }
                };
                _mm512_xor_si512(v, flip)
            });
            let sl: [__m512; WR] = std::array::from_fn(|i| _mm512_permutexvar_ps(idx, dw[i]));
            let pair = b / 2;
            for (t, x) in xs.iter().enumerate() {
                // SAFETY: pair < pairs, and each input row holds 64 codes, 16 corrections and
                // 16 scales per pair (asserted).
                let (xv, c, dx) = unsafe {
                    (
                        _mm512_loadu_si512(x.q.as_ptr().add(64 * pair).cast()),
                        _mm512_loadu_si512(x.corr.as_ptr().add(16 * pair).cast()),
                        _mm512_loadu_ps(x.dxe.as_ptr().add(16 * pair)),
                    )
                };
                for i in 0..WR {
                    let dot = _mm512_dpbusd_epi32(c, wv[i], xv);
                    let s = _mm512_mul_ps(sl[i], dx);
                    acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i][t]);
                }
            }
        }
        g += nb;
    }
    std::array::from_fn(|i| std::array::from_fn(|t| _mm512_reduce_add_ps(acc[i][t])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::q8::dot_row_portable;
    use crate::backend::cpu::q8::tests::lcg;

    /// The tiles against the portable block dot on the same quantized rows, for widths of
    /// 1 to 40 blocks (odd counts: a lone last block; more than 16: several scale groups),
    /// 1 to 13 input rows (ragged against the 8/4/2/1 tiles) and 1 to 11 weight rows (ragged
    /// against the 4- and 2-row tiles): the i32 block sums are the same, only the f32
    /// summation order differs (asserted 1e-5 of `sum over blocks of |d_w d_x s_b|` + 1e-6).
    #[test]
    fn tiles_match_the_portable_block_dot() {
        if !crate::backend::cpu::q8::tiles_supported() {
            eprintln!("skipped: this CPU lacks AVX512-VNNI");
            return;
        }
        let mut seed = 5;
        for (blocks, rows, n) in [(1, 1, 5), (3, 2, 11), (24, 1, 9), (24, 13, 7), (40, 5, 3)] {
            let k = blocks * QK8_0;
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mut x: Vec<f32> = (0..rows * k).map(|_| 3.0 * lcg(&mut seed)).collect();
            x[..QK8_0].fill(0.0);
            let (mut q, mut d) = (Vec::new(), Vec::new());
            for r in 0..n {
                let qr = quantize_row(&w[r * k..(r + 1) * k]);
                q.extend_from_slice(&qr.q);
                d.extend(qr.d.iter().map(|&v| half::f16::from_f32(v).to_bits()));
            }
            let mut got = vec![0.0f32; rows * n];
            linear(&x, rows, (&q, &d), k, &mut got);
            for t in 0..rows {
                let xq = quantize_row(&x[t * k..(t + 1) * k]);
                for r in 0..n {
                    let (qw, dw) = (&q[r * k..(r + 1) * k], &d[r * blocks..(r + 1) * blocks]);
                    let want = dot_row_portable(qw, dw, &xq);
                    let mag: f32 = (0..blocks)
                        .map(|b| {
                            let s: i32 = (0..QK8_0)
                                .map(|e| i32::from(qw[b * 32 + e]) * i32::from(xq.q[b * 32 + e]))
                                .sum();
                            (half::f16::from_bits(dw[b]).to_f32() * xq.d[b] * s as f32).abs()
                        })
                        .sum();
                    let v = got[t * n + r];
                    assert!(
                        (v - want).abs() <= 1e-5 * mag + 1e-6,
                        "blocks {blocks} rows {rows} t {t} r {r}: {v} vs {want}"
                    );
                }
            }
        }
    }
}
