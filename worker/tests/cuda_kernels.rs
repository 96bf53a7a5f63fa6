//! Every CUDA kernel compiles with NVRTC, on machines without a GPU too. `.ci/run` installs
//! NVRTC and the CUDA headers from PyPI and sets LLMAPI_REQUIRE_NVRTC=1; elsewhere the tests
//! print a notice and pass when NVRTC or the headers are absent. Warnings and errors of the
//! backend are logged to stderr (`RUST_LOG` widens or narrows that).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_worker::backend::cuda::{
    CudaError, KERNEL_FILES, KernelImage, KernelTarget, Library, check_libraries, compile_kernel,
    find_headers, nvrtc_supported_archs, nvrtc_version,
};

fn nvrtc_ready() -> Option<std::path::PathBuf> {
    llmapi_common::telemetry::init_logging("warning", llmapi_common::telemetry::LogFormat::Text);
    let ready = check_libraries(&[Library::Nvrtc]).and_then(|()| find_headers());
    match ready {
        Ok(dir) => Some(dir),
        Err(e) if std::env::var("LLMAPI_REQUIRE_NVRTC").is_ok_and(|v| v == "1") => {
            panic!("LLMAPI_REQUIRE_NVRTC=1 but: {e}")
        }
        Err(e) => {
            eprintln!("notice: skipping NVRTC checks: {e}");
            None
        }
    }
}

/// Names of the `extern "C" __global__` functions of a source file.
fn kernel_names(source: &str) -> Vec<String> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .map(|rest| rest.split('(').next().unwrap().trim().to_owned())
        .collect()
}

#[test]
fn every_kernel_compiles_to_ptx_for_ampere_and_hopper() {
    let Some(include) = nvrtc_ready() else { return };
    let nvrtc = nvrtc_version().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for target in [KernelTarget::Ptx(80), KernelTarget::Ptx(90)] {
        for (name, source) in KERNEL_FILES {
            let image = compile_kernel(name, source, target, nvrtc, &include, Some(cache.path()))
                .unwrap_or_else(|e| panic!("{e}"));
            let KernelImage::Ptx(text) = image else {
                panic!("{name}: PTX asked, machine code returned")
            };
            let names = kernel_names(source);
            assert!(!names.is_empty(), "{name}.cu declares kernels");
            for k in names {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{name}.cu: no entry {k} in the PTX"
                );
            }
        }
    }
    let files = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(
        files,
        2 * KERNEL_FILES.len(),
        "each compile is cached by source, target and NVRTC version"
    );
}

/// Machine code for the exact architecture, what a device whose architecture NVRTC knows
/// loads (backend/cuda/compile.rs): an ELF image naming every kernel.
#[test]
fn every_kernel_compiles_to_machine_code_for_ampere_and_hopper() {
    let Some(include) = nvrtc_ready() else { return };
    let nvrtc = nvrtc_version().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for target in [KernelTarget::Cubin(80), KernelTarget::Cubin(90)] {
        for (name, source) in KERNEL_FILES {
            let image = compile_kernel(name, source, target, nvrtc, &include, Some(cache.path()))
                .unwrap_or_else(|e| panic!("{e}"));
            let KernelImage::Cubin(bytes) = image else {
                panic!("{name}: machine code asked, PTX returned")
            };
            assert!(bytes.starts_with(b"\x7fELF"), "{name}: not an ELF image");
            for k in kernel_names(source) {
                assert!(
                    bytes.windows(k.len()).any(|w| w == k.as_bytes()),
                    "{name}.cu: no symbol {k} in the machine code"
                );
            }
            // A second compile of the same file reads the cache.
            let again =
                compile_kernel(name, source, target, nvrtc, &include, Some(cache.path())).unwrap();
            assert!(matches!(again, KernelImage::Cubin(b) if b == bytes));
        }
    }
    let files = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(files, 2 * KERNEL_FILES.len());
}

#[test]
fn a_kernel_that_does_not_compile_reports_nvrtcs_log() {
    let Some(include) = nvrtc_ready() else { return };
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }";
    let nvrtc = nvrtc_version().unwrap();
    let err = compile_kernel(
        "broken",
        broken,
        KernelTarget::Ptx(90),
        nvrtc,
        &include,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, CudaError::Compile { .. }));
    let text = err.to_string();
    assert!(
        text.contains("broken.cu") && text.contains("undefined_name"),
        "{text}"
    );
}

/// Prints `nvrtc_version=MAJOR.MINOR`, `nvrtc_archs=[..]` (the architectures it emits machine
/// code for) and `nvrtc_library=PATH` (each file of libnvrtc this
/// process mapped, as the loader resolved it), which scripts/gpu_check.sh's preflight
/// records beside the driver's CUDA version.
#[test]
fn nvrtc_version_and_library_are_reported() {
    if nvrtc_ready().is_none() {
        return;
    }
    let nvrtc = nvrtc_version().unwrap();
    assert!(nvrtc.major >= 11, "NVRTC reports {nvrtc}");
    println!("nvrtc_version={nvrtc}");
    println!("nvrtc_archs={:?}", nvrtc_supported_archs().unwrap());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut files: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|f| f.contains("libnvrtc"))
        .collect();
    files.dedup();
    assert!(
        !files.is_empty(),
        "libnvrtc is loaded but not in /proc/self/maps"
    );
    for f in files {
        println!("nvrtc_library={f}");
    }
}
