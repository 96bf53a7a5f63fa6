//! GGUF checkpoints (llama.cpp's single-file format, versions 2 and 3): the header, the
//! metadata key/value pairs, the tensor infos and a memory map of the tensor data.
//!
//! [`locate`] says whether a model path is a GGUF checkpoint; [`meta`] turns the metadata
//! into the Hugging Face config.json the engine reads, and [`vocab`] builds the tokenizer.
//! Not for: dequantizing or computing on tensors (the worker's `model::gguf` does that).

pub mod meta;
pub mod pretok;
pub mod vocab;
pub mod write;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// Errors from finding or reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a GGUF file this reader understands, or is cut short.
    #[error("{path} is not a readable GGUF file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A directory holds several GGUF files and no config.json.
    #[error(
        "{dir} holds {count} .gguf files ({names}); pass the one to serve as MODEL (a file path)"
    )]
    Ambiguous {
        /// The directory.
        dir: PathBuf,
        /// How many .gguf files it holds.
        count: usize,
        /// Their names.
        names: String,
    },
    /// The metadata lacks a key the model needs, or holds a value the engine cannot use.
    #[error("{path}: {message}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong, and what is supported.
        message: String,
    },
}

/// A metadata value (GGUF value types 0 to 12).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned integers (u8, u16, u32, u64), widened.
    U64(u64),
    /// Signed integers (i8, i16, i32, i64), widened.
    I64(i64),
    /// Floats (f32, f64), widened.
    F64(f64),
    /// A bool.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    Str(String),
    /// An array of values of one type.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F64(v) => Some(v),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the file: its name, ggml type, dimensions and data offset.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions, innermost first: a `[rows, cols]` matrix is stored as `[cols, rows]`.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, ... 30 BF16).
    pub ggml_type: u32,
    /// Offset of the data from the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape outermost first (row-major, as safetensors and PyTorch write it).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The default alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// The format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
    map: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Whether `path` names a file with the `.gguf` extension.
pub fn is_gguf_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF file a model path stands for: the path itself when it is a `.gguf` file, or the
/// only `.gguf` file of a directory without config.json. `None` for anything else (a Hugging
/// Face directory, a missing path); several `.gguf` files and no config.json is an error.
pub fn locate(path: &Path) -> Result<Option<PathBuf>, GgufError> {
    if is_gguf_file(path) {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf_file(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        count => Err(GgufError::Ambiguous {
            dir: path.to_path_buf(),
            count,
            names: found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the checkpoint is treated as read-only; a concurrent writer would only
        // corrupt values, which no reader of a file can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self, GgufError> {
        let format = |message: String| GgufError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut r = Reader { buf: &map, pos: 0 };
        if r.bytes(4).map_err(&format)? != b"GGUF" {
            return Err(format(
                "the magic is not \"GGUF\" (is it a GGML/GGJT file or a safetensors file?)".into(),
            ));
        }
        let version = r.u32().map_err(&format)?;
        if !(2..=3).contains(&version) {
            return Err(format(format!(
                "version {version}; this reader supports GGUF versions 2 and 3 (convert older files with llama.cpp)"
            )));
        }
        let tensor_count = r.u64().map_err(&format)?;
        let kv_count = r.u64().map_err(&format)?;
        let mut metadata = Vec::new();
        for _ in 0..kv_count {
            let key = r.string().map_err(&format)?;
            let ty = r.u32().map_err(&format)?;
            let value = r
                .value(ty, 0)
                .map_err(|m| format(format!("key {key}: {m}")))?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string().map_err(&format)?;
            let n_dims = r.u32().map_err(&format)?;
            if n_dims > 8 {
                return Err(format(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()
                .map_err(&format)?;
            let ggml_type = r.u32().map_err(&format)?;
            let offset = r.u64().map_err(&format)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(format(format!(
                "general.alignment is {alignment}; it must be a power of two"
            )));
        }
        let data_start = (r.pos as u64).next_multiple_of(alignment) as usize;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            data_start,
            map,
        })
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor info of `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor, `len` bytes long (its size in its ggml type), from the map.
    pub fn tensor_bytes(&self, info: &TensorInfo, len: usize) -> Result<&[u8], GgufError> {
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        match start.and_then(|s| Some(s..s.checked_add(len)?)) {
            Some(range) if range.end <= self.map.len() => Ok(&self.map[range]),
            _ => Err(GgufError::Format {
                path: self.path.clone(),
                message: format!(
                    "tensor {} ({len} bytes at offset {}) runs past the end of the file; is it cut short?",
                    info.name, info.offset
                ),
            }),
        }
    }
}

/// A bounds-checked little-endian cursor over the file's header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Nesting limit of array values (the format has arrays of arrays; files use one level).
const MAX_ARRAY_DEPTH: usize = 4;

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(format!(
                "the header ends early (needs {n} bytes at offset {})",
                self.pos
            ));
        };
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let len = usize::try_from(len).map_err(|_| format!("string length {len}"))?;
        Ok(String::from_utf8_lossy(self.bytes(len)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U64(u64::from(self.array::<1>()?[0])),
            1 => MetaValue::I64(i64::from(i8::from_le_bytes(self.array()?))),
            2 => MetaValue::U64(u64::from(u16::from_le_bytes(self.array()?))),
            3 => MetaValue::I64(i64::from(i16::from_le_bytes(self.array()?))),
            4 => MetaValue::U64(u64::from(self.u32()?)),
            5 => MetaValue::I64(i64::from(i32::from_le_bytes(self.array()?))),
            6 => MetaValue::F64(f64::from(f32::from_le_bytes(self.array()?))),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let item = self.u32()?;
                let n = self.u64()?;
                // Each item takes at least one byte: a count past the file is a broken file,
                // not an allocation to attempt.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(format!("an array of {n} items is longer than the file"));
                }
                let items = (0..n)
                    .map(|_| self.value(item, depth + 1))
                    .collect::<Result<_, _>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
