//! The tokenizer a GGUF file describes in `tokenizer.ggml.*`, built as a `tokenizers`
//! tokenizer the way transformers' GGUF loader builds it:
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, split by the rule `pre` names
//!   (`pretok`), with the ByteLevel decoder;
//! - `llama`: SentencePiece-style BPE from `tokens` and `scores` (merges ranked by the merged
//!   piece's score, byte fallback, `▁` for spaces).
//!
//! Tokens of type control (3) become special added tokens, user-defined ones (4) added
//! tokens; `add_bos_token` / `add_eos_token` choose the post-processor.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::pretok::byte_level_pre_tokenizer;
use super::{GgufError, GgufFile, MetaValue};

/// llama.cpp's token types that become added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

impl GgufFile {
    /// Builds the tokenizer of `tokenizer.ggml.*`. Models other than `gpt2` and `llama` are
    /// refused by name.
    pub fn tokenizer(&self) -> Result<Tokenizer, GgufError> {
        let err = |message: String| GgufError::Metadata {
            path: self.path.clone(),
            message,
        };
        let model = self
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| err("tokenizer.ggml.model is missing".into()))?;
        let tokens: Vec<&str> = self
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .ok_or_else(|| err("tokenizer.ggml.tokens is missing".into()))?
            .iter()
            .map(|t| t.as_str().unwrap_or_default())
            .collect();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe_err = |e: tokenizers::Error| err(format!("tokenizer.ggml.* do not build: {e}"));
        let mut tok = match model {
            "gpt2" => {
                let merges = self
                    .get("tokenizer.ggml.merges")
                    .and_then(MetaValue::as_array)
                    .ok_or_else(|| err("tokenizer.ggml.merges is missing (model gpt2)".into()))?
                    .iter()
                    .filter_map(|m| {
                        let (a, b) = m.as_str()?.split_once(' ')?;
                        Some((a.to_string(), b.to_string()))
                    })
                    .collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(bpe_err)?;
                let pre = self.get("tokenizer.ggml.pre").and_then(MetaValue::as_str);
                let mut tok = Tokenizer::new(bpe);
                tok.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre).map_err(err)?));
                tok.with_decoder(Some(ByteLevel::new(false, true, true)));
                tok
            }
            "llama" => self.sentencepiece(&tokens, vocab).map_err(bpe_err)?,
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model '{other}' is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
                )));
            }
        };
        self.add_typed_tokens(&mut tok, &tokens)
            .map_err(|e| err(format!("added tokens: {e}")))?;
        let add_bos = self
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(model == "llama");
        let add_eos = self
            .get("tokenizer.ggml.add_eos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(false);
        let special = |what: &str| {
            self.token_id(what)
                .and_then(|id| Some((self.token_text(id)?.to_string(), id)))
        };
        let bos = special("bos").filter(|_| add_bos);
        let eos = special("eos").filter(|_| add_eos);
        if bos.is_some() || eos.is_some() {
            let (b, e) = (
                bos.as_ref()
                    .map(|(t, _)| format!("{t} "))
                    .unwrap_or_default(),
                eos.as_ref()
                    .map(|(t, _)| format!(" {t}"))
                    .unwrap_or_default(),
            );
            let post = TemplateProcessing::builder()
                .try_single(format!("{b}$A{e}"))
                .and_then(|p| p.try_pair(format!("{b}$A{e} {b}$B{e}")))
                .map_err(|e| err(format!("post-processor: {e}")))?
                .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
                .build()
                .map_err(|e| err(format!("post-processor: {e}")))?;
            tok.with_post_processor(Some(post));
        }
        Ok(tok)
    }

    /// Control tokens as special added tokens, user-defined ones as plain added tokens, so
    /// that the pre-tokenizer never splits them.
    fn add_typed_tokens(&self, tok: &mut Tokenizer, tokens: &[&str]) -> tokenizers::Result<()> {
        let Some(types) = self
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
        else {
            return Ok(());
        };
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (t, ty) in tokens.iter().zip(types) {
            match ty {
                MetaValue::I64(TOKEN_TYPE_CONTROL) => {
                    special.push(AddedToken::from(*t, true).normalized(false))
                }
                MetaValue::I64(TOKEN_TYPE_USER_DEFINED) => {
                    user.push(AddedToken::from(*t, false).normalized(false))
                }
                _ => {}
            }
        }
        tok.add_special_tokens(special)?;
        tok.add_tokens(user)?;
        Ok(())
    }

    /// SentencePiece-style BPE: merges of every split of a piece into two known pieces,
    /// ranked by the merged piece's score (highest first).
    fn sentencepiece(&self, tokens: &[&str], vocab: Vocab) -> tokenizers::Result<Tokenizer> {
        let scores: Vec<f64> = self
            .get("tokenizer.ggml.scores")
            .and_then(MetaValue::as_array)
            .map(|s| s.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_default();
        let mut ranked: Vec<(f64, u32, u32)> = Vec::new();
        for (i, piece) in tokens.iter().enumerate() {
            let score = scores.get(i).copied().unwrap_or(0.0);
            let mut local: Vec<(u32, u32)> = piece
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (l, r) = piece.split_at(at);
                    Some((*vocab.get(l)?, *vocab.get(r)?))
                })
                .collect();
            local.sort_unstable();
            ranked.extend(local.into_iter().map(|(l, r)| (score, l, r)));
        }
        // Stable: equal scores keep the per-piece order above.
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let text = |id: u32| tokens[id as usize].to_string();
        let merges = ranked.iter().map(|&(_, l, r)| (text(l), text(r))).collect();
        let unk = self.token_id("unknown").and_then(|id| self.token_text(id));
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk.to_string());
        }
        let mut tok = Tokenizer::new(builder.build()?);
        let prefix = self
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(MetaValue::as_bool)
            .unwrap_or(true);
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if prefix {
            normalizers.push(Prepend::new(SPIECE_UNDERLINE.into()).into());
        }
        normalizers.push(Replace::new(" ", SPIECE_UNDERLINE)?.into());
        tok.with_normalizer(Some(NormalizerSequence::new(normalizers)))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(SPIECE_UNDERLINE, " ")?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tok)
    }
}
