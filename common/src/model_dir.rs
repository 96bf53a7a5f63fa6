//! A Hugging Face model directory on local disk: config.json, the safetensors weights,
//! tokenizer.json, tokenizer_config.json (with chat_template.jinja / chat_template.json) and
//! generation_config.json.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::generation_config::{GenerationConfig, merged_eos_token_ids, push_token_ids};
use crate::gguf::{self, GgufError, GgufFile};
use crate::model_config::{Architecture, SUPPORTED_ARCHITECTURES};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Errors from opening a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// A hub id was given where a local directory is needed.
    #[error(
        "MODEL '{0}' is not a local directory. llmapi reads weights from a local directory only and never downloads; \
         fetch the model first (e.g. `huggingface-cli download {0} --local-dir DIR`) and pass DIR"
    )]
    HubId(String),
    /// The path does not exist or is not a directory.
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    /// A required file is missing.
    #[error("{file} is missing in model directory {dir}")]
    MissingFile {
        /// The directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
    /// A file could not be read or parsed.
    #[error("cannot read {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// config.json names an architecture the engine does not implement.
    #[error("{path}: architecture '{found}' is not supported; supported: {}", SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// config.json.
        path: PathBuf,
        /// What config.json says.
        found: String,
    },
    /// A GGUF checkpoint that cannot be read, or whose metadata the engine cannot use.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// No weights were found.
    #[error(
        "no weights in {0}: expected model.safetensors, or shards listed in model.safetensors.index.json"
    )]
    NoWeights(PathBuf),
}

/// Settings of a tokenizer directory that the serving path needs: tokenizer_config.json's
/// special tokens and the default chat template (found as `TokenizerConfig::read` says).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// The default chat template, if any.
    pub chat_template: Option<String>,
    /// The file `chat_template` was read from.
    pub chat_template_file: Option<PathBuf>,
}

/// The chat template file transformers (4.43 and later) saves beside tokenizer_config.json.
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
/// The legacy processor file holding `{"chat_template": "..."}`.
pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

impl TokenizerConfig {
    /// Reads `DIR/tokenizer_config.json` (missing: no special tokens) and the default chat
    /// template from the first of:
    /// 1. `chat_template.jinja`: transformers' tokenizer lets it clobber the config's entry;
    /// 2. tokenizer_config.json's `chat_template` (a string, or named templates: "default");
    /// 3. `chat_template.json`: older processors' file, which transformers' tokenizer never
    ///    reads; taken only when the tokenizer has no template of its own (a text-only
    ///    model's AutoProcessor is its tokenizer).
    ///
    /// For a GGUF checkpoint (`gguf::locate`), the special tokens and template come from
    /// the file's `tokenizer.*` metadata instead.
    pub fn read(dir: &Path) -> Result<Self, ModelDirError> {
        if let Some(file) = gguf::locate(dir)? {
            return Ok(Self::from_gguf(&GgufFile::open(&file)?));
        }
        let path = dir.join("tokenizer_config.json");
        let v = if path.is_file() {
            read_json(&path)?
        } else {
            Value::Null
        };
        // Special tokens are either a string or an AddedToken object {"content": ...}.
        let token = |key: &str| match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let jinja = dir.join(CHAT_TEMPLATE_JINJA);
        let legacy = dir.join(CHAT_TEMPLATE_JSON);
        let (chat_template, chat_template_file) = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| ModelDirError::Parse {
                path: jinja.clone(),
                message: e.to_string(),
            })?;
            (Some(text), Some(jinja))
        } else if let Some(t) = default_template(v.get("chat_template")) {
            (Some(t), Some(path))
        } else if legacy.is_file() {
            let t =
                default_template(read_json(&legacy)?.get("chat_template")).ok_or_else(|| {
                    ModelDirError::Parse {
                        path: legacy.clone(),
                        message:
                            "has no \"chat_template\" string; expected {\"chat_template\": \"...\"}"
                                .into(),
                    }
                })?;
            (Some(t), Some(legacy))
        } else {
            (None, None)
        };
        Ok(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
            chat_template_file,
        })
    }
}

impl TokenizerConfig {
    /// The special tokens (`tokenizer.ggml.bos/eos_token_id`) and `tokenizer.chat_template`
    /// of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Self {
        let token = |what: &str| {
            file.token_id(what)
                .and_then(|id| file.token_text(id))
                .map(String::from)
        };
        let chat_template = file.chat_template().map(String::from);
        Self {
            bos_token: token("bos"),
            eos_token: token("eos"),
            chat_template_file: chat_template.as_ref().map(|_| file.path.clone()),
            chat_template,
        }
    }
}

