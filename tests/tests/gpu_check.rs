//! scripts/gpu_check.sh, the one command of a GPU machine's short loan, checked here without a
//! GPU: its plan fits its time budget; a run on a machine without a GPU records every step
//! (failed or skipped, with a reason) in $OUT, stops after the backend fails to open, and
//! exits 1; a step past its budget is cut and what no longer fits is skipped; the
//! transformers step gets the loader path the script was started with; a carried kernel
//! cache (beside the executables or in their archive) is what the steps get as
//! LLMAPI_KERNEL_CACHE and the preflight records whether it is warm; and `gpu_check.sh
//! kernel-cache` builds the cache here with CI's NVRTC (manifest and CUBINs).
//!
//! The staged executables are stand-in shell scripts here (test doubles): the real ones are
//! release builds (`scripts/gpu_check.sh stage`), too slow to build for every test run. The
//! kernel cache build runs the real `llmapi-launch`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu_check.sh")
}

/// (step, budget) rows of `gpu_check.sh plan`, and its (sum, total) line.
fn plan(extra: &[&str]) -> (Vec<(String, u64)>, (u64, u64)) {
    let out = Command::new("bash")
        .arg(script())
        .arg("plan")
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"total") {
            // "total 475 s of a 480 s budget"
            total = Some((words[1].parse().unwrap(), words[5].parse().unwrap()));
        } else if words.len() > 2 && words[2] == "s" {
            rows.push((words[0].to_owned(), words[1].parse().unwrap()));
        }
    }
    (
        rows,
        total.unwrap_or_else(|| panic!("no total line in:\n{text}")),
    )
}

#[test]
fn the_plans_step_budgets_fit_the_default_total() {
    let (rows, (sum, total)) = plan(&[]);
    assert_eq!(total, 480, "the default total budget");
    assert_eq!(sum, rows.iter().map(|r| r.1).sum::<u64>());
    assert!(sum <= total, "step budgets sum to {sum} s, over {total} s");
    assert!(rows.iter().all(|r| r.1 > 0), "{rows:?}");
    assert_eq!(rows[0].0, "preflight");
    assert_eq!(
        rows[2].0, "open",
        "the first backend open comes before the GPU checks"
    );
    let (_, (_, total)) = plan(&["--budget", "300"]);
    assert_eq!(total, 300);
}

/// A directory of stand-in executables and, when `gpu`, a stand-in nvidia-smi.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new(gpu: bool, kernels_seconds: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "path", "out"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let write = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::write(&p, format!("#!/usr/bin/env bash\n{text}\n")).unwrap();
            Command::new("chmod").arg("+x").arg(&p).status().unwrap();
        };
        // The kernel cache reporter stands in for the real one (which checks source hashes,
        // tested in worker/src/backend/cuda/cache.rs): warm when the manifest names the arch.
        write(
            "bin/cuda_kernels",
            &format!(
                r#"case "$*" in
  *nvrtc_version*) echo nvrtc_version=12.9; echo "test result: ok. 1 passed" ;;
  *kernel_cache_state*)
    if grep -qs "\"sm_$LLMAPI_GPU_ARCH\"" "$LLMAPI_KERNEL_CACHE/manifest.json"; then
      echo "kernel_cache=warm sm_$LLMAPI_GPU_ARCH $LLMAPI_KERNEL_CACHE (5 files)"
    else
      echo "kernel_cache=miss sm_$LLMAPI_GPU_ARCH: it holds machine code for [sm_80], not this GPU's sm_$LLMAPI_GPU_ARCH"
    fi
    echo "test result: ok. 1 passed" ;;
  *) sleep {kernels_seconds}; echo "test result: ok. 3 passed" ;;
esac"#
            ),
        );
        let backend = if gpu {
            // Prints the loader path it was given, then passes every test it is asked for.
            r#"echo "ld=$LD_LIBRARY_PATH"; echo "cache=$LLMAPI_KERNEL_CACHE"; echo nvrtc_loaded=no; n=0; for a in "$@"; do case "$a" in gpu_*) n=$((n+1));; esac; done
echo "test result: ok. $n passed""#
        } else {
            r#"echo "thread 'x' panicked at worker/tests/cuda_backend.rs:44:13:"
echo "LLMAPI_REQUIRE_GPU=1 but the CUDA backend cannot run: the CUDA library libcuda cannot be loaded"
exit 101"#
        };
        write("bin/cuda_backend", backend);
        write("bin/nccl_tests", "exit 101");
        write("bin/cuda_bench", "echo 'cuda bench: no usable GPU'; exit 2");
        write(
            "path/python-stub",
            r#"[ "${1:-}" = -c ] && exit 1
echo "ld=${LD_LIBRARY_PATH-<unset>}"; echo transformers_batch64_tokens_per_s=100"#,
        );
        if gpu {
            write(
                "path/nvidia-smi",
                r#"case "$*" in
  *compute_cap*) echo 9.0 ;;
  *name,memory*) echo "NVIDIA H100, 81559 MiB, 580.159" ;;
  *driver_version*) echo 580.159 ;;
  *name*) echo "NVIDIA H100" ;;
  *) echo "| NVIDIA-SMI 580.159   Driver Version: 580.159   CUDA Version: 13.0 |" ;;
