//! A cluster on loopback: worker processes (`llmapi-launch serve` with a gRPC address) behind
//! one `llmapi-router` process, and what the router's `/workers` says about them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Proc, bin, free_port, serve};

/// The secret the test workers share (LLMAPI_JOB_TOKEN) and the router sends.
pub const SECRET: &str = "cluster-test-secret-6f1d2b9a0c3e";

/// A worker process: its gRPC port (what the router calls) and its own HTTP port.
pub struct Worker {
    /// The process (killed on drop).
    pub proc: Proc,
    /// gRPC port on 127.0.0.1.
    pub grpc: u16,
    /// Its embedded router's HTTP port.
    pub http: u16,
}

/// Starts a worker of `model` serving gRPC on `grpc`, with `extra` flags; waits for health.
pub fn worker(model: &Path, grpc: u16, extra: &[&str]) -> Worker {
    let http = free_port();
    let proc = serve(
        model,
        http,
        extra,
        &[
            ("LLMAPI_WORKER_ADDR", format!("127.0.0.1:{grpc}")),
            ("LLMAPI_JOB_TOKEN", SECRET.to_owned()),
        ],
    );
    Worker { proc, grpc, http }
}

/// Starts `llmapi-router` over the workers at `grpcs` with `policy` and `extra` flags,
/// presenting `token` to them (None: no worker token); its HTTP port. Does not wait.
pub fn router(
    model: &Path,
    grpcs: &[u16],
    policy: &str,
    extra: &[&str],
    token: Option<&str>,
) -> (Proc, u16) {
    let port = free_port();
    let urls: Vec<String> = grpcs
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut cmd = Command::new(bin("llmapi-router"));
    cmd.arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--worker_urls", &urls.join(",")])
        .args(["--routing_policy", policy])
        .args(["--health_check_interval_ms", "200"])
        .args(extra)
        .env_remove("LLMAPI_WORKER_TOKEN");
    if let Some(t) = token {
        cmd.env("LLMAPI_WORKER_TOKEN", t);
    }
    let p = Proc::spawn(&format!("router-{port}"), cmd);
    (p, port)
}

/// The router's `/workers` entries (empty when it does not answer).
pub fn workers(router: u16) -> Vec<Value> {
    crate::request(router, "GET", "/workers", None, &[])
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .and_then(|v| v["workers"].as_array().cloned())
        .unwrap_or_default()
}

/// A number the router's /workers reports for a worker (by gRPC port); 0 when absent.
pub fn worker_field(router: u16, grpc: u16, field: &str) -> u64 {
    workers(router)
        .iter()
        .find(|w| {
            w["url"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!(":{grpc}")))
        })
        .and_then(|w| w[field].as_u64())
        .unwrap_or(0)
}

/// Requests a worker (by gRPC port) has taken, from the router's /workers.
pub fn routed(router: u16, grpc: u16) -> u64 {
    worker_field(router, grpc, "requests")
}

/// How many of the router's workers are healthy.
pub fn healthy_count(router: u16) -> usize {
    workers(router)
        .iter()
        .filter(|w| w["healthy"] == true)
        .count()
}

/// A counter or gauge's value in Prometheus text (the first sample named exactly `name`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// `llmapi_router_migrations_total` in Prometheus text `metrics`, summed over causes: the
/// choices moved off the worker on gRPC port `grpc`, or off any worker when `None`.
pub fn migrations_off(metrics: &str, grpc: Option<u16>) -> u64 {
    let series = match grpc {
        Some(p) => format!("llmapi_router_migrations_total{{worker=\"http://127.0.0.1:{p}\""),
        None => "llmapi_router_migrations_total{".to_owned(),
    };
    metrics
        .lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The router's /metrics text (empty when it does not answer).
pub fn metrics(router: u16) -> String {
    get_text(router, "/metrics")
}

fn get_text(port: u16, path: &str) -> String {
    crate::request(port, "GET", path, None, &[])
        .map(|r| r.body)
        .unwrap_or_default()
}

/// Waits (at most `timeout`) until the router at `port` answers /health with 200 and
/// `healthy` workers are healthy.
pub fn wait_workers(port: u16, healthy: usize, timeout: Duration) -> bool {
    crate::wait_until(timeout, || {
        crate::request(port, "GET", "/health", None, &[]).is_ok_and(|r| r.status == 200)
            && healthy_count(port) == healthy
    })
}