/// A `chat_template` value: a string, or a list of `{name, template}` whose "default" entry
/// (else the first) is the default template.
fn default_template(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

/// An opened, checked model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory as given.
    pub path: PathBuf,
    /// config.json as parsed JSON (the engine reads it into its typed config).
    pub config: Value,
    /// `architectures[0]` from config.json.
    pub architecture: String,
    /// `max_position_embeddings` from config.json.
    pub max_position_embeddings: Option<usize>,
    /// EOS ids from generation_config.json and config.json, deduplicated, in that order.
    pub eos_token_ids: Vec<u32>,
    /// generation_config.json (its sampling fields apply per `--generation_config`).
    pub generation_config: GenerationConfig,
    /// tokenizer_config.json settings and the chat template.
    pub tokenizer_config: TokenizerConfig,
    /// The safetensors files holding the weights.
    pub weight_files: Vec<PathBuf>,
}

impl ModelDir {
    /// Opens and checks a model directory.
    pub fn open(path: &Path) -> Result<Self, ModelDirError> {
        if !path.exists() {
            let s = path.to_string_lossy();
            if looks_like_hub_id(&s) {
                return Err(ModelDirError::HubId(s.into_owned()));
            }
        }
        if let Some(file) = gguf::locate(path)? {
            return Self::open_gguf(path, &file);
        }
        if !path.is_dir() {
            return Err(ModelDirError::NotADirectory(path.to_path_buf()));
        }
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(ModelDirError::MissingFile {
                dir: path.to_path_buf(),
                file: "config.json",
            });
        }
        let config = read_json(&config_path)?;
        let architecture = config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| ModelDirError::Parse {
                path: config_path.clone(),
                message: "missing \"architectures\" (e.g. [\"LlamaForCausalLM\"])".into(),
            })?
            .to_owned();
        if Architecture::from_hf_name(&architecture).is_none() {
            return Err(ModelDirError::UnsupportedArchitecture {
                path: config_path,
                found: architecture,
            });
        }
        let max_position_embeddings = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize);

        let generation_config = GenerationConfig::read(path)?;
        let mut config_eos = Vec::new();
        push_token_ids(&mut config_eos, config.get("eos_token_id"));
        let eos_token_ids = merged_eos_token_ids(&generation_config.eos_token_ids, &config_eos);

        Ok(Self {
            tokenizer_config: TokenizerConfig::read(path)?,
            weight_files: weight_files(path)?,
            path: path.to_path_buf(),
            config,
            architecture,
            max_position_embeddings,
            eos_token_ids,
            generation_config,
        })
    }

    /// A GGUF checkpoint (`file`, found at `path`): the config, special tokens, template
    /// and stop ids all come from the file's metadata.
    fn open_gguf(path: &Path, file: &Path) -> Result<Self, ModelDirError> {
        let g = GgufFile::open(file)?;
        let config = g.hf_config()?;
        let architecture = config["architectures"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let generation_config = GenerationConfig::from_gguf(&g);
        Ok(Self {
            path: path.to_path_buf(),
            max_position_embeddings: config
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize),
            eos_token_ids: generation_config.eos_token_ids.clone(),
            tokenizer_config: TokenizerConfig::from_gguf(&g),
            weight_files: vec![file.to_path_buf()],
            config,
            architecture,
            generation_config,
        })
    }

    /// The name the model is known by when no --served_model_name is given
    /// ([`default_model_name`]).
    pub fn default_name(&self) -> String {
        default_model_name(&self.path)
    }

    /// Loads this directory's tokenizer.
    pub fn tokenizer(&self) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_dir(&self.path)
    }
}

