//! The CPU backend: f32 arithmetic over bf16/f32 weights on one rayon pool, paged KV in RAM;
//! optionally bf16 projections (`dtype: bfloat16`, see `bf16.rs`).

pub mod attention;
pub mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_avx512;
#[cfg(target_arch = "x86_64")]
pub mod decode_attention;
pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod kq_tiles;
pub mod kv_store;
pub mod linear;
mod microkernel;
pub mod q4;
#[cfg(target_arch = "x86_64")]
mod q4_tiles;
pub mod q4k;
#[cfg(target_arch = "x86_64")]
mod q4k_simd;
pub mod q8;
#[cfg(target_arch = "x86_64")]
mod q8_tiles;
#[cfg(target_arch = "x86_64")]
pub mod vmath;

use rayon::prelude::*;

use llmapi_common::model_config::ModelConfig;

use crate::backend::{Backend, BackendError, HostFootprint, LogitsWanted, SeqChunk};
use crate::dist::{Communicator, SingleRank};
use crate::engine::KvDtype;
use crate::kv::host_memory::MemorySource;
use crate::model::{Ffn, Layer, Mlp, ModelWeights};
use kernels::{Rope, apply_rope, rms_norm, rms_norm_inplace, silu_mul, softmax};
use kv_store::{Kv, KvStore};
use linear::{GemmDtype, linear};
use llmapi_common::args::ModelDtype;

