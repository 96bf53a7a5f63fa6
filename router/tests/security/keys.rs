//! The `llmapi-router` binary with its API key given on the command line, in a file and in the
//! environment: the key works each way, and only the command line draws a warning.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmapi_common::checkpoint::{Preset, write_checkpoint};
use llmapi_router::testing::{Script, ScriptedWorker};

use super::http_get;

/// A router process, killed when dropped.
struct Router {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Router {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    super::closed_port()
}

async fn router(model: &Path, worker: &str, args: &[&str], env: &[(&str, &str)]) -> Router {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmapi-router"));
    cmd.arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--worker_urls", worker])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for var in [
        "LLMAPI_API_KEY",
        "LLMAPI_API_KEY_FILE",
        "LLMAPI_METRICS_API_KEY",
        "LLMAPI_METRICS_API_KEY_FILE",
        "LLMAPI_ADMIN_TOKEN",
        "LLMAPI_ADMIN_TOKEN_FILE",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut r = Router {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
    };
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = r.child.try_wait() {
            panic!("the router exited ({status}): {}", r.log());
        }
        if tokio::net::TcpStream::connect(r.addr).await.is_ok()
            && http_get(r.addr, "/health", None).await == 200
        {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the router did not get healthy within 30 s: {}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_key_works(r: &Router, key: &str) {
    assert_eq!(http_get(r.addr, "/v1/models", None).await, 401);
    assert_eq!(http_get(r.addr, "/workers", None).await, 401);
    let auth = format!("Bearer {key}");
    assert_eq!(http_get(r.addr, "/v1/models", Some(&auth)).await, 200);
}

const WARNING: &str = "is given on the command line (--api_key)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_works_from_flag_file_or_environment_and_only_the_flag_warns() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo");
    write_checkpoint(&Preset::by_name("demo").unwrap(), &model, &mut |_, _| {}).unwrap();
    let worker = ScriptedWorker::new(Script::default())
        .spawn()
        .await
        .unwrap();
    let url = worker.url();

    let r = router(&model, &url, &["--api_key", "sk-flag"], &[]).await;
    assert_key_works(&r, "sk-flag").await;
    let log = r.log();
    assert!(log.contains(WARNING), "{log}");
    assert!(log.contains("LLMAPI_API_KEY or --api_key_file"), "{log}");
    assert!(!log.contains("sk-flag"), "the log shows the key: {log}");
    drop(r);

    let file = dir.path().join("api-key");
    std::fs::write(&file, "sk-file\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let r = router(
        &model,
        &url,
        &["--api_key_file", file.to_str().unwrap()],
        &[],
    )
    .await;
    assert_key_works(&r, "sk-file").await;
    assert!(!r.log().contains(WARNING), "{}", r.log());
    drop(r);

    let r = router(&model, &url, &[], &[("LLMAPI_API_KEY", "sk-env")]).await;
    assert_key_works(&r, "sk-env").await;
    assert!(!r.log().contains(WARNING), "{}", r.log());
}

#[test]
fn an_empty_key_file_stops_the_router_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty");
    std::fs::write(&file, "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmapi-router"))
        .arg(dir.path())
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
