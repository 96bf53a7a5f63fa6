//! The CPU KV pool: paged K and V memory in f32, bf16 or fp8 e4m3 (one scale per token/head).
//!
//! Layout per layer and per K/V: `[block][kv_head][slot][head_dim]`, so one head's rows in a
//! block are contiguous and attention reads them in place, and a block's heads are next to
//! each other.
//!
//! On Linux the pool is an anonymous mapping advised for transparent huge pages
//! (`MADV_HUGEPAGE`, which takes effect where `/sys/kernel/mm/transparent_hugepage/enabled`
//! is `always` or `madvise`): a decode step reads every sequence's blocks, scattered over
//! the pool, and with 4 KiB pages most 4 KiB stretches of a block would cost a TLB miss
//! (a nested page walk in a VM). Elsewhere, or if the mapping fails, a plain allocation.

use crate::engine::KvDtype;
use crate::kv::BlockId;

/// Largest finite fp8 e4m3fn value.
const FP8_MAX: f32 = 448.0;

/// Decodes an fp8 e4m3fn byte.
pub fn fp8_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Encodes to the nearest fp8 e4m3fn value, saturating at ±448.
pub fn f32_to_fp8(x: f32, table: &[f32; 127]) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(FP8_MAX);
    if a.is_nan() {
        return 0x7f;
    }
    // table[i] = value of byte i for i in 0..=126, increasing.
    let i = table.partition_point(|&v| v < a);
    let code = if i == 0 {
        0
    } else if i >= table.len() {
        126
    } else if a - table[i - 1] <= table[i] - a {
        i - 1
    } else {
        i
    };
    sign | code as u8
}

enum Store {
    F32(Mem<f32>),
    Bf16(Mem<u16>),
    Fp8 { data: Mem<u8>, scales: Vec<f32> },
}

/// Zeroed pool memory of `len` elements (see the module header).
enum Mem<T> {
    #[cfg(target_os = "linux")]
    Map(memmap2::MmapMut, usize, std::marker::PhantomData<T>),
    Heap(Vec<T>),
}

impl<T: bytemuck::Pod> Mem<T> {
    fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len > 0
            && let Ok(map) = memmap2::MmapMut::map_anon(len * std::mem::size_of::<T>())
        {
            // Only a hint: without huge pages the pool works the same, slower.
            let _ = map.advise(memmap2::Advice::HugePage);
            return Self::Map(map, len, std::marker::PhantomData);
        }
        Self::Heap(vec![T::zeroed(); len])
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Mem<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            // A mapping is page-aligned, so the cast cannot fail on alignment.
            #[cfg(target_os = "linux")]
            Self::Map(m, len, _) => &bytemuck::cast_slice(&m[..])[..*len],
            Self::Heap(v) => v,
        }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Mem<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            #[cfg(target_os = "linux")]
            Self::Map(m, len, _) => &mut bytemuck::cast_slice_mut(&mut m[..])[..*len],
            Self::Heap(v) => v,
        }
    }
}

/// K and V memory for every layer.
pub struct KvStore {
    store: Store,
    layers: usize,
    blocks: usize,
    heads: usize,
    tpb: usize,
    dim: usize,
    fp8_table: [f32; 127],
    fp8_decode: [f32; 256],
}

/// Which half of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kv {
    /// Keys.
    K = 0,
    /// Values.
    V = 1,
}

impl KvStore {
    /// Bytes per token per layer for K and V together.
    pub fn bytes_per_token_layer(dtype: KvDtype, heads: usize, dim: usize) -> usize {
        let elems = 2 * heads * dim;
        match dtype {
            KvDtype::Float32 => elems * 4,
            KvDtype::Bf16 | KvDtype::Auto => elems * 2,
            KvDtype::Fp8 => elems + 2 * heads * 4,
        }
    }

