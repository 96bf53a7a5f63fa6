//! Helpers shared by the launcher's end-to-end tests: a demo model, free ports, a minimal
//! HTTP client, bounded waits.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses a subset; test code

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Writes the demo model into `dir` with the real binary.
pub fn demo_model(dir: &Path) -> PathBuf {
    let out = dir.join("demo");
    let status = Command::new(env!("CARGO_BIN_EXE_llmapi-launch"))
        .args(["make-model", "--preset", "demo", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// A loopback port that is free now, outside the range outgoing connections take.
pub fn free_port() -> u16 {
    llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

/// Whether a Slurm answers here. `.ci/run` starts one with scripts/slurm-local.sh (two nodes,
/// c1 and c2, on this host) and sets LLMAPI_REQUIRE_SLURM=1, which makes its absence a failure;
/// elsewhere the Slurm tests print a notice and pass.
pub fn slurm_available() -> bool {
    let up = Command::new("timeout")
        .args(["10", "sinfo", "-h"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !up && std::env::var("LLMAPI_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
        panic!("LLMAPI_REQUIRE_SLURM=1 but no Slurm answers; start it with scripts/slurm-local.sh");
    }
    if !up {
        eprintln!("notice: no Slurm on this machine (scripts/slurm-local.sh starts one); skipping");
    }
    up
}

/// One HTTP/1.1 request to 127.0.0.1:port; returns (status, body). None when nothing answers.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    http_auth(port, method, path, body, None)
}

/// `http` with an optional `Authorization` header value.
pub fn http_auth(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    authorization: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let body = body.unwrap_or("");
    let auth = authorization.map_or_else(String::new, |a| format!("authorization: {a}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Polls `check` every 200 ms until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = check() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The router's GET /workers as JSON, once `n` workers are healthy.
pub fn wait_for_healthy_workers(port: u16, n: usize, limit: Duration) -> Option<serde_json::Value> {
    wait_for(limit, || {
        let (status, body) = http(port, "GET", "/workers", None)?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let healthy = v["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["healthy"] == true)
            .count();
        (status == 200 && healthy == n).then_some(v)
    })
}

/// Sends `count` completions and returns, per worker URL, how many requests it served.
pub fn spread_of_requests(port: u16, count: usize) -> Vec<(String, u64)> {
    for _ in 0..count {
        let (status, body) = http(
            port,
            "POST",
            "/v1/completions",
            Some(r#"{"model":"demo","prompt":"Hello","max_tokens":4}"#),
        )
        .expect("the router answers");
        assert_eq!(status, 200, "{body}");
    }
    let (_, body) = http(port, "GET", "/workers", None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["url"].as_str().unwrap().to_owned(),
                w["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}
