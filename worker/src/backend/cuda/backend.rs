//! `CudaBackend`: a dense Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3
//! with q/k norm) on one GPU.
//!
//! Weights live on the device in bf16; projections are cuBLAS GEMMs with bf16 inputs and f32
//! accumulation; the residual stream is f32; norms, RoPE, the paged KV store, paged attention
//! and SiLU-mul are the NVRTC kernels of `kernels/`. The math follows the CPU backend. The KV
//! pool is bf16 or fp8 e4m3 in device memory. Logits come back to the host for the sampler.
//! Not here: MoE layers and tensor parallelism (refused at construction with a message).

use cudarc::driver::CudaSlice;

use llmapi_common::model_config::ModelConfig;

use super::CudaError;
use super::device::{Device, Scratch, dev_err, ptr, stride_grid};
use crate::backend::cpu::kernels::Rope;
use crate::backend::{Backend, BackendError, LogitsWanted, SeqChunk};
use crate::engine::KvDtype;
use crate::model::{Mat, Mlp, ModelWeights, WeightData};

/// Largest head_dim the attention kernel supports (4 dimensions per thread of 128).
const MAX_HEAD_DIM: usize = 512;
/// Threads per attention block (a multiple of 32; the kernel's tile size).
const ATTN_THREADS: u32 = 128;

/// How a `CudaBackend` is set up.
#[derive(Debug, Clone)]
pub struct CudaSettings {
    /// CUDA device ordinal.
    pub device: usize,
    /// Most tokens in one step: the activation workspace is sized for it before the KV pool.
    pub max_num_tokens: usize,
    /// Most sequences in one step: the logits buffer holds this many rows at a time.
    pub max_batch_size: usize,
    /// KV element type (Auto: bf16; Float32 is refused).
    pub kv_dtype: KvDtype,
}

/// A bf16 matrix on the device, `rows` x `cols` row-major.
struct DevMat {
    data: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

struct DevLayer {
    input_norm: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    qkv: DevMat,
    qkv_bias: Option<CudaSlice<u16>>,
    o: DevMat,
    o_bias: Option<CudaSlice<u16>>,
    qk_norm: Option<(CudaSlice<u16>, CudaSlice<u16>)>,
    gate_up: DevMat,
    down: DevMat,
    inter: usize,
}

/// The KV pool of one layer.
struct LayerKv {
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    /// fp8 only: one f32 scale per (slot, kv head), for K and V.
    scales: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

struct KvPool {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    tokens_per_block: usize,
}

/// Activation buffers, sized for `max_num_tokens` at construction and grown if a step needs
/// more.
struct Workspace {
    /// Residual stream, f32 [tokens, hidden].
    x: Scratch<f32>,
    /// Normed activations, bf16 [tokens, hidden] (also the lm_head input rows).
    xn: Scratch<u16>,
    /// Fused q/k/v, f32 [tokens, (nq + 2 nkv) head_dim].
    qkv: Scratch<f32>,
    /// Attention output, bf16 [tokens, nq head_dim].
    attn: Scratch<u16>,
    /// gate|up, f32 [tokens, 2 inter].
    gate_up: Scratch<f32>,
    /// SiLU(gate) * up, bf16 [tokens, inter].
    act: Scratch<u16>,
    /// Logits, f32 [rows, vocab].
    logits: Scratch<f32>,
    /// Per-step integers (token ids, positions, slots, tables), one upload.
    meta: Scratch<i32>,
}

impl Workspace {
    fn bytes(&self) -> usize {
        self.x.bytes()
            + self.xn.bytes()
            + self.qkv.bytes()
            + self.attn.bytes()
            + self.gate_up.bytes()
            + self.act.bytes()
            + self.logits.bytes()
            + self.meta.bytes()
    }
}

/// Runs a dense Llama-family model on one NVIDIA GPU.
pub struct CudaBackend {
    dev: Device,
    config: ModelConfig,
    embed: CudaSlice<u16>,
    lm_head: Option<DevMat>,
    norm: CudaSlice<u16>,
    layers: Vec<DevLayer>,
    inv_freq: CudaSlice<f32>,
    kv_dtype: KvDtype,
    kv: Option<KvPool>,
    ws: Workspace,
    max_inter: usize,
    logit_rows: usize,
    /// Device memory free after weights and workspace, measured at construction.
    free_after_setup: usize,
}

/// Rounds f32 to bf16 bits (nearest even), as the CPU backend's bf16 mode does.
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

fn to_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_bits(x)).collect()
}

