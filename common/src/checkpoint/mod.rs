//! Built-in checkpoints: deterministic random-weight Llama-style models written in Hugging
//! Face layout (bf16 safetensors, config.json, tokenizer.json, tokenizer_config.json with a
//! chat template, generation_config.json), so that tests and benchmarks need no download.

pub(crate) mod tokenizer_train;
pub mod truncate;

use std::path::Path;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

pub use tokenizer_train::{BOS, END_OF_TEXT, EOT, SPECIAL_TOKENS};

/// Errors from writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The tokenizer could not be trained or saved.
    #[error("{0}")]
    Tokenizer(String),
    /// The weights could not be serialized.
    #[error("cannot serialize weights: {0}")]
    Safetensors(String),
    /// A source checkpoint cannot be used; the message says why and what to change.
    #[error("{0}")]
    Source(String),
}

/// The shape of a built-in checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Preset name (`demo`, `bench`).
    pub name: &'static str,
    /// Hidden size.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// MLP intermediate size.
    pub intermediate_size: usize,
    /// Model vocabulary (embedding rows); the tokenizer is trained to at most this size.
    pub vocab_size: usize,
    /// Tokenizer vocabulary trained.
    pub tokenizer_vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Standard deviation of the random weights.
    pub init_std: f32,
    /// RNG seed.
    pub seed: u64,
}

/// Names of the presets, for CLI help and errors.
pub const PRESET_NAMES: &[&str] = &["demo", "bench"];

impl Preset {
    /// Looks a preset up by name.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            // Tiny: a few MB, loads in milliseconds; for tests and the embedded default.
            "demo" => Some(Self {
                name: "demo",
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                intermediate_size: 192,
                vocab_size: 2048,
                tokenizer_vocab_size: 2048,
                rope_theta: 10_000.0,
                max_position_embeddings: 2048,
                init_std: 0.02,
                seed: 1,
            }),
            // Llama-3 style, about 124M parameters: the reference model of CPU benchmarks.
            "bench" => Some(Self {
                name: "bench",
                hidden_size: 768,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_key_value_heads: 4,
                intermediate_size: 2048,
                vocab_size: 32_000,
                tokenizer_vocab_size: 32_000,
                rope_theta: 500_000.0,
                max_position_embeddings: 4096,
                init_std: 0.02,
                seed: 2,
            }),
            _ => None,
        }
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Weight tensors in write order: (name, [rows, cols]); norms are 1-D.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_key_value_heads * self.head_dim();
        let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        t.push(("model.norm.weight".to_owned(), vec![h]));
        t.push(("lm_head.weight".to_owned(), vec![v, h]));
        t
    }

    /// Total parameter count.
    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// The chat template written into tokenizer_config.json: the Llama 3 layout, with a
/// hermes-style tools section (a system turn listing the tools when the request has some,
/// earlier calls as `<tool_call>` JSON, tool results in `<tool_response>`), so that
/// `--tool_parser hermes` can be tried on the built-in models. Without tools it renders
/// exactly the plain Llama 3 layout.
pub const CHAT_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}",
    "{{ 'Functions you may call, one JSON signature per line:\\n<tools>\\n' }}",
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}",
    "{{ '</tools>\\nTo call functions, answer with one <tool_call>{\"name\": ..., ",
    "\"arguments\": {...}}</tool_call> block per call.<|eot_id|>' }}{% endif %}",
    "{% for message in messages %}",
    "{% if message['role'] == 'tool' %}",
    "{{ '<|start_header_id|>tool<|end_header_id|>\\n\\n<tool_response>\\n' + (message['content'] | trim) + '\\n</tool_response><|eot_id|>' }}",
    "{% else %}",
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) }}",
    "{% for call in message['tool_calls'] or [] %}",
    "{{ '<tool_call>' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}{{ '</tool_call>' }}",
    "{% endfor %}{{ '<|eot_id|>' }}{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
);

/// Writes `preset` into `out` (created if needed). `progress(done, total)` is called as
/// parameters are generated.
pub fn write_checkpoint(
    preset: &Preset,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;

    let tokenizer =
        tokenizer_train::train(preset.tokenizer_vocab_size).map_err(CheckpointError::Tokenizer)?;
    let tok_path = out.join("tokenizer.json");
    tokenizer
        .save(&tok_path, true)
        .map_err(|e| CheckpointError::Tokenizer(format!("cannot save tokenizer.json: {e}")))?;
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let (bos, eot, end) = (id(BOS), id(EOT), id(END_OF_TEXT));

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "head_dim": preset.head_dim(),
        "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": preset.rope_theta,
        "rope_scaling": null,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": bos,
        "eos_token_id": [end, eot],
        "initializer_range": preset.init_std,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "llmapi_preset": preset.name,
    });
    let generation = json!({"bos_token_id": bos, "eos_token_id": [end, eot], "do_sample": false});
    let tokenizer_config = json!({
        "bos_token": BOS,
        "eos_token": EOT,
        "add_bos_token": true,
        "model_max_length": preset.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    for (name, value) in [
        ("config.json", &config),
        ("generation_config.json", &generation),
        ("tokenizer_config.json", &tokenizer_config),
    ] {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(io(&path))?;
    }

    let tensors = preset.tensors();
    let total = preset.parameters();
    let mut rng = ChaCha8Rng::seed_from_u64(preset.seed);
    let mut done = 0u64;
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let values: Vec<bf16> = if shape.len() == 1 {
            vec![bf16::ONE; n]
        } else {
            (0..n)
                .map(|_| bf16::from_f32(normal(&mut rng) * preset.init_std))
                .collect()
        };
        done += n as u64;
        progress(done, total);
        data.push((name, shape, bytemuck::cast_slice(&values).to_vec()));
    }
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| CheckpointError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = out.join("model.safetensors");
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    safetensors::serialize_to_file(views, metadata, &weights)
        .map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    Ok(())
}

/// A standard normal sample (Box-Muller), deterministic for a seeded generator.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}
