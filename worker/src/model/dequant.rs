//! ggml tensor types and their dequantization to f32: F32, F16, BF16, the 32-element blocks
//! Q4_0, Q4_1 and Q8_0, and the 256-element k-quant super-blocks Q4_K, Q5_K and Q6_K (block
//! layouts as llama.cpp's ggml-common.h defines them; every scale is an f16).

use half::f16;

/// A ggml tensor type the loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 elements: f16 scale `d`, 16 bytes of 4-bit `q`; `x = (q - 8) * d`.
    Q4_0,
    /// 32 elements: f16 `d`, f16 `m`, 16 bytes of 4-bit `q`; `x = q * d + m`.
    Q4_1,
    /// 32 elements: f16 `d`, 32 signed bytes `q`; `x = q * d`.
    Q8_0,
    /// 256 elements in 8 groups of 32 with 6-bit scales and mins.
    Q4K,
    /// As Q4_K with a fifth bit per element.
    Q5K,
    /// 256 elements in 16 groups of 16, 6-bit values, signed 8-bit scales.
    Q6K,
}

/// Element counts of one block of the k-quants.
const QK_K: usize = 256;
/// Element counts of one block of Q4_0, Q4_1, Q8_0.
const QK: usize = 32;
/// Elements per Q8_0 block.
pub const Q8_0_BLOCK: usize = QK;

impl GgmlType {
    /// The type of a ggml type id; `None` for types the loader does not read.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// ggml's name of a type id, for error messages (types the loader reads and the common
    /// ones it does not).
    pub fn name_of(id: u32) -> String {
        let known = [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (29, "IQ1_M"),
            (30, "BF16"),
        ];
        known
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| format!("type {id}"), |(_, n)| (*n).to_string())
    }

    /// Names of the types the loader reads.
    pub const SUPPORTED: &'static str = "F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K";

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (QK, 18),
            Self::Q4_1 => (QK, 20),
            Self::Q8_0 => (QK, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_of(self, n: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        n.is_multiple_of(elems).then(|| n / elems * bytes)
    }

    /// Dequantizes `out.len()` elements from `src` (exactly their bytes, `bytes_of`).
    pub fn dequantize(self, src: &[u8], out: &mut [f32]) {
        let (elems, bytes) = self.block();
        for (block, y) in src.chunks_exact(bytes).zip(out.chunks_exact_mut(elems)) {
            match self {
                Self::F32 => y[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
                Self::F16 => y[0] = f16_at(block, 0),
                Self::Bf16 => y[0] = f32::from_bits(u32::from(u16_at(block, 0)) << 16),
                Self::Q4_0 => q4_0(block, y),
                Self::Q4_1 => q4_1(block, y),
                Self::Q8_0 => q8_0(block, y),
                Self::Q4K => q4_k(block, y),
                Self::Q5K => q5_k(block, y),
                Self::Q6K => q6_k(block, y),
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16_at(b, at)).to_f32()
}

/// The four 6-bit values of a Q6_K half-block at `l` (0..32): elements l, l + 32, l + 64 and
/// l + 96, low 4 bits from `ql` (64 bytes), high 2 bits from `qh` (32 bytes).
pub(crate) fn q6k_quad(ql: &[u8], qh: &[u8], l: usize) -> [u8; 4] {
    [
        (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
        (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
    ]
}

/// Low nibbles are elements 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = (f32::from(q & 0x0f) - 8.0) * d;
        y[j + 16] = (f32::from(q >> 4) - 8.0) * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = f32::from(q & 0x0f) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Scale and min of group `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K: groups 0..4
/// hold 6 bits in bytes 0..8; groups 4..8 take 4 low bits from bytes 8..12 and their 2 high
/// bits from the top of bytes 0..8.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K: d, dmin (f16), 12 bytes of scales, 128 bytes of nibbles. Each 64 elements take 32
/// bytes: low nibbles with group 2i, high nibbles with group 2i + 1; `x = d*sc*q - dmin*m`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for i in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let q = &qs[32 * i..32 * i + 32];
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            out[l] = d * sc1 * f32::from(q[l] & 0x0f) - dmin * m1;
            out[l + 32] = d * sc2 * f32::from(q[l] >> 4) - dmin * m2;
        }
    }
}

/// Q5_K: as Q4_K plus 32 bytes `qh` after the scales; bit `2i` (low nibbles) and `2i + 1`
/// (high nibbles) of `qh[l]` add 16 to element `l` of 64-element part `i`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for i in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let q = &qs[32 * i..32 * i + 32];
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & (1 << (2 * i)) != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & (2 << (2 * i)) != 0 { 16 } else { 0 };
            out[l] = d * sc1 * f32::from((q[l] & 0x0f) + hi1) - dmin * m1;
            out[l + 32] = d * sc2 * f32::from((q[l] >> 4) + hi2) - dmin * m2;
        }
    }
}

/// Q6_K: 128 bytes `ql` (low 4 bits), 64 bytes `qh` (high 2 bits), 16 signed scales, f16 d.
/// Each 128-element half takes 64 `ql`, 32 `qh` and 8 scales; element `l + 32k` of a half
/// (k = 0..4) takes a nibble of `ql[l]` or `ql[l + 32]` and bits `2k..2k+2` of `qh[l]`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for h in 0..2 {
        let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
        let out = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            for (k, &qk) in q6k_quad(ql, qh, l).iter().enumerate() {
                let scale = f32::from(sc[is + 2 * k] as i8);
                out[l + 32 * k] = d * scale * (f32::from(qk) - 32.0);
            }
        }
    }
}

#[cfg(test)]
mod tests;