fn upload_mat(dev: &Device, m: &Mat) -> Result<DevMat, BackendError> {
    let data = match &m.data {
        WeightData::Bf16(v) => dev.upload(v)?,
        WeightData::F32(v) => dev.upload(&to_bf16(v))?,
    };
    Ok(DevMat {
        data,
        rows: m.rows,
        cols: m.cols,
    })
}

fn upload_vec(dev: &Device, v: &[f32]) -> Result<CudaSlice<u16>, BackendError> {
    dev.upload(&to_bf16(v))
}

/// A matrix as `Device::gemm` takes it.
fn mat(m: &DevMat, st: &cudarc::driver::CudaStream) -> (u64, usize, usize) {
    (ptr(&m.data, st), m.rows, m.cols)
}

/// A size as a kernel `int`.
fn int(v: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| BackendError::InvalidStep(format!("{what} {v} exceeds 2^31")))
}

fn setup(e: BackendError) -> CudaError {
    CudaError::Driver(e.to_string())
}

impl CudaBackend {
    /// Whether this backend runs `w` with KV in `kv_dtype`, without touching a GPU; Ok holds
    /// the KV type it will use (auto: bf16). Refused: tensor-parallel shards, MoE, head_dim
    /// odd or above 512, f32 KV.
    pub fn check_supported(w: &ModelWeights, kv_dtype: KvDtype) -> Result<KvDtype, CudaError> {
        let c = &w.config;
        if w.shard.tp_size != 1 {
            return Err(CudaError::Unsupported(
                "the CUDA backend runs whole models only (no tensor parallelism yet); use --backend cpu for tensor_parallel_size > 1".into(),
            ));
        }
        if w.layers.iter().any(|l| matches!(l.mlp, Mlp::Moe { .. })) {
            return Err(CudaError::Unsupported(format!(
                "{:?} is a mixture-of-experts model; the CUDA backend runs dense models only for now; use --backend cpu",
                c.architecture
            )));
        }
        if c.head_dim > MAX_HEAD_DIM || !c.head_dim.is_multiple_of(2) {
            return Err(CudaError::Unsupported(format!(
                "head_dim {} is not supported by the CUDA attention kernel (even, at most {MAX_HEAD_DIM}); use --backend cpu",
                c.head_dim
            )));
        }
        match kv_dtype {
            KvDtype::Auto | KvDtype::Bf16 => Ok(KvDtype::Bf16),
            KvDtype::Fp8 => Ok(KvDtype::Fp8),
            KvDtype::Float32 => Err(CudaError::Unsupported(
                "kv_cache_config.dtype float32 is CPU-only; the CUDA backend stores KV in bf16 (auto) or fp8".into(),
            )),
        }
    }

