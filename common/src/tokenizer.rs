//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus the special
//! tokens named in `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use crate::model_dir::TokenizerConfig;

/// Errors from loading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// tokenizer.json is missing.
    #[error("no tokenizer.json in {dir}; pass --tokenizer DIR with a Hugging Face tokenizer.json")]
    Missing {
        /// The directory searched.
        dir: PathBuf,
    },
    /// tokenizer.json could not be parsed.
    #[error("cannot load tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the tokenizers crate said.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
}

/// A loaded tokenizer with its special tokens resolved to ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a file, with no special tokens known beyond the file's own.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Self::with_config(path, &TokenizerConfig::default())
    }

    /// Loads `DIR/tokenizer.json` and the special tokens of `DIR/tokenizer_config.json`.
    ///
    /// For a GGUF checkpoint (`gguf::locate`) the tokenizer is built from the file's
    /// `tokenizer.ggml.*` metadata.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let load = |e: &dyn std::fmt::Display| TokenizerError::Load {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(file) = crate::gguf::locate(dir).map_err(|e| load(&e))? {
            let g = crate::gguf::GgufFile::open(&file).map_err(|e| load(&e))?;
            let inner = g.tokenizer().map_err(|e| load(&e))?;
            return Ok(Self::with_inner(inner, &TokenizerConfig::from_gguf(&g)));
        }
        let config = TokenizerConfig::read(dir).map_err(|e| TokenizerError::Load {
            path: dir.join("tokenizer_config.json"),
            message: e.to_string(),
        })?;
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TokenizerError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        Self::with_config(&file, &config)
    }

    /// Loads a tokenizer.json file and resolves the special tokens named in `config`.
    pub fn with_config(path: &Path, config: &TokenizerConfig) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self::with_inner(inner, config))
    }

    /// Wraps `inner`, resolving the special tokens named in `config`.
    fn with_inner(inner: tokenizers::Tokenizer, config: &TokenizerConfig) -> Self {
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        Self {
            bos_token_id: id(&config.bos_token),
            eos_token_id: id(&config.eos_token),
            bos_token: config.bos_token.clone(),
            eos_token: config.eos_token.clone(),
            inner,
        }
    }

    /// Wraps an already built `tokenizers::Tokenizer`.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            bos_token_id: None,
            eos_token_id: None,
            bos_token: None,
            eos_token: None,
        }
    }

    /// Encodes text. `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS);
    /// pass false for text that already contains its special tokens, such as a rendered chat.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Decodes ids to text. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence token and its id, as tokenizer_config.json names it.
    pub fn bos(&self) -> Option<(&str, u32)> {
        Some((self.bos_token.as_deref()?, self.bos_token_id?))
    }

    /// The end-of-sequence token and its id, as tokenizer_config.json names it.
    pub fn eos(&self) -> Option<(&str, u32)> {
        Some((self.eos_token.as_deref()?, self.eos_token_id?))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
