//! What NVRTC compiles the kernels to, and the on-disk cache of what it produced.
//!
//! PTX from an NVRTC newer than the driver's CUDA version does not load
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), while machine code (CUBIN) for the device's exact
//! architecture loads on any driver of the same CUDA major version or newer. So the kernels
//! are compiled to CUBIN for `sm_XY` when NVRTC can emit it for the device, to PTX when NVRTC
//! is no newer than the driver, and refused with the fix otherwise (`kernel_target`). A cache
//! file is named by the kernel, the target, the NVRTC version and a hash of all three with the
//! source, so output of another NVRTC is never reused. Not for: loading modules (`device.rs`).

use std::ffi::{CStr, CString};
use std::path::Path;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use super::{CudaError, Library, check_libraries, kernel_source};

/// A CUDA release, e.g. 13.0 (NVRTC's version, or the newest CUDA the driver supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    /// Major release, e.g. 13.
    pub major: i32,
    /// Minor release, e.g. 0.
    pub minor: i32,
}

impl CudaVersion {
    /// From `cuDriverGetVersion`'s code: 1000 x major + 10 x minor (13000 is 13.0).
    pub fn from_driver_code(code: i32) -> Self {
        Self {
            major: code / 1000,
            minor: (code % 1000) / 10,
        }
    }

    /// From "13.0" (as `Display` writes it); None for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.split_once('.')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the kernels are compiled to, with the architecture number (90 for sm_90/compute_90).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelTarget {
    /// Machine code for exactly this architecture (`sm_XY`).
    Cubin(i32),
    /// PTX for `compute_XY`, which the driver compiles when the module loads.
    Ptx(i32),
}

impl KernelTarget {
    /// NVRTC's `--gpu-architecture` value: `sm_90` or `compute_90`.
    pub fn arch(self) -> String {
        match self {
            Self::Cubin(a) => format!("sm_{a}"),
            Self::Ptx(a) => format!("compute_{a}"),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Cubin(_) => "cubin",
            Self::Ptx(_) => "ptx",
        }
    }
}

/// Chooses what NVRTC `nvrtc`, which emits machine code for `nvrtc_archs` (its
/// `nvrtcGetSupportedArchs`; empty when it cannot say), compiles to for a device of
/// architecture `device_arch` (10 x major + minor) under a driver supporting CUDA `driver`:
/// CUBIN for the device when NVRTC supports its architecture and is of the driver's major
/// release or older; else PTX for the newest architecture NVRTC knows up to the device's,
/// when NVRTC is no newer than the driver; else an error naming both versions and the fix.
pub fn kernel_target(
    nvrtc: CudaVersion,
    driver: CudaVersion,
    nvrtc_archs: &[i32],
    device_arch: i32,
) -> Result<KernelTarget, CudaError> {
    let too_new = |how: &str| {
        CudaError::Unsupported(format!(
            "NVRTC {nvrtc} is newer than the CUDA {driver} the NVIDIA driver supports and {how}; the PTX it emits would not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Put an NVRTC no newer than {driver} first on LD_LIBRARY_PATH (e.g. pip's nvidia-cuda-nvrtc {}.{}.*) or update the driver",
            driver.major, driver.minor
        ))
    };
    if nvrtc.major > driver.major {
        return Err(too_new("of a later major release"));
    }
    if nvrtc_archs.contains(&device_arch) {
        return Ok(KernelTarget::Cubin(device_arch));
    }
    if nvrtc > driver {
        return Err(too_new(&format!(
            "cannot emit machine code for the device's sm_{device_arch}"
        )));
    }
    if nvrtc_archs.is_empty() {
        return Ok(KernelTarget::Ptx(device_arch));
    }
    nvrtc_archs
        .iter()
        .copied()
        .filter(|&a| a <= device_arch)
        .max()
        .map(KernelTarget::Ptx)
        .ok_or_else(|| {
            CudaError::Unsupported(format!(
                "NVRTC {nvrtc} supports architectures {nvrtc_archs:?}, none of them sm_{device_arch} or older; use an NVRTC that supports this GPU"
            ))
        })
}

