//! The official `openai` Python SDK against `llmapi-launch serve`: every endpoint and option,
//! every response parsed by the SDK (tests/python/test_openai_sdk.py).
//!
//! Skipped, with a printed notice, only when no Python with the `openai` module is found
//! (LLMAPI_PYTHON, the workspace's .venv, then python3); CI installs it from
//! tests/python/requirements.txt.

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

#[test]
fn the_openai_python_sdk_drives_every_endpoint_and_option() {
    let Some(python) = python_with_openai() else {
        println!(
            "SKIPPED: no python3 with the `openai` module; run `pip install -r tests/python/requirements.txt`"
        );
        return;
    };
    let port = free_port();
    let _server = serve(
        demo_model(),
        port,
        &[],
        &[("LLMAPI_API_KEY", "sk-sdk".to_owned())],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_openai_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("LLMAPI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("LLMAPI_API_KEY", "sk-sdk")
        .env("LLMAPI_MODEL", "demo")
        .env("LLMAPI_MODEL_PATH", demo_model())
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
