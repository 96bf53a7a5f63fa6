//! Typed view of a Hugging Face `config.json` for the decoder-only architectures the engine runs.
//!
//! Accepts configs written by older transformers (`torch_dtype`, top-level `rope_theta`,
//! `rope_scaling.type`) and current ones (`dtype`, `rope_scaling.rope_type`,
//! `rope_parameters`). Not for: weights, tokenizers or chat templates.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config_keys::{self, SlidingWindow};
use crate::gguf::{self, GgufError, GgufFile};

/// The architectures the engine implements, chosen by `architectures[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2/3.x).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v projections carry a bias.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on q and k per head.
    Qwen3,
    /// `MixtralForCausalLM`: sparse MoE, top-k always renormalized.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: sparse MoE with an optional gated shared expert.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: sparse MoE with q/k norm.
    Qwen3Moe,
}

/// Names of the supported `architectures` entries, in the order of [`Architecture`].
pub const SUPPORTED_ARCHITECTURES: [&str; 7] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
];

impl Architecture {
    /// Parses a Hugging Face architecture class name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "MixtralForCausalLM" => Self::Mixtral,
            "Qwen2MoeForCausalLM" => Self::Qwen2Moe,
            "Qwen3MoeForCausalLM" => Self::Qwen3Moe,
            _ => return None,
        })
    }

    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        SUPPORTED_ARCHITECTURES[self as usize]
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// Llama 3.x wavelength-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength bound (in units of the original context) for scaled frequencies.
        low_freq_factor: f64,
        /// Wavelength bound for unscaled frequencies.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Mixture-of-experts settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// Whether the chosen experts' routing weights are renormalized to sum to one.
    pub norm_topk_prob: bool,
    /// Hidden size of one expert's FFN.
    pub moe_intermediate_size: usize,
    /// Hidden size of the shared expert (Qwen2-MoE); None when absent.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Every `decoder_sparse_step`-th layer is sparse.
    pub decoder_sparse_step: usize,
    /// Layers that keep a dense MLP.
    pub mlp_only_layers: Vec<usize>,
}

/// A parsed and checked model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which implementation runs the model.
    pub architecture: Architecture,
    /// `model_type` as written, for logs.
    pub model_type: String,
    /// Vocabulary rows of the embedding and lm_head.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Dense MLP hidden size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads, MQA when one).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// The output projection has a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm over each q and k head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// MoE settings for sparse architectures.
    pub moe: Option<MoeConfig>,
    /// Checkpoint dtype as declared (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<String>,
    /// End-of-sequence token ids (`eos_token_id` may be a number or a list).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Windowed attention, when some layer has it ([`ModelConfig::attention_window`]).
    pub sliding_window: Option<SlidingWindow>,
    /// Keys that `config_keys::CONFIG_KEYS` does not know (logged at load).
    pub unknown_keys: Vec<String>,
}

/// Why a config.json could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    /// The file could not be read.
    #[error(
        "cannot read {path}: {source}; pass a Hugging Face model directory containing config.json"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A required field is absent or has the wrong type.
    #[error("{path}: field `{field}` is missing or not {expected}; add it to config.json")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// The expected JSON type.
        expected: &'static str,
    },
    /// The architecture is not implemented.
    #[error("{path}: architecture `{found}` is not supported; supported: {}", SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The `architectures` entry found.
        found: String,
    },
    /// Shapes or values that cannot describe a working model.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A GGUF checkpoint that cannot be read, or whose metadata the engine cannot use.
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

impl ModelConfig {
    /// Reads and checks `<dir>/config.json`, or the config a GGUF checkpoint's metadata
    /// stands for when `dir` is a `.gguf` file or a directory holding one (`gguf::locate`).
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelConfigError> {
        if let Some(file) = gguf::locate(dir)? {
            let config = GgufFile::open(&file)?.hf_config()?;
            return Self::from_json_str(&config.to_string(), &file);
        }
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and checks a config.json file.
    pub fn from_file(path: &Path) -> Result<Self, ModelConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ModelConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Some(obj) = value.as_object() else {
            return Err(invalid(path, "the top level must be a JSON object".into()));
        };
        Parser { path, obj }.parse()
    }

    /// For a backend without windowed attention (CUDA): refuses a `max_seq_len` that a
    /// sliding window does not cover. The message names the window and the fix.
    pub fn check_full_attention_covers(
        &self,
        backend: &str,
        max_seq_len: usize,
    ) -> Result<(), String> {
        match &self.sliding_window {
            Some(w) => w.check_full_attention_covers(backend, max_seq_len),
            None => Ok(()),
        }
    }

