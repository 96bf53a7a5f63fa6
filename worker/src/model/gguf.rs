//! Tensors of a GGUF checkpoint under the engine's (Hugging Face) names, dequantized at
//! load: matrices to bf16, f32 tensors (norms) kept as they are.
//!
//! llama.cpp's converter interleaves the two rotary halves of every Q and K head of Llama
//! and Mistral checkpoints (row `2i + s` of a head holds HF row `s * head_dim/2 + i`); the
//! loader puts the rows back, as transformers' GGUF loader does, so that the rotary code
//! stays Hugging Face's.

use std::borrow::Cow;
use std::path::Path;

use llmapi_common::gguf::meta::permutes_qk;
use llmapi_common::gguf::{GgufFile, MetaValue};
use safetensors::Dtype;

use super::dequant::GgmlType;
use crate::engine::EngineError;

/// A tensor as the loader sees it: dtype, shape (outermost first) and bytes.
pub type TensorView<'a> = (Dtype, Vec<usize>, Cow<'a, [u8]>);

/// A GGUF file opened for the weight loader.
pub struct GgufTensors {
    file: GgufFile,
    /// Query heads and key/value heads when Q and K rows must be un-permuted.
    permute: Option<(usize, usize)>,
}

fn werr(msg: String) -> EngineError {
    EngineError::Weights(msg)
}

/// The GGUF name of an engine tensor name (`model.layers.3.self_attn.q_proj.weight` is
/// `blk.3.attn_q.weight`); `None` for names GGUF files do not use.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let part = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.{suffix}"))
}

impl GgufTensors {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = GgufFile::open(path).map_err(|e| werr(e.to_string()))?;
        let arch = file.architecture().map_err(|e| werr(e.to_string()))?;
        let count = |key: &str| {
            file.get(&format!("{arch}.attention.{key}"))
                .and_then(MetaValue::as_u64)
                .map(|v| v as usize)
        };
        let permute = match (permutes_qk(arch), count("head_count")) {
            (true, Some(heads)) => Some((heads, count("head_count_kv").unwrap_or(heads))),
            _ => None,
        };
        Ok(Self { file, permute })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Whether the file holds the engine tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor(&g).is_some())
    }

    /// The engine tensor `name`: dtype, shape (outermost first) and bytes. F32 tensors are
    /// borrowed from the map; every other type is dequantized to bf16.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>, EngineError> {
        let missing = || {
            werr(format!(
                "tensor `{name}` (GGUF `{}`) is missing from {}",
                gguf_name(name).unwrap_or_default(),
                self.file.path.display()
            ))
        };
        let gname = gguf_name(name).ok_or_else(missing)?;
        let info = self.file.tensor(&gname).ok_or_else(missing)?;
        let ty = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
            werr(format!(
                "tensor `{gname}` of {} has type {}; the engine reads {}",
                self.file.path.display(),
                GgmlType::name_of(info.ggml_type),
                GgmlType::SUPPORTED
            ))
        })?;
        let n = info.elements() as usize;
        let len = ty.bytes_of(n).ok_or_else(|| {
            werr(format!(
                "tensor `{gname}` has {n} elements, not whole blocks of its type {}",
                GgmlType::name_of(info.ggml_type)
            ))
        })?;
        let bytes = self
            .file
            .tensor_bytes(info, len)
            .map_err(|e| werr(e.to_string()))?;
        let shape = info.shape();
        if ty == GgmlType::F32 && !self.is_permuted(&gname) {
            return Ok((Dtype::F32, shape, Cow::Borrowed(bytes)));
        }
        let mut values = vec![0.0f32; n];
        ty.dequantize(bytes, &mut values);
        if let Some(heads) = self.heads_of(&gname) {
            values = unpermute_rows(&values, &shape, heads).map_err(|m| {
                werr(format!(
                    "tensor `{gname}` of {}: {m}",
                    self.file.path.display()
                ))
            })?;
        }
        let out: Vec<u16> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        Ok((
            Dtype::BF16,
            shape,
            Cow::Owned(bytemuck::cast_slice(&out).to_vec()),
        ))
    }

    fn is_permuted(&self, gname: &str) -> bool {
        self.heads_of(gname).is_some()
    }

    /// Heads whose rows llama.cpp permuted in `gname` (Q: query heads; K: key/value heads).
    fn heads_of(&self, gname: &str) -> Option<usize> {
        let (q, kv) = self.permute?;
        if gname.ends_with(".attn_q.weight") || gname.ends_with(".attn_q.bias") {
            Some(q)
        } else if gname.ends_with(".attn_k.weight") || gname.ends_with(".attn_k.bias") {
            Some(kv)
        } else {
            None
        }
    }
}

/// Undoes llama.cpp's rotary permutation of a `[rows, cols]` (or `[rows]`) tensor of
/// `heads` heads: GGUF row `h*d + 2i + s` becomes row `h*d + s*(d/2) + i`.
fn unpermute_rows(values: &[f32], shape: &[usize], heads: usize) -> Result<Vec<f32>, String> {
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape.iter().skip(1).product::<usize>().max(1);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows do not split into {heads} heads of an even size"
        ));
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let src = (h * d + 2 * i + s) * cols;
                let dst = (h * d + s * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp_names() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.12.self_attn.q_proj.bias",
                "blk.12.attn_q.bias",
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            (
                "model.layers.1.self_attn.k_norm.weight",
                "blk.1.attn_k_norm.weight",
            ),
            ("lm_head.weight", "output.weight"),
        ];
        for (hf, g) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.0.mlp.experts.0.w1.weight"), None);
    }

    /// llama.cpp's permutation (for one head of 4 rows: HF rows 0 1 | 2 3 are stored as
    /// 0 2 1 3), undone.
    #[test]
    fn rotary_permutation_is_undone_per_head() {
        // Two heads of 4 rows, one column; GGUF order interleaves each head's halves.
        let gguf = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        let hf = unpermute_rows(&gguf, &[8, 1], 2).unwrap();
        assert_eq!(hf, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert!(unpermute_rows(&gguf, &[8, 1], 3).is_err());
    }
}
