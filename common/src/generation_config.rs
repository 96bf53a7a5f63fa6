//! generation_config.json: the end-of-sequence ids and the sampling defaults a checkpoint's
//! authors recommend.
//!
//! Two uses, kept apart: the engine stops on `eos_token_id` merged with config.json's (always,
//! as transformers and vLLM do), and the router fills the sampling fields a request leaves
//! unset from `SamplingDefaults` (unless `--generation_config vllm`). Not for: applying them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model_dir::ModelDirError;

/// The file name inside a model directory.
pub const FILE_NAME: &str = "generation_config.json";

/// Where the sampling defaults of requests come from (`--generation_config`, vLLM's flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GenerationConfigMode {
    /// From the model directory's generation_config.json (vLLM's default).
    #[default]
    Auto,
    /// The server's own neutral defaults; generation_config.json's sampling fields are
    /// ignored (its eos_token_id still ends generation).
    Vllm,
}

/// Sampling defaults for fields a request leaves unset; `None` keeps the server's neutral
/// default. These are the fields vLLM takes from generation_config.json.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    /// `temperature` (0 is greedy).
    pub temperature: Option<f32>,
    /// `top_p`, in (0, 1].
    pub top_p: Option<f32>,
    /// `top_k`; 0 disables (generation_config.json's 0 or negative values).
    pub top_k: Option<u32>,
    /// `min_p`, in [0, 1].
    pub min_p: Option<f32>,
    /// `repetition_penalty` (> 0; 1 disables).
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`: the default `max_tokens` (transformers' name).
    pub max_tokens: Option<u32>,
}

impl SamplingDefaults {
    /// True when no field is set: requests get the server's own defaults.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The set fields as a JSON object, e.g. `{"temperature":0.6,"top_p":0.9}`, for the
    /// start-up log line.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        let float = |x: Option<f32>| x.map(|x| Value::from(f64::from(x)));
        put("temperature", float(self.temperature));
        put("top_p", float(self.top_p));
        put("top_k", self.top_k.map(Value::from));
        put("min_p", float(self.min_p));
        put("repetition_penalty", float(self.repetition_penalty));
        put("max_tokens", self.max_tokens.map(Value::from));
        Value::Object(m)
    }

    /// Logs, once at start, which defaults requests get (vLLM's message, in its spirit).
    pub fn log(&self, mode: GenerationConfigMode, dir: &Path) {
        match mode {
            GenerationConfigMode::Vllm => tracing::info!(
                "--generation_config vllm: requests that leave sampling fields unset get the server's defaults"
            ),
            GenerationConfigMode::Auto if self.is_empty() => {}
            GenerationConfigMode::Auto => tracing::info!(
                file = %dir.join(FILE_NAME).display(),
                "Default sampling parameters have been overridden by the model's generation config: {}; \
                 requests that set a field keep their value (--generation_config vllm turns this off)",
                self.to_json()
            ),
        }
    }
}

/// generation_config.json as read: its end-of-sequence ids, and the document whose sampling
/// fields are checked only when they are used (`sampling_defaults`), so that
/// `--generation_config vllm` serves a checkpoint whose sampling fields are out of range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// The file (it may not exist).
    pub path: PathBuf,
    /// `eos_token_id` (a number or a list), in file order.
    pub eos_token_ids: Vec<u32>,
    doc: Value,
}

impl GenerationConfig {
    /// A GGUF file's generation settings: it stops on the eos, eot and eom ids of
    /// `tokenizer.ggml.*` (the file carries no sampling defaults).
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Self {
        Self {
            path: file.path.clone(),
            eos_token_ids: file.stop_token_ids(),
            ..Self::default()
        }
    }

    /// Reads `DIR/generation_config.json`; a missing file gives the empty config.
    ///
    /// For a GGUF checkpoint (`gguf::locate`): [`Self::from_gguf`].
    pub fn read(dir: &Path) -> Result<Self, ModelDirError> {
        if let Some(file) = crate::gguf::locate(dir)? {
            return Ok(Self::from_gguf(&crate::gguf::GgufFile::open(&file)?));
        }
        let path = dir.join(FILE_NAME);
        if !path.is_file() {
            return Ok(Self {
                path,
                ..Self::default()
            });
        }
        let bad = |message: String| ModelDirError::Parse {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut eos_token_ids = Vec::new();
        push_token_ids(&mut eos_token_ids, doc.get("eos_token_id"));
        Ok(Self {
            path,
            eos_token_ids,
            doc,
        })
    }

    /// The sampling fields the file sets; Err names a field no request could carry.
    pub fn sampling_defaults(&self) -> Result<SamplingDefaults, ModelDirError> {
        SamplingDefaults::from_json(&self.doc).map_err(|m| ModelDirError::Parse {
            path: self.path.clone(),
            message: format!(
                "{m}; fix the file, or pass --generation_config vllm to ignore its sampling fields"
            ),
        })
    }

    /// The defaults requests get under `mode`: none for `vllm`, the file's for `auto`.
    pub fn sampling_defaults_for(
        &self,
        mode: GenerationConfigMode,
    ) -> Result<SamplingDefaults, ModelDirError> {
        match mode {
            GenerationConfigMode::Vllm => Ok(SamplingDefaults::default()),
            GenerationConfigMode::Auto => self.sampling_defaults(),
        }
    }
}

impl SamplingDefaults {
    /// The sampling fields of a parsed generation_config.json (vLLM's list: temperature,
    /// top_p, top_k, min_p, repetition_penalty, max_new_tokens; `do_sample` is ignored, as
    /// vLLM ignores it). Err names a field with a value no request could carry.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let float =
            |key: &str, ok: fn(f64) -> bool, expected: &str| -> Result<Option<f32>, String> {
                match v.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => match x.as_f64() {
                        Some(f) if ok(f) => Ok(Some(f as f32)),
                        _ => Err(format!("{key} is {x} but must be {expected}")),
                    },
                }
            };
        let top_k = match v.get("top_k") {
            None | Some(Value::Null) => None,
            Some(x) => match x.as_i64() {
                Some(k) if k <= 0 => Some(0),
                Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
                None => return Err(format!("top_k is {x} but must be an integer")),
            },
        };
        let max_tokens = match v.get("max_new_tokens") {
            None | Some(Value::Null) => None,
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                _ => {
                    return Err(format!(
                        "max_new_tokens is {x} but must be a positive integer"
                    ));
                }
            },
        };
        Ok(Self {
            temperature: float("temperature", |t| t >= 0.0, "at least 0")?,
            top_p: float("top_p", |p| p > 0.0 && p <= 1.0, "in (0, 1]")?,
            top_k,
            min_p: float("min_p", |p| (0.0..=1.0).contains(&p), "in [0, 1]")?,
            repetition_penalty: float("repetition_penalty", |r| r > 0.0, "greater than 0")?,
            max_tokens,
        })
    }
}

/// The ids that end generation: generation_config.json's `eos_token_id` then config.json's,
/// without repeats. Instruct checkpoints often list their end-of-turn token only in the
/// former (Llama 3's `<|eot_id|>`), so stopping on config.json's alone never ends a chat turn.
pub fn merged_eos_token_ids(generation: &[u32], config: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(generation.len() + config.len());
    for &id in generation.iter().chain(config) {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// Appends ids from a JSON value that is an integer or a list of integers, skipping repeats.
pub(crate) fn push_token_ids(out: &mut Vec<u32>, v: Option<&Value>) {
    let ids: Vec<u32> = match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    };
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir_with(text: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE_NAME), text).unwrap();
        d
    }

    #[test]
    fn sampling_fields_vllm_takes_are_read_and_others_ignored() {
        let d = dir_with(
            r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "repetition_penalty": 1.05, "min_p": 0.05, "max_new_tokens": 512,
                "eos_token_id": [151645, 151643], "num_beams": 1}"#,
        );
        let g = GenerationConfig::read(d.path()).unwrap();
        assert_eq!(g.eos_token_ids, vec![151645, 151643]);
        let s = g.sampling_defaults().unwrap();
        assert_eq!(
            s,
            SamplingDefaults {
                temperature: Some(0.7),
                top_p: Some(0.8),
                top_k: Some(20),
                min_p: Some(0.05),
                repetition_penalty: Some(1.05),
                max_tokens: Some(512),
            }
        );
        assert_eq!(
            s.to_json().as_object().map(|m| m.len()),
            Some(6),
            "{}",
            s.to_json()
        );
        assert_eq!(
            g.sampling_defaults_for(GenerationConfigMode::Auto).unwrap(),
            s
        );
        assert!(
            g.sampling_defaults_for(GenerationConfigMode::Vllm)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_file_without_sampling_fields_sets_no_defaults() {
        let s = SamplingDefaults::from_json(
            &json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": false}),
        )
        .unwrap();
        assert!(s.is_empty());
        assert_eq!(s.to_json(), json!({}));
    }

    #[test]
    fn non_positive_top_k_means_disabled() {
        let s = SamplingDefaults::from_json(&json!({"top_k": -1})).unwrap();
        assert_eq!(s.top_k, Some(0));
    }

    #[test]
    fn impossible_values_are_refused_with_the_field_named() {
        for (doc, field) in [
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"top_k": "many"}), "top_k"),
            (json!({"max_new_tokens": 0}), "max_new_tokens"),
        ] {
            let err = SamplingDefaults::from_json(&doc).unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn bad_sampling_fields_fail_only_where_used_and_name_the_way_out() {
        let d = dir_with(r#"{"temperature": -1, "eos_token_id": 9}"#);
        let g = GenerationConfig::read(d.path()).unwrap();
        assert_eq!(g.eos_token_ids, vec![9]);
        let err = g.sampling_defaults().unwrap_err().to_string();
        assert!(err.contains(FILE_NAME), "{err}");
        assert!(err.contains("--generation_config vllm"), "{err}");
        assert!(g.sampling_defaults_for(GenerationConfigMode::Vllm).is_ok());
        let broken = dir_with("{not json");
        assert!(GenerationConfig::read(broken.path()).is_err());
        let none = GenerationConfig::read(&d.path().join("absent")).unwrap();
        assert!(none.eos_token_ids.is_empty());
        assert!(none.sampling_defaults().unwrap().is_empty());
    }

    #[test]
    fn eos_ids_merge_generation_first_without_repeats() {
        assert_eq!(
            merged_eos_token_ids(&[128009, 128001], &[128001]),
            vec![128009, 128001]
        );
        assert_eq!(merged_eos_token_ids(&[], &[2]), vec![2]);
    }
}
