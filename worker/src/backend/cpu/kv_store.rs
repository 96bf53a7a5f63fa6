//! The CPU KV pool: paged K and V memory in f32, bf16 or fp8 e4m3 (one scale per token/head).
//!
//! Layout per layer and per K/V: `[block][kv_head][slot][head_dim]`, so one head's rows in a
//! block are contiguous and attention reads them in place, and a block's heads are next to
//! each other.
//!
//! The pool is advised for transparent huge pages (`super::advise_huge_pages`) before its
//! first use: a decode step reads every sequence's blocks, scattered over the pool, and with
//! 4 KiB pages most 4 KiB stretches of a block would cost a TLB miss (a nested page walk in
//! a VM).

use crate::backend::BackendError;
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
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Fp8 { data: Vec<u8>, scales: Vec<f32> },
}

/// Zeroed pool memory of `len` elements, advised for huge pages (see the module header);
/// Err (rather than the abort of an infallible allocation) when the address space or the
/// kernel's overcommit policy refuses it. The pages are not backed until written
/// (`KvStore::regions_mut` and `kv::commit`).
fn zeroed_pool<T: bytemuck::Pod>(len: usize) -> Result<Vec<T>, BackendError> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    let mut v: Vec<T> = bytemuck::allocation::try_zeroed_slice_box(len)
        .map_err(|()| BackendError::KvAlloc {
            bytes,
            reason: format!(
                "the allocator refused it; {}",
                crate::kv::budget::FIX_SMALLER
            ),
        })?
        .into();
    super::advise_huge_pages(&mut v);
    Ok(v)
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

    /// Allocates a zeroed pool (reserved, not yet backed by memory: see `regions_mut`).
    pub fn new(
        dtype: KvDtype,
        layers: usize,
        blocks: usize,
        heads: usize,
        tpb: usize,
        dim: usize,
    ) -> Result<Self, BackendError> {
        let elems = layers * 2 * blocks * heads * tpb * dim;
        let store = match dtype {
            KvDtype::Float32 => Store::F32(zeroed_pool(elems)?),
            KvDtype::Bf16 | KvDtype::Auto => Store::Bf16(zeroed_pool(elems)?),
            KvDtype::Fp8 => Store::Fp8 {
                data: zeroed_pool(elems)?,
                scales: zeroed_pool(elems / dim.max(1))?,
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
        Ok(Self {
            store,
            layers,
            blocks,
            heads,
            tpb,
            dim,
            fp8_table,
            fp8_decode,
        })
    }

    /// The pool's memory as bytes, for `kv::commit` to back it with pages.
    pub fn regions_mut(&mut self) -> Vec<&mut [u8]> {
        match &mut self.store {
            Store::F32(v) => vec![bytemuck::cast_slice_mut(v)],
            Store::Bf16(v) => vec![bytemuck::cast_slice_mut(v)],
            Store::Fp8 { data, scales } => {
                vec![data.as_mut_slice(), bytemuck::cast_slice_mut(scales)]
            }
        }
    }

    /// Bytes of the pool.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::F32(v) => v.len() * 4,
            Store::Bf16(v) => v.len() * 2,
            Store::Fp8 { data, scales } => data.len() + scales.len() * 4,
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
        self.geometry().row(layer, kv, block as usize, head, slot)
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            blocks: self.blocks,
            heads: self.heads,
            tpb: self.tpb,
            dim: self.dim,
        }
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
            Store::Bf16(v) => round_bf16(x, &mut v[r * d..(r + 1) * d]),
            Store::Fp8 { data, scales } => put_fp8(
                x,
                &mut data[r * d..(r + 1) * d],
                &mut scales[r],
                &self.fp8_table,
            ),
        }
    }

    /// One writer per entry of `places` (block, slot) for every head's K and V of `layer`,
    /// each of which may be moved to its own thread: a step stores its rows' K and V in
    /// parallel. None when a place repeats (two writers of one slot) or lies outside the pool.
    pub fn slot_writers(
        &mut self,
        layer: usize,
        places: &[(BlockId, usize)],
    ) -> Option<Vec<SlotWriter<'_>>> {
        if layer >= self.layers
            || places
                .iter()
                .any(|&(b, s)| b as usize >= self.blocks || s >= self.tpb)
        {
            return None;
        }
        let mut keys: Vec<usize> = places
            .iter()
            .map(|&(b, s)| b as usize * self.tpb + s)
            .collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return None;
        }
        let mem = match &mut self.store {
            Store::F32(v) => RawMem::F32(v.as_mut_ptr()),
            Store::Bf16(v) => RawMem::Bf16(v.as_mut_ptr()),
            Store::Fp8 { data, scales } => RawMem::Fp8(data.as_mut_ptr(), scales.as_mut_ptr()),
        };
        let geo = self.geometry();
        let table = &self.fp8_table;
        Some(
            places
                .iter()
                .map(|&(block, slot)| SlotWriter {
                    mem,
                    geo,
                    table,
                    layer,
                    block: block as usize,
                    slot,
                    _pool: std::marker::PhantomData,
                })
                .collect(),
        )
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

