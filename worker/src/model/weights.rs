//! Reading tensors from Hugging Face safetensors checkpoints (single file or sharded).
//!
//! A GGUF checkpoint is read through `model::gguf` (Q8_0, Q4_0, Q4_1, Q4_K and Q6_K kept as blocks,
//! other types dequantized to bf16 at load).
//! Files are memory-mapped; tensor bytes are copied out with `pod_collect_to_vec` because
//! offsets inside a safetensors file need not be aligned. bf16 stays bf16 (widened in the
//! kernels), f16 is widened to f32 at load, f32 stays f32.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use llmapi_common::gguf;

use super::dequant::{GgmlType, Q8_0_BLOCK};
use super::gguf::{GgufTensors, TensorView};
use crate::engine::EngineError;

/// Element storage of a weight matrix.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// bf16 packed by the CPU backend (`dtype: bfloat16` on AVX512_BF16) into panels of
    /// [`PANEL_ROWS`] rows: panel `j` holds `cols.div_ceil(2) * PANEL_ROWS` dwords, and dword
    /// `p * PANEL_ROWS + c` holds elements `2p` (low half) and `2p + 1` (high half) of row
    /// `j * PANEL_ROWS + c`. Rows past `rows` and the element past an odd `cols` are zero.
    Bf16Panels(Vec<u32>),
    /// GGUF Q8_0 blocks, kept for the CPU backend to compute on (`backend::cpu::q8`): row
    /// `r` holds `q[r * cols..(r + 1) * cols]` and, per 32 of them, the f16 scale
    /// `d[r * cols / 32 + b]`; element = `q * d`. `cols` is a multiple of 32.
    Q8_0 {
        /// int8 values, row-major.
        q: Vec<i8>,
        /// f16 bit patterns of the block scales.
        d: Vec<u16>,
    },
    /// GGUF k-quant super-blocks (Q4_K, Q6_K) as the file stores them, kept for the CPU
    /// backend to compute on (`backend::cpu::q4k`).
    KQuant(KRows),
    /// GGUF Q4_0 or Q4_1 blocks, repacked for the CPU backend to compute on
    /// (`backend::cpu::q4`); boxed, as its three vectors would make every `Mat` larger.
    Q4(Box<Q4Rows>),
}

/// Rows of GGUF Q4_0 / Q4_1 blocks (32 values each) with the nibbles, scales and mins of a
/// row each back to back, so that SIMD loads take several blocks at once. Element `j` of a
/// block is the low nibble of its byte `j` and element `j + 16` the high nibble (the file's
/// order); Q4_0: `x = d * (q - 8)`, Q4_1: `x = d * q + m`. `cols` is a multiple of 32.
#[derive(Debug, Clone)]
pub struct Q4Rows {
    /// Q4_1 (a per-block min) rather than Q4_0 (codes offset by 8).
    pub with_min: bool,
    /// Nibbles, `cols / 2` bytes a row, 16 a block.
    pub qs: Vec<u8>,
    /// f16 bit patterns of the block scales, `cols / 32` a row.
    pub d: Vec<u16>,
    /// f16 bit patterns of the block mins (Q4_1), `cols / 32` a row; empty for Q4_0.
    pub m: Vec<u16>,
}

impl Q4Rows {
    /// Row `r` of a matrix `cols` wide as f32.
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let blocks = cols / Q8_0_BLOCK;
        let qs = &self.qs[r * cols / 2..(r + 1) * cols / 2];
        for (b, (o, q)) in out
            .chunks_exact_mut(Q8_0_BLOCK)
            .zip(qs.chunks_exact(Q8_0_BLOCK / 2))
            .enumerate()
        {
            let d = half::f16::from_bits(self.d[r * blocks + b]).to_f32();
            let (m, offset) = if self.with_min {
                (half::f16::from_bits(self.m[r * blocks + b]).to_f32(), 0.0)
            } else {
                (0.0, 8.0)
            };
            for (j, &v) in q.iter().enumerate() {
                o[j] = (f32::from(v & 0x0f) - offset) * d + m;
                o[j + 16] = (f32::from(v >> 4) - offset) * d + m;
            }
        }
    }
}

/// Rows of k-quant super-blocks of 256 values: runs of consecutive rows of one type (a
/// fused Q/K/V or gate/up projection of a Q4_K_M file mixes Q4_K and Q6_K rows), every
/// row's blocks back to back in `bytes`.
#[derive(Debug, Clone)]
pub struct KRows {
    /// `(type, rows)` of each run, in row order.
    pub runs: Vec<(GgmlType, usize)>,
    /// Block bytes of every row, row-major.
    pub bytes: Vec<u8>,
}

