//! The carried kernel cache: machine code (CUBIN) for named GPU architectures, built where
//! NVRTC is (CI, a build machine) and loaded on a GPU machine that has only libcuda and
//! cuBLAS.
//!
//! A cache directory holds the CUBIN files (named as `compile::cache_file_name` names them)
//! and `manifest.json`, which lists for each architecture the NVRTC that built it and, per
//! kernel file, the SHA-256 of the source it was compiled from, the file name and the SHA-256
//! of the machine code. `plan_kernels` decides from the manifest alone whether the kernels of
//! this build can be loaded for a device without NVRTC: it takes no NVRTC input, so a warm
//! cache never loads libnvrtc (cudarc resolves NVRTC on its first call only). Not for:
//! compiling (`compile.rs`) or loading modules into a context (`device.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::compile::write_cache;
use super::{
    CudaError, CudaVersion, KernelImage, KernelTarget, Library, cache_file_name, check_libraries,
    compile_kernel, find_headers, kernel_source, nvrtc_supported_archs, nvrtc_version,
};

/// The manifest's file name inside a cache directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest format this build reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// The command that builds a carried cache, for error messages (`{arch}` and `{dir}` filled).
pub fn build_command(arch: i32, dir: &str) -> String {
    format!("llmapi-launch kernels build --arch sm_{arch} --out {dir}")
}

/// What a cache directory holds, by architecture (`sm_90`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `MANIFEST_FORMAT` of the build that wrote it.
    pub format: u32,
    /// One entry per architecture, keyed `sm_XY`.
    pub archs: BTreeMap<String, ArchEntry>,
}

/// The machine code of every kernel file for one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchEntry {
    /// The NVRTC release that compiled it, e.g. "12.9".
    pub nvrtc: String,
    /// SHA-256 (hex) over every kernel file's full source, in `KERNEL_FILES` order.
    pub source_hash: String,
    /// One entry per kernel file.
    pub files: Vec<CachedFile>,
}

/// One kernel file's machine code in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// The kernel file, e.g. "attention".
    pub kernel: String,
    /// The CUBIN's file name inside the cache directory.
    pub file: String,
    /// SHA-256 (hex) of the full source (the common header and the file) it was built from.
    pub source_hash: String,
    /// SHA-256 (hex) of the CUBIN.
    pub sha256: String,
    /// The CUBIN's size in bytes.
    pub bytes: u64,
}

