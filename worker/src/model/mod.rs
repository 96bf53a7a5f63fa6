//! Model definitions: the weights of Llama-family dense and MoE decoders, loaded by HF names.
//!
//! q/k/v and gate/up projections are fused into one matrix each at load time so a step runs
//! one GEMM per group. Not for: arithmetic (the backend's) or KV memory.

pub mod dequant;
pub mod gguf;
pub mod shard;
pub mod weights;

use std::path::Path;

use llmapi_common::model_config::{Architecture, ModelConfig};

pub use shard::Shard;
pub use weights::{Mat, PANEL_ROWS, WeightData, WeightStore};

use crate::engine::EngineError;

/// A gated SiLU feed-forward block with gate and up fused (`[gate; up]` rows).
#[derive(Debug, Clone)]
pub struct Ffn {
    /// `2 * inter` x hidden.
    pub gate_up: Mat,
    /// hidden x inter.
    pub down: Mat,
    /// Inner width.
    pub inter: usize,
}

/// The MLP of one layer.
#[derive(Debug, Clone)]
pub enum Mlp {
    /// One FFN.
    Dense(Ffn),
    /// Routed experts.
    Moe {
        /// Router logits: experts x hidden, f32 (all experts, on every rank).
        router: Mat,
        /// The experts this rank holds (all of them on a single rank), each split as the
        /// shard says.
        experts: Vec<Ffn>,
        /// Index of `experts[0]` among all experts.
        first_expert: usize,
        /// Experts per token.
        top_k: usize,
        /// Renormalize the chosen weights.
        norm_topk_prob: bool,
        /// Qwen2-MoE shared expert and its sigmoid gate (1 x hidden).
        shared: Option<(Ffn, Mat)>,
    },
}

/// Weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention.
    pub input_norm: Vec<f32>,
    /// RMSNorm before the MLP.
    pub post_norm: Vec<f32>,
    /// Fused `[q; k; v]` projection.
    pub qkv: Mat,
    /// Fused q/k/v bias, when the architecture has one.
    pub qkv_bias: Option<Vec<f32>>,
    /// Output projection.
    pub o: Mat,
    /// Output bias (Llama with attention_bias).
    pub o_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm of q and k (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Feed-forward.
    pub mlp: Mlp,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// The parsed config (whole-model sizes).
    pub config: ModelConfig,
    /// Which slice of the model these weights are.
    pub shard: Shard,
    /// Token embedding rows of this rank's vocabulary slice, x hidden.
    pub embed: Mat,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection (this rank's vocabulary rows); None means tied to `embed`.
    pub lm_head: Option<Mat>,
}

impl ModelWeights {
    /// Loads config.json and the safetensors weights of `dir`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        Self::load_shard(dir, Shard::whole())
    }

    /// Loads only the slices of the weights that `shard` holds; refuses a model whose sizes
    /// the split cannot divide.
    pub fn load_shard(dir: &Path, shard: Shard) -> Result<Self, EngineError> {
        let config = ModelConfig::from_model_dir(dir)?;
        if !config.unknown_keys.is_empty() {
            tracing::warn!(
                keys = ?config.unknown_keys,
                "config.json has keys this engine does not know; they are ignored: check that they do not change the model (docs/models.md lists the known ones)"
            );
        }
        shard.check(&config)?;
        let store = WeightStore::open(dir)?;
        Self::from_store_shard(config, &store, shard)
    }

    /// The lm_head matrix (tied or not).
    pub fn lm_head(&self) -> &Mat {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights read per decoded token (all layers, lm_head; one embedding row).
    pub fn bytes_per_token(&self) -> usize {
        let mut b = self.lm_head().bytes();
        for l in &self.layers {
            b += l.qkv.bytes() + l.o.bytes();
            b += match &l.mlp {
                Mlp::Dense(f) => f.gate_up.bytes() + f.down.bytes(),
                Mlp::Moe {
                    experts,
                    top_k,
                    shared,
                    router,
                    ..
                } => {
                    let e = experts
                        .first()
                        .map_or(0, |f| f.gate_up.bytes() + f.down.bytes());
                    router.bytes()
                        + e * top_k
                        + shared
                            .as_ref()
                            .map_or(0, |(f, _)| f.gate_up.bytes() + f.down.bytes())
                }
            };
        }
        b
    }

    /// Bytes these weights occupy in memory (every matrix and vector, at its stored type).
    pub fn resident_bytes(&self) -> usize {
        let v = |x: &[f32]| x.len() * 4;
        let ffn = |f: &Ffn| f.gate_up.bytes() + f.down.bytes();
        let mut b =
            self.embed.bytes() + v(&self.norm) + self.lm_head.as_ref().map_or(0, Mat::bytes);
        for l in &self.layers {
            b += v(&l.input_norm) + v(&l.post_norm) + l.qkv.bytes() + l.o.bytes();
            b += l.qkv_bias.as_deref().map_or(0, v) + l.o_bias.as_deref().map_or(0, v);
            b += l.qk_norm.as_ref().map_or(0, |(q, k)| v(q) + v(k));
            b += match &l.mlp {
                Mlp::Dense(f) => ffn(f),
                Mlp::Moe {
                    router,
                    experts,
                    shared,
                    ..
                } => {
                    router.bytes()
                        + experts.iter().map(ffn).sum::<usize>()
                        + shared.as_ref().map_or(0, |(f, g)| ffn(f) + g.bytes())
                }
            };
        }
        b
    }

    /// Builds the whole model from an open checkpoint.
    pub fn from_store(config: ModelConfig, st: &WeightStore) -> Result<Self, EngineError> {
        Self::from_store_shard(config, st, Shard::whole())
    }

    /// Builds one rank's shard from an open checkpoint: column-parallel q/k/v and gate/up
    /// (output rows sliced), row-parallel o and down (input columns sliced), vocabulary rows
    /// of the embedding and lm_head.
    pub fn from_store_shard(
        config: ModelConfig,
        st: &WeightStore,
        shard: Shard,
    ) -> Result<Self, EngineError> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let qr = scale(shard.q_heads(c), d);
        let kvr = scale(shard.kv_heads(c), d);
        let vr = shard.vocab(c);
        let embed = st.mat_slice(
            "model.embed_tokens.weight",
            c.vocab_size,
            h,
            vr.clone(),
            0..h,
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let qkv = Mat::vstack(vec![
                st.mat_slice(&format!("{a}.q_proj.weight"), nq, h, qr.clone(), 0..h)?,
                st.mat_slice(&format!("{a}.k_proj.weight"), nkv, h, kvr.clone(), 0..h)?,
                st.mat_slice(&format!("{a}.v_proj.weight"), nkv, h, kvr.clone(), 0..h)?,
            ])?;
            let qkv_bias = if c.qkv_bias {
                let mut b = st.vec_slice(&format!("{a}.q_proj.bias"), nq, qr.clone())?;
                b.extend(st.vec_slice(&format!("{a}.k_proj.bias"), nkv, kvr.clone())?);
                b.extend(st.vec_slice(&format!("{a}.v_proj.bias"), nkv, kvr.clone())?);
                Some(b)
            } else {
                None
            };
            let o_bias = if c.o_bias {
                Some(st.vec(&format!("{a}.o_proj.bias"), h)?)
            } else {
                None
            };
            let qk_norm = if c.qk_norm {
                Some((
                    st.vec(&format!("{a}.q_norm.weight"), d)?,
                    st.vec(&format!("{a}.k_norm.weight"), d)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                input_norm: st.vec(&format!("{p}.input_layernorm.weight"), h)?,
                post_norm: st.vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                qkv,
                qkv_bias,
                o: st.mat_slice(&format!("{a}.o_proj.weight"), h, nq, 0..h, qr.clone())?,
                o_bias,
                qk_norm,
                mlp: load_mlp(c, st, i, &shard)?,
            });
        }
        let lm_head = if st.contains("lm_head.weight") && !c.tie_word_embeddings {
            Some(st.mat_slice("lm_head.weight", c.vocab_size, h, vr, 0..h)?)
        } else {
            None
        };
        Ok(Self {
            norm: st.vec("model.norm.weight", h)?,
            embed,
            layers,
            lm_head,
            config,
            shard,
        })
    }
}

fn scale(r: std::ops::Range<usize>, by: usize) -> std::ops::Range<usize> {
    r.start * by..r.end * by
}

/// An FFN of inner width `inter`, keeping inner columns `part` (gate/up rows, down columns).
fn ffn(
    st: &WeightStore,
    names: [String; 3],
    h: usize,
    inter: usize,
    part: std::ops::Range<usize>,
) -> Result<Ffn, EngineError> {
    let [gate, up, down] = names;
    Ok(Ffn {
        gate_up: Mat::vstack(vec![
            st.mat_slice(&gate, inter, h, part.clone(), 0..h)?,
            st.mat_slice(&up, inter, h, part.clone(), 0..h)?,
        ])?,
        down: st.mat_slice(&down, h, inter, 0..h, part.clone())?,
        inter: part.len(),
    })
}

fn proj_names(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}.gate_proj.weight"),
        format!("{prefix}.up_proj.weight"),
        format!("{prefix}.down_proj.weight"),
    ]
}

