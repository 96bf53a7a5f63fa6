//! `llmapi-launch kernels build`: compiles the CUDA backend's kernels to machine code for
//! named GPU architectures with this machine's NVRTC, into a kernel cache directory that a GPU
//! machine without NVRTC loads (`LLMAPI_KERNEL_CACHE`; docs/cuda.md, "The carried kernel
//! cache"). Not for: loading it (the CUDA backend does that when it opens a device).

use std::path::Path;

use anyhow::Context;
use llmapi_worker::backend::cuda::{KERNEL_FILES, cache};

/// The architectures built when `--arch` is not given: Hopper (H100/H200).
pub const DEFAULT_ARCHS: &str = "sm_90";

/// Builds the cache for `archs` (`sm_90` or `90`, each) into `out` and prints one line per
/// architecture and the manifest's path.
pub fn build(out: &Path, archs: &[String]) -> anyhow::Result<()> {
    let mut numbers = Vec::with_capacity(archs.len());
    for a in archs {
        let n = cache::parse_arch(a.trim()).map_err(anyhow::Error::msg)?;
        if !numbers.contains(&n) {
            numbers.push(n);
        }
    }
    if numbers.is_empty() {
        anyhow::bail!("--arch is empty; name at least one architecture, e.g. --arch sm_90");
    }
    let built = cache::build(out, &numbers, KERNEL_FILES)
        .with_context(|| format!("building the kernel cache in {}", out.display()))?;
    for b in &built {
        println!(
            "{}: {} kernel files, {} KiB of machine code, NVRTC {}",
            b.arch,
            b.files,
            b.bytes.div_ceil(1024),
            b.nvrtc
        );
    }
    println!(
        "kernel cache: {} (on the GPU machine: LLMAPI_KERNEL_CACHE={})",
        out.join(cache::MANIFEST_FILE).display(),
        out.display()
    );
    Ok(())
}
