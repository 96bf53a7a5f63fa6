//! Many routers, one fleet: a worker task given two routers (`--router_url A,B`) registers
//! with both and renews at a third of their `--worker_lease_s`; a router killed and restarted
//! has the worker back within one lease period with no operator action; a worker killed
//! without deregistering leaves both pools when its lease lapses; one stopped with SIGTERM
//! withdraws from both at once and finishes the request it was running first.

use std::time::{Duration, Instant};

use llmapi_tests::{
    Proc, fleet_worker, free_port, get, healthy_workers, post, request, router_with_secret,
    wait_until,
};
use serde_json::{Value, json};

/// The job secret: the worker's LLMAPI_JOB_TOKEN, the routers' worker and admin token.
const SECRET: &str = "fleet-test-secret-8d1f3a6c0b2e9475";
/// The routers' lease: short, so that the test sees it lapse.
const LEASE_S: u64 = 3;
/// Tokens of the request in flight while a worker stops: long enough to outlast the signal.
const LONG: u64 = 1900;

/// `llmapi-router` on `port` with the job secret and a short lease.
fn router(port: u16) -> Proc {
    router_with_secret(port, SECRET, &["--worker_lease_s", &LEASE_S.to_string()])
}

/// A job task registering with every router of `routers`.
fn worker(routers: &[u16]) -> Proc {
    fleet_worker(routers, SECRET, &format!("fleet-worker-{}", routers[0]))
}

/// Waits until every router of `ports` lists worker `w` healthy and serves a request with it
/// (healthy can come a moment before the worker's model facts reach the router).
fn served_by_all(ports: &[u16], w: &Proc) {
    for &p in ports {
        assert!(
            wait_until(Duration::from_secs(90), || healthy_workers(p).len() == 1),
            "router {p} never had the worker; see {}",
            w.log.display()
        );
        assert!(
            wait_until(Duration::from_secs(30), || request(
                p,
                "POST",
                "/v1/completions",
                Some(&json!({"model": "demo", "prompt": "up", "max_tokens": 1})),
                &[]
            )
            .is_ok_and(|r| r.status == 200)),
            "router {p} never served the worker"
        );
    }
}

fn listed(router: u16) -> usize {
    get(router, "/workers").json()["workers"]
        .as_array()
        .map_or(0, Vec::len)
}

fn completes(router: u16) -> Value {
    let r = post(
        router,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "fleet", "max_tokens": 3, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn a_worker_serves_every_router_a_restarted_router_gets_it_back_and_a_dead_one_lapses() {
    let ports = [free_port(), free_port()];
    let _a = router(ports[0]);
    let mut b = router(ports[1]);
    let mut w = worker(&ports);
    served_by_all(&ports, &w);
    for &p in &ports {
        assert_eq!(completes(p)["usage"]["completion_tokens"], 3);
    }

    // Router B dies and comes back on the same address knowing nothing: the worker's next
    // renewal (a third of the lease) registers it again.
    b.kill();
    b = router(ports[1]);
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3 * LEASE_S + 10), || healthy_workers(
            ports[1]
        )
        .len()
            == 1),
        "the restarted router never got the worker back; see {} and {}",
        b.log.display(),
        w.log.display()
    );
    let took = back.elapsed();
    assert!(
        took <= Duration::from_secs(LEASE_S + 5),
        "the worker came back after {took:?}, more than one lease ({LEASE_S} s) and its first health check"
    );
    assert_eq!(completes(ports[1])["usage"]["completion_tokens"], 3);

    // Killed without a word: both routers drop it when its lease lapses.
    w.kill();
    for &p in &ports {
        assert!(
            wait_until(Duration::from_secs(LEASE_S + 10), || listed(p) == 0),
            "router {p} still lists a worker whose lease lapsed: {}",
            get(p, "/workers").body
        );
    }
}

#[test]
fn a_worker_stopped_with_sigterm_withdraws_from_every_router() {
    let ports = [free_port(), free_port()];
    let _a = router(ports[0]);
    let _b = router(ports[1]);
    let mut w = worker(&ports);
    served_by_all(&ports, &w);
    // A long request in flight when SIGTERM (scancel) comes: it finishes before the worker
    // exits.
    let port = ports[0];
    let generated = |port: u16| -> u64 {
        get(port, "/metrics")
            .body
            .lines()
            .find_map(|l| {
                l.strip_prefix("llmapi_router_generation_tokens_total ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let before = generated(port);
    let long = std::thread::spawn(move || {
        let answer = post(
            port,
            "/v1/completions",
            &json!({"model": "demo", "prompt": "a long answer", "max_tokens": LONG,
                    "ignore_eos": true}),
        );
        (answer, Instant::now())
    });
    // Running on the worker, not just admitted: tokens are coming.
    assert!(
        wait_until(Duration::from_secs(30), || generated(port) > before),
        "the long request never started"
    );
    let signalled = Instant::now();
    assert!(
        w.terminate(Duration::from_secs(60)),
        "the worker did not stop"
    );
    let (answer, answered) = long.join().expect("client");
    assert!(
        answered > signalled,
        "the request ended before SIGTERM: this test checks nothing (make LONG longer)"
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json()["usage"]["completion_tokens"],
        LONG,
        "{}",
        answer.body
    );
    // Withdrawn, not lapsed: gone from both before a lease could run out.
    for &p in &ports {
        assert_eq!(listed(p), 0, "router {p}: {}", get(p, "/workers").body);
    }
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    assert_eq!(log.matches("withdrew from the router").count(), 2, "{log}");
}
