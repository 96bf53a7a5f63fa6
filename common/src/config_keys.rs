//! What the engine does with each config.json key of the architectures it runs: the table
//! that docs/models.md shows, and the load-time refusals of values that would change the
//! forward pass beyond what the engine implements.
//!
//! A key is **used** (read and applied), **ignored** (it does not change the forward pass at
//! inference; the note says why), or **refused** (implemented for some values only; any other
//! value fails the load with a message naming the key and its value). Keys that are in no row
//! are collected as unknown and logged by the worker at load. Not for: parsing shapes
//! (`model_config`).

use serde_json::{Map, Value};

use crate::model_config::Architecture;

/// What the engine does with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Read and applied to the forward pass, the stopping rule or the limits.
    Used,
    /// Read by transformers but without effect on inference outputs.
    Ignored,
    /// Implemented for the values the note names; any other value fails the load.
    Refused,
}

impl Treatment {
    /// The word docs/models.md uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Used => "used",
            Self::Ignored => "ignored",
            Self::Refused => "refused",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigKey {
    /// The config.json key.
    pub key: &'static str,
    /// What the engine does with it.
    pub treatment: Treatment,
    /// How it is used, why ignoring it is harmless, or which values are accepted.
    pub note: &'static str,
}

const fn row(key: &'static str, treatment: Treatment, note: &'static str) -> ConfigKey {
    ConfigKey {
        key,
        treatment,
        note,
    }
}

use Treatment::{Ignored, Refused, Used};

/// Every key of the transformers config classes of the supported architectures (and of their
/// base class, with the older spellings still found on the Hub), in docs/models.md's order.
pub const CONFIG_KEYS: &[ConfigKey] = &[
    row(
        "architectures",
        Used,
        "picks the implementation; the first entry must be a supported class",
    ),
    row("model_type", Used, "logged"),
    row("vocab_size", Used, "embedding and lm_head rows"),
    row("hidden_size", Used, "residual width"),
    row(
        "intermediate_size",
        Used,
        "dense MLP width (Mixtral: each expert's width)",
    ),
    row("num_hidden_layers", Used, "decoder layers"),
    row("num_attention_heads", Used, "query heads"),
    row(
        "num_key_value_heads",
        Used,
        "KV heads (GQA / MQA); default: num_attention_heads",
    ),
    row(
        "head_dim",
        Used,
        "per-head width; default: hidden_size / num_attention_heads (Qwen3: 128, its class default)",
    ),
    row(
        "max_position_embeddings",
        Used,
        "default and upper bound of --max_seq_len",
    ),
    row(
        "rms_norm_eps",
        Used,
        "RMSNorm epsilon (default 1e-5 for Mixtral, 1e-6 otherwise, as transformers)",
    ),
    row(
        "rope_theta",
        Used,
        "RoPE base (older configs; current ones put it in rope_parameters)",
    ),
    row(
        "rope_scaling",
        Refused,
        "rope type default, linear and llama3 are implemented; any other type (yarn, dynamic, longrope, ...) and a partial_rotary_factor other than 1 fail the load",
    ),
    row(
        "rope_parameters",
        Refused,
        "as rope_scaling (its transformers >= 5 name, which also holds rope_theta)",
    ),
    row(
        "hidden_act",
        Refused,
        "silu (or its alias swish): the SwiGLU MLP; any other activation fails the load",
    ),
    row(
        "mlp_bias",
        Refused,
        "Llama: false; true (biases on gate/up/down) fails the load. Other classes have no MLP bias and transformers ignores the key",
    ),
    row(
        "attention_bias",
        Used,
        "Llama, Qwen3, Qwen3-MoE: biases on q/k/v and o_proj. Mistral, Mixtral, Qwen2 and Qwen2-MoE classes do not read it",
    ),
    row(
        "qkv_bias",
        Used,
        "Qwen2-MoE: biases on q/k/v (default true); Qwen2 always has them",
    ),
    row(
        "sliding_window",
        Used,
        "windowed attention on the CPU backend: a query at position i sees keys i - sliding_window + 1 ..= i (transformers' masks); KV blocks out of every layer's window are freed as a sequence grows. Mistral and Mixtral apply it to every layer when it is not null; an absent key means the class default, 4096 (Mixtral: none). 0 on a windowed layer fails the load. The CUDA backend has no windowed attention: it refuses a window shorter than --max_seq_len at start, naming the --max_seq_len that fits",
    ),
    row(
        "use_sliding_window",
        Used,
        "Qwen2, Qwen3 and their MoE classes: false turns the window off; true applies sliding_window to the layers max_window_layers / layer_types select (Qwen3-MoE: every layer)",
    ),
    row(
        "max_window_layers",
        Used,
        "Qwen2 / Qwen3: layers from this index on use the window; Qwen2-MoE: even-numbered layers below it (when use_sliding_window is true)",
    ),
    row(
        "layer_types",
        Refused,
        "Qwen2, Qwen3, Qwen2-MoE: full_attention or sliding_attention per layer (overrides max_window_layers); any other type fails the load. Mistral's class ignores it",
    ),
    row(
        "tie_word_embeddings",
        Used,
        "lm_head shares the embedding matrix",
    ),
    row("bos_token_id", Used, "beginning-of-sequence id"),
    row(
        "eos_token_id",
        Used,
        "end-of-sequence ids (a number or a list)",
    ),
    row(
        "num_local_experts",
        Used,
        "Mixtral (and Qwen3-MoE's current name): experts per sparse layer",
    ),
    row(
        "num_experts",
        Used,
        "Qwen2-MoE / Qwen3-MoE: experts per sparse layer (alias of num_local_experts)",
    ),
    row("num_experts_per_tok", Used, "experts chosen per token"),
    row(
        "norm_topk_prob",
        Used,
        "Qwen MoE: renormalize the chosen experts' weights (Mixtral always does)",
    ),
    row(
        "moe_intermediate_size",
        Used,
        "Qwen MoE: each expert's width",
    ),
    row(
        "shared_expert_intermediate_size",
        Used,
        "Qwen2-MoE: the gated shared expert's width (0: none)",
    ),
    row(
        "decoder_sparse_step",
        Used,
        "Qwen MoE: every n-th layer is sparse",
    ),
    row(
        "mlp_only_layers",
        Used,
        "Qwen MoE: layers that keep a dense MLP",
    ),
    row(
        "quantization_config",
        Refused,
        "absent: the engine reads bf16, f16 and f32 tensors; any quantization (fp8, AWQ, GPTQ, bitsandbytes, ...) fails the load",
    ),
    row(
        "dtype",
        Ignored,
        "each tensor's dtype comes from the safetensors header; the compute dtype is --dtype",
    ),
    row("torch_dtype", Ignored, "older name of dtype"),
    row(
        "pretraining_tp",
        Ignored,
        "transformers splits the projections into this many slices and sums them: the same product",
    ),
    row("attention_dropout", Ignored, "dropout is off at inference"),
    row(
        "initializer_range",
        Ignored,
        "initializes weights that are not in the checkpoint; all are",
    ),
    row(
        "pad_token_id",
        Ignored,
        "padding_idx only zeroes that row's gradient in training",
    ),
    row(
        "use_cache",
        Ignored,
        "whether transformers keeps a KV cache; the engine always does, with the same result",
    ),
    row(
        "output_router_logits",
        Ignored,
        "adds the router logits to the Python outputs for training",
    ),
    row(
        "router_aux_loss_coef",
        Ignored,
        "weight of the load-balancing loss in training",
    ),
    row(
        "router_jitter_noise",
        Ignored,
        "Mixtral applies the noise only in training mode",
    ),
    row("transformers_version", Ignored, "metadata"),
    row("_name_or_path", Ignored, "metadata"),
    row(
        "output_hidden_states",
        Ignored,
        "what the Python call returns, not the math",
    ),
    row(
        "output_attentions",
        Ignored,
        "what the Python call returns, not the math",
    ),
    row(
        "return_dict",
        Ignored,
        "what the Python call returns, not the math",
    ),
    row(
        "chunk_size_feed_forward",
        Ignored,
        "chunking the MLP over positions gives the same result",
    ),
    row(
        "is_encoder_decoder",
        Ignored,
        "the causal-LM classes of these architectures are decoder-only whatever it says",
    ),
    row(
        "id2label",
        Ignored,
        "labels of classification heads, which a causal LM has none of",
    ),
    row(
        "label2id",
        Ignored,
        "labels of classification heads, which a causal LM has none of",
    ),
    row(
        "problem_type",
        Ignored,
        "loss choice of classification heads",
    ),
    row(
        "tokenizer_class",
        Ignored,
        "the router reads the tokenizer files themselves",
    ),
];

/// The row of `key`, if the table has one.
pub fn config_key(key: &str) -> Option<&'static ConfigKey> {
    CONFIG_KEYS.iter().find(|k| k.key == key)
}