    /// The sliding window of `layer` (a query at position i sees keys at i - window + 1 ..= i),
    /// or None when the layer attends over the whole sequence.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|w| w.applies_to(layer))
            .map(|w| w.window)
    }

    /// The window every layer shares, when every layer is windowed: positions before
    /// `next - window + 1` are then never read again by a query at `next` or later, so their
    /// KV blocks can be freed. None when some layer attends over the whole sequence.
    pub fn window_of_every_layer(&self) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|w| w.layers.len() == self.num_hidden_layers)
            .map(|w| w.window)
    }

    /// True when layer `layer` uses the sparse MoE block rather than a dense MLP.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        match &self.moe {
            None => false,
            Some(moe) => {
                !moe.mlp_only_layers.contains(&layer)
                    && moe.num_experts > 0
                    && (layer + 1).is_multiple_of(moe.decoder_sparse_step.max(1))
            }
        }
    }
}

fn invalid(path: &Path, message: String) -> ModelConfigError {
    ModelConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    }
}

struct Parser<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Parser<'_> {
    fn field_err(&self, field: &str, expected: &'static str) -> ModelConfigError {
        ModelConfigError::Field {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            expected,
        }
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ModelConfigError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.field_err(field, "a non-negative integer")),
        }
    }

    fn usize(&self, field: &str) -> Result<usize, ModelConfigError> {
        self.opt_usize(field)?
            .ok_or_else(|| self.field_err(field, "a non-negative integer"))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>, ModelConfigError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.field_err(field, "a number")),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ModelConfigError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.field_err(field, "true or false")),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ModelConfigError> {
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.field_err(field, "a token id or list of ids")))
                .collect(),
            Some(v) => as_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.field_err(field, "a token id or list of ids")),
        }
    }

    fn architecture(&self) -> Result<Architecture, ModelConfigError> {
        let found = match self.obj.get("architectures") {
            Some(Value::Array(items)) => items.first().and_then(Value::as_str),
            _ => None,
        };
        let Some(found) = found else {
            return Err(self.field_err("architectures", "a list of class names"));
        };
        Architecture::from_hf_name(found).ok_or_else(|| ModelConfigError::UnsupportedArchitecture {
            path: self.path.to_path_buf(),
            found: found.to_string(),
        })
    }

    /// `rope_parameters` (transformers >= 5) or `rope_scaling` (older), either may be absent.
    fn rope(&self) -> Result<(f64, Option<RopeScaling>), ModelConfigError> {
        let found = ["rope_parameters", "rope_scaling"]
            .into_iter()
            .find_map(|k| self.obj.get(k).and_then(Value::as_object).map(|p| (k, p)));
        let params = found.map(|(_, p)| p);
        let key = found.map_or("rope_scaling", |(k, _)| k);
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.opt_f64("rope_theta")?)
            .unwrap_or(10_000.0);
        let Some(p) = params else {
            return Ok((theta, None));
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| p.get(k).and_then(Value::as_f64);
        let need =
            |k: &str| num(k).ok_or_else(|| self.field_err(&format!("{key}.{k}"), "a number"));
        if let Some(f) = p.get("partial_rotary_factor").filter(|v| !v.is_null())
            && f.as_f64() != Some(1.0)
        {
            return Err(invalid(
                self.path,
                format!(
                    "{key}.partial_rotary_factor is {f}; the engine rotates the whole head (1.0) only"
                ),
            ));
        }
        let scaling = match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: need("factor")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?
                    as usize,
            }),
            other => {
                return Err(invalid(
                    self.path,
                    format!(
                        "{key}.rope_type is \"{other}\"; the engine implements default, linear and llama3 only"
                    ),
                ));
            }
        };
        Ok((theta, scaling))
    }

    fn moe(&self, arch: Architecture) -> Result<Option<MoeConfig>, ModelConfigError> {
        if !matches!(
            arch,
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe
        ) {
            return Ok(None);
        }
        // Older Qwen-MoE configs say num_experts, current transformers num_local_experts.
        let experts_key = ["num_local_experts", "num_experts"]
            .into_iter()
            .find(|k| self.obj.get(*k).is_some_and(|v| !v.is_null()))
            .unwrap_or("num_local_experts");
        let num_experts = self.usize(experts_key)?;
        let num_experts_per_tok = self.usize("num_experts_per_tok")?;
        if num_experts_per_tok == 0 || num_experts_per_tok > num_experts {
            return Err(invalid(
                self.path,
                format!(
                    "num_experts_per_tok is {num_experts_per_tok} but {experts_key} is {num_experts}; it must be between 1 and {experts_key}"
                ),
            ));
        }
        let is_mixtral = arch == Architecture::Mixtral;
        let moe_intermediate_size = if is_mixtral {
            self.usize("intermediate_size")?
        } else {
            self.usize("moe_intermediate_size")?
        };
        let shared = match arch {
            Architecture::Qwen2Moe => self
                .opt_usize("shared_expert_intermediate_size")?
                .filter(|&n| n > 0),
            _ => None,
        };
        let mlp_only_layers = match self.obj.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.field_err("mlp_only_layers", "a list of layer indices"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(self.field_err("mlp_only_layers", "a list of layer indices")),
        };
        Ok(Some(MoeConfig {
            num_experts,
            num_experts_per_tok,
            // Mixtral always renormalizes the chosen experts' weights.
            norm_topk_prob: is_mixtral || self.opt_bool("norm_topk_prob")?.unwrap_or(false),
            moe_intermediate_size,
            shared_expert_intermediate_size: shared,
            decoder_sparse_step: if is_mixtral {
                1
            } else {
                self.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1)
            },
            mlp_only_layers,
        }))
    }

    fn parse(&self) -> Result<ModelConfig, ModelConfigError> {
        let architecture = self.architecture()?;
        let hidden_size = self.usize("hidden_size")?;
        let num_attention_heads = self.usize("num_attention_heads")?;
        let num_key_value_heads = self
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(invalid(
                self.path,
                "num_attention_heads and num_key_value_heads must be at least 1".into(),
            ));
        }
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            // Qwen3Config's default; the other classes derive it.
            None if architecture == Architecture::Qwen3 => 128,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(invalid(
                        self.path,
                        format!(
                            "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}; fix one or set head_dim explicitly"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                self.path,
                format!(
                    "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
                ),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid(
                self.path,
                format!("head_dim {head_dim} must be even and positive for RoPE"),
            ));
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let num_hidden_layers = self.usize("num_hidden_layers")?;
        let attention_bias = self.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 always has q/k/v bias and no o bias.
            Architecture::Qwen2 => (true, false),
            // transformers' Qwen2-MoE reads qkv_bias (default true) and never biases o_proj.
            Architecture::Qwen2Moe => (self.opt_bool("qkv_bias")?.unwrap_or(true), false),
            // attention_bias puts a bias on q, k, v and o_proj alike.
            Architecture::Llama | Architecture::Qwen3 | Architecture::Qwen3Moe => {
                (attention_bias, attention_bias)
            }
            Architecture::Mistral | Architecture::Mixtral => (false, false),
        };
        let dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| self.obj.get(*k).and_then(Value::as_str))
            .map(str::to_string);
        let config = ModelConfig {
            architecture,
            model_type: self
                .obj
                .get("model_type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.opt_usize("intermediate_size")?.unwrap_or(0),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            // transformers' defaults: MixtralConfig 1e-5, the others 1e-6.
            rms_norm_eps: self.opt_f64("rms_norm_eps")?.unwrap_or(
                if architecture == Architecture::Mixtral {
                    1e-5
                } else {
                    1e-6
                },
            ),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Qwen3Moe),
            moe: self.moe(architecture)?,
            dtype,
            eos_token_ids: self.token_ids("eos_token_id")?,
            bos_token_id: self.token_ids("bos_token_id")?.first().copied(),
            sliding_window: config_keys::check_refused(architecture, self.obj, num_hidden_layers)
                .map_err(|m| invalid(self.path, m))?,
            unknown_keys: config_keys::unknown_keys(self.obj),
        };
        let needs_dense = (0..config.num_hidden_layers).any(|l| !config.is_sparse_layer(l));
        if config.vocab_size == 0 || config.hidden_size == 0 || config.num_hidden_layers == 0 {
            return Err(invalid(
                self.path,
                "vocab_size, hidden_size and num_hidden_layers must be positive".into(),
            ));
        }
        if needs_dense && config.intermediate_size == 0 {
            return Err(self.field_err("intermediate_size", "a positive integer"));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ModelConfigError> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    #[test]
    fn llama3_config_with_rope_scaling_parses() {
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,"vocab_size":100,
            "rope_theta":500000.0,"torch_dtype":"bfloat16","eos_token_id":[1,2],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(c.rope_theta, 500000.0);
    }

    #[test]
    fn current_transformers_rope_parameters_and_dtype_are_read() {
        let c = parse(
            r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,
            "vocab_size":100,"dtype":"float32","rope_parameters":{"rope_type":"default","rope_theta":1e6}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.head_dim, 32);
        assert!(c.qk_norm);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn unsupported_architecture_lists_supported_ones() {
        let e = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("GPT2LMHeadModel") && msg.contains("Qwen3MoeForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn heads_not_multiple_of_kv_heads_is_an_error() {
        let e = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":8,"num_key_value_heads":3,"vocab_size":10}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads 3"), "{e}");
    }

    #[test]
    fn qwen2_moe_sparse_layers_follow_step_and_mlp_only_layers() {
        let c = parse(
            r#"{"architectures":["Qwen2MoeForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":4,"num_attention_heads":4,"vocab_size":10,"num_experts":4,
            "num_experts_per_tok":2,"moe_intermediate_size":32,"shared_expert_intermediate_size":64,
            "decoder_sparse_step":2,"mlp_only_layers":[3]}"#,
        )
        .unwrap();
        let sparse: Vec<bool> = (0..4).map(|l| c.is_sparse_layer(l)).collect();
        assert_eq!(sparse, vec![false, true, false, false]);
        assert!(c.qkv_bias);
        assert_eq!(c.moe.unwrap().shared_expert_intermediate_size, Some(64));
    }

    #[test]
    fn missing_field_names_the_field() {
        let e = parse(r#"{"architectures":["MistralForCausalLM"],"hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
    }
}
