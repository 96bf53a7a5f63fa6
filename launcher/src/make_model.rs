//! `llmapi-launch make-model`: writes a built-in checkpoint, and the cached demo model that
//! `serve` uses when no MODEL is given.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use llmapi_common::checkpoint::truncate::write_truncated;
use llmapi_common::checkpoint::{PRESET_NAMES, Preset, write_checkpoint};

/// Writes preset `name` into `out`, with a progress bar on a terminal.
pub fn make_model(name: &str, out: &Path, force: bool) -> anyhow::Result<()> {
    let Some(preset) = Preset::by_name(name) else {
        bail!(
            "unknown preset '{name}'; choose one of: {}",
            PRESET_NAMES.join(", ")
        );
    };
    if out.join("config.json").exists() && !force {
        bail!(
            "{} already holds a model (config.json exists); pass --force to overwrite it or choose another --out",
            out.display()
        );
    }
    let bar = ProgressBar::new(preset.parameters());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {percent}% ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!(
        "writing {} ({} parameters)",
        preset.name,
        preset.parameters()
    ));
    write_checkpoint(&preset, out, &mut |done, _| bar.set_position(done))
        .with_context(|| format!("writing the {name} checkpoint to {}", out.display()))?;
    bar.finish_and_clear();
    tracing::info!(preset = name, path = %out.display(), parameters = preset.parameters(), "checkpoint written");
    Ok(())
}

/// Writes the first `num_layers` layers of the checkpoint in `src` (with its embeddings,
/// final norm, head and tokenizer) into `out`: a draft model for speculative decoding.
pub fn make_draft(src: &Path, num_layers: usize, out: &Path, force: bool) -> anyhow::Result<()> {
    if out.join("config.json").exists() && !force {
        bail!(
            "{} already holds a model (config.json exists); pass --force to overwrite it or choose another --out",
            out.display()
        );
    }
    if out
        .canonicalize()
        .ok()
        .is_some_and(|o| src.canonicalize().ok() == Some(o))
    {
        bail!("--out is the --from checkpoint itself; choose another directory");
    }
    let t = write_truncated(src, num_layers, out)
        .with_context(|| format!("cutting a draft model from {}", src.display()))?;
    tracing::info!(
        from = %src.display(),
        path = %out.display(),
        layers = num_layers,
        source_layers = t.source_layers,
        tensors = t.tensors,
        bytes = t.bytes,
        "draft checkpoint written"
    );
    Ok(())
}

/// Where the demo model lives: $LLMAPI_CACHE_DIR, else $XDG_CACHE_HOME/llmapi, else
/// ~/.cache/llmapi; under `models/demo-v1`.
pub fn demo_model_dir() -> anyhow::Result<PathBuf> {
    let base = if let Some(d) = std::env::var_os("LLMAPI_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("llmapi")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".cache").join("llmapi")
    } else {
        bail!(
            "cannot place the demo model: set LLMAPI_CACHE_DIR, XDG_CACHE_HOME or HOME, or pass a MODEL directory"
        );
    };
    Ok(base.join("models").join("demo-v1"))
}

/// Returns the demo model's directory, writing it first if it is not there yet. The model is
/// written to a temporary sibling and renamed, so a half-written model is never used.
pub fn ensure_demo_model() -> anyhow::Result<PathBuf> {
    let dir = demo_model_dir()?;
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    let parent = dir.parent().context("demo model directory has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".demo-v1.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    make_model("demo", &tmp, true)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another process won the race: use its copy.
        Err(_) if dir.join("model.safetensors").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("moving the demo model to {}", dir.display()));
        }
    }
    tracing::info!(path = %dir.display(), "wrote the built-in demo model");
    Ok(dir)
}
