//! The official `openai` Python SDK against `llmapi-launch serve`: every endpoint and option,
//! every response parsed by the SDK (tests/python/test_openai_sdk.py).
//!
//! The same script runs again against the real SmolLM2-135M-Instruct GGUF (the file of
//! tests/tests/gguf_model.rs), where it also checks answers the model must get right.
//!
//! Skipped, with a printed notice, only when no Python with the `openai` module is found
//! (LLMAPI_PYTHON, the workspace's .venv, then python3; CI installs it from
//! tests/python/requirements.txt), or for the real model when its file is not there.

use std::path::{Path, PathBuf};
use std::process::Command;

use llmapi_tests::{demo_model, free_port, serve};

fn python_with_openai() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("LLMAPI_PYTHON").map(PathBuf::from),
        Some(root.join(".venv/bin/python3")),
        Some(PathBuf::from("python3")),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs the SDK script against `model` served as `name`; `real`: a real instruct model.
fn run_sdk_script(model: &Path, name: &str, real: bool) {
    let Some(python) = python_with_openai() else {
        println!(
            "SKIPPED: no python3 with the `openai` module; run `pip install -r tests/python/requirements.txt`"
        );
        return;
    };
    let port = free_port();
    let _server = serve(model, port, &[], &[("LLMAPI_API_KEY", "sk-sdk".to_owned())]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_openai_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("LLMAPI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("LLMAPI_API_KEY", "sk-sdk")
        .env("LLMAPI_MODEL", name)
        .env("LLMAPI_MODEL_PATH", model)
        .env("LLMAPI_REAL_MODEL", if real { "1" } else { "0" })
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok:"));
}

#[test]
fn the_openai_python_sdk_drives_every_endpoint_and_option() {
    run_sdk_script(demo_model(), "demo", false);
}

#[test]
fn the_openai_python_sdk_gets_right_answers_from_a_real_model() {
    let Some(file) = std::env::var_os("LLMAPI_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    else {
        println!("SKIPPED: LLMAPI_SMOLLM2_GGUF is not a file (see tests/tests/gguf_model.rs)");
        return;
    };
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a file name")
        .to_owned();
    run_sdk_script(&file, &name, true);
}
