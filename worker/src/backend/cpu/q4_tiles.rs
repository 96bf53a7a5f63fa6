//! Q4_0 / Q4_1 projections on AVX512-VNNI in tiles, as `q8_tiles.rs` does for Q8_0: several
//! weight rows times several input rows per pass, each loaded weight vector shared by every
//! input row of the tile and each loaded input vector by every weight row.
//!
//! One 512-bit load takes the nibbles of 4 blocks (128 weights, 16 bytes a block). Seen as
//! 32 u16 lanes, `(v >> 4s) & 0x0f` for s = 0..4 are four vectors of 32 codes already in i16
//! lanes, with no widening: the low and high nibbles of the even bytes (s = 0, 1) and of the
//! odd bytes (s = 2, 3). The int16 input row is laid out to match ([`Q4Act`]), so four
//! `vpdpwssd` leave block `i` of the group in i32 lanes `4i..4i + 4` (lane L sums bytes
//! 4L..4L + 4, all of block L / 4); those are scaled by `d_w d_x` per lane in f32 (16 f16
//! weight scales widened at once, spread by one permute a group). Q4_0's `-8 sum(q_x)` is
//! preloaded into the i32 accumulator ([`Q4Act::corr`]), so its integer sums are the
//! portable ones; Q4_1's `m_w d_x sum(q_x)` is one f32 multiply-add per 16 blocks. No sum
//! overflows: at most 8 products of 15 * 32767 and a correction of 8 * 32 * 32767 a lane.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::q4::Q4Input;
use super::q8::QK8_0;
use super::q8_tiles::clear_high_zmm;
use crate::model::weights::Q4Rows;

/// Blocks per 512-bit group of nibbles.
const GROUP: usize = 4;

/// One input row laid out for the tiles, zero-padded to whole groups (codes, corrections,
/// scales) and to whole 16-block runs (min terms).
pub struct Q4Act {
    /// Per group of 4 blocks, 4 x 32 codes: vector s, lane u holds the value that weight
    /// nibble s of u16 lane u multiplies ([`Q4Act::new`]).
    q: Vec<i16>,
    /// Per group, 16 i32 lanes: Q4_0's `-8 * sum(q_x)` of block i in lane 4i; zeros for Q4_1.
    corr: Vec<i32>,
    /// Per group, 16 f32 lanes: `d_x` of block i in lanes 4i..4i + 4.
    dxe: Vec<f32>,
    /// `d_x * sum(q_x)` of each block (Q4_1's min term), padded to a multiple of 16.
    sx: Vec<f32>,
}

impl Q4Act {
    /// The tile layout of one quantized row, for Q4_1 weights (`with_min`) or Q4_0. Byte
    /// `y = 2u + (s >> 1)` of a group (block y / 16, byte j = y % 16) holds elements j (low
    /// nibble) and j + 16 (high) of its block; vector s takes the high one when s is odd.
    pub fn new(x: &Q4Input, with_min: bool) -> Q4Act {
        let blocks = x.d.len();
        let groups = blocks.div_ceil(GROUP);
        let mut q = vec![0i16; 128 * groups];
        let mut corr = vec![0i32; 16 * groups];
        let mut dxe = vec![0.0f32; 16 * groups];
        let mut sx = vec![0.0f32; blocks.next_multiple_of(16)];
        for g in 0..groups {
            for s in 0..4 {
                for u in 0..32 {
                    let y = 2 * u + (s >> 1);
                    let b = GROUP * g + y / 16;
                    if b < blocks {
                        let e = y % 16 + 16 * (s & 1);
                        q[128 * g + 32 * s + u] = x.q[b * QK8_0 + e];
                    }
                }
            }
        }
        for (b, ((&d, &sum), sx)) in x.d.iter().zip(&x.sums).zip(&mut sx).enumerate() {
            let (g, i) = (b / GROUP, b % GROUP);
            if !with_min {
                corr[16 * g + 4 * i] = -8 * sum;
            }
            dxe[16 * g + 4 * i..16 * g + 4 * i + 4].fill(d);
            *sx = d * sum as f32;
        }
        Q4Act { q, corr, dxe, sx }
    }

    fn groups(&self) -> usize {
        self.q.len() / 128
    }
}

/// Weight rows a batch-1 tile takes at once.
const DECODE_WR: usize = 4;
/// Weight rows a batched tile takes at once; input rows go by 8, 4, 2, 1.
const BATCH_WR: usize = 2;

