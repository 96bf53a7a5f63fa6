//! The CUDA backend's kernels and the checks that run before any CUDA call.
//!
//! cudarc is loaded dynamically, so every build works without CUDA; but cudarc panics when a
//! library it needs is missing, so `check_libraries` runs first and turns absence into an
//! error that says what to install. Kernels are CUDA C under `kernels/`, embedded in the
//! binary, compiled at start-up by NVRTC for the device's architecture and cached on disk by
//! source hash and architecture.

mod backend;
mod device;
pub mod graphs;
pub mod layout;
pub mod moe;
pub mod select;

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

pub use backend::{CudaBackend, CudaSettings};
pub use device::{copy_bandwidth_gbs, device_count, kernel_cache_dir};

/// Helpers prepended to every kernel file.
const COMMON: &str = include_str!("kernels/common.cuh");

/// Kernel files: (name, CUDA C source).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("rope", include_str!("kernels/rope.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("sampling", include_str!("kernels/sampling.cu")),
    ("moe", include_str!("kernels/moe.cu")),
];

/// Errors of the CUDA backend's set-up.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library cannot be loaded.
    #[error(
        "the CUDA library {library} cannot be loaded; install it (it ships with the NVIDIA driver or the CUDA toolkit, or in pip's nvidia-* packages) and put its directory on LD_LIBRARY_PATH, or run with --backend cpu{}",
        cuda13_hint(library)
    )]
    LibraryMissing {
        /// Library name, e.g. "libnvrtc".
        library: &'static str,
    },
    /// The driver loads but there is no usable device.
    #[error("no usable CUDA device: {0}; run with --backend cpu")]
    NoDevice(String),
    /// A CUDA driver or cuBLAS call failed while setting up.
    #[error("CUDA set-up failed: {0}")]
    Driver(String),
    /// The model or a setting is one the CUDA backend does not run.
    #[error("{0}")]
    Unsupported(String),
    /// cuda_bf16.h / cuda_fp8.h were not found for NVRTC.
    #[error(
        "CUDA headers (cuda_bf16.h) not found in {searched:?}; set LLMAPI_CUDA_INCLUDE to a directory that has them (CUDA toolkit include/, or pip's nvidia/cuda_runtime/include)"
    )]
    NoHeaders {
        /// Directories tried.
        searched: Vec<PathBuf>,
    },
    /// A kernel file does not compile.
    #[error("kernel {file}.cu does not compile for {arch}:\n{log}")]
    Compile {
        /// Kernel file name.
        file: String,
        /// Target architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
}

/// A CUDA library llmapi loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// The driver API (libcuda), from the NVIDIA driver.
    Driver,
    /// The runtime compiler (libnvrtc).
    Nvrtc,
    /// cuBLAS.
    Cublas,
    /// NCCL, the collectives of multi-GPU groups (`dist::nccl`).
    Nccl,
}

/// Checks that the libraries can be loaded, without calling into them.
pub fn check_libraries(needed: &[Library]) -> Result<(), CudaError> {
    for lib in needed {
        // SAFETY: is_culib_present only tries to dlopen the library by its candidate names and
        // closes it again; it calls no CUDA function.
        let (present, library) = unsafe {
            match lib {
                Library::Driver => (cudarc::driver::sys::is_culib_present(), "libcuda"),
                Library::Nvrtc => (cudarc::nvrtc::sys::is_culib_present(), "libnvrtc"),
                Library::Cublas => (cudarc::cublas::sys::is_culib_present(), "libcublas"),
                Library::Nccl => (cudarc::nccl::sys::is_culib_present(), "libnccl"),
            }
        };
        if !present {
            return Err(CudaError::LibraryMissing { library });
        }
    }
    Ok(())
}

/// cudarc 0.19 (built for CUDA 12) tries `libX.so`, `libX.so.12`, `.11`, ... but not CUDA 13's
/// `libX.so.13`. When a `.so.13` file sits in an LD_LIBRARY_PATH directory, say how to expose
/// it under the unversioned name cudarc also tries.
fn cuda13_hint(library: &str) -> String {
    let file = format!("{library}.so.13");
    let dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    match dirs.iter().find(|d| d.join(&file).is_file()) {
        Some(d) => format!(
            ". Found CUDA 13's {}, which cudarc does not look for: make a directory holding a symlink {library}.so -> that file and put it first on LD_LIBRARY_PATH (scripts/gpu_check.sh does this)",
            d.join(&file).display()
        ),
        None => String::new(),
    }
}

/// Names of the `extern "C" __global__` functions of a kernel source file.
pub fn kernel_names(source: &str) -> Vec<String> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Directories searched for cuda_bf16.h, in order: $LLMAPI_CUDA_INCLUDE, $CUDA_HOME/include,
/// $CUDA_PATH/include, /usr/local/cuda/include.
pub fn header_search_path() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("LLMAPI_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(PathBuf::from(d).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs
}

/// The first directory of `header_search_path()` that holds cuda_bf16.h.
pub fn find_headers() -> Result<PathBuf, CudaError> {
    let searched = header_search_path();
    searched
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or(CudaError::NoHeaders { searched })
}

/// The full source NVRTC compiles for a kernel file.
pub fn kernel_source(file_source: &str) -> String {
    format!("{COMMON}\n{file_source}")
}

/// 64-bit FNV-1a, stable across builds, for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compiles one kernel file for `arch` (e.g. "compute_90"), reusing `cache_dir/<hash>.ptx`
/// when the same source was compiled for the same architecture before.
pub fn compile_kernel(
    name: &str,
    source: &str,
    arch: &'static str,
    include_dir: &Path,
    cache_dir: Option<&Path>,
) -> Result<Ptx, CudaError> {
    let full = kernel_source(source);
    let key = fnv1a(&[full.as_bytes(), arch.as_bytes()]);
    let cached = cache_dir.map(|d| d.join(format!("{name}-{arch}-{key:016x}.ptx")));
    if let Some(path) = &cached
        && let Ok(text) = std::fs::read_to_string(path)
    {
        return Ok(Ptx::from_src(text));
    }
    check_libraries(&[Library::Nvrtc])?;
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include_dir.to_string_lossy().into_owned()],
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&full, opts).map_err(|e| CudaError::Compile {
        file: name.to_owned(),
        arch: arch.to_owned(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        },
    })?;
    if let Some(path) = &cached {
        write_cache(path, &ptx.to_src());
    }
    Ok(ptx)
}

/// Writes a cache file so that no reader ever sees part of it: the ranks of a group on one
/// node (or threads of one process) compile the same kernels at the same time, and one
/// reading a half-written PTX file would fail to load it. The text goes to a file of this
/// writer's own, then is renamed over the cache name. A cache that cannot be written costs a
/// recompile next time, nothing more.
fn write_cache(path: &Path, text: &str) {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(dir) = path.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{n}.tmp",
        path.file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
        std::process::id()
    ));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_writes_replace_the_file_whole_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k-compute_90-0.ptx");
        std::thread::scope(|s| {
            for i in 0..8 {
                let path = &path;
                s.spawn(move || write_cache(path, &format!("ptx {i} {}", "x".repeat(100_000))));
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("ptx ") && text.ends_with(&"x".repeat(100_000)));
        assert_eq!(text.len(), "ptx 0 ".len() + 100_000);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the cache file remains");
    }
}
