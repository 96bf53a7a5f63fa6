//! The CUDA backend's kernels and the checks that run before any CUDA call.
//!
//! cudarc is loaded dynamically, so every build works without CUDA; but cudarc panics when a
//! library it needs is missing, so `check_libraries` runs first and turns absence into an
//! error that says what to install. Kernels are CUDA C under `kernels/`, embedded in the
//! binary, compiled at start-up by NVRTC for the device's architecture (machine code where
//! NVRTC can emit it, `compile.rs`) and cached on disk by source, target and NVRTC version;
//! a cache of machine code built elsewhere and carried (`cache.rs`) is loaded without NVRTC.

mod backend;
pub mod cache;
mod compile;
mod device;
pub mod graphs;
pub mod layout;
pub mod moe;
pub mod select;

use std::path::PathBuf;

pub use backend::{CudaBackend, CudaSettings};
pub use compile::{
    CudaVersion, KernelImage, KernelTarget, cache_file_name, compile_kernel, driver_cuda_version,
    kernel_target, nvrtc_supported_archs, nvrtc_version,
};
pub use device::{
    check_kernels_available, copy_bandwidth_gbs, device_arch, device_count, kernel_cache_dir,
};

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
    /// The kernel cache cannot serve the device and NVRTC cannot compile the kernels.
    #[error(
        "no CUDA kernels for this GPU's sm_{arch}: the kernel cache {cache} cannot serve it ({miss}) and NVRTC cannot compile them ({cause}); build the cache where NVRTC is with `{command}`, carry DIR here and set LLMAPI_KERNEL_CACHE=DIR, or install NVRTC and the CUDA headers"
    )]
    NoKernels {
        /// The device's architecture (90 for sm_90).
        arch: i32,
        /// The cache directory looked at.
        cache: String,
        /// Why the cache cannot serve the device.
        miss: String,
        /// Why NVRTC cannot compile (library or headers missing).
        cause: String,
        /// The command that builds the cache for this architecture.
        command: String,
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