/// `x` rounded to bf16 bits into `out` as `half::bf16::from_f32` rounds (to nearest even,
/// denormals kept), with AVX-512 where the CPU has it.
fn round_bf16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::fused_step()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU supports avx512f and avx512bw (checked just above).
            unsafe { super::bf16_avx512::round_like_half(x, out) };
            return;
        }
    }
    for (o, &f) in out.iter_mut().zip(x) {
        *o = half::bf16::from_f32(f).to_bits();
    }
}

/// One fp8 row: scaled so that its largest magnitude is the largest finite e4m3 value.
fn put_fp8(x: &[f32], out: &mut [u8], scale_out: &mut f32, table: &[f32; 127]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if amax > 0.0 { amax / FP8_MAX } else { 1.0 };
    *scale_out = scale;
    for (o, &f) in out.iter_mut().zip(x) {
        *o = f32_to_fp8(f / scale, table);
    }
}

#[derive(Clone, Copy)]
enum RawMem {
    F32(*mut f32),
    Bf16(*mut u16),
    Fp8(*mut u8, *mut f32),
}

/// The pool's shape, enough to place a row.
#[derive(Clone, Copy)]
struct Geometry {
    blocks: usize,
    heads: usize,
    tpb: usize,
    dim: usize,
}

impl Geometry {
    /// Row index (in units of head_dim) of (layer, K/V, block, head, slot): the layout of
    /// the module header.
    fn row(&self, layer: usize, kv: Kv, block: usize, head: usize, slot: usize) -> usize {
        (((layer * 2 + kv as usize) * self.blocks + block) * self.heads + head) * self.tpb + slot
    }
}

/// Writes the K and V of one token slot of one layer (every head), from any thread: made by
/// [`KvStore::slot_writers`], which hands out one writer per distinct slot and holds the
/// pool borrowed while any writer lives, so no two writers (nor anything else) touch the
/// same memory.
pub struct SlotWriter<'a> {
    mem: RawMem,
    geo: Geometry,
    table: &'a [f32; 127],
    layer: usize,
    block: usize,
    slot: usize,
    _pool: std::marker::PhantomData<&'a mut KvStore>,
}

// SAFETY: a writer only writes the rows of its own (layer, block, slot), which no other
// writer of the same batch has (slot_writers refuses repeated places), and the pool stays
// mutably borrowed for the writers' lifetime.
unsafe impl Send for SlotWriter<'_> {}