/// What `plan_kernels` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachePlan {
    /// Every kernel file has machine code for the device that this build's sources produced:
    /// load these files (in `KERNEL_FILES` order); NVRTC is not needed.
    Warm(Vec<CachedFile>),
    /// The cache cannot serve this device; why, in words.
    Miss(String),
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 over the full sources of `files` (name, source without the common header).
pub fn sources_hash(files: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    for (name, source) in files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(kernel_source(source).as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The architecture number of `sm_90` or `90` (10 x major + minor).
pub fn parse_arch(text: &str) -> Result<i32, String> {
    let digits = text.strip_prefix("sm_").unwrap_or(text);
    match digits.parse::<i32>() {
        Ok(n) if (10..1000).contains(&n) => Ok(n),
        _ => Err(format!(
            "--arch {text}: expected a GPU architecture like sm_90 (H100/H200) or sm_80 (A100)"
        )),
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`: None when there is none; an error naming the file when it
    /// cannot be read or parsed.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{} cannot be read: {e}", path.display())),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{} is not a kernel cache manifest: {e}", path.display()))
    }

    /// Writes `dir/manifest.json` whole (a reader never sees part of it).
    pub fn store(&self, dir: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| format!("serializing the kernel cache manifest: {e}"))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating the kernel cache {}: {e}", dir.display()))?;
        let path = dir.join(MANIFEST_FILE);
        write_cache(&path, text.as_bytes());
        match std::fs::read(&path) {
            Ok(b) if b == text.as_bytes() => Ok(()),
            _ => Err(format!(
                "{} could not be written; check that the directory is writable",
                path.display()
            )),
        }
    }
}

/// Decides from `manifest` alone whether every kernel file of `files` (name, source) can be
/// loaded as machine code for a device of architecture `device_arch` under a driver of CUDA
/// `driver`: the manifest has an entry for `sm_XY`, built by an NVRTC of the driver's major
/// release or older (machine code of a later major does not load), and for every kernel
/// file an entry whose source hash and file name are those of this build's source.
pub fn plan_kernels(
    manifest: Option<&Manifest>,
    files: &[(&str, &str)],
    device_arch: i32,
    driver: CudaVersion,
) -> CachePlan {
    let arch = format!("sm_{device_arch}");
    let Some(m) = manifest else {
        return CachePlan::Miss(format!("it has no {MANIFEST_FILE}"));
    };
    if m.format != MANIFEST_FORMAT {
        return CachePlan::Miss(format!(
            "its manifest is format {}, this build reads format {MANIFEST_FORMAT}",
            m.format
        ));
    }
    let Some(entry) = m.archs.get(&arch) else {
        let held: Vec<&str> = m.archs.keys().map(String::as_str).collect();
        return CachePlan::Miss(format!(
            "it holds machine code for [{}], not this GPU's {arch}",
            held.join(", ")
        ));
    };
    let Some(nvrtc) = CudaVersion::parse(&entry.nvrtc) else {
        return CachePlan::Miss(format!(
            "its {arch} entry names NVRTC '{}', not a version",
            entry.nvrtc
        ));
    };
    if nvrtc.major > driver.major {
        return CachePlan::Miss(format!(
            "its {arch} machine code was built by NVRTC {nvrtc}, of a later major release than the driver's CUDA {driver}, and would not load"
        ));
    }
    let mut warm = Vec::with_capacity(files.len());
    for (name, source) in files {
        let Some(f) = entry.files.iter().find(|f| f.kernel == *name) else {
            return CachePlan::Miss(format!("its {arch} entry has no kernel file {name}"));
        };
        let full = kernel_source(source);
        let hash = sha256_hex(full.as_bytes());
        if f.source_hash != hash {
            return CachePlan::Miss(format!(
                "its {arch} {name}.cu was built from another source (hash {}, this build's {}); rebuild the cache from this build",
                short(&f.source_hash),
                short(&hash)
            ));
        }
        let expected = cache_file_name(name, &full, KernelTarget::Cubin(device_arch), nvrtc);
        if f.file != expected {
            return CachePlan::Miss(format!(
                "its {arch} {name}.cu names file '{}', expected '{expected}'",
                f.file
            ));
        }
        warm.push(f.clone());
    }
    CachePlan::Warm(warm)
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The machine code of every kernel file of `files` for a device of `device_arch` under a
/// driver of CUDA `driver`, read from cache directory `dir` and checked against its manifest
/// (size and SHA-256 of each file; one that differs is removed); `Err` says why the cache
/// cannot serve. Calls neither NVRTC nor CUDA.
pub fn warm_images(
    dir: &Path,
    files: &[(&str, &str)],
    device_arch: i32,
    driver: CudaVersion,
) -> Result<Vec<(String, KernelImage)>, String> {
    let manifest = Manifest::load(dir)?;
    let listed = match plan_kernels(manifest.as_ref(), files, device_arch, driver) {
        CachePlan::Warm(listed) => listed,
        CachePlan::Miss(why) => return Err(why),
    };
    listed
        .into_iter()
        .map(|f| {
            let path = dir.join(&f.file);
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
            if bytes.len() as u64 != f.bytes
                || sha256_hex(&bytes) != f.sha256
                || !bytes.starts_with(b"\x7fELF")
            {
                // Removed, so that a recompile under the same name does not take it back.
                let removed = std::fs::remove_file(&path).is_ok();
                return Err(format!(
                    "{} differs from its manifest entry (size or SHA-256){}; rebuild the cache",
                    path.display(),
                    if removed { " and was removed" } else { "" }
                ));
            }
            Ok((f.kernel, KernelImage::Cubin(bytes)))
        })
        .collect()
}

/// The manifest entry of `images` (kernel file name, CUBIN), compiled from `files` by NVRTC
/// `nvrtc` for `sm_{arch}`; a file without an image is left out (the entry then misses).
fn arch_entry(
    arch: i32,
    nvrtc: CudaVersion,
    files: &[(&str, &str)],
    images: &[(String, Vec<u8>)],
) -> ArchEntry {
    let entries = files
        .iter()
        .filter_map(|(name, source)| {
            let (_, bytes) = images.iter().find(|(k, _)| k == name)?;
            let full = kernel_source(source);
            Some(CachedFile {
                kernel: (*name).to_owned(),
                file: cache_file_name(name, &full, KernelTarget::Cubin(arch), nvrtc),
                source_hash: sha256_hex(full.as_bytes()),
                sha256: sha256_hex(bytes),
                bytes: bytes.len() as u64,
            })
        })
        .collect();
    ArchEntry {
        nvrtc: nvrtc.to_string(),
        source_hash: sources_hash(files),
        files: entries,
    }
}

/// Adds (or replaces) the `sm_{arch}` entry of `dir`'s manifest for machine code NVRTC
/// `nvrtc` compiled from `files`, whose CUBIN files are already in `dir`. A manifest of
/// another format is replaced.
pub fn record(
    dir: &Path,
    arch: i32,
    nvrtc: CudaVersion,
    files: &[(&str, &str)],
    images: &[(String, Vec<u8>)],
) -> Result<Manifest, String> {
    let mut m = Manifest::load(dir)
        .ok()
        .flatten()
        .filter(|m| m.format == MANIFEST_FORMAT)
        .unwrap_or(Manifest {
            format: MANIFEST_FORMAT,
            archs: BTreeMap::new(),
        });
    m.archs
        .insert(format!("sm_{arch}"), arch_entry(arch, nvrtc, files, images));
    m.store(dir)?;
    Ok(m)
}

/// What `build` wrote for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// `sm_XY`.
    pub arch: String,
    /// The NVRTC release that compiled it.
    pub nvrtc: CudaVersion,
    /// CUBIN files written.
    pub files: usize,
    /// Their bytes together.
    pub bytes: u64,
}

/// Compiles every kernel file of `files` to machine code for each of `archs` with this
/// machine's NVRTC (and CUDA headers) into `out`, and records them in `out`'s manifest: the
/// carried cache a GPU machine without NVRTC loads (`warm_images`).
pub fn build(out: &Path, archs: &[i32], files: &[(&str, &str)]) -> Result<Vec<Built>, CudaError> {
    check_libraries(&[Library::Nvrtc])?;
    let include = find_headers()?;
    let nvrtc = nvrtc_version()?;
    let supported = nvrtc_supported_archs()?;
    if let Some(bad) = archs
        .iter()
        .find(|a| !supported.is_empty() && !supported.contains(a))
    {
        return Err(CudaError::Unsupported(format!(
            "NVRTC {nvrtc} cannot emit machine code for sm_{bad} (it can for {}); use an NVRTC that supports that GPU",
            supported
                .iter()
                .map(|a| format!("sm_{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| {
        CudaError::Unsupported(format!(
            "cannot create the kernel cache {}: {e}",
            out.display()
        ))
    })?;
    let mut built = Vec::with_capacity(archs.len());
    for &arch in archs {
        let mut images = Vec::with_capacity(files.len());
        for (name, source) in files {
            let image = compile_kernel(
                name,
                source,
                KernelTarget::Cubin(arch),
                nvrtc,
                &include,
                Some(out),
            )?;
            let KernelImage::Cubin(bytes) = image else {
                return Err(CudaError::Unsupported(format!(
                    "NVRTC returned PTX for {name}.cu when sm_{arch} machine code was asked"
                )));
            };
            images.push(((*name).to_owned(), bytes));
        }
        for (name, source) in files {
            let file = out.join(cache_file_name(
                name,
                &kernel_source(source),
                KernelTarget::Cubin(arch),
                nvrtc,
            ));
            if !file.is_file() {
                return Err(CudaError::Unsupported(format!(
                    "{} was not written; check that {} is writable",
                    file.display(),
                    out.display()
                )));
            }
        }
        record(out, arch, nvrtc, files, &images).map_err(CudaError::Unsupported)?;
        built.push(Built {
            arch: format!("sm_{arch}"),
            nvrtc,
            files: images.len(),
            bytes: images.iter().map(|(_, b)| b.len() as u64).sum(),
        });
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: &[(&str, &str)] = &[
        ("a", "extern \"C\" __global__ void ka(float* x) {}"),
        ("b", "extern \"C\" __global__ void kb(float* x) {}"),
    ];
    const V12_9: CudaVersion = CudaVersion {
        major: 12,
        minor: 9,
    };
    const V13_0: CudaVersion = CudaVersion {
        major: 13,
        minor: 0,
    };

    fn elf(tag: &str) -> Vec<u8> {
        [b"\x7fELF".as_slice(), tag.as_bytes()].concat()
    }

    /// A cache directory as `build` leaves it, with stand-in machine code (no NVRTC here).
    fn cache(archs: &[i32], nvrtc: CudaVersion) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for &arch in archs {
            let images: Vec<(String, Vec<u8>)> = FILES
                .iter()
                .map(|(n, _)| ((*n).to_owned(), elf(&format!("{n}{arch}"))))
                .collect();
            for ((n, s), (_, bytes)) in FILES.iter().zip(&images) {
                let name = cache_file_name(n, &kernel_source(s), KernelTarget::Cubin(arch), nvrtc);
                std::fs::write(dir.path().join(name), bytes).unwrap();
            }
            record(dir.path(), arch, nvrtc, FILES, &images).unwrap();
        }
        dir
    }

    fn miss(plan: CachePlan) -> String {
        match plan {
            CachePlan::Miss(why) => why,
            CachePlan::Warm(f) => panic!("expected a miss, got warm {f:?}"),
        }
    }

    #[test]
    fn a_cache_built_for_the_devices_arch_is_warm_without_any_nvrtc_input() {
        let dir = cache(&[80, 90], V12_9);
        let m = Manifest::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            m.archs.keys().collect::<Vec<_>>(),
            ["sm_80", "sm_90"],
            "both builds recorded"
        );
        // The decision's inputs: the manifest, this build's sources, the device and the driver
        // (libcuda); nothing from NVRTC.
        let CachePlan::Warm(files) = plan_kernels(Some(&m), FILES, 90, V13_0) else {
            panic!("warm expected")
        };
        assert_eq!(
            files.iter().map(|f| f.kernel.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let images = warm_images(dir.path(), FILES, 90, V13_0).unwrap();
        assert!(matches!(&images[1], (k, KernelImage::Cubin(b)) if k == "b" && *b == elf("b90")));
    }

    #[test]
    fn another_arch_or_source_is_a_miss_naming_why() {
        let dir = cache(&[80], V12_9);
        let m = Manifest::load(dir.path()).unwrap().unwrap();
        let why = miss(plan_kernels(Some(&m), FILES, 90, V13_0));
        assert!(why.contains("[sm_80]") && why.contains("sm_90"), "{why}");

        let dir = cache(&[90], V12_9);
        let m = Manifest::load(dir.path()).unwrap().unwrap();
        let changed = [
            FILES[0],
            ("b", "extern \"C\" __global__ void kb(int* x) {}"),
        ];
        let why = miss(plan_kernels(Some(&m), &changed, 90, V13_0));
        assert!(why.contains("b.cu was built from another source"), "{why}");
        let more = [FILES[0], FILES[1], ("c", "")];
        let why = miss(plan_kernels(Some(&m), &more, 90, V13_0));
        assert!(why.contains("no kernel file c"), "{why}");
        let why = miss(plan_kernels(None, FILES, 90, V13_0));
        assert!(why.contains(MANIFEST_FILE), "{why}");
    }

    #[test]
    fn machine_code_of_a_later_major_nvrtc_than_the_driver_is_a_miss() {
        let dir = cache(&[90], V13_0);
        let m = Manifest::load(dir.path()).unwrap().unwrap();
        let why = miss(plan_kernels(Some(&m), FILES, 90, V12_9));
        assert!(
            why.contains("NVRTC 13.0") && why.contains("CUDA 12.9"),
            "{why}"
        );
        // An older NVRTC's machine code loads under a newer driver.
        let old = cache(&[90], V12_9);
        let m = Manifest::load(old.path()).unwrap().unwrap();
        assert!(matches!(
            plan_kernels(Some(&m), FILES, 90, V13_0),
            CachePlan::Warm(_)
        ));
    }

    #[test]
    fn a_hand_edited_manifest_or_file_is_not_loaded() {
        let dir = cache(&[90], V12_9);
        let mut m = Manifest::load(dir.path()).unwrap().unwrap();
        // A file name that is not the one this source, arch and NVRTC give.
        if let Some(e) = m.archs.get_mut("sm_90") {
            e.files[0].file = "../elsewhere.cubin".into();
        }
        let why = miss(plan_kernels(Some(&m), FILES, 90, V13_0));
        assert!(why.contains("expected 'a-sm_90-nvrtc12.9-"), "{why}");
        // Machine code changed after the manifest was written.
        let f = &Manifest::load(dir.path()).unwrap().unwrap().archs["sm_90"].files[1];
        std::fs::write(dir.path().join(&f.file), elf("tampered")).unwrap();
        let why = warm_images(dir.path(), FILES, 90, V13_0).unwrap_err();
        assert!(why.contains("differs from its manifest entry"), "{why}");
        assert!(
            !dir.path().join(&f.file).exists(),
            "a file that fails verification is not left for a recompile to reuse"
        );
        // A manifest that does not parse is named.
        std::fs::write(dir.path().join(MANIFEST_FILE), "{").unwrap();
        let why = warm_images(dir.path(), FILES, 90, V13_0).unwrap_err();
        assert!(why.contains("not a kernel cache manifest"), "{why}");
    }

    #[test]
    fn without_cache_or_nvrtc_the_error_is_one_line_naming_the_arch_and_the_build_command() {
        let e = CudaError::NoKernels {
            arch: 90,
            cache: "/c".into(),
            miss: miss(plan_kernels(None, FILES, 90, V13_0)),
            cause: "libnvrtc cannot be loaded".into(),
            command: build_command(90, "DIR"),
        }
        .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("sm_90")
                && e.contains("libnvrtc cannot be loaded")
                && e.contains("`llmapi-launch kernels build --arch sm_90 --out DIR`")
                && e.contains("LLMAPI_KERNEL_CACHE=DIR"),
            "{e}"
        );
    }

    #[test]
    fn archs_parse_from_sm_names_and_numbers() {
        assert_eq!(parse_arch("sm_90"), Ok(90));
        assert_eq!(parse_arch("80"), Ok(80));
        assert!(parse_arch("hopper").unwrap_err().contains("sm_90"));
        assert!(parse_arch("sm_9").is_err());
        assert_eq!(
            build_command(90, "DIR"),
            "llmapi-launch kernels build --arch sm_90 --out DIR"
        );
    }
}