static FUSED_STEP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Chooses, for every later step in this process, between the batch epilogues (the default:
/// rope and the K/V store per row on the pool with a vector bf16 conversion, SiLU x up rounded
/// straight into the down projection's input, the GEMM input rows reused per thread, the
/// logits written straight into each sequence's vector) and the serial, unfused code they
/// replaced. Both give the same bits; the switch exists for A/B
/// measurements in the benches.
pub fn set_fused_step(on: bool) {
    FUSED_STEP.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether steps take the batch epilogues (see [`set_fused_step`]).
pub fn fused_step() -> bool {
    FUSED_STEP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Asks the kernel to back the 2 MiB-aligned part of `buf` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`, which takes effect where
/// `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`), before anything
/// is written there: for the packed weights and the KV pool, which a step reads in long
/// streams or scattered 4 KiB stretches, where 4 KiB pages cost a TLB miss (a nested page
/// walk in a VM) every 4 KiB. A refusal (or another OS) leaves ordinary pages; the contents
/// are the same either way.
pub(crate) fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if a < b {
            // SAFETY: [a, b) lies inside `buf`, which the caller owns; the advice changes only
            // how the pages are backed, never their contents.
            let rc = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                tracing::debug!(
                    error = %std::io::Error::last_os_error(),
                    "madvise(MADV_HUGEPAGE) refused"
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Runs a model (or one tensor-parallel shard of it) on the CPU.
pub struct CpuBackend {
    w: ModelWeights,
    /// The config with this rank's head counts (attention and KV layout read it).
    local: ModelConfig,
    /// Collectives of the tensor-parallel group (`SingleRank` for a whole model).
    comm: Box<dyn Communicator>,
    rope: Rope,
    kv_dtype: KvDtype,
    kv: Option<KvStore>,
    pool: std::sync::Arc<rayon::ThreadPool>,
    gemm: GemmDtype,
    /// Buffers reused from step to step, so large activations do not fault in fresh pages.
    scratch: Scratch,
    /// Where free host memory is read while the KV pool is committed.
    memory: MemorySource,
}

/// Reused activation buffers (contents are overwritten before every use).
#[derive(Default)]
struct Scratch {
    gate_up: Vec<f32>,
    act: Vec<f32>,
    logits: Vec<f32>,
}

/// The first `n` elements of `v`, grown (zero-filled) if shorter.
fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Per-row facts of a step: which chunk, which position, where its KV goes.
struct Row {
    chunk: usize,
    pos: usize,
}

impl CpuBackend {
    /// A backend over loaded weights with `threads` compute threads (None: all cores).
    pub fn new(
        w: ModelWeights,
        kv_dtype: KvDtype,
        threads: Option<usize>,
    ) -> Result<Self, BackendError> {
        Self::new_sharded(w, Box::new(SingleRank), kv_dtype, threads)
    }

    /// A backend over one shard of the weights (`ModelWeights::load_shard`) that meets the
    /// other ranks of its group through `comm`; the communicator's rank and size must be the
    /// shard's.
    pub fn new_sharded(
        w: ModelWeights,
        comm: Box<dyn Communicator>,
        kv_dtype: KvDtype,
        threads: Option<usize>,
    ) -> Result<Self, BackendError> {
        if comm.world_size() != w.shard.tp_size || comm.rank() != w.shard.tp_rank {
            return Err(BackendError::InvalidStep(format!(
                "weights are shard {} of {} but the communicator is rank {} of {}",
                w.shard.tp_rank,
                w.shard.tp_size,
                comm.rank(),
                comm.world_size()
            )));
        }
        let mut builder =
            rayon::ThreadPoolBuilder::new().thread_name(|i| format!("llmapi-cpu-{i}"));
        if let Some(n) = threads {
            builder = builder.num_threads(n);
        }
        let mut w = w;
        q4::dequantize_without_tiles(&mut w);
        let pool = builder.build().map_err(|e| BackendError::KvAlloc {
            bytes: 0,
            reason: format!("cannot start the compute thread pool: {e}"),
        })?;
        Ok(Self {
            rope: Rope::new(&w.config),
            local: w.shard.local_config(&w.config),
            comm,
            w,
            kv_dtype,
            kv: None,
            pool: std::sync::Arc::new(pool),
            gemm: GemmDtype::F32,
            scratch: Scratch::default(),
            memory: MemorySource::default(),
        })
    }

    /// Reads free host memory from `memory` (a fake tree in tests) while committing the KV
    /// pool, instead of /proc and /sys/fs/cgroup.
    pub fn with_memory_source(mut self, memory: MemorySource) -> Self {
        self.memory = memory;
        self
    }

    /// Sets the arithmetic of the projections from `dtype`: auto and float32 multiply in f32,
    /// bfloat16 runs the fastest bf16 kernel of this CPU, float16 is refused.
    pub fn with_dtype(self, dtype: ModelDtype) -> Result<Self, BackendError> {
        let gemm = match dtype {
            ModelDtype::Auto | ModelDtype::Float32 => GemmDtype::F32,
            ModelDtype::Bfloat16 => GemmDtype::Bf16(bf16::Bf16Kernel::detect()),
            ModelDtype::Float16 => {
                return Err(BackendError::Unsupported(
                    "dtype float16: the CPU backend multiplies in float32 or bfloat16; use --dtype auto (f32) or --dtype bfloat16".into(),
                ));
            }
        };
        Ok(self.with_gemm(gemm))
    }

    /// Sets the arithmetic of the projections, kernel included. bf16 rounds f32-stored
    /// weights to bf16 once here (MoE routers stay f32) and, for the AVX512_BF16 kernel,
    /// packs them into panels (`bf16::pack_weights`) after any tensor-parallel sharding.
    pub fn with_gemm(mut self, gemm: GemmDtype) -> Self {
        match gemm {
            GemmDtype::F32 => tracing::info!("CPU projections: f32 arithmetic"),
            GemmDtype::Bf16(k) => {
                bf16::round_weights(&mut self.w);
                let packed = self.pool.install(|| bf16::pack_weights(&mut self.w, k));
                tracing::info!(
                    kernel = k.describe(),
                    packed,
                    "CPU projections: bf16 inputs, f32 accumulation"
                );
            }
        }
        self.gemm = gemm;
        self
    }

    /// The arithmetic of the projections.
    pub fn gemm_dtype(&self) -> GemmDtype {
        self.gemm
    }

    /// The model weights.
    pub fn weights(&self) -> &ModelWeights {
        &self.w
    }

    fn step(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let Some(kv) = self.kv.as_mut() else {
            return Err(BackendError::InvalidStep("init_kv was not called".into()));
        };
        let c = &self.w.config;
        let (h, d, tpb) = (c.hidden_size, c.head_dim, kv.tokens_per_block());
        let (nq, nkv) = (
            self.local.num_attention_heads,
            self.local.num_key_value_heads,
        );
        let eps = c.rms_norm_eps as f32;
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        for (i, ch) in batch.iter().enumerate() {
            let end = ch.start_pos + ch.tokens.len();
            if ch.block_table.len() * tpb < end {
                return Err(BackendError::InvalidStep(format!(
                    "chunk {i} reaches position {end} but has {} blocks",
                    ch.block_table.len()
                )));
            }
            if let Some(&t) = ch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(BackendError::InvalidStep(format!(
                    "token id {t} is outside the vocabulary of {} tokens",
                    c.vocab_size
                )));
            }
            for (j, &t) in ch.tokens.iter().enumerate() {
                rows.push(Row {
                    chunk: i,
                    pos: ch.start_pos + j,
                });
                tokens.push(t);
            }
        }
        let t_rows = rows.len();
        let mut x = vec![0.0f32; t_rows * h];
        // Vocabulary-parallel embedding: each rank fills the rows of its own tokens, the sum
        // over ranks is the full lookup.
        let vocab = self.w.shard.vocab(c);
        for (r, &t) in tokens.iter().enumerate() {
            if vocab.contains(&(t as usize)) {
                self.w
                    .embed
                    .row_to_f32(t as usize - vocab.start, &mut x[r * h..(r + 1) * h]);
            }
        }
        let tp = self.w.shard.tp_size > 1;
        if tp {
            self.comm.all_reduce_sum(&mut x)?;
        }
        let qkv_w = (nq + 2 * nkv) * d;
        let mut xn = vec![0.0f32; t_rows * h];
        let mut qkv = vec![0.0f32; t_rows * qkv_w];
        let mut attn = vec![0.0f32; t_rows * nq * d];
        let mut proj = vec![0.0f32; t_rows * h];
        // cos and sin of every row's position, computed once for all layers.
        let mut rope_cs = vec![0.0f32; t_rows * d];
        for (row, cs) in rows.iter().zip(rope_cs.chunks_exact_mut(d)) {
            let (cos, sin) = cs.split_at_mut(d / 2);
            self.rope.table(row.pos, cos, sin);
        }
        // Where each row's K and V go: (block, slot).
        let places: Vec<(crate::kv::BlockId, usize)> = rows
            .iter()
            .map(|row| (batch[row.chunk].block_table[row.pos / tpb], row.pos % tpb))
            .collect();
        for (li, layer) in self.w.layers.iter().enumerate() {
            norm_rows(&x, &layer.input_norm, eps, h, &mut xn);
            linear(self.gemm, &xn, t_rows, &layer.qkv, &mut qkv);
            // Bias, q/k norm, rope and the K/V store, row by row; on the pool when there are
            // rows enough, each row writing its own cache slot.
            let post = QkvPost {
                layer,
                nq,
                nkv,
                d,
                eps,
            };
            if t_rows >= PAR_MIN_ROWS
                && fused_step()
                && let Some(writers) = kv.slot_writers(li, &places)
            {
                qkv.par_chunks_mut(qkv_w)
                    .zip(rope_cs.par_chunks(d))
                    .zip(writers)
                    .for_each(|((q, cs), mut w)| post.row(q, cs, |h, g, v| w.write(h, g, v)));
            } else {
                for ((q, cs), &(block, slot)) in qkv
                    .chunks_exact_mut(qkv_w)
                    .zip(rope_cs.chunks_exact(d))
                    .zip(&places)
                {
                    post.row(q, cs, |h, g, v| kv.write(li, h, block, slot, g, v));
                }
            }
            attention::attend(
                kv,
                li,
                batch,
                &rows_view(&rows),
                &qkv,
                &self.local,
                &mut attn,
            );
            linear(self.gemm, &attn, t_rows, &layer.o, &mut proj);
            if tp {
                self.comm.all_reduce_sum(&mut proj)?;
            }
            add_rows(&mut x, &proj, layer.o_bias.as_deref(), h);
            norm_rows(&x, &layer.post_norm, eps, h, &mut xn);
            mlp(
                self.gemm,
                layer,
                &xn,
                t_rows,
                h,
                &mut proj,
                &mut self.scratch,
            );
            if tp {
                self.comm.all_reduce_sum(&mut proj)?;
            }
            add_rows(&mut x, &proj, None, h);
        }
        self.logits(batch, &rows, &x)
    }

    fn logits(
        &mut self,
        batch: &[SeqChunk<'_>],
        rows: &[Row],
        x: &[f32],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let c = &self.w.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let (tp, local_vocab) = (self.w.shard.tp_size, self.w.shard.vocab(c).len());
        let mut picked: Vec<usize> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let ch = &batch[row.chunk];
            let last = row.pos + 1 == ch.start_pos + ch.tokens.len();
            match ch.logits {
                LogitsWanted::All => picked.push(r),
                LogitsWanted::Last if last => picked.push(r),
                _ => {}
            }
        }
        let mut xn = vec![0.0f32; picked.len() * h];
        for (i, &r) in picked.iter().enumerate() {
            rms_norm(
                &x[r * h..(r + 1) * h],
                &self.w.norm,
                c.rms_norm_eps as f32,
                &mut xn[i * h..(i + 1) * h],
            );
        }
        // Each chunk's picked rows are consecutive in `picked` (rows come chunk by chunk).
        let mut spans = vec![(0usize, 0usize); batch.len()];
        for (i, &r) in picked.iter().enumerate() {
            let s = &mut spans[rows[r].chunk];
            if s.1 == s.0 {
                *s = (i, i);
            }
            s.1 = i + 1;
        }
        // One model (no vocabulary split) on the packed bf16 kernel: every row's logits go
        // straight into its chunk's vector, without a copy through one matrix (4 MB a step
        // at batch 32 and vocab 32000).
        if tp == 1
            && vocab > 0
            && self.w.lm_head().rows == vocab
            && !picked.is_empty()
            && fused_step()
        {
            let mut vecs: Vec<Vec<f32>> = spans
                .iter()
                .map(|&(a, b)| Vec::with_capacity((b - a) * vocab))
                .collect();
            let mut outs: Vec<&mut [std::mem::MaybeUninit<f32>]> = Vec::new();
            for (v, &(a, b)) in vecs.iter_mut().zip(&spans) {
                outs.extend(v.spare_capacity_mut()[..(b - a) * vocab].chunks_exact_mut(vocab));
            }
            if linear::linear_rows(self.gemm, &xn, self.w.lm_head(), &mut outs) {
                drop(outs);
                for (v, &(a, b)) in vecs.iter_mut().zip(&spans) {
                    // SAFETY: linear_rows wrote every element of every row slice, which
                    // together are the first (b - a) * vocab elements of v.
                    unsafe { v.set_len((b - a) * vocab) };
                }
                return Ok(vecs);
            }
        }
        let all = buf(&mut self.scratch.logits, picked.len() * vocab);
        if tp == 1 {
            linear(self.gemm, &xn, picked.len(), self.w.lm_head(), all);
        } else if !picked.is_empty() {
            // Vocabulary-parallel lm_head: gather every rank's slice, then lay each row out as
            // the full vocabulary (sampling needs all of it).
            let mut mine = vec![0.0f32; picked.len() * local_vocab];
            linear(self.gemm, &xn, picked.len(), self.w.lm_head(), &mut mine);
            let mut gathered = vec![0.0f32; tp * mine.len()];
            self.comm.all_gather(&mine, &mut gathered)?;
            for (rank, part) in gathered.chunks_exact(mine.len()).enumerate() {
                for (i, row) in part.chunks_exact(local_vocab).enumerate() {
                    let dst = i * vocab + rank * local_vocab;
                    all[dst..dst + local_vocab].copy_from_slice(row);
                }
            }
        }
        // One copy per chunk, on both threads for a decode batch (32 x 128 KB at vocab 32000).
        let all: &[f32] = all;
        let copy = |&(a, b): &(usize, usize)| all[a * vocab..b * vocab].to_vec();
        let out: Vec<Vec<f32>> = if all.len() < PAR_MIN_ELEMS {
            spans.iter().map(copy).collect()
        } else {
            spans.par_iter().map(copy).collect()
        };
        Ok(out)
    }
}

/// What is done to a row of the qkv projection before attention.
struct QkvPost<'a> {
    layer: &'a Layer,
    nq: usize,
    nkv: usize,
    d: usize,
    eps: f32,
}

impl QkvPost<'_> {
    /// Adds the bias, normalizes q and k heads (Qwen3), rotates them by the row's `cs` (cos
    /// then sin, head_dim / 2 each), then hands every KV head's k and v to `put`.
    fn row(&self, q: &mut [f32], cs: &[f32], mut put: impl FnMut(Kv, usize, &[f32])) {
        let (nq, nkv, d) = (self.nq, self.nkv, self.d);
        if let Some(b) = &self.layer.qkv_bias {
            q.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
        let (cos, sin) = cs.split_at(d / 2);
        for (hi, head) in q[..(nq + nkv) * d].chunks_exact_mut(d).enumerate() {
            if let Some((qn, kn)) = &self.layer.qk_norm {
                rms_norm_inplace(head, if hi < nq { qn } else { kn }, self.eps);
            }
            apply_rope(head, cos, sin);
        }
        for g in 0..nkv {
            put(Kv::K, g, &q[(nq + g) * d..(nq + g + 1) * d]);
            put(Kv::V, g, &q[(nq + nkv + g) * d..(nq + nkv + g + 1) * d]);
        }
    }
}

/// Rows from which the qkv epilogue (rope and K/V store) runs on the pool: below, the work
/// (about a microsecond a row) does not pay for a fork/join.
const PAR_MIN_ROWS: usize = 16;

fn rows_view(rows: &[Row]) -> Vec<(usize, usize)> {
    rows.iter().map(|r| (r.chunk, r.pos)).collect()
}

/// Elements below which a per-row kernel runs on the calling thread: a fork/join of the pool
/// costs more than normalizing or gating a decode batch (32 x 768 is a few microseconds).
const PAR_MIN_ELEMS: usize = 1 << 16;

fn norm_rows(x: &[f32], w: &[f32], eps: f32, h: usize, out: &mut [f32]) {
    if x.len() < PAR_MIN_ELEMS {
        for (o, xr) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            rms_norm(xr, w, eps, o);
        }
        return;
    }
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(o, xr)| rms_norm(xr, w, eps, o));
}

fn add_rows(x: &mut [f32], y: &[f32], bias: Option<&[f32]>, h: usize) {
    for (xr, yr) in x.chunks_exact_mut(h).zip(y.chunks_exact(h)) {
        match bias {
            Some(b) => xr
                .iter_mut()
                .zip(yr)
                .zip(b)
                .for_each(|((a, y), b)| *a += y + b),
            None => xr.iter_mut().zip(yr).for_each(|(a, y)| *a += y),
        }
    }
}

/// out = FFN(xn) for `rows` rows.
fn run_ffn(g: GemmDtype, f: &Ffn, xn: &[f32], rows: usize, out: &mut [f32], s: &mut Scratch) {
    let gu = buf(&mut s.gate_up, rows * 2 * f.inter);
    linear(g, xn, rows, &f.gate_up, gu);
    if fused_step() && linear::silu_mul_linear(g, gu, rows, &f.down, out) {
        return;
    }
    let act = buf(&mut s.act, rows * f.inter);
    if act.len() < PAR_MIN_ELEMS {
        for (a, g) in act
            .chunks_exact_mut(f.inter)
            .zip(gu.chunks_exact(2 * f.inter))
        {
            silu_mul(g, a);
        }
    } else {
        act.par_chunks_mut(f.inter)
            .zip(gu.par_chunks(2 * f.inter))
            .for_each(|(a, g)| silu_mul(g, a));
    }
    linear(g, act, rows, &f.down, out);
}

fn mlp(
    g: GemmDtype,
    layer: &Layer,
    xn: &[f32],
    rows: usize,
    h: usize,
    out: &mut [f32],
    s: &mut Scratch,
) {
    match &layer.mlp {
        Mlp::Dense(f) => run_ffn(g, f, xn, rows, out, s),
        Mlp::Moe {
            router,
            experts,
            first_expert,
            top_k,
            norm_topk_prob,
            shared,
        } => {
            let e = router.rows;
            let mut logits = vec![0.0f32; rows * e];
            linear(g, xn, rows, router, &mut logits);
            let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
            for r in 0..rows {
                let probs = &mut logits[r * e..(r + 1) * e];
                softmax(probs);
                let mut idx: Vec<usize> = (0..e).collect();
                idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                idx.truncate(*top_k);
                let sum: f32 = idx.iter().map(|&i| probs[i]).sum();
                for &i in &idx {
                    let wgt = if *norm_topk_prob {
                        probs[i] / sum
                    } else {
                        probs[i]
                    };
                    assigned[i].push((r, wgt));
                }
            }
            out.iter_mut().for_each(|v| *v = 0.0);
            // This rank's experts (all of them on a single rank); each is this rank's slice of
            // the expert's FFN, so the sum over the group is the full mixture.
            for (ex, list) in experts.iter().zip(&assigned[*first_expert..]) {
                if list.is_empty() {
                    continue;
                }
                let mut xs = Vec::with_capacity(list.len() * h);
                for &(r, _) in list {
                    xs.extend_from_slice(&xn[r * h..(r + 1) * h]);
                }
                let mut ys = vec![0.0f32; list.len() * h];
                run_ffn(g, ex, &xs, list.len(), &mut ys, s);
                for (i, &(r, wgt)) in list.iter().enumerate() {
                    let dst = &mut out[r * h..(r + 1) * h];
                    dst.iter_mut()
                        .zip(&ys[i * h..(i + 1) * h])
                        .for_each(|(o, y)| *o += wgt * y);
                }
            }
            if let Some((sf, gate)) = shared {
                let mut ys = vec![0.0f32; rows * h];
                run_ffn(g, sf, xn, rows, &mut ys, s);
                let mut gate_out = vec![0.0f32; rows];
                linear(g, xn, rows, gate, &mut gate_out);
                for r in 0..rows {
                    let s = 1.0 / (1.0 + (-gate_out[r]).exp());
                    out[r * h..(r + 1) * h]
                        .iter_mut()
                        .zip(&ys[r * h..(r + 1) * h])
                        .for_each(|(o, y)| *o += s * y);
                }
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn windowed_attention(&self) -> bool {
        true
    }

    fn vocab_size(&self) -> usize {
        self.w.config.vocab_size
    }

    fn kv_bytes_per_token(&self) -> usize {
        let c = &self.local;
        c.num_hidden_layers
            * KvStore::bytes_per_token_layer(self.kv_dtype, c.num_key_value_heads, c.head_dim)
    }

    fn host_footprint(&self, max_num_tokens: usize, max_batch_size: usize) -> HostFootprint {
        let (c, w) = (&self.local, &self.w);
        let (h, d) = (c.hidden_size, c.head_dim);
        let inter = w
            .layers
            .iter()
            .map(|l| match &l.mlp {
                Mlp::Dense(f) => f.inter,
                Mlp::Moe {
                    experts, shared, ..
                } => experts
                    .iter()
                    .chain(shared.as_ref().map(|(f, _)| f))
                    .map(|f| f.inter)
                    .max()
                    .unwrap_or(0),
            })
            .max()
            .unwrap_or(0);
        // f32 per row of a step: x, xn, proj (hidden each), q/k/v, attention out, rope
        // cos/sin, gate/up and the activation; plus two copies of the logits rows.
        let per_row = 3 * h
            + (c.num_attention_heads + 2 * c.num_key_value_heads) * d
            + c.num_attention_heads * d
            + d
            + 3 * inter;
        let floats = max_num_tokens.saturating_mul(per_row)
            + 2 * max_batch_size.saturating_mul(w.config.vocab_size);
        HostFootprint {
            weights: w.resident_bytes() as u64,
            workspace: (floats as u64).saturating_mul(4),
        }
    }

    fn init_kv(&mut self, num_blocks: usize, tokens_per_block: usize) -> Result<(), BackendError> {
        // The old pool (if any) goes first, so the new one can take its memory.
        self.kv = None;
        let c = &self.local;
        let mut kv = KvStore::new(
            self.kv_dtype,
            c.num_hidden_layers,
            num_blocks,
            c.num_key_value_heads,
            tokens_per_block,
            c.head_dim,
        )?;
        let bytes = kv.bytes();
        let memory = self.memory.clone();
        let mut free = || memory.probe().ok().map(|m| m.free());
        self.pool
            .install(|| crate::kv::commit::commit(&mut kv.regions_mut(), &mut free))
            .map_err(|reason| BackendError::KvAlloc { bytes, reason })?;
        self.kv = Some(kv);
        Ok(())
    }

    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let pool = std::sync::Arc::clone(&self.pool);
        pool.install(|| self.step(batch))
    }
}
