//! The pre-tokenizer a byte-level BPE vocabulary's `tokenizer.ggml.pre` names.
//!
//! llama.cpp's converter records which model family's splitting rule a `gpt2` vocabulary was
//! trained with, and llama.cpp splits text by that rule before merging. The same rule as a
//! `tokenizers` pre-tokenizer is what the original `tokenizer.json` of that family holds:
//! - GPT-2 style (`gpt-2`, `default`, absent): the byte-level regex alone;
//! - Llama 3 style (`llama-bpe`, `llama3`, ...): a case-insensitive-contractions regex that
//!   keeps numbers to at most 3 digits, then the byte-level mapping;
//! - Qwen2 style (`qwen2`, ...): the same with one digit per piece;
//! - StarCoder style (`smollm`, `starcoder`, ...): every digit alone, then the GPT-2 regex;
//! - Tekken (Mistral Nemo): case-aware words, one digit per piece.
//!
//! A name outside these is refused, as llama.cpp refuses it: splitting by the wrong rule
//! silently changes the token ids of the prompt.

use tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::normalizer::SplitDelimiterBehavior;

/// Llama 3's splitting regex (as in its tokenizer.json).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's splitting regex (as in its tokenizer.json): Llama 3's with single digits.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tekken's splitting regex (Mistral Nemo's tokenizer.json).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The families of splitting rules, each with the `tokenizer.ggml.pre` names llama.cpp's
/// converter writes for it.
const FAMILIES: &[(Family, &[&str])] = &[
    (
        Family::Gpt2,
        &[
            "default",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "jina-es",
            "jina-de",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
        ],
    ),
    (
        Family::Llama3,
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "pixtral",
            "smaug-bpe",
            "dbrx",
        ],
    ),
    (
        Family::Qwen2,
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "megrez",
            "stablelm2",
            "hunyuan",
        ],
    ),
    (
        Family::Digits,
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
    ),
    (Family::Tekken, &["tekken"]),
];

/// A splitting rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Gpt2,
    Llama3,
    Qwen2,
    Digits,
    Tekken,
}

/// The pre-tokenizer for `tokenizer.ggml.pre` (`None`: absent, split as GPT-2 does, which is
/// what transformers' GGUF loader does for every byte-level vocabulary). Err names the
/// supported values.
pub fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper, String> {
    let family = match pre {
        None => Family::Gpt2,
        Some(name) => FAMILIES
            .iter()
            .find(|(_, names)| names.contains(&name))
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = FAMILIES
                    .iter()
                    .flat_map(|(_, n)| n.iter().copied())
                    .collect();
                format!(
                    "tokenizer.ggml.pre '{name}' is not a supported pre-tokenizer; supported: {}",
                    known.join(", ")
                )
            })?,
    };
    // The byte-level step: with its own GPT-2 regex, or only the byte mapping after a split.
    let bytes =
        |use_regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| format!("pre-tokenizer regex does not compile: {e}"))
    };
    Ok(match family {
        Family::Gpt2 => bytes(true),
        Family::Llama3 => Sequence::new(vec![split(LLAMA3)?, bytes(false)]).into(),
        Family::Qwen2 => Sequence::new(vec![split(QWEN2)?, bytes(false)]).into(),
        Family::Tekken => Sequence::new(vec![split(TEKKEN)?, bytes(false)]).into(),
        Family::Digits => Sequence::new(vec![Digits::new(true).into(), bytes(true)]).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: Option<&str>, text: &str) -> Vec<String> {
        let p = byte_level_pre_tokenizer(pre).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    const TEXT: &str = "I'M 12345 $hello,world\n\n  x";

    // The expected pieces are what the Python `tokenizers` library gives with each family's
    // tokenizer.json pre-tokenizer (Ġ is a space, Ċ a newline after the byte mapping).
    #[test]
    fn each_family_splits_as_its_tokenizer_json_does() {
        assert_eq!(
            pieces(None, TEXT),
            [
                "I", "'", "M", "Ġ12345", "Ġ$", "hello", ",", "world", "ĊĊĠ", "Ġx"
            ]
        );
        assert_eq!(pieces(Some("gpt-2"), TEXT), pieces(None, TEXT));
        assert_eq!(
            pieces(Some("llama-bpe"), TEXT),
            [
                "I", "'M", "Ġ", "123", "45", "Ġ$", "hello", ",world", "ĊĊ", "Ġ", "Ġx"
            ]
        );
        assert_eq!(
            pieces(Some("qwen2"), TEXT),
            [
                "I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġ$", "hello", ",world", "ĊĊ", "Ġ", "Ġx"
            ]
        );
        assert_eq!(
            pieces(Some("smollm"), TEXT),
            [
                "I", "'", "M", "Ġ", "1", "2", "3", "4", "5", "Ġ$", "hello", ",", "world", "ĊĊĠ",
                "Ġx"
            ]
        );
        assert_eq!(
            pieces(Some("tekken"), TEXT),
            [
                "I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġ$", "hello", ",world", "ĊĊ", "Ġ", "Ġx"
            ]
        );
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_supported_ones() {
        let e = byte_level_pre_tokenizer(Some("klingon")).unwrap_err();
        assert!(
            e.contains("'klingon'") && e.contains("llama-bpe") && e.contains("qwen2"),
            "{e}"
        );
    }
}