impl KRows {
    /// The type and the block bytes of row `r` of a matrix `cols` wide.
    pub fn row(&self, r: usize, cols: usize) -> (GgmlType, &[u8]) {
        let (mut first, mut at) = (0, 0);
        for &(ty, n) in &self.runs {
            let len = ty.bytes_of(cols).unwrap_or(0);
            if r < first + n {
                let start = at + (r - first) * len;
                return (ty, &self.bytes[start..start + len]);
            }
            first += n;
            at += n * len;
        }
        panic!("row {r} is outside the {first} rows of these k-quant blocks");
    }
}

/// Rows of one panel of [`WeightData::Bf16Panels`].
pub const PANEL_ROWS: usize = 32;

/// A row-major matrix of `rows` x `cols`; for projections rows are outputs (HF layout).
#[derive(Debug, Clone)]
pub struct Mat {
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs).
    pub cols: usize,
    /// Elements.
    pub data: WeightData,
}

impl Mat {
    /// Bytes of weight storage.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) => v.len() * 2,
            WeightData::Bf16Panels(v) => v.len() * 4,
            WeightData::Q8_0 { q, d } => q.len() + d.len() * 2,
            WeightData::KQuant(k) => k.bytes.len(),
            WeightData::Q4(w) => w.qs.len() + (w.d.len() + w.m.len()) * 2,
        }
    }

    /// Copies row `r` into `out` as f32.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[range]),
            WeightData::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[range]) {
                    *o = f32::from_bits(u32::from(b) << 16);
                }
            }
            WeightData::Q8_0 { q, d } => {
                let blocks = self.cols / Q8_0_BLOCK;
                for (b, (o, qb)) in out
                    .chunks_exact_mut(Q8_0_BLOCK)
                    .zip(q[range].chunks_exact(Q8_0_BLOCK))
                    .enumerate()
                {
                    let scale = half::f16::from_bits(d[r * blocks + b]).to_f32();
                    for (o, &v) in o.iter_mut().zip(qb) {
                        *o = f32::from(v) * scale;
                    }
                }
            }
            WeightData::KQuant(k) => {
                let (ty, bytes) = k.row(r, self.cols);
                ty.dequantize(bytes, &mut out[..self.cols]);
            }
            WeightData::Q4(w) => w.row_to_f32(r, self.cols, &mut out[..self.cols]),
            WeightData::Bf16Panels(v) => {
                let kp = self.cols.div_ceil(2);
                let (panel, c) = (r / PANEL_ROWS, r % PANEL_ROWS);
                let base = panel * kp * PANEL_ROWS + c;
                for (i, o) in out.iter_mut().enumerate().take(self.cols) {
                    let pair = v[base + (i / 2) * PANEL_ROWS];
                    let bits = if i % 2 == 0 {
                        pair << 16
                    } else {
                        pair & 0xffff_0000
                    };
                    *o = f32::from_bits(bits);
                }
            }
        }
    }

    /// Stacks matrices with equal `cols` and dtype vertically (fusing q/k/v or gate/up).
    pub fn vstack(parts: Vec<Mat>) -> Result<Mat, EngineError> {
        let cols = parts.first().map_or(0, |m| m.cols);
        let rows = parts.iter().map(|m| m.rows).sum();
        if parts.iter().any(|m| m.cols != cols) {
            return Err(EngineError::Weights(
                "cannot fuse projections with different input widths".into(),
            ));
        }
        let all_bf16 = parts.iter().all(|m| matches!(m.data, WeightData::Bf16(_)));
        let all_q8 = parts
            .iter()
            .all(|m| matches!(m.data, WeightData::Q8_0 { .. }));
        let all_k = parts
            .iter()
            .all(|m| matches!(m.data, WeightData::KQuant(_)));
        let q4_kind = |m: &Mat| match &m.data {
            WeightData::Q4(w) => Some(w.with_min),
            _ => None,
        };
        let first_q4 = parts.first().and_then(q4_kind);
        let all_q4 = first_q4.is_some() && parts.iter().all(|m| q4_kind(m) == first_q4);
        let data = if all_q4 {
            let mut out = Q4Rows {
                with_min: first_q4 == Some(true),
                qs: Vec::new(),
                d: Vec::new(),
                m: Vec::new(),
            };
            for m in parts {
                if let WeightData::Q4(w) = m.data {
                    out.qs.extend_from_slice(&w.qs);
                    out.d.extend_from_slice(&w.d);
                    out.m.extend_from_slice(&w.m);
                }
            }
            WeightData::Q4(Box::new(out))
        } else if all_k && !parts.is_empty() {
            let mut out = KRows {
                runs: Vec::new(),
                bytes: Vec::new(),
            };
            for m in parts {
                if let WeightData::KQuant(k) = m.data {
                    out.bytes.extend_from_slice(&k.bytes);
                    for (ty, n) in k.runs {
                        match out.runs.last_mut() {
                            Some((last, rows)) if *last == ty => *rows += n,
                            _ => out.runs.push((ty, n)),
                        }
                    }
                }
            }
            WeightData::KQuant(out)
        } else if all_q8 && !parts.is_empty() {
            let (mut qs, mut ds) = (Vec::new(), Vec::new());
            for m in parts {
                if let WeightData::Q8_0 { q, d } = m.data {
                    qs.extend_from_slice(&q);
                    ds.extend_from_slice(&d);
                }
            }
            WeightData::Q8_0 { q: qs, d: ds }
        } else if all_bf16 {
            let mut v = Vec::with_capacity(rows * cols);
            for m in parts {
                if let WeightData::Bf16(d) = m.data {
                    v.extend_from_slice(&d);
                }
            }
            WeightData::Bf16(v)
        } else if parts.iter().all(|m| !matches!(m.data, WeightData::F32(_))) {
            // bf16 mixed with GGUF blocks (a type computed on its blocks fused with one
            // dequantized at load): bf16, as the loader would have made every part.
            let mut v = Vec::with_capacity(rows * cols);
            let mut row = vec![0.0; cols];
            for m in &parts {
                for r in 0..m.rows {
                    m.row_to_f32(r, &mut row);
                    v.extend(row.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
                }
            }
            WeightData::Bf16(v)
        } else {
            let mut v = Vec::with_capacity(rows * cols);
            for m in &parts {
                let mut row = vec![0.0; cols];
                for r in 0..m.rows {
                    m.row_to_f32(r, &mut row);
                    v.extend_from_slice(&row);
                }
            }
            WeightData::F32(v)
        };
        Ok(Mat { rows, cols, data })
    }
}

