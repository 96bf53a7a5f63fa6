//! Tensors of a GGUF checkpoint under the engine's (Hugging Face) names, dequantized at
//! load: matrices to bf16, f32 tensors (norms) kept as they are; Q8_0, Q4_0, Q4_1, Q4_K and
//! Q6_K matrices kept as blocks for the CPU backend to compute on (`q8_rows`, `q4_rows`,
//! `kquant_rows`).
//!
//! llama.cpp's converter interleaves the two rotary halves of every Q and K head of Llama
//! and Mistral checkpoints (row `2i + s` of a head holds HF row `s * head_dim/2 + i`); the
//! loader puts the rows back, as transformers' GGUF loader does, so that the rotary code
//! stays Hugging Face's.

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use llmapi_common::gguf::meta::permutes_qk;
use llmapi_common::gguf::{GgufFile, MetaValue};
use safetensors::Dtype;

use super::dequant::{GgmlType, Q8_0_BLOCK};
use super::weights::{KRows, Q4Rows};
use crate::engine::EngineError;

/// A tensor as the loader sees it: dtype, shape (outermost first) and bytes.
pub type TensorView<'a> = (Dtype, Vec<usize>, Cow<'a, [u8]>);

/// Q8_0 values and their f16 block scales.
pub type Q8Rows = (Vec<i8>, Vec<u16>);

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

    /// Rows `rs` of the `rows` x `cols` engine matrix `name` as Q8_0 values and f16 block
    /// scales (`WeightData::Q8_0`'s layout) when the file stores it as Q8_0, Q/K rows
    /// un-permuted as whole rows of blocks; `None` for every other type.
    pub fn q8_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        rs: Range<usize>,
    ) -> Result<Option<Q8Rows>, EngineError> {
        let Some((_, bytes)) = self.block_rows(name, rows, cols, rs, &[GgmlType::Q8_0])? else {
            return Ok(None);
        };
        let (_, block_bytes) = GgmlType::Q8_0.block();
        let mut q = Vec::with_capacity(bytes.len() / block_bytes * Q8_0_BLOCK);
        let mut d = Vec::with_capacity(bytes.len() / block_bytes);
        for block in bytes.chunks_exact(block_bytes) {
            d.push(u16::from_le_bytes([block[0], block[1]]));
            q.extend(block[2..].iter().map(|&b| b as i8));
        }
        Ok(Some((q, d)))
    }

    /// Rows `rs` of the `rows` x `cols` engine matrix `name` as Q4_0 or Q4_1 blocks repacked
    /// into nibbles, scales and mins ([`Q4Rows`]) when the file stores it so, Q/K rows
    /// un-permuted as whole rows of blocks; `None` for every other type.
    pub fn q4_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        rs: Range<usize>,
    ) -> Result<Option<Q4Rows>, EngineError> {
        let kinds = [GgmlType::Q4_0, GgmlType::Q4_1];
        let Some((ty, bytes)) = self.block_rows(name, rows, cols, rs, &kinds)? else {
            return Ok(None);
        };
        let with_min = ty == GgmlType::Q4_1;
        let (_, block_bytes) = ty.block();
        let blocks = bytes.len() / block_bytes;
        let mut w = Q4Rows {
            with_min,
            qs: Vec::with_capacity(blocks * Q8_0_BLOCK / 2),
            d: Vec::with_capacity(blocks),
            m: Vec::with_capacity(if with_min { blocks } else { 0 }),
        };
        let nibbles_at = if with_min { 4 } else { 2 };
        for block in bytes.chunks_exact(block_bytes) {
            w.d.push(u16::from_le_bytes([block[0], block[1]]));
            if with_min {
                w.m.push(u16::from_le_bytes([block[2], block[3]]));
            }
            w.qs.extend_from_slice(&block[nibbles_at..]);
        }
        Ok(Some(w))
    }

    /// Rows `rs` of the `rows` x `cols` engine matrix `name` as the file's Q4_K or Q6_K
    /// super-blocks (`WeightData::KQuant`), Q/K rows un-permuted as whole rows of blocks;
    /// `None` for every other type (those are dequantized to bf16 at load).
    pub fn kquant_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        rs: Range<usize>,
    ) -> Result<Option<KRows>, EngineError> {
        let n = rs.len();
        let kinds = [GgmlType::Q4K, GgmlType::Q6K];
        Ok(self
            .block_rows(name, rows, cols, rs, &kinds)?
            .map(|(ty, bytes)| KRows {
                runs: vec![(ty, n)],
                bytes,
            }))
    }

    /// The bytes of rows `rs` (HF row order) of the 2-D matrix `name` when the file stores
    /// it in one of the block types `kinds`, with that type; `None` otherwise.
    fn block_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        rs: Range<usize>,
        kinds: &[GgmlType],
    ) -> Result<Option<(GgmlType, Vec<u8>)>, EngineError> {
        let Some(info) = gguf_name(name).and_then(|g| self.file.tensor(&g)) else {
            return Ok(None);
        };
        let Some(ty) = GgmlType::from_id(info.ggml_type).filter(|t| kinds.contains(t)) else {
            return Ok(None);
        };
        if info.dims.len() != 2 {
            return Ok(None);
        }
        if info.shape() != [rows, cols] || rs.end > rows {
            return Err(werr(format!(
                "tensor `{}` has shape {:?} but the config implies [{rows}, {cols}] (rows {rs:?})",
                info.name,
                info.shape()
            )));
        }
        let row_bytes = ty.bytes_of(cols).ok_or_else(|| {
            werr(format!(
                "tensor `{}`: rows of {cols} values are not whole {} blocks",
                info.name,
                GgmlType::name_of(info.ggml_type)
            ))
        })?;
        let bytes = self
            .file
            .tensor_bytes(info, rows * row_bytes)
            .map_err(|e| werr(e.to_string()))?;
        let order: Vec<usize> = match self.heads_of(&info.name) {
            Some(heads) => {
                source_rows(rows, heads).map_err(|m| werr(format!("{}: {m}", info.name)))?
            }
            None => (0..rows).collect(),
        };
        let mut out = Vec::with_capacity(rs.len() * row_bytes);
        for &src in &order[rs] {
            out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
        Ok(Some((ty, out)))
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

/// For each HF row of a `rows`-row Q or K tensor of `heads` heads, the GGUF row holding it:
/// llama.cpp's rotary permutation stores HF row `h*d + s*(d/2) + i` at `h*d + 2i + s`.
fn source_rows(rows: usize, heads: usize) -> Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows do not split into {heads} heads of an even size"
        ));
    }
    let d = rows / heads;
    let half = d / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, j) = (r / d, r % d);
            let (s, i) = (j / half, j % half);
            h * d + 2 * i + s
        })
        .collect())
}

