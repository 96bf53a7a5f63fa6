//! `CudaBackend`: a Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with
//! q/k norm; Mixtral, Qwen3-MoE and Qwen2-MoE through `moe`) on one GPU, whole or as one rank
//! of a tensor/expert-parallel group.
//!
//! Weights live on the device in bf16; projections are cuBLAS GEMMs with bf16 inputs and f32
//! accumulation; the residual stream is f32; norms, RoPE, the paged KV store, paged attention
//! and SiLU-mul are the NVRTC kernels of `kernels/`. The math follows the CPU backend,
//! including its tensor-parallel split (`model::shard`): the embedding rows of other ranks'
//! vocabulary are zero and summed over the group, the o and down projections' partial sums are
//! all-reduced before they join the residual stream, and the vocabulary-parallel logits are
//! gathered. The KV pool is bf16 or fp8 e4m3 in device memory. Logits come back to the host
//! for the sampler.

use std::collections::HashMap;

use cudarc::driver::{CudaGraph, CudaSlice};

use llmapi_common::model_config::ModelConfig;

use super::CudaError;
use super::device::{Device, Scratch, dev_err, ptr, stride_grid};
use super::graphs::{GraphSizes, replay_agrees};
use super::layout::{Limits, StepLayout};
use super::moe::{self, DevMoe, MAX_TOP_K, MoeIo, MoeScratch};
use crate::backend::cpu::kernels::Rope;
use crate::backend::{Backend, BackendError, SeqChunk};
use crate::dist::{Communicator, SingleRank};
use crate::engine::KvDtype;
use crate::model::{Mat, Mlp, ModelWeights, Shard, WeightData};

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
    /// Longest sequence: the block-table stride of decode steps replayed as CUDA graphs.
    pub max_seq_len: usize,
    /// Batch sizes whose decode steps are captured as CUDA graphs (`cuda_graph_config`);
    /// None: every step runs eagerly.
    pub cuda_graphs: Option<GraphSizes>,
}

/// A bf16 matrix on the device, `rows` x `cols` row-major.
pub(super) struct DevMat {
    pub(super) data: CudaSlice<u16>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

/// The MLP of one layer on the device.
enum DevMlp {
    Dense {
        gate_up: DevMat,
        down: DevMat,
        inter: usize,
    },
    Moe(DevMoe),
}

struct DevLayer {
    input_norm: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    qkv: DevMat,
    qkv_bias: Option<CudaSlice<u16>>,
    o: DevMat,
    o_bias: Option<CudaSlice<u16>>,
    qk_norm: Option<(CudaSlice<u16>, CudaSlice<u16>)>,
    mlp: DevMlp,
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
    /// A projection's partial sums before the group's all-reduce, f32 [tokens, hidden]
    /// (tensor-parallel ranks only).
    proj: Scratch<f32>,
    /// Host staging of collectives when the communicator moves host memory only.
    host: Vec<f32>,
    /// Logits, f32 [rows, vocab].
    logits: Scratch<f32>,
    /// Greedy tokens, one per logits row.
    tokens: Scratch<u32>,
    /// Per-step integers (token ids, positions, slots, tables), one upload.
    meta: Scratch<i32>,
}

impl Workspace {
    /// Changes whenever a buffer a step's body uses moves.
    fn moves(&self) -> u64 {
        self.x.moves()
            + self.xn.moves()
            + self.qkv.moves()
            + self.attn.moves()
            + self.gate_up.moves()
            + self.act.moves()
            + self.proj.moves()
    }

