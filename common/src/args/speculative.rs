//! `speculative_config`: speculative decoding, with trtllm-serve's keys and defaults.
//!
//! TensorRT-LLM picks one `DecodingBaseConfig` subclass by `decoding_type`; llmapi implements
//! `NGram` (prompt lookup: drafts copied from earlier text of the same request, or of any
//! request with `is_public_pool`) and `DraftTarget` (a smaller checkpoint with the same
//! vocabulary, `speculative_model_dir`, run greedily by the same worker, on rank 0 of a
//! tensor-parallel group). Every other type is refused by name before the keys of its
//! section are checked, so the message says what is supported rather than which key is
//! unknown.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sources::ArgsError;

/// The decoding types llmapi runs.
pub const SUPPORTED_DECODING_TYPES: &[&str] = &["NGram", "DraftTarget"];

/// Decoding types TensorRT-LLM knows and llmapi does not run (yet).
const KNOWN_UNSUPPORTED: &[&str] = &[
    "Draft_Target",
    "Eagle",
    "Eagle3",
    "MTP",
    "Medusa",
    "Lookahead",
    "User_Provided",
    "UserProvided",
    "AUTO",
    "SA",
    "PARD",
    "DFlash",
];

/// `speculative_config`: how drafts are proposed and verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    /// The drafting method: `NGram` or `DraftTarget`.
    pub decoding_type: String,
    /// Most draft tokens verified per step for one sequence (required, > 0, as in
    /// TensorRT-LLM's NGram validator).
    #[serde(default)]
    pub max_draft_len: Option<u32>,
    /// Longest suffix of the sequence looked up in the pool of n-grams (TensorRT-LLM's
    /// default: 2).
    #[serde(default = "default_max_matching_ngram_size")]
    pub max_matching_ngram_size: u32,
    /// Keep every continuation seen after a pattern (true), or only one per pattern.
    #[serde(default = "yes")]
    pub is_keep_all: bool,
    /// Of the continuations of a pattern, propose the oldest (true) or the newest.
    #[serde(default = "yes")]
    pub is_use_oldest: bool,
    /// One pool shared by every request (true), or one per request.
    #[serde(default = "yes")]
    pub is_public_pool: bool,
    /// `DraftTarget`: the draft checkpoint (a Hugging Face directory or a GGUF file, loaded
    /// like the target); required for DraftTarget, refused for NGram.
    #[serde(default, alias = "speculative_model")]
    pub speculative_model_dir: Option<String>,
}

fn default_max_matching_ngram_size() -> u32 {
    2
}

fn yes() -> bool {
    true
}

impl SpeculativeConfig {
    /// An NGram configuration with TensorRT-LLM's defaults and `max_draft_len` drafts.
    pub fn ngram(max_draft_len: u32) -> Self {
        Self {
            decoding_type: "NGram".into(),
            max_draft_len: Some(max_draft_len),
            max_matching_ngram_size: default_max_matching_ngram_size(),
            is_keep_all: true,
            is_use_oldest: true,
            is_public_pool: true,
            speculative_model_dir: None,
        }
    }

    /// A DraftTarget configuration: `max_draft_len` drafts a step from the checkpoint at
    /// `speculative_model_dir`.
    pub fn draft_target(max_draft_len: u32, speculative_model_dir: &str) -> Self {
        Self {
            decoding_type: "DraftTarget".into(),
            speculative_model_dir: Some(speculative_model_dir.into()),
            ..Self::ngram(max_draft_len)
        }
    }

    /// Whether drafts come from a draft model (`DraftTarget`).
    pub fn is_draft_target(&self) -> bool {
        self.decoding_type == "DraftTarget"
    }
}

/// Refuses a `speculative_config.decoding_type` llmapi does not run, naming what it runs;
/// called on each source document before its keys are checked.
pub(crate) fn refuse_unsupported(doc: &Value, source: &str) -> Result<(), ArgsError> {
    let Some(section) = doc.get("speculative_config") else {
        return Ok(());
    };
    if section.is_null() {
        return Ok(());
    }
    let supported = SUPPORTED_DECODING_TYPES.join(", ");
    // A document that only tunes the section (`--set speculative_config.max_draft_len=8`)
    // leaves decoding_type to an earlier source; the merged section must have one.
    let Some(t) = section.get("decoding_type") else {
        return Ok(());
    };
    let Some(t) = t.as_str() else {
        return Err(ArgsError::Invalid(format!(
            "{source}: speculative_config.decoding_type must be a string; supported: {supported}"
        )));
    };
    if SUPPORTED_DECODING_TYPES.contains(&t) {
        return Ok(());
    }
    let what = if KNOWN_UNSUPPORTED.contains(&t) {
        "is not implemented by llmapi"
    } else {
        "is not a decoding type"
    };
    Err(ArgsError::Invalid(format!(
        "{source}: speculative_config.decoding_type {t} {what}; supported: {supported} \
         (e.g. decoding_type: NGram, max_draft_len: 4; or decoding_type: DraftTarget, \
         max_draft_len: 4, speculative_model_dir: /path/to/draft)"
    )))
}

/// Checks the merged section: `max_draft_len` set and positive, `max_matching_ngram_size`
/// positive, `speculative_model_dir` set for DraftTarget (and only there). A DraftTarget
/// runs with any `tp_size`: in a tensor-parallel group the draft runs whole on rank 0.
pub(crate) fn check(c: &SpeculativeConfig) -> Result<(), ArgsError> {
    let bad = |m: String| Err(ArgsError::Invalid(m));
    match (c.is_draft_target(), c.speculative_model_dir.as_deref()) {
        (true, None | Some("")) => {
            return bad(
                "speculative_config.speculative_model_dir is required for DraftTarget: the draft \
                 checkpoint (a directory or a GGUF file with the target's vocabulary)"
                    .into(),
            );
        }
        (false, Some(_)) => {
            return bad(format!(
                "speculative_config.speculative_model_dir is for DraftTarget, not {}; remove it \
                 or set decoding_type: DraftTarget",
                c.decoding_type
            ));
        }
        _ => {}
    }
    match c.max_draft_len {
        None | Some(0) => {
            return bad(format!(
                "speculative_config.max_draft_len must be > 0 for {} (e.g. max_draft_len: 4)",
                c.decoding_type
            ));
        }
        Some(n) if n > 32 => {
            return bad(format!(
                "speculative_config.max_draft_len {n}: at most 32 drafts per step are verified; lower it"
            ));
        }
        Some(_) => {}
    }
    if c.max_matching_ngram_size == 0 {
        return bad(
            "speculative_config.max_matching_ngram_size must be > 0 (TensorRT-LLM's default: 2)"
                .into(),
        );
    }
    Ok(())
}