/// The tensors of a checkpoint directory (safetensors), or of a GGUF checkpoint.
pub struct WeightStore {
    dir: PathBuf,
    maps: Vec<Mmap>,
    files: Vec<PathBuf>,
    location: HashMap<String, usize>,
    gguf: Option<GgufTensors>,
}

fn werr(msg: String) -> EngineError {
    EngineError::Weights(msg)
}

impl WeightStore {
    /// Opens `model.safetensors.index.json` shards, or every `*.safetensors` file in `dir`;
    /// or the GGUF file `dir` stands for (`gguf::locate`).
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        if let Some(file) = gguf::locate(dir).map_err(|e| werr(e.to_string()))? {
            return Ok(WeightStore {
                dir: dir.to_path_buf(),
                maps: Vec::new(),
                files: vec![file.clone()],
                location: HashMap::new(),
                gguf: Some(GgufTensors::open(&file)?),
            });
        }
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| werr(format!("cannot read {}: {e}", index.display())))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| werr(format!("{} is not valid JSON: {e}", index.display())))?;
            let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
                return Err(werr(format!(
                    "{} has no `weight_map` object",
                    index.display()
                )));
            };
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| {
                    werr(format!(
                        "cannot read model directory {}: {e}",
                        dir.display()
                    ))
                })?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(werr(format!(
                "no *.safetensors files in {}; the engine reads Hugging Face safetensors checkpoints",
                dir.display()
            )));
        }
        let mut store = WeightStore {
            dir: dir.to_path_buf(),
            maps: Vec::new(),
            files: Vec::new(),
            location: HashMap::new(),
            gguf: None,
        };
        for path in files {
            let file = File::open(&path)
                .map_err(|e| werr(format!("cannot open {}: {e}", path.display())))?;
            // SAFETY: the checkpoint is treated as read-only; a concurrent writer would only
            // corrupt values, which the engine cannot guard against for any file read either.
            let map = unsafe { Mmap::map(&file) }
                .map_err(|e| werr(format!("cannot map {}: {e}", path.display())))?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| werr(format!("{} is not a safetensors file: {e}", path.display())))?;
            let idx = store.maps.len();
            for name in st.names() {
                store.location.insert(name.to_string(), idx);
            }
            store.maps.push(map);
            store.files.push(path);
        }
        Ok(store)
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        match &self.gguf {
            Some(g) => g.contains(name),
            None => self.location.contains_key(name),
        }
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>, EngineError> {
        if let Some(g) = &self.gguf {
            return g.view(name);
        }
        let Some(&i) = self.location.get(name) else {
            return Err(werr(format!(
                "tensor `{name}` is missing from the checkpoint in {}",
                self.dir.display()
            )));
        };
        let st = SafeTensors::deserialize(&self.maps[i])
            .map_err(|e| werr(format!("{}: {e}", self.files[i].display())))?;
        let v = st
            .tensor(name)
            .map_err(|e| werr(format!("{}: {name}: {e}", self.files[i].display())))?;
        let (start, len) = (
            v.data().as_ptr() as usize - self.maps[i].as_ptr() as usize,
            v.data().len(),
        );
        Ok((
            v.dtype(),
            v.shape().to_vec(),
            Cow::Borrowed(&self.maps[i][start..start + len]),
        ))
    }

    /// A matrix with the expected shape, bf16 kept, f16 widened.
    pub fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat, EngineError> {
        self.mat_slice(name, rows, cols, 0..rows, 0..cols)
    }

    /// Rows `rs` and columns `cs` of a `rows` x `cols` matrix; only those bytes are copied
    /// out of the mapped file (a tensor-parallel rank reads its shard, not the whole tensor).
    pub fn mat_slice(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        rs: Range<usize>,
        cs: Range<usize>,
    ) -> Result<Mat, EngineError> {
        if let Some(g) = &self.gguf
            && cs == (0..cols)
        {
            if let Some((q, d)) = g.q8_rows(name, rows, cols, rs.clone())? {
                return Ok(Mat {
                    rows: rs.len(),
                    cols,
                    data: WeightData::Q8_0 { q, d },
                });
            }
            if let Some(w) = g.q4_rows(name, rows, cols, rs.clone())? {
                return Ok(Mat {
                    rows: rs.len(),
                    cols,
                    data: WeightData::Q4(Box::new(w)),
                });
            }
            if let Some(k) = g.kquant_rows(name, rows, cols, rs.clone())? {
                return Ok(Mat {
                    rows: rs.len(),
                    cols,
                    data: WeightData::KQuant(k),
                });
            }
        }
        let (dtype, shape, bytes) = self.view(name)?;
        if shape != [rows, cols] {
            return Err(werr(format!(
                "tensor `{name}` has shape {shape:?} but config.json implies [{rows}, {cols}]"
            )));
        }
        if rs.end > rows || cs.end > cols {
            return Err(werr(format!(
                "tensor `{name}`: slice rows {rs:?} columns {cs:?} is outside [{rows}, {cols}]"
            )));
        }
        let size = match dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            other => {
                return Err(werr(format!(
                    "tensor `{name}` has dtype {other:?}; supported: bf16, f16, f32"
                )));
            }
        };
        let (out_rows, out_cols) = (rs.len(), cs.len());
        let picked: Cow<'_, [u8]> = if out_rows == rows && out_cols == cols {
            Cow::Borrowed(&bytes[..])
        } else if out_cols == cols {
            Cow::Borrowed(&bytes[rs.start * cols * size..rs.end * cols * size])
        } else {
            let mut v = Vec::with_capacity(out_rows * out_cols * size);
            for r in rs {
                let row = r * cols * size;
                v.extend_from_slice(&bytes[row + cs.start * size..row + cs.end * size]);
            }
            Cow::Owned(v)
        };
        let data = match dtype {
            Dtype::BF16 => WeightData::Bf16(bytemuck::pod_collect_to_vec(&picked)),
            _ => WeightData::F32(to_f32(name, dtype, &picked)?),
        };
        Ok(Mat {
            rows: out_rows,
            cols: out_cols,
            data,
        })
    }

    /// A vector of `len` values as f32.
    pub fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        self.vec_slice(name, len, 0..len)
    }

    /// Elements `range` of a vector of `len` values, as f32.
    pub fn vec_slice(
        &self,
        name: &str,
        len: usize,
        range: Range<usize>,
    ) -> Result<Vec<f32>, EngineError> {
        let (dtype, shape, bytes) = self.view(name)?;
        if shape.iter().product::<usize>() != len {
            return Err(werr(format!(
                "tensor `{name}` has shape {shape:?} but config.json implies {len} values"
            )));
        }
        if range.end > len {
            return Err(werr(format!(
                "tensor `{name}`: slice {range:?} is outside its {len} values"
            )));
        }
        let size = bytes.len() / len.max(1);
        to_f32(name, dtype, &bytes[range.start * size..range.end * size])
    }
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, EngineError> {
    Ok(match dtype {
        Dtype::F32 => bytemuck::pod_collect_to_vec(bytes),
        Dtype::BF16 => {
            let v: Vec<half::bf16> = bytemuck::pod_collect_to_vec(bytes);
            v.into_iter().map(f32::from).collect()
        }
        Dtype::F16 => {
            let v: Vec<half::f16> = bytemuck::pod_collect_to_vec(bytes);
            v.into_iter().map(f32::from).collect()
        }
        other => {
            return Err(werr(format!(
                "tensor `{name}` has dtype {other:?}; supported: bf16, f16, f32"
            )));
        }
    })
}