/// Keys of `obj` that no row of the table names.
pub fn unknown_keys(obj: &Map<String, Value>) -> Vec<String> {
    obj.keys()
        .filter(|k| config_key(k).is_none())
        .cloned()
        .collect()
}

/// Layers that attend over a window of recent positions instead of the whole sequence, as
/// transformers' config class for the architecture derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingWindow {
    /// A query at position i sees keys at positions i - window + 1 ..= i.
    pub window: usize,
    /// The windowed layers, ascending.
    pub layers: Vec<usize>,
    /// The keys that set it, with their values, for messages.
    pub origin: String,
}

fn shown(v: &Value) -> String {
    v.to_string()
}

/// Checks the keys of `obj` whose values the engine implements only in part (the `Refused`
/// rows, except the rope ones, which `model_config` reads) and returns the sliding window,
/// if any layer has one; `Err` names the key, its value and what to change.
pub fn check_refused(
    arch: Architecture,
    obj: &Map<String, Value>,
    num_layers: usize,
) -> Result<Option<SlidingWindow>, String> {
    if let Some(v) = obj.get("hidden_act")
        && !matches!(v.as_str(), Some("silu" | "swish"))
    {
        return Err(format!(
            "hidden_act is {}; the engine implements silu (SwiGLU) only, so this model cannot be served",
            shown(v)
        ));
    }
    if arch == Architecture::Llama
        && let Some(v) = obj.get("mlp_bias")
        && !matches!(v, Value::Null | Value::Bool(false))
    {
        return Err(format!(
            "mlp_bias is {}; the engine implements MLPs without biases only (mlp_bias false)",
            shown(v)
        ));
    }
    if let Some(v) = obj.get("quantization_config")
        && !v.is_null()
    {
        let method = v
            .get("quant_method")
            .map_or_else(|| shown(v), |m| format!("{{\"quant_method\": {m}, ...}}"));
        return Err(format!(
            "quantization_config is {method}; the engine reads unquantized bf16, f16 or f32 checkpoints only"
        ));
    }
    sliding_window(arch, obj, num_layers)
}