fn load_mlp(
    c: &ModelConfig,
    st: &WeightStore,
    i: usize,
    shard: &Shard,
) -> Result<Mlp, EngineError> {
    let h = c.hidden_size;
    let p = format!("model.layers.{i}");
    let Some(moe) = c.moe.as_ref().filter(|_| c.is_sparse_layer(i)) else {
        return Ok(Mlp::Dense(ffn(
            st,
            proj_names(&format!("{p}.mlp")),
            h,
            c.intermediate_size,
            shard.inner(c.intermediate_size),
        )?));
    };
    let inter = moe.moe_intermediate_size;
    let (mine, part) = (shard.experts(moe.num_experts), shard.expert_inner(inter));
    let first_expert = mine.start;
    let (router_name, experts) = if c.architecture == Architecture::Mixtral {
        let b = format!("{p}.block_sparse_moe");
        let experts = mine
            .map(|e| {
                let x = format!("{b}.experts.{e}");
                ffn(
                    st,
                    [
                        format!("{x}.w1.weight"),
                        format!("{x}.w3.weight"),
                        format!("{x}.w2.weight"),
                    ],
                    h,
                    inter,
                    part.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        (format!("{b}.gate.weight"), experts)
    } else {
        let experts = mine
            .map(|e| {
                let names = proj_names(&format!("{p}.mlp.experts.{e}"));
                ffn(st, names, h, inter, part.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        (format!("{p}.mlp.gate.weight"), experts)
    };
    let router = to_f32_mat(st.mat(&router_name, moe.num_experts, h)?);
    let shared = match moe.shared_expert_intermediate_size {
        Some(si) => Some((
            ffn(
                st,
                proj_names(&format!("{p}.mlp.shared_expert")),
                h,
                si,
                shard.inner(si),
            )?,
            to_f32_mat(st.mat(&format!("{p}.mlp.shared_expert_gate.weight"), 1, h)?),
        )),
        None => None,
    };
    Ok(Mlp::Moe {
        router,
        experts,
        first_expert,
        top_k: moe.num_experts_per_tok,
        norm_topk_prob: moe.norm_topk_prob,
        shared,
    })
}

fn to_f32_mat(m: Mat) -> Mat {
    match m.data {
        WeightData::F32(_) => m,
        WeightData::Bf16(_)
        | WeightData::Bf16Panels(_)
        | WeightData::Q8_0 { .. }
        | WeightData::KQuant(_)
        | WeightData::Q4(_) => {
            let mut v = vec![0.0; m.rows * m.cols];
            for r in 0..m.rows {
                m.row_to_f32(r, &mut v[r * m.cols..(r + 1) * m.cols]);
            }
            Mat {
                rows: m.rows,
                cols: m.cols,
                data: WeightData::F32(v),
            }
        }
    }
}
