//! Exact KV-aware routing end to end: two worker processes with small KV pools behind one
//! `llmapi-router` that follows their KvEvents streams. The router's index of each worker
//! (`GET /workers/kv_index`) must equal the worker's own block list (a KvEvents snapshot asked
//! for over gRPC with the job secret) after requests over shared prefixes, after the pools
//! evicted, and after a worker restarted under a new run id.

use std::collections::BTreeSet;
use std::time::Duration;

use llmapi_tests::cluster::{self, SECRET, healthy_count};
use llmapi_tests::kv;
use llmapi_tests::{demo_model, free_port, post, wait_healthy, wait_until};
use serde_json::json;

/// 16 KV blocks of 32 tokens per worker: a few long prompts evict everything. Token ids
/// stay below the demo model's vocabulary (2048).
const SMALL_POOL: [&str; 2] = ["--set", "kv_cache_config.max_tokens=512"];

/// The worker on 127.0.0.1:`grpc`'s URL.
fn url(grpc: u16) -> String {
    format!("http://127.0.0.1:{grpc}")
}

fn assert_agree(router: u16, grpc: u16, when: &str) -> BTreeSet<String> {
    kv::assert_agree(router, &url(grpc), SECRET, when)
}

fn router_index(router: u16, grpc: u16) -> (String, bool, BTreeSet<String>) {
    kv::router_index(router, &url(grpc))
}

fn worker_blocks(grpc: u16) -> (String, BTreeSet<String>) {
    kv::worker_blocks(&url(grpc), SECRET)
}

fn complete(router: u16, prompt: &serde_json::Value) -> u64 {
    let r = post(
        router,
        "/v1/completions",
        &json!({"model": "demo", "prompt": prompt, "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn the_routers_kv_index_equals_each_workers_blocks_through_evictions_and_a_restart() {
    let (grpc_a, grpc_b) = (free_port(), free_port());
    let mut a = cluster::worker(demo_model(), grpc_a, &SMALL_POOL);
    let b = cluster::worker(demo_model(), grpc_b, &SMALL_POOL);
    let (_router, port) = cluster::router(
        demo_model(),
        &[grpc_a, grpc_b],
        "kv_cache_aware",
        &[],
        Some(SECRET),
    );
    wait_healthy(port, Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || healthy_count(port) == 2));
    assert_agree(port, grpc_a, "at start");
    assert_agree(port, grpc_b, "at start");

    // Three shared prefixes of 96 tokens (3 blocks) with distinct questions.
    let mut hits = 0;
    for round in 0..3u32 {
        for p in 0..3u32 {
            let prompt: Vec<u32> = (0..96)
                .map(|i| 100 + p * 100 + i)
                .chain([1500 + round * 10 + p, 1600 + round])
                .collect();
            hits += complete(port, &json!(prompt));
            // Let the events land so the next pick sees them.
            assert_agree(port, grpc_a, "between requests");
            assert_agree(port, grpc_b, "between requests");
        }
    }
    assert!(
        hits >= 6 * 96,
        "the second and third rounds find their prefix cached: {hits} tokens"
    );
    let before_a = assert_agree(port, grpc_a, "after the shared prefixes");
    let before_b = assert_agree(port, grpc_b, "after the shared prefixes");
    assert!(!before_a.is_empty() || !before_b.is_empty());

    // Long distinct prompts fill both pools: earlier blocks are evicted.
    for i in 0..4u32 {
        let prompt: Vec<u32> = (0..400).map(|t| 400 + i * 400 + t).collect();
        complete(port, &json!(prompt));
    }
    let after_a = assert_agree(port, grpc_a, "after evictions");
    let after_b = assert_agree(port, grpc_b, "after evictions");
    let evicted = before_a.difference(&after_a).count() + before_b.difference(&after_b).count();
    assert!(evicted > 0, "the long prompts evicted some earlier blocks");

    // Worker a restarts on the same port: a new run, resynced from its snapshot.
    let (old_run, _, _) = router_index(port, grpc_a);
    a.proc.kill();
    a = cluster::worker(demo_model(), grpc_a, &SMALL_POOL);
    let new_run = worker_blocks(grpc_a).0;
    assert_ne!(new_run, old_run, "a restarted worker has a new run id");
    assert_agree(port, grpc_a, "after the restart");
    assert_eq!(router_index(port, grpc_a).0, new_run);
    let snapshots = |grpc: u16| {
        let name =
            format!("llmapi_worker_kv_index_snapshots_total{{worker=\"http://127.0.0.1:{grpc}\"}}");
        cluster::metric(&cluster::metrics(port), &name).unwrap_or(0.0)
    };
    assert!(
        snapshots(grpc_a) >= 2.0,
        "the restart made the router resync a"
    );
    assert_eq!(
        snapshots(grpc_b),
        1.0,
        "b was followed from its first snapshot on"
    );
    assert!(wait_until(Duration::from_secs(20), || healthy_count(port) == 2));
    for p in 0..3u32 {
        let prompt: Vec<u32> = (0..96).map(|i| 100 + p * 100 + i).collect();
        complete(port, &json!(prompt));
    }
    assert_agree(port, grpc_a, "after requests to the restarted worker");
    assert_agree(port, grpc_b, "after requests to the restarted worker");
    drop((a, b));
}
