//! The tokenizer as the benchmark needs it: count prompt and output tokens, decode random ids.
//!
//! The real one is `llmapi_common::tokenizer::Tokenizer` loaded from the model directory's
//! tokenizer.json; the [`TokenCodec`] trait keeps datasets and metrics testable with a small
//! double.

use std::path::Path;

use llmapi_common::tokenizer::Tokenizer;

use crate::metrics::OutputTokenCounter;

/// Encoding, decoding and the vocabulary size.
pub trait TokenCodec: Send + Sync {
    /// Token ids of `text`, with the model's special tokens (BOS) when `add_special_tokens`.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    /// Text of `ids`.
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
    /// Vocabulary size without added tokens, the range random ids are drawn from.
    fn vocab_size(&self) -> usize;
}

impl TokenCodec for Tokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        Tokenizer::encode(self, text, add_special_tokens).map_err(|e| e.to_string())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        Tokenizer::decode(self, ids, false).map_err(|e| e.to_string())
    }

    fn vocab_size(&self) -> usize {
        Tokenizer::vocab_size(self)
    }
}

/// Adapts any codec to the output-token counter the metrics need.
pub struct CodecCounter<'a>(pub &'a dyn TokenCodec);

impl OutputTokenCounter for CodecCounter<'_> {
    fn count_tokens(&self, text: &str) -> u64 {
        self.0
            .encode(text, false)
            .map(|ids| ids.len() as u64)
            .unwrap_or(0)
    }
}

/// Loads the tokenizer from a model directory, a GGUF file (its `tokenizer.ggml.*`
/// metadata) or a tokenizer.json path.
pub fn load(id: &str) -> Result<Tokenizer, String> {
    let path = Path::new(id);
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    let loaded = if path.is_dir() || is_gguf {
        Tokenizer::from_dir(path)
    } else if path.is_file() {
        Tokenizer::from_file(path)
    } else {
        return Err(format!(
            "tokenizer '{id}' is not a local directory or tokenizer.json file (nothing is \
             downloaded); pass --tokenizer DIR, or --model DIR with the model's directory or \
             GGUF file"
        ));
    };
    loaded.map_err(|e| format!("cannot load the tokenizer from '{id}': {e}"))
}