/// The name a model path is served under by default: a GGUF file's name without `.gguf`,
/// else the path's last component.
pub fn default_model_name(path: &Path) -> String {
    let name = if gguf::is_gguf_file(path) {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// True for strings shaped like a Hugging Face hub id (`org/name`) rather than a path.
fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && !s.starts_with('.')
        && !s.starts_with('~')
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn read_json(path: &Path) -> Result<Value, ModelDirError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelDirError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelDirError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The safetensors files of a directory: the shards of model.safetensors.index.json, or
/// model.safetensors, or every *.safetensors file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelDirError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelDirError::Parse {
                path: index.clone(),
                message: "missing \"weight_map\"".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelDirError::Parse {
                path: index,
                message: format!("lists shard {} which does not exist", missing.display()),
            });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelDirError::Parse {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelDirError::NoWeights(dir.to_path_buf()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn hub_ids_get_a_local_directory_only_error() {
        let err = ModelDir::open(Path::new("meta-llama/Llama-3.1-70B")).unwrap_err();
        assert!(matches!(err, ModelDirError::HubId(_)));
        assert!(err.to_string().contains("local directory only"), "{err}");
    }

    #[test]
    fn missing_config_is_named() {
        let d = dir_with(&[]);
        let err = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("config.json is missing"), "{err}");
    }

    #[test]
    fn unsupported_architecture_lists_supported_ones() {
        let d = dir_with(&[("config.json", r#"{"architectures":["GPT2LMHeadModel"]}"#)]);
        let err = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
        assert!(
            err.contains("LlamaForCausalLM, MistralForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn missing_weights_are_an_error() {
        let d = dir_with(&[("config.json", r#"{"architectures":["LlamaForCausalLM"]}"#)]);
        let err = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("no weights"), "{err}");
    }

    #[test]
    fn eos_ids_merge_generation_and_model_config() {
        let d = dir_with(&[
            (
                "config.json",
                r#"{"architectures":["LlamaForCausalLM"],"eos_token_id":5,"max_position_embeddings":64}"#,
            ),
            (
                "generation_config.json",
                r#"{"eos_token_id":[7,5],"temperature":0.6,"top_p":0.9}"#,
            ),
            ("model.safetensors", ""),
            (
                "tokenizer_config.json",
                r#"{"bos_token":{"content":"<s>"},"eos_token":"</s>","chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#,
            ),
        ]);
        let m = ModelDir::open(d.path()).unwrap();
        assert_eq!(m.eos_token_ids, vec![7, 5]);
        let sampling = m.generation_config.sampling_defaults().unwrap();
        assert_eq!(
            (sampling.temperature, sampling.top_p),
            (Some(0.6), Some(0.9))
        );
        assert_eq!(m.max_position_embeddings, Some(64));
        assert_eq!(m.tokenizer_config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(m.tokenizer_config.eos_token.as_deref(), Some("</s>"));
        assert_eq!(m.tokenizer_config.chat_template.as_deref(), Some("D"));
    }

    const IN_CONFIG: &str = r#"{"eos_token":"</s>","chat_template":"CONFIG"}"#;
    const IN_JSON: &str = r#"{"chat_template":"JSON"}"#;

    /// The template `TokenizerConfig::read` finds in a directory of `files`, and its file.
    fn template_of(files: &[(&str, &str)]) -> (Option<String>, Option<String>) {
        let d = dir_with(files);
        let c = TokenizerConfig::read(d.path()).unwrap();
        let file = c
            .chat_template_file
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned());
        (c.chat_template, file)
    }

    fn found(template: &str, file: &str) -> (Option<String>, Option<String>) {
        (Some(template.into()), Some(file.into()))
    }

    #[test]
    fn chat_template_jinja_alone_is_read() {
        assert_eq!(
            template_of(&[(CHAT_TEMPLATE_JINJA, "JINJA {{ messages }}")]),
            found("JINJA {{ messages }}", CHAT_TEMPLATE_JINJA)
        );
        // Beside a tokenizer_config.json without a template, the special tokens still count.
        let d = dir_with(&[
            ("tokenizer_config.json", r#"{"bos_token":"<s>"}"#),
            (CHAT_TEMPLATE_JINJA, "JINJA"),
        ]);
        let c = TokenizerConfig::read(d.path()).unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.chat_template.as_deref(), Some("JINJA"));
    }

    #[test]
    fn tokenizer_config_template_alone_is_read() {
        assert_eq!(
            template_of(&[("tokenizer_config.json", IN_CONFIG)]),
            found("CONFIG", "tokenizer_config.json")
        );
    }

    #[test]
    fn chat_template_json_alone_is_read() {
        assert_eq!(
            template_of(&[(CHAT_TEMPLATE_JSON, IN_JSON)]),
            found("JSON", CHAT_TEMPLATE_JSON)
        );
    }

    #[test]
    fn chat_template_jinja_wins_over_tokenizer_config_and_json() {
        let all = [
            ("tokenizer_config.json", IN_CONFIG),
            (CHAT_TEMPLATE_JINJA, "JINJA"),
            (CHAT_TEMPLATE_JSON, IN_JSON),
        ];
        assert_eq!(template_of(&all), found("JINJA", CHAT_TEMPLATE_JINJA));
        assert_eq!(template_of(&all[..2]), found("JINJA", CHAT_TEMPLATE_JINJA));
    }

    #[test]
    fn tokenizer_config_template_wins_over_chat_template_json() {
        assert_eq!(
            template_of(&[
                ("tokenizer_config.json", IN_CONFIG),
                (CHAT_TEMPLATE_JSON, IN_JSON)
            ]),
            found("CONFIG", "tokenizer_config.json")
        );
    }

    #[test]
    fn no_template_anywhere_is_none_and_a_bad_json_file_is_named() {
        assert_eq!(
            template_of(&[("tokenizer_config.json", r#"{"eos_token":"</s>"}"#)]),
            (None, None)
        );
        let d = dir_with(&[(CHAT_TEMPLATE_JSON, r#"{"template":"x"}"#)]);
        let err = TokenizerConfig::read(d.path()).unwrap_err().to_string();
        assert!(err.contains(CHAT_TEMPLATE_JSON), "{err}");
    }

    #[test]
    fn sharded_index_lists_missing_shards() {
        let d = dir_with(&[
            ("config.json", r#"{"architectures":["LlamaForCausalLM"]}"#),
            (
                "model.safetensors.index.json",
                r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
            ),
        ]);
        let err = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
    }
}