    /// Uploads `w` to GPU `s.device` and allocates the activation workspace; refuses what this
    /// backend does not run (MoE, tensor-parallel shards, f32 KV, head_dim > 512).
    pub fn new(w: ModelWeights, s: &CudaSettings) -> Result<Self, CudaError> {
        let kv_dtype = Self::check_supported(&w, s.kv_dtype)?;
        let c = w.config.clone();
        let dev = Device::open(s.device)?;
        let (free_before, total) = dev.mem_info().map_err(setup)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut max_inter = 0;
        for l in &w.layers {
            let Mlp::Dense(f) = &l.mlp else {
                return Err(CudaError::Unsupported("MoE layer".into()));
            };
            max_inter = max_inter.max(f.inter);
            layers.push(DevLayer {
                input_norm: upload_vec(&dev, &l.input_norm).map_err(setup)?,
                post_norm: upload_vec(&dev, &l.post_norm).map_err(setup)?,
                qkv: upload_mat(&dev, &l.qkv).map_err(setup)?,
                qkv_bias: l
                    .qkv_bias
                    .as_deref()
                    .map(|b| upload_vec(&dev, b))
                    .transpose()
                    .map_err(setup)?,
                o: upload_mat(&dev, &l.o).map_err(setup)?,
                o_bias: l
                    .o_bias
                    .as_deref()
                    .map(|b| upload_vec(&dev, b))
                    .transpose()
                    .map_err(setup)?,
                qk_norm: match &l.qk_norm {
                    Some((q, k)) => Some((
                        upload_vec(&dev, q).map_err(setup)?,
                        upload_vec(&dev, k).map_err(setup)?,
                    )),
                    None => None,
                },
                gate_up: upload_mat(&dev, &f.gate_up).map_err(setup)?,
                down: upload_mat(&dev, &f.down).map_err(setup)?,
                inter: f.inter,
            });
        }
        let embed = upload_mat(&dev, &w.embed).map_err(setup)?.data;
        let lm_head = w
            .lm_head
            .as_ref()
            .map(|m| upload_mat(&dev, m))
            .transpose()
            .map_err(setup)?;
        let norm = upload_vec(&dev, &w.norm).map_err(setup)?;
        let inv_freq = dev.upload(&Rope::new(&c).inv_freq_f32()).map_err(setup)?;
        let mut be = Self {
            dev,
            embed,
            lm_head,
            norm,
            layers,
            inv_freq,
            kv_dtype,
            kv: None,
            ws: Workspace {
                x: Scratch::new(),
                xn: Scratch::new(),
                qkv: Scratch::new(),
                attn: Scratch::new(),
                gate_up: Scratch::new(),
                act: Scratch::new(),
                logits: Scratch::new(),
                meta: Scratch::new(),
            },
            max_inter,
            logit_rows: s.max_batch_size.max(1),
            free_after_setup: 0,
            config: c,
        };
        be.reserve(s.max_num_tokens.max(1)).map_err(setup)?;
        be.dev.sync().map_err(setup)?;
        let (free_after, _) = be.dev.mem_info().map_err(setup)?;
        be.free_after_setup = free_after;
        tracing::info!(
            device = %be.dev.describe,
            total_bytes = total,
            weight_bytes = free_before.saturating_sub(free_after + be.ws.bytes()),
            workspace_bytes = be.ws.bytes(),
            workspace_tokens = s.max_num_tokens,
            free_bytes = free_after,
            "CUDA backend ready: weights in bf16, GEMMs bf16 x bf16 -> f32"
        );
        Ok(be)
    }

    /// Sizes the workspace for steps of up to `tokens` tokens.
    fn reserve(&mut self, tokens: usize) -> Result<(), BackendError> {
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let rows = tokens.max(self.logit_rows);
        self.ws.x.at_least(&self.dev, tokens * h)?;
        self.ws.xn.at_least(&self.dev, rows * h)?;
        self.ws
            .qkv
            .at_least(&self.dev, tokens * (nq + 2 * nkv) * d)?;
        self.ws.attn.at_least(&self.dev, tokens * nq * d)?;
        self.ws
            .gate_up
            .at_least(&self.dev, tokens * 2 * self.max_inter)?;
        self.ws.act.at_least(&self.dev, tokens * self.max_inter)?;
        self.ws
            .logits
            .at_least(&self.dev, self.logit_rows * c.vocab_size)?;
        self.ws.meta.at_least(&self.dev, 8 * tokens + 1024)?;
        Ok(())
    }

    /// Device name and compute capability.
    pub fn device_description(&self) -> &str {
        &self.dev.describe
    }