    fn bytes(&self) -> usize {
        self.x.bytes()
            + self.xn.bytes()
            + self.qkv.bytes()
            + self.attn.bytes()
            + self.gate_up.bytes()
            + self.act.bytes()
            + self.proj.bytes()
            + self.logits.bytes()
            + self.tokens.bytes()
            + self.meta.bytes()
    }
}

/// Runs a Llama-family model (dense or MoE) on one NVIDIA GPU, whole or as one rank of a
/// tensor-parallel group.
pub struct CudaBackend {
    dev: Device,
    /// The config as this rank sees it (local heads; hidden size and vocabulary whole).
    config: ModelConfig,
    shard: Shard,
    /// This rank's vocabulary slice (the rows of `embed` and `lm_head`).
    vocab_slice: std::ops::Range<usize>,
    comm: Box<dyn Communicator>,
    moe: MoeScratch,
    embed: CudaSlice<u16>,
    lm_head: Option<DevMat>,
    norm: CudaSlice<u16>,
    layers: Vec<DevLayer>,
    inv_freq: CudaSlice<f32>,
    kv_dtype: KvDtype,
    kv: Option<KvPool>,
    ws: Workspace,
    /// Widest MLP activation row per token of any layer (dense inner width, top_k x expert
    /// width, or a shared expert's width).
    max_inter: usize,
    logit_rows: usize,
    /// Device memory free after weights and workspace, measured at construction.
    free_after_setup: usize,
    /// Decode batch sizes run as CUDA graphs; None when graphs are off.
    graph_sizes: Option<GraphSizes>,
    /// Captured graphs by batch size, valid while the workspace has not moved.
    graphs: HashMap<usize, Graph>,
    /// `Workspace::moves` when `graphs` were captured.
    graphs_ws_moves: u64,
    /// Integers of graph steps (a buffer that stays put).
    graph_meta: Scratch<i32>,
    max_seq_len: usize,
}

/// A captured decode step.
struct Graph(CudaGraph);

// SAFETY: CUDA requires calls on one graph to be serialized, not made from one particular
// thread; a `Graph` is only reached through `&mut CudaBackend`, so one thread at a time uses
// it, and every backend call binds the CUDA context to its thread first.
unsafe impl Send for Graph {}

/// Where a step's integers live on the device, and its sizes.
#[derive(Clone, Copy)]
struct StepPtrs {
    t_rows: usize,
    tok_p: u64,
    pos_p: u64,
    slot_p: u64,
    seq_p: u64,
    ctx_p: u64,
    tab_p: u64,
    /// Block-table stride.
    max_blocks: usize,
    tpb: usize,
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

pub(super) fn upload_mat(dev: &Device, m: &Mat) -> Result<DevMat, BackendError> {
    let data = match &m.data {
        WeightData::Bf16(v) => dev.upload(v)?,
        WeightData::F32(v) => dev.upload(&to_bf16(v))?,
        // GGUF Q8_0 and k-quant blocks: the CUDA kernels compute on bf16.
        WeightData::Q8_0 { .. } | WeightData::KQuant(_) | WeightData::Q4(_) => {
            let mut v = vec![0.0; m.rows * m.cols];
            for r in 0..m.rows {
                m.row_to_f32(r, &mut v[r * m.cols..(r + 1) * m.cols]);
            }
            dev.upload(&to_bf16(&v))?
        }
        WeightData::Bf16Panels(_) => {
            return Err(BackendError::Unsupported(
                "weights packed into CPU panels cannot be uploaded; load them afresh for CUDA"
                    .into(),
            ));
        }
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
pub(super) fn int(v: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| BackendError::InvalidStep(format!("{what} {v} exceeds 2^31")))
}

/// What a step returns: logits rows per chunk, or (greedy steps) a token per chunk.
enum StepOut {
    Rows(Vec<Vec<f32>>),
    Tokens(Vec<Option<u32>>),
}

/// The rows of a step whose logits are wanted: `picked` holds (chunk, row of `x`) and is also
/// uploaded at `pick_p`; `xn` is scratch for their normed rows.
struct LogitRows<'a> {
    chunks: usize,
    picked: &'a [(usize, i32)],
    x: u64,
    xn: u64,
    pick_p: u64,
}

/// Per chunk, the argmax of its last row of `vocab` logits (None for a chunk without rows),
/// as `sampling::argmax` picks it.
fn last_row_argmax(rows: &[Vec<f32>], vocab: usize) -> Vec<Option<u32>> {
    rows.iter()
        .map(|r| {
            (vocab > 0 && r.len() >= vocab).then(|| crate::sampling::argmax(&r[r.len() - vocab..]))
        })
        .collect()
}

/// Sums `n` f32 at the start of `buf` over the group, in place: on the device when the
/// communicator moves device memory (after the stream has finished writing them), else
/// through `host`.
fn all_reduce(
    dev: &Device,
    comm: &mut dyn Communicator,
    buf: &mut Scratch<f32>,
    host: &mut Vec<f32>,
    n: usize,
) -> Result<(), BackendError> {
    let addr = buf.at_least(dev, n)?;
    if comm.moves_device_memory() {
        dev.sync()?;
        // SAFETY: `addr` holds at least n f32 of this backend's GPU, the stream that wrote them
        // has completed (sync above), and nothing is queued on them until this returns (the
        // NCCL call has completed on the GPU when it does).
        unsafe { comm.all_reduce_sum_device(addr, n) }?;
        return Ok(());
    }
    host.resize(n, 0.0);
    buf.read(dev, host)?;
    comm.all_reduce_sum(host)?;
    buf.write(dev, host)
}

/// x += y, `n` f32.
fn add_rows(dev: &Device, x: u64, y: u64, n: usize) -> Result<(), BackendError> {
    dev.launch("add_f32")?.ptr(x).ptr(y).usize(n).run(
        (stride_grid(n), 1),
        256,
        0,
        "add partial sums",
    )
}

/// Every rank's `rows` x (vocab / ranks) logits slice gathered into `rows` full rows.
fn gather_vocab(
    comm: &mut dyn Communicator,
    mine: &[f32],
    rows: usize,
    vocab: usize,
) -> Result<Vec<f32>, BackendError> {
    let ranks = comm.world_size();
    let mut gathered = vec![0.0f32; ranks * mine.len()];
    comm.all_gather(mine, &mut gathered)?;
    Ok(interleave_vocab_slices(&gathered, ranks, rows, vocab))
}

/// `gathered` is `ranks` blocks, each `rows` x (vocab / ranks), in rank order; returns `rows`
/// rows of `vocab` with rank r's slice at columns `r * vocab / ranks..`.
pub(super) fn interleave_vocab_slices(
    gathered: &[f32],
    ranks: usize,
    rows: usize,
    vocab: usize,
) -> Vec<f32> {
    let local = vocab / ranks.max(1);
    let mut all = vec![0.0f32; rows * vocab];
    if local == 0 {
        return all;
    }
    for (rank, part) in gathered.chunks_exact(rows * local).enumerate() {
        for (i, row) in part.chunks_exact(local).enumerate() {
            let dst = i * vocab + rank * local;
            all[dst..dst + local].copy_from_slice(row);
        }
    }
    all
}

fn setup(e: BackendError) -> CudaError {
    CudaError::Driver(e.to_string())
}

impl CudaBackend {
    /// Whether this backend runs `w` with KV in `kv_dtype`, without touching a GPU; Ok holds
    /// the KV type it will use (auto: bf16). Refused: MoE layers routing more than 8 experts
    /// per token, head_dim odd or above 512, f32 KV.
    pub fn check_supported(w: &ModelWeights, kv_dtype: KvDtype) -> Result<KvDtype, CudaError> {
        let c = &w.config;
        for l in &w.layers {
            if let Mlp::Moe { top_k, router, .. } = &l.mlp
                && (*top_k == 0 || *top_k > MAX_TOP_K || *top_k > router.rows)
            {
                return Err(CudaError::Unsupported(format!(
                    "num_experts_per_tok {top_k} with {} experts: the CUDA routing kernel picks 1 to {MAX_TOP_K} experts per token; use --backend cpu",
                    router.rows
                )));
            }
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

    /// Uploads the whole model `w` to GPU `s.device` and allocates the activation workspace;
    /// refuses what this backend does not run (see `check_supported`).
    pub fn new(w: ModelWeights, s: &CudaSettings) -> Result<Self, CudaError> {
        if !w.shard.is_whole() {
            return Err(CudaError::Unsupported(format!(
                "the weights are shard {} of {}; a shard needs its group's communicator (CudaBackend::new_sharded)",
                w.shard.tp_rank, w.shard.tp_size
            )));
        }
        Self::new_sharded(w, Box::new(SingleRank), s)
    }

    /// Uploads `w` (a whole model with `SingleRank`, or one rank's shard) to GPU `s.device`;
    /// the shard's collectives go through `comm`, whose rank and size must be the shard's.
    /// With a communicator that moves device memory (NCCL) the all-reduces run on device
    /// buffers; with another (the TCP ring) they are staged through host memory.
    pub fn new_sharded(
        w: ModelWeights,
        comm: Box<dyn Communicator>,
        s: &CudaSettings,
    ) -> Result<Self, CudaError> {
        let kv_dtype = Self::check_supported(&w, s.kv_dtype)?;
        if comm.world_size() != w.shard.tp_size || comm.rank() != w.shard.tp_rank {
            return Err(CudaError::Unsupported(format!(
                "weights are shard {} of {} but the communicator is rank {} of {}",
                w.shard.tp_rank,
                w.shard.tp_size,
                comm.rank(),
                comm.world_size()
            )));
        }
        let c = w.shard.local_config(&w.config);
        let vocab_slice = w.shard.vocab(&w.config);
        let dev = Device::open(s.device)?;
        let (free_before, total) = dev.mem_info().map_err(setup)?;
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut max_inter = 0;
        for l in &w.layers {
            let mlp = match &l.mlp {
                Mlp::Dense(f) => {
                    max_inter = max_inter.max(f.inter);
                    DevMlp::Dense {
                        gate_up: upload_mat(&dev, &f.gate_up).map_err(setup)?,
                        down: upload_mat(&dev, &f.down).map_err(setup)?,
                        inter: f.inter,
                    }
                }
                moe_mlp @ Mlp::Moe { .. } => {
                    let m = DevMoe::upload(&dev, moe_mlp).map_err(setup)?;
                    max_inter = max_inter.max(m.act_width());
                    DevMlp::Moe(m)
                }
            };
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
                mlp,
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
            shard: w.shard,
            vocab_slice,
            comm,
            moe: MoeScratch::new(),
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
                proj: Scratch::new(),
                host: Vec::new(),
                logits: Scratch::new(),
                tokens: Scratch::new(),
                meta: Scratch::new(),
            },
            max_inter,
            logit_rows: s.max_batch_size.max(1),
            free_after_setup: 0,
            graph_sizes: None,
            graphs: HashMap::new(),
            graphs_ws_moves: 0,
            graph_meta: Scratch::new(),
            max_seq_len: s.max_seq_len,
            config: c,
        };
        be.graph_sizes = be.graph_choice(s.cuda_graphs.clone());
        let graph_rows = be.graph_sizes.as_ref().map_or(0, GraphSizes::max);
        be.reserve(s.max_num_tokens.max(graph_rows).max(1))
            .map_err(setup)?;
        be.dev.sync().map_err(setup)?;
        let (free_after, _) = be.dev.mem_info().map_err(setup)?;
        be.free_after_setup = free_after;
        tracing::info!(
            device = %be.dev.describe,
            tp_rank = be.shard.tp_rank,
            tp_size = be.shard.tp_size,
            ep_size = be.shard.ep_size,
            device_collectives = be.comm.moves_device_memory(),
            total_bytes = total,
            weight_bytes =
                free_before.saturating_sub(free_after + be.ws.bytes() + be.moe.bytes()),
            workspace_bytes = be.ws.bytes() + be.moe.bytes(),
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
        if !self.shard.is_whole() {
            self.ws.proj.at_least(&self.dev, tokens * h)?;
        }
        for l in &self.layers {
            if let DevMlp::Moe(m) = &l.mlp {
                self.moe.reserve(&self.dev, m, tokens, h)?;
            }
        }
        self.ws
            .logits
            .at_least(&self.dev, self.logit_rows * c.vocab_size)?;
        self.ws.meta.at_least(&self.dev, 8 * tokens + 1024)?;
        Ok(())
    }

    /// The graph sizes to use given `cuda_graph_config`'s, with a log line saying which and
    /// why not.
    fn graph_choice(&self, asked: Option<GraphSizes>) -> Option<GraphSizes> {
        let Some(sizes) = asked else {
            tracing::info!("cuda_graph_config is null: decode steps run without CUDA graphs");
            return None;
        };
        let why_not = if !self.shard.is_whole() {
            Some("tensor-parallel all-reduces are not captured")
        } else if self.layers.iter().any(|l| matches!(l.mlp, DevMlp::Moe(_))) {
            Some("MoE routing synchronizes with the host in every layer")
        } else if self.max_seq_len == 0 {
            Some("max_seq_len is unknown")
        } else {
            None
        };
        match why_not {
            Some(why) => {
                tracing::info!(
                    reason = why,
                    "cuda_graph_config is set but this model runs without CUDA graphs"
                );
                None
            }
            None => {
                tracing::info!(
                    batch_sizes = ?sizes.sizes(),
                    enable_padding = sizes.padding(),
                    "decode steps of these batch sizes run as CUDA graphs, each checked against an eager step when first captured"
                );
                Some(sizes)
            }
        }
    }

    /// Turns CUDA graphs on (`cuda_graph_config`'s sizes) or off for later steps; graphs
    /// already captured are dropped. The GPU check compares both.
    pub fn set_cuda_graphs(&mut self, sizes: Option<GraphSizes>) -> Result<(), BackendError> {
        self.graphs.clear();
        self.graph_sizes = self.graph_choice(sizes);
        let rows = self.graph_sizes.as_ref().map_or(0, GraphSizes::max);
        self.reserve(rows.max(1))
    }

    /// Batch sizes captured so far.
    pub fn captured_graphs(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.graphs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Block-table stride of graph steps: blocks of the longest sequence.
    fn graph_stride(&self, tpb: usize) -> usize {
        self.max_seq_len.div_ceil(tpb.max(1)).max(1)
    }

    /// The graph a step runs as: a decode step (one token per sequence) whose batch has a
    /// captured (or, with padding, larger captured) size and whose tables fit the stride.
    fn graph_size(&self, batch: &[SeqChunk<'_>], tpb: usize) -> Option<usize> {
        let sizes = self.graph_sizes.as_ref()?;
        let stride = self.graph_stride(tpb);
        let decode = batch
            .iter()
            .all(|c| c.tokens.len() == 1 && (c.start_pos + 1).div_ceil(tpb) <= stride);
        if !decode {
            return None;
        }
        sizes.padded(batch.len())
    }

    /// Runs a step's body as the graph of batch size `b`, capturing it first if needed. A
    /// fresh capture is checked: the step runs eagerly, then the graph replays it (the KV it
    /// writes is the same both times) and the residual streams must agree; a capture that
    /// fails or disagrees turns graphs off with a warning, and the eager result stands.
    fn graph_body(&mut self, b: usize, p: &StepPtrs) -> Result<(u64, u64), BackendError> {
        let moves = self.ws.moves();
        if moves != self.graphs_ws_moves {
            self.graphs.clear();
            self.graphs_ws_moves = moves;
        }
        if let Some(Graph(g)) = self.graphs.get(&b) {
            g.launch()
                .map_err(|e| dev_err("launching a CUDA graph", e))?;
            return self.body_buffers(p.t_rows);
        }
        let out = self.body(p)?;
        let n = b * self.config.hidden_size;
        let mut eager = vec![0.0f32; n];
        self.ws.x.read(&self.dev, &mut eager)?;
        let graph = match self.capture(p) {
            Ok(g) => g,
            Err(why) => {
                self.graphs_off(b, &why);
                return Ok(out);
            }
        };
        graph
            .launch()
            .map_err(|e| dev_err("launching a CUDA graph", e))?;
        let mut replay = vec![0.0f32; n];
        self.ws.x.read(&self.dev, &mut replay)?;
        if replay_agrees(&eager, &replay) {
            tracing::info!(batch_size = b, "captured a CUDA graph for decode steps");
            self.graphs.insert(b, Graph(graph));
            Ok(out)
        } else {
            self.graphs_off(b, "its replay differs from the eager step");
            // The residual stream holds the replay's result: recompute it eagerly.
            self.body(p)
        }
    }

    fn graphs_off(&mut self, b: usize, why: &str) {
        tracing::warn!(
            batch_size = b,
            reason = why,
            "CUDA graph capture failed; decode steps run without CUDA graphs from now on"
        );
        self.graphs.clear();
        self.graph_sizes = None;
    }

    /// Records the body of a step on the stream into a graph (nothing executes).
    fn capture(&mut self, p: &StepPtrs) -> Result<CudaGraph, String> {
        let stream = std::sync::Arc::clone(&self.dev.stream);
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| format!("cuStreamBeginCapture: {e}"))?;
        let body = self.body(p);
        // End the capture whatever happened, so the stream leaves capture mode.
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        body.map_err(|e| format!("capturing the step: {e}"))?;
        match graph {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err("the capture recorded no work".into()),
            Err(e) => Err(format!("cuStreamEndCapture/cuGraphInstantiate: {e}")),
        }
    }

    /// The residual stream and normed-rows scratch of a step of `t_rows` rows (as `body`
    /// returns them; the buffers are already large enough).
    fn body_buffers(&mut self, t_rows: usize) -> Result<(u64, u64), BackendError> {
        let h = self.config.hidden_size;
        let x = self.ws.x.at_least(&self.dev, t_rows * h)?;
        let xn = self
            .ws
            .xn
            .at_least(&self.dev, t_rows.max(self.logit_rows) * h)?;
        Ok((x, xn))
    }

    /// Device name and compute capability.
    pub fn device_description(&self) -> &str {
        &self.dev.describe
    }

    fn step(&mut self, batch: &[SeqChunk<'_>], greedy: bool) -> Result<StepOut, BackendError> {
        let (num_blocks, tpb) = match &self.kv {
            Some(kv) => (kv.num_blocks, kv.tokens_per_block),
            None => return Err(BackendError::InvalidStep("init_kv was not called".into())),
        };
        let vocab = self.config.vocab_size;
        let limits = Limits {
            num_blocks,
            tokens_per_block: tpb,
            vocab,
        };
        // A decode step of a captured size runs as a CUDA graph, padded to the graph's rows
        // with the block tables at the graph's fixed stride.
        let graph = self.graph_size(batch, tpb);
        let layout = StepLayout::new(batch, limits, graph.map(|b| (b, self.graph_stride(tpb))))?;
        let (t_rows, max_blocks) = (layout.rows, layout.max_blocks);
        if t_rows == 0 {
            return Ok(match greedy {
                true => StepOut::Tokens(vec![None; batch.len()]),
                false => StepOut::Rows(vec![Vec::new(); batch.len()]),
            });
        }
        let (meta, offsets, picked) = (&layout.meta, layout.offsets, &layout.picked);
        self.reserve(t_rows)?;
        // Graphs read their integers from a buffer that never moves once sized for the
        // largest graph; other steps from the workspace's, which grows as needed.
        let meta_buf = match graph {
            Some(_) => {
                let most = self.graph_sizes.as_ref().map_or(0, GraphSizes::max);
                self.graph_meta
                    .at_least(&self.dev, most * (6 + max_blocks))?;
                &mut self.graph_meta
            }
            None => &mut self.ws.meta,
        };
        let ws_meta = meta_buf.at_least(&self.dev, meta.len())?;
        meta_buf.write(&self.dev, meta)?;
        let at = |k: usize| ws_meta + 4 * offsets[k] as u64;
        let (tok_p, pos_p, slot_p, seq_p, ctx_p, tab_p, pick_p) =
            (at(0), at(1), at(2), at(3), at(4), at(5), at(6));

        let ptrs = StepPtrs {
            t_rows,
            tok_p,
            pos_p,
            slot_p,
            seq_p,
            ctx_p,
            tab_p,
            max_blocks,
            tpb,
        };
        let (x, xn) = match graph {
            Some(b) => self.graph_body(b, &ptrs)?,
            None => self.body(&ptrs)?,
        };
        let rows = LogitRows {
            chunks: batch.len(),
            picked,
            x,
            xn,
            pick_p,
        };
        // Vocabulary-parallel ranks gather whole rows and take the argmax on the host.
        if greedy && self.shard.is_whole() {
            return self.greedy_tokens(&rows).map(StepOut::Tokens);
        }
        let out = self.logits(&rows)?;
        Ok(match greedy {
            true => StepOut::Tokens(last_row_argmax(&out, vocab)),
            false => StepOut::Rows(out),
        })
    }

    /// Embedding and every layer of a step whose integers were uploaded at `p`; returns the
    /// residual stream and the normed-rows scratch (x, xn). Queues only device work without
    /// host synchronization, except for MoE routing and tensor-parallel all-reduces (which
    /// `graph_size` keeps out of graphs).
    fn body(&mut self, p: &StepPtrs) -> Result<(u64, u64), BackendError> {
        let StepPtrs {
            t_rows,
            tok_p,
            pos_p,
            slot_p,
            seq_p,
            ctx_p,
            tab_p,
            max_blocks,
            tpb,
        } = *p;
        let c = self.config.clone();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
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
        let tp = !self.shard.is_whole();
        // A tensor-parallel rank writes its projections' partial sums here, all-reduces them,
        // then adds them onto the residual stream; a whole model adds onto it directly.
        let proj = if tp {
            self.ws.proj.at_least(dev, t_rows * h)?
        } else {
            x
        };
        let u32_arg = |v: usize, what: &str| {
            u32::try_from(v)
                .map_err(|_| BackendError::InvalidStep(format!("{what} {v} exceeds 2^32")))
        };
        dev.launch("embed_bf16")?
            .ptr(x)
            .ptr(ptr(&self.embed, st))
            .ptr(tok_p)
            .i32(hi)
            .u32(u32_arg(self.vocab_slice.start, "vocabulary start")?)
            .u32(u32_arg(self.vocab_slice.len(), "vocabulary slice")?)
            .run((rows_u, 1), 256, 0, "embed_bf16")?;
        if tp {
            all_reduce(
                dev,
                self.comm.as_mut(),
                &mut self.ws.x,
                &mut self.ws.host,
                t_rows * h,
            )?;
        }
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
            if tp {
                dev.gemm(proj, attn, mat(&l.o, st), t_rows, 0.0)?;
                all_reduce(
                    dev,
                    self.comm.as_mut(),
                    &mut self.ws.proj,
                    &mut self.ws.host,
                    t_rows * h,
                )?;
                add_rows(dev, x, proj, t_rows * h)?;
            } else {
                dev.gemm(x, attn, mat(&l.o, st), t_rows, 1.0)?;
            }
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
            match &l.mlp {
                DevMlp::Dense {
                    gate_up: gu,
                    down,
                    inter,
                } => {
                    dev.gemm(gate_up, xn, mat(gu, st), t_rows, 0.0)?;
                    let n = t_rows * inter;
                    dev.launch("silu_mul_bf16")?
                        .ptr(act)
                        .ptr(gate_up)
                        .i32(int(*inter, "intermediate_size")?)
                        .usize(t_rows)
                        .run((stride_grid(n), 1), 256, 0, "silu mul")?;
                    dev.gemm(proj, act, mat(down, st), t_rows, if tp { 0.0 } else { 1.0 })?;
                }
                DevMlp::Moe(m) => {
                    if tp {
                        self.ws.proj.zero(dev, t_rows * h)?;
                    }
                    let io = MoeIo {
                        xn,
                        out: proj,
                        gate_up,
                        act,
                        rows: t_rows,
                        hidden: h,
                    };
                    moe::run(dev, m, &mut self.moe, &io)?;
                }
            }
            if tp {
                all_reduce(
                    dev,
                    self.comm.as_mut(),
                    &mut self.ws.proj,
                    &mut self.ws.host,
                    t_rows * h,
                )?;
                add_rows(dev, x, proj, t_rows * h)?;
            }
        }
        Ok((x, xn))
    }

    /// Final norm of the picked rows, lm_head and an argmax per row on the device; only the
    /// token ids come back. A chunk with several picked rows gets its last row's token.
    fn greedy_tokens(&mut self, r: &LogitRows<'_>) -> Result<Vec<Option<u32>>, BackendError> {
        let mut out = vec![None; r.chunks];
        if r.picked.is_empty() {
            self.dev.sync()?;
            return Ok(out);
        }
        let vocab = self.vocab_slice.len();
        let mut ids = vec![0u32; r.picked.len()];
        for first in (0..r.picked.len()).step_by(self.logit_rows) {
            let n = self.logit_rows.min(r.picked.len() - first);
            self.final_group(r, first, n)?;
            let logits = self.ws.logits.at_least(&self.dev, n * vocab)?;
            let tokens = self.ws.tokens.at_least(&self.dev, n)?;
            let n_u = u32::try_from(n)
                .map_err(|_| BackendError::InvalidStep(format!("{n} logits rows")))?;
            self.dev
                .launch("argmax_rows")?
                .ptr(tokens)
                .ptr(logits)
                .i32(int(vocab, "vocab_size")?)
                .run((n_u, 1), 256, 0, "greedy argmax")?;
            self.ws.tokens.read(&self.dev, &mut ids[first..first + n])?;
        }
        for (&(chunk, _), &t) in r.picked.iter().zip(&ids) {
            out[chunk] = Some(t);
        }
        Ok(out)
    }

    /// Final norm and lm_head of picked rows `first..first + n` (n <= `logit_rows`) into
    /// `ws.logits`, this rank's vocabulary slice per row.
    fn final_group(
        &mut self,
        r: &LogitRows<'_>,
        first: usize,
        n: usize,
    ) -> Result<(), BackendError> {
        let dev = &self.dev;
        let st = &dev.stream;
        let h = self.config.hidden_size;
        let head = self.lm_head.as_ref().map_or(&self.embed, |m| &m.data);
        let local = self.vocab_slice.len();
        let logits = self.ws.logits.at_least(dev, n * local)?;
        let n_u =
            u32::try_from(n).map_err(|_| BackendError::InvalidStep(format!("{n} logits rows")))?;
        dev.launch("rmsnorm_gather_f32_bf16")?
            .ptr(r.xn)
            .ptr(r.x)
            .ptr(r.pick_p + 4 * first as u64)
            .ptr(ptr(&self.norm, st))
            .i32(int(h, "hidden")?)
            .f32(self.config.rms_norm_eps as f32)
            .run((n_u, 1), 256, 0, "final rmsnorm")?;
        dev.gemm(logits, r.xn, (ptr(head, st), local, h), n, 0.0)
    }

    /// Final norm of the picked rows, lm_head, copy to host; `logit_rows` rows at a time. A
    /// tensor-parallel rank computes its vocabulary slice and gathers the others' on the host.
    fn logits(&mut self, r: &LogitRows<'_>) -> Result<Vec<Vec<f32>>, BackendError> {
        let (picked, vocab) = (r.picked, self.config.vocab_size);
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); r.chunks];
        if picked.is_empty() {
            self.dev.sync()?;
            return Ok(out);
        }
        let local = self.vocab_slice.len();
        let mut host = vec![0.0f32; picked.len() * local];
        for first in (0..picked.len()).step_by(self.logit_rows) {
            let n = self.logit_rows.min(picked.len() - first);
            self.final_group(r, first, n)?;
            self.ws
                .logits
                .read(&self.dev, &mut host[first * local..(first + n) * local])?;
        }
        if local != vocab {
            host = gather_vocab(self.comm.as_mut(), &host, picked.len(), vocab)?;
        }
        for (i, &(chunk, _)) in picked.iter().enumerate() {
            out[chunk].extend_from_slice(&host[i * vocab..(i + 1) * vocab]);
        }
        Ok(out)
    }

    /// This rank's place in its tensor-parallel group.
    pub fn shard(&self) -> Shard {
        self.shard
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
        // Captured graphs address the old pool.
        self.graphs.clear();
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
        match self.step(batch, false)? {
            StepOut::Rows(r) => Ok(r),
            StepOut::Tokens(_) => Err(BackendError::Device("a logits step returned tokens".into())),
        }
    }

    fn forward_greedy(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Option<u32>>, BackendError> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| dev_err("binding the CUDA context", e))?;
        match self.step(batch, true)? {
            StepOut::Tokens(t) => Ok(t),
            StepOut::Rows(_) => Err(BackendError::Device("a greedy step returned rows".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_vocabulary_slices_are_laid_out_as_whole_rows() {
        // 2 ranks, 2 rows, vocab 4: rank 0 holds columns 0..2, rank 1 columns 2..4.
        let gathered = [
            0.0, 1.0, 10.0, 11.0, // rank 0: row 0, row 1
            2.0, 3.0, 12.0, 13.0, // rank 1: row 0, row 1
        ];
        assert_eq!(
            interleave_vocab_slices(&gathered, 2, 2, 4),
            vec![0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
        );
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_bits(f32::NAN) & 0x7f != 0);
    }
}
