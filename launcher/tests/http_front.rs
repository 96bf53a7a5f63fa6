//! `llmapi-launch serve`'s embedded router takes the router's access flags: a key from a file
//! guards every route but /health, and a key on the command line draws a warning.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{demo_model, free_port, http_auth, wait_for};

struct Server {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn serve(model: &Path, port: u16, extra: &[&str]) -> Server {
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .env_remove("LLMAPI_API_KEY")
        .env_remove("LLMAPI_ADMIN_TOKEN")
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .env("NO_COLOR", "1")
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server { child, log };
    let up = wait_for(Duration::from_secs(60), || {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("serve exited ({status}): {}", server.log());
        }
        http_auth(port, "GET", "/health", None, None).filter(|(s, _)| *s == 200)
    });
    assert!(up.is_some(), "serve healthy within 60 s: {}", server.log());
    server
}

fn status(port: u16, method: &str, path: &str, key: Option<&str>) -> u16 {
    let auth = key.map(|k| format!("Bearer {k}"));
    http_auth(port, method, path, None, auth.as_deref())
        .unwrap()
        .0
}

#[test]
fn serve_takes_its_api_key_from_a_file_and_warns_about_one_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let file = dir.path().join("key");
    std::fs::write(&file, "sk-launch\n").unwrap();
    let port = free_port();
    let server = serve(&model, port, &["--api_key_file", file.to_str().unwrap()]);
    for path in [
        "/v1/models",
        "/version",
        "/workers",
        "/metrics",
        "/health_generate",
    ] {
        assert_eq!(status(port, "GET", path, None), 401, "{path} without a key");
        assert_eq!(status(port, "GET", path, Some("sk-wrong")), 401, "{path}");
        assert_eq!(status(port, "GET", path, Some("sk-launch")), 200, "{path}");
    }
    assert!(
        !server.log().contains("on the command line"),
        "{}",
        server.log()
    );
    drop(server);

    let port = free_port();
    let server = serve(&model, port, &["--api_key", "sk-flag"]);
    assert_eq!(status(port, "GET", "/v1/models", None), 401);
    assert_eq!(status(port, "GET", "/v1/models", Some("sk-flag")), 200);
    let log = server.log();
    assert!(
        log.contains("on the command line (--api_key)") && log.contains("LLMAPI_API_KEY"),
        "{log}"
    );
}

#[test]
fn serve_refuses_an_empty_key_file_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let file = dir.path().join("empty");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .arg("serve")
        .arg(&model)
        .args(["--port", &free_port().to_string()])
        .args(["--api_key_file", file.to_str().unwrap()])
        .env_remove("LLMAPI_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api_key_file") && err.contains("is empty"),
        "{err}"
    );
}