impl SlotWriter<'_> {
    /// Stores `head`'s vector (head_dim elements of `x`) for this writer's slot.
    pub fn write(&mut self, kv: Kv, head: usize, x: &[f32]) {
        let g = self.geo;
        assert!(
            head < g.heads && x.len() >= g.dim,
            "slot write out of range"
        );
        let r = g.row(self.layer, kv, self.block, head, self.slot);
        let x = &x[..g.dim];
        // SAFETY: layer, block and slot were checked against the pool when the writer was
        // made and head just now, so row r lies inside the pool; only this writer writes it
        // while the pool is borrowed (see the Send impl).
        unsafe {
            match self.mem {
                RawMem::F32(p) => {
                    std::slice::from_raw_parts_mut(p.add(r * g.dim), g.dim).copy_from_slice(x)
                }
                RawMem::Bf16(p) => {
                    round_bf16(x, std::slice::from_raw_parts_mut(p.add(r * g.dim), g.dim))
                }
                RawMem::Fp8(p, scales) => put_fp8(
                    x,
                    std::slice::from_raw_parts_mut(p.add(r * g.dim), g.dim),
                    &mut *scales.add(r),
                    self.table,
                ),
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
            let empty = KvStore::new(dtype, 1, 0, 1, 16, 64).unwrap();
            assert_eq!(empty.num_blocks(), 0);
            let (layers, blocks, heads, tpb, d) = (2, 64, 4, 32, 64);
            let mut kv = KvStore::new(dtype, layers, blocks, heads, tpb, d).unwrap();
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

    /// Writers used from the pool's threads store exactly what `write` stores, in every
    /// dtype; repeated or out-of-range places get no writers.
    #[test]
    fn slot_writers_store_what_write_stores() {
        use rayon::prelude::*;
        let (layers, blocks, heads, tpb, d) = (2, 8, 3, 4, 16);
        let places: Vec<(BlockId, usize)> = (0..20).map(|i| ((i * 3 % 8) as u32, i / 8)).collect();
        let vec_of = |p: usize, kv: Kv, g: usize| -> Vec<f32> {
            (0..d)
                .map(|e| ((p * 131 + g * 17 + e * 7 + kv as usize) as f32 - 90.0) * 0.0371)
                .collect()
        };
        for dtype in [KvDtype::Float32, KvDtype::Bf16, KvDtype::Fp8] {
            let mut serial = KvStore::new(dtype, layers, blocks, heads, tpb, d).unwrap();
            let mut par = KvStore::new(dtype, layers, blocks, heads, tpb, d).unwrap();
            for (p, &(b, s)) in places.iter().enumerate() {
                for g in 0..heads {
                    for kv in [Kv::K, Kv::V] {
                        serial.write(1, kv, b, s, g, &vec_of(p, kv, g));
                    }
                }
            }
            let writers = par.slot_writers(1, &places).expect("distinct places");
            writers.into_par_iter().enumerate().for_each(|(p, mut w)| {
                for g in 0..heads {
                    for kv in [Kv::K, Kv::V] {
                        w.write(kv, g, &vec_of(p, kv, g));
                    }
                }
            });
            let (mut a, mut b) = (vec![0.0; tpb * d], vec![0.0; tpb * d]);
            for l in 0..layers {
                for blk in 0..blocks as u32 {
                    for g in 0..heads {
                        for kv in [Kv::K, Kv::V] {
                            serial.read(l, kv, blk, g, tpb, &mut a);
                            par.read(l, kv, blk, g, tpb, &mut b);
                            let (a, b): (Vec<u32>, Vec<u32>) = (
                                a.iter().map(|v| v.to_bits()).collect(),
                                b.iter().map(|v| v.to_bits()).collect(),
                            );
                            assert_eq!(a, b, "{dtype:?} layer {l} block {blk} head {g}");
                        }
                    }
                }
            }
            assert!(par.slot_writers(0, &[(1, 2), (3, 0), (1, 2)]).is_none());
            assert!(par.slot_writers(0, &[(8, 0)]).is_none());
            assert!(par.slot_writers(0, &[(0, 4)]).is_none());
            assert!(par.slot_writers(2, &[(0, 0)]).is_none());
        }
    }

    #[test]
    fn fp8_round_trip_is_within_e4m3_precision() {
        let mut kv = KvStore::new(KvDtype::Fp8, 1, 1, 1, 2, 8).unwrap();
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
