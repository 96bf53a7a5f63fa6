//! GGUF metadata read as the Hugging Face files the serving path knows: the config.json
//! `{arch}.*` keys stand for, the special tokens and chat template of `tokenizer.*`, and the
//! ids that end generation.

use serde_json::{Value, json};

use super::{GgufError, GgufFile, MetaValue};

/// GGUF architectures the engine runs, with their Hugging Face class names.
pub const SUPPORTED: [(&str, &str); 4] = [
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
];

/// Whether llama.cpp's converter permuted the Q and K rows of this architecture for its
/// rotary layout (Llama and Mistral; Qwen checkpoints are written as they are).
pub fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

impl GgufFile {
    fn meta_err(&self, message: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            message,
        }
    }

    /// `general.architecture`, checked against [`SUPPORTED`].
    pub fn architecture(&self) -> Result<&str, GgufError> {
        let arch = self
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.meta_err("general.architecture is missing".into()))?;
        if SUPPORTED.iter().any(|(a, _)| *a == arch) {
            Ok(arch)
        } else {
            Err(self.meta_err(format!(
                "architecture '{arch}' is not supported for GGUF; supported: {}",
                SUPPORTED.map(|(a, _)| a).join(", ")
            )))
        }
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Option<u64> {
        self.get(&format!("{arch}.{key}"))
            .and_then(MetaValue::as_u64)
    }

    fn need_u64(&self, arch: &str, key: &str) -> Result<u64, GgufError> {
        self.arch_u64(arch, key).ok_or_else(|| {
            self.meta_err(format!(
                "{arch}.{key} is missing or not an unsigned integer"
            ))
        })
    }

    /// A token id of `tokenizer.ggml.{what}_token_id`.
    pub fn token_id(&self, what: &str) -> Option<u32> {
        self.get(&format!("tokenizer.ggml.{what}_token_id"))
            .and_then(MetaValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// The text of token `id` in `tokenizer.ggml.tokens`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.get("tokenizer.ggml.tokens")?
            .as_array()?
            .get(id as usize)?
            .as_str()
    }

    /// The config.json the metadata stands for, for the engine's `ModelConfig` to check.
    /// Rope scaling other than linear, and llama.cpp's per-frequency `rope_freqs` tensor,
    /// are refused by name.
    pub fn hf_config(&self) -> Result<Value, GgufError> {
        let arch = self.architecture()?;
        let class = SUPPORTED
            .iter()
            .find(|(a, _)| *a == arch)
            .map_or("", |(_, c)| c);
        let heads = self.need_u64(arch, "attention.head_count")?;
        let hidden = self.need_u64(arch, "embedding_length")?;
        let embd = self.tensor("token_embd.weight").ok_or_else(|| {
            self.meta_err("tensor token_embd.weight (the token embedding) is missing".into())
        })?;
        // The embedding's outer dimension is the vocabulary, also when the key is absent.
        let vocab = self
            .arch_u64(arch, "vocab_size")
            .or(embd.dims.get(1).copied())
            .unwrap_or(0);
        let eps = self
            .get(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(MetaValue::as_f64)
            .ok_or_else(|| {
                self.meta_err(format!(
                    "{arch}.attention.layer_norm_rms_epsilon is missing"
                ))
            })?;
        let mut c = json!({
            "architectures": [class],
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.need_u64(arch, "feed_forward_length")?,
            "num_hidden_layers": self.need_u64(arch, "block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_u64(arch, "attention.head_count_kv").unwrap_or(heads),
            "rms_norm_eps": eps,
            "rope_theta": self
                .get(&format!("{arch}.rope.freq_base"))
                .and_then(MetaValue::as_f64)
                .unwrap_or(10_000.0),
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "torch_dtype": "bfloat16",
        });
        let obj = c
            .as_object_mut()
            .ok_or_else(|| self.meta_err("config is not an object".into()))?;
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        if let Some(n) = self.arch_u64(arch, "context_length") {
            set("max_position_embeddings", json!(n));
        }
        if let Some(d) = self.arch_u64(arch, "attention.key_length") {
            set("head_dim", json!(d));
        }
        if matches!(arch, "llama" | "mistral") && self.tensor("blk.0.attn_q.bias").is_some() {
            set("attention_bias", json!(true));
        }
        if let Some(id) = self.token_id("bos") {
            set("bos_token_id", json!(id));
        }
        if let Some(id) = self.token_id("eos") {
            set("eos_token_id", json!(id));
        }
        if let Some(scaling) = self.rope_scaling(arch)? {
            set("rope_scaling", scaling);
        }
        Ok(c)
    }

    fn rope_scaling(&self, arch: &str) -> Result<Option<Value>, GgufError> {
        if self.tensor("rope_freqs.weight").is_some() {
            return Err(self.meta_err(
                "tensor rope_freqs.weight (llama.cpp's per-frequency rope factors, e.g. Llama 3.1) is not supported for GGUF; serve the Hugging Face checkpoint instead".into(),
            ));
        }
        let kind = self
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(MetaValue::as_str)
            .unwrap_or("none");
        let factor = self
            .get(&format!("{arch}.rope.scaling.factor"))
            .and_then(MetaValue::as_f64);
        match (kind, factor) {
            ("none", _) => Ok(None),
            ("linear", Some(f)) => Ok(Some(json!({"rope_type": "linear", "factor": f}))),
            (other, _) => Err(self.meta_err(format!(
                "{arch}.rope.scaling.type is '{other}' (factor {factor:?}); GGUF files are served with none or linear (with a factor) only"
            ))),
        }
    }

    /// Ids that end generation: `eos`, then `eot` and `eom` (end of turn, end of message)
    /// where they differ.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for what in ["eos", "eot", "eom"] {
            if let Some(id) = self.token_id(what)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
    }

    /// The model's name: the file name without `.gguf` (`general.name` is free text, often
    /// without the quantization or the fine-tune that the file name carries).
    pub fn model_name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}