/// `out[t * n + r] = x_t . w_r` for the Q4 matrix `w` (n rows of k values) and `rows` input
/// rows of `x`. The caller checks `q8::tiles_supported()`.
pub fn linear(x: &[f32], rows: usize, w: &Q4Rows, k: usize, out: &mut [f32]) {
    let blocks = k / QK8_0;
    let n = out.len().checked_div(rows).unwrap_or(0);
    if rows == 0 || n == 0 || blocks == 0 {
        return;
    }
    let act = |t: usize| Q4Act::new(&Q4Input::new(&x[t * k..(t + 1) * k]), w.with_min);
    let acts: Vec<Q4Act> = if rows == 1 {
        vec![act(0)]
    } else {
        (0..rows).into_par_iter().map(act).collect()
    };
    let acts: Vec<&Q4Act> = acts.iter().collect();
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 8)).max(16).next_multiple_of(DECODE_WR);
    let tile = |r: usize, wr: usize, xs: &[&Q4Act], dst: &mut [f32], stride: usize| {
        if w.with_min {
            tile_into::<true>(r, wr, xs, w, blocks, dst, stride);
        } else {
            tile_into::<false>(r, wr, xs, w, blocks, dst, stride);
        }
    };
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
                    tile(r0 + j, take, &acts, &mut o[j..], 0);
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
                tile(r, take, &acts[t..t + xr], dst, width);
            }
            r += take;
        }
        // SAFETY: the caller checked `q8::tiles_supported()` (AVX-512 F among them).
        unsafe { clear_high_zmm() };
    });
}

/// Nibbles, scales and mins (empty for Q4_0) of one weight row.
type Row<'a> = (&'a [u8], &'a [u16], &'a [u16]);

