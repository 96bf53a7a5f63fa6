//! Memory that fits the machine, end to end: `llmapi-launch serve` logs its KV budget line by
//! line at start and takes no more blocks than `max_batch_size` x `max_seq_len` can use; a
//! configuration that cannot fit fails at start, saying what to change.

use std::process::Command;
use std::time::Duration;

use llmapi_tests::{Proc, bin, demo_model, free_port, get, wait_healthy};
use serde_json::Value;

/// `serve demo` without kv_cache_config.max_tokens, logging JSON lines.
fn serve_demo(port: u16, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .env("LLMAPI_LOG_FORMAT", "json");
    Proc::spawn(&format!("budget-{port}"), cmd)
}

/// The `memory budget: ...` lines of a log, as (what, fields).
fn budget_lines(log: &str) -> Vec<(String, Value)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let fields = v.get("fields")?.clone();
            let what = fields["message"]
                .as_str()?
                .strip_prefix("memory budget: ")?;
            Some((what.to_owned(), fields))
        })
        .collect()
}

#[test]
fn serve_logs_its_memory_budget_and_caps_the_pool_at_what_the_batch_can_use() {
    let port = free_port();
    // 8 sequences x 512 tokens = 128 blocks of 32: far less than memory allows.
    let server = serve_demo(port, &["--max_batch_size", "8", "--max_seq_len", "512"]);
    wait_healthy(port, Duration::from_secs(60));
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let lines = budget_lines(&log);
    let whats: Vec<&str> = lines.iter().map(|(w, _)| w.as_str()).collect();
    for want in [
        "host total",
        "cgroup limit",
        "free before loading",
        "this replica's share",
        "weights",
        "workspaces",
        "free after the model",
        "fraction",
        "cap",
        "KV pool",
    ] {
        assert!(
            whats.contains(&want),
            "no `{want}` budget line in {whats:?}\n{log}"
        );
    }
    let bytes = |what: &str| {
        lines
            .iter()
            .find(|(w, _)| w == what)
            .and_then(|(_, f)| f["bytes"].as_u64())
            .unwrap_or(0)
    };
    assert!(bytes("weights") > 0, "the weights are counted: {log}");
    assert!(bytes("KV pool") > 0 && bytes("KV pool") <= bytes("cap"));
    let pool = &lines.iter().find(|(w, _)| w == "KV pool").unwrap().1;
    let detail = pool["detail"].as_str().unwrap_or("");
    assert!(
        detail.starts_with("128 blocks x 32 tokens = 4096 tokens"),
        "{detail}"
    );

    let w = get(port, "/workers").json();
    let w = &w["workers"][0];
    let blocks =
        w["kv_blocks_used"].as_u64().unwrap_or(0) + w["kv_blocks_free"].as_u64().unwrap_or(0);
    assert!(
        blocks > 0 && blocks <= 128,
        "the pool has {blocks} blocks: {w}"
    );
}

#[test]
fn the_ranks_of_a_local_tensor_parallel_group_split_the_nodes_memory() {
    let port = free_port();
    let server = serve_demo(
        port,
        &[
            "--tp_size",
            "2",
            "--max_batch_size",
            "8",
            "--max_seq_len",
            "512",
        ],
    );
    wait_healthy(port, Duration::from_secs(90));
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let lines = budget_lines(&log);
    let field = |what: &str| {
        lines
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no `{what}` budget line in {log}"))
    };
    let (free, share) = (field("free before loading"), field("this replica's share"));
    assert_eq!(
        share["bytes"].as_u64().unwrap_or(0),
        free["bytes"].as_u64().unwrap_or(0) / 2,
        "{share}"
    );
    assert!(
        share["detail"]
            .as_str()
            .unwrap_or("")
            .contains("/ 2 replicas"),
        "{share}"
    );
}

#[test]
fn a_configuration_that_cannot_fit_fails_at_start_saying_what_to_change() {
    let port = free_port();
    // Workspaces for a step of 2^31 tokens exceed any machine.
    let mut server = serve_demo(port, &["--max_num_tokens", "2147483647"]);
    let status = server.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "serve did not fail at start: {status:?}\n{log}"
    );
    assert!(log.contains("workspaces"), "{log}");
    assert!(log.contains("lower --max_num_tokens"), "{log}");
}
