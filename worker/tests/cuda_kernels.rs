//! Every CUDA kernel compiles with NVRTC, on machines without a GPU too. `.ci/run` installs
//! NVRTC and the CUDA headers from PyPI and sets LLMAPI_REQUIRE_NVRTC=1; elsewhere the tests
//! print a notice and pass when NVRTC or the headers are absent.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_worker::backend::cuda::{
    CudaError, KERNEL_FILES, Library, check_libraries, compile_kernel, find_headers,
};

fn nvrtc_ready() -> Option<std::path::PathBuf> {
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
fn every_kernel_compiles_for_ampere_and_hopper() {
    let Some(include) = nvrtc_ready() else { return };
    let cache = tempfile::tempdir().unwrap();
    for arch in ["compute_80", "compute_90"] {
        for (name, source) in KERNEL_FILES {
            let ptx = compile_kernel(name, source, arch, &include, Some(cache.path()))
                .unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
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
        "each compile is cached by source and arch"
    );
}

#[test]
fn a_kernel_that_does_not_compile_reports_nvrtcs_log() {
    let Some(include) = nvrtc_ready() else { return };
    let broken = "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }";
    let err = compile_kernel("broken", broken, "compute_90", &include, None).unwrap_err();
    assert!(matches!(err, CudaError::Compile { .. }));
    let text = err.to_string();
    assert!(
        text.contains("broken.cu") && text.contains("undefined_name"),
        "{text}"
    );
}
