//! Every CUDA kernel compiles with NVRTC, on machines without a GPU too, and the carried kernel
//! cache built from them is read back without loading NVRTC. `.ci/run` installs
//! NVRTC and the CUDA headers from PyPI and sets LLMAPI_REQUIRE_NVRTC=1; elsewhere the tests
//! print a notice and pass when NVRTC or the headers are absent. Warnings and errors of the
//! backend are logged to stderr (`RUST_LOG` widens or narrows that).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use llmapi_worker::backend::cuda::{
    CudaError, CudaVersion, KERNEL_FILES, KernelImage, KernelTarget, Library, cache,
    check_libraries, compile_kernel, device_arch, driver_cuda_version, find_headers,
    kernel_cache_dir, nvrtc_supported_archs, nvrtc_version,
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

/// The files of libnvrtc this process has mapped.
fn nvrtc_mapped() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|f| f.contains("libnvrtc"))
        .map(str::to_owned)
        .collect();
    files.dedup();
    files
}

const WARM_CHILD: &str = "LLMAPI_TEST_WARM_CACHE_CHILD";

/// The carried cache as `llmapi-launch kernels build` writes it: a manifest listing machine
/// code for each architecture asked, one ELF per kernel file for that architecture. Then a
/// fresh process (this test executable again) reads and verifies it for an sm_90 device,
/// as `Device::open` does before loading it, and must not have mapped libnvrtc.
#[test]
fn the_carried_cache_is_built_here_and_read_back_without_loading_nvrtc() {
    if let Some(dir) = std::env::var_os(WARM_CHILD) {
        // The child: nothing here has loaded NVRTC; the driver's CUDA is H100's 13.0.
        let driver = CudaVersion {
            major: 13,
            minor: 0,
        };
        let images = cache::warm_images(std::path::Path::new(&dir), KERNEL_FILES, 90, driver)
            .unwrap_or_else(|why| panic!("the cache is not warm: {why}"));
        assert_eq!(images.len(), KERNEL_FILES.len());
        assert!(
            images
                .iter()
                .all(|(_, i)| matches!(i, KernelImage::Cubin(b) if b.starts_with(b"\x7fELF"))),
            "machine code for every kernel file"
        );
        assert_eq!(
            nvrtc_mapped(),
            Vec::<String>::new(),
            "a warm cache loaded NVRTC"
        );
        println!("warm-cache-child: {} files, no libnvrtc", images.len());
        return;
    }
    if nvrtc_ready().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let built = cache::build(dir.path(), &[80, 90], KERNEL_FILES).unwrap();
    assert_eq!(built.len(), 2);
    let m = cache::Manifest::load(dir.path()).unwrap().unwrap();
    assert_eq!(m.archs.keys().collect::<Vec<_>>(), ["sm_80", "sm_90"]);
    let nvrtc = nvrtc_version().unwrap();
    for (arch, entry) in &m.archs {
        assert_eq!(entry.nvrtc, nvrtc.to_string());
        assert_eq!(entry.source_hash, cache::sources_hash(KERNEL_FILES));
        assert_eq!(entry.files.len(), KERNEL_FILES.len());
        for f in &entry.files {
            let bytes = std::fs::read(dir.path().join(&f.file)).unwrap();
            assert!(
                bytes.starts_with(b"\x7fELF"),
                "{arch} {}: not ELF",
                f.kernel
            );
            assert_eq!(bytes.len() as u64, f.bytes);
            // EM_CUDA machine code whose flags name the architecture (SASS, not PTX).
            assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 190);
            let sm: u32 = arch.trim_start_matches("sm_").parse().unwrap();
            assert_eq!(
                u32::from_le_bytes(bytes[48..52].try_into().unwrap()) & 0xff,
                sm
            );
        }
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_carried_cache_is_built_here_and_read_back_without_loading_nvrtc",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WARM_CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("warm-cache-child: 5 files, no libnvrtc"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same cache for a device it was not built for is a miss.
    let why = cache::warm_images(
        dir.path(),
        KERNEL_FILES,
        120,
        CudaVersion {
            major: 13,
            minor: 0,
        },
    )
    .unwrap_err();
    assert!(why.contains("sm_120"), "{why}");
}

/// Prints `kernel_cache=warm sm_XY DIR` or `kernel_cache=miss sm_XY: WHY` for the cache in
/// $LLMAPI_KERNEL_CACHE (or the default) and the device's architecture: $LLMAPI_GPU_ARCH
/// (`90` or `sm_90`) or device 0's, and the driver's CUDA: $LLMAPI_DRIVER_CUDA (`13.0`) or
/// libcuda's. scripts/gpu_check.sh's preflight records it. Loads no NVRTC.
#[test]
fn kernel_cache_state_is_reported() {
    let Some(dir) = kernel_cache_dir() else {
        println!("kernel_cache=unknown: no cache directory (set LLMAPI_KERNEL_CACHE)");
        return;
    };
    let given = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    // The first clause of a CUDA error (what is missing, not how to install it).
    let brief = |e: CudaError| {
        e.to_string()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let arch = match given("LLMAPI_GPU_ARCH") {
        Some(a) => cache::parse_arch(&a),
        None => device_arch(0).map_err(brief),
    };
    let driver = match given("LLMAPI_DRIVER_CUDA") {
        Some(v) => CudaVersion::parse(&v).ok_or_else(|| format!("LLMAPI_DRIVER_CUDA={v}")),
        None => driver_cuda_version().map_err(brief),
    };
    let (arch, driver) = match (arch, driver) {
        (Ok(a), Ok(d)) => (a, d),
        (Err(e), _) | (_, Err(e)) => {
            println!("kernel_cache=unknown: no device architecture or driver version ({e})");
            return;
        }
    };
    match cache::warm_images(&dir, KERNEL_FILES, arch, driver) {
        Ok(images) => println!(
            "kernel_cache=warm sm_{arch} {} ({} files)",
            dir.display(),
            images.len()
        ),
        Err(why) => println!("kernel_cache=miss sm_{arch}: {why}"),
    }
}
