//! `--worker_discovery dns:NAME:PORT`: the router's pool follows a DNS name's address records
//! (a Kubernetes headless service) served by a DNS double. Two real workers listen on the
//! same port at 127.0.0.2 and 127.0.0.3; as the records gain the second address it joins and
//! takes traffic, an outage of the DNS server changes nothing, an address gone from the
//! records leaves the pool without a failed request, and NXDOMAIN empties it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use llmapi_tests::dns::{DnsDouble, Records};
use llmapi_tests::{Proc, bin, demo_model, free_port, healthy_workers, post, request, wait_until};
use serde_json::json;

const SECRET: &str = "discovery-test-secret-3b8e1f0a7c5d2946";
const NAME: &str = "llmapi-workers.default.svc.cluster.local";

/// A worker (`llmapi-launch serve` of the demo model) whose gRPC server listens on `ip:grpc`.
fn worker(ip: Ipv4Addr, grpc: u16) -> Proc {
    let mut cmd = Command::new(bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &free_port().to_string()])
        .args(["--set", "kv_cache_config.max_tokens=65536"])
        .env("LLMAPI_WORKER_ADDR", format!("{ip}:{grpc}"))
        .env("LLMAPI_JOB_TOKEN", SECRET);
    Proc::spawn(&format!("discovered-worker-{ip}"), cmd)
}

fn router(port: u16, grpc: u16, dns: &DnsDouble) -> Proc {
    let mut cmd = Command::new(bin("llmapi-router"));
    cmd.arg(demo_model())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--health_check_interval_ms", "200"])
        .args(["--worker_discovery", &format!("dns:{NAME}:{grpc}")])
        .args(["--worker_discovery_nameserver", &dns.addr.to_string()])
        .args(["--worker_discovery_interval_s", "1"])
        .env("LLMAPI_WORKER_TOKEN", SECRET);
    Proc::spawn(&format!("discovery-router-{port}"), cmd)
}

fn listed(port: u16) -> BTreeSet<String> {
    request(port, "GET", "/workers", None, &[])
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| r.json()["workers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|w| w["url"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn urls(grpc: u16, ips: &[&str]) -> BTreeSet<String> {
    ips.iter().map(|ip| format!("http://{ip}:{grpc}")).collect()
}

fn completes(port: u16) {
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "discovered", "max_tokens": 2, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn the_pool_follows_the_dns_records_and_keeps_its_workers_through_a_dns_outage() {
    let two: Ipv4Addr = "127.0.0.2".parse().expect("ip");
    let three: Ipv4Addr = "127.0.0.3".parse().expect("ip");
    let grpc = free_port();
    let w2 = worker(two, grpc);
    let w3 = worker(three, grpc);
    let dns = DnsDouble::start(Records::A(vec![two]));
    let port = free_port();
    let r = router(port, grpc, &dns);
    let logs = || {
        format!(
            "see {}, {} and {}",
            r.log.display(),
            w2.log.display(),
            w3.log.display()
        )
    };

    assert!(
        wait_until(Duration::from_secs(90), || healthy_workers(port)
            == urls(grpc, &["127.0.0.2"])),
        "the router never had the one worker of the records; {}",
        logs()
    );
    completes(port);

    // A pod becomes ready: its address joins the records, and the worker the pool.
    dns.set(Records::A(vec![two, three]));
    assert!(
        wait_until(Duration::from_secs(90), || healthy_workers(port)
            == urls(grpc, &["127.0.0.2", "127.0.0.3"])),
        "the second worker never joined; {}",
        logs()
    );
    for _ in 0..4 {
        completes(port);
    }
    let routed: Vec<u64> = request(port, "GET", "/workers", None, &[])
        .expect("workers")
        .json()["workers"]
        .as_array()
        .expect("list")
        .iter()
        .map(|w| w["requests"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        routed.iter().all(|&n| n > 0),
        "both workers take traffic: {routed:?}"
    );

    // The DNS server goes silent: lookups fail, the fleet stays as it was.
    dns.set(Records::Silent);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(listed(port), urls(grpc, &["127.0.0.2", "127.0.0.3"]));
    completes(port);

    // A pod goes away: its address leaves the records and the worker the pool.
    dns.set(Records::A(vec![three]));
    assert!(
        wait_until(Duration::from_secs(30), || listed(port)
            == urls(grpc, &["127.0.0.3"])),
        "the removed address stayed in the pool; {}",
        logs()
    );
    for _ in 0..3 {
        completes(port);
    }

    // The service is deleted: NXDOMAIN, and nothing is left to route to.
    dns.set(Records::NxDomain);
    assert!(
        wait_until(Duration::from_secs(30), || listed(port).is_empty()),
        "workers stayed after NXDOMAIN; {}",
        logs()
    );
}

#[test]
fn a_malformed_discovery_source_is_refused_with_the_expected_form() {
    let out = Command::new(bin("llmapi-router"))
        .arg(demo_model())
        .args(["--worker_discovery", "k8s:workers"])
        .output()
        .expect("run llmapi-router");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dns:NAME:PORT"), "{err}");
}