esac"#,
            );
        }
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A carried kernel cache beside the stand-in executables, holding machine code for `arch`.
    fn carry_kernel_cache(&self, arch: &str) {
        std::fs::create_dir(self.path("bin/kernel-cache")).unwrap();
        std::fs::write(
            self.path("bin/kernel-cache/manifest.json"),
            format!(r#"{{"format": 1, "archs": {{"{arch}": {{}}}}}}"#),
        )
        .unwrap();
    }

    /// Runs the script with `args` and the stand-in binaries, `ld` as LD_LIBRARY_PATH, and a
    /// PATH without any real nvidia-smi.
    fn run(&self, args: &[&str], ld: &str) -> (Output, Duration) {
        self.run_with(args, ld, &self.path("bin"))
    }

    /// `run` with the executables (or their archive) in `bin`.
    fn run_with(&self, args: &[&str], ld: &str, bin: &Path) -> (Output, Duration) {
        let system: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .filter(|d| !d.join("nvidia-smi").exists())
            .collect();
        let path = std::env::join_paths(std::iter::once(self.path("path")).chain(system)).unwrap();
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .arg(bin)
            .env("PATH", path)
            .env("OUT", self.path("out"))
            .env("LD_LIBRARY_PATH", ld)
            .env("LLMAPI_PYTHON", self.path("path/python-stub"))
            .env("LLMAPI_NVRTC_DIR", self.path("no-nvrtc"))
            .env_remove("CUDA_HOME")
            .output()
            .unwrap();
        (out, t.elapsed())
    }

    fn summary(&self) -> String {
        std::fs::read_to_string(self.path("out/summary.md")).unwrap()
    }

    /// The summary row of `step`: (result, note).
    fn row(&self, step: &str) -> (String, String) {
        let summary = self.summary();
        let line = summary
            .lines()
            .find(|l| l.starts_with(&format!("| {step} |")))
            .unwrap_or_else(|| panic!("no row for {step} in:\n{summary}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        (cells[2].to_owned(), cells[5].to_owned())
    }
}

#[test]
fn without_a_gpu_every_step_is_recorded_and_the_run_stops_after_open() {
    let m = Machine::new(false, 0);
    let (out, took) = m.run(&[], "/nonexistent-lib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .contains(&*m.path("out").to_string_lossy()),
        "the first line names the results directory: {stdout}"
    );
    let (result, note) = m.row("preflight");
    assert_eq!(result, "FAILED");
    assert!(note.contains("no nvidia-smi"), "{note}");
    let preflight = std::fs::read_to_string(m.path("out/preflight.log")).unwrap();
    for lib in ["libcuda ->", "libcublas ->", "libnvrtc ->", "libnccl ->"] {
        assert!(preflight.contains(lib), "{lib} in {preflight}");
    }
    assert_eq!(m.row("kernels").0, "pass", "NVRTC needs no GPU");
    let (result, note) = m.row("open");
    assert_eq!(result, "FAILED");
    assert!(note.contains("libcuda cannot be loaded"), "{note}");
    assert!(
        stdout.contains("STOPPED: the CUDA backend does not open") && stdout.contains("libcuda"),
        "{stdout}"
    );
    let (rows, _) = plan(&[]);
    for (step, _) in &rows[3..] {
        let (result, note) = m.row(step);
        assert_eq!(result, "skipped", "{step}");
        assert!(note.contains("did not open"), "{step}: {note}");
    }
    for log in ["preflight.log", "kernels.log", "open.log"] {
        assert!(m.path("out").join(log).is_file(), "{log}");
    }
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn a_step_past_its_budget_is_cut_and_what_no_longer_fits_is_skipped() {
    let m = Machine::new(true, 60);
    let (out, took) = m.run(&["--budget", "14"], "/nonexistent-lib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let (result, note) = m.row("kernels");
    assert_eq!(result, "FAILED");
    assert!(note.contains("timed out"), "{note}");
    let (result, note) = m.row("open");
    assert_eq!(result, "skipped");
    assert!(note.contains("out of time"), "{note}");
    let (result, note) = m.row("transformers");
    assert_eq!(result, "skipped");
    assert!(note.contains("out of time"), "{note}");
    assert!(
        took < Duration::from_secs(45),
        "a 14 s budget took {took:?}"
    );
}

#[test]
fn the_transformers_step_gets_the_loader_path_the_script_started_with() {
    let m = Machine::new(true, 0);
    let (out, _) = m.run(&["--steps", "open,transformers"], "/orig-lib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(m.row("open").0, "pass", "{stdout}");
    let open = std::fs::read_to_string(m.path("out/open.log")).unwrap();
    assert!(
        open.contains("ld=") && !open.contains("ld=/orig-lib\n") && open.contains(":/orig-lib"),
        "the tests get the library shim first: {open}"
    );
    let (result, note) = m.row("transformers");
    assert_eq!(result, "pass", "{note}");
    let log = std::fs::read_to_string(m.path("out/transformers.log")).unwrap();
    assert!(log.contains("ld=/orig-lib\n"), "{log}");
    assert_eq!(m.row("golden").0, "skipped");
    assert!(m.row("golden").1.contains("not selected"));
}

#[test]
fn a_carried_kernel_cache_is_what_the_steps_load_and_the_preflight_records_it_warm() {
    let m = Machine::new(true, 0);
    m.carry_kernel_cache("sm_90");
    // Packed as `stage` packs it: the executables and kernel-cache/ in one archive.
    let packed = m.path("packed");
    std::fs::create_dir(&packed).unwrap();
    let tar = Command::new("tar")
        .arg("-C")
        .arg(m.path("bin"))
        .arg("-cJf")
        .arg(packed.join("cuda-bins.tar.xz"))
        .args([
            "cuda_backend",
            "cuda_kernels",
            "nccl_tests",
            "cuda_bench",
            "kernel-cache",
        ])
        .status()
        .unwrap();
    assert!(tar.success());
    let (out, _) = m.run_with(&["--steps", "kernels,open"], "/nonexistent-lib", &packed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (_, note) = m.row("preflight");
    assert!(
        note.contains("kernel cache warm (sm_90, carried: yes): NVRTC not needed"),
        "{note}\n{stdout}"
    );
    let preflight = std::fs::read_to_string(m.path("out/preflight.log")).unwrap();
    assert!(
        preflight.contains("kernel cache: warm sm_90"),
        "{preflight}"
    );
    // The steps get the unpacked carried cache, not a scratch directory.
    let open = std::fs::read_to_string(m.path("out/open.log")).unwrap();
    let cache = open
        .lines()
        .find_map(|l| l.strip_prefix("cache="))
        .unwrap_or_else(|| panic!("{open}"));
    assert!(cache.ends_with("/bin/kernel-cache"), "{cache}");
    assert_eq!(m.row("open").0, "pass", "{stdout}");
    assert!(
        m.row("open")
            .1
            .contains("NVRTC loaded: no (kernel cache warm)")
    );
    // Without NVRTC on this machine the kernels step has nothing to do.
    if preflight.contains("libnvrtc -> NOT FOUND") {
        let (result, note) = m.row("kernels");
        assert_eq!(result, "skipped", "{note}");
        assert!(note.contains("none is needed"), "{note}");
    }
}

#[test]
fn a_kernel_cache_for_another_arch_is_a_miss_and_without_nvrtc_the_preflight_names_the_fix() {
    let m = Machine::new(true, 0);
    m.carry_kernel_cache("sm_80");
    let (out, _) = m.run(&["--steps", "open"], "/nonexistent-lib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (result, note) = m.row("preflight");
    assert!(
        note.contains("kernel cache miss: sm_90"),
        "{note}\n{stdout}"
    );
    let preflight = std::fs::read_to_string(m.path("out/preflight.log")).unwrap();
    if preflight.contains("libnvrtc -> NOT FOUND") {
        assert_eq!(result, "FAILED");
        assert!(
            note.contains("the kernel cache is not warm")
                && note.contains("llmapi-launch kernels build --arch sm_90"),
            "{note}"
        );
    }
}

/// `gpu_check.sh kernel-cache DIR` (what `stage` packs) with the real llmapi-launch and this
/// machine's NVRTC: a manifest naming sm_90 and one CUBIN per kernel file. Skips with a
/// notice where NVRTC is absent, unless LLMAPI_REQUIRE_NVRTC=1 (CI).
#[test]
fn the_kernel_cache_is_built_here_with_ci_nvrtc() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("kernel-cache");
    let out = Command::new("bash")
        .arg(script())
        .arg("kernel-cache")
        .arg(&cache)
        .env("LLMAPI_LAUNCH", llmapi_tests::bin("llmapi-launch"))
        .env("LLMAPI_KERNEL_ARCHS", "sm_90")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(
            !std::env::var("LLMAPI_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "LLMAPI_REQUIRE_NVRTC=1 but the kernel cache did not build:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("libnvrtc") || stderr.contains("cuda_bf16.h"),
            "{stderr}"
        );
        eprintln!("notice: skipping the kernel cache build: {stderr}");
        return;
    }
    assert!(stdout.contains("sm_90: 5 kernel files"), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache.join("manifest.json")).unwrap())
            .unwrap();
    let archs = manifest["archs"].as_object().unwrap();
    assert_eq!(archs.keys().collect::<Vec<_>>(), ["sm_90"]);
    let files = archs["sm_90"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 5);
    for f in files {
        let name = f["file"].as_str().unwrap();
        assert!(
            name.ends_with(".cubin") && name.contains("-sm_90-nvrtc"),
            "{name}"
        );
        let bytes = std::fs::read(cache.join(name)).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"), "{name}");
        assert_eq!(Some(bytes.len() as u64), f["bytes"].as_u64(), "{name}");
    }
    // Only what the manifest lists is there (nothing stale to carry).
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 6);
}
