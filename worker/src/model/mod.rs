//! Model definitions: the weights of Llama-family dense and MoE decoders, loaded by HF names.
//!
//! q/k/v and gate/up projections are fused into one matrix each at load time so a step runs
//! one GEMM per group. Not for: arithmetic (the backend's) or KV memory.

pub mod weights;

use std::path::Path;

use llmapi_common::model_config::{Architecture, ModelConfig};

pub use weights::{Mat, WeightData, WeightStore};

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
        /// Router logits: experts x hidden, f32.
        router: Mat,
        /// The experts.
        experts: Vec<Ffn>,
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
    /// The parsed config.
    pub config: ModelConfig,
    /// Token embedding, vocab x hidden.
    pub embed: Mat,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection; None means tied to `embed`.
    pub lm_head: Option<Mat>,
}

impl ModelWeights {
    /// Loads config.json and the safetensors weights of `dir`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let config = ModelConfig::from_model_dir(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(config, &store)
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

    /// Builds the model from an open checkpoint.
    pub fn from_store(config: ModelConfig, st: &WeightStore) -> Result<Self, EngineError> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let embed = st.mat("model.embed_tokens.weight", c.vocab_size, h)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let qkv = Mat::vstack(vec![
                st.mat(&format!("{a}.q_proj.weight"), nq, h)?,
                st.mat(&format!("{a}.k_proj.weight"), nkv, h)?,
                st.mat(&format!("{a}.v_proj.weight"), nkv, h)?,
            ])?;
            let qkv_bias = if c.qkv_bias {
                let mut b = st.vec(&format!("{a}.q_proj.bias"), nq)?;
                b.extend(st.vec(&format!("{a}.k_proj.bias"), nkv)?);
                b.extend(st.vec(&format!("{a}.v_proj.bias"), nkv)?);
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
                o: st.mat(&format!("{a}.o_proj.weight"), h, nq)?,
                o_bias,
                qk_norm,
                mlp: load_mlp(c, st, i)?,
            });
        }
        let lm_head = if st.contains("lm_head.weight") && !c.tie_word_embeddings {
            Some(st.mat("lm_head.weight", c.vocab_size, h)?)
        } else if c.tie_word_embeddings || !st.contains("lm_head.weight") {
            None
        } else {
            Some(st.mat("lm_head.weight", c.vocab_size, h)?)
        };
        Ok(Self {
            norm: st.vec("model.norm.weight", h)?,
            embed,
            layers,
            lm_head,
            config,
        })
    }
}

fn ffn(st: &WeightStore, names: [String; 3], h: usize, inter: usize) -> Result<Ffn, EngineError> {
    let [gate, up, down] = names;
    Ok(Ffn {
        gate_up: Mat::vstack(vec![st.mat(&gate, inter, h)?, st.mat(&up, inter, h)?])?,
        down: st.mat(&down, h, inter)?,
        inter,
    })
}

fn proj_names(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}.gate_proj.weight"),
        format!("{prefix}.up_proj.weight"),
        format!("{prefix}.down_proj.weight"),
    ]
}

fn load_mlp(c: &ModelConfig, st: &WeightStore, i: usize) -> Result<Mlp, EngineError> {
    let h = c.hidden_size;
    let p = format!("model.layers.{i}");
    let Some(moe) = c.moe.as_ref().filter(|_| c.is_sparse_layer(i)) else {
        return Ok(Mlp::Dense(ffn(
            st,
            proj_names(&format!("{p}.mlp")),
            h,
            c.intermediate_size,
        )?));
    };
    let inter = moe.moe_intermediate_size;
    let (router_name, experts) = if c.architecture == Architecture::Mixtral {
        let b = format!("{p}.block_sparse_moe");
        let experts = (0..moe.num_experts)
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
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        (format!("{b}.gate.weight"), experts)
    } else {
        let experts = (0..moe.num_experts)
            .map(|e| ffn(st, proj_names(&format!("{p}.mlp.experts.{e}")), h, inter))
            .collect::<Result<Vec<_>, _>>()?;
        (format!("{p}.mlp.gate.weight"), experts)
    };
    let router = to_f32_mat(st.mat(&router_name, moe.num_experts, h)?);
    let shared = match moe.shared_expert_intermediate_size {
        Some(si) => Some((
            ffn(st, proj_names(&format!("{p}.mlp.shared_expert")), h, si)?,
            to_f32_mat(st.mat(&format!("{p}.mlp.shared_expert_gate.weight"), 1, h)?),
        )),
        None => None,
    };
    Ok(Mlp::Moe {
        router,
        experts,
        top_k: moe.num_experts_per_tok,
        norm_topk_prob: moe.norm_topk_prob,
        shared,
    })
}

fn to_f32_mat(m: Mat) -> Mat {
    match m.data {
        WeightData::F32(_) => m,
        WeightData::Bf16(_) => {
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