fn sliding_window(
    arch: Architecture,
    obj: &Map<String, Value>,
    num_layers: usize,
) -> Result<Option<SlidingWindow>, String> {
    use Architecture as A;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    // An absent key takes the config class's default (4096, Mixtral none); null means none.
    let window = match obj.get("sliding_window") {
        None if arch == A::Mixtral => None,
        None => Some(4096),
        Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            format!(
                "sliding_window is {}; it must be a non-negative integer or null",
                shown(v)
            )
        })? as usize),
    };
    let layer_types = match get("layer_types") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(format!(
                        "layer_types holds {}; the engine implements full_attention and sliding_attention only",
                        shown(t)
                    )),
                })
                .collect::<Result<Vec<bool>, String>>()?,
        ),
        Some(v) => return Err(format!("layer_types is {}; it must be a list", shown(v))),
    };
    let use_window = match get("use_sliding_window") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            format!(
                "use_sliding_window is {}; it must be true or false",
                shown(v)
            )
        })?,
    };
    let max_window_layers = match get("max_window_layers") {
        None => 28, // transformers' default for every class that has the key
        Some(v) => v.as_u64().ok_or_else(|| {
            format!(
                "max_window_layers is {}; it must be a non-negative integer",
                shown(v)
            )
        })? as usize,
    };
    // Mistral's config class warns about layer_types and ignores it; Llama has no window;
    // the Qwen classes apply the window only with use_sliding_window.
    let window = match arch {
        A::Llama => None,
        A::Mistral | A::Mixtral => window,
        A::Qwen2 | A::Qwen3 | A::Qwen2Moe | A::Qwen3Moe => window.filter(|_| use_window),
    };
    let Some(window) = window else {
        return Ok(None);
    };
    let windowed = |l: usize| match (arch, &layer_types) {
        (A::Qwen2 | A::Qwen3 | A::Qwen2Moe, Some(types)) => types.get(l).copied().unwrap_or(false),
        (A::Qwen2 | A::Qwen3, None) => l >= max_window_layers,
        (A::Qwen2Moe, None) => l.is_multiple_of(2) && l < max_window_layers,
        _ => true,
    };
    let layers: Vec<usize> = (0..num_layers).filter(|&l| windowed(l)).collect();
    let mut origin = format!("sliding_window {window}");
    if !matches!(arch, A::Mistral | A::Mixtral) {
        for key in ["use_sliding_window", "max_window_layers", "layer_types"] {
            if let Some(v) = get(key) {
                origin.push_str(&format!(", {key} {}", shown(v)));
            }
        }
    }
    if window == 0 && !layers.is_empty() {
        return Err(format!(
            "config.json sets {origin} on {} layer(s); a window of 0 positions lets a query see \
             no key at all (transformers' masks give NaN), so this model cannot be served: set \
             sliding_window to null or a positive window",
            layers.len()
        ));
    }
    Ok((!layers.is_empty()).then_some(SlidingWindow {
        window,
        layers,
        origin,
    }))
}

impl SlidingWindow {
    /// Whether `layer` attends over the window (else over the whole sequence).
    pub fn applies_to(&self, layer: usize) -> bool {
        self.layers.binary_search(&layer).is_ok()
    }

    /// For a backend without windowed attention (`backend`, e.g. cuda): refuses a window that does not cover
    /// `max_seq_len` positions. Attending over the whole sequence equals windowed attention
    /// only when no sequence is longer than the window.
    pub fn check_full_attention_covers(
        &self,
        backend: &str,
        max_seq_len: usize,
    ) -> Result<(), String> {
        if self.window >= max_seq_len {
            return Ok(());
        }
        let n = self.layers.len();
        Err(format!(
            "config.json sets {} (a window on {n} layer{}) but max_seq_len is {max_seq_len}; \
             the {backend} backend does not implement windowed attention, so sequences may only \
             be as long as the window there: pass --max_seq_len {} or lower, or serve with --backend cpu",
            self.origin,
            if n == 1 { "" } else { "s" },
            self.window
        ))
    }
}