/// Undoes llama.cpp's rotary permutation of a `[rows, cols]` (or `[rows]`) tensor of
/// `heads` heads ([`source_rows`]).
fn unpermute_rows(values: &[f32], shape: &[usize], heads: usize) -> Result<Vec<f32>, String> {
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape.iter().skip(1).product::<usize>().max(1);
    let order = source_rows(rows, heads)?;
    let mut out = Vec::with_capacity(values.len());
    for src in order {
        out.extend_from_slice(&values[src * cols..(src + 1) * cols]);
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

    /// A Q8_0 query projection of 2 heads of 4 rows (GGUF row r holds the value r, scale 1)
    /// loads as Q8_0 blocks and as dequantized bf16 with the same HF row order.
    #[test]
    fn q8_0_rows_load_as_blocks_unpermuted_like_the_dequantized_path() {
        use llmapi_common::gguf::MetaValue;
        use llmapi_common::gguf::write::{RawTensor, write_gguf};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("q.gguf");
        let mut data = Vec::new();
        for r in 0..8u8 {
            data.extend_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
            data.extend_from_slice(&[r; 32]);
        }
        write_gguf(
            &path,
            &[
                ("general.architecture", MetaValue::Str("llama".into())),
                ("llama.attention.head_count", MetaValue::U64(2)),
                ("llama.attention.head_count_kv", MetaValue::U64(1)),
            ],
            &[RawTensor {
                name: "blk.0.attn_q.weight".into(),
                dims: vec![32, 8],
                ggml_type: 8,
                data,
            }],
        )
        .unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let store = crate::model::WeightStore::open(&path).unwrap();
        let m = store.mat(name, 8, 32).unwrap();
        assert!(matches!(m.data, crate::model::WeightData::Q8_0 { .. }));
        let mut row = vec![0.0f32; 32];
        let firsts: Vec<f32> = (0..8)
            .map(|r| {
                m.row_to_f32(r, &mut row);
                row[0]
            })
            .collect();
        assert_eq!(firsts, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let tensors = GgufTensors::open(&path).unwrap();
        let (dtype, shape, bytes) = tensors.view(name).unwrap();
        assert_eq!((dtype, shape), (Dtype::BF16, vec![8, 32]));
        let bf: Vec<u16> = bytemuck::pod_collect_to_vec(&bytes);
        let dequant: Vec<f32> = (0..8)
            .map(|r| half::bf16::from_bits(bf[r * 32]).to_f32())
            .collect();
        assert_eq!(dequant, firsts);
        // A row slice (a tensor-parallel rank's heads) keeps the blocks too.
        let half = store.mat_slice(name, 8, 32, 4..8, 0..32).unwrap();
        half.row_to_f32(1, &mut row);
        assert_eq!((half.rows, row[0]), (4, 6.0));
    }

    /// Q4_0 and Q4_1 query projections of 2 heads of 4 rows (GGUF row r: every code r, scale
    /// 1, Q4_1 min 0.5) load as repacked Q4 blocks in HF row order, equal to the dequantized
    /// path, and a row slice keeps the blocks.
    #[test]
    fn q4_0_and_q4_1_rows_load_as_blocks_unpermuted_like_the_dequantized_path() {
        use crate::model::WeightData;
        use llmapi_common::gguf::MetaValue;
        use llmapi_common::gguf::write::{RawTensor, write_gguf};
        for (ggml_type, with_min) in [(2u32, false), (3, true)] {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("q.gguf");
            let mut data = Vec::new();
            for r in 0..8u8 {
                data.extend_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
                if with_min {
                    data.extend_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
                }
                data.extend_from_slice(&[r | (r << 4); 16]);
            }
            write_gguf(
                &path,
                &[
                    ("general.architecture", MetaValue::Str("llama".into())),
                    ("llama.attention.head_count", MetaValue::U64(2)),
                    ("llama.attention.head_count_kv", MetaValue::U64(1)),
                ],
                &[RawTensor {
                    name: "blk.0.attn_q.weight".into(),
                    dims: vec![32, 8],
                    ggml_type,
                    data,
                }],
            )
            .unwrap();
            let name = "model.layers.0.self_attn.q_proj.weight";
            let store = crate::model::WeightStore::open(&path).unwrap();
            let m = store.mat(name, 8, 32).unwrap();
            assert!(matches!(&m.data, WeightData::Q4(w) if w.with_min == with_min));
            let (offset, min) = if with_min { (0.0, 0.5) } else { (8.0, 0.0) };
            let mut row = vec![0.0f32; 32];
            for (r, src) in [0.0f32, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
                .into_iter()
                .enumerate()
            {
                m.row_to_f32(r, &mut row);
                assert!(
                    row.iter().all(|&v| v == src - offset + min),
                    "row {r}: {row:?}"
                );
            }
            let tensors = GgufTensors::open(&path).unwrap();
            let (_, _, bytes) = tensors.view(name).unwrap();
            let bf: Vec<u16> = bytemuck::pod_collect_to_vec(&bytes);
            for r in 0..8 {
                m.row_to_f32(r, &mut row);
                assert_eq!(half::bf16::from_bits(bf[r * 32 + 31]).to_f32(), row[31]);
            }
            let half = store.mat_slice(name, 8, 32, 4..8, 0..32).unwrap();
            half.row_to_f32(1, &mut row);
            assert!(matches!(half.data, WeightData::Q4(_)));
            assert_eq!((half.rows, row[0]), (4, 6.0 - offset + min));
        }
    }

    /// A Q4_K query projection (2 heads of 4 rows, permuted) and a Q6_K value projection
    /// (not permuted) whose GGUF row r holds the value r everywhere (d 1, scales 1, mins 0)
    /// load as k-quant blocks in HF row order, equal to the dequantized path, and fuse into
    /// one matrix of two runs.
    #[test]
    fn q4_k_and_q6_k_rows_load_as_blocks_unpermuted_like_the_dequantized_path() {
        use crate::model::WeightData;
        use llmapi_common::gguf::MetaValue;
        use llmapi_common::gguf::write::{RawTensor, write_gguf};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.gguf");
        let one = half::f16::from_f32(1.0).to_bits().to_le_bytes();
        let (mut q4, mut q6) = (Vec::new(), Vec::new());
        for r in 0..8u8 {
            q4.extend_from_slice(&one);
            q4.extend_from_slice(&[0, 0]);
            q4.extend_from_slice(&[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
            q4.extend_from_slice(&[r | (r << 4); 128]);
            // Codes r + 32: low nibble r, high bits 2 (0b10 in each pair of qh).
            q6.extend_from_slice(&[r | (r << 4); 128]);
            q6.extend_from_slice(&[0xAA; 64]);
            q6.extend_from_slice(&[1; 16]);
            q6.extend_from_slice(&one);
        }
        let tensor = |name: &str, ggml_type, data| RawTensor {
            name: name.into(),
            dims: vec![256, 8],
            ggml_type,
            data,
        };
        write_gguf(
            &path,
            &[
                ("general.architecture", MetaValue::Str("llama".into())),
                ("llama.attention.head_count", MetaValue::U64(2)),
                ("llama.attention.head_count_kv", MetaValue::U64(1)),
            ],
            &[
                tensor("blk.0.attn_q.weight", 12, q4),
                tensor("blk.0.attn_v.weight", 14, q6),
            ],
        )
        .unwrap();
        let store = crate::model::WeightStore::open(&path).unwrap();
        let tensors = GgufTensors::open(&path).unwrap();
        let mut row = vec![0.0f32; 256];
        let mut parts = Vec::new();
        for (proj, want) in [
            ("q_proj", [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]),
            ("v_proj", [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]),
        ] {
            let name = format!("model.layers.0.self_attn.{proj}.weight");
            let m = store.mat(&name, 8, 256).unwrap();
            assert!(matches!(m.data, WeightData::KQuant(_)), "{proj}");
            let (_, _, bytes) = tensors.view(&name).unwrap();
            let bf: Vec<u16> = bytemuck::pod_collect_to_vec(&bytes);
            for (r, &v) in want.iter().enumerate() {
                m.row_to_f32(r, &mut row);
                assert!(row.iter().all(|&x| x == v), "{proj} row {r}");
                assert_eq!(half::bf16::from_bits(bf[r * 256 + 7]).to_f32(), v);
            }
            parts.push(m);
        }
        let fused = crate::model::Mat::vstack(parts).unwrap();
        let WeightData::KQuant(k) = &fused.data else {
            panic!("k-quant parts fuse as k-quant blocks");
        };
        assert_eq!(k.runs, vec![(GgmlType::Q4K, 8), (GgmlType::Q6K, 8)]);
        fused.row_to_f32(9, &mut row);
        assert_eq!(row[255], 1.0);
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
