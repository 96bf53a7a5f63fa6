//! A draft model cut from a checkpoint: its first N decoder layers with the embeddings, the
//! final norm and the head, in Hugging Face layout with the source's tokenizer files.
//!
//! Speculative decoding's DraftTarget mode needs a smaller model with the same tokenizer;
//! cutting layers from the target gives one whose guesses agree with the target often
//! (`llmapi-launch make-model --from DIR --num_layers N --out OUT`).

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use super::CheckpointError;

/// What [`write_truncated`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// Decoder layers of the source.
    pub source_layers: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// The decoder layer a tensor name belongs to (`...layers.{i}....`), if any.
fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Writes the first `num_layers` decoder layers of the checkpoint in `src` into `out`
/// (created if needed): config.json with `num_hidden_layers` (and `layer_types`) cut, one
/// model.safetensors with every tensor outside the dropped layers, and every other file of
/// `src` (tokenizer, chat template, generation config) copied.
pub fn write_truncated(
    src: &Path,
    num_layers: usize,
    out: &Path,
) -> Result<Truncated, CheckpointError> {
    let read_err = |path: &Path, e: &dyn std::fmt::Display| {
        CheckpointError::Source(format!("cannot read {}: {e}", path.display()))
    };
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| CheckpointError::Io { path, source }
    };
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| read_err(&config_path, &e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| read_err(&config_path, &e))?;
    let source_layers = config
        .get("num_hidden_layers")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            CheckpointError::Source(format!(
                "{} has no num_hidden_layers: is it a decoder-only checkpoint?",
                config_path.display()
            ))
        })? as usize;
    if num_layers == 0 || num_layers > source_layers {
        return Err(CheckpointError::Source(format!(
            "--num_layers is {num_layers} but {} has {source_layers} layers; keep between 1 and {source_layers}",
            src.display()
        )));
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(|e| read_err(src, &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(CheckpointError::Source(format!(
            "{} holds no .safetensors files",
            src.display()
        )));
    }
    let maps = shards
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p).map_err(|e| read_err(p, &e))?;
            // SAFETY: the file is only read, and the checkpoint is not written while it is cut.
            unsafe { memmap2::Mmap::map(&f) }.map_err(|e| read_err(p, &e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (map, path) in maps.iter().zip(&shards) {
        let st = SafeTensors::deserialize(map).map_err(|e| read_err(path, &e))?;
        for (name, t) in st.tensors() {
            if layer_of(&name).is_some_and(|l| l >= num_layers) {
                continue;
            }
            views.push((name, t));
        }
    }
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = views.iter().map(|(_, v)| v.data().len() as u64).sum();
    let tensors = views.len();

    std::fs::create_dir_all(out).map_err(write_err(out))?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("num_hidden_layers".into(), num_layers.into());
        if let Some(types) = obj.get_mut("layer_types").and_then(|v| v.as_array_mut()) {
            types.truncate(num_layers);
        }
        obj.insert(
            "llmapi_truncated_from".into(),
            serde_json::json!({"layers": source_layers, "kept": num_layers}),
        );
    }
    let out_config = out.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    std::fs::write(&out_config, text).map_err(write_err(&out_config))?;
    for entry in std::fs::read_dir(src).map_err(|e| read_err(src, &e))? {
        let path = entry.map_err(|e| read_err(src, &e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let skip = name == "config.json"
            || name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || !path.is_file();
        if !skip {
            let dst = out.join(name);
            std::fs::copy(&path, &dst).map_err(write_err(&dst))?;
        }
    }
    let weights = out.join("model.safetensors");
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    safetensors::serialize_to_file(views, metadata, &weights)
        .map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    Ok(Truncated {
        source_layers,
        tensors,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Preset, write_checkpoint};

    #[test]
    fn keeps_the_first_layers_the_head_and_the_tokenizer() {
        let d = tempfile::tempdir().unwrap();
        let (src, out) = (d.path().join("src"), d.path().join("draft"));
        let preset = Preset::by_name("demo").unwrap();
        write_checkpoint(&preset, &src, &mut |_, _| {}).unwrap();
        let t = write_truncated(&src, 1, &out).unwrap();
        assert_eq!(t.source_layers, preset.num_hidden_layers);

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["num_hidden_layers"], 1);
        assert_eq!(config["hidden_size"], preset.hidden_size);
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(src.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{f}"
            );
        }
        // Every kept tensor is byte-identical to the source's; layers past the first are gone.
        let (a, b) = (
            std::fs::read(src.join("model.safetensors")).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        );
        let (a, b) = (
            SafeTensors::deserialize(&a).unwrap(),
            SafeTensors::deserialize(&b).unwrap(),
        );
        let kept: Vec<String> = b.names().into_iter().map(String::from).collect();
        assert_eq!(kept.len(), t.tensors);
        assert!(kept.iter().any(|n| n == "lm_head.weight"), "{kept:?}");
        assert!(kept.iter().any(|n| n == "model.norm.weight"), "{kept:?}");
        assert!(kept.iter().any(|n| n.starts_with("model.layers.0.")));
        assert!(!kept.iter().any(|n| layer_of(n).is_some_and(|l| l >= 1)));
        let dropped = a.names().len() - kept.len();
        assert!(dropped > 0);
        for n in &kept {
            assert_eq!(
                a.tensor(n).unwrap().data(),
                b.tensor(n).unwrap().data(),
                "{n}"
            );
        }
    }

    #[test]
    fn a_layer_count_outside_the_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write_checkpoint(&Preset::by_name("demo").unwrap(), &src, &mut |_, _| {}).unwrap();
        for n in [0, 99] {
            let e = write_truncated(&src, n, &d.path().join("x")).unwrap_err();
            assert!(e.to_string().contains("keep between 1 and"), "{e}");
        }
        let e = write_truncated(&d.path().join("nothing"), 1, &d.path().join("y")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
