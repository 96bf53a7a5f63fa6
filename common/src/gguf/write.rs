//! Writes GGUF version 3 files: small hand-made checkpoints for tests and fixtures, so that
//! the reader, the config mapping and the weight loader are checked on real files.

use std::path::Path;

use super::{DEFAULT_ALIGNMENT, MetaValue};

/// A tensor to write: name, ggml dimensions (innermost first), ggml type and raw data.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// The tensor's name.
    pub name: String,
    /// ggml dimensions, innermost first.
    pub dims: Vec<u64>,
    /// The ggml type id.
    pub ggml_type: u32,
    /// The data in that type's layout.
    pub data: Vec<u8>,
}

/// Writes `metadata` and `tensors` to `path` as GGUF version 3, aligned as
/// `general.alignment` says (default 32).
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, MetaValue)],
    tensors: &[RawTensor],
) -> std::io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&type_of(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let align = metadata
        .iter()
        .find(|(k, _)| *k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT) as usize;
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).next_multiple_of(align);
    }
    let start = out.len().next_multiple_of(align);
    out.resize(start, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(start + off, 0);
        out.extend_from_slice(&t.data);
    }
    std::fs::write(path, out)
}

/// The GGUF value type written for `v`: u32/i32/f32 for numbers (as llama.cpp writes most
/// keys), an array's type from its first item (string for an empty array).
fn type_of(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U64(_) => 4,
        MetaValue::I64(_) => 5,
        MetaValue::F64(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U64(n) => out.extend_from_slice(&(*n as u32).to_le_bytes()),
        MetaValue::I64(n) => out.extend_from_slice(&(*n as i32).to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
        MetaValue::Bool(b) => out.push(u8::from(*b)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(items) => {
            let item = items.first().map_or(8, type_of);
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}