/// The tile of weight rows `r..r + wr` (wr 1, 2 or 4) and the input rows `acts` (1, 2, 4 or
/// 8; 4 weight rows with 1 input row only), written to `out[u * stride + i]` for input row u
/// and weight row r + i.
fn tile_into<const MIN: bool>(
    r: usize,
    wr: usize,
    acts: &[&Q4Act],
    w: &Q4Rows,
    blocks: usize,
    out: &mut [f32],
    stride: usize,
) {
    let row = |i: usize| -> Row<'_> {
        let (b0, b1) = (i * blocks, (i + 1) * blocks);
        let m = if MIN { &w.m[b0..b1] } else { &w.m[..0] };
        (&w.qs[16 * b0..16 * b1], &w.d[b0..b1], m)
    };
    macro_rules! run {
        ($w:literal, $x:literal) => {{
            let ws: [Row<'_>; $w] = std::array::from_fn(|i| row(r + i));
            let xs: [&Q4Act; $x] = std::array::from_fn(|t| acts[t]);
            // SAFETY: `linear`'s callers check `q8::tiles_supported()`; lengths are checked
            // inside.
            let sums = unsafe { tile::<$w, $x, MIN>(ws, xs, blocks) };
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

/// `[i][t] = w_i . x_t` for WR weight rows and XR prepared input rows; `MIN`: Q4_1 weights
/// (the rows carry mins), else Q4_0.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn tile<const WR: usize, const XR: usize, const MIN: bool>(
    ws: [Row<'_>; WR],
    xs: [&Q4Act; XR],
    blocks: usize,
) -> [[f32; XR]; WR] {
    let groups = blocks.div_ceil(GROUP);
    for (wq, wd, wm) in &ws {
        assert!(wq.len() >= blocks * QK8_0 / 2 && wd.len() >= blocks);
        assert!(!MIN || wm.len() >= blocks);
    }
    for x in &xs {
        assert!(x.groups() >= groups && x.corr.len() >= 16 * groups);
        assert!(x.dxe.len() >= 16 * groups && x.sx.len() >= blocks.next_multiple_of(16));
    }
    let low = _mm512_set1_epi16(0x0f);
    let quads = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); XR]; WR];
    let mut g = 0;
    while g < blocks {
        let nb = (blocks - g).min(16);
        let dmask: __mmask16 = if nb == 16 { 0xffff } else { (1u16 << nb) - 1 };
        // SAFETY: blocks g..g + nb lie within each row's scales (asserted); masked lanes are
        // not read.
        let dw: [__m512; WR] = std::array::from_fn(|i| unsafe {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                dmask,
                ws[i].1.as_ptr().add(g).cast(),
            ))
        });
        if MIN {
            // SAFETY: as for the scales; each input row's `sx` holds whole runs of 16.
            let mw: [__m512; WR] = std::array::from_fn(|i| unsafe {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    dmask,
                    ws[i].2.as_ptr().add(g).cast(),
                ))
            });
            for (t, x) in xs.iter().enumerate() {
                // SAFETY: g + 16 <= sx.len() (asserted).
                let sx = unsafe { _mm512_loadu_ps(x.sx.as_ptr().add(g)) };
                for i in 0..WR {
                    acc[i][t] = _mm512_fmadd_ps(mw[i], sx, acc[i][t]);
                }
            }
        }
        for p in 0..nb.div_ceil(GROUP) {
            let b = g + GROUP * p;
            let left = blocks - b;
            let idx = _mm512_add_epi32(quads, _mm512_set1_epi32((GROUP * p) as i32));
            let wv: [[__m512i; 4]; WR] = std::array::from_fn(|i| {
                let ptr = ws[i].0.as_ptr();
                // SAFETY: the blocks b..b + min(left, 4) lie within the row (asserted); a
                // short last group is loaded under a mask of its 16-byte blocks.
                let v = unsafe {
                    if left >= GROUP {
                        _mm512_loadu_si512(ptr.add(16 * b).cast())
                    } else {
                        let mask: __mmask64 = (1u64 << (16 * left)) - 1;
                        _mm512_maskz_loadu_epi8(mask, ptr.add(16 * b).cast())
                    }
                };
                [
                    _mm512_and_si512(v, low),
                    _mm512_and_si512(_mm512_srli_epi16(v, 4), low),
                    _mm512_and_si512(_mm512_srli_epi16(v, 8), low),
                    _mm512_srli_epi16(v, 12),
                ]
            });
            let sl: [__m512; WR] = std::array::from_fn(|i| _mm512_permutexvar_ps(idx, dw[i]));
            let group = b / GROUP;
            for (t, x) in xs.iter().enumerate() {
                // SAFETY: group < groups, and each input row holds 128 codes, 16 corrections
                // and 16 scales per group (asserted).
                let (xv, c, dx) = unsafe {
                    let at = x.q.as_ptr().add(128 * group);
                    (
                        [
                            _mm512_loadu_si512(at.cast()),
                            _mm512_loadu_si512(at.add(32).cast()),
                            _mm512_loadu_si512(at.add(64).cast()),
                            _mm512_loadu_si512(at.add(96).cast()),
                        ],
                        _mm512_loadu_si512(x.corr.as_ptr().add(16 * group).cast()),
                        _mm512_loadu_ps(x.dxe.as_ptr().add(16 * group)),
                    )
                };
                for i in 0..WR {
                    let mut dot = _mm512_dpwssd_epi32(c, wv[i][0], xv[0]);
                    dot = _mm512_dpwssd_epi32(dot, wv[i][1], xv[1]);
                    dot = _mm512_dpwssd_epi32(dot, wv[i][2], xv[2]);
                    dot = _mm512_dpwssd_epi32(dot, wv[i][3], xv[3]);
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
    use crate::backend::cpu::q4::{dot_row_portable, quantize_mat};
    use crate::backend::cpu::q8::tests::lcg;
    use crate::model::{Mat, WeightData};

    /// The tiles against the portable block dot on the same quantized rows, Q4_0 and Q4_1,
    /// for widths of 1 to 41 blocks (short last groups of 1 to 3 blocks; more than 16: several
    /// scale runs), 1 to 13 input rows (ragged against the 8/4/2/1 tiles) and 1 to 11 weight
    /// rows (ragged against the 4- and 2-row tiles): the i32 block sums are the same, only
    /// the f32 summation order differs (asserted 1e-4 of `sum |w x|` over the dequantized
    /// values + 1e-5: the min and code terms may cancel, so it is looser than Q8_0's).
    #[test]
    fn tiles_match_the_portable_block_dot() {
        if !crate::backend::cpu::q8::tiles_supported() {
            eprintln!("skipped: this CPU lacks AVX512-VNNI");
            return;
        }
        let mut seed = 17;
        let shapes = [
            (1, 1, 5),
            (3, 2, 11),
            (18, 1, 9),
            (18, 13, 7),
            (41, 5, 3),
            (48, 9, 4),
        ];
        for with_min in [false, true] {
            for (blocks, rows, n) in shapes {
                let k = blocks * QK8_0;
                let w = Mat {
                    rows: n,
                    cols: k,
                    data: WeightData::F32((0..n * k).map(|_| lcg(&mut seed)).collect()),
                };
                let wq = quantize_mat(&w, with_min).unwrap();
                let WeightData::Q4(q4) = &wq.data else {
                    unreachable!()
                };
                let mut x: Vec<f32> = (0..rows * k).map(|_| 3.0 * lcg(&mut seed)).collect();
                x[..QK8_0].fill(0.0);
                let mut got = vec![0.0f32; rows * n];
                linear(&x, rows, q4, k, &mut got);
                for t in 0..rows {
                    let xq = Q4Input::new(&x[t * k..(t + 1) * k]);
                    for r in 0..n {
                        let want = dot_row_portable(q4, r, k, &xq);
                        let mut wrow = vec![0.0f32; k];
                        wq.row_to_f32(r, &mut wrow);
                        let mag: f32 = (0..k)
                            .map(|e| (wrow[e] * xq.d[e / 32] * f32::from(xq.q[e])).abs())
                            .sum();
                        let v = got[t * n + r];
                        assert!(
                            (v - want).abs() <= 1e-4 * mag + 1e-5,
                            "min {with_min} blocks {blocks} rows {rows} t {t} r {r}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