/// The cache file of kernel file `name` with full source `source` compiled for `target` by
/// NVRTC `nvrtc`.
pub fn cache_file_name(
    name: &str,
    source: &str,
    target: KernelTarget,
    nvrtc: CudaVersion,
) -> String {
    let arch = target.arch();
    let version = nvrtc.to_string();
    let key = fnv1a(&[source.as_bytes(), arch.as_bytes(), version.as_bytes()]);
    format!(
        "{name}-{arch}-nvrtc{version}-{key:016x}.{}",
        target.extension()
    )
}

/// 64-bit FNV-1a, stable across builds, for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A compiled kernel file, ready for `cuModuleLoadData`.
#[derive(Debug, Clone)]
pub enum KernelImage {
    /// PTX text.
    Ptx(String),
    /// An ELF image of machine code.
    Cubin(Vec<u8>),
}

impl KernelImage {
    /// The form cudarc loads.
    pub fn into_module(self) -> cudarc::nvrtc::Ptx {
        match self {
            Self::Ptx(text) => cudarc::nvrtc::Ptx::from_src(text),
            Self::Cubin(bytes) => cudarc::nvrtc::Ptx::from_binary(bytes),
        }
    }
}

/// The NVRTC release that `libnvrtc` resolves to.
pub fn nvrtc_version() -> Result<CudaVersion, CudaError> {
    check_libraries(&[Library::Nvrtc])?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc loads (checked above); nvrtcVersion writes two ints through pointers
    // to live locals.
    unsafe { nvrtc_sys::nvrtcVersion(&raw mut major, &raw mut minor) }
        .result()
        .map_err(|e| CudaError::Driver(format!("nvrtcVersion: {e}")))?;
    Ok(CudaVersion { major, minor })
}

/// The architectures (e.g. 90) NVRTC emits machine code for.
pub fn nvrtc_supported_archs() -> Result<Vec<i32>, CudaError> {
    check_libraries(&[Library::Nvrtc])?;
    let err = |e: nvrtc::NvrtcError| CudaError::Driver(format!("nvrtcGetSupportedArchs: {e}"));
    let mut n = 0;
    // SAFETY: libnvrtc loads (checked above); the count is written to a live local, then
    // exactly that many ints into a buffer of that length.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&raw mut n) }
        .result()
        .map_err(err)?;
    let mut archs = vec![0; usize::try_from(n).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: see above; `archs` holds `n` ints.
        unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(err)?;
    }
    Ok(archs)
}

/// The version of CUDA the NVIDIA driver supports (libcuda must load).
pub fn driver_cuda_version() -> Result<CudaVersion, CudaError> {
    check_libraries(&[Library::Driver])?;
    let mut code = 0;
    // SAFETY: libcuda loads (checked above); cuDriverGetVersion needs no cuInit and writes
    // one int through a pointer to a live local.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&raw mut code) }
        .result()
        .map_err(|e| CudaError::Driver(format!("cuDriverGetVersion: {e}")))?;
    Ok(CudaVersion::from_driver_code(code))
}

/// Compiles kernel file `name` (`source` without the common header) for `target` with NVRTC
/// `nvrtc`, reusing `cache_dir/<cache_file_name>` when it exists.
pub fn compile_kernel(
    name: &str,
    source: &str,
    target: KernelTarget,
    nvrtc_ver: CudaVersion,
    include_dir: &Path,
    cache_dir: Option<&Path>,
) -> Result<KernelImage, CudaError> {
    let full = kernel_source(source);
    let cached = cache_dir.map(|d| d.join(cache_file_name(name, &full, target, nvrtc_ver)));
    if let Some(path) = &cached
        && let Ok(bytes) = std::fs::read(path)
        && let Some(image) = image_from_bytes(target, bytes)
    {
        return Ok(image);
    }
    check_libraries(&[Library::Nvrtc])?;
    let image = run_nvrtc(name, &full, target, include_dir)?;
    if let Some(path) = &cached {
        match &image {
            KernelImage::Ptx(text) => write_cache(path, text.as_bytes()),
            KernelImage::Cubin(bytes) => write_cache(path, bytes),
        }
    }
    Ok(image)
}

