//! Scale out, the operator's way: two routers behind nginx (deploy/nginx as shipped), three
//! workers registered with both, and llmapi-bench streaming through nginx at concurrency 16
//! the whole time, while a fourth worker joins, one is drained and removed with SIGTERM, one
//! router is killed with SIGKILL and restarted. Afterwards: no request failed except ones
//! streaming on the killed router when it died (counted and reported), the restarted router
//! routes to every live worker within one lease period, both routers list the same workers,
//! and both routers' kv_cache_aware indexes equal every live worker's own block list.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmapi_tests::balancer::{self, Balancer};
use llmapi_tests::kv;
use llmapi_tests::{
    Proc, bin, demo_model, fleet_worker, free_port, get, healthy_workers, router_with_secret,
    wait_until,
};
use serde_json::Value;

const SECRET: &str = "scale-out-test-secret-5e2a9c41d7b3";
const LEASE_S: u64 = 3;
const CONCURRENCY: &str = "16";

fn router(port: u16) -> Proc {
    router_with_secret(
        port,
        SECRET,
        &[
            "--worker_lease_s",
            &LEASE_S.to_string(),
            "--routing_policy",
            "kv_cache_aware",
        ],
    )
}

/// A router's gauge `llmapi_router_inflight_requests`.
fn inflight(port: u16) -> u64 {
    get(port, "/metrics")
        .body
        .lines()
        .find_map(|l| {
            l.strip_prefix("llmapi_router_inflight_requests ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// llmapi-bench streaming through `port` until interrupted.
fn bench(port: u16, dir: &std::path::Path) -> Child {
    Command::new(bin("llmapi-bench"))
        .args(["--model", demo_model().to_str().expect("utf-8")])
        .args(["--served-model-name", "demo"])
        .args(["--base-url", &format!("http://127.0.0.1:{port}")])
        .args(["--backend", "openai", "--dataset-name", "random"])
        .args(["--random-input-len", "32", "--random-output-len", "64"])
        .args(["--num-prompts", "3000", "--max-concurrency", CONCURRENCY])
        .args(["--ignore-eos", "--no-test-input", "--disable-tqdm"])
        .args([
            "--save-result",
            "--save-detailed",
            "--result-dir",
            dir.to_str().expect("utf-8"),
        ])
        .args(["--result-filename", "scale_out.json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("llmapi-bench")
}

/// Waits until both routers list exactly `want` as healthy; how long that took.
fn both_list(ports: [u16; 2], want: &BTreeSet<String>, limit: Duration) -> Duration {
    let t = Instant::now();
    assert!(
        wait_until(limit, || ports.iter().all(|&p| healthy_workers(p) == *want)),
        "routers list {:?} and {:?}, want {want:?}",
        healthy_workers(ports[0]),
        healthy_workers(ports[1])
    );
    t.elapsed()
}

#[test]
fn the_fleet_grows_shrinks_and_survives_a_router_under_load() {
    if !balancer::installed(Balancer::Nginx) {
        return;
    }
    let ports = [free_port(), free_port()];
    let _a = router(ports[0]);
    let mut b = Some(router(ports[1]));
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| fleet_worker(&ports, SECRET, &format!("scale-worker-{i}-{}", ports[0])))
        .collect();
    assert!(
        wait_until(Duration::from_secs(90), || ports
            .iter()
            .all(|&p| healthy_workers(p).len() == 3)),
        "the three workers never joined both routers: {:?} {:?}",
        healthy_workers(ports[0]),
        healthy_workers(ports[1])
    );
    let lb = balancer::start(Balancer::Nginx, ports);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut timeline = Vec::new();
    let mut mark = |what: &str| {
        timeline.push(format!(
            "{:>5.1} s  {what}",
            started.elapsed().as_secs_f64()
        ))
    };
    let mut load = bench(lb.port, dir.path());
    let routed_by = |port: u16| -> u64 {
        get(port, "/workers").json()["workers"]
            .as_array()
            .map_or(0, |ws| {
                ws.iter().filter_map(|w| w["requests"].as_u64()).sum()
            })
    };
    // The client prepares its prompts first (seconds on a loaded machine).
    assert!(
        wait_until(Duration::from_secs(60), || routed_by(ports[0])
            + routed_by(ports[1])
            >= 32),
        "the bench never got going"
    );
    mark("bench running at concurrency 16 through nginx");

    // A fourth worker joins and takes traffic.
    workers.push(fleet_worker(
        &ports,
        SECRET,
        &format!("scale-worker-3-{}", ports[0]),
    ));
    assert!(
        wait_until(Duration::from_secs(90), || ports
            .iter()
            .all(|&p| healthy_workers(p).len() == 4)),
        "the fourth worker never joined"
    );
    mark("a fourth worker joined both routers");
    std::thread::sleep(Duration::from_secs(2));

    // One is drained and removed: SIGTERM withdraws it, its requests finish, it exits.
    let mut leaving = workers.remove(0);
    assert!(
        leaving.terminate(Duration::from_secs(60)),
        "the worker did not stop"
    );
    mark("worker 0 stopped with SIGTERM (withdrawn, requests finished)");
    let live: BTreeSet<String> = healthy_workers(ports[0]);
    assert_eq!(live.len(), 3, "{live:?}");
    both_list(ports, &live, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));

    // Router B dies with SIGKILL mid-stream and comes back knowing nothing.
    let routed_by = |port: u16| -> u64 {
        get(port, "/workers").json()["workers"]
            .as_array()
            .map_or(0, |ws| {
                ws.iter().filter_map(|w| w["requests"].as_u64()).sum()
            })
    };
    let (routed_a, routed_b) = (routed_by(ports[0]), routed_by(ports[1]));
    mark(&format!(
        "requests routed so far: router A {routed_a}, router B {routed_b}"
    ));
    assert!(
        routed_b > 0,
        "nginx sent router B nothing (router A: {routed_a}): {}\n{}",
        get(ports[1], "/metrics")
            .body
            .lines()
            .filter(|l| l.starts_with("llmapi_router_requests_total"))
            .collect::<Vec<_>>()
            .join("\n"),
        lb.log()
    );
    let on_b = inflight(ports[1]);
    if let Some(mut killed) = b.take() {
        killed.kill();
    }
    mark(&format!(
        "router B killed with SIGKILL ({on_b} requests in flight on it)"
    ));
    std::thread::sleep(Duration::from_secs(1));
    b = Some(router(ports[1]));
    let back = both_list(ports, &live, Duration::from_secs(3 * LEASE_S + 10));
    mark(&format!(
        "router B restarted; it listed all 3 live workers after {:.1} s",
        back.as_secs_f64()
    ));
    assert!(
        back <= Duration::from_secs(LEASE_S + 3),
        "the restarted router took {back:?} to list the fleet (lease {LEASE_S} s)"
    );
    std::thread::sleep(Duration::from_secs(3));

    // Stop the load and read what the client saw.
    let _ = Command::new("kill")
        .args(["-INT", &load.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = load.kill();
    let out = load.wait_with_output().expect("bench output");
    mark("bench stopped");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("scale_out.json")).unwrap_or_default(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let completed = result["completed"].as_u64().unwrap_or(0);
    // One entry per request sent: "" for a success, else its error.
    let errors: Vec<&str> = result["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(Value::as_str)
        .filter(|e| !e.is_empty())
        .collect();
    let failed = errors.len() as u64;
    eprintln!("{}", timeline.join("\n"));
    eprintln!("completed {completed}, failed {failed}: {errors:?}");
    assert!(
        completed >= 50,
        "only {completed} requests completed: {stdout}"
    );
    assert!(
        failed <= on_b + 2,
        "{failed} requests failed, {on_b} were in flight on the killed router: {errors:?}\n{stdout}"
    );
    // Every live worker served through the fleet, the newcomer included.
    let served: Vec<u64> = get(ports[0], "/workers").json()["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["requests"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        served.iter().all(|&n| n > 0),
        "router A's per-worker counts: {served:?}"
    );
    // Both routers' KV indexes, the restarted one's included, equal every live worker's own
    // block list (its KvEvents snapshot).
    let mut blocks = 0;
    for url in &live {
        for &p in &ports {
            blocks += kv::assert_agree(p, url, SECRET, "after the load").len();
        }
    }
    eprintln!(
        "{:>5.1} s  both routers' KV indexes equal the 3 workers' block lists ({} blocks)",
        started.elapsed().as_secs_f64(),
        blocks / 2
    );
    drop((lb, b));
}