    fn step(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let (num_blocks, tpb) = match &self.kv {
            Some(kv) => (kv.num_blocks, kv.tokens_per_block),
            None => return Err(BackendError::InvalidStep("init_kv was not called".into())),
        };
        let c = self.config.clone();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let vocab = c.vocab_size;
        // Host side of the step: validate, then lay out every integer the kernels read.
        let mut tokens: Vec<i32> = Vec::new();
        let mut positions: Vec<i32> = Vec::new();
        let mut slots: Vec<i32> = Vec::new();
        let mut row_seq: Vec<i32> = Vec::new();
        let mut row_ctx: Vec<i32> = Vec::new();
        let mut picked: Vec<(usize, i32)> = Vec::new();
        let mut max_blocks = 1usize;
        for (i, ch) in batch.iter().enumerate() {
            let end = ch.start_pos + ch.tokens.len();
            let needed = end.div_ceil(tpb);
            if ch.block_table.len() < needed {
                return Err(BackendError::InvalidStep(format!(
                    "chunk {i} reaches position {end} but has {} blocks",
                    ch.block_table.len()
                )));
            }
            if let Some(&b) = ch.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(BackendError::InvalidStep(format!(
                    "chunk {i} uses block {b} but the KV pool has {num_blocks} blocks"
                )));
            }
            if let Some(&t) = ch.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(BackendError::InvalidStep(format!(
                    "token id {t} is outside the vocabulary of {vocab} tokens"
                )));
            }
            max_blocks = max_blocks.max(needed);
            for (j, &t) in ch.tokens.iter().enumerate() {
                let pos = ch.start_pos + j;
                let slot = ch.block_table[pos / tpb] as usize * tpb + pos % tpb;
                let row = int(tokens.len(), "row")?;
                let wanted = match ch.logits {
                    LogitsWanted::All => true,
                    LogitsWanted::Last => pos + 1 == end,
                    LogitsWanted::None => false,
                };
                if wanted {
                    picked.push((i, row));
                }
                tokens.push(t as i32);
                positions.push(int(pos, "position")?);
                slots.push(int(slot, "KV slot")?);
                row_seq.push(int(i, "chunk")?);
                row_ctx.push(int(pos + 1, "context length")?);
            }
        }
        let t_rows = tokens.len();
        if t_rows == 0 {
            return Ok(vec![Vec::new(); batch.len()]);
        }
        let mut tables = vec![0i32; batch.len() * max_blocks];
        for (i, ch) in batch.iter().enumerate() {
            let needed = (ch.start_pos + ch.tokens.len()).div_ceil(tpb);
            for (dst, &b) in tables[i * max_blocks..]
                .iter_mut()
                .zip(&ch.block_table[..needed])
            {
                *dst = b as i32;
            }
        }
        let mut meta = Vec::with_capacity(5 * t_rows + tables.len() + picked.len());
        let offsets = {
            let mut o = [0usize; 7];
            for (k, part) in [
                &tokens,
                &positions,
                &slots,
                &row_seq,
                &row_ctx,
                &tables,
                &picked.iter().map(|p| p.1).collect::<Vec<i32>>(),
            ]
            .into_iter()
            .enumerate()
            {
                o[k] = meta.len();
                meta.extend_from_slice(part);
            }
            o
        };
        self.reserve(t_rows)?;
        let ws_meta = self.ws.meta.at_least(&self.dev, meta.len())?;
        self.ws.meta.write(&self.dev, &meta)?;
        let at = |k: usize| ws_meta + 4 * offsets[k] as u64;
        let (tok_p, pos_p, slot_p, seq_p, ctx_p, tab_p, pick_p) =
            (at(0), at(1), at(2), at(3), at(4), at(5), at(6));

        let Some(kv) = self.kv.as_ref() else {
            return Err(BackendError::InvalidStep("init_kv was not called".into()));
        };
        let dev = &self.dev;
        let st = &dev.stream;
        let x = self.ws.x.at_least(dev, t_rows * h)?;
        let xn = self.ws.xn.at_least(dev, t_rows.max(self.logit_rows) * h)?;
        let qkv_w = (nq + 2 * nkv) * d;
        let qkv = self.ws.qkv.at_least(dev, t_rows * qkv_w)?;
        let attn = self.ws.attn.at_least(dev, t_rows * nq * d)?;
        let gate_up = self.ws.gate_up.at_least(dev, t_rows * 2 * self.max_inter)?;
        let act = self.ws.act.at_least(dev, t_rows * self.max_inter)?;
        let rows_u = u32::try_from(t_rows)
            .map_err(|_| BackendError::InvalidStep(format!("{t_rows} rows in one step")))?;
        let (hi, di) = (int(h, "hidden")?, int(d, "head_dim")?);
        let (nqi, nkvi, qkv_wi) = (int(nq, "heads")?, int(nkv, "kv heads")?, int(qkv_w, "qkv")?);
        let eps = c.rms_norm_eps as f32;
        let f32b = 4u64;
        dev.launch("embed_bf16")?
            .ptr(x)
            .ptr(ptr(&self.embed, st))
            .ptr(tok_p)
            .i32(hi)
            .run((rows_u, 1), 256, 0, "embed_bf16")?;
        let scale = 1.0 / (d as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            dev.launch("rmsnorm_f32_bf16")?
                .ptr(xn)
                .ptr(x)
                .ptr(ptr(&l.input_norm, st))
                .i32(hi)
                .f32(eps)
                .run((rows_u, 1), 256, 0, "input rmsnorm")?;
            dev.gemm(qkv, xn, mat(&l.qkv, st), t_rows, 0.0)?;
            if let Some(b) = &l.qkv_bias {
                let n = t_rows * qkv_w;
                dev.launch("add_bias_f32")?
                    .ptr(qkv)
                    .ptr(ptr(b, st))
                    .i32(qkv_wi)
                    .usize(n)
                    .run((stride_grid(n), 1), 256, 0, "qkv bias")?;
            }
            let k_off = qkv + f32b * (nq * d) as u64;
            let v_off = qkv + f32b * ((nq + nkv) * d) as u64;
            if let Some((qn, kn)) = &l.qk_norm {
                dev.launch("head_rmsnorm_f32")?
                    .ptr(qkv)
                    .ptr(ptr(qn, st))
                    .i32(di)
                    .i32(qkv_wi)
                    .f32(eps)
                    .run((rows_u, nq as u32), 64, 0, "q norm")?;
                dev.launch("head_rmsnorm_f32")?
                    .ptr(k_off)
                    .ptr(ptr(kn, st))
                    .i32(di)
                    .i32(qkv_wi)
                    .f32(eps)
                    .run((rows_u, nkv as u32), 64, 0, "k norm")?;
            }
            dev.launch("rope_f32")?
                .ptr(qkv)
                .ptr(k_off)
                .ptr(pos_p)
                .ptr(ptr(&self.inv_freq, st))
                .i32(nqi)
                .i32(nkvi)
                .i32(di)
                .i32(qkv_wi)
                .run((rows_u, 1), 128, 0, "rope")?;
            let lkv = &kv.layers[li];
            let (kc, vc) = (ptr(&lkv.k, st), ptr(&lkv.v, st));
            let smem = (d as u32 + ATTN_THREADS) * 4;
            match &lkv.scales {
                None => {
                    dev.launch("kv_store_bf16")?
                        .ptr(kc)
                        .ptr(vc)
                        .ptr(k_off)
                        .ptr(v_off)
                        .ptr(slot_p)
                        .i32(nkvi)
                        .i32(di)
                        .i32(qkv_wi)
                        .run((rows_u, nkv as u32), 32, 0, "kv store")?;
                    dev.launch("paged_attention_bf16")?
                        .ptr(attn)
                        .ptr(qkv)
                        .ptr(kc)
                        .ptr(vc)
                        .ptr(tab_p)
                        .ptr(seq_p)
                        .ptr(ctx_p)
                        .i32(qkv_wi)
                        .i32(int(max_blocks, "blocks per sequence")?)
                        .i32(nqi)
                        .i32(nkvi)
                        .i32(di)
                        .i32(int(tpb, "tokens_per_block")?)
                        .f32(scale)
                        .run((rows_u, nq as u32), ATTN_THREADS, smem, "paged attention")?;
                }
                Some((ks, vs)) => {
                    let (ksp, vsp) = (ptr(ks, st), ptr(vs, st));
                    dev.launch("kv_store_fp8")?
                        .ptr(kc)
                        .ptr(vc)
                        .ptr(ksp)
                        .ptr(vsp)
                        .ptr(k_off)
                        .ptr(v_off)
                        .ptr(slot_p)
                        .i32(nkvi)
                        .i32(di)
                        .i32(qkv_wi)
                        .run((rows_u, nkv as u32), 32, 0, "kv store fp8")?;
                    dev.launch("paged_attention_fp8")?
                        .ptr(attn)
                        .ptr(qkv)
                        .ptr(kc)
                        .ptr(vc)
                        .ptr(ksp)
                        .ptr(vsp)
                        .ptr(tab_p)
                        .ptr(seq_p)
                        .ptr(ctx_p)
                        .i32(qkv_wi)
                        .i32(int(max_blocks, "blocks per sequence")?)
                        .i32(nqi)
                        .i32(nkvi)
                        .i32(di)
                        .i32(int(tpb, "tokens_per_block")?)
                        .f32(scale)
                        .run(
                            (rows_u, nq as u32),
                            ATTN_THREADS,
                            smem,
                            "paged attention fp8",
                        )?;
                }
            }
            // x += attn . o^T (beta = 1 adds onto the residual stream), then the o bias.
            dev.gemm(x, attn, mat(&l.o, st), t_rows, 1.0)?;
            if let Some(b) = &l.o_bias {
                let n = t_rows * h;
                dev.launch("add_bias_f32")?
                    .ptr(x)
                    .ptr(ptr(b, st))
                    .i32(hi)
                    .usize(n)
                    .run((stride_grid(n), 1), 256, 0, "o bias")?;
            }
            dev.launch("rmsnorm_f32_bf16")?
                .ptr(xn)
                .ptr(x)
                .ptr(ptr(&l.post_norm, st))
                .i32(hi)
                .f32(eps)
                .run((rows_u, 1), 256, 0, "post-attention rmsnorm")?;
            let gu = &l.gate_up;
            dev.gemm(gate_up, xn, mat(gu, st), t_rows, 0.0)?;
            let n = t_rows * l.inter;
            dev.launch("silu_mul_bf16")?
                .ptr(act)
                .ptr(gate_up)
                .i32(int(l.inter, "intermediate_size")?)
                .usize(t_rows)
                .run((stride_grid(n), 1), 256, 0, "silu mul")?;
            dev.gemm(x, act, mat(&l.down, st), t_rows, 1.0)?;
        }
        self.logits(batch.len(), &picked, x, xn, pick_p)
    }

    /// Final norm of the picked rows, lm_head, copy to host; `logit_rows` rows at a time.
    fn logits(
        &mut self,
        chunks: usize,
        picked: &[(usize, i32)],
        x: u64,
        xn: u64,
        pick_p: u64,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); chunks];
        if picked.is_empty() {
            self.dev.sync()?;
            return Ok(out);
        }
        let dev = &self.dev;
        let st = &dev.stream;
        let head = self.lm_head.as_ref().map_or(&self.embed, |m| &m.data);
        let logits = self.ws.logits.at_least(dev, self.logit_rows * vocab)?;
        let mut host = vec![0.0f32; picked.len() * vocab];
        for (ci, group) in picked.chunks(self.logit_rows).enumerate() {
            let first = ci * self.logit_rows;
            let n = group.len();
            dev.launch("rmsnorm_gather_f32_bf16")?
                .ptr(xn)
                .ptr(x)
                .ptr(pick_p + 4 * first as u64)
                .ptr(ptr(&self.norm, st))
                .i32(int(h, "hidden")?)
                .f32(c.rms_norm_eps as f32)
                .run((n as u32, 1), 256, 0, "final rmsnorm")?;
            dev.gemm(logits, xn, (ptr(head, st), vocab, h), n, 0.0)?;
            self.ws
                .logits
                .read(dev, &mut host[first * vocab..(first + n) * vocab])?;
        }
        for (i, &(chunk, _)) in picked.iter().enumerate() {
            out[chunk].extend_from_slice(&host[i * vocab..(i + 1) * vocab]);
        }
        Ok(out)
    }

    fn bytes_per_token_layer(&self) -> usize {
        let c = &self.config;
        let per_head = match self.kv_dtype {
            KvDtype::Fp8 => c.head_dim + 4,
            _ => 2 * c.head_dim,
        };
        2 * c.num_key_value_heads * per_head
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.config.num_hidden_layers * self.bytes_per_token_layer()
    }

    fn kv_memory_available(&self) -> Option<usize> {
        Some(self.free_after_setup)
    }

    fn init_kv(&mut self, num_blocks: usize, tokens_per_block: usize) -> Result<(), BackendError> {
        let c = &self.config;
        let slots = num_blocks.saturating_mul(tokens_per_block);
        if i32::try_from(slots).is_err() {
            return Err(BackendError::KvAlloc {
                bytes: slots.saturating_mul(self.kv_bytes_per_token()),
                reason: format!(
                    "{slots} KV slots exceed the kernels' 2^31 limit; lower kv_cache_config.max_tokens"
                ),
            });
        }
        let elems = slots * c.num_key_value_heads * c.head_dim;
        let bytes = match self.kv_dtype {
            KvDtype::Fp8 => elems,
            _ => 2 * elems,
        };
        let total = slots * self.kv_bytes_per_token();
        let alloc = |e: BackendError| BackendError::KvAlloc {
            bytes: total,
            reason: e.to_string(),
        };
        self.kv = None;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            let scales = match self.kv_dtype {
                KvDtype::Fp8 => {
                    let n = slots * c.num_key_value_heads;
                    Some((
                        self.dev.zeros::<f32>(n).map_err(alloc)?,
                        self.dev.zeros::<f32>(n).map_err(alloc)?,
                    ))
                }
                _ => None,
            };
            layers.push(LayerKv {
                k: self.dev.zeros::<u8>(bytes).map_err(alloc)?,
                v: self.dev.zeros::<u8>(bytes).map_err(alloc)?,
                scales,
            });
        }
        self.dev.sync().map_err(alloc)?;
        let (free, _) = self.dev.mem_info()?;
        tracing::info!(
            num_blocks,
            tokens_per_block,
            kv_dtype = ?self.kv_dtype,
            kv_bytes = total,
            free_bytes_after = free,
            "CUDA KV pool allocated"
        );
        self.kv = Some(KvPool {
            layers,
            num_blocks,
            tokens_per_block,
        });
        Ok(())
    }

    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| dev_err("binding the CUDA context", e))?;
        self.step(batch)
    }
}