fn image_from_bytes(target: KernelTarget, bytes: Vec<u8>) -> Option<KernelImage> {
    match target {
        KernelTarget::Ptx(_) => String::from_utf8(bytes).ok().map(KernelImage::Ptx),
        KernelTarget::Cubin(_) => bytes
            .starts_with(b"\x7fELF")
            .then_some(KernelImage::Cubin(bytes)),
    }
}

fn run_nvrtc(
    name: &str,
    full: &str,
    target: KernelTarget,
    include_dir: &Path,
) -> Result<KernelImage, CudaError> {
    let arch = target.arch();
    let fail = |log: String| CudaError::Compile {
        file: name.to_owned(),
        arch: arch.clone(),
        log,
    };
    let src = CString::new(full).map_err(|_| fail("the source holds a NUL byte".into()))?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| fail("bad file name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&file)).map_err(|e| fail(e.to_string()))?;
    let options = [
        format!("--include-path={}", include_dir.to_string_lossy()),
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, below, after its last use.
    let result = unsafe {
        match nvrtc::compile_program(prog, &options) {
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_else(|_| e.to_string());
                Err(fail(log))
            }
            Ok(()) => match target {
                KernelTarget::Ptx(_) => nvrtc::get_ptx(prog)
                    .map(|p| {
                        KernelImage::Ptx(CStr::from_ptr(p.as_ptr()).to_string_lossy().into_owned())
                    })
                    .map_err(|e| fail(format!("nvrtcGetPTX: {e}"))),
                KernelTarget::Cubin(_) => get_cubin(prog).map(KernelImage::Cubin).map_err(fail),
            },
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// The machine code of a compiled program.
///
/// # Safety
/// `prog` must be a live program that compiled for an `sm_XY` architecture.
unsafe fn get_cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: the caller's contract; the size goes to a live local.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &raw mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
    let mut bytes = vec![0u8; size];
    // SAFETY: `bytes` holds the `size` bytes NVRTC writes.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
    Ok(bytes)
}

/// Writes a cache file so that no reader ever sees part of it: the ranks of a group on one
/// node (or threads of one process) compile the same kernels at the same time, and one
/// reading a half-written file would fail to load it. The bytes go to a file of this writer's
/// own, then are renamed over the cache name. A cache that cannot be written costs a
/// recompile next time, nothing more.
pub(super) fn write_cache(path: &Path, bytes: &[u8]) {
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
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v(major: i32, minor: i32) -> CudaVersion {
        CudaVersion { major, minor }
    }

    /// NVRTC 12.9's and 13.0's sm targets (Hopper is 90, Blackwell 100/120).
    const ARCHS_12_9: &[i32] = &[
        50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 120, 121,
    ];
    const ARCHS_12_4: &[i32] = &[50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90];

    #[test]
    fn driver_codes_read_as_releases() {
        assert_eq!(CudaVersion::from_driver_code(13000), v(13, 0));
        assert_eq!(CudaVersion::from_driver_code(12080), v(12, 8));
        assert_eq!(v(13, 0).to_string(), "13.0");
        assert_eq!(CudaVersion::parse("12.9"), Some(v(12, 9)));
        assert_eq!(CudaVersion::parse("13"), None);
        assert!(v(13, 2) > v(13, 0) && v(12, 9) < v(13, 0));
    }

    #[test]
    fn machine_code_for_the_devices_arch_when_nvrtc_supports_it() {
        // The GPU machine: driver CUDA 13.0, H100 (sm_90).
        assert_eq!(
            kernel_target(v(13, 0), v(13, 0), ARCHS_12_9, 90).unwrap(),
            KernelTarget::Cubin(90)
        );
        // A newer minor NVRTC, whose PTX would not load, still gives loadable machine code.
        assert_eq!(
            kernel_target(v(13, 2), v(13, 0), ARCHS_12_9, 90).unwrap(),
            KernelTarget::Cubin(90)
        );
        // An older NVRTC under a newer driver.
        assert_eq!(
            kernel_target(v(12, 9), v(13, 0), ARCHS_12_9, 90).unwrap(),
            KernelTarget::Cubin(90)
        );
    }

    #[test]
    fn ptx_for_the_newest_known_arch_when_nvrtc_does_not_know_the_device() {
        // NVRTC 12.4 on a Blackwell (sm_120) under a 12.8 driver: PTX for compute_90, JIT-ed.
        assert_eq!(
            kernel_target(v(12, 4), v(12, 8), ARCHS_12_4, 120).unwrap(),
            KernelTarget::Ptx(90)
        );
        // An NVRTC that cannot list its architectures.
        assert_eq!(
            kernel_target(v(12, 4), v(12, 8), &[], 90).unwrap(),
            KernelTarget::Ptx(90)
        );
    }

    #[test]
    fn an_nvrtc_newer_than_the_driver_is_refused_when_only_ptx_could_be_made() {
        let e = kernel_target(v(13, 2), v(13, 0), ARCHS_12_4, 120)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NVRTC 13.2")
                && e.contains("CUDA 13.0")
                && e.contains("UNSUPPORTED_PTX_VERSION"),
            "{e}"
        );
        assert!(
            e.contains("no newer than 13.0") && e.contains("13.0.*"),
            "{e}"
        );
        // A later major release: neither its PTX nor its machine code loads.
        let e = kernel_target(v(13, 0), v(12, 8), ARCHS_12_9, 90)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("later major release") && e.contains("12.8"),
            "{e}"
        );
    }

    #[test]
    fn the_cache_key_holds_the_nvrtc_version_target_and_source() {
        let a = cache_file_name("rope", "src", KernelTarget::Cubin(90), v(13, 0));
        assert_eq!(
            a,
            cache_file_name("rope", "src", KernelTarget::Cubin(90), v(13, 0))
        );
        assert!(
            a.starts_with("rope-sm_90-nvrtc13.0-") && a.ends_with(".cubin"),
            "{a}"
        );
        let others = [
            cache_file_name("rope", "src", KernelTarget::Cubin(90), v(13, 2)),
            cache_file_name("rope", "src", KernelTarget::Ptx(90), v(13, 0)),
            cache_file_name("rope", "src", KernelTarget::Cubin(80), v(13, 0)),
            cache_file_name("rope", "src2", KernelTarget::Cubin(90), v(13, 0)),
        ];
        for o in &others {
            assert_ne!(&a, o);
        }
        // The hash alone differs too (a file renamed by hand is not mistaken for another).
        let hash = |n: &str| n.rsplit('-').next().unwrap().to_owned();
        assert_ne!(hash(&a), hash(&others[0]));
    }

    #[test]
    fn a_cached_file_of_the_wrong_kind_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let name = cache_file_name("k", &kernel_source("x"), KernelTarget::Cubin(90), v(13, 0));
        std::fs::write(dir.path().join(&name), "not an ELF").unwrap();
        // Without NVRTC here the recompile fails, which shows the bad file was not taken.
        let got = compile_kernel(
            "k",
            "x",
            KernelTarget::Cubin(90),
            v(13, 0),
            dir.path(),
            Some(dir.path()),
        );
        assert!(!matches!(got, Ok(KernelImage::Cubin(ref b)) if b == b"not an ELF"));
    }

    #[test]
    fn cache_writes_replace_the_file_whole_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k-compute_90-0.ptx");
        std::thread::scope(|s| {
            for i in 0..8 {
                let path = &path;
                s.spawn(move || {
                    write_cache(path, format!("ptx {i} {}", "x".repeat(100_000)).as_bytes())
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("ptx ") && text.ends_with(&"x".repeat(100_000)));
        assert_eq!(text.len(), "ptx 0 ".len() + 100_000);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the cache file remains");
    }
}