    /// Allocates a zeroed pool.
    pub fn new(
        dtype: KvDtype,
        layers: usize,
        blocks: usize,
        heads: usize,
        tpb: usize,
        dim: usize,
    ) -> Self {
        let elems = layers * 2 * blocks * heads * tpb * dim;
        let store = match dtype {
            KvDtype::Float32 => Store::F32(Mem::zeroed(elems)),
            KvDtype::Bf16 | KvDtype::Auto => Store::Bf16(Mem::zeroed(elems)),
            KvDtype::Fp8 => Store::Fp8 {
                data: Mem::zeroed(elems),
                scales: vec![0.0; elems / dim],
            },
        };
        let mut fp8_table = [0.0; 127];
        for (i, v) in fp8_table.iter_mut().enumerate() {
            *v = fp8_to_f32(i as u8);
        }
        let mut fp8_decode = [0.0; 256];
        for (i, v) in fp8_decode.iter_mut().enumerate() {
            *v = fp8_to_f32(i as u8);
        }
        Self {
            store,
            layers,
            blocks,
            heads,
            tpb,
            dim,
            fp8_table,
            fp8_decode,
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks
    }

    /// Tokens per block.
    pub fn tokens_per_block(&self) -> usize {
        self.tpb
    }

    /// Row index (in units of head_dim) of (layer, K/V, block, head, slot).
    fn row(&self, layer: usize, kv: Kv, block: BlockId, head: usize, slot: usize) -> usize {
        debug_assert!(layer < self.layers && (block as usize) < self.blocks && slot < self.tpb);
        (((layer * 2 + kv as usize) * self.blocks + block as usize) * self.heads + head) * self.tpb
            + slot
    }

    /// Stores one head's vector for a token.
    pub fn write(
        &mut self,
        layer: usize,
        kv: Kv,
        block: BlockId,
        slot: usize,
        head: usize,
        x: &[f32],
    ) {
        let r = self.row(layer, kv, block, head, slot);
        let d = self.dim;
        match &mut self.store {
            Store::F32(v) => v[r * d..(r + 1) * d].copy_from_slice(x),
            Store::Bf16(v) => {
                for (o, &f) in v[r * d..(r + 1) * d].iter_mut().zip(x) {
                    *o = half::bf16::from_f32(f).to_bits();
                }
            }
            Store::Fp8 { data, scales } => {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = if amax > 0.0 { amax / FP8_MAX } else { 1.0 };
                scales[r] = scale;
                for (o, &f) in data[r * d..(r + 1) * d].iter_mut().zip(x) {
                    *o = f32_to_fp8(f / scale, &self.fp8_table);
                }
            }
        }
    }

    /// One head's slots of one block as bf16 bits (`tokens_per_block x head_dim`, read in
    /// place), or None when the pool does not store bf16.
    pub fn bf16_rows(&self, layer: usize, kv: Kv, block: BlockId, head: usize) -> Option<&[u16]> {
        let r = self.row(layer, kv, block, head, 0);
        let len = self.tpb * self.dim;
        match &self.store {
            Store::Bf16(v) => v.get(r * self.dim..r * self.dim + len),
            _ => None,
        }
    }

    /// Reads `n` consecutive slots of one head in one block into `out` (n x head_dim) as f32.
    pub fn read(
        &self,
        layer: usize,
        kv: Kv,
        block: BlockId,
        head: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let r = self.row(layer, kv, block, head, 0);
        let d = self.dim;
        let range = r * d..(r + n) * d;
        match &self.store {
            Store::F32(v) => out[..n * d].copy_from_slice(&v[range]),
            Store::Bf16(v) => super::linear::widen_bf16(&v[range], &mut out[..n * d]),
            Store::Fp8 { data, scales } => {
                for s in 0..n {
                    let scale = scales[r + s];
                    let src = &data[(r + s) * d..(r + s + 1) * d];
                    for (o, &b) in out[s * d..(s + 1) * d].iter_mut().zip(src) {
                        *o = self.fp8_decode[b as usize] * scale;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of several huge pages and an empty one, in every dtype: zeroed at start, each
    /// write read back from its own place only.
    #[test]
    fn pools_start_zeroed_and_keep_each_row_apart() {
        for dtype in [KvDtype::Float32, KvDtype::Bf16, KvDtype::Fp8] {
            let empty = KvStore::new(dtype, 1, 0, 1, 16, 64);
            assert_eq!(empty.num_blocks(), 0);
            let (layers, blocks, heads, tpb, d) = (2, 64, 4, 32, 64);
            let mut kv = KvStore::new(dtype, layers, blocks, heads, tpb, d);
            let mut out = vec![f32::NAN; tpb * d];
            kv.read(1, Kv::V, 63, 3, tpb, &mut out);
            assert!(out.iter().all(|&x| x == 0.0));
            let places = [
                (0, Kv::K, 0, 0, 0),
                (1, Kv::V, 63, 3, 31),
                (1, Kv::K, 17, 2, 5),
            ];
            for (i, &(l, k, b, h, s)) in places.iter().enumerate() {
                let x: Vec<f32> = (0..d).map(|e| (e as f32 - 31.5) / 8.0 + i as f32).collect();
                kv.write(l, k, b, s, h, &x);
            }
            for (i, &(l, k, b, h, s)) in places.iter().enumerate() {
                kv.read(l, k, b, h, tpb, &mut out);
                for (e, &v) in out[s * d..(s + 1) * d].iter().enumerate() {
                    let want = (e as f32 - 31.5) / 8.0 + i as f32;
                    assert!(
                        (v - want).abs() <= want.abs() / 16.0 + 1e-6,
                        "{dtype:?} {v} {want}"
                    );
                }
                let others = out[..s * d].iter().chain(&out[(s + 1) * d..]);
                assert!(others.into_iter().all(|&v| v == 0.0), "{dtype:?}");
            }
            assert_eq!(
                kv.bf16_rows(0, Kv::K, 0, 0).is_some(),
                dtype == KvDtype::Bf16
            );
        }
    }

    #[test]
    fn fp8_round_trip_is_within_e4m3_precision() {
        let mut kv = KvStore::new(KvDtype::Fp8, 1, 1, 1, 2, 8);
        let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.37).collect();
        kv.write(0, Kv::K, 0, 1, 0, &x);
        let mut out = vec![0.0; 16];
        kv.read(0, Kv::K, 0, 0, 2, &mut out);
        for (a, b) in x.iter().zip(&out[8..]) {
            // e4m3 has 3 mantissa bits: relative error at most 2^-4 after scaling.
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6, "{a} vs {b}");
        }
        assert_eq!(fp8_to_f32(0x7e), 448.0);
    }
}
